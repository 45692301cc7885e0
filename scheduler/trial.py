"""One trial: run a candidate on the GPU Ray assigned, then score its weights in a fresh process.

`run_trial(config)` is the Ray Tune function trainable. The candidate's source
travels in the config (no shared file system needed); the trial writes it to
its own working folder, starts `python train.py` there as its own process
group with the budget, seed and data location in the environment, streams the
harness's progress lines to Tune (the dashboard and `status` show them), keeps
the output in a size-capped log, and kills the whole group at a hard limit, or
sooner when its progress shows it training well past its budget.
Then `python -m scheduler.evaluate` scores the saved weights; it is started
with training and waits, its library imports done, until training has ended.
The last report carries the trial's result row (see scheduler/results.py).
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from scheduler.prepare import META_FILE
from scheduler.protocol import (EXIT_NAN, FAIL_TAG, PROGRESS_TAG, RESULT_FILE, STATS_FILE, WEIGHTS_FILE,
                                evaluation_command, send_go)

LOG_HEAD_BYTES = 256_000     # the log keeps the first bytes of output ...
LOG_TAIL_LINES = 400         # ... and the last lines; a flood in between is counted, not kept
TAIL_KEPT = 20               # lines of output kept in the result row of a failed trial
REPORT_EVERY = 2.0           # seconds between progress reports to Tune
KILL_GRACE = 5.0             # seconds between SIGTERM and SIGKILL
OVERRUN_GRACE = 10.0         # counted training seconds past the budget before a loop that ignores run.done() is
                             # stopped: far more than one step overshoots, far less than the start-up allowance
MARK = "SCHEDULER_TRIAL_MARK"  # environment marker: finds processes that left the trial's process group
PASSED_ENV = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "LD_LIBRARY_PATH", "CUDA_HOME",
              "CUDA_VISIBLE_DEVICES", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "VIRTUAL_ENV",
              "NCCL_NVLS_ENABLE", "TORCH_SYMM_MEM_DISABLE_MULTICAST", "NVSHMEM_DISABLE_NVLS")
OOM_SIGNS = ("OutOfMemoryError", "CUDA out of memory", "CUBLAS_STATUS_ALLOC_FAILED")
PROJECT_ROOT = str(Path(__file__).resolve().parent.parent)


class OutputLog:
    """Reads a process's output in a thread: a capped log file, the tail in memory, the latest progress."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.recent: deque[str] = deque(maxlen=TAIL_KEPT)       # always the last lines, for the result row
        self.tail: deque[str] = deque(maxlen=LOG_TAIL_LINES)    # lines past the head, written at close
        self.progress: dict = {}
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
                try:
                    self.progress = json.loads(line[len(PROGRESS_TAG):])
                except ValueError:
                    pass
            self.recent.append(line)
            if self._head_left > 0:
                self._file.write(line)
                self._head_left -= len(raw)
            else:
                if len(self.tail) == self.tail.maxlen:
                    self.dropped += 1
                self.tail.append(line)
        stream.close()

    def wait(self) -> None:
        for thread in self._threads:
            thread.join(timeout=10)
        self._threads.clear()

    def last_lines(self) -> list[str]:
        return [line.rstrip("\n") for line in self.recent]

    def close(self) -> None:
        """Write the kept tail after the head, with a note of what was dropped in between."""
        self.wait()
        if self.dropped:
            self._file.write(f"\n... {self.dropped} lines dropped (log capped) ...\n")
        self._file.writelines(self.tail)
        self.tail.clear()
        self._file.close()


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


def await_process(proc: subprocess.Popen, limit: float, log: OutputLog, report, mark: str,
                  spare: int | None = None, give_up=lambda: False) -> tuple[int, bool]:
    """Follow a started process to its end, the limit or `give_up()`; (exit code, timed out). Afterwards kill
    what it left, in its group and by marker, except the process `spare`. `report` and `give_up` are called
    every REPORT_EVERY s."""
    log.follow(proc.stdout)
    deadline = time.monotonic() + limit
    timed_out = False
    while True:
        try:
            proc.wait(timeout=REPORT_EVERY)
            break
        except subprocess.TimeoutExpired:
            report()
            if time.monotonic() > deadline or give_up():
                timed_out = True
                kill_group(proc)
                break
    kill_group(proc)  # children it left behind in its group
    kill_marked(mark, spare)
    log.wait()
    return proc.returncode, timed_out


def classify(code: int, timed_out: bool, lines: list[str], limit: float) -> tuple[str, str]:
    """(status, one-line reason) of a training process that did not finish cleanly."""
    text = "\n".join(lines)
    if timed_out:
        return "timeout", f"killed at the hard limit of {limit:.0f} s (budget + start-up allowance)"
    if any(sign in text for sign in OOM_SIGNS):
        return "oom", "out of GPU memory: use a smaller model or batch"
    if code == EXIT_NAN:
        nan_line = next((l for l in reversed(lines) if l.startswith("FAIL: loss")), "loss is not finite")
        return "nan", nan_line
    last = next((l.strip() for l in reversed(lines) if l.strip()), "")
    if code < 0:
        return "crash", f"killed by signal {-code}" + (f": {last}" if last else "")
    return "crash", last or f"exit code {code} with no output"


def overrun(progress: dict, budget: float) -> str | None:
    """Why a training that goes on past its budget is stopped, once its own progress shows it; else None."""
    counted = progress.get("training_seconds")
    if not isinstance(counted, (int, float)) or counted <= budget + OVERRUN_GRACE:
        return None
    return (f"stopped after {counted:.0f} s of counted training on a {budget:.0f} s budget: "
            "the training loop must end when run.done() is true")


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


def candidate_env(config: dict, out_dir: Path) -> dict:
    """What the candidate may see: no more than it needs, and never the validation or test split."""
    env = {key: os.environ[key] for key in PASSED_ENV if key in os.environ}
    env.update({
        "PYTHONPATH": os.pathsep.join(filter(None, [PROJECT_ROOT, os.environ.get("PYTHONPATH", "")])),
        "PYTHONUNBUFFERED": "1",
        "OMP_NUM_THREADS": str(config["omp_threads"]),
        "SCHEDULER_TRAIN_DATA": str(Path(config["data_dir"]) / "train.bin"),
        "SCHEDULER_BUDGET": str(config["budget"]),
        "SCHEDULER_SEED": str(config["seed"]),
        "SCHEDULER_DEVICE": config["device"],
        "SCHEDULER_OUT": str(out_dir),
        "SCHEDULER_TRIAL": "1",
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


def local_data(config: dict, shipped: list | None) -> str:
    """The data folder on this node: the driver's path when it holds the same data, else a cache filled
    from the object store and named by the corpus checksum (so it is fetched once per node)."""
    import ray

    wanted = config["data_sha256"]

    def holds(folder: Path) -> bool:
        try:
            return json.loads((folder / META_FILE).read_text())["sha256"] == wanted and all(
                (folder / name).exists() for name in SHIPPED)
        except (OSError, ValueError, KeyError):
            return False

    if holds(Path(config["data_dir"])):
        return config["data_dir"]
    cache = Path(os.environ.get("SCHEDULER_DATA_CACHE", Path.home() / ".cache" / "gpu-research-scheduler")) / wanted
    if not holds(cache):
        if not shipped:
            raise FileNotFoundError(f"no data at {config['data_dir']} on {socket.gethostname()} and none shipped")
        data = ray.get(shipped[0])
        cache.mkdir(parents=True, exist_ok=True)
        for name in SHIPPED:
            data[name].tofile(cache / f".{name}.tmp")
            os.replace(cache / f".{name}.tmp", cache / name)
        (cache / META_FILE).write_text(data[META_FILE])  # last: its presence says the rest is complete
    return str(cache)


def eval_failure(lines: list[str]) -> str | None:
    """The evaluation's own one-line reason for failing, when it printed one."""
    return next((line[len(FAIL_TAG):] for line in reversed(lines) if line.startswith(FAIL_TAG)), None)


def run_trial(config: dict, shipped: list | None = None) -> None:
    """Ray Tune function trainable: train, score, and report the result row."""
    from ray import tune

    started = time.time()
    config = {**config, "data_dir": local_data(config, shipped)}
    workdir = Path(config["runs_dir"]) / config["trial_id"]
    workdir.mkdir(parents=True, exist_ok=True)
    out_dir = workdir / "out"
    (workdir / "train.py").write_text(config["source"], encoding="utf-8")
    env = candidate_env(config, out_dir)
    log = OutputLog(workdir / "log.txt")
    row = {key: config[key] for key in ("trial_id", "candidate_id", "kind", "agent", "parent", "baseline",
                                        "description", "source_sha256", "seed")}
    row.update(gpu_id=os.environ.get("CUDA_VISIBLE_DEVICES", ""), node=socket.gethostname(),
               gpu_name=gpu_name(config["device"]), started_at=started)

    def report_progress() -> None:
        if log.progress:
            tune.report({**log.progress, "phase": "train", "elapsed": round(time.time() - started, 1),
                         "gpu": row["gpu_id"]})

    limit = config["budget"] + config["startup_allowance"]
    splits = ["val", "test"] if config.get("score_test") else ["val"]  # test: a new baseline's first control run
    eval_cmd = [*evaluation_command("train.py", out_dir, config["data_dir"], config["device"]), "--split", *splits]
    # Started now so that its imports overlap training; it runs the candidate's code only after "go"
    evaluation = start_process([*eval_cmd, "--wait"], workdir, env, waits_for_go=True)
    training = start_process([sys.executable, "train.py"], workdir, env)
    code, timed_out = await_process(training, limit, log, report_progress, env[MARK], spare=evaluation.pid,
                                    give_up=lambda: overrun(log.progress, config["budget"]))
    weights = out_dir / WEIGHTS_FILE
    if code != 0 or timed_out or not weights.exists():
        kill_group(evaluation)  # nothing to score
        status, reason = classify(code, timed_out, log.last_lines(), limit)
        if timed_out:  # stopped by give_up, or at the hard limit: the overrun, when there was one, is the reason
            reason = overrun(log.progress, config["budget"]) or reason
        if code == 0 and not timed_out:
            status, reason = "crash", "training finished without saving weights: call run.finish(model)"
    else:
        tune.report({**log.progress, "phase": "eval", "elapsed": round(time.time() - started, 1)})
        result_file = out_dir / RESULT_FILE
        result_file.unlink(missing_ok=True)  # the score comes from the evaluation, never from the candidate
        send_go(evaluation)
        code, timed_out = await_process(evaluation, config["eval_timeout"], log, lambda: None, env[MARK])
        lines = log.last_lines()
        cause, why = classify(code, timed_out, lines, config["eval_timeout"])
        scored = result_file.exists()  # written as soon as the validation split is scored
        if scored and code == 0 and not timed_out:
            status, reason = "ok", ""
        elif scored and len(splits) > 1:  # the test split failed after it: the validation score stands
            status, reason = "ok", f"test split not scored: {eval_failure(lines) or why}"
        elif cause == "oom":
            status, reason = "oom", why
        else:
            status, reason = "eval_failed", eval_failure(lines) or why

    stats = {}
    for name in (RESULT_FILE, STATS_FILE):
        if (out_dir / name).exists():
            stats = json.loads((out_dir / name).read_text())
            break
    row.update(
        status=status, reason=reason, error_tail="\n".join(log.last_lines()) if status != "ok" else "",
        val_bpc=stats.get("val_bpc") if status == "ok" else None,
        test_bpc=stats.get("test_bpc") if status == "ok" else None,
        training_seconds=stats.get("training_seconds"), eval_seconds=stats.get("eval_seconds"),
        tokens=stats.get("total_tokens"), steps=stats.get("num_steps"), parameters=stats.get("num_params"),
        peak_memory_mb=stats.get("peak_vram_mb"), mfu_percent=stats.get("mfu_percent"),
        tokens_per_second=stats.get("tokens_per_second"), precision=stats.get("precision"),
        finished_at=time.time(), total_seconds=round(time.time() - started, 1),
    )
    if stats.get("gpu_name") and stats["gpu_name"] != "cpu":
        row["gpu_name"] = stats["gpu_name"]
    log.close()
    weights.unlink(missing_ok=True)  # scored: the weights are not needed again, and they are large
    tune.report({"phase": "done", "result_row": json.dumps(row)})
