"""program.md runs as written: its ```bash blocks, in order, against a real launch on the CPU.

The only substitutions are the two placeholders program.md declares: `my_variant.py`
(the agent's candidate file) and `agent-1` (the agent's name). A second test runs two
scripted agents at once through program.md's loop against one launch.

The tests share one `python -m scheduler launch --pretend-gpus 2 --device cpu --budget 2`
in a temporary root with a tiny train.py (a launch's start and its baseline's first
score cost 20 s on 2 cores); the last stops it with `stop --now` and checks that no
process it started (Ray included) is left behind.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from scheduler.constants import override
from scheduler.prepare import prepare
from scheduler.results import read_trials

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PROGRAM = ROOT / "program.md"
FILE_PLACEHOLDER, AGENT_PLACEHOLDER = "my_variant.py", "agent-1"
# one baseline score and one confirmation suffice for the agents' loop tested here; the defaults (5 and 3) add trials
LAUNCH = ["launch", "--pretend-gpus", "2", "--device", "cpu", "--budget", "2", "--no-dashboard",
          "--min-baseline-runs", "1", "--confirmations", "1"]
SCRIPT_TIMEOUT = 300  # seconds for one run of program.md's commands (Ray's start-up included)


# ---------------------------------------------------------------------------
# program.md
# ---------------------------------------------------------------------------


def bash_blocks(text: str) -> list[str]:
    """The bodies of the ```bash fenced blocks, in order."""
    return re.findall(r"^```bash\n(.*?)^```\s*$", text, flags=re.S | re.M)


def personalise(script: str, file: str, agent: str) -> str:
    return script.replace(FILE_PLACEHOLDER, file).replace(AGENT_PLACEHOLDER, agent)


def block_with(blocks: list[str], needle: str) -> str:
    found = [b for b in blocks if needle in b]
    assert len(found) == 1, f"program.md should have exactly one bash block with {needle!r}, found {len(found)}"
    return found[0]


def run_bash(script: str, root: Path, launch: "Launch | None" = None,
             timeout: float = SCRIPT_TIMEOUT) -> subprocess.CompletedProcess:
    """Run `script` with bash in `root`, stopping at the first failing command (traced to stderr).

    The script runs in its own process group, killed whole on a timeout or when the launch
    dies (a `wait` would otherwise block for ever and outlive the test).
    """
    prelude = "set -euo pipefail\nset -x\n"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.Popen(["bash", "-c", prelude + script], cwd=root, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.monotonic() + timeout
    try:
        while True:
            try:
                out, err = proc.communicate(timeout=1.0)
                return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
            except subprocess.TimeoutExpired:
                if time.monotonic() > deadline:
                    raise AssertionError(f"timed out after {timeout:.0f} s:\n{script}") from None
                if launch is not None and launch.proc.poll() is not None and not launch.stopping:
                    log = (root / "launch.log").read_text()[-4000:]
                    raise AssertionError(f"launch exited ({launch.proc.returncode}) while running:\n{script}\n"
                                         f"--- launch.log ---\n{log}") from None
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.communicate()


def explain(done: subprocess.CompletedProcess, root: Path) -> str:
    log = root / "launch.log"
    return (f"exit {done.returncode}\n--- stdout ---\n{done.stdout[-4000:]}\n--- stderr ---\n{done.stderr[-6000:]}"
            f"\n--- launch.log ---\n{log.read_text()[-3000:] if log.exists() else ''}")


def test_program_md_placeholders_are_declared():
    text = PROGRAM.read_text()
    blocks = bash_blocks(text)
    assert len(blocks) >= 5
    assert any(FILE_PLACEHOLDER in b for b in blocks) and any(AGENT_PLACEHOLDER in b for b in blocks)
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    assert f"`{FILE_PLACEHOLDER}`" in prose and f"`{AGENT_PLACEHOLDER}`" in prose


# ---------------------------------------------------------------------------
# A research root and a launch
# ---------------------------------------------------------------------------


def make_corpus(n: int) -> bytes:
    import random

    rng = random.Random(1)
    words = ["".join(rng.choice("etaoinshrdlucm") for _ in range(rng.randint(1, 8))) for _ in range(200)]
    text, size = [], 0
    while size < n:
        sentence = " ".join(rng.choices(words, k=rng.randint(4, 12))).capitalize() + ". "
        text.append(sentence)
        size += len(sentence)
    return "".join(text).encode()[:n]


@pytest.fixture(scope="module")
def research_root(tmp_path_factory) -> Path:
    """A project folder: a tiny train.py, prepared data, no results yet.

    The train.py carries a unique comment, so that its baseline id (and so the trial ids
    of its control runs) cannot collide with another launch running on this machine.
    """
    tmp_path = tmp_path_factory.mktemp("program_md")
    root = tmp_path / "root"
    root.mkdir()
    source = override((ROOT / "train.py").read_text(), MODEL_DIM=32, MODEL_DEPTH=1, MODEL_HEADS=2, BATCH_SIZE=4)
    (root / "train.py").write_text(source + f"\n# test root {uuid.uuid4().hex}\n")
    corpus = tmp_path / "corpus.txt"
    corpus.write_bytes(make_corpus(100_000))
    prepare(root / "data", source=corpus)
    return root


def _children() -> dict[int, list[int]]:
    kids: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        kids.setdefault(ppid, []).append(int(entry))
    return kids


def _identity(pid: int) -> str | None:
    """Start time and command of a live process (tells it apart from a later one with the same pid)."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return None
    return None if fields[0] == "Z" else f"{fields[19]} {command.strip()}"


class Launch:
    """`python -m scheduler launch ...` in the background; `stop()` ends it and reports what it left behind."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self.log = open(root / "launch.log", "w")
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join someone else's cluster
        self.proc = subprocess.Popen([sys.executable, "-m", "scheduler", *LAUNCH], cwd=root, env=env,
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        self.seen: dict[int, str] = {}
        self.stopping = False
        self._stop_watch = threading.Event()
        self._watcher = threading.Thread(target=self._watch, daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        """Remember every process the launch started (Ray's included), sampled twice a second."""
        while not self._stop_watch.is_set():
            self._remember()
            self._stop_watch.wait(0.5)

    def _remember(self) -> None:
        kids = _children()
        todo = [self.proc.pid]
        while todo:
            pid = todo.pop()
            for child in kids.get(pid, []):
                identity = _identity(child)
                if identity and child not in self.seen:
                    self.seen[child] = identity
                todo.append(child)

    def stop(self, timeout: float = 120) -> list[str]:
        """`stop --now`, wait for launch to exit, then return the processes it started that are still alive."""
        self.stopping = True
        if self.proc.poll() is None:
            self._remember()
            subprocess.run([sys.executable, "-m", "scheduler", "stop", "--now"], cwd=self.root,
                           capture_output=True, timeout=60)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.send_signal(signal.SIGINT)  # drain, then stop now: launch's own handler
                self.proc.send_signal(signal.SIGINT)
                try:
                    self.proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                    self.proc.wait()
        self._stop_watch.set()
        self._watcher.join(timeout=5)
        self.log.close()
        deadline = time.monotonic() + 30  # Ray's processes exit shortly after the driver's ray.shutdown()
        while True:
            alive = {pid: ident for pid, ident in self.seen.items() if _identity(pid) == ident}
            if not alive or time.monotonic() > deadline:
                break
            time.sleep(0.5)
        for pid in alive:  # ours: clean up, and report them
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        return [f"{pid}: {ident.split(' ', 1)[1][:150]}" for pid, ident in alive.items()]


def assert_clean_exit(launch: Launch) -> None:
    """`stop --now` ends the launch with exit code 0, and nothing it started (Ray included) outlives it."""
    leftovers = launch.stop()
    assert launch.proc.returncode == 0, (launch.root / "launch.log").read_text()[-3000:]
    assert any("raylet" in command for command in launch.seen.values()), "the process watch saw no Ray"
    assert not leftovers, f"processes left running after launch exited: {leftovers}"


@pytest.fixture(scope="module")
def launch(research_root):
    running = Launch(research_root)
    try:
        yield running
    finally:
        running.stop()


# ---------------------------------------------------------------------------
# The tests
# ---------------------------------------------------------------------------


def test_program_md_runs_as_written(research_root, launch):
    """Every bash block of program.md, in order, with only the two placeholders replaced."""
    root = research_root
    script = personalise("\n".join(bash_blocks(PROGRAM.read_text())), "solo_variant.py", "solo")
    done = run_bash(script, root, launch)
    assert done.returncode == 0, explain(done, root)
    assert "contract ok" in done.stdout

    rows = read_trials(root / "results")
    mine = rows[(rows["agent"] == "solo") & (rows["kind"] == "candidate")]
    assert len(mine) == 1, explain(done, root)
    assert mine.iloc[0]["status"] == "ok" and mine.iloc[0]["val_bpc"] > 0
    assert mine.iloc[0]["description"]
    assert (root / "solo_variant.py").exists() and not (root / FILE_PLACEHOLDER).exists()


# One idea per iteration, different for each agent (identical files would be rejected). These
# learning rates are far too low for 2 s of training: the candidates score clearly worse than
# the baseline, so the promotion rule queues no confirmation reruns that would slow the test.
# Alpha goes round the loop twice; beta once, then submits a copy of alpha's first file.
AGENT_EDITS = {
    "alpha": [{"LEARNING_RATE": 1e-5, "MUON_LEARNING_RATE": 1e-5}, {"LEARNING_RATE": 2e-5, "MUON_LEARNING_RATE": 2e-5}],
    "beta": [{"LEARNING_RATE": 3e-5, "MUON_LEARNING_RATE": 3e-5}],
}


def test_two_agents_at_once(research_root, launch):
    """Two scripted agents loop through program.md's steps concurrently against one launch.

    Both get their results, each sees the other's rows in `results --json`, every
    submitted id has exactly one candidate row, and an identical file is rejected as a
    duplicate of the first one.
    """
    root = research_root
    blocks = bash_blocks(PROGRAM.read_text())
    copy_block = block_with(blocks, "cp train.py")
    submit_block = block_with(blocks, "scheduler submit")
    look_block = block_with(blocks, "scheduler status")

    submitted: dict[str, list[str]] = {name: [] for name in AGENT_EDITS}
    seen: dict[str, list[dict]] = {}
    first_source: dict[str, str] = {}
    alpha_first_done = threading.Event()
    loops_done = threading.Barrier(len(AGENT_EDITS), timeout=SCRIPT_TIMEOUT)
    errors: list[str] = []
    duplicate: dict[str, object] = {}

    def bash(script: str) -> subprocess.CompletedProcess:
        done = run_bash(script, root, launch)
        if done.returncode != 0:
            raise AssertionError(explain(done, root))
        return done

    def agent(name: str) -> None:
        file = f"{name}_variant.py"
        try:
            for i, edit in enumerate(AGENT_EDITS[name]):
                bash(personalise(look_block, file, name))
                bash(personalise(copy_block, file, name))
                path = root / file
                path.write_text(override(path.read_text(), **edit))
                message = ", ".join(f"{k}={v}" for k, v in edit.items())
                script = personalise(submit_block, file, name)
                script = re.sub(r'-m "[^"]*"', f'-m "{message}"', script)
                done = bash(script)
                candidate = re.search(r"^candidate (\S+)$", done.stdout, flags=re.M).group(1)
                submitted[name].append(candidate)
                if name == "alpha" and i == 0:
                    first_source["alpha"] = path.read_text()
                    alpha_first_done.set()
            if name == "beta":  # an identical file: rejected, with a row that names the first
                assert alpha_first_done.wait(SCRIPT_TIMEOUT)
                (root / file).write_text(first_source["alpha"])
                done = run_bash(f'python -m scheduler submit {file} --agent {name} -m "same as alpha"', root, launch)
                assert done.returncode == 0, explain(done, root)
                candidate = done.stdout.strip()
                submitted[name].append(candidate)
                waited = run_bash(f"python -m scheduler wait {candidate} --json", root, launch)
                duplicate.update(id=candidate, code=waited.returncode, row=json.loads(waited.stdout))
            loops_done.wait()  # both agents are done: each now reads everybody's rows
            done = bash("python -m scheduler results --json")
            seen[name] = json.loads(done.stdout)
        except BaseException as error:  # noqa: BLE001 - reported by the main thread
            errors.append(f"{name}: {error}")
            loops_done.abort()

    threads = [threading.Thread(target=agent, args=(name,)) for name in AGENT_EDITS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=2 * SCRIPT_TIMEOUT)
    assert not errors, "\n\n".join(errors)
    assert all(not t.is_alive() for t in threads)

    for name, rows in seen.items():
        agents = {row["agent"] for row in rows}
        assert set(AGENT_EDITS) <= agents, f"{name} sees rows of {agents}"
    rows = read_trials(root / "results")
    for name, ids in submitted.items():
        for candidate in ids:
            first_rows = rows[(rows["candidate_id"] == candidate) & (rows["kind"] == "candidate")]
            assert len(first_rows) == 1, f"{name}'s {candidate}: {len(first_rows)} candidate rows"
            assert first_rows.iloc[0]["agent"] == name
    for name in AGENT_EDITS:
        ok = rows[(rows["agent"] == name) & (rows["kind"] == "candidate") & (rows["status"] == "ok")]
        assert len(ok) == len(AGENT_EDITS[name]), f"{name}: {len(ok)} scored candidates"

    assert duplicate["code"] == 1
    assert duplicate["row"]["status"] == "rejected"
    assert duplicate["row"]["duplicate_of"] == submitted["alpha"][0]


def test_stop_now_ends_the_launch_and_leaves_nothing_behind(launch):
    """Last, after the agents above: `stop --now` ends the shared launch cleanly."""
    assert_clean_exit(launch)
