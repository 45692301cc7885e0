"""Simulate the early-stop rule (scheduler/earlystop.py) on recorded curves: would it stop, when, what would it
save, and would it stop a candidate that ended within the baseline's noise or better (a wrong stop)?

    python bench/early_stop_sim.py results                        # a results folder: rows with their curves
    python bench/early_stop_sim.py --logs runs/ --rows results    # trial logs (results/runs/*/log.txt, *.log),
                                                                  # final scores from rows (or from the logs)
    python bench/early_stop_sim.py --cpu-run /tmp/es-cpu          # record CPU curves first: tiny variants, launch
    python bench/early_stop_sim.py --curve heldout results        # the rule on the held-out loss curves instead

Curves come from result rows (their `curve` column; `heldout_curve` with --curve heldout), or are rebuilt from
the progress lines of trial logs (`@@progress {"training_seconds": ..., "loss": ...}`, or `"heldout"`) with the
trial's own Curve. A log's name is its trial id (the folder of a log.txt, or a *.log file's stem); its final
score is the row's `val_bpc` for that trial id (with a row, none of the log's lines: the training can print
them), else the `val_bpc:` line the evaluation printed into the log (`train_bpc:` likewise). As
in a launch, a candidate's first run is judged against the scored runs of the baseline it ran against (rows:
runs whose source is that baseline's, its control runs and the runs that made it the baseline; logs without
rows: names matching --control, by default `-c<N>` as launch names control runs), at the same budget; each of
those baseline runs is judged against the others, where they are enough for a reference (earlystop.MIN_CURVES),
and any stop of one is a wrong stop.

A stop is right when the candidate ended more than WRONG_STOP_SIGMAS σ worse than the baseline's mean (σ: the
spread of the control runs' scores, at least --sigma); any other stop is a wrong stop. Bar (issue 22): no wrong
stop, and at least 30% of the training time of candidates that ended more than 3σ worse saved.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import statistics
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from scheduler.earlystop import (WRONG_STOP_SIGMAS, Curve, Reference, anchored, at_budget, stop_window,  # noqa: E402
                                 window_end)
from scheduler.protocol import PROGRESS_TAG  # noqa: E402

SAVED_BAR = 0.30       # issue 22: at least this share of those candidates' training time saved ...
WRONG_BAR = 0          # ... and no wrong stop
PRIOR_SIGMA = 0.004    # bpc: the promotion rule's prior (--prior-sigma), the least σ taken with few control runs
CONTROL_ID = r"-c\d+(-a2)?$"  # launch's trial ids of control runs
CURVES = {"loss": "curve", "heldout": "heldout_curve"}  # --curve: the progress lines' field -> the rows' column
# The evaluation's lines in a log without a row (bench/curves); a garbled figure is none (float() would raise)
VAL_LINE = re.compile(r"^val_bpc:\s+([0-9]+\.[0-9]+)(?=\s|$)", re.M)
TRAIN_LINE = re.compile(r"^train_bpc:\s+([0-9]+\.[0-9]+)(?=\s|$)", re.M)
# The CPU curves (--cpu-run): tiny variants of the project's train.py, each one idea, better and worse
TINY = dict(MODEL_DIM=32, MODEL_DEPTH=1, MODEL_HEADS=2, BATCH_SIZE=4)
CPU_VARIANTS = {
    "same as the baseline (a comment changed)": {},
    "learning rates x3": dict(LEARNING_RATE=6e-3, MUON_LEARNING_RATE=6e-3),
    "learning rates /10": dict(LEARNING_RATE=2e-4, MUON_LEARNING_RATE=2e-4),
    "learning rates 1e-6 (hopeless)": dict(LEARNING_RATE=1e-6, MUON_LEARNING_RATE=1e-6),  # 0: the optimizer refuses
    "Muon learning rate /30": dict(MUON_LEARNING_RATE=2e-3 / 30),
    "warmup 30% of the budget (a slow start)": dict(WARMUP_RATIO=0.3),
    "warmdown 90% of the budget": dict(WARMDOWN_RATIO=0.9),
    "no warmdown": dict(WARMDOWN_RATIO=0.0),
    "dropout 0.5": dict(DROPOUT=0.5),
    "dim 64": dict(MODEL_DIM=64),
    "batch 16": dict(BATCH_SIZE=16),
    # added after the catch-up credit (earlystop.CATCH_UP) was set on the runs before: slow starters, its test
    "dim 48": dict(MODEL_DIM=48),
    "depth 2": dict(MODEL_DEPTH=2),
    "learning rates x2": dict(LEARNING_RATE=4e-3, MUON_LEARNING_RATE=4e-3),
    # added for a fourth run, after the third had tested the credit: more ideas that change how a curve starts
    "dim 96": dict(MODEL_DIM=96),
    "heads 4": dict(MODEL_HEADS=4),
    "no weight decay": dict(WEIGHT_DECAY=0.0),
    "learning rates x1.5": dict(LEARNING_RATE=3e-3, MUON_LEARNING_RATE=3e-3),
}


@dataclass
class Run:
    name: str
    curve: list[float | None]
    val_bpc: float
    source: str          # the baseline id of its own source (base-<sha256[:12]>), or the log's name
    judged: str | None   # a candidate's first run: the baseline it ran against; None for other runs
    budget: float
    train_bpc: float | None = None  # the evaluation's score on the train split: a reference's anchor


def curve_from_log(path: Path, budget: float, key: str) -> Curve:
    curve = Curve(budget)
    for line in path.read_text(errors="replace").splitlines():
        if line.startswith(PROGRESS_TAG):
            try:
                fields = json.loads(line[len(PROGRESS_TAG):])
                curve.add(float(fields["training_seconds"]), float(fields[key]))
            except (ValueError, KeyError, TypeError):
                continue
    return curve


def read_rows(results: Path) -> list[dict]:
    from scheduler.results import read_rows as rows_of

    return rows_of(results) if (results / "trials").is_dir() else rows_of(results.parent)


def runs_from_rows(rows: list[dict], budget: float | None, key: str) -> list[Run]:
    from scheduler.layout import baseline_id

    budget, column = budget or launch_budget(rows), CURVES[key]
    return [Run(r["trial_id"], list(r[column]), r["val_bpc"], baseline_id(r["source_sha256"]),
                r["baseline"] if r["kind"] == "candidate" else None, budget, r.get("train_bpc"))
            for r in rows if r.get(column) and r["status"] == "ok" and r.get("val_bpc") is not None
            and at_budget(r["training_seconds"], budget)]


def launch_budget(rows: list[dict]) -> float:
    """The budget the rows' launch ran at: their most common counted seconds, rounded down (the last step
    overshoots the budget a little; a slow step on a loaded CPU, by a second or more)."""
    seconds = [math.floor(r["training_seconds"]) for r in rows if r.get("training_seconds")]
    return float(statistics.mode(seconds)) if seconds else math.nan


def runs_from_logs(folder: Path, rows: list[dict], budget: float | None, control: str, key: str) -> list[Run]:
    from scheduler.layout import baseline_id

    by_id = {r["trial_id"]: r for r in rows}
    runs = []
    for path in sorted([*folder.rglob("log.txt"), *folder.rglob("*.log")]):
        name = path.parent.name if path.name == "log.txt" else path.stem
        row = by_id.get(name, {})
        text = path.read_text(errors="replace")
        # with a row, its figures alone: the log holds the training's own output too, which can print the
        # evaluation's lines (in a run never scored, or whose train sample gave no finite figure, they are its)
        found, trained_found = VAL_LINE.findall(text), TRAIN_LINE.findall(text)
        score = row.get("val_bpc") if row else (float(found[-1]) if found else None)
        trained_on = row.get("train_bpc") if row else (float(trained_found[-1]) if trained_found else None)
        trained = budget or (launch_budget(rows) if rows else None) or _last_seconds(text)
        if score is None or not trained:
            continue
        curve = curve_from_log(path, trained, key).values()
        if not any(v is not None for v in curve):
            continue
        if row:
            source, judged = baseline_id(row["source_sha256"]), row["baseline"] if row["kind"] == "candidate" else None
        else:
            source, judged = ("baseline", None) if re.search(control, name) else (name, "baseline")
        runs.append(Run(name, curve, score, source, judged, trained, trained_on))
    return runs


def _last_seconds(text: str) -> float | None:
    """The budget of a log without a row: its last progress line's counted seconds, rounded."""
    seconds = [float(m) for m in re.findall(r'"training_seconds": ([0-9.]+)', text)]
    return float(round(seconds[-1])) if seconds else None


def simulate(runs: list[Run], min_sigma: float) -> dict:
    """Per baseline: judge its candidates' first runs against its own runs' curves, each of those against the
    others."""
    lines, totals = [], {"curves": 0, "bad": 0, "bad_seconds": 0.0, "saved_seconds": 0.0, "wrong": 0, "stopped": 0}
    for group in sorted({r.judged for r in runs if r.judged}):
        controls = [r for r in runs if r.source == group]
        members = controls + [r for r in runs if r.judged == group and r.source != group]
        if not controls:
            lines.append(f"baseline {group}: none of its runs has a curve, nothing judged ({len(members)} curves)")
            continue
        scores = [r.val_bpc for r in controls]
        mean = statistics.fmean(scores)
        sigma = max(statistics.stdev(scores) if len(scores) > 1 else 0.0, min_sigma)
        lines.append(f"baseline {group}: {mean:.4f} ± {sigma:.4f} bpc ({len(controls)} curves of its runs)")
        # as in a launch, a curve that ends far below its model's score on the train split is no reference;
        # logs from before that score existed cannot be checked
        unchecked = sum(c.train_bpc is None for c in controls)
        usable = [c for c in controls if c.train_bpc is None or anchored(c.curve, c.train_bpc)]
        if unchecked or len(usable) < len(controls):
            lines.append(f"  anchor: {len(controls) - len(usable)} of its curves refused, {unchecked} not checked "
                         f"(no train_bpc)")
        for run in sorted(members, key=lambda r: (r.source != group, r.val_bpc)):
            baseline_run = run.source == group
            reference = Reference.of([c.curve for c in usable if c is not run])
            index = stop_window(run.curve, reference)
            worse = (run.val_bpc - mean) / sigma
            bad = not baseline_run and worse > WRONG_STOP_SIGMAS
            wrong = index is not None and not bad
            totals["curves"] += 1
            totals["bad"] += bad
            totals["bad_seconds"] += run.budget if bad else 0.0
            totals["stopped"] += index is not None
            totals["wrong"] += wrong
            stop = "not stopped" if index is None else f"stopped at {window_end(index, run.budget):.0f} s"
            if index is not None and bad:
                totals["saved_seconds"] += run.budget - window_end(index, run.budget)
            label = "baseline" if baseline_run else "candidate"
            verdict = " WRONG STOP" if wrong else (" (no reference)" if reference is None else "")
            lines.append(f"  {run.name:<40} {label:<9} {run.val_bpc:.4f} ({worse:+.1f} σ) {stop}{verdict}")
    saved = totals["saved_seconds"] / totals["bad_seconds"] if totals["bad_seconds"] else math.nan
    lines.append(f"{totals['curves']} curves judged, {totals['stopped']} stopped; {totals['bad']} candidates ended "
                 f"more than {WRONG_STOP_SIGMAS:.0f} σ worse: "
                 + (f"{100 * saved:.0f}% of their training time saved" if totals["bad_seconds"] else "nothing to save")
                 + f" (bar {100 * SAVED_BAR:.0f}%); {totals['wrong']} wrong stops (bar {WRONG_BAR})")
    return {**totals, "saved_share": saved, "lines": lines}


def cpu_run(folder: Path, budget: float, gpus: int) -> None:
    """Record CPU curves: a project folder with the tiny train.py, three control runs and CPU_VARIANTS, one launch."""
    from scheduler.constants import override

    folder.mkdir(parents=True, exist_ok=True)
    source = override((ROOT / "train.py").read_text(), **TINY)
    (folder / "train.py").write_text(source)
    texts = sorted([*(ROOT / "docs").glob("*.md"), *(ROOT / "scheduler").glob("*.py")])  # about 400 KB of text
    (folder / "corpus.txt").write_bytes(b"".join(path.read_bytes() for path in texts))

    def scheduler(*args: str) -> str:
        return subprocess.run([sys.executable, "-m", "scheduler", "--root", str(folder), *args], check=True,
                              capture_output=True, text=True).stdout

    scheduler("prepare", "--from", str(folder / "corpus.txt"))
    for i, (message, constants) in enumerate(CPU_VARIANTS.items()):
        path = folder / f"variant_{i}.py"
        path.write_text(override(source, **{**TINY, **constants}) + (f"# {message}\n" if not constants else ""))
        scheduler("submit", str(path), "--agent", "cpu-curves", "-m", message)
    subprocess.run([sys.executable, "-m", "scheduler", "--root", str(folder), "launch", "--pretend-gpus", str(gpus),
                    "--device", "cpu", "--budget", f"{budget:g}", "--no-dashboard", "--exit-when-idle",
                    "--min-baseline-runs", "3", "--confirmations", "1", "--early-stop", "shadow"], check=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("results", nargs="*", type=Path, help="results folders whose rows hold curves")
    parser.add_argument("--logs", type=Path, help="a folder of trial logs (log.txt in trial folders, or *.log)")
    parser.add_argument("--rows", type=Path, help="a results folder with the logs' rows (scores, kinds)")
    parser.add_argument("--budget", type=float, help="the budget in seconds (default: the rows' most common "
                                                      "training seconds, or a log's last progress line)")
    parser.add_argument("--control", default=CONTROL_ID, help="regex on a log's name marking a control run "
                                                              "(logs without rows)")
    parser.add_argument("--curve", choices=CURVES, default="loss", help="the curve the rule reads: the training "
                                                                         "loss (as launch) or the held-out loss")
    parser.add_argument("--sigma", type=float, default=PRIOR_SIGMA, help="least σ of the baseline's scores (bpc)")
    parser.add_argument("--cpu-run", type=Path, help="first record CPU curves in this folder (a launch)")
    parser.add_argument("--cpu-budget", type=float, default=20.0, help="seconds of training per CPU trial")
    parser.add_argument("--cpu-gpus", type=int, default=2, help="pretend GPUs of the CPU launch")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.cpu_run:
        cpu_run(args.cpu_run, args.cpu_budget, args.cpu_gpus)
        args.results.append(args.cpu_run / "results")
    runs: list[Run] = []
    if args.logs:
        runs += runs_from_logs(args.logs, read_rows(args.rows) if args.rows else [], args.budget, args.control,
                               args.curve)
    for folder in args.results:
        runs += runs_from_rows(read_rows(folder), args.budget, args.curve)
    if not runs:
        parser.error("no curves with final scores found: give a results folder, or --logs (with --rows)")
    found = simulate(runs, args.sigma)
    print(json.dumps({k: v for k, v in found.items() if k != "lines"}) if args.json else "\n".join(found["lines"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
