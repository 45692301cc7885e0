"""One trial: train a candidate in a sandbox on the GPU Ray assigned, then score what it hands over.

`run_trial(config)` is the Ray Tune function trainable. The candidate's source
travels in the config (no shared file system needed). The trial's folder,
results/runs/TRIAL_ID/, is the trusted side's (the log, the evaluation's
result); the candidate gets its own working folder below it (protocol.WORK_DIR),
the only place it can write, and runs there as `python train.py` inside the
sandbox (scheduler/sandbox.py) with the budget, seed and the train split's path
in the environment. The trial streams the harness's progress lines to Tune
(the dashboard and `status` show them), keeps the output in a size-capped log,
and ends the training by its own clock (`TrialClock`): the start-up allowance
until the first progress line, then the budget and a short hand-over margin;
before that line the device may work only a few seconds (`StartupWork`,
scheduler/startup.py), or the run is refused.

`python -m scheduler.evaluate`, started beside training and waiting with its
library imports done, then scores the model the candidate handed over as data
(a graph of allowed operators and its weights: scheduler/handover.py); it never
runs the candidate's code. The last report carries the trial's result row, built
from the evaluation's figures and the trial's own observations; what the
training says of itself is checked (scheduler/claims.py) and never trusted.
"""

from __future__ import annotations

import json
import math
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from scheduler import claims, compilecache, startup
from scheduler.atomic import atomic_path
from scheduler.earlystop import CURVE_WINDOWS, STOPPED_EARLY, Curve, EarlyStop
from scheduler.results import CONFIG_COLUMNS
from scheduler.prepare import META_FILE
from scheduler.protocol import (EXIT_EXPORT, EXIT_NAN, EXPORT_TAG, FAIL_TAG, OUT_DIR, PROGRESS_TAG,
                                REFUSED_TAG, RESULT_FILE, STATS_FILE, WEIGHTS_FILE, WORK_DIR, evaluation_command,
                                send_go)

LOG_HEAD_BYTES = 256_000     # the log keeps the first bytes of output ...
LOG_TAIL_LINES = 400         # ... and the last lines; a flood in between is counted, not kept
TAIL_KEPT = 20               # lines of output kept in the result row of a failed trial
REPORT_EVERY = 2.0           # seconds between progress reports to Tune, and between looks at the trial's clock
KILL_GRACE = 5.0             # seconds between SIGTERM and SIGKILL
HANDOVER_MARGIN = 10.0       # seconds past the budget, on the trial's clock from the first progress line, for the
                             # last step, saving the weights and exiting: what a training that lies about its clock
                             # can gain at most (3% of a 300 s budget)
CONTROL_SEQUENCE = re.compile(r"\x1b(\[[0-?]*[ -/]*[@-~]|\][^\x07\x1b]*(\x07|\x1b\\)?|.?)")  # CSI, OSC, others
MARK = "SCHEDULER_TRIAL_MARK"  # environment marker: finds processes that left the trial's process group
PASSED_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME",
              "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "VIRTUAL_ENV",
              "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
OOM_SIGNS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
# The tagged lines that name a failure, by the process that prints them: the harness (in the sandbox) says why the
# model cannot be exported; only the evaluation refuses a hand-over or fails. A training that prints the
# evaluation's tags is a crash with that line, not a refusal.
TRAINING_TAGS = {EXPORT_TAG: "export_failed"}
EVALUATION_TAGS = {REFUSED_TAG: "refused", FAIL_TAG: "eval_failed"}
# What a progress line may pass on to Tune: the harness's figures, as numbers. The line comes from the candidate's
# process, and Tune takes some keys of a report as orders: `done` ends the trial with that report as its last
# result, whose `result_row` launch would record as the trial's row (a forged score, promoted).
PROGRESS_KEYS = ("step", "loss", "heldout", "tok_s", "mfu", "progress", "training_seconds")
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)
# A node's own data folder, set in the environment of `ray start` on that node (a copy on its local disk, or
# where a node that lacks the launch's data folder is to look): used in place of the launch's data path
NODE_DATA_ENV = "SCHEDULER_DATA_DIR"
DATA_CACHE_ENV = "SCHEDULER_DATA_CACHE"   # where a node keeps the splits it was sent (default below, under home)
DATA_CACHE_DEFAULT = Path(".cache") / "gpu-research-scheduler"
DATA_NOTE = "data: fetched "  # the trial's log line when its node was sent the splits (bench/cluster.py reads it)
NODE_ID_CHARS = 8             # of Ray's node id in a node's name: enough to tell a cluster's nodes apart


def progress_fields(text: str) -> dict:
    """The PROGRESS_KEYS of a progress line's JSON whose values are finite numbers; nothing else of it."""
    try:
        line = json.loads(text)
    except (ValueError, RecursionError):
        return {}
    if not isinstance(line, dict):
        return {}
    return {key: line[key] for key in PROGRESS_KEYS if finite_number(line.get(key))}


def finite_number(value: object) -> bool:
    """Whether a parsed JSON value is a finite number: not a bool, and not an integer too large for a float, on
    which math.isfinite raises (in the thread that reads the training's output, ending it)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def printable(line: str) -> str:
    """A line of a candidate's output as plain text: terminal control sequences (which could clear or retitle the
    terminal of whoever reads `results` or the launch log) removed, other unprintable characters shown as '?'."""
    return "".join(c if c.isprintable() else "?" for c in CONTROL_SEQUENCE.sub("", line.replace("\t", " ")))


class OutputLog:
    """Reads a process's output in a thread: a capped log file, the tail in memory, the latest progress, the
    curves it draws (`curves`: a Curve per progress field, `loss` and `heldout`) and when the first progress line
    came (on the trial's clock: time.monotonic())."""

    def __init__(self, path: Path, curves: dict[str, Curve] | None = None) -> None:
        self.path = path
        self.recent: deque[tuple[int, str]] = deque(maxlen=TAIL_KEPT)  # always the last lines (numbered), for the row
        self.count = 0                                          # lines read so far, of every process followed
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)    # lines past the head, written at close
        self.progress: dict = {}
        self.curves = curves or {}
        self.first_progress: float | None = None
        self.dropped = 0
        self._head_left = LOG_HEAD_BYTES
        self._file = open(path, "a", encoding="utf-8", errors="replace")
        self._threads: list[threading.Thread] = []

    def follow(self, stream) -> None:
        thread = threading.Thread(target=self._read, args=(stream,), daemon=True)
        thread.start()
        self._threads.append(thread)

    def _read(self, stream) -> None:
        for raw in iter(lambda: stream.readline(65536), b""):  # bounded: a line with no newline cannot eat memory
            line = raw.decode("utf-8", errors="replace")
            if line.startswith(PROGRESS_TAG):
                fields = progress_fields(line[len(PROGRESS_TAG):])
                self.progress = fields or self.progress
                for key, curve in self.curves.items():
                    if "training_seconds" in fields and key in fields:
                        curve.add(fields["training_seconds"], fields[key])
                if self.first_progress is None:
                    self.first_progress = time.monotonic()
            self.count += 1
            self.recent.append((self.count, line))
            if self._head_left > 0:
                self._file.write(line)
                self._head_left -= len(raw)
                if line.startswith(PROGRESS_TAG):  # on disk as it comes: whoever follows the log (a person, a
                    self._file.flush()              # copy of a run cut off early) sees the curve so far
            else:
                if len(self.tail) == self.tail.maxlen:
                    self.dropped += 1
                self.tail.append(line)
        stream.close()

    def note(self, line: str) -> None:
        """A line of the trial's own in the log, before the processes' output; on disk at once (a node that
        dies mid-trial leaves no buffered line unwritten)."""
        self._file.write(line + "\n")
        self._file.flush()
        self._head_left -= len(line) + 1

    def wait(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    def last_lines(self, since: int = 0) -> list[str]:
        """The last lines kept (they become reasons and tails that people and agents read: printable() keeps them
        plain text); with `since`, only those after line number `since` (one process's output)."""
        return [printable(line.rstrip("\n")) for number, line in self.recent if number > since]

    def close(self) -> None:
        """Write the kept tail after the head, with a note of what was dropped in between."""
        self.wait()
        if self.dropped:
            self._file.write(f"\n... {self.dropped} lines dropped (log capped) ...\n")
        self._file.writelines(self.tail)
        self.tail.clear()
        self._file.close()


class TrialClock:
    """The trial's own clock, which a candidate cannot slow: the budget runs from the training's first progress
    line (the harness prints it once its uncounted first steps are done), and before that line the start-up
    allowance applies (imports, data, model, the export check, compilation)."""

    def __init__(self, budget: float, allowance: float) -> None:
        self.budget, self.allowance = budget, allowance
        self.started = time.monotonic()

    def overdue(self, first_progress: float | None) -> str | None:
        """Why the training must stop now, or None."""
        now = time.monotonic()
        if first_progress is None:
            if now - self.started <= self.allowance:
                return None
            return (f"no training progress within the start-up allowance of {self.allowance:.0f} s "
                    "(imports, data, model, export check and compilation must fit in it)")
        if now - first_progress <= self.budget + HANDOVER_MARGIN:
            return None
        return (f"still running {now - first_progress:.0f} s after its first progress line on a {self.budget:.0f} s "
                f"budget (the trial's clock; {HANDOVER_MARGIN:.0f} s are allowed for the last step and saving): "
                "the training loop must end when run.done() is true")

    def startup_seconds(self, first_progress: float | None) -> float | None:
        return None if first_progress is None else round(first_progress - self.started, 1)

    def window_seconds(self, first_progress: float | None) -> float | None:
        """Seconds from the first progress line to now: the most training time a run can truly have had."""
        return None if first_progress is None else time.monotonic() - first_progress


class StartupWork:
    """The check of a training's device work before its first progress line (scheduler/startup.py): its meter is
    read at every look until the first look after that line, and past the free seconds the run is refused."""

    def __init__(self, meter: startup.Meter, device: str) -> None:
        self.meter, self.device = meter, device
        self.reason: str | None = None  # the refusal, once made
        self.settled = False            # read for the last time: the first progress line had come

    def overdue(self, first_progress: float | None) -> str | None:
        """Why the training must stop now, or None; after the reading that settles it, always None."""
        if self.settled:
            return None
        self.meter.poll()
        self.settled = first_progress is not None
        self.reason = startup.verdict(self.meter.busy_seconds(), self.device, self.meter.failed)
        return self.reason

    def seconds(self) -> float | None:
        """The row's figure: the device work read last (at the first look after the first progress line, or when
        the training ended without one), to 0.1 s; None when not measured."""
        busy = self.meter.busy_seconds()
        return None if busy is None else round(busy, 1)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGTERM the process group, then SIGKILL whatever is left of it."""
    for sig, wait in ((signal.SIGTERM, KILL_GRACE), (signal.SIGKILL, 0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=wait or None)
        except subprocess.TimeoutExpired:
            continue


def marked(mark: str) -> list[int]:
    """Processes on this node that carry a trial's environment marker: its candidate and all it started."""
    pids = []
    needle = f"{MARK}={mark}".encode() + b"\0"
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry.name}/environ", "rb") as f:
                if needle in f.read() + b"\0":
                    pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def measured_processes(training: int, mark: str, sandboxed: bool) -> set[int]:
    """The processes whose CPU seconds are the trial's (startup.CpuMeter): its training's process tree, never
    chosen by the marker, which a child can drop (started with an empty environment) and another trial's candidate
    can carry (a trial's folder is no secret); unsandboxed, the marked processes too: a double fork leaves the
    tree there."""
    return startup.descendants(training) | (set() if sandboxed else set(marked(mark)))


def kill_marked(mark: str, spare: int | None = None) -> int:
    """Kill processes carrying our environment marker that escaped the process group (setsid, double fork)."""
    killed = 0
    for pid in marked(mark):
        if pid == spare:
            continue
        try:
            os.kill(pid, signal.SIGKILL)
            killed += 1
        except OSError:
            continue
    return killed


def start_process(cmd: list[str], cwd: Path, env: dict, waits_for_go: bool = False) -> subprocess.Popen:
    """Start `cmd` as its own process group, its output piped; a stdin to write to if it waits for "go"."""
    return subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            stdin=subprocess.PIPE if waits_for_go else subprocess.DEVNULL, start_new_session=True)


def await_process(proc: subprocess.Popen, log: OutputLog, report: Callable[[], None], mark: str,
                  overdue: Callable[[], str | None], spare: int | None = None,
                  look_every: float = REPORT_EVERY) -> tuple[int, str | None]:
    """Follow a started process to its end or until `overdue()` gives a reason to stop it; (exit code, that
    reason). Afterwards kill what it left, in its group and by marker, except the process `spare`.
    `overdue` is called every `look_every` s, `report` every REPORT_EVERY s."""
    log.follow(proc.stdout)
    stopped = None
    reported = time.monotonic()
    while True:
        try:
            proc.wait(timeout=look_every)
            break
        except subprocess.TimeoutExpired:
            if time.monotonic() - reported >= REPORT_EVERY - 1e-3:
                reported = time.monotonic()
                report()
            stopped = overdue()
            if stopped:
                kill_group(proc)
                break
    kill_group(proc)  # children it left behind in its group
    kill_marked(mark, spare)
    log.wait()
    return proc.returncode, stopped


def classify(code: int, lines: list[str], tags: dict[str, str]) -> tuple[str, str]:
    """(status, one-line reason) of a training or evaluation process that ended on its own, not cleanly, from
    its own output `lines`; `tags` are the tagged lines that process may print (TRAINING_TAGS, EVALUATION_TAGS)."""
    lines = [printable(line) for line in lines]
    text = "\n".join(lines)
    for line in reversed(lines):
        for tag, status in tags.items():
            if line.startswith(tag):
                return status, line[len(tag):]
    if any(sign in text for sign in OOM_SIGNS):
        return "oom", "out of GPU memory: use a smaller model or batch"
    if code == EXIT_NAN:
        nan_line = next((l for l in reversed(lines) if l.startswith("FAIL: loss")), "loss is not finite")
        return "nan", nan_line
    last = next((l.strip() for l in reversed(lines) if l.strip()), "")
    if code == EXIT_EXPORT:
        return "export_failed", last or "the model could not be exported"
    signal_number = -code if code < 0 else code - 128 if 128 < code <= 192 else 0  # bwrap passes a signal on as 128+N
    if signal_number:
        return "crash", f"killed by signal {signal_number}" + (f": {last}" if last else "")
    return "crash", last or f"exit code {code} with no output"


def real_folder(path: Path) -> bool:
    """Whether `path` is a folder itself, not a link to one. The candidate can put a link to any folder in place
    of its hand-over folder; the trusted side reads and deletes files in it, and must not do so elsewhere."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def gpu_name(device: str) -> str:
    """Name of the assigned GPU, asked of nvidia-smi so that this worker never initialises CUDA itself."""
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "")
    if device != "cuda" or not visible:
        return "cpu"
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader", "-i", visible.split(",")[0]],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip().splitlines()[0] if out.returncode == 0 and out.stdout.strip() else "unknown GPU"
    except (OSError, subprocess.TimeoutExpired, IndexError):
        return "unknown GPU"


def candidate_env(config: dict, out_dir: Path, gpu: str) -> dict:
    """What the candidate may see: no more than it needs, and never the validation or test split. `gpu`: the
    trial's GPU type (its source handed over on it before: no early export check)."""
    env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH", "")])),
        "PYTHONUNBUFFERED": "1",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",  # as nvidia-smi and the sandbox count GPUs: training and evaluation agree
        "OMP_NUM_THREADS": str(config["omp_threads"]),
        "SCHEDULER_TRAIN_DATA": str(Path(config["data_dir"]) / "train.bin"),
        "SCHEDULER_BUDGET": str(config["budget"]),
        "SCHEDULER_SEED": str(config["seed"]),
        "SCHEDULER_DEVICE": config["device"],
        "SCHEDULER_OUT": str(out_dir),
        "SCHEDULER_TRIAL": "1",
        "SCHEDULER_EXPORTED": "1" if gpu in config.get("exported_on", ()) else "0",
        MARK: str(Path(config["runs_dir"]) / config["trial_id"]),  # unique across launches on one host
    })
    return env


# What a trial's node needs. The candidate is given the train split's path only; the evaluation
# process reads val (every trial) and test (a new baseline's first control run only).
SHIPPED = ("train.bin", "val.bin", "test.bin")


def ship_data(data_dir: Path) -> list:
    """Put the splits a trial needs into Ray's object store, once per launch, for nodes that lack the data.

    Returns [ref]: a list, so that Tune hands the trial the reference and the
    bytes travel only to a node that asks for them.
    """
    import numpy as np
    import ray

    shipped = {name: np.fromfile(data_dir / name, dtype=np.uint8) for name in SHIPPED}
    shipped[META_FILE] = (data_dir / META_FILE).read_text()
    return [ray.put(shipped)]


def data_cache() -> Path:
    """Where this node keeps splits it was sent, one folder per corpus checksum."""
    return Path(os.environ.get(DATA_CACHE_ENV) or Path.home() / DATA_CACHE_DEFAULT)


def holds_data(folder: Path, sha256: str) -> bool:
    """Whether `folder` holds every shipped split of the corpus with this checksum (meta.json is written last)."""
    try:
        return json.loads((folder / META_FILE).read_text())["sha256"] == sha256 and all(
            (folder / name).exists() for name in SHIPPED)
    except (OSError, ValueError, KeyError):
        return False


def local_data(config: dict, shipped: list | None) -> tuple[str, str]:
    """(the data folder on this node, a note for the trial's log: "" unless the splits were fetched now).

    The folder is the node's own (NODE_DATA_ENV where the node was started with it, else the launch's path)
    when it holds the corpus with the launch's checksum; else a cache named by that checksum, filled from
    the object store once per node: trials starting together on the node wait for the first one's copy.
    """
    import ray
    from filelock import FileLock

    wanted = config["data_sha256"]
    own = Path(os.environ.get(NODE_DATA_ENV) or config["data_dir"])
    if holds_data(own, wanted):
        return str(own), ""
    cache = data_cache() / wanted
    cache.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(cache.parent / f".{wanted}.lock"):
        if holds_data(cache, wanted):
            return str(cache), ""
        if not shipped:
            raise FileNotFoundError(f"no data at {own} on {node_name()} and none shipped")
        started = time.monotonic()
        data = ray.get(shipped[0])
        cache.mkdir(exist_ok=True)
        for name in SHIPPED:
            with atomic_path(cache / name) as tmp:
                data[name].tofile(tmp)
        (cache / META_FILE).write_text(data[META_FILE])  # last: its presence says the rest is complete
    size = sum(data[name].nbytes for name in SHIPPED)
    return str(cache), (f"{DATA_NOTE}{size / 1e6:.1f} MB in {time.monotonic() - started:.2f} s from the object "
                        f"store into {cache} (no corpus {wanted[:12]} at {own} on {node_name()})")


def node_name() -> str:
    """The node this runs on, as rows, the live files and the timeline name it: the host name and Ray's node id,
    shortened (the nodes of one machine share a host name; a node started again gets a new id)."""
    import ray

    host = socket.gethostname()
    if not ray.is_initialized():  # a test calling run_trial directly
        return host
    return f"{host}/{ray.get_runtime_context().get_node_id()[:NODE_ID_CHARS]}"


def ray_temp_folder() -> Path:
    """The temp folder of the Ray this worker belongs to (its sockets and session files), to hide from the candidate."""
    try:
        import ray

        return Path(ray._private.worker.global_worker.node.get_temp_dir_path())
    except Exception:  # not inside a Ray worker (a test calling run_trial directly): Ray's default
        from scheduler.sandbox import RAY_TMP

        return RAY_TMP


def training_command(config: dict, work: Path, env: dict, launch_data: str,
                     cache: Path | None = None) -> tuple[list[str], dict]:
    """`python train.py` as the trial runs it: inside the sandbox unless the launch was told otherwise.
    `launch_data` is the launch's data folder: where this node reads its data from another (its own, or the
    cache), the launch's folder and the cache are hidden too, as the data folder is (each may hold the corpus's
    validation split: a shared file system, an earlier fetch). `cache`: the trial's compile-cache folder, bound
    in the sandbox (scheduler/compilecache.py); None, the sandbox's private /tmp."""
    command = [sys.executable, "train.py"]
    if config["sandbox"] == "none":
        return command, env
    from scheduler.sandbox import Sandbox

    box = Sandbox.for_trial(work=work, train_split=Path(config["data_dir"]) / "train.bin", root=Path(config["root"]),
                            data=Path(config["data_dir"]), ray_tmp=ray_temp_folder(),
                            gpu=env.get("CUDA_VISIBLE_DEVICES") if config["device"] == "cuda" else None,
                            other_data=(Path(launch_data), data_cache()), **compilecache.sandbox_options(cache))
    return box.command(command), {**env, **box.env}


def run_trial(config: dict, shipped: list | None = None) -> None:
    """Ray Tune function trainable: train in the sandbox, score the hand-over, report the result row."""
    from ray import tune

    started = time.time()
    if config.get("refused"):  # its archived source no longer matches its sha256 name: nothing of it runs
        tune.report({"phase": "done", "result_row": json.dumps({
            **{key: config.get(key) for key in CONFIG_COLUMNS}, "status": "refused", "reason": config["refused"],
            "gpu_name": gpu_name(config["device"]), "node": node_name(), "started_at": started,
            "finished_at": time.time()})})
        return
    node, gpu_id = node_name(), os.environ.get("CUDA_VISIBLE_DEVICES", "")
    tune.report({"phase": "starting", "node": node, "gpu": gpu_id})  # where it runs, before the data may travel
    launch_data = config["data_dir"]
    data_dir, fetched = local_data(config, shipped)
    config = {**config, "data_dir": data_dir}
    folder = Path(config["runs_dir"]) / config["trial_id"]
    work = folder / WORK_DIR
    out_dir = work / OUT_DIR
    work.mkdir(parents=True, exist_ok=True)
    (work / "train.py").write_text(config["source"], encoding="utf-8")
    result_file = folder / RESULT_FILE
    row = {key: config[key] for key in CONFIG_COLUMNS}
    row.update(gpu_id=gpu_id, node=node, gpu_name=gpu_name(config["device"]), started_at=started)
    env = candidate_env(config, out_dir, row["gpu_name"])
    curve, heldout = Curve(config["budget"]), Curve(config["budget"])
    log = OutputLog(folder / "log.txt", {"loss": curve, "heldout": heldout})
    if fetched:
        log.note(fetched)
    # Only a candidate's first run is judged, against the curves of the baseline's runs on its GPU type (the searcher
    # put them in the config); control runs and confirmation reruns are never stopped
    early = EarlyStop(config.get("early_stop", "off") if config["kind"] == "candidate" else "off",
                      config.get("reference_curves", {}).get(row["gpu_name"]), config["budget"])
    cache = compilecache.start(config, folder, row["gpu_name"], log.note)  # None: --compile-cache private, or unsandboxed

    def report_progress() -> None:
        if log.progress:
            tune.report({**log.progress, "phase": "train", "elapsed": round(time.time() - started, 1),
                         "gpu": gpu_id, "node": node})

    splits = ["val", "test"] if config.get("score_test") else ["val"]  # test: a new baseline's first control run
    eval_cmd = [*evaluation_command(out_dir, result_file, config["data_dir"], config["device"]), "--split", *splits]
    # Started now so that its imports overlap training; it reads the hand-over only after "go"
    evaluation = start_process([*eval_cmd, "--wait"], folder, env, waits_for_go=True)
    clock = TrialClock(config["budget"], config["startup_allowance"])
    try:
        command, training_env = training_command(config, work, env, launch_data, cache)

        def processes() -> set[int]:  # first read at the first look, once `training` (below) has started
            return measured_processes(training.pid, env[MARK], config["sandbox"] != "none")

        work_before = StartupWork(startup.meter_for(config["device"], processes, evaluation.pid), config["device"])
        if work_before.meter.unmeasured:
            log.note(f"start-up work not measured: {work_before.meter.unmeasured}")
        training = start_process(command, work, training_env)
    except Exception:
        kill_group(evaluation)
        raise
    # the early-stop rule looks once a window at least (a CPU test's seconds budget has windows of 0.1 s)
    code, stopped = await_process(training, log, report_progress, env[MARK], spare=evaluation.pid,
                                  # the start-up work first: a run past both limits at one look is refused for its
                                  # work, not timed out, and the row's figure is read at that look
                                  overdue=lambda: (work_before.overdue(log.first_progress)
                                                   or clock.overdue(log.first_progress) or early.overdue(curve)),
                                  look_every=min(REPORT_EVERY, config["budget"] / CURVE_WINDOWS))
    if not stopped and not work_before.settled:  # it ended before the first look after its first progress line
        refusal = work_before.overdue(log.first_progress)  # (or without one: then only the row's figure counts)
        stopped = refusal if log.first_progress is not None else None
    window = clock.window_seconds(log.first_progress)  # the sandbox is gone: nothing of the candidate runs now
    row["startup_seconds"] = clock.startup_seconds(log.first_progress)
    row["startup_work_seconds"] = work_before.seconds()
    if not stopped:
        early.settle(curve)  # the whole curve: a shadow row says what the rule says of the finished run
    row.update(curve=curve.values(), heldout_curve=heldout.values(), early_stop_at=early.stopped_at)
    figures: dict = {}
    if stopped:
        kill_group(evaluation)  # nothing to score
        status, reason = (STOPPED_EARLY if stopped == early.reason else "refused" if stopped == work_before.reason
                          else "timeout"), stopped
    elif code != 0:
        kill_group(evaluation)
        status, reason = classify(code, log.last_lines(), TRAINING_TAGS)
    elif not (out_dir / WEIGHTS_FILE).exists():
        kill_group(evaluation)
        status, reason = "crash", "training finished without saving its model: call run.finish(model)"
    else:
        tune.report({**log.progress, "phase": "eval", "elapsed": round(time.time() - started, 1)})
        send_go(evaluation)
        training_lines = log.count  # what follows is the evaluation's
        deadline = time.monotonic() + config["eval_timeout"]
        code, stopped = await_process(
            evaluation, log, lambda: None, env[MARK],
            overdue=lambda: f"the evaluation took over {config['eval_timeout']:.0f} s" if time.monotonic() > deadline
            else None)
        figures = claims.read_untrusted_json(result_file)  # written by the evaluation, as soon as val is scored
        status, reason = "ok", ""
        if stopped or code != 0:
            evaluation_lines = log.last_lines(since=training_lines)
            cause, why = ("eval_failed", stopped) if stopped else classify(code, evaluation_lines, EVALUATION_TAGS)
            if "val_bpc" in figures:  # the test split failed after it: the validation score stands
                reason = f"test split not scored: {why}"
            else:
                status, reason = (cause if cause in ("oom", "refused") else "eval_failed"), why

    stats = claims.read_untrusted_json(out_dir / STATS_FILE) if real_folder(out_dir) else {}
    checked, refusal = claims.check(stats, figures, window, row["gpu_name"])
    if status == "ok" and refusal:
        status, reason = "refused", refusal
    row.update(checked)
    row.update(
        status=status, reason=reason, error_tail="\n".join(log.last_lines()) if status != "ok" else "",
        val_bpc=figures.get("val_bpc") if status == "ok" else None,
        test_bpc=figures.get("test_bpc") if status == "ok" else None,
        train_bpc=figures.get("train_bpc") if status == "ok" else None,
        eval_seconds=figures.get("eval_seconds"),
        finished_at=time.time(), total_seconds=round(time.time() - started, 1),
    )
    compilecache.finish(config, cache, status, row["gpu_name"], log.note)  # seals its source's seed, removes the folder
    log.close()
    if real_folder(out_dir):  # scored: the weights are not needed again, and they are large
        try:
            (out_dir / WEIGHTS_FILE).unlink(missing_ok=True)
        except OSError:  # a folder in its place (which the evaluation refused): what is left there is the candidate's
            pass
    tune.report({"phase": "done", "result_row": json.dumps(row)})
