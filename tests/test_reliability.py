"""Faults while launch runs (a killed trial worker, a killed selection actor, a stalled candidate): every case gets
its row with a clear reason, nothing escapes, launch keeps running. Broken and untidy candidates are in
tests/test_attacks.py, in the attacks' launch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from scheduler import results
from scheduler.cli import build_parser
from scheduler.earlystop import Curve
from scheduler.launch import LOCAL_HOST, dashboard_lines
from scheduler.selection import ACTOR_NAME
from scheduler.protocol import PROGRESS_TAG
from scheduler.trial import HANDOVER_MARGIN, MARK, PASSED_ENV, OutputLog, TrialClock, candidate_env

from conftest import make_root, scheduler, trial_processes, wait_for

ESCAPED = "98764"  # the child that the candidate of the fault test starts outside its process group
# A driver attached to a launch's Ray (argv[1]: its GCS address) prints the selection actor's summary and pid.
# Ray reads RAY_AUTH_MODE when it is imported, so this runs in a process of its own, as a user would run it.
ATTACH = f"""
import json, os, sys
import ray
ray.init(address=sys.argv[1], log_to_driver=False, configure_logging=False)
namespace = next(a["namespace"] for a in ray.util.list_named_actors(all_namespaces=True) if a["name"] == "{ACTOR_NAME}")
actor = ray.get_actor("{ACTOR_NAME}", namespace=namespace)
print(json.dumps({{"summary": ray.get(actor.summary.remote()),
                  "pid": ray.get(actor.__ray_call__.remote(lambda self: os.getpid()))}}))
"""
# What the trial adds to the allowlisted part of the environment (scheduler/trial.py: candidate_env)
TRIAL_ENV = {"PYTHONPATH", "PYTHONUNBUFFERED", "CUDA_DEVICE_ORDER", "OMP_NUM_THREADS", "SCHEDULER_TRAIN_DATA", "SCHEDULER_BUDGET",
             "SCHEDULER_SEED", "SCHEDULER_DEVICE", "SCHEDULER_OUT", "SCHEDULER_TRIAL", "SCHEDULER_EXPORTED", MARK}


def parent_of(pid: int) -> int:
    """From /proc/PID/stat: the field after the state, which follows the parenthesised command name."""
    return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])


def stalling_candidate() -> str:
    """A candidate that needs no torch. Its first attempt starts a child outside its process group, then
    hangs without output (so no broken pipe ends it when its worker dies); its retry, which it knows by its
    working folder (the trial id ends in -a2; it can write nothing that outlives its sandbox), fails at once."""
    return f"""import os, subprocess, sys, time


def build_model():
    return None


if __name__ == "__main__":
    subprocess.Popen(["sleep", "{ESCAPED}"], start_new_session=True)
    if os.path.basename(os.path.dirname(os.getcwd())).endswith("-a2"):
        sys.exit("second attempt: fails at once")
    time.sleep(600)
"""


@pytest.mark.slow
def test_killed_selection_actor_and_trial_worker(tmp_path, corpus, background_launch):
    """While launch runs: SIGKILL of the selection actor's process (with train.py broken by hand meanwhile),
    then SIGKILL of the Ray worker running a trial. Launch goes on to the end, and nothing is lost."""
    root = make_root(tmp_path, corpus)
    baseline = (root / "train.py").read_bytes()
    path = tmp_path / "stalls.py"
    path.write_text(stalling_candidate())
    cid = scheduler(root, "submit", str(path), "--agent", "a1", "-m", "stalls").stdout.strip()
    first = f"{cid}-r1"
    launch = background_launch(root, "--pretend-gpus", "1", "--device", "cpu", "--budget", "3", "--no-dashboard",
                               "--exit-when-idle")

    def candidate_and_child() -> list[int]:
        """The trial's processes once its escaped child and its evaluation (started beside it, waiting) are up;
        with them the sandbox's own bwrap processes."""
        pids = trial_processes(root, [first])
        commands = []
        for pid in pids:
            try:
                commands.append(Path(f"/proc/{pid}/cmdline").read_bytes())
            except OSError:
                continue
        ready = any(c == f"sleep\0{ESCAPED}\0".encode() for c in commands) and any(
            b"scheduler.evaluate" in c for c in commands)
        return pids if ready else []

    # The baseline's control run comes first; then the candidate stalls, with its escaped child.
    stalled = wait_for(candidate_and_child, 240, "the candidate and its child")

    def selection() -> dict:
        attached = subprocess.run([sys.executable, "-c", ATTACH, launch.gcs_address()], capture_output=True,
                                  text=True, timeout=120, env={**os.environ, "RAY_AUTH_MODE": "token"})
        assert attached.returncode == 0, attached.stderr[-2000:]
        return json.loads(attached.stdout.splitlines()[-1])

    before = selection()
    os.kill(before["pid"], signal.SIGKILL)
    (root / "train.py").write_text("def broken(:\n")  # by hand, while the actor is down
    (root / "candidates" / "notes.txt").write_text("a file for intake: the searcher asks the actor at once\n")
    after = selection()  # Ray restarted the actor; the call waits for it
    assert after["pid"] != before["pid"]
    assert before["summary"]["scores"] and after["summary"] == before["summary"]  # baseline runs, undecided, ...

    worker = next(parent for parent in map(parent_of, stalled) if parent not in stalled)  # the candidate's parent
    os.kill(worker, signal.SIGKILL)
    wait_for(lambda: results.has_row(root / "results", first), 60, "the interrupted row")
    wait_for(lambda: not trial_processes(root, [first]), 5, "the candidate, its escaped child and the evaluation to be killed")

    assert launch.wait(120) == 0, launch.stderr()[-3000:]
    log = launch.stderr()
    rows = results.read_trials(root / "results").set_index("trial_id")
    assert rows.loc[first, "status"] == "interrupted"
    assert rows.loc[first, "reason"].startswith("the Ray worker process running it died")
    assert rows.loc[f"{first}-a2", "status"] == "crash"  # queued again once, and run by a new worker
    assert rows.loc[f"{first}-a2", "reason"] == "second attempt: fails at once"
    verdict = next(line for line in log.splitlines() if f"done  {first}-a2:" in line)
    assert verdict.endswith("-> rejected"), verdict  # the retry is what the restarted actor judged
    assert list(rows[rows["status"] == "rejected"]["reason"]) == ["'notes.txt' not a .py file"]
    assert "train.py was unusable" in log and (root / "train.py").read_bytes() == baseline
    assert not trial_processes(root, rows.index)


def test_candidate_environment_is_an_allowlist(tmp_path, monkeypatch):
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-pass")
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    config = {"omp_threads": 1, "data_dir": str(tmp_path / "data"), "budget": 3.0, "seed": 0, "device": "cpu",
              "runs_dir": str(tmp_path / "runs"), "trial_id": "t-r1"}
    env = candidate_env(config, tmp_path / "out", "cpu")
    assert set(env) <= set(PASSED_ENV) | TRIAL_ENV
    assert "do-not-pass" not in env.values() and "RAY_ADDRESS" not in env
    assert not [value for value in env.values() if "val.bin" in value or "test.bin" in value]
    # the early export check is skipped only on a GPU type the source was handed over on before
    assert env["SCHEDULER_EXPORTED"] == "0"
    scored = {**config, "exported_on": ["NVIDIA H200"]}
    assert candidate_env(scored, tmp_path / "out", "NVIDIA H200")["SCHEDULER_EXPORTED"] == "1"
    assert candidate_env(scored, tmp_path / "out", "NVIDIA A100-SXM4-80GB")["SCHEDULER_EXPORTED"] == "0"


def test_the_trial_clock_allows_the_start_up_then_the_budget_and_a_margin(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr("scheduler.trial.time.monotonic", lambda: now[0])
    clock = TrialClock(budget=300.0, allowance=120.0)
    now[0] += 120.0
    assert clock.overdue(None) is None                       # the whole allowance, to the first progress line
    now[0] += 1.0
    assert "no training progress within the start-up allowance of 120 s" in clock.overdue(None)
    first = now[0] - 1.0                                     # what the harness's own clock says does not matter
    now[0] = first + 300.0 + HANDOVER_MARGIN
    assert clock.overdue(first) is None
    now[0] += 1.0
    reason = clock.overdue(first)
    assert reason.startswith("still running 311 s after its first progress line on a 300 s budget"), reason
    assert clock.startup_seconds(first) == 120.0 and clock.window_seconds(first) == 311.0


def test_dashboard_stays_local_unless_told_and_says_how_to_get_the_token():
    assert build_parser().parse_args(["launch"]).dashboard_host == LOCAL_HOST
    local = dashboard_lines(LOCAL_HOST, f"{LOCAL_HOST}:8265")
    assert len(local) == 1 and "cat ~/.ray/auth_token" in local[0] and "warning" not in local[0]
    exposed = dashboard_lines("0.0.0.0", "0.0.0.0:8265")
    assert exposed[1].startswith("warning: the dashboard listens on 0.0.0.0")


def test_a_progress_line_is_in_the_log_file_while_the_run_goes_on(tmp_path):
    """The log is what a run cut off early (a machine given back, a node lost) leaves of its curve: each progress
    line reaches the file when it comes, not when the trial ends."""
    read_end, write_end = os.pipe()
    log = OutputLog(tmp_path / "log.txt")
    log.follow(os.fdopen(read_end, "rb"))
    line = PROGRESS_TAG + json.dumps({"training_seconds": 1.0, "loss": 2.5}) + "\n"
    os.write(write_end, line.encode())
    wait_for(lambda: log.progress, timeout=10, what="the progress line to be read")
    assert line in (tmp_path / "log.txt").read_text()
    os.close(write_end)
    log.close()


def test_a_progress_figure_too_large_for_a_float_does_not_end_the_reading(tmp_path):
    """A progress line is the candidate's JSON: an integer of 400 digits (math.isfinite raises on it) is skipped,
    and the thread that reads the training's output (the log, the curves, the trial's clock) reads on."""
    read_end, write_end = os.pipe()
    heldout = Curve(3.0)
    log = OutputLog(tmp_path / "log.txt", {"heldout": heldout})
    log.follow(os.fdopen(read_end, "rb"))
    os.write(write_end, f'{PROGRESS_TAG}{{"training_seconds": 1.0, "heldout": 1{"0" * 400}}}\n'.encode())
    os.write(write_end, (PROGRESS_TAG + json.dumps({"training_seconds": 1.0, "heldout": 2.5}) + "\n").encode())
    os.close(write_end)
    log.close()
    assert log.progress == {"training_seconds": 1.0, "heldout": 2.5}
    assert heldout.values()[6] == 2.5 and log.first_progress is not None
