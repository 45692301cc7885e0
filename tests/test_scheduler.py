"""End to end on the CPU: launch with pretend GPUs, intake, trials, Parquet rows, selection, restarts."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from scheduler import results
from scheduler.earlystop import CURVE_WINDOWS

from conftest import make_root, scheduler, trial_processes, variant, wait_for, with_main

BUDGET = 2.0
LAUNCH = ["launch", "--pretend-gpus", "3", "--device", "cpu", "--budget", f"{BUDGET:g}", "--no-dashboard",
          "--startup-allowance", "60", "--min-baseline-runs", "1"]  # more control runs would test nothing here

pytestmark = pytest.mark.slow


def test_launch_runs_every_candidate_once(tmp_path, corpus):
    root = make_root(tmp_path, corpus)
    sources = {
        "a1": [variant(LEARNING_RATE=3e-3), with_main("raise RuntimeError('deliberate crash')")],
        "a2": [variant(MUON_LEARNING_RATE=3e-3),
               with_main("import torch\nraise torch.cuda.OutOfMemoryError('CUDA out of memory. Tried to allocate 2 GiB')"),
               with_main("import torch\nfrom scheduler import harness\nrun = harness.Run()\n"
                         "while True:\n    run.step(torch.tensor(float('nan')), tokens=1)")],
    }
    ids = {}
    for agent, files in sources.items():
        for i, text in enumerate(files):
            path = tmp_path / f"{agent}_{i}.py"
            path.write_text(text)
            done = scheduler(root, "submit", str(path), "--agent", agent, "-m", f"variant {i}")
            assert done.returncode == 0, done.stderr
            ids[done.stdout.strip()] = (agent, i)
    bad = {"syntax.py": "def f(:\n", "nomodel.py": "x = 1\n", "notes.txt": "hello\n", "empty.py": ""}
    for name, text in bad.items():
        (root / "candidates" / name).write_text(text)

    done = scheduler(root, *LAUNCH, "--exit-when-idle", "--promotion", "greedy")
    assert done.returncode == 0, done.stderr[-3000:]

    frame = results.read_trials(root / "results")
    first_runs = frame[frame["kind"] == "candidate"]
    assert len(first_runs) == 9, first_runs[["candidate_id", "status", "reason"]]
    assert first_runs["candidate_id"].is_unique
    by_id = first_runs.set_index("candidate_id")
    statuses = {ids[c]: by_id.loc[c, "status"] for c in ids}
    assert statuses == {("a1", 0): "ok", ("a1", 1): "crash", ("a2", 0): "ok", ("a2", 1): "oom", ("a2", 2): "nan"}
    crash = by_id.loc[[c for c in ids if ids[c] == ("a1", 1)][0]]
    assert "deliberate crash" in crash["reason"] and "RuntimeError" in crash["error_tail"]
    rejected = first_runs[first_runs["status"] == "rejected"]
    reasons = " ".join(rejected["reason"])
    for expected in ("does not parse: line 1", "no module-level build_model", "not a .py file", "empty file"):
        assert expected in reasons

    # At most 3 trials at once, and trials that overlap in time ran on distinct pretend GPUs.
    ran = frame[frame["status"] != "rejected"].reset_index(drop=True)
    assert set(ran["gpu_id"]) <= {"0", "1", "2"}
    events = sorted([(t, +1) for t in ran["started_at"]] + [(t, -1) for t in ran["finished_at"]],
                    key=lambda e: (e[0], e[1]))
    at_once = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
    assert max(at_once) <= 3
    for i, a in ran.iterrows():
        for j, b in ran.iterrows():
            if i < j and a["started_at"] < b["finished_at"] and b["started_at"] < a["finished_at"]:
                assert a["gpu_id"] != b["gpu_id"], (a["trial_id"], b["trial_id"])

    listed = json.loads(scheduler(root, "results", "--json").stdout)
    assert len(listed) == len(frame)
    assert pd.read_parquet(root / "results" / "trials").shape[0] == len(frame)

    # Every trial that trained kept its loss curve
    for curve in frame.loc[frame["status"] == "ok", "curve"]:
        assert len(curve) == CURVE_WINDOWS and any(v is not None for v in curve)

    # A second launch runs nothing again.
    again = scheduler(root, *LAUNCH, "--exit-when-idle", "--promotion", "greedy")
    assert again.returncode == 0, again.stderr[-2000:]
    assert len(results.read_trials(root / "results")) == len(frame)


def test_kill_9_then_relaunch_loses_nothing(tmp_path, corpus, background_launch):
    root = make_root(tmp_path, corpus)
    slow = variant(GRAD_CLIP=0.9)  # tiny model, but a long budget: it is still training when launch is killed
    path = tmp_path / "slow.py"
    path.write_text(slow)
    cid = scheduler(root, "submit", str(path), "--agent", "a1", "-m", "slow").stdout.strip()
    few_reruns = ["--min-baseline-runs", "1", "--confirmations", "1"]  # what is tested here needs no more trials
    launch = background_launch(root, "--pretend-gpus", "1", "--device", "cpu", "--budget", "60", "--no-dashboard",
                               *few_reruns)
    live = root / "results" / "live"
    running = wait_for(lambda: [p.stem for p in live.glob("*.json")], 180, "a trial to start")  # control or candidate
    launch.proc.kill()  # kill -9 of launch alone: its Ray dies with it, the fixture ends what lingers
    launch.proc.wait()

    done = scheduler(root, "launch", "--pretend-gpus", "1", "--device", "cpu", "--budget", "2", "--no-dashboard",
                     "--exit-when-idle", *few_reruns)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results.read_trials(root / "results")
    assert rows["trial_id"].is_unique
    by_trial = rows.set_index("trial_id")
    for trial_id in running:
        assert by_trial.loc[trial_id, "status"] == "interrupted"
        assert by_trial.loc[f"{trial_id}-a2", "status"] == "ok"  # queued again once, and run
    first_runs = rows[(rows["candidate_id"] == cid) & (rows["kind"] == "candidate") & (rows["status"] == "ok")]
    assert len(first_runs) == 1  # run once (confirmation reruns, if it screened well, are rows of kind confirm)
    assert not trial_processes(root, rows["trial_id"]), "a trial process survived"
