"""The training half of the harness: the part of an experiment a candidate cannot change.

A candidate's `train.py` imports this module and trains through it:

    run = harness.Run()                      # data, device, seed and budget come from the environment
    model = build_model().to(run.device)
    run.watch(model, seq_len=MAX_SEQ_LEN)    # parameters, FLOPs per token, and the hand-over checked early
    while not run.done():
        batch = run.batch(BATCH_SIZE, MAX_SEQ_LEN)   # LongTensor[B, T+1], sampled on the device
        ...forward, backward, optimizer step...
        run.step(loss, tokens=BATCH_SIZE * MAX_SEQ_LEN)
    run.finish(model, precision="bf16", depth=MODEL_DEPTH)

The training process only ever gets the train split, and `batch` never draws
the window at the end of each of its HELDOUT equal pieces: once in each window
of the loss curve, the harness measures the watched model's loss on them (eval
mode, not counted as training time) and prints it in the progress line as
`heldout`, a curve that sees over-fitting where the training loss cannot.
`finish` hands the model over as data (scheduler/handover.py): its graph,
traced with torch.export at the evaluation's input shape, and its weights as
safetensors. Scoring happens in a fresh process (scheduler/evaluate.py) that
rebuilds the model from those files without running any of the candidate's
code. `watch` tries the export right after the model is built, so a model that
cannot be handed over fails in seconds (EXPORT_FAILED, exit code EXIT_EXPORT),
not after training (unless SCHEDULER_EXPORTED says this source was handed over
before). Run on its own (`python train.py`), `Run()` starts that
evaluation beside training, waiting with its imports done, and `finish` tells
it to score and hands the terminal over to it, so the summary block is printed
as the original script printed it (the figures go to SCHEDULER_OUT/result.json).

Environment (set by the scheduler's trial; defaults make `python train.py` work):
    SCHEDULER_TRAIN_DATA   path of the train split (default data/train.bin)
    SCHEDULER_BUDGET       training seconds (default protocol.DEFAULT_BUDGET, 300)
    SCHEDULER_SEED         random seed (default 0)
    SCHEDULER_DEVICE       cuda or cpu (default: cuda when available)
    SCHEDULER_OUT          folder for the hand-over and statistics (default out/)
    SCHEDULER_TRIAL        set by the scheduler: it runs the evaluation itself
    SCHEDULER_EXPORTED     set by the scheduler to 1 when this very source has been handed over and scored
                           before on this GPU type: `watch` skips its early export check (3-5 s on an H200),
                           which only saves a failing model its budget
"""

from __future__ import annotations

import atexit
import functools
import gc
import json
import math
import os
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import numpy as np
import torch
import torch.nn.functional as F

from scheduler import handover
from scheduler.claims import peak_tflops
from scheduler.earlystop import CURVE_WINDOWS, window_of
from scheduler.protocol import (DEFAULT_BUDGET, EVAL_BATCH, EXIT_EXPORT, EXIT_NAN, EXPORT_TAG, PROGRAM_FILE,
                                PROGRESS_TAG, RESULT_FILE, STATS_FILE, WINDOW, evaluation_command, send_go)
from scheduler.startup import CLOCK_TICKS, cpu_times

WARMUP_STEPS = 3          # first steps compile and autotune: they are not counted as training time
SYNC_EVERY = 1.0          # seconds between waits for the device (clock, loss check) ...
PROGRESS_EVERY = 5.0      # ... and between progress lines, at most:
LINES_PER_WINDOW = 2      # a short budget gets more, so that each window of its loss curve holds a few lines
# What batch() never draws, as (windows, bytes each): the train split is cut into that many equal pieces, and the
# window at the end of each is held out, so that the held-out text is as mixed as the split (one window at the
# split's end, 8 KiB of one HTML page of the proxy corpus, measured 0.16 nats where validation is 0.53 and told no
# run from another: docs/design.md). The same text for every run, so that runs differ by their models alone. On a
# GPU 32 of the evaluation's windows; on the CPU (tests, demos) 2 of 256 bytes: 6 ms for the tests' tiny model
HELDOUT = {"cuda": (32, WINDOW), "cpu": (2, WINDOW // 4)}
HELDOUT_MIN_SPLIT = 10    # a split held out from must be this many times what is held out (tests' tiny corpora are)
HELDOUT_MAX_SECONDS = 2.0 # measuring stops past this many seconds in all: the trial's clock counts them in its 10 s
                          # margin (export needs 2-4 s of it), and a model large enough to take that long would
                          # otherwise be stopped as overdue
# What a finished standalone run becomes: a process that waits for the evaluation and exits with its code
WAIT_FOR_CHILD = "import os, sys; _, s = os.waitpid(int(sys.argv[1]), 0); sys.exit(os.waitstatus_to_exitcode(s))"


def attention_backward_flops(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    """Model FLOPs of a fused attention backward: twice its forward, as MFU counts them. torch's own
    formula adds the scores the kernel recomputes, so the same model's MFU would depend on the kernel."""
    batch, heads, q_len, qk_dim = query_shape
    k_len, v_dim = key_shape[-2], value_shape[-1]
    return 2 * 2 * batch * heads * q_len * k_len * (qk_dim + v_dim)


@functools.cache  # once per process
def skip_final_collection() -> None:
    """Let this process exit without Python's last garbage collection, which walks every object torch and
    x-transformers created: 1.7 s of a 2-core CPU per process (0.3 s with this), paid twice by every trial."""
    atexit.register(gc.freeze)


def exported_before() -> bool:
    """Whether the scheduler said this source was handed over and scored before (SCHEDULER_EXPORTED)."""
    return os.environ.get("SCHEDULER_EXPORTED") == "1"


def _env_float(name: str, default: float) -> float:
    value = os.environ.get(name, "")
    try:
        return float(value) if value else default
    except ValueError:
        sys.exit(f"harness: {name}={value!r} is not a number; unset it or give seconds, e.g. {name}=300")


class Clock:
    """The budget's clock and the run's counters: what `done()`, `step()` and `progress` of a Run answer.

    Training time counts from the end of the first WARMUP_STEPS (compilation). The
    device is waited for only about once a second (SYNC_EVERY), so the CPU queues the
    next steps while the GPU works; each wait checks the loss (a loss that is not
    finite ends the run with EXIT_NAN) and may print a progress line (PROGRESS_TAG).
    """

    def __init__(self, budget: float, device: torch.device) -> None:
        self.budget, self.device = budget, device
        self.flops_per_token: float | None = None  # set by Run.watch(): the MFU of the progress lines
        self.steps = 0
        self.tokens = 0
        self.training_seconds = 0.0
        self._timed_tokens = 0
        self._pending_tokens = 0
        self._last_mark: float | None = None
        self._last_print = 0.0
        self._loss: torch.Tensor | float = 0.0
        # the loss summed over the counted steps since the last progress line, on the device (adding waits for
        # nothing): a progress line reports their mean, so each window of the curve averages every step in it
        self._loss_sum: torch.Tensor | float = 0.0
        self._loss_count = 0
        # unchanged at the 300 s budget (windows of 15 s); a seconds budget on the CPU gets a curve too
        self._sync_every = min(SYNC_EVERY, budget / CURVE_WINDOWS / LINES_PER_WINDOW)
        self._progress_every = min(PROGRESS_EVERY, budget / CURVE_WINDOWS / LINES_PER_WINDOW)
        self.setup_seconds = 0.0     # the end of Run() to the first step: model, export check, FLOPs, optimizer
        self.warmup_seconds = 0.0    # the uncounted first steps: mostly compilation
        self._perf_started = time.perf_counter()

    def done(self) -> bool:
        """True once the counted training time has reached the budget."""
        self._start_clock()
        if self.steps < WARMUP_STEPS or self._elapsed() < self.budget:
            return False
        self._sync()  # the estimate says the budget is spent: confirm with the device's real time
        return self.training_seconds >= self.budget

    @property
    def progress(self) -> float:
        """Fraction of the budget spent, in [0, 1]: drives time-based learning-rate schedules."""
        return min(self._elapsed() / self.budget, 1.0) if self.budget > 0 else 1.0

    def step(self, loss: torch.Tensor | float, tokens: int) -> None:
        """End of one optimizer step. Waits for the device only about once a second (and on the
        first steps), so the CPU can queue the next steps while the GPU works."""
        self._start_clock()
        self.steps += 1
        self.tokens += tokens
        if self.steps > WARMUP_STEPS:
            self._pending_tokens += tokens
        self._loss = loss.detach() if isinstance(loss, torch.Tensor) else loss
        if self.steps > WARMUP_STEPS:
            self._loss_sum = self._loss_sum + (self._loss.float() if isinstance(self._loss, torch.Tensor) else self._loss)
            self._loss_count += 1
        if self.steps <= WARMUP_STEPS or time.perf_counter() - self._last_mark >= self._sync_every:
            self._sync()

    def _start_clock(self) -> None:
        """The clock starts at the first done(), step() or finish(), whichever the candidate calls first."""
        if self._last_mark is None:
            self._last_mark = time.perf_counter()

    def _elapsed(self) -> float:
        """Counted training seconds, including work queued since the last wait for the device."""
        if self.steps <= WARMUP_STEPS:
            return self.training_seconds
        return self.training_seconds + time.perf_counter() - self._last_mark

    def _sync(self) -> None:
        self._start_clock()
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        if self.steps == 1:
            self.setup_seconds = self._last_mark - self._perf_started
        if self.steps <= WARMUP_STEPS:
            self.warmup_seconds += now - self._last_mark
        else:
            self.training_seconds += now - self._last_mark
            self._timed_tokens += self._pending_tokens
            self._pending_tokens = 0
        self._last_mark = now

        self._exit_if_not_finite(float(self._loss))
        wall = time.time()
        if self._loss_count and wall - self._last_print >= self._progress_every:
            self._last_print = wall
            mean = float(self._loss_sum) / self._loss_count
            self._exit_if_not_finite(mean)  # a step between the syncs
            self._loss_sum, self._loss_count = 0.0, 0
            self._print_progress(mean)

    def _exit_if_not_finite(self, loss: float) -> None:
        if not math.isfinite(loss):
            print(f"FAIL: loss is {loss} at step {self.steps}", flush=True)
            sys.exit(EXIT_NAN)

    def tokens_per_second(self) -> float:
        return self._timed_tokens / self.training_seconds if self.training_seconds > 0 else 0.0

    def mfu_percent(self) -> float | None:
        if self.device.type != "cuda" or not self.flops_per_token:
            return None
        peak = peak_tflops(torch.cuda.get_device_name(self.device))
        if peak is None:
            return None
        return 100.0 * self.flops_per_token * self.tokens_per_second() / (peak * 1e12)

    def _print_progress(self, loss: float) -> None:
        """`loss`: the mean loss of the counted steps since the last line."""
        mfu = self.mfu_percent()
        line = {
            "step": self.steps,
            "loss": round(loss, 5),
            "tok_s": round(self.tokens_per_second()),
            "mfu": None if mfu is None else round(mfu, 2),
            "progress": round(self.progress, 4),
            "training_seconds": round(self.training_seconds, 2),
            **self.measure(),
        }
        print(PROGRESS_TAG + json.dumps(line), flush=True)

    def measure(self) -> dict[str, float]:
        """Extra figures of a progress line, measured outside the counted time (Run: the held-out loss)."""
        return {}


class Run(Clock):
    """Owns the data and the hand-over of one training run; its clock is Clock's."""

    def __init__(self) -> None:
        skip_final_collection()
        budget = _env_float("SCHEDULER_BUDGET", DEFAULT_BUDGET)
        self.seed = int(_env_float("SCHEDULER_SEED", 0))
        device = torch.device(os.environ.get("SCHEDULER_DEVICE") or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.out_dir = Path(os.environ.get("SCHEDULER_OUT", "out")).resolve()
        self.out_dir.mkdir(parents=True, exist_ok=True)
        torch.manual_seed(self.seed)
        if device.type == "cuda":
            torch.cuda.manual_seed(self.seed)
            torch.cuda.reset_peak_memory_stats(device)

        train_path = Path(os.environ.get("SCHEDULER_TRAIN_DATA", "data/train.bin"))
        if not train_path.is_file():
            sys.exit(f"harness: no train split at {train_path}; run `python -m scheduler prepare` first")
        # One host-to-device copy; batches are then cut on the device.
        self.train = torch.from_numpy(np.fromfile(train_path, dtype=np.uint8)).to(device)
        self._generator = torch.Generator(device).manual_seed(self.seed)
        pieces, length = HELDOUT.get(device.type, HELDOUT["cuda"])
        if self.train.numel() < HELDOUT_MIN_SPLIT * pieces * (length + 1):
            pieces, length = 1, -1  # too small to spare any: one piece, nothing held out
        self._pieces, self._piece, self._hole = pieces, self.train.numel() // pieces, length + 1
        self._heldout = heldout_windows(self.train, pieces, length) if self._hole else None
        self._model: torch.nn.Module | None = None  # watch(): what the held-out loss is measured on
        self._heldout_window = -1                   # the curve's window whose held-out loss was measured last
        self.heldout_seconds = 0.0

        self.num_params = 0
        self.interpreter_seconds = process_age()  # interpreter start, imports and the train split, up to here
        self.check_seconds = 0.0     # watch(): the early export check
        self.export_seconds = 0.0    # finish(): the export
        self._started = time.time()
        super().__init__(budget, device)  # last: the set-up time counts from here
        self._evaluation = None if os.environ.get("SCHEDULER_TRIAL") else start_evaluation(
            self.out_dir, train_path.resolve().parent, device.type, self._started)

    # ------------------------------------------------------------------ data

    def batch(self, batch_size: int, seq_len: int) -> torch.Tensor:
        """LongTensor[batch_size, seq_len + 1] of random windows of the train split (inputs and targets), drawn
        evenly from its pieces, none reaching into a piece's held-out end."""
        starts_per_piece = self._piece - self._hole - seq_len
        if starts_per_piece < 1:
            sys.exit(f"harness: batch({batch_size}, {seq_len}): a window of {seq_len + 1} bytes does not fit in the "
                     f"train split's pieces of {self._piece} bytes; use a shorter seq_len")
        draws = torch.randint(0, self._pieces * starts_per_piece, (batch_size, 1), device=self.device,
                              generator=self._generator)
        starts = draws // starts_per_piece * self._piece + draws % starts_per_piece
        offsets = torch.arange(seq_len + 1, device=self.device)
        return self.train[starts + offsets].long()

    # ------------------------------------------------------------------ model facts

    def watch(self, model: torch.nn.Module, seq_len: int) -> None:
        """Check that the model can be handed over (exits with EXIT_EXPORT if not; skipped for a source handed over
        before), count parameters and measure FLOPs per token of one training step (forward + backward)."""
        started = time.perf_counter()
        if not exported_before():
            export_or_exit(handover.check_exportable, model, self.device)
        self.check_seconds = time.perf_counter() - started
        self.num_params = sum(p.numel() for p in model.parameters())
        self.flops_per_token = training_flops_per_token(model, seq_len, self.device)
        self._model = model

    def measure(self) -> dict[str, float]:
        """The watched model's held-out loss, at the first progress line of each window of the curve."""
        # the window the line's (rounded) seconds put it in: one figure in each window of the trial's curve
        window = window_of(round(self.training_seconds, 2), self.budget) if self.budget > 0 else 0
        if self._model is None or self._heldout is None or window == self._heldout_window:
            return {}
        if self.heldout_seconds >= HELDOUT_MAX_SECONDS:
            print(f"harness: held-out loss took {self.heldout_seconds:.1f} s, past its limit (HELDOUT_MAX_SECONDS = "
                  f"{HELDOUT_MAX_SECONDS:g} s); not measured again", flush=True)
            self._model = None
            return {}
        self._heldout_window = window
        started = time.perf_counter()
        try:
            loss = heldout_loss(self._model, self._heldout)
        except Exception as error:  # a model outside the contract: the evaluation will say so; training goes on
            print(f"harness: held-out loss failed ({type(error).__name__}: {error}); not measured again", flush=True)
            self._model = None
            return {}
        finally:
            spent = time.perf_counter() - started
            self.heldout_seconds += spent
            self._last_mark += spent  # not training time
        return {"heldout": round(loss, 5)} if math.isfinite(loss) else {}

    # ------------------------------------------------------------------ end

    def finish(self, model: torch.nn.Module, **facts: object) -> None:
        """Hand the model over (graph and weights) and write the run's statistics; outside the scheduler, go on
        to evaluate them. Exits with EXIT_EXPORT if the model cannot be handed over.

        `facts` are extra summary fields the candidate knows best (precision, depth, ...).
        """
        self._sync()
        started = time.perf_counter()
        export_or_exit(handover.export_program, model, self.out_dir, self.device)
        self.export_seconds = time.perf_counter() - started

        peak_mb = torch.cuda.max_memory_allocated(self.device) / 2**20 if self.device.type == "cuda" else 0.0
        mfu = self.mfu_percent()
        stats = {
            "training_seconds": round(self.training_seconds, 3),
            "train_wall_seconds": round(time.time() - self._started, 3),
            "setup_seconds": round(self.setup_seconds, 3),
            "warmup_seconds": round(self.warmup_seconds, 3),
            "peak_vram_mb": round(peak_mb, 1),
            "mfu_percent": None if mfu is None else round(mfu, 2),
            "total_tokens": self.tokens,
            "tokens_per_second": round(self.tokens_per_second()),
            "num_steps": self.steps,
            "num_params": self.num_params,
            "flops_per_token": self.flops_per_token,
            "gpu_name": torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else "cpu",
            "seed": self.seed,
            "budget": self.budget,
            "interpreter_seconds": round(self.interpreter_seconds, 3),
            "check_seconds": round(self.check_seconds, 3),
            "export_seconds": round(self.export_seconds, 3),
            "heldout_seconds": round(self.heldout_seconds, 3),
            **facts,
        }
        (self.out_dir / STATS_FILE).write_text(json.dumps(stats, indent=2))
        check = "skipped: handed over before" if exported_before() else f"{self.check_seconds:.1f} s"
        print(f"harness: handed over {self.out_dir / PROGRAM_FILE} after {self.steps} steps, "
              f"{self.training_seconds:.1f} s of training; start-up: interpreter {self.interpreter_seconds:.1f} s, "
              f"set-up {self.setup_seconds:.1f} s (export check {check}), first steps "
              f"{self.warmup_seconds:.1f} s; export {self.export_seconds:.1f} s; held-out loss "
              f"{self.heldout_seconds:.1f} s (uncounted)", flush=True)

        if self._evaluation is not None:
            hand_over_to_evaluation(self._evaluation)


# ---------------------------------------------------------------------- what Run does for it


def process_age() -> float:
    """Seconds since this process started (Linux; 0.0 elsewhere): where a trial's start-up goes, for the
    measurements in docs/design.md."""
    read = cpu_times(os.getpid())
    if read is None:
        return 0.0
    return max(time.clock_gettime(time.CLOCK_BOOTTIME) - read[0] / CLOCK_TICKS, 0.0)


def heldout_windows(train: torch.Tensor, pieces: int, length: int) -> torch.Tensor:
    """The held-out windows as LongTensor[pieces, length + 1] (inputs and targets): the last length + 1 bytes of
    each of the train split's `pieces` equal pieces."""
    ends = (torch.arange(pieces, device=train.device) + 1) * (train.numel() // pieces)
    return train[(ends - length - 1)[:, None] + torch.arange(length + 1, device=train.device)].long()


def heldout_loss(model: torch.nn.Module, windows: torch.Tensor) -> float:
    """Mean next-byte loss (nats) of `model` in eval mode on `windows`, as the evaluation feeds it (BF16 autocast
    on a GPU); every module's training flag is put back as it was."""
    modes = [(module, module.training) for module in model.modules()]
    model.eval()
    cuda = windows.device.type == "cuda"
    try:
        with torch.no_grad(), torch.autocast(windows.device.type, dtype=torch.bfloat16, enabled=cuda):
            logits = model(windows[:, :-1])
        return float(F.cross_entropy(logits.float().flatten(0, 1), windows[:, 1:].flatten()))
    finally:
        for module, training in modes:
            module.training = training


def training_flops_per_token(model: torch.nn.Module, seq_len: int, device: torch.device) -> float:
    """Model FLOPs of one forward and backward pass per token, counted on one sequence of `seq_len` bytes."""
    try:
        from torch.utils.flop_counter import FlopCounterMode

        x = torch.zeros(1, seq_len, dtype=torch.long, device=device)
        aten = torch.ops.aten
        fused_backwards = (aten._scaled_dot_product_efficient_attention_backward,
                           aten._scaled_dot_product_flash_attention_backward,
                           aten._scaled_dot_product_cudnn_attention_backward)
        counter = FlopCounterMode(display=False,
                                  custom_mapping=dict.fromkeys(fused_backwards, attention_backward_flops))
        with counter:
            model(x).float().sum().backward()
        model.zero_grad(set_to_none=True)
        return counter.get_total_flops() / seq_len
    except Exception as error:  # an exotic module the counter cannot follow: fall back to 6N
        print(f"harness: FLOP count failed ({type(error).__name__}: {error}); using 6 x parameters", flush=True)
        return 6.0 * sum(p.numel() for p in model.parameters())


def export_or_exit(export: Callable[..., None], *args: object) -> None:
    """Run `export` (a check or the export itself); a model that cannot be handed over ends the run with one
    line saying why (EXPORT_TAG) and EXIT_EXPORT."""
    try:
        export(*args)
    except Exception as error:  # torch.export raises many kinds; each says why in its first line
        lines = [line.strip() for line in str(error).splitlines() if line.strip()]
        reason = f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]
        print(f"{EXPORT_TAG}{reason} (the model is traced with torch.export at the evaluation's input, "
              f"LongTensor[{EVAL_BATCH}, {WINDOW}], in eval mode; scheduler/handover.py says what it accepts)",
              flush=True)
        sys.exit(EXIT_EXPORT)


# ---------------------------------------------------------------------- a run on its own (never in a trial)


def start_evaluation(out_dir: Path, data_dir: Path, device: str, started: float) -> subprocess.Popen | None:
    """`python train.py` on its own: start the evaluation now, so that its imports (seconds) overlap training; it
    reads the hand-over only after "go" (scheduler/evaluate.py --wait). This is the user's own run, so its
    figures go beside the hand-over, to out/result.json. A trial runs its evaluation itself."""
    if getattr(sys.modules["__main__"], "__file__", None) is None:  # an interactive session: finish() only saves
        return None
    (out_dir / RESULT_FILE).unlink(missing_ok=True)  # an earlier run's figures are not this run's
    command = evaluation_command(out_dir, out_dir / RESULT_FILE, data_dir, device)
    return subprocess.Popen([*command, "--started", str(started), "--wait"], stdin=subprocess.PIPE)


def hand_over_to_evaluation(evaluation: subprocess.Popen) -> NoReturn:
    """Tell the evaluation to score, then replace this process by one that waits for it: the training
    code's state and GPU memory are gone while it scores, and the exit code is the evaluation's."""
    send_go(evaluation)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execv(sys.executable, [sys.executable, "-I", "-S", "-c", WAIT_FOR_CHILD, str(evaluation.pid)])
