"""What a training says of itself, read as untrusted data and checked against what the trusted side saw.

The candidate's process writes its statistics (protocol.STATS_FILE: counted
training seconds, tokens, steps, peak memory, precision) with code it can
change, so none of it is taken on trust:

- the file is read without following links, only if it is a small regular file,
  and only finite non-negative numbers and known precisions are kept;
- the counted training seconds cannot exceed the window the trial saw on its own
  clock (from the first progress line to the end of the process);
- the model FLOPs utilisation is computed here, from the FLOPs the evaluation
  counted on the graph it scored and the GPU name the trial asked of nvidia-smi,
  and must not exceed 100%;
- parameters come from the evaluation (the weights it loaded), the GPU's name
  from the trial.

A training whose claims fail a check is refused: its row says which claim.
"""

from __future__ import annotations

import json
import math
import os
import stat
from pathlib import Path

MAX_JSON_BYTES = 64_000      # a statistics or result file is a few hundred bytes
CLAIM_SLACK = 2.0            # seconds a training may count beyond the trial's window: its clock starts up to one
                             # sync (1 s) before its first progress line
TRAINING_FLOPS = 3.0         # forward + backward per token, in forward passes (the convention behind MFU)
PRECISIONS = ("bf16", "fp8", "fp16", "fp32")

# Dense BF16 peak (no sparsity) in TFLOP/s, matched against the GPU's name. Order matters: the first substring
# that matches wins.
BF16_PEAK_TFLOPS = (
    ("H100 NVL", 835.0),
    ("H200 NVL", 835.0),
    ("H200", 989.0),
    ("H100", 989.0),   # SXM; the PCIe part is lower, matched below
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A10G", 125.0),
    ("L40S", 362.0),
    ("L40", 181.0),
    ("L4", 121.0),
    ("RTX 4090", 165.0),
    ("RTX 3090", 71.0),
)
H100_PCIE_TFLOPS = 756.0


def peak_tflops(device_name: str) -> float | None:
    """Dense BF16 peak of a GPU by name, or None for a GPU we do not know (we do not guess)."""
    if "H100" in device_name and "PCIe" in device_name:
        return H100_PCIE_TFLOPS
    for key, tflops in BF16_PEAK_TFLOPS:
        if key in device_name:
            return tflops
    return None


def read_untrusted_json(path: Path) -> dict:
    """A JSON object from a file a candidate could have written or replaced: {} unless it is a small regular
    file (a link, a FIFO or a device is not opened for reading, let alone followed)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return {}
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode) or info.st_size > MAX_JSON_BYTES:
            return {}
        with os.fdopen(fd, "rb") as f:
            fd = -1
            value = json.loads(f.read(MAX_JSON_BYTES))
    except (OSError, ValueError):
        return {}
    finally:
        if fd >= 0:
            os.close(fd)
    return value if isinstance(value, dict) else {}


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value < 0:
        return None
    return float(value)


def check(stats: dict, figures: dict, window: float | None, gpu_name: str) -> tuple[dict, str | None]:
    """The row's training fields from the training's claims and the evaluation's figures, and the reason to
    refuse the run when a claim cannot be true (None when every claim passes)."""
    seconds, tokens, steps = (_number(stats.get(k)) for k in ("training_seconds", "total_tokens", "num_steps"))
    rate, memory = _number(stats.get("tokens_per_second")), _number(stats.get("peak_vram_mb"))
    fields = {
        "training_seconds": seconds, "tokens": None if tokens is None else int(tokens),
        "steps": None if steps is None else int(steps), "tokens_per_second": rate, "peak_memory_mb": memory,
        "precision": stats.get("precision") if stats.get("precision") in PRECISIONS else None,
        "parameters": figures.get("parameters"), "mfu_percent": None,
    }
    forward_flops = _number(figures.get("forward_flops_per_token"))
    peak = peak_tflops(gpu_name)
    if rate and forward_flops and peak:
        fields["mfu_percent"] = round(100.0 * TRAINING_FLOPS * forward_flops * rate / (peak * 1e12), 2)

    if seconds is not None and window is not None and seconds > window + CLAIM_SLACK:
        return fields, (f"its statistics claim {seconds:.1f} s of training, but the trial saw only {window:.1f} s "
                        "from its first progress line to its end")
    if rate is not None and seconds is not None and tokens is not None and rate * seconds > tokens * 1.01 + 1:
        return fields, (f"its statistics do not add up: {rate:,.0f} tokens/s for {seconds:.1f} s is more than "
                        f"the {tokens:,.0f} tokens it claims in all")
    if steps is not None and tokens is not None and steps > tokens:
        return fields, f"its statistics claim {steps:,.0f} steps for {tokens:,.0f} tokens"
    if fields["mfu_percent"] is not None and fields["mfu_percent"] > 100:
        return fields, (f"its statistics claim {rate:,.0f} tokens/s, which would be {fields['mfu_percent']:.0f}% "
                        f"of the {gpu_name}'s peak for a model of {forward_flops:,.0f} forward FLOPs a token")
    return fields, None
