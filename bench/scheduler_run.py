"""Run the whole scheduler on this machine's GPUs with a few variants of train.py, and measure it.

    python bench/scheduler_run.py --budget 60 --variant "lr3e-3: LEARNING_RATE=3e-3" --variant "dim640: MODEL_DIM=640 MODEL_HEADS=5"
    python bench/scheduler_run.py --budget 120 --agents 2 --same-on-each-gpu 8 --check-dashboard \
        --variant "nodrop: DROPOUT=0.0" --variant "crash: VOCAB_SIZE=128" --variant "oom: BATCH_SIZE=4096"
    python bench/scheduler_run.py --budget 60 -- --confirmations 1      # arguments after -- go to launch

Submits each variant (round robin from `--agents` scripted agents), and with
`--same-on-each-gpu K` K copies of the baseline that differ only in a comment
(same model, same seed: their spread is the spread across GPUs). Then runs
`python -m scheduler launch --gpus all --exit-when-idle` and prints every
trial's row; per GPU, the share of the launch's wall time spent inside a trial
(start to result) and inside its training or evaluation proper (the harness's
counted training seconds plus the evaluation's seconds); sigma across GPUs
against sigma across seeds (the baseline's control runs); the promotions and
whether train.py changed. `--check-dashboard` asks the dashboard's API for the
nodes and actors while launch runs, without and with Ray's token. `--root`
runs in another folder (a CPU smoke test: `--root R -- --pretend-gpus 2
--device cpu --no-dashboard`). Needs the data prepared. Draw the per-GPU
timeline afterwards with `python -m scheduler report`.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.core import parse_variant  # noqa: E402
from scheduler import results  # noqa: E402
from scheduler.constants import override  # noqa: E402
from scheduler.layout import sha256_bytes  # noqa: E402
from scheduler.report import union_seconds  # noqa: E402

DASHBOARD = "http://127.0.0.1:8265"
TOKEN = Path.home() / ".ray" / "auth_token"
DASHBOARD_WAIT = 120  # seconds to wait for the dashboard to answer after launch starts


def submit(root: Path, path: Path, agent: str, message: str) -> str:
    done = subprocess.run([sys.executable, "-m", "scheduler", "--root", str(root), "submit", str(path),
                           "--agent", agent, "-m", message], check=True, capture_output=True, text=True)
    return done.stdout.strip()


def ask_dashboard(path: str, token: str | None) -> tuple[int, object]:
    """(HTTP status, parsed body or None) of a GET on the dashboard."""
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    try:
        with urllib.request.urlopen(urllib.request.Request(DASHBOARD + path, headers=headers), timeout=10) as answer:
            return answer.status, json.loads(answer.read() or b"null")
    except urllib.error.HTTPError as error:
        return error.code, None


def check_dashboard() -> list[str]:
    """What the dashboard's API says about the nodes and actors, without the token and with it."""
    deadline = time.time() + DASHBOARD_WAIT
    while True:
        try:
            ask_dashboard("/api/version", None)
            break
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            if time.time() > deadline:
                return [f"the dashboard at {DASHBOARD} did not answer within {DASHBOARD_WAIT} s"]
            time.sleep(2)
    token = TOKEN.read_text().strip() if TOKEN.exists() else None
    lines = []
    for path in ("/api/v0/nodes", "/api/v0/actors"):
        without, _ = ask_dashboard(path, None)
        status, body = ask_dashboard(path, token)
        data = (body or {}).get("data", {}).get("result", {}) if isinstance(body, dict) else {}
        count = data.get("total") if isinstance(data, dict) else None
        lines.append(f"GET {path}: {without} without the token, {status} with it ({count} listed)")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--budget", type=float, default=60.0)
    parser.add_argument("--variant", action="append", default=[], help="'name: [fp8|fp16] K=V ...' (repeatable)")
    parser.add_argument("--agents", type=int, default=1, help="scripted agents that take turns submitting")
    parser.add_argument("--same-on-each-gpu", type=int, default=0, metavar="K",
                        help="also submit K copies of the baseline (same seed) for sigma across GPUs")
    parser.add_argument("--check-dashboard", action="store_true", help="query the dashboard's API during the run")
    parser.add_argument("--root", type=Path, default=ROOT, help="folder with train.py (default: this checkout)")
    parser.add_argument("launch_args", nargs="*", help="extra arguments for launch (after --)")
    args = parser.parse_args()

    root = args.root.resolve()
    baseline = (root / "train.py").read_text()
    agents = ["bench"] if args.agents == 1 else [f"bench-{i + 1}" for i in range(args.agents)]
    copies = []
    with tempfile.TemporaryDirectory() as tmp:
        for i, spec in enumerate(args.variant):
            name, constants = parse_variant(spec)
            path = Path(tmp) / f"{name}.py"
            path.write_text(override(baseline, **constants))
            submit(root, path, agents[i % len(agents)], spec)
        for k in range(args.same_on_each_gpu):
            path = Path(tmp) / f"same-{k}.py"
            path.write_text(baseline + f"\n# copy {k} of the baseline: the same model and seed\n")
            copies.append(submit(root, path, agents[k % len(agents)], f"the baseline, copy {k}"))

    started = time.time()
    launch = subprocess.Popen([sys.executable, "-m", "scheduler", "--root", str(root), "launch", "--gpus", "all",
                               "--budget", str(args.budget), "--exit-when-idle", *args.launch_args])
    dashboard = check_dashboard() if args.check_dashboard else []
    code = launch.wait()
    wall = time.time() - started
    if code != 0:
        sys.exit(f"launch exited with {code}")

    frame = results.read_trials(root / "results")
    ran = frame[(frame["status"] != "rejected") & (frame["started_at"].notna())]
    print(f"\nlaunch wall time {wall:.1f} s, budget {args.budget:.0f} s, {len(ran)} trials\n")
    print("| trial | agent | kind | status | val bpc | tokens/s | MFU % | start-up s | training s | eval s | trial s "
          "| trial s − budget | sandbox | GPU |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")
    for _, r in ran.iterrows():
        print(f"| {r.trial_id} | {r.agent} | {r.kind} | {r.status} | {r.val_bpc:.4f} | {r.tokens_per_second:,.0f} "
              f"| {r.mfu_percent} | {r.startup_seconds} | {r.training_seconds} | {r.eval_seconds} | {r.total_seconds} "
              f"| {r.total_seconds - args.budget:.1f} | {r.sandbox} | {r.gpu_id} {r.gpu_name} |"
              if r.status == "ok" else f"| {r.trial_id} | {r.agent} | {r.kind} | {r.status}: {r.reason} |")
    print("\n| GPU | trials | in a trial, % of launch wall | training + evaluation, % of launch wall |")
    print("| --- | --- | --- | --- |")
    for gpu, rows in ran.groupby("gpu_id"):
        busy = union_seconds(rows[["started_at", "finished_at"]])
        work = (rows["training_seconds"].fillna(0) + rows["eval_seconds"].fillna(0)).sum()
        print(f"| {gpu} | {len(rows)} | {100 * busy / wall:.1f} | {100 * work / wall:.1f} |")

    scored = ran[ran["status"] == "ok"]
    same = scored[scored["candidate_id"].isin(copies) & (scored["kind"] == "candidate")]
    controls = scored[scored["kind"] == "control"]
    if copies:
        print(f"\nthe baseline with the same seed on GPUs {sorted(same['gpu_id'])}: val bpc "
              f"{', '.join(f'{v:.4f}' for v in same['val_bpc'])}; sigma across GPUs "
              f"{same['val_bpc'].std():.5f} (n={len(same)}); across seeds (control runs) "
              f"{controls['val_bpc'].std():.5f} (n={len(controls)})")
    promotions = results.read_promotions(root / "results")
    for p in promotions.itertuples():
        print(f"promoted {p.candidate_id} ({p.agent}: {p.description}): {p.old_mean:.4f} -> {p.new_mean:.4f}, "
              f"n={p.n_candidate} vs {p.n_baseline}, sigma {p.sigma:.4f}, threshold {p.threshold:.4f}")
    now = (root / "train.py").read_text()
    print(f"train.py {'replaced: ' + sha256_bytes(now.encode())[:12] if now != baseline else 'unchanged'}; "
          f"{len(promotions)} promotion(s)")
    for line in dashboard:
        print(f"dashboard: {line}")


if __name__ == "__main__":
    main()
