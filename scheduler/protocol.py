"""What a trial, the candidate's training process and the evaluation process tell one another.

The training process (scheduler/harness.py), the evaluation (scheduler/evaluate.py)
and the trial that runs both (scheduler/trial.py) agree on these file names,
output tags, exit codes and the evaluation's command line. They live apart from
the harness because the harness imports torch, which launch and Ray's trial
workers never need (2.5 s of imports each).
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

WEIGHTS_FILE = "model.pt"           # saved by the training process, read by the evaluation
STATS_FILE = "train_stats.json"     # the training's statistics; the evaluation adds its score as RESULT_FILE
RESULT_FILE = "result.json"
PROGRESS_TAG = "@@progress "        # training output lines the trial parses (JSON follows the tag)
FAIL_TAG = "EVAL_FAILED: "          # the evaluation's one-line reason for failing
EXIT_NAN = 3                        # the training's exit code for a loss that is not finite
GO = "go"                           # the line a waiting evaluation (evaluate --wait) waits for before it scores


def evaluation_command(candidate: str | Path, out_dir: str | Path, data_dir: str | Path, device: str) -> list[str]:
    """The command that scores `out_dir`'s weights with `candidate`'s build_model() (scheduler/evaluate.py)."""
    return [sys.executable, "-m", "scheduler.evaluate", str(candidate), str(out_dir),
            "--data-dir", str(data_dir), "--device", device]


def send_go(evaluation: subprocess.Popen) -> None:
    """Tell a waiting evaluation to score; it may have died already (its output says why)."""
    try:
        evaluation.stdin.write(f"{GO}\n".encode())
        evaluation.stdin.close()
    except BrokenPipeError:
        pass
