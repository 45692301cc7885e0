"""One launch per root, end to end: while a real launch runs a trial, a second launch exits 2 naming it and
`status` shows it alive; once it is killed (SIGKILL: no clean-up at all), `status` says it died and shows its
trial as interrupted, not running; the next launch takes the root over, says so, and runs the trial again."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pytest

from scheduler import presence
from scheduler.layout import Layout

from conftest import wait_for

pytestmark = pytest.mark.slow

LAUNCH = ("--pretend-gpus", "1", "--device", "cpu", "--budget", "120", "--no-dashboard", "--sandbox", "none")


def scheduler(root, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler", "--root", str(root), *args], capture_output=True,
                          text=True, timeout=120, env={k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"})


def test_one_launch_per_root_and_status_after_a_kill(tmp_path, data_dir, tiny_train, background_launch):
    root = tmp_path
    shutil.copytree(data_dir, root / "data")
    layout = Layout.at(root)
    first = background_launch(root, *LAUNCH)

    def training() -> list[dict]:  # the baseline's control run, past its start
        state = json.loads(scheduler(root, "status", "--json").stdout or "{}")
        return [r for r in state.get("running", []) if r.get("step")]

    wait_for(training, 300, f"the control run to train; launch's log:\n{first.stderr()}")
    beat = presence.read(layout)
    assert beat["state"] == presence.RUNNING and beat["pid"] == first.proc.pid and beat["gpus"] == 1

    second = scheduler(root, "launch", *LAUNCH)
    assert second.returncode == 2, second.stderr
    assert f"another launch is running in {root}" in second.stderr and f"pid {first.proc.pid}" in second.stderr
    assert "Traceback" not in second.stderr and first.proc.poll() is None  # the first one runs on untouched

    first.kill_all()  # SIGKILL to launch and its Ray: no clean-up at all
    state = json.loads(scheduler(root, "status", "--json").stdout)
    assert state["launch"]["state"] == presence.GONE and state["running"] == [] and not state["draining"]
    assert [t["kind"] for t in state["interrupted"]] == ["control"]
    text = scheduler(root, "status").stdout
    assert "died without stopping" in text and "0 running" in text and "1 interrupted" in text

    third = background_launch(root, *LAUNCH)
    wait_for(lambda: "takes its place" in third.stderr(), 120, f"the takeover note; log:\n{third.stderr()}")
    wait_for(lambda: presence.read(layout).get("pid") == third.proc.pid, 60, "the new heartbeat")
    stopped = scheduler(root, "stop", "--now")
    assert stopped.returncode == 0, stopped.stderr
    assert third.wait(180) == 0, third.stderr()
    rows = scheduler(root, "results", "--json")
    assert any(r["status"] == "interrupted" for r in json.loads(rows.stdout))  # the killed trial, recovered
    assert presence.read(layout)["state"] == presence.STOPPED
