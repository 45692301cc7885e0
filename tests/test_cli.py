"""What the commands tell an agent (issue 19): they refuse a folder that is not a project, one launch holds a
root, `status` says whether a launch is alive and shows nothing as running that is not, `wait`, `show` and
`results` give the selection's verdict with its figures, the baseline has one score everywhere, and Ray
failing to start is one message, not a traceback.

None of these tests starts Ray or trains: the selection runs in this process (no actor), rows are written
the way the launch writes them, and a launch's hold on its root is taken by this process or by a small
subprocess (what `launch` takes before it starts Ray).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from scheduler import cli, intake, presence, queue, results, status
from scheduler.launch import LaunchError, start_ray
from scheduler.layout import Layout, sha256_bytes
from scheduler.report import write_report
from scheduler.selection import Selection

ROOT = Path(__file__).resolve().parents[1]
SOURCE = "LEARNING_RATE = 1e-3\n\n\ndef build_model():\n    return None\n"
GPU = "gpu-a"
BASELINE_SCORES = (2.00, 2.01, 1.99, 2.00, 2.00)  # five control runs: the default min_baseline_runs
# every command but prepare, with the arguments it needs
COMMANDS = {"launch": ["--pretend-gpus", "1", "--device", "cpu"], "submit": ["FILE", "--agent", "a", "-m", "x"],
            "wait": ["some-id", "--timeout", "1"], "results": [], "status": [], "show": ["some-id"], "stop": [],
            "baseline": [], "report": []}


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


# ---------------------------------------------------------------------------
# 1. outside a project folder
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("command", sorted(COMMANDS))
def test_every_command_but_prepare_refuses_a_folder_without_train_py(tmp_path, capsys, command):
    empty, elsewhere = tmp_path / "empty", tmp_path / "elsewhere"
    empty.mkdir()
    elsewhere.mkdir()
    (elsewhere / "variant.py").write_text(SOURCE)
    args = [str(elsewhere / "variant.py") if a == "FILE" else a for a in COMMANDS[command]]
    code, out, err = run_cli(capsys, "--root", str(empty), command, *args)
    assert code == 2 and out == ""
    assert f"no train.py in {empty}" in err and "cd into the folder" in err and "--root" in err
    assert list(empty.iterdir()) == []  # no stray candidates/ or results/


def test_a_command_run_in_the_wrong_folder_says_so_without_a_traceback(tmp_path):
    done = subprocess.run([sys.executable, "-m", "scheduler", "status"], cwd=tmp_path, capture_output=True, text=True,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"no train.py in {tmp_path}" in done.stderr and list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------------------
# 2. one launch per root, 3. status tells the truth
# ---------------------------------------------------------------------------


def project(tmp_path: Path) -> Layout:
    layout = Layout.at(tmp_path)
    layout.baseline.write_text(SOURCE)
    return layout


HOLDER = ("import sys, time\nfrom scheduler.layout import Layout\nfrom scheduler.presence import Presence\n"
          "held = Presence.claim(Layout.at(sys.argv[1]))\nheld.announce()\n"
          "print('held', flush=True)\ntime.sleep(600)\n")


@pytest.fixture
def holder():
    """start(root) -> a process that holds the root as a launch does (lock and heartbeat), without Ray."""
    started: list[subprocess.Popen] = []

    def start(root: Path) -> subprocess.Popen:
        proc = subprocess.Popen([sys.executable, "-c", HOLDER, str(root)], stdout=subprocess.PIPE, text=True,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        started.append(proc)
        assert proc.stdout.readline().strip() == "held"
        return proc

    yield start
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_a_second_launch_exits_2_naming_the_first(tmp_path, capsys, holder):
    layout = project(tmp_path)
    first = holder(tmp_path)
    beat = presence.read(layout)
    assert beat["state"] == presence.RUNNING and beat["pid"] == first.pid
    code, _, err = run_cli(capsys, "--root", str(tmp_path), "launch", "--pretend-gpus", "1", "--device", "cpu",
                           "--sandbox", "none")
    assert code == 2
    assert f"another launch is running in {tmp_path}" in err and f"pid {first.pid}" in err
    assert presence.when(beat["started"]) in err and "python -m scheduler stop" in err


def test_the_lock_of_a_killed_launch_is_taken_over(tmp_path, holder):
    layout = project(tmp_path)
    first = holder(tmp_path)
    first.send_signal(signal.SIGKILL)
    first.wait()
    assert presence.read(layout)["state"] == presence.GONE
    held = presence.Presence.claim(layout)  # the kernel freed the dead launch's lock
    held.announce()
    try:
        assert held.took_over["pid"] == first.pid and held.took_over["state"] == presence.GONE
        assert presence.read(layout)["state"] == presence.RUNNING and presence.read(layout)["pid"] == os.getpid()
    finally:
        held.release()
    assert presence.read(layout)["state"] == presence.STOPPED


def test_status_after_a_launch_was_killed_shows_nothing_running(tmp_path, capsys, holder):
    """The dead launch's trial stays in queue/running/ (the next launch recovers it), its live file and a drain
    request stay too: status says no launch runs, shows the trial as interrupted, and no draining."""
    layout = project(tmp_path)
    layout.make()
    queue.push(layout, queue.Entry(trial_id="c1-r1", candidate_id="c1", kind="candidate", source_sha256="0" * 64,
                                   agent="a", description="an idea"))
    entry = queue.take(layout)
    (layout.live / f"{entry.trial_id}.json").write_text(json.dumps({"started": time.time() - 30, "phase": "train",
                                                                    "step": 5, "progress": 0.1, "gpu": "0"}))
    (layout.control / "drain").touch()
    first = holder(tmp_path)
    assert [r["trial_id"] for r in status.snapshot(layout)["running"]] == ["c1-r1"]
    assert status.snapshot(layout)["draining"]
    first.kill()
    first.wait()
    state = status.snapshot(layout)
    assert state["launch"]["state"] == presence.GONE and not state["draining"]
    assert state["running"] == [] and [t["trial_id"] for t in state["interrupted"]] == ["c1-r1"]
    code, out, _ = run_cli(capsys, "--root", str(tmp_path), "status")
    assert code == 0 and "died without stopping" in out and f"pid {first.pid}" in out
    assert "0 running" in out and "draining" not in out and "interrupted c1-r1" in out


def test_status_counts_submitted_files_and_says_whether_a_launch_runs(tmp_path, capsys):
    layout = project(tmp_path)
    variant = tmp_path / "variant.py"
    variant.write_text(SOURCE + "# a variant\n")
    candidate = intake.submit(layout, variant, "agent-1", "a variant", "base-x")
    code, out, _ = run_cli(capsys, "--root", str(tmp_path), "status")
    assert code == 0 and "no launch has run here yet" in out
    assert "1 queued (1 submitted, not yet taken in), 0 running" in out and f"submitted {candidate}" in out
    held = presence.Presence.claim(layout)
    held.announce()
    try:
        state = json.loads(run_cli(capsys, "--root", str(tmp_path), "status", "--json")[1])
        assert state["launch"]["state"] == "running" and state["launch"]["pid"] == os.getpid()
        assert len(state["queued"]) == 1 and state["submitted"] == 1 and state["queued"][0]["candidate_id"] == candidate
        assert "launch running (pid" in run_cli(capsys, "--root", str(tmp_path), "status")[1]
    finally:
        held.release()
    assert "the last one stopped at" in run_cli(capsys, "--root", str(tmp_path), "status")[1]


def test_stop_without_a_launch_exits_2_and_creates_nothing(tmp_path, capsys):
    project(tmp_path)
    code, _, err = run_cli(capsys, "--root", str(tmp_path), "stop")
    assert code == 2 and "no launch is running" in err and not (tmp_path / "results" / "control").exists()


# ---------------------------------------------------------------------------
# 4. the verdict, with its figures, in wait, show and results; one baseline score everywhere
# ---------------------------------------------------------------------------


def record(selection: Selection, layout: Layout, trial_id: str, candidate_id: str, kind: str, bpc: float | None,
           sha: str = "", test_bpc: float | None = None) -> dict:
    """What the launch does with a finished trial: the selection judges it, then its row is written."""
    row = {"trial_id": trial_id, "candidate_id": candidate_id, "kind": kind, "status": "ok" if bpc else "crash",
           "val_bpc": bpc, "test_bpc": test_bpc, "gpu_name": GPU, "baseline": selection.baseline(), "agent": "a1",
           "description": f"{candidate_id} run", "source_sha256": sha, "parent": selection.baseline(),
           "reason": None if bpc else "exit 1: see its log", "finished_at": results.now(),
           "started_at": results.now()}
    decision = selection.record(dict(row))
    results.write_row(layout.results, row)
    queue.finish(layout, trial_id)
    return decision


def scored_root(tmp_path: Path) -> tuple[Layout, Selection, str]:
    """A project whose baseline has its five control runs (the first also scored on test)."""
    layout = project(tmp_path)
    layout.make()
    selection = Selection(str(tmp_path))
    base = selection.sync_baseline()["baseline"]
    queue.drop(layout, base)
    for i, bpc in enumerate(BASELINE_SCORES):
        record(selection, layout, f"{base}-c{i}", base, "control", bpc, test_bpc=2.1 if i == 0 else None)
    return layout, selection, base


def candidate(layout: Layout, n: int) -> str:
    source = f"{SOURCE}# variant {n}\n".encode()
    sha = sha256_bytes(source)
    (layout.sources / f"{sha}.py").write_bytes(source)
    return sha


def test_wait_show_and_results_give_a_rejection_with_its_figures(tmp_path, capsys):
    layout, selection, _ = scored_root(tmp_path)
    record(selection, layout, "worse-r1", "worse", "candidate", 2.05, candidate(layout, 1))
    root = ["--root", str(tmp_path)]

    code, out, _ = run_cli(capsys, *root, "wait", "worse")
    assert code == 1  # scored fine, but rejected: not `ok` as before
    assert out.startswith("worse: ok, val_bpc 2.0500; rejected by the selection: mean 2.0500 vs baseline 2.0000")
    assert "does not screen" in out

    code, out, _ = run_cli(capsys, *root, "wait", "worse", "--json")
    waited = json.loads(out)
    assert code == 1 and waited["status"] == "ok" and waited["val_bpc"] == 2.05
    verdict = waited["verdict"]
    assert (verdict["verdict"], verdict["by"], verdict["gpu"]) == ("rejected", "selection", GPU)
    assert verdict["candidate_mean"] == 2.05 and verdict["baseline_mean"] == pytest.approx(2.0)
    assert verdict["gain"] == pytest.approx(-0.05) and verdict["n_candidate"] == 1 and verdict["n_baseline"] == 5
    assert verdict["sigma"] > 0 and verdict["threshold"] > 0

    shown = json.loads(run_cli(capsys, *root, "show", "worse", "--json")[1])
    assert shown["verdict"] == verdict
    assert run_cli(capsys, *root, "show", "worse")[1].startswith("worse: rejected by the selection: mean 2.0500")
    rows = json.loads(run_cli(capsys, *root, "results", "--json")[1])
    assert [r["verdict"] for r in rows if r["candidate_id"] == "worse"] == [verdict]
    assert all(r["verdict"] is None for r in rows if r["kind"] == "control")  # the baseline is not judged
    table = run_cli(capsys, *root, "results", "--verdict", "rejected")[1].splitlines()
    assert "verdict" in table[0].split() and len(table) == 2 and " rejected " in table[1]


def test_a_run_stopped_early_is_failed_rejected_and_named_by_wait_show_and_results(tmp_path, capsys):
    layout, selection, _ = scored_root(tmp_path)
    reason = "stopped early at 105 s of 300 s: training loss 2.1000 against the baseline's 1.5000 (...)"
    row = {"trial_id": "hopeless-r1", "candidate_id": "hopeless", "kind": "candidate", "status": "stopped_early",
           "reason": reason, "gpu_name": GPU, "baseline": selection.baseline(), "agent": "a1", "description": "x",
           "source_sha256": candidate(layout, 3), "curve": [3.0, None] + [2.1] * 18,
           "heldout_curve": [3.1] + [None] * 19, "early_stop_at": 105.0,
           "finished_at": results.now(), "started_at": results.now()}
    decision = selection.record(dict(row))
    results.write_row(layout.results, row)
    assert decision["verdict"] == "rejected"  # never a promotion candidate
    root = ["--root", str(tmp_path)]
    code, out, _ = run_cli(capsys, *root, "wait", "hopeless")
    assert code == 1 and out.startswith(f"hopeless: stopped_early ({reason}); rejected by the selection")
    shown = run_cli(capsys, *root, "show", "hopeless")[1]
    assert '"curve": "3.0000 - 2.1000 2.1000' in shown and '"early_stop_at": 105.0' in shown
    assert '"heldout_curve": "3.1000 - -' in shown
    assert json.loads(run_cli(capsys, *root, "show", "hopeless", "--json")[1])["rows"][0]["curve"][:2] == [3.0, None]
    listed = run_cli(capsys, *root, "results", "--status", "stopped_early")[1].splitlines()
    assert len(listed) == 2 and "hopeless-r1" in listed[1]


def test_a_candidate_that_screens_well_is_confirming_then_promoted(tmp_path, capsys):
    layout, selection, base = scored_root(tmp_path)
    sha = candidate(layout, 2)
    record(selection, layout, "good-r1", "good", "candidate", 1.90, sha)
    code, out, _ = run_cli(capsys, "--root", str(tmp_path), "wait", "good")
    assert code == 0 and "good: ok, val_bpc 1.9000; confirming by the selection: mean 1.9000 vs baseline 2.0000" in out
    for i, bpc in enumerate((1.91, 1.90, 1.91)):
        record(selection, layout, f"good-r{i + 2}", "good", "confirm", bpc, sha)
    verdict = json.loads(run_cli(capsys, "--root", str(tmp_path), "wait", "good", "--json")[1])["verdict"]
    assert verdict["verdict"] == "promoted" and verdict["n_candidate"] == 3
    assert verdict["candidate_mean"] == pytest.approx(1.9066, abs=1e-4)
    assert json.loads(run_cli(capsys, "--root", str(tmp_path), "baseline", "--json")[1])["lineage"][0][
        "candidate_id"] == "good"


def test_a_failed_run_and_a_file_refused_at_intake_are_rejected_and_say_by_whom(tmp_path, capsys):
    layout, selection, _ = scored_root(tmp_path)
    record(selection, layout, "broken-r1", "broken", "candidate", None, candidate(layout, 3))
    code, out, _ = run_cli(capsys, "--root", str(tmp_path), "wait", "broken")
    assert code == 1 and out.startswith("broken: crash (exit 1: see its log); rejected by the selection: no successful")
    variant = tmp_path / "not_python.py"
    variant.write_text("def build_model(:\n")
    refused = intake.submit(layout, variant, "a1", "typo", selection.baseline())
    intake.scan(layout, selection.baseline())
    code, out, _ = run_cli(capsys, "--root", str(tmp_path), "wait", refused)
    assert code == 1 and out.startswith(f"{refused}: rejected at intake: '{refused}.py' does not parse")


def test_wait_keeps_waiting_for_the_baselines_control_run(tmp_path, capsys):
    """Scored before the baseline had a score: the verdict comes with the control run queued first, so wait
    waits for it (and says so) instead of printing `pending`."""
    layout = project(tmp_path)
    layout.make()
    selection = Selection(str(tmp_path))
    selection.sync_baseline()  # queues the unscored baseline's control run
    record(selection, layout, "early-r1", "early", "candidate", 1.9, candidate(layout, 4))
    code, _, err = run_cli(capsys, "--root", str(tmp_path), "wait", "early", "--timeout", "0.1")
    assert code == 3 and "judged once the baseline's control run has scored it" in err
    assert "no launch is running" in err  # and says that nothing will run until one starts
    queue.drop(layout, selection.baseline())  # no control run to come: wait gives the pending verdict at once
    code, out, _ = run_cli(capsys, "--root", str(tmp_path), "wait", "early")
    assert code == 0 and out.startswith("early: ok, val_bpc 1.9000; pending: no baseline score on gpu-a yet")


def test_baseline_status_and_report_give_the_same_baseline_score(tmp_path, capsys):
    layout, selection, base = scored_root(tmp_path)
    sha = candidate(layout, 5)
    for i, bpc in enumerate((1.90, 1.91, 1.90, 1.91)):  # promoted after its three reruns
        record(selection, layout, f"win-r{i + 1}", "win", "candidate" if i == 0 else "confirm", bpc, sha)
    new_base = selection.baseline()
    record(selection, layout, f"{new_base}-c9", new_base, "control", 1.93, test_bpc=2.05)
    expected = (1.90 + 1.91 + 1.90 + 1.91 + 1.93) / 5  # the promoted runs, the first included, and its control run

    info = json.loads(run_cli(capsys, "--root", str(tmp_path), "baseline", "--json")[1])
    assert info["baseline"] == new_base and info["scores"][GPU]["mean"] == pytest.approx(expected)
    snapshot = json.loads(run_cli(capsys, "--root", str(tmp_path), "status", "--json")[1])
    assert snapshot["baseline_scores"] == info["scores"]
    assert f"val bpc {expected:.4f}" in run_cli(capsys, "--root", str(tmp_path), "status")[1]
    made = write_report(layout.results)
    assert f"baseline now {expected:.4f}" in made["summary"].read_text()

    text = run_cli(capsys, "--root", str(tmp_path), "baseline")[1]
    assert "test split: 2.0500 bpc" in text and f"{0.05:.4f} on test" in text  # 2.10 -> 2.05
    assert "not scored on test" not in text


def test_the_lineage_never_says_not_scored_under_a_test_score(tmp_path, capsys):
    """The new baseline was scored on test, the old one was not: the gain on test is unknown, the score is not."""
    layout, selection, base = scored_root(tmp_path)
    (layout.results / "trials" / f"{base}-c0.parquet").unlink()  # the old baseline's test score is gone
    (layout.results / "index" / "trials" / f"{base}-c0.json").unlink()
    sha = candidate(layout, 6)
    for i, bpc in enumerate((1.90, 1.91, 1.90, 1.91)):
        record(selection, layout, f"win-r{i + 1}", "win", "candidate" if i == 0 else "confirm", bpc, sha)
    record(selection, layout, f"{selection.baseline()}-c9", selection.baseline(), "control", 1.93, test_bpc=2.05)
    text = run_cli(capsys, "--root", str(tmp_path), "baseline")[1]
    assert "test split: 2.0500 bpc" in text and "not scored on test" not in text
    assert f"test 2.0500 (no gain on test: {base} has no test score)" in text


# ---------------------------------------------------------------------------
# 5. Ray failing to start
# ---------------------------------------------------------------------------


def test_ray_is_started_again_once(capsys):
    calls = []

    def flaky():
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("The current node timed out during startup.")
        return "context"

    assert start_ray(flaky) == "context" and len(calls) == 2
    assert "Ray did not start (RuntimeError: The current node timed out during startup.); trying once more" in (
        capsys.readouterr().err)


def test_launch_exits_2_when_ray_does_not_start(tmp_path, capsys, monkeypatch, data_dir):
    import ray

    for name in ("TUNE_DISABLE_SIGINT_HANDLER", "RAY_AIR_NEW_OUTPUT"):  # launch sets them; put them back afterwards
        monkeypatch.setenv(name, os.environ.get(name, ""))
    tries = []

    def timed_out(**kwargs):
        tries.append(kwargs)
        raise RuntimeError("The current node timed out during startup.\nmore lines of Ray's own")

    monkeypatch.setattr(ray, "init", timed_out)
    project(tmp_path)
    code, _, err = run_cli(capsys, "--root", str(tmp_path), "--data", str(data_dir), "launch", "--pretend-gpus", "1",
                           "--device", "cpu", "--sandbox", "none", "--no-dashboard")
    assert code == 2 and len(tries) == 2
    assert "Ray did not start, 2 times (RuntimeError: The current node timed out during startup.)" in err
    assert "wait for the load to drop and launch again" in err and "Traceback" not in err
    assert presence.read(Layout.at(tmp_path))["state"] == presence.STOPPED  # the root is free again
    with pytest.raises(LaunchError):
        start_ray(lambda: (_ for _ in ()).throw(OSError("no")), attempts=1)


# ---------------------------------------------------------------------------
# 6. the commands read the JSON index, not Parquet through pandas
# ---------------------------------------------------------------------------


def test_the_index_gives_what_the_parquet_files_hold(tmp_path):
    """read_rows (the index, or the Parquet file where a row has no JSON) and read_trials (pandas) agree on every
    value and the order; build_index writes the JSON a row lacks."""
    layout, selection, _ = scored_root(tmp_path)
    record(selection, layout, "worse-r1", "worse", "candidate", 2.05, candidate(layout, 7))
    record(selection, layout, "broken-r1", "broken", "candidate", None, candidate(layout, 8))
    frame = results.read_trials(layout.results)
    expected = json.loads(frame.to_json(orient="records", date_format="iso", date_unit="us"))
    indexed = results.read_rows(layout.results)

    def same(rows: list[dict]) -> None:
        assert [r["trial_id"] for r in rows] == [r["trial_id"] for r in expected]
        for got, want in zip(rows, expected):
            for column, value in want.items():
                if column.endswith("_at") and value is not None:  # pandas writes Z for UTC, the index +00:00
                    assert got[column] == value.replace("Z", "+00:00"), column
                else:
                    assert got[column] == value, column

    same(indexed)
    index = layout.results / results.INDEX / "trials"
    for path in list(index.glob("*.json"))[:3]:
        path.unlink()
    same(results.read_rows(layout.results))  # those three from their Parquet files
    assert results.build_index(layout.results) == 3 and len(list(index.glob("*.json"))) == len(expected)
    same(results.read_rows(layout.results))
