"""README's CPU demo runs as written: its bash block, from the repository, with only the scratch folder moved
into the test's temporary folder. It launches, submits a changed variant, waits for its verdict, reads the
results and the baseline, stops the launch and draws the report; nothing it started is left running."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
DEMO_FOLDER = "/tmp/cpu-try"  # README's scratch folder
TIMEOUT_S = 900


def demo_script() -> str:
    section = (ROOT / "README.md").read_text().split("## Try it on the CPU\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"^```bash\n(.*?)^```\s*$", section, flags=re.S | re.M)
    assert len(blocks) == 1, f"README's CPU demo should be one bash block, found {len(blocks)}"
    return blocks[0]


def session_processes(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        try:
            if entry.isdigit() and os.getsid(int(entry)) == sid:
                pids.append(int(entry))
        except OSError:
            continue
    return pids


def test_readme_cpu_demo_runs_as_written(tmp_path):
    folder = tmp_path / "cpu-try"
    script = demo_script()
    assert DEMO_FOLDER in script and "python -m scheduler submit" in script and "python -m scheduler wait" in script
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join someone else's cluster
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` is this interpreter
    proc = subprocess.Popen(["bash", "-c", "set -eo pipefail\n" + script.replace(DEMO_FOLDER, str(folder))],
                            cwd=ROOT, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=TIMEOUT_S)
    except subprocess.TimeoutExpired:
        out, err = "", f"the demo ran past {TIMEOUT_S} s"
    finally:
        left = session_processes(proc.pid)
        for pid in left:  # ours (the demo's session): clean up, then report them
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        proc.wait()
    log = (folder / "launch.log").read_text(errors="replace")[-3000:] if (folder / "launch.log").exists() else ""
    explain = (f"exit {proc.returncode}\n--- stdout ---\n{out[-3000:]}\n--- stderr ---\n{err[-3000:]}"
               f"\n--- launch.log ---\n{log}")
    assert proc.returncode == 0, explain
    assert not left, f"processes of the demo left running: {left}\n{explain}"
    verdict = re.search(r"^(\S+): (ok, val_bpc [0-9.]+|\w+ \(.*\)); (pending|confirming|rejected|promoted)\b", out,
                        flags=re.M)
    assert verdict, f"wait printed no verdict\n{explain}"
    assert re.search(r"^trial_id .* verdict ", out, flags=re.M) and f"{verdict.group(1)}-r1" in out, explain
    assert "val bpc" in out and "wrote " in out, explain  # baseline's score, report's files
    report = folder / "results" / "report"
    assert (report / "progress.png").exists() and (report / "summary.md").exists()
    assert "Traceback" not in err, explain
