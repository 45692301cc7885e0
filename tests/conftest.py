"""Shared fixtures: a small prepared corpus, a tiny variant of train.py that trains on the CPU, and
`launch` running in the background for tests that act on it while it runs."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import pytest

from scheduler.constants import override
from scheduler.prepare import prepare
from scheduler.trial import kill_marked

ROOT = Path(__file__).resolve().parents[1]
CORPUS_BYTES = 200_000  # splits 180_000 / 10_000 / 10_000: the val split ends in a partial window
POLL = 0.2              # seconds between looks at something a test waits for
GCS_FLAG = "--gcs-address="  # how Ray's processes are told where the cluster's GCS listens

T = TypeVar("T")


def wait_for(condition: Callable[[], T], timeout: float, what: str) -> T:
    """The first true value of `condition()`, polled until `timeout` seconds have passed."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(POLL)
    raise AssertionError(f"waited {timeout:.0f} s for {what}")


class BackgroundLaunch:
    """`python -m scheduler launch` running in the background, in a session of its own.

    Every process of the Ray that launch starts stays in that session (Ray's
    workers each get a process group of their own, so killing launch's group
    misses them). Killing the session's processes therefore ends this launch and
    its Ray and nothing else: no `ray stop`, which ends every Ray on the machine.
    Candidates start sessions of their own: they are found by their trial's marker.
    """

    def __init__(self, root: Path, args: tuple[str, ...], umask: int) -> None:
        self.root = root
        self.log = root.parent / f"launch-{time.time_ns()}.log"
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen([sys.executable, "-m", "scheduler", "--root", str(root), "launch", *args],
                                         cwd=root, stdout=subprocess.DEVNULL, stderr=log, start_new_session=True,
                                         umask=umask)

    def stderr(self) -> str:
        return self.log.read_text(errors="replace")

    def session(self) -> list[int]:
        """Launch and every process of its Ray that is still there."""
        pids = []
        for entry in os.scandir("/proc"):
            try:
                if entry.name.isdigit() and os.getsid(int(entry.name)) == self.proc.pid:
                    pids.append(int(entry.name))
            except OSError:  # gone meanwhile
                continue
        return pids

    def gcs_address(self) -> str:
        """host:port of this launch's Ray, read from its processes' command lines (the port is chosen at start)."""
        for pid in self.session():
            try:
                args = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace").split("\0")
            except OSError:
                continue
            for arg in args:
                if arg.startswith(GCS_FLAG):
                    return arg[len(GCS_FLAG):]
        raise AssertionError(f"no process of launch {self.proc.pid} names its GCS address")

    def wait(self, timeout: float) -> int:
        try:
            return self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"launch still running after {timeout:.0f} s; its log:\n{self.stderr()[-3000:]}")

    def kill_all(self) -> None:
        """Kill launch, its Ray, and the trial processes of its root (left running by a test that failed)."""
        for pid in self.session():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                continue
        self.proc.wait()
        runs = self.root / "results" / "runs"
        for folder in runs.iterdir() if runs.is_dir() else ():
            kill_marked(str(folder))


@pytest.fixture
def background_launch():
    """start(root, *launch_args, umask=-1) -> BackgroundLaunch; whatever is left of each is killed afterwards."""
    started: list[BackgroundLaunch] = []

    def start(root: Path, *args: str, umask: int = -1) -> BackgroundLaunch:
        started.append(BackgroundLaunch(root, args, umask))
        return started[-1]

    yield start
    for launch in started:
        launch.kill_all()


def make_corpus(n: int, seed: int = 0) -> bytes:
    """Random but compressible text: sentences of words drawn from a small vocabulary, with markup."""
    rng = random.Random(seed)
    letters = "etaoinshrdlcumwfgypbvk"
    words = ["".join(rng.choice(letters) for _ in range(rng.randint(1, 8))) for _ in range(300)]
    weights = [1.0 / (rank + 1) for rank in range(len(words))]  # Zipf-like, as in real text
    parts: list[str] = []
    size = 0
    while size < n:
        sentence = " ".join(rng.choices(words, weights, k=rng.randint(4, 14)))
        line = f"<p>{sentence.capitalize()}.</p>\n" if rng.random() < 0.2 else sentence.capitalize() + ". "
        parts.append(line)
        size += len(line)
    return "".join(parts).encode()[:n]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> Path:
    """A prepared data folder (train.bin, val.bin, test.bin, meta.json) of a ~200 KB generated corpus."""
    root = tmp_path_factory.mktemp("corpus")
    source = root / "corpus.txt"
    source.write_bytes(make_corpus(CORPUS_BYTES))
    data = root / "data"
    meta = prepare(data, source=source)
    assert meta["corpus"] == "custom" and meta["size"] == CORPUS_BYTES
    return data


@pytest.fixture(scope="session")
def tiny_train_source() -> str:
    """train.py with a model small enough to take a few dozen steps a second on a CPU.

    MAX_SEQ_LEN is shorter than the evaluation's 1024-byte windows: the model has
    rotary positions and no absolute position embedding, so it is length-agnostic
    (the end-to-end tests check that such weights are scored on 1024-byte windows).
    """
    return override(
        (ROOT / "train.py").read_text(),
        MODEL_DIM=32, MODEL_DEPTH=2, MODEL_HEADS=2, BATCH_SIZE=4, MAX_SEQ_LEN=256,
    )


@pytest.fixture
def tiny_train(tmp_path, tiny_train_source) -> Path:
    """The tiny variant written as tmp_path/train.py."""
    path = tmp_path / "train.py"
    path.write_text(tiny_train_source)
    return path

