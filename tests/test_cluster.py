"""`launch --address` on a real Ray cluster of three nodes on this machine, as README's cluster section sets it up.

A head (no GPUs: it runs launch, the selection actor and Ray's own services)
and two worker nodes with 2 pretend GPUs each, every one a `ray start --block`
in a session of its own, with token authentication on. Worker node B is set up
as a second machine looks to the scheduler: its own home folder (so its own
data cache) and, by SCHEDULER_DATA_DIR, a data folder of its own that holds
nothing, so the launch's data path is not its. One launch shows:

- trials run on both worker nodes, never more at once than the cluster's GPUs,
  their rows name the node (host and Ray node id) and GPU, and the report has a
  lane per node and GPU;
- node B gets the splits through the object store once, into its cache, and the
  same model scores the same on both nodes (every program here, the baseline
  too, hands over its initial model, seed 0: the same weights wherever it runs);
- the node running a candidate is killed as a machine dies (every process of its
  Ray node, SIGKILL) while the candidate runs, after each node has recorded a
  row: the trial gets an `interrupted` row naming that node, runs again on the
  other node, launch goes on to the end, and no process of the candidate is left;
- the selection actor runs on the head node, train.py and every row are under
  the launch's root.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from scheduler import results
from scheduler.record import RETRY_SUFFIX
from scheduler.constants import override
from scheduler.trial import DATA_CACHE_DEFAULT, DATA_NOTE, NODE_DATA_ENV, NODE_ID_CHARS, marked

from conftest import make_corpus, wait_for

REPO = Path(__file__).resolve().parent.parent
TINY = dict(MODEL_DIM=32, MODEL_DEPTH=1, MODEL_HEADS=2, BATCH_SIZE=4)
NODE_GPUS = 2
BUDGET = "2"  # seconds; nothing here trains: every program hands over its initial model
NODE_FLAGS = ("--num-cpus", "1", "--object-store-memory", "80000000", "--disable-usage-stats", "--block")
RAYLET = "/raylet/raylet"
NODE_ID_FLAG = "--node_id="
STARTED = "Ray runtime started"
UNTRAINED = 2  # candidates besides the one cut off: with it and the baseline, one trial per GPU at once
CUT_OFF_SLEEP = 150  # seconds the cut-off candidate's first attempt waits, killed long before

pytestmark = pytest.mark.slow


def scheduler(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "scheduler", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=300, cwd=root)


def session_processes(sid: int) -> list[int]:
    pids = []
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == sid:
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def command_line(pid: int) -> list[str]:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
    except OSError:
        return []


class RayNode:
    """`ray start ... --block` in a session of its own: every process of this Ray node stays in that session
    (trials' candidates start sessions of their own), so killing the session's processes is the machine dying."""

    def __init__(self, name: str, args: list[str], env: dict, logs: Path) -> None:
        self.name, self.log = name, logs / f"ray-{name}.log"
        self.node_id = ""
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([str(Path(sys.executable).parent / "ray"), "start", *args, *NODE_FLAGS],
                                         env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_started(self) -> None:
        wait_for(lambda: STARTED in self.log.read_text(errors="replace") or self.proc.poll() is not None, 120,
                 f"Ray node {self.name} to start")
        assert self.proc.poll() is None, f"Ray node {self.name} did not start:\n{self.log.read_text()[-3000:]}"
        self.node_id = next(arg[len(NODE_ID_FLAG):] for pid in session_processes(self.proc.pid)
                            for arg in command_line(pid) if RAYLET in command_line(pid)[0]
                            and arg.startswith(NODE_ID_FLAG))

    def named(self) -> str:
        """How rows name this node."""
        return f"{socket.gethostname()}/{self.node_id[:NODE_ID_CHARS]}"

    def kill(self) -> None:
        for pid in session_processes(self.proc.pid):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        self.proc.wait()


@pytest.fixture
def cluster(tmp_path, monkeypatch):
    """start(workers) -> ({name: RayNode}, the head's address): a head and the worker nodes asked for ({name:
    (gpus, extra environment)}), all starting at once, with token authentication and Ray temp folders of their
    own, one per node as on separate machines (so no other Ray on this machine finds them, and the nodes'
    socket names cannot clash). `RayNode.wait_started` waits for one; every node is killed afterwards."""
    temp = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))  # short: Ray's socket paths must fit in 107 bytes
    monkeypatch.setenv("RAY_TMPDIR", str(temp))
    monkeypatch.setenv("RAY_AUTH_MODE", "token")
    monkeypatch.setenv("RAY_AUTH_TOKEN", secrets.token_hex(32))  # launch, run from this test, gets the same
    started: dict[str, RayNode] = {}

    def start(workers: dict[str, tuple[int, dict]]) -> tuple[dict[str, RayNode], str]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        started["head"] = RayNode("head", ["--head", "--port", str(port), "--num-gpus", "0",
                                           "--include-dashboard=false"], dict(os.environ), tmp_path)
        for name, (gpus, extra) in workers.items():  # they wait for the head's GCS
            started[name] = RayNode(name, ["--address", f"127.0.0.1:{port}", "--num-gpus", str(gpus),
                                           "--temp-dir", str(temp / name)], {**os.environ, **extra}, tmp_path)
        return started, f"127.0.0.1:{port}"

    yield start
    for node in reversed(started.values()):
        node.kill()
    shutil.rmtree(temp, ignore_errors=True)


def submit(root: Path, path: Path) -> str:
    done = scheduler(root, "submit", str(path), "--agent", "t", "-m", path.stem)
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def untrained(source: str, name: str, first_attempt_sleeps: int = 0) -> str:
    """A program that hands over build_model()'s initial weights (seed 0): the same model on any node. With
    `first_attempt_sleeps`, its first attempt sleeps that long first (a retry knows itself by its folder)."""
    head = source[: source.rindex('if __name__ == "__main__":')]
    sleep = (f"    import os, time\n    if not os.getcwd().endswith('{RETRY_SUFFIX}/work'):\n"
             f"        time.sleep({first_attempt_sleeps})\n" if first_attempt_sleeps else "")
    return (head + f"# untrained: {name}\n" + 'if __name__ == "__main__":\n' + sleep + "    run = harness.Run()\n"
            "    with run.device:\n        model = build_model()\n    run.finish(model)\n")


@pytest.mark.timeout(600)
def test_launch_on_a_cluster_of_three_nodes(tmp_path, cluster, background_launch):
    home_b, data_b = tmp_path / "home-b", tmp_path / "data-b"  # B: a home and a data folder of its own, empty
    nodes, address = cluster({"a": (NODE_GPUS, {}),
                              "b": (NODE_GPUS, {"HOME": str(home_b), NODE_DATA_ENV: str(data_b)})})
    root = tmp_path / "root"
    root.mkdir()
    base = override((REPO / "train.py").read_text(), **TINY)
    (root / "train.py").write_text(untrained(base, "the baseline"))
    (tmp_path / "corpus.txt").write_bytes(make_corpus(200_000))
    assert scheduler(root, "prepare", "--from", str(tmp_path / "corpus.txt")).returncode == 0
    for n in range(UNTRAINED):
        (tmp_path / f"untrained{n}.py").write_text(untrained(base, f"candidate {n}"))
        submit(root, tmp_path / f"untrained{n}.py")
    (tmp_path / "cut.py").write_text(untrained(base, "cut off", first_attempt_sleeps=CUT_OFF_SLEEP))
    cut = submit(root, tmp_path / "cut.py")
    for node in nodes.values():
        node.wait_started()

    launch = background_launch(root, "--address", address, "--device", "cpu", "--budget", BUDGET,
                               "--no-dashboard", "--startup-allowance", str(CUT_OFF_SLEEP + 60),
                               "--min-baseline-runs", "1", "--confirmations", "1", "--exit-when-idle")
    live = root / "results" / "live" / f"{cut}-r1.json"

    def cut_off_runs_and_each_node_has_a_row() -> dict | None:
        assert launch.proc.poll() is None, f"launch ended early:\n{launch.stderr()[-3000:]}"
        try:
            progress = json.loads(live.read_text())
            recorded = set(results.read_trials(root / "results")["node"])
        except (OSError, ValueError, KeyError):
            return None
        both = {node.named() for name, node in nodes.items() if name != "head"} <= recorded
        return progress if progress.get("node") and both else None

    cut_off = wait_for(cut_off_runs_and_each_node_has_a_row, 200, f"{cut}-r1 to run and a row from each node")
    selection = [pid for pid in session_processes(nodes["head"].proc.pid)
                 if command_line(pid)[0].startswith("ray::Selection")]
    assert selection, "the selection actor does not run on the head node"
    lost = next(node for node in nodes.values() if node.named() == cut_off["node"])
    kept = nodes["b" if lost.name == "a" else "a"]
    lost.kill()  # the machine is gone: its Ray node's processes all at once, SIGKILL
    assert launch.wait(400) == 0, launch.stderr()[-3000:]

    rows = results.read_trials(root / "results")
    assert rows["trial_id"].is_unique
    by_trial = rows.set_index("trial_id")
    # the trial on the lost node: interrupted there, run again on the other one, nothing of it left anywhere
    assert by_trial.loc[f"{cut}-r1", "status"] == "interrupted"
    assert by_trial.loc[f"{cut}-r1", "node"] == lost.named()
    assert by_trial.loc[f"{cut}-r1{RETRY_SUFFIX}", "status"] == "ok"
    assert by_trial.loc[f"{cut}-r1{RETRY_SUFFIX}", "node"] == kept.named()
    assert not [t for t in rows["trial_id"] if marked(str(root / "results" / "runs" / t))], "a trial process is left"
    # trials on both worker nodes, never two at once on one GPU nor more at once than the cluster's GPUs
    ran = rows.dropna(subset=["started_at"])
    assert set(ran["node"]) == {nodes["a"].named(), nodes["b"].named()}
    assert set(ran["gpu_id"]) <= {str(g) for g in range(NODE_GPUS)}
    events = sorted([(t, 1) for t in ran["started_at"]] + [(t, -1) for t in ran["finished_at"]])
    running = [sum(step for _, step in events[: i + 1]) for i in range(len(events))]
    assert max(running) <= NODE_GPUS * 2
    for _, lane in ran.groupby(["node", "gpu_id"]):
        spans = sorted(zip(lane["started_at"], lane["finished_at"]))
        assert all(end <= next_start for (_, end), (next_start, _) in zip(spans, spans[1:])), spans
    # B was sent the splits once, into its own cache; the same model scored the same on both nodes
    sha = json.loads((root / "data" / "meta.json").read_text())["sha256"]
    cache = home_b / DATA_CACHE_DEFAULT / sha
    for name in ("train.bin", "val.bin", "test.bin"):
        assert (cache / name).read_bytes() == (root / "data" / name).read_bytes()
    logs = {t: root / "results" / "runs" / t / "log.txt" for t in rows["trial_id"]}
    fetched = [t for t, log in logs.items() if log.exists() and DATA_NOTE in log.read_text()]
    assert len(fetched) == 1 and by_trial.loc[fetched[0], "node"] == nodes["b"].named(), fetched
    ok = rows[rows["status"] == "ok"]
    assert set(ok["trial_id"]) == set(rows["trial_id"]) - {f"{cut}-r1"}, rows[["trial_id", "status", "reason"]]
    assert set(ok["node"]) == {nodes["a"].named(), nodes["b"].named()}, ok[["trial_id", "node"]]
    assert ok["val_bpc"].max() - ok["val_bpc"].min() < 1e-9, ok[["trial_id", "node", "val_bpc"]]
    # the report has a lane per node and GPU
    from scheduler.report import write_report

    summary = write_report(root / "results")["summary"].read_text()
    for node in ran["node"].unique():
        for gpu in ran[ran["node"] == node]["gpu_id"].unique():
            assert f"| {node} | {gpu} |" in summary, summary
