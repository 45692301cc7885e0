"""Run the whole scheduler on this machine's GPUs with a few variants of train.py, and measure it.

    python bench/scheduler_run.py --budget 60 --variant "lr3e-3: LEARNING_RATE=3e-3" --variant "dim640: MODEL_DIM=640 MODEL_HEADS=5"
    python bench/scheduler_run.py --budget 60 -- --confirmations 1      # arguments after -- go to launch

Submits each variant (agent "bench"), runs `python -m scheduler launch --gpus all
--exit-when-idle`, then prints every trial's row and, per GPU, the share of the
launch's wall time spent inside a trial (start to result) and inside its
training or evaluation proper (the harness's counted training seconds plus the
evaluation's seconds). Needs the data prepared.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.core import parse_variant  # noqa: E402
from scheduler import results  # noqa: E402
from scheduler.constants import override  # noqa: E402


def union_seconds(intervals: list[tuple[float, float]]) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--variant", action="append", default=[], help="'name: K=V ...' (repeatable)")
    parser.add_argument("launch_args", nargs="*", help="extra arguments for launch (after --)")
    args = parser.parse_args()

    baseline = (ROOT / "train.py").read_text()
    with tempfile.TemporaryDirectory() as tmp:
        for spec in args.variant:
            name, constants, _ = parse_variant(spec)
            path = Path(tmp) / f"{name}.py"
            path.write_text(override(baseline, **constants))
            subprocess.run([sys.executable, "-m", "scheduler", "--root", str(ROOT), "submit", str(path),
                            "--agent", "bench", "-m", spec], check=True)
    started = time.time()
    subprocess.run([sys.executable, "-m", "scheduler", "--root", str(ROOT), "launch", "--gpus", "all",
                    "--budget", str(args.budget), "--exit-when-idle", *args.launch_args], check=True)
    wall = time.time() - started

    frame = results.read_trials(ROOT / "results")
    ran = frame[(frame["status"] != "rejected") & (frame["started_at"].notna())]
    print(f"\nlaunch wall time {wall:.1f} s, budget {args.budget:.0f} s, {len(ran)} trials\n")
    print("| trial | kind | status | val bpc | tokens/s | MFU % | training s | eval s | trial s | GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for _, r in ran.iterrows():
        print(f"| {r.trial_id} | {r.kind} | {r.status} | {r.val_bpc:.4f} | {r.tokens_per_second:,.0f} | {r.mfu_percent} "
              f"| {r.training_seconds} | {r.eval_seconds} | {r.total_seconds} | {r.gpu_id} {r.gpu_name} |")
    print("\n| GPU | in a trial, % of launch wall | training + evaluation, % of launch wall |")
    print("| --- | --- | --- |")
    for gpu, rows in ran.groupby("gpu_id"):
        busy = union_seconds([(a.timestamp(), b.timestamp()) for a, b in zip(rows["started_at"], rows["finished_at"])])
        work = (rows["training_seconds"].fillna(0) + rows["eval_seconds"].fillna(0)).sum()
        print(f"| {gpu} | {100 * busy / wall:.1f} | {100 * work / wall:.1f} |")


if __name__ == "__main__":
    main()
