"""A Ray cluster on the CPU: file dropped -> trial running on a worker node against the same on the head, and
the time a node that lacks the data takes to get the splits through Ray's object store.

    python bench/cluster.py [--trials 4] [--mb 100]

Each case starts a cluster of two nodes on this machine as README's cluster
section does (`ray start --head`, `ray start --address=...`, token
authentication, each node with a Ray temp folder of its own), one pretend GPU
on the head in the first case and on the worker node in the second, then runs
`launch --address ... --device cpu --promotion greedy` on a tiny train.py. The
worker node is set up as a second machine: a home of its own (its data cache)
and SCHEDULER_DATA_DIR naming an empty folder, so its first trial (the
baseline's control run) fetches the splits. Once that run is over, candidates
are dropped into candidates/ one at a time, each while nothing is queued or
running (the GPU is free), and
timed to their trial's start (the row's started_at: run_trial begins on the
node). Last, splits of --mb megabytes in all (enwik8: 100) are shipped from a
driver on the head and fetched on each node by `trial.local_data`, timed.
All nodes share this machine: the figures hold Ray's scheduling and copies,
not a network's latency or bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scheduler import results  # noqa: E402
from scheduler.constants import override  # noqa: E402
from scheduler.trial import NODE_DATA_ENV  # noqa: E402

TINY = dict(MODEL_DIM=32, MODEL_DEPTH=1, MODEL_HEADS=2, BATCH_SIZE=4)
NODE_FLAGS = ("--num-cpus", "1", "--object-store-memory", str(400 * 2**20), "--disable-usage-stats", "--block")
STARTED = "Ray runtime started"
SPLITS = {"train.bin": 0.9, "val.bin": 0.05, "test.bin": 0.05}


def wait_for(predicate, timeout: float, what: str):
    deadline = time.time() + timeout
    while time.time() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise TimeoutError(f"waited {timeout:.0f} s for {what}")


def kill_session(sid: int) -> None:
    for entry in os.scandir("/proc"):
        try:
            if entry.name.isdigit() and os.getsid(int(entry.name)) == sid:
                os.kill(int(entry.name), signal.SIGKILL)
        except OSError:
            continue


class Cluster:
    """A head and one worker node, each `ray start --block` in a session of its own (killed as a whole)."""

    def __init__(self, work: Path, head_gpus: int, worker_gpus: int, worker_env: dict) -> None:
        self.temp = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))  # short: Ray's socket paths are capped
        self.env = {**os.environ, "PYTHONPATH": str(ROOT), "RAY_TMPDIR": str(self.temp), "RAY_AUTH_MODE": "token",
                    "RAY_AUTH_TOKEN": secrets.token_hex(32)}
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.address = f"127.0.0.1:{s.getsockname()[1]}"
        ray = str(Path(sys.executable).parent / "ray")
        self.nodes = []
        for name, args, env in (
                ("head", ["--head", "--port", self.address.split(":")[1], "--num-gpus", str(head_gpus),
                          "--include-dashboard=false"], self.env),
                ("worker", ["--address", self.address, "--num-gpus", str(worker_gpus),
                            "--temp-dir", str(self.temp / "worker")], {**self.env, **worker_env})):
            log = work / f"ray-{name}.log"
            with open(log, "wb") as out:
                self.nodes.append((subprocess.Popen([ray, "start", *args, *NODE_FLAGS], env=env, stdout=out,
                                                    stderr=subprocess.STDOUT, start_new_session=True), log))
        for proc, log in self.nodes:
            wait_for(lambda: STARTED in log.read_text(errors="replace") or proc.poll() is not None, 120, "Ray")
            if proc.poll() is not None:
                raise RuntimeError(f"a Ray node did not start:\n{log.read_text()[-2000:]}")

    def stop(self) -> None:
        for proc, _ in self.nodes:
            kill_session(proc.pid)
            proc.wait()
        shutil.rmtree(self.temp, ignore_errors=True)


def drop_to_running(work: Path, on_worker: bool, trials: int) -> tuple[list[float], set[str], str]:
    """(seconds from each drop to its trial running, the nodes they ran on, the first trial's data line)."""
    root = work / "root"
    root.mkdir()
    base = override((ROOT / "train.py").read_text(), **TINY)
    (root / "train.py").write_text(base)
    (work / "corpus.txt").write_text(" ".join(f"word{i % 97} of the text" for i in range(40_000)))
    run = [sys.executable, "-m", "scheduler", "--root", str(root)]
    subprocess.run([*run, "prepare", "--from", str(work / "corpus.txt")], check=True, capture_output=True,
                   env={**os.environ, "PYTHONPATH": str(ROOT)})
    worker_env = {"HOME": str(work / "worker-home"), NODE_DATA_ENV: str(work / "worker-data")}
    cluster = Cluster(work, head_gpus=0 if on_worker else 1, worker_gpus=1 if on_worker else 0, worker_env=worker_env)
    launch = subprocess.Popen([*run, "launch", "--address", cluster.address, "--device", "cpu", "--budget", "1",
                               "--no-dashboard", "--promotion", "greedy", "--min-baseline-runs", "1"],
                              env=cluster.env, stdout=subprocess.DEVNULL, stderr=open(work / "launch.log", "wb"),
                              start_new_session=True)
    rows = lambda: results.read_trials(root / "results")  # noqa: E731
    candidates = lambda: (lambda f: f[f["kind"] == "candidate"])(rows())  # noqa: E731
    queue = root / "results" / "queue"
    idle = lambda: not any(p.suffix == ".json" for p in queue.rglob("*"))  # noqa: E731  nothing queued or running
    where = "on a worker node" if on_worker else "on the head node"
    try:
        wait_for(lambda: len(rows()) >= 1 and idle(), 300, "the baseline's control run")
        seconds = []
        for i in range(trials):
            time.sleep(1)
            wait_for(idle, 300, "the GPU to be free")  # a greedy promotion queues a control run of the new baseline
            dropped = time.time()
            (root / "candidates" / f"single_{i}.py").write_text(override(base, GRAD_CLIP=1.5 + i / 100))
            wait_for(lambda: len(candidates()) > i, 300, "a candidate's trial")
            row = candidates().sort_values("started_at").iloc[-1]
            seconds.append(row["started_at"].timestamp() - dropped)
            print(f"| {where} | {i + 1} | {seconds[-1]:.2f} | {row['node']} |", flush=True)
        frame = rows()
        first = (root / "results" / "runs" / frame.sort_values("started_at").iloc[0]["trial_id"] / "log.txt")
        data_line = next((line for line in first.read_text().splitlines() if line.startswith("data:")), "")
        return seconds, set(frame["node"]), data_line
    finally:
        kill_session(launch.pid)
        launch.wait()
        cluster.stop()


def shipping(work: Path, megabytes: float, measured) -> None:
    """measured(what, seconds) for ray.put of splits of `megabytes` on the head, then `local_data` on each node."""
    import numpy as np

    data = work / "big-data"
    data.mkdir()
    rng = np.random.default_rng(0)
    for name, share in SPLITS.items():
        rng.integers(0, 256, int(megabytes * 1e6 * share), dtype=np.uint8).tofile(data / name)
    (data / "meta.json").write_text(json.dumps({"sha256": "bench" + secrets.token_hex(8)}))
    config = {"data_dir": str(data), "data_sha256": json.loads((data / "meta.json").read_text())["sha256"]}
    cluster = Cluster(work, head_gpus=0, worker_gpus=0, worker_env={NODE_DATA_ENV: str(work / "none")})
    # before Ray is imported: it reads the authentication mode once
    os.environ.update({k: cluster.env[k] for k in ("RAY_TMPDIR", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")})
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from scheduler.trial import local_data, ship_data

    try:
        ray.init(address=cluster.address, log_to_driver=False)
        started = time.perf_counter()
        shipped = ship_data(data)
        measured("ray.put on the head (once per launch)", time.perf_counter() - started)

        @ray.remote(num_cpus=0)
        def fetch(cache: str) -> float:
            os.environ["SCHEDULER_DATA_CACHE"] = cache
            began = time.perf_counter()
            local_data(config, shipped)
            return time.perf_counter() - began

        head = ray.get_runtime_context().get_node_id()
        for node in ray.nodes():
            if node["Alive"]:
                here = NodeAffinitySchedulingStrategy(node["NodeID"], soft=False)
                name = "head (holds the data)" if node["NodeID"] == head else "worker node (fetches)"
                measured(f"local_data on the {name}", ray.get(
                    fetch.options(scheduling_strategy=here).remote(str(work / f"cache-{node['NodeID'][:8]}"))))
    finally:
        ray.shutdown()
        cluster.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--mb", type=float, default=100.0, help="size of the shipped splits in all (enwik8: 100)")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="bench-cluster-"))
    try:
        print("| file dropped -> trial running | drop | s | node |")
        print("| --- | --- | --- | --- |", flush=True)
        medians = {}
        for on_worker in (False, True):
            folder = work / ("worker" if on_worker else "head")
            folder.mkdir()
            seconds, nodes, data_line = drop_to_running(folder, on_worker, args.trials)
            medians[on_worker] = statistics.median(seconds)
            print(f"| on {'a worker node' if on_worker else 'the head node'}: median of {len(seconds)} | | "
                  f"{medians[on_worker]:.2f} (max {max(seconds):.2f}) | {', '.join(sorted(nodes))} |", flush=True)
            if on_worker:
                fetched = data_line or "no data line: it did not fetch"
                print(f"| the worker node's first trial (the baseline's control run) | | | {fetched} |", flush=True)
        print(f"\nworker node - head, medians: {medians[True] - medians[False]:+.2f} s (bar: within 1 s)\n",
              flush=True)
        (work / "ship").mkdir()
        print(f"| shipping {args.mb:.0f} MB of splits | s |\n| --- | --- |")
        shipping(work / "ship", args.mb, lambda what, seconds: print(f"| {what} | {seconds:.2f} |", flush=True))
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
