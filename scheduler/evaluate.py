"""The scoring half of the harness: bits per character of saved weights on a whole split.

    python -m scheduler.evaluate CANDIDATE.py OUT_DIR [--data-dir data] [--split val [test]] [--device cuda] [--wait]

Runs in a fresh process that the candidate's training code never ran in: it
imports the candidate as a module (so its `if __name__ == "__main__":` block
does not run), calls `build_model()`, loads OUT_DIR/model.pt and scores every
byte of the split in fixed non-overlapping windows. The same weights give the
same figure every time. It writes OUT_DIR/result.json (the training statistics
plus the score) and prints the summary block of the original script.

With --wait it first imports the libraries the baseline uses, starts CUDA and
puts the split on the device, then waits for the line "go" on standard input
before it touches the candidate: it is started while training runs, so those
imports (11-12 s on an H100 machine) and CUDA's start cost no GPU time, and the
candidate's code still runs only once training has ended. While it waits it
holds a CUDA context (a few hundred MB of GPU memory) beside training. End of
input without "go" (training failed) exits quietly.

Exit codes: 0 scored, or nothing to score after --wait; 1 the evaluation failed (the reason is the last line printed).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import math
import os
import sys
import time
from pathlib import Path
from types import ModuleType

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before torch starts

import numpy as np
import torch
import torch.nn.functional as F

from scheduler.harness import skip_final_collection
from scheduler.protocol import FAIL_TAG, GO, RESULT_FILE, STATS_FILE, WEIGHTS_FILE

WINDOW = 1024          # bytes of context per window; windows do not overlap
BATCH_WINDOWS = 64     # windows per forward pass
VOCAB = 256
IGNORE = -1            # the target of a padding position: not scored
CAUSAL_TOLERANCE = 1e-3  # logits of a causal model do not move at all; this only absorbs kernel noise
PRELOADED = ("x_transformers", "adam_atan2_pytorch")  # what the baseline imports beyond torch and the harness


class EvalError(Exception):
    """The candidate's model could not be scored; the message says why."""


def load_candidate(path: Path) -> ModuleType:
    """Import a candidate file as a module named `candidate` (its training block does not run)."""
    sys.path.insert(0, str(path.parent))
    spec = importlib.util.spec_from_file_location("candidate", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not callable(getattr(module, "build_model", None)):
        raise EvalError(f"{path.name} has no module-level build_model()")
    return module


def autocast(device: torch.device):
    """BF16 autocast on a GPU, plain FP32 on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def windows(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as rows of WINDOW input bytes and their targets, in whole batches of equal shape.

    Row i feeds bytes [iW, iW+W) and predicts bytes [iW+1, iW+W+1), so every byte but the
    first is a target once. The end of the last window, and the rows that fill up the last
    batch, are padding whose targets are IGNORE: one batch shape for the whole split, so the
    GPU builds its kernel plans once (cuDNN attention took 0.9 s longer for four shapes).
    """
    n_targets = data.numel() - 1
    n_windows = math.ceil(n_targets / WINDOW)
    rows = batch_rows(n_windows) * math.ceil(n_windows / batch_rows(n_windows))
    inputs = torch.zeros(rows * WINDOW, dtype=torch.uint8, device=data.device)
    targets = torch.full((rows * WINDOW,), IGNORE, dtype=torch.long, device=data.device)
    inputs[:n_targets] = data[:-1]
    targets[:n_targets] = data[1:]
    return inputs.view(rows, WINDOW), targets.view(rows, WINDOW)


def batch_rows(n_windows: int) -> int:
    """Windows per forward pass: BATCH_WINDOWS, or fewer for a split smaller than one batch."""
    return min(BATCH_WINDOWS, n_windows)


@torch.no_grad()
def check_causal(model: torch.nn.Module, data: torch.Tensor, device: torch.device) -> None:
    """A model whose logits at a position depend on later bytes would score impossibly well: refuse it.

    Changes one byte in the middle and the last byte of the first window; the logits before
    each changed position must not move. On a GPU the window goes in a batch of the scoring's
    shape, whose kernels are then planned once; on the CPU one window is cheaper.
    """
    first_batch, _ = windows(data[: BATCH_WINDOWS * WINDOW + 1])  # the first batch only; score() cuts the rest
    x = (first_batch if device.type == "cuda" else first_batch[:1]).to(device).long()
    with autocast(device):
        reference = model(x)
        if not isinstance(reference, torch.Tensor):
            return  # score() reports the wrong output type
        for position in (WINDOW // 2, WINDOW - 1):
            changed = x.clone()
            changed[0, position] = (changed[0, position] + 1) % VOCAB
            moved = (model(changed)[0, :position].float() - reference[0, :position].float()).abs().max().item()
            if moved > CAUSAL_TOLERANCE:
                raise EvalError(f"not causal: changing byte {position} moved the logits of earlier positions by "
                                f"{moved:.3g}; the model must not see the bytes it predicts")


@torch.no_grad()
def score(model: torch.nn.Module, data: torch.Tensor, device: torch.device) -> tuple[float, int]:
    """Bits per character of `model` over every byte of `data` after the first, and how many bytes that is."""
    inputs, targets = windows(data.to(device))
    per_batch = batch_rows(len(inputs))
    total_nats = torch.zeros((), dtype=torch.float64, device=device)
    for i in range(0, len(inputs), per_batch):
        x = inputs[i : i + per_batch].long()
        with autocast(device):
            logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.shape != (*x.shape, VOCAB):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise EvalError(f"build_model()'s module returned {shape} for input {tuple(x.shape)}; expected logits {(*x.shape, VOCAB)}")
        nats = F.cross_entropy(logits.float().view(-1, VOCAB), targets[i : i + per_batch].reshape(-1),
                               ignore_index=IGNORE, reduction="none")
        total_nats += nats.double().sum()  # float64, kept on the device: one wait for the GPU, not one per batch
    n_targets = int((targets != IGNORE).sum())
    bpc = float(total_nats) / n_targets / math.log(2)
    if not math.isfinite(bpc):
        raise EvalError(f"the score is {bpc}: the saved weights produce non-finite logits")
    return bpc, n_targets


def load_split(split_file: Path, device: torch.device) -> torch.Tensor:
    """The split's bytes as a uint8 tensor on the device (this starts CUDA, which takes a second or two)."""
    data = torch.from_numpy(np.fromfile(split_file, dtype=np.uint8)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return data


def load_model(candidate: Path, weights: Path, device: torch.device) -> torch.nn.Module:
    """The candidate's model with its saved weights, on the device, in eval mode."""
    module = load_candidate(candidate)
    try:
        with device:  # initialised where it runs: on a GPU, faster than on the CPU and a copy
            model = module.build_model()
    except Exception as error:
        raise EvalError(f"build_model() raised {type(error).__name__}: {error}") from error
    state = torch.load(weights, map_location=device, weights_only=True)
    try:
        model.load_state_dict(state)
    except RuntimeError as error:
        detail = "; ".join(line.strip() for line in str(error).strip().splitlines()[:3])
        raise EvalError(f"saved weights do not fit build_model()'s module: {detail}") from error
    return model.to(device).eval()


def format_summary(result: dict, split: str = "val") -> str:
    """The original script's summary block, so people and parsers find what they know."""

    def fmt(key: str, spec: str) -> str:
        value = result.get(key)
        return "n/a" if value is None else format(value, spec)

    lines = [
        "---",
        f"{split}_bpc:          {fmt(f'{split}_bpc', '.6f')}",
        f"training_seconds: {fmt('training_seconds', '.1f')}",
        f"total_seconds:    {fmt('total_seconds', '.1f')}",
        f"peak_vram_mb:     {fmt('peak_vram_mb', '.1f')}",
        f"mfu_percent:      {fmt('mfu_percent', '.2f')}",
        f"total_tokens_M:   {result.get('total_tokens', 0) / 1e6:.1f}",
        f"num_steps:        {result.get('num_steps', 'n/a')}",
        f"num_params_M:     {result.get('num_params', 0) / 1e6:.1f}",
        f"depth:            {result.get('depth', 'n/a')}",
        f"precision:        {result.get('precision', 'n/a')}",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("candidate", type=Path, help="the candidate's train.py")
    parser.add_argument("out_dir", type=Path, help="folder with model.pt and train_stats.json")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--split", choices=("val", "test"), nargs="+", default=["val"],
                        help="splits to score, in order; each score is added to the result file as it is made")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--started", type=float, default=None, help="wall-clock start of the whole run (for total_seconds)")
    parser.add_argument("--wait", action="store_true", help=f"import the libraries and load the split, then wait for '{GO}' on stdin")
    args = parser.parse_args(argv)
    skip_final_collection()
    device = torch.device(args.device)
    if args.wait:
        for name in PRELOADED:
            try:
                importlib.import_module(name)
            except ImportError:
                pass  # a candidate that needs it fails in load_candidate, with its own message
    files = {split: args.data_dir / f"{split}.bin" for split in args.split}
    data = {split: load_split(file, device) for split, file in files.items() if file.exists()}
    if args.wait and sys.stdin.readline().strip() != GO:
        return 0

    result_path = args.out_dir / RESULT_FILE  # a test-split score is added to an existing result
    stats_path = result_path if result_path.exists() else args.out_dir / STATS_FILE
    result = json.loads(stats_path.read_text()) if stats_path.exists() else {}
    started, model = time.time(), None
    try:
        for split in args.split:  # each score is written as soon as it is made: a later failure leaves it standing
            if split not in data:
                raise EvalError(f"no {split} split at {files[split]}; run `python -m scheduler prepare` first")
            if model is None:  # built, loaded and checked once for all splits
                model = load_model(args.candidate.resolve(), args.out_dir / WEIGHTS_FILE, device)
                check_causal(model, data[split], device)
            scoring = time.time()
            bpc, n = score(model, data[split], device)
            if split == "val":
                result.update({"val_bpc": round(bpc, 6), "eval_seconds": round(time.time() - started, 3),
                               "score_seconds": round(time.time() - scoring, 3), "bytes_scored": n})
            else:  # an addition to the validation result: its timings stay those of the validation scoring
                result.update({"test_bpc": round(bpc, 6), "test_eval_seconds": round(time.time() - scoring, 3)})
            if args.started is not None:
                result["total_seconds"] = round(time.time() - args.started, 1)
            result_path.write_text(json.dumps(result, indent=2))
            print(format_summary(result, split), flush=True)
    except EvalError as error:
        print(FAIL_TAG + str(error), flush=True)
        return 1
    except Exception as error:  # the candidate's own code failed while scoring: say what, keep the traceback short
        print(FAIL_TAG + f"{type(error).__name__}: {error}".splitlines()[0][:500], flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
