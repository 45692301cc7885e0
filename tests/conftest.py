"""What several test modules share, so that no test module imports another.

- Fixtures: a small prepared corpus (`data_dir`), a word corpus for `prepare --from` (`corpus`), a tiny
  train.py that trains on the CPU (`tiny_train_source`, `tiny_train`), and `launch` running in the
  background for tests that act on it while it runs (`background_launch`).
- Helpers: `wait_for`; the CLI in a project folder (`scheduler`, `make_root`, `variant`, `with_main`,
  `trial_processes`); a Python process with a clean environment (`clean_env`, `run_python`,
  `train_only_folder`); the code in the documents (`code_snippets`, `scheduler_commands`).
"""

from __future__ import annotations

import os
import random
import re
import shlex
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
from scheduler.trial import kill_marked, marked

ROOT = Path(__file__).resolve().parents[1]
CORPUS_BYTES = 200_000  # splits 180_000 / 10_000 / 10_000: the val split ends in a partial window
POLL = 0.2              # seconds between looks at something a test waits for
GCS_FLAG = "--gcs-address="  # how Ray's processes are told where the cluster's GCS listens
TINY = dict(MODEL_DIM=32, MODEL_DEPTH=1, MODEL_HEADS=2, BATCH_SIZE=4)  # the project folders' train.py
COMMAND = re.compile(r"python3? -m scheduler(?=\s)")
# Placeholders a document may use for a value; each becomes a sample value of the right form.
PLACEHOLDERS = {"$ID": "20250101-000000-abcdef", "${ID}": "20250101-000000-abcdef"}

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



# ---------------------------------------------------------------------------- a project folder and its CLI


def scheduler(root: Path, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m scheduler --root ROOT ARGS` in `root`, its output captured as text."""
    return subprocess.run([sys.executable, "-m", "scheduler", "--root", str(root), *args],
                          capture_output=True, text=True, timeout=timeout, cwd=root)


def make_root(tmp: Path, corpus: Path) -> Path:
    """tmp/root: a project folder with the tiny train.py, prepared from `corpus`."""
    root = tmp / "root"
    root.mkdir()
    (root / "train.py").write_text(variant())
    assert scheduler(root, "prepare", "--from", str(corpus)).returncode == 0
    return root


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    """A text file of 50,000 words drawn from a few, markup among them, for `prepare --from`."""
    rng = random.Random(0)
    words = ["the", "of", "and", "model", "<page>", "[[wiki]]", "data", "history", "</text>", "\n"]
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(50_000)))
    return path


def variant(**constants: object) -> str:
    """The tiny train.py of a project folder, with `constants` set."""
    return override((ROOT / "train.py").read_text(), **{**TINY, **constants})


def with_main(body: str) -> str:
    """A candidate whose training block is replaced by `body` (build_model stays)."""
    source = variant()
    head = source[: source.rindex('if __name__ == "__main__":')]
    return head + 'if __name__ == "__main__":\n' + "".join(f"    {line}\n" for line in body.splitlines())


def trial_processes(root: Path, trial_ids) -> list[int]:
    """Processes still carrying the marker of one of these trials (a candidate and anything it started)."""
    return [pid for trial_id in trial_ids for pid in marked(str(root / "results" / "runs" / trial_id))]


# ---------------------------------------------------------------------------- a Python process


def clean_env(**values: object) -> dict[str, str]:
    """os.environ without any SCHEDULER_* variable, plus `values`.

    One thread per process: on a busy machine (tests run beside other work) several
    spinning OpenMP threads can make a step of the tiny model take seconds instead of ~30 ms.
    """
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCHEDULER_")}
    env["OMP_NUM_THREADS"] = "1"
    env.update({k: str(v) for k, v in values.items()})
    return env


def run_python(args: list[str], cwd: Path, env: dict[str, str], timeout: float = 60) -> subprocess.CompletedProcess:
    """`python ARGS` in cwd, stdout and stderr together as text."""
    return subprocess.run([sys.executable, *args], cwd=cwd, env=env, timeout=timeout,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def train_only_folder(tmp_path: Path, data_dir: Path) -> Path:
    """A folder that holds the train split and nothing else."""
    folder = tmp_path / "train_only"
    folder.mkdir()
    (folder / "train.bin").write_bytes((data_dir / "train.bin").read_bytes())
    return folder


# ---------------------------------------------------------------------------- the code in the documents


def code_snippets(text: str) -> tuple[list[str], str]:
    """(code from fenced blocks, indented blocks and inline spans; the remaining prose)."""
    snippets = []

    def keep(match: re.Match) -> str:
        snippets.append(match.group(1))
        return "\n"

    text = re.sub(r"^```[^\n]*\n(.*?)^```[ \t]*$", keep, text, flags=re.S | re.M)
    text = re.sub(r"^((?: {4}|\t).*)$", keep, text, flags=re.M)

    def keep_inline(match: re.Match) -> str:
        snippets.append(match.group(1).replace("\n", " "))  # an inline span may wrap across lines
        return " "

    text = re.sub(r"`([^`]+)`", keep_inline, text)
    return snippets, text


def scheduler_commands(snippet: str) -> list[str]:
    """Each `python -m scheduler ...` in a piece of shell: the words after `-m scheduler`, up to |, ;, &&, ), >."""
    commands = []
    for line in snippet.splitlines():
        for match in COMMAND.finditer(line):
            rest = line[match.end():]
            lexer = shlex.shlex(rest, posix=True, punctuation_chars=True)
            lexer.whitespace_split = True
            words = []
            try:
                for word in lexer:
                    if word and all(c in "();<>|&" for c in word):
                        break
                    words.append(PLACEHOLDERS.get(word, word))
            except ValueError as error:  # an unclosed quote
                raise AssertionError(f"cannot split {line!r}: {error}") from None
            commands.append(words)
    return commands
