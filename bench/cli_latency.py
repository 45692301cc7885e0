"""How long the commands agents call all the time take, against a results folder of N rows.

    python bench/cli_latency.py [--rows 200] [--repeat 7] [--bar 0.5] [--no-index]

Builds a project folder in a temporary directory with no launch running: train.py, N
trial rows (first runs, confirmation reruns, control runs, a few failures), a handful of
promotions, the selection's state for every candidate, two queued entries and one running
with its live progress. Then runs each command in a fresh `python -m scheduler` process
`--repeat` times, as an agent's shell does, and prints the median and the slowest run
against the bar (issue 19: each under 0.5 s on the 2-core machine with 200 rows).

Process start-up and imports are what most of it costs: `python -X importtime -m scheduler
status` shows where an import goes. `--no-index` deletes results/index/ first, as in a results
folder written before the index existed: every row is then read from its Parquet file.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler import queue, results  # noqa: E402
from scheduler.layout import Layout, baseline_id, sha256_bytes  # noqa: E402
from scheduler.promotion import PromotionRule, RuleConfig  # noqa: E402
from scheduler.selection import Candidate, State  # noqa: E402

GPU = "NVIDIA H200"
PROMOTIONS = 4   # lineage rows in the fake folder
AGENTS = 4
FAILED_EVERY = 9  # one trial in this many crashed


def make_root(root: Path, n_rows: int) -> str:
    """A project folder with `n_rows` rows and the selection's state; returns a finished candidate's id."""
    layout = Layout.at(root)
    layout.make()
    source = (ROOT / "train.py").read_bytes()
    layout.baseline.write_bytes(source)
    base = baseline_id(sha256_bytes(source))
    start = datetime(2026, 1, 1, tzinfo=timezone.utc)
    rule = PromotionRule(RuleConfig())
    candidates: dict[str, Candidate] = {}
    for i in range(n_rows):
        at = start + timedelta(minutes=6 * i)
        kind = "control" if i % 10 == 0 else ("confirm" if i % 10 in (4, 5) else "candidate")
        cid = base if kind == "control" else f"20260101-{i:06d}-cand{i % 7}"
        status = "crash" if i % FAILED_EVERY == 3 else "ok"
        bpc = 0.76 + (i % 13) / 1000 if status == "ok" else None
        row = {"trial_id": f"{cid}-r{i}", "candidate_id": cid, "kind": kind, "agent": f"agent-{i % AGENTS}",
               "parent": base, "baseline": base, "stale": False, "description": f"idea number {i}: a change",
               "source_sha256": f"{i:064x}", "status": status, "val_bpc": bpc,
               "reason": "crashed: see its log" if status != "ok" else None,
               "training_seconds": 300.0, "total_seconds": 372.0, "eval_seconds": 20.0, "tokens": 330_000_000,
               "steps": 5000, "parameters": 40_000_000, "peak_memory_mb": 30_000.0, "mfu_percent": 36.0,
               "tokens_per_second": 1.1e6, "precision": "bf16", "gpu_name": GPU, "gpu_id": str(i % 8),
               "node": "bench", "seed": 0, "sandbox": "bwrap", "startup_seconds": 40.0,
               "submitted_at": at, "started_at": at, "finished_at": at + timedelta(seconds=372)}
        results.write_row(layout.results, row)
        if kind == "control" and bpc is not None:
            rule.add_baseline_score(GPU, bpc)
        elif kind != "control":
            c = candidates.setdefault(cid, Candidate(agent=row["agent"], description=row["description"],
                                                     source_sha256=row["source_sha256"], parent=base))
            c.runs += 1
            if bpc is not None:
                c.scores.setdefault(GPU, []).append(bpc)
            c.done, c.verdict = True, "rejected"
            c.judged = {"gpu": GPU, "reason": "does not screen", "candidate_mean": bpc, "baseline_mean": 0.76,
                        "n_candidate": 1, "n_baseline": 5, "sigma": 0.004, "threshold": 0.0036}
    for i in range(PROMOTIONS):
        results.write_promotion(layout.results, {
            "promoted_at": start + timedelta(hours=3 * i + 1), "candidate_id": f"promoted-{i}", "agent": "agent-0",
            "description": f"promotion {i}", "old_baseline": f"base-old{i}", "new_baseline": f"base-new{i}",
            "gpu_name": GPU, "old_mean": 0.77, "new_mean": 0.765, "gain": 0.005, "n_candidate": 3, "n_baseline": 5,
            "sigma": 0.001, "threshold": 0.002, "reason": "reliably better", "diff": "--- a\n+++ b\n-x\n+y\n"})
    State(rule=rule.to_dict(), rule_config=vars(RuleConfig()), baseline_sha=sha256_bytes(source),
          candidates=candidates).save(layout.selection_state)
    for i in range(3):
        queue.push(layout, queue.Entry(trial_id=f"queued{i}-r1", candidate_id=f"queued{i}", kind="candidate",
                                       source_sha256="0" * 64, agent="agent-1", description=f"queued idea {i}"))
    running = queue.take(layout)
    (layout.live / f"{running.trial_id}.json").write_text(json.dumps(
        {"started": time.time() - 60, "phase": "train", "step": 900, "loss": 1.1, "progress": 0.2, "tok_s": 1_100_000,
         "gpu": "0"}))
    return "20260101-000001-cand1"


def timed(argv: list[str], env: dict, cwd: Path) -> float:
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "scheduler", *argv], cwd=cwd, env=env, capture_output=True)
    took = time.perf_counter() - started
    if done.returncode not in (0, 1):  # wait exits 1 for a rejected candidate: a result all the same
        raise SystemExit(f"`python -m scheduler {' '.join(argv)}` exited {done.returncode}:\n"
                         f"{done.stderr.decode(errors='replace')[-2000:]}")
    return took


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument("--bar", type=float, default=0.5, help="seconds each command should stay under")
    parser.add_argument("--no-index", action="store_true", help="read every row from its Parquet file")
    args = parser.parse_args()
    folder = Path(tempfile.mkdtemp(prefix="cli-latency-"))
    try:
        root = folder / "root"
        finished = make_root(root, args.rows)
        if args.no_index:
            shutil.rmtree(root / "results" / "index", ignore_errors=True)
        variant = folder / "variant.py"
        variant.write_text((ROOT / "train.py").read_text() + "\n# a variant\n")
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        commands = {
            "--help": ["--help"],
            "submit": ["submit", str(variant), "--agent", "bench", "-m", "a variant"],
            "status": ["status"],
            "status --json": ["status", "--json"],
            "results": ["results"],
            "results --json": ["results", "--json"],
            "baseline": ["baseline"],
            "baseline --json": ["baseline", "--json"],
            "wait (finished)": ["wait", finished],
            "wait --json (finished)": ["wait", finished, "--json"],
            "show --json": ["show", finished, "--json"],
        }
        timed(["status"], env, root)  # the first run fills the disk cache for every later one
        print(f"{args.rows} rows{' (no index)' if args.no_index else ''}, {args.repeat} runs each, "
              f"{os.cpu_count()} cores, load "
              f"{os.getloadavg()[0]:.1f}, python {sys.version.split()[0]}")
        print("| command | median s | max s | under the bar |")
        print("| --- | --- | --- | --- |")
        for name, argv in commands.items():
            took = [timed(argv, env, root) for _ in range(args.repeat)]
            median = statistics.median(took)
            print(f"| {name} | {median:.3f} | {max(took):.3f} | {'yes' if median < args.bar else 'NO'} "
                  f"(< {args.bar} s) |", flush=True)
    finally:
        shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
