"""The scoring half of the harness: bits per character of a handed-over program on a whole split.

    python -m scheduler.evaluate OUT_DIR --result RESULT_JSON [--data-dir data] [--split val [test]]
                                 [--device cuda] [--started T] [--wait]

Runs in a fresh, trusted process that never imports the candidate's file and
never unpickles anything it wrote: `handover.load_program` rebuilds the model
from OUT_DIR/program.json (a graph of allow-listed pure operators) and
OUT_DIR/weights.safetensors, or refuses them. `score` then feeds every byte of
the split, in fixed non-overlapping WINDOW-byte windows, EVAL_BATCH windows per
forward (always that shape), BF16 autocast on a GPU and FP32 on the CPU. The
windows go to the model in a secret random order, and a sample of the scoring
batches is fed a second time with the bytes after a secret cut changed and the
rows shuffled: logits at or before the cut must not move (see `score`). The
same weights give the same figure every time.

It writes RESULT_JSON (atomically, after each split) with the figures it made
itself: val_bpc, test_bpc, bytes scored, seconds, the program's parameters and
forward FLOPs, the rows checked for causality; and train_bpc, the model's score
on windows of the train split from secret places (train_sample_windows: text it
trained on; drawn after "go", and checked for causality like the splits), which
anchors the training's own loss curve (earlystop.usable_control). OUT_DIR/train_stats.json, what
the training says of itself, is read for the printed summary only.

With --wait it first imports its libraries, starts CUDA and puts the splits on
the device, then waits for the line "go" on standard input: it is started while
training runs, so those seconds cost no GPU time. End of input without "go"
(training failed) exits quietly.

Exit codes: 0 scored (or nothing to score after --wait); 1 the evaluation failed (the last line is
EVAL_FAILED: reason); 2 the hand-over was refused (REFUSED: reason).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import secrets
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS, set before torch starts

import numpy as np
import torch
import torch.nn.functional as F

from scheduler import handover
from scheduler.atomic import atomic_write
from scheduler.handover import FlopCounterMode, RefusedError
from scheduler.harness import skip_final_collection
from scheduler.protocol import EVAL_BATCH, EXIT_REFUSED, FAIL_TAG, GO, REFUSED_TAG, STATS_FILE, WINDOW

VOCAB = 256
IGNORE = -1              # the target of a position that is not scored
CHECK_BATCHES = 8        # scoring batches fed again for the causality check (all of them when there are fewer)
# Largest move of a logit at or before the cut that is taken for rounding. A causal model's logits there come
# from the same bytes and did not move at all: 0.0 over 4928 rows of the default model in BF16 on an H200 (the
# same kernels run for a batch of the same shape), and on the CPU. What a model could gain below this bound,
# by peeking a little at every position, is under 1e-5 nats per byte.
CAUSAL_TOLERANCE = 1e-5
MAX_STATS_BYTES = 2**20
# What the summary shows of the training's own claims (STATS_FILE): display only, never in RESULT_JSON
CLAIMS = ("training_seconds", "peak_vram_mb", "mfu_percent", "total_tokens", "num_steps", "num_params", "depth",
          "precision")
MAX_CLAIM_STRING = 64
# Windows of the train split at secret random places, scored too (train_bpc): the model's loss on text it trained
# on, which a control run's training-loss curve must not claim to beat by much (earlystop.usable_control). Spread
# over the split like training batches: one contiguous 64 KiB stretch scored 1.06 and 1.22 bpc for two runs of
# the same model whose training loss ended at 0.75 (H200, proxy corpus, 60 s), its text unlike the split's mean.
# And many of them: 64 windows put two 300 s H200 runs at 11% below and 11% above their last training loss (the
# model has memorised some of the text and not the rest); a fifth of the validation split (976 windows of
# enwik8's 5 MB, about 0.9 s of scoring on an H200) narrows that about four-fold.
TRAIN_SAMPLE_SHARE = 5           # the sample is this fraction (1 / 5) of the validation split's windows ...
MIN_TRAIN_SAMPLE_WINDOWS = 64    # ... and at least this many windows


class EvalError(Exception):
    """The program could not be scored; the message says why."""


def precision(device: torch.device) -> contextlib.ExitStack:
    """How the program runs: BF16 autocast on a GPU, with cuDNN's attention kernel first (then flash, efficient,
    math: the fastest forward at the evaluation's shape, 4.57 s for a 5 MB split against flash's 4.63 on an
    H200, named so that the score does not move with torch's default order); plain FP32 on the CPU."""
    stack = contextlib.ExitStack()
    if device.type == "cuda":
        from torch.nn.attention import SDPBackend, sdpa_kernel

        stack.enter_context(torch.autocast("cuda", dtype=torch.bfloat16))
        stack.enter_context(sdpa_kernel([SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION,
                                         SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH], set_priority=True))
    return stack


def warm_up(device: torch.device) -> None:
    """Pay before "go" what the first load and forward pay otherwise: the FLOP counter's first use (1.5 s on a
    2-core CPU), and on a GPU cuBLAS's and cuDNN's start and an attention plan of the default model's shape."""
    with FlopCounterMode(display=False), torch.no_grad():
        torch.zeros(1, device="meta") + 1
    if device.type == "cuda":
        with torch.no_grad(), precision(device):
            q = torch.zeros(EVAL_BATCH, 6, WINDOW, 64, device=device)
            F.scaled_dot_product_attention(q, q, q, is_causal=True)
            F.linear(q, torch.zeros(VOCAB, 64, device=device))
        del q
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def windows(data: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The split as rows of WINDOW input bytes and their targets.

    Row i feeds bytes [iW, iW+W) and predicts bytes [iW+1, iW+W+1), so every byte but the first is a target
    once. The last row's end, past the split's last byte, is filled with bytes from the split's start (real
    text, so the row looks like any other) whose targets are IGNORE.
    """
    n_targets = data.numel() - 1
    n_windows = math.ceil(n_targets / WINDOW)
    fill = n_windows * WINDOW - n_targets
    inputs = torch.cat([data[:-1], data[:fill]]) if fill else data[:-1]
    targets = torch.full((n_windows * WINDOW,), IGNORE, dtype=torch.long, device=data.device)
    targets[:n_targets] = data[1:]
    return inputs.view(n_windows, WINDOW), targets.view(n_windows, WINDOW)


class Scored(NamedTuple):
    bpc: float
    bytes_scored: int
    rows_checked: int           # rows of the causality check
    largest_difference: float   # the largest move of a logit at or before a row's cut
    where: str                  # where it was, for the refusal's message


@torch.no_grad()
def score(model: Callable[[torch.Tensor], torch.Tensor], data: torch.Tensor, device: torch.device,
          seed: int | None = None, check_batches: int = CHECK_BATCHES) -> Scored:
    """Bits per character of `model` over every byte of `data` after the first, with the causality check.

    Order: the windows are fed in an order drawn from `secrets` (or `seed`, for tests), EVAL_BATCH per forward;
    the last batch is filled up with other windows of the split whose targets are not counted again. Each row's
    nats are summed in float64 and added up in window order at the end, so the figure does not depend on the
    order when a row's logits depend on that row alone (which the check makes sure of).

    Causality: `check_batches` of the scoring batches, drawn at random, are fed a second time, changed: in
    each row, the bytes after a fresh random cut c (uniform over 0 .. WINDOW-2) come from another random window
    (the byte right after the cut always differs from the original), and the rows are shuffled. After
    un-shuffling, each row's logits at positions <= c must equal the scoring forward's. The model is a pure
    function of its [EVAL_BATCH, WINDOW] input (handover refuses state and randomness), and in both forwards
    it sees the same bytes up to c in that row. So the logits at or before c can differ only if they depend on
    bytes after c, or on other rows. A model that cannot tell checked batches from scored ones (both are real
    text of the same shape, the secret order hides which window a row is, and the check batches are scoring
    batches) must behave the same in both: one that peeks at the next byte at position p is caught in a row
    whose cut is p. Peeking at a fraction f of positions goes unnoticed with probability (1 - f) per checked
    row, (1 - f)^R for R rows: with 8 batches of 64 rows (R = 512) and f = 1%, 0.99^512 = 0.58%; f = 0.1%
    is seen with probability 40% per evaluation, and each rerun of a candidate draws afresh. A model that
    reads other rows is caught wherever what it reads moved (the rows are shuffled and each row's end changed).

    Returns the score and the check's largest difference; the caller compares it with CAUSAL_TOLERANCE.
    """
    if data.numel() < 2:
        raise EvalError(f"a split of {data.numel()} bytes has nothing to score")
    generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
    inputs, targets = windows(data.to(device))
    n_windows = len(inputs)
    n_batches = math.ceil(n_windows / EVAL_BATCH)
    fill = n_batches * EVAL_BATCH - n_windows  # rows of the last batch that repeat windows scored elsewhere
    order = torch.cat([torch.randperm(n_windows, generator=generator),
                       torch.randint(0, n_windows, (fill,), generator=generator)]).view(n_batches, EVAL_BATCH)
    checked = set(torch.randperm(n_batches, generator=generator)[:check_batches].tolist())
    order_on_device = order.to(device)
    window_nats = torch.zeros(n_windows, dtype=torch.float64, device=device)
    differences: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    for b in range(n_batches):
        rows = order_on_device[b]
        x = inputs[rows].long()
        with precision(device):
            logits = model(x)
        if not isinstance(logits, torch.Tensor) or logits.shape != (EVAL_BATCH, WINDOW, VOCAB):
            shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
            raise EvalError(f"the program returned {shape} for input {tuple(x.shape)}; expected logits "
                            f"{(EVAL_BATCH, WINDOW, VOCAB)}")
        nats = F.cross_entropy(logits.float().view(-1, VOCAB), targets[rows].view(-1), ignore_index=IGNORE,
                               reduction="none")
        counted = EVAL_BATCH - (fill if b == n_batches - 1 else 0)
        window_nats[rows[:counted]] = nats.view(EVAL_BATCH, WINDOW)[:counted].double().sum(1)
        if b in checked:
            differences.append(_check_batch(model, x, logits, inputs, generator, device))
    n_targets = int((targets != IGNORE).sum())
    bpc = float(window_nats.sum()) / n_targets / math.log(2)
    largest, where = 0.0, ""
    for difference, cuts, position in differences:
        if float(difference) > largest:
            row, column = divmod(int(position), WINDOW)
            largest, where = float(difference), f"position {column} of a row cut after {int(cuts[row])}"
    return Scored(bpc, n_targets, len(differences) * EVAL_BATCH, largest, where)


def _check_batch(model: Callable, x: torch.Tensor, logits: torch.Tensor, inputs: torch.Tensor,
                 generator: torch.Generator, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Feed batch `x` again with each row's bytes after a secret cut replaced and the rows shuffled; the largest
    difference of the logits at or before the cuts from `logits` (on the device), the cuts, and where."""
    cuts = torch.randint(0, WINDOW - 1, (EVAL_BATCH, 1), generator=generator)
    donors = torch.randint(0, len(inputs), (EVAL_BATCH,), generator=generator)
    shift = torch.randint(1, VOCAB, (EVAL_BATCH,), generator=generator)
    shuffle = torch.randperm(EVAL_BATCH, generator=generator)
    cuts, donors, shift, shuffle = (t.to(device) for t in (cuts, donors, shift, shuffle))
    positions = torch.arange(WINDOW, device=device)
    changed = torch.where(positions > cuts, inputs[donors].long(), x)
    after = cuts + 1  # the byte right after the cut: the one a peeking model would read at the cut
    original = x.gather(1, after)
    same = changed.gather(1, after) == original
    changed.scatter_(1, after, torch.where(same, (original + shift[:, None]) % VOCAB, changed.gather(1, after)))
    with precision(device):
        again = model(changed[shuffle])
    if not isinstance(again, torch.Tensor) or again.shape != logits.shape:
        raise EvalError("the program returned a different shape for a batch of the same shape")
    unshuffled = torch.empty_like(again)
    unshuffled[shuffle] = again
    a, b = unshuffled.float(), logits.float()
    difference = (a - b).abs()
    both_finite = torch.isfinite(a) & torch.isfinite(b)
    # equal non-finite values (the same inf, or nan from the same computation) are not a move; a finite logit
    # that becomes non-finite, or the reverse, is
    moved = torch.where(both_finite, difference,
                        torch.where(torch.isfinite(a) == torch.isfinite(b), 0.0, math.inf))
    moved = torch.where(positions <= cuts, moved.amax(-1), 0.0)  # [rows, positions]: at or before the cut only
    flat = moved.view(-1)
    position = flat.argmax()
    return flat[position], cuts.view(-1).cpu(), position


def load_split(split_file: Path, device: torch.device) -> torch.Tensor:
    """The split's bytes as a uint8 tensor on the device (this starts CUDA, which takes a second or two)."""
    data = torch.from_numpy(np.fromfile(split_file, dtype=np.uint8)).to(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    return data


def train_sample_windows(val_bytes: int) -> int:
    """How many windows of the train split anchor the curve: a fifth of the validation split's, at least 64."""
    return max(MIN_TRAIN_SAMPLE_WINDOWS, val_bytes // WINDOW // TRAIN_SAMPLE_SHARE)


def load_train_sample(train_file: Path, device: torch.device, windows: int) -> torch.Tensor | None:
    """`windows` windows of WINDOW bytes of the train split, from places the candidate cannot know, one after
    another (each window's last target is the next one's first byte: one byte in WINDOW scored out of its
    context, which on average raises the figure a little and loosens the anchor by as much); None without a split
    that holds a window."""
    size = train_file.stat().st_size if train_file.is_file() else 0
    if size <= WINDOW:
        return None
    split = np.memmap(train_file, dtype=np.uint8, mode="r")
    starts = [secrets.randbelow(size - WINDOW + 1) for _ in range(windows)]
    return torch.from_numpy(np.concatenate([split[start:start + WINDOW] for start in starts])).to(device)


def read_claims(out_dir: Path) -> dict:
    """What the training says of itself (STATS_FILE), for the printed summary only: numbers and short strings
    of the known keys; anything else, or a file that cannot be read safely, gives nothing."""
    try:
        directory = handover.open_folder(out_dir)
        try:
            raw = handover.read_regular_file(directory, STATS_FILE, MAX_STATS_BYTES)
        finally:
            os.close(directory)
        stats = json.loads(raw.decode("utf-8"))
    except (RefusedError, ValueError, RecursionError):
        return {}
    if not isinstance(stats, dict):
        return {}
    claims = {}
    for key in CLAIMS:
        value = stats.get(key)
        if isinstance(value, bool) or value is None:
            continue
        if isinstance(value, (int, float)) and math.isfinite(value):
            claims[key] = value
        elif isinstance(value, str) and len(value) <= MAX_CLAIM_STRING and value.isprintable():
            claims[key] = value
    return claims


def format_summary(result: dict, split: str = "val") -> str:
    """The original script's summary block, so people and parsers find what they know."""

    def fmt(key: str, spec: str) -> str:
        value = result.get(key)
        return "n/a" if not isinstance(value, (int, float)) else format(value, spec)

    parameters = result.get("parameters", result.get("num_params"))
    lines = [
        "---",
        f"{split}_bpc:          {fmt(f'{split}_bpc', '.6f')}",
        f"training_seconds: {fmt('training_seconds', '.1f')}",
        f"total_seconds:    {fmt('total_seconds', '.1f')}",
        f"peak_vram_mb:     {fmt('peak_vram_mb', '.1f')}",
        f"mfu_percent:      {fmt('mfu_percent', '.2f')}",
        f"total_tokens_M:   {result['total_tokens'] / 1e6 if 'total_tokens' in result else 0:.1f}",
        f"num_steps:        {result.get('num_steps', 'n/a')}",
        f"num_params_M:     {parameters / 1e6 if isinstance(parameters, (int, float)) else 0:.1f}",
        f"depth:            {result.get('depth', 'n/a')}",
        f"precision:        {result.get('precision', 'n/a')}",
    ]
    return "\n".join(lines)


def causal(scored: Scored, what: str) -> Scored:
    """`scored`, unless its causality check saw a logit move (RefusedError, which says where)."""
    if scored.largest_difference > CAUSAL_TOLERANCE:
        raise RefusedError(f"not causal: with each row's bytes after a secret cut changed (and the rows shuffled), "
                           f"a logit moved by {scored.largest_difference:.3g} at {scored.where} of {what}; the "
                           f"model must not see the bytes it predicts, nor other rows")
    return scored


def write_result(path: Path, result: dict) -> None:
    """RESULT_JSON, replaced atomically: a reader sees the old or the new figures, never half of them."""
    atomic_write(path, json.dumps(result, indent=2))


def one_line(message: str, limit: int = 500) -> str:
    return " ".join(str(message).split())[:limit]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scheduler.evaluate", description=__doc__.splitlines()[0])
    parser.add_argument("out_dir", type=Path, help="what training handed over (program.json, weights.safetensors)")
    parser.add_argument("--result", type=Path, required=True, help="where to write the figures (JSON)")
    parser.add_argument("--data-dir", type=Path, default=Path("data"))
    parser.add_argument("--split", choices=("val", "test"), nargs="+", default=["val"],
                        help="splits to score, in order; each score is added to the result file as it is made")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--started", type=float, default=None,
                        help="wall-clock start of the whole run (for total_seconds)")
    parser.add_argument("--wait", action="store_true", help=f"load the splits, then wait for '{GO}' on stdin")
    args = parser.parse_args(argv)
    skip_final_collection()
    device = torch.device(args.device)
    files = {split: args.data_dir / f"{split}.bin" for split in args.split}
    data = {split: load_split(file, device) for split, file in files.items() if file.exists()}
    if args.wait:
        warm_up(device)
        if sys.stdin.readline().strip() != GO:
            return 0

    started = time.time()
    result: dict = {}
    try:
        program = None
        for split in args.split:  # each score is written as soon as it is made: a later failure leaves it standing
            if split not in data:
                raise EvalError(f"no {split} split at {files[split]}; run `python -m scheduler prepare` first")
            if program is None:  # loaded and checked once for all splits
                program = handover.load_program(args.out_dir, device)
                result.update(parameters=program.parameters, load_seconds=round(time.time() - started, 3),
                              forward_flops_per_token=program.forward_flops_per_token)
                if device.type == "cuda":
                    result["device_name"] = torch.cuda.get_device_name(device)
            scoring = time.time()
            scored = causal(score(program, data[split], device), f"the {split} split")
            if not math.isfinite(scored.bpc):
                raise EvalError(f"the score is {scored.bpc}: the weights produce non-finite logits")
            seconds = round(time.time() - scoring, 3)
            if split == "val":
                result.update(val_bpc=round(scored.bpc, 6), eval_seconds=round(time.time() - started, 3),
                              score_seconds=seconds, bytes_scored=scored.bytes_scored)
                # not a score: the anchor of the training's curve, after the timings. Drawn only now, after "go",
                # when the training is gone: its sandbox reads the same train.bin, and the pages this read brings
                # into the page cache (mincore, RWF_NOWAIT) would show a candidate running beside it the places
                windows = train_sample_windows(len(data[split]))
                train_sample = load_train_sample(args.data_dir / "train.bin", device, windows)
                if train_sample is not None:  # checked too: a model that knows its train text could peek there alone
                    trained = causal(score(program, train_sample, device), "the train split's sample").bpc
                    result["train_bpc"] = round(trained, 6) if math.isfinite(trained) else None
            else:  # an addition to the validation result: its timings stay those of the validation scoring
                result.update(test_bpc=round(scored.bpc, 6), test_eval_seconds=seconds,
                              test_bytes_scored=scored.bytes_scored)
            result["causal_rows_checked"] = result.get("causal_rows_checked", 0) + scored.rows_checked
            result["causal_largest_difference"] = max(result.get("causal_largest_difference", 0.0),
                                                      scored.largest_difference)
            if args.started is not None:
                result["total_seconds"] = round(time.time() - args.started, 1)
            write_result(args.result, result)
            if split == "val" and result.get("train_bpc") is not None:  # before the block, which keeps its format
                print(f"train_bpc: {result['train_bpc']:.6f} (the model on text it trained on: the early-stop anchor)")
            print(format_summary({**read_claims(args.out_dir), **result}, split), flush=True)
    except RefusedError as error:
        args.result.unlink(missing_ok=True)  # a refused model has no score, not even of an earlier split
        print(REFUSED_TAG + one_line(error), flush=True)
        return EXIT_REFUSED
    except EvalError as error:
        print(FAIL_TAG + one_line(error), flush=True)
        return 1
    except Exception as error:  # the program failed while running (an operator's error, out of memory)
        print(FAIL_TAG + one_line(f"{type(error).__name__}: {error}".splitlines()[0]), flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
