"""What a trial, the candidate's training process and the evaluation process tell one another.

The training process (scheduler/harness.py, inside the sandbox), the evaluation
(scheduler/evaluate.py, outside it) and the trial that runs both
(scheduler/trial.py) agree on these folder and file names, output tags, exit
codes and the evaluation's command line. They live apart from the harness
because the harness imports torch, which launch and Ray's trial workers never
need (2.5 s of imports each).

A trial's folder, results/runs/TRIAL_ID/, belongs to the trusted side (the log,
the evaluation's result). The candidate can write only below it, in WORK_DIR:
its train.py, and in OUT_DIR what it hands over: the model as data (a graph in
PROGRAM_FILE, its tensors in WEIGHTS_FILE) and what it says of its own run
(STATS_FILE). The trusted side reads those as untrusted data and never runs or
unpickles any of it.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WORK_DIR = "work"                   # under a trial's folder: the candidate's working folder, the only one it can write
OUT_DIR = "out"                     # under WORK_DIR: what training hands over
PROGRAM_FILE = "program.json"       # the model's graph: a JSON list of operator calls (scheduler/handover.py)
WEIGHTS_FILE = "weights.safetensors"  # the graph's tensors
STATS_FILE = "train_stats.json"     # what the training says of itself: checked, never trusted
RESULT_FILE = "result.json"         # the evaluation's figures, in the trial's own folder (outside WORK_DIR)

DEFAULT_BUDGET = 300.0              # training seconds of a trial, and of `python train.py`, unless told otherwise
EVAL_BATCH = 64                     # windows per forward pass of the evaluation ...
WINDOW = 1024                       # ... of this many bytes: the one input shape the export traces

PROGRESS_TAG = "@@progress "        # training output lines the trial parses (JSON follows the tag)
EXPORT_TAG = "EXPORT_FAILED: "      # the harness's one-line reason when the model cannot be exported
FAIL_TAG = "EVAL_FAILED: "          # the evaluation's one-line reason for failing
REFUSED_TAG = "REFUSED: "           # the evaluation's one-line reason for refusing what the candidate handed over
EXIT_NAN = 3                        # the training's exit code for a loss that is not finite
EXIT_EXPORT = 4                     # the training's exit code for a model that cannot be exported
EXIT_REFUSED = 2                    # the evaluation's exit code for a refused hand-over (1: it failed)
GO = "go"                           # the line a waiting evaluation (evaluate --wait) waits for before it scores


def evaluation_command(out_dir: str | Path, result_file: str | Path, data_dir: str | Path, device: str) -> list[str]:
    """The command that scores the model `out_dir` holds and writes its figures to `result_file`."""
    return [sys.executable, "-m", "scheduler.evaluate", str(out_dir), "--result", str(result_file),
            "--data-dir", str(data_dir), "--device", device]


def send_go(evaluation: subprocess.Popen) -> None:
    """Tell a waiting evaluation to score; it may have died already (its output says why)."""
    try:
        evaluation.stdin.write(f"{GO}\n".encode())
        evaluation.stdin.close()
    except BrokenPipeError:
        pass
