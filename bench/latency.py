"""Scheduling latency on the CPU: file dropped -> trial running, and the gap between trials on one GPU.

    python bench/latency.py [--trials 6]

Starts `launch --pretend-gpus 1 --device cpu --promotion greedy` (no confirmation
reruns to share the GPU with) on a tiny train.py in a temporary folder, waits until the baseline's first run is over, then drops candidates one
at a time into candidates/ while the pretend GPU is free and times how long
until each trial starts (its row's started_at, set when the trial function
begins on the worker). Then it queues several at once and measures the gap
between one trial's end and the next one's start on the same GPU.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler import results  # noqa: E402
from scheduler.constants import override  # noqa: E402

TINY = dict(MODEL_DIM=32, MODEL_DEPTH=1, MODEL_HEADS=2, BATCH_SIZE=4)


def rows(root: Path):
    return results.read_trials(root / "results")


def first_runs(root: Path):
    """Rows of candidates' first runs (not confirmation reruns or control runs of the baseline)."""
    frame = rows(root)
    return frame[frame["kind"] == "candidate"]


def wait_for(predicate, timeout: float = 300.0) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise TimeoutError("the launch did not get there in time")
        time.sleep(0.05)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=6)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="latency-"))
    base = override((ROOT / "train.py").read_text(), **TINY)
    (root / "train.py").write_text(base)
    corpus = root / "corpus.txt"
    corpus.write_text(" ".join(f"word{i % 97} of the text" for i in range(40_000)))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    run = lambda *a: subprocess.run([sys.executable, "-m", "scheduler", "--root", str(root), *a], env=env,  # noqa: E731
                                    check=True, capture_output=True)
    run("prepare", "--from", str(corpus))
    launch = subprocess.Popen([sys.executable, "-m", "scheduler", "--root", str(root), "launch", "--pretend-gpus", "1",
                               "--device", "cpu", "--budget", "1", "--no-dashboard", "--promotion", "greedy"], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: len(rows(root)) >= 1)  # the baseline's control run is done: the GPU is free
        time.sleep(2)
        drop_to_start = []
        for i in range(args.trials):
            n = len(first_runs(root))
            dropped = time.time()
            (root / "candidates" / f"single_{i}.py").write_text(override(base, GRAD_CLIP=1.5 + i / 100))
            wait_for(lambda: len(first_runs(root)) > n)
            row = first_runs(root).sort_values("started_at").iloc[-1]
            drop_to_start.append(row["started_at"].timestamp() - dropped)
            time.sleep(1)
        n = len(rows(root))
        for i in range(args.trials):
            (root / "candidates" / f"burst_{i}.py").write_text(override(base, GRAD_CLIP=2.0 + i / 100))
        wait_for(lambda: len(rows(root)) >= n + args.trials)
        burst = rows(root).iloc[n:].sort_values("started_at")
        gaps = [(b - a).total_seconds() for a, b in zip(burst["finished_at"][:-1], burst["started_at"][1:])]
    finally:
        launch.terminate()
        launch.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)

    print("| figure | median s | max s | bar |")
    print("| --- | --- | --- | --- |")
    print(f"| file dropped -> trial running (GPU free), n={len(drop_to_start)} | {statistics.median(drop_to_start):.2f} "
          f"| {max(drop_to_start):.2f} | <= 3 s |")
    print(f"| gap between trials on one GPU, n={len(gaps)} | {statistics.median(gaps):.2f} | {max(gaps):.2f} | <= 1 s |")


if __name__ == "__main__":
    main()
