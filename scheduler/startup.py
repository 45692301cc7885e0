"""What a trial's start-up may spend: device work before the training's first progress line.

The budget runs from the first progress line (trial.TrialClock); before it, only the start-up allowance bounds
the trial, in wall time, and a candidate that trained silently there would get that training free. Honest
start-up is mostly CPU work (imports, the model, the export check, torch.compile) and a few seconds of device
work (the harness's uncounted warm-up steps, CUDA graph capture, cuBLAS's start, the first counted second). So
the trial measures the device's work from the training's start to its first progress line with a `Meter`, and
refuses the run once it passes FREE_SECONDS for its device (`verdict`).

- On a GPU, `GpuMeter` adds up NVML's utilisation samples of the trial's GPU (the whole GPU: the evaluation's
  warm-up beside training, milliseconds, counts too). It never initialises CUDA in the trial's worker.
- On the CPU (`--device cpu`: tests, demos), `CpuMeter` adds up the CPU seconds of the trial's processes: its
  training's process tree (unsandboxed, also the processes carrying its marker). Open: the seconds of a child
  its parent never waits for (SIGCHLD ignored: the kernel reaps it at once) reach no one's reaped times, so they
  leave the total when it is gone (the reading never drops, but the next such child fills it again), and a child
  that lives between two looks is never seen. The GPU meter is not fooled so: it reads the device.
- On a GPU where NVML does not work, nothing is measured (`Unmeasured`): the trial says so in its log and
  checks nothing. NVML that fails after the meter started (`failed`) stops the run: the check must not be a
  thing a candidate can break.

The trial reads its meter at every look (every 2 s at most) until its first look after the first progress
line: the free seconds also cover that look's delay.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Iterable
from pathlib import Path
from types import ModuleType

# Seconds of device work allowed before the first progress line. A GPU: an honest start-up keeps it busy at most
# 1.5 s (H200, proxy corpus, the default train.py, 2026-12-03: bench/curves/h200-300s/gpu.csv), and the check's
# last look may add a counted 2 s. The CPU (tests, demos) also runs the imports: 4-6 s on a 2-core machine.
FREE_SECONDS = {"cuda": 10.0, "cpu": 20.0}
MAX_SAMPLE_PERIOD = 1.0    # seconds: a longer gap between NVML samples (the first after the start) counts as this
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")  # /proc/PID/stat counts CPU time in these


def verdict(busy: float | None, device: str, failed: str | None = None) -> str | None:
    """Why a run that worked the device `busy` seconds before its first progress line must stop, or None. A meter
    that `failed` after it had started measuring stops it too: a candidate must not turn the check off."""
    if failed:
        return (f"its device's work before the first progress line could not be read ({failed}): "
                "the run could not be checked; submit it again")
    free = FREE_SECONDS[device]
    if busy is None or busy <= free:
        return None
    return (f"the {'GPU' if device == 'cuda' else 'CPU'} worked {busy:.1f} s before the first progress line "
            f"({free:.0f} s allowed for compilation and the first steps; training or autotuning's benchmarks there "
            "are work outside the budget): train only inside the budget, through run.step")


class Meter:
    """Device work of a trial's training (the meter is made just before it starts). `poll()` reads what is new
    (the trial calls it at every look); `busy_seconds()` is the total so far, which never decreases, or None
    when it cannot be measured (`unmeasured` then says why). `failed` says why a meter that was measuring
    stopped (the total stays what it was)."""

    unmeasured: str | None = None
    failed: str | None = None

    def poll(self) -> None:
        raise NotImplementedError

    def busy_seconds(self) -> float | None:
        raise NotImplementedError


class Unmeasured(Meter):
    """A device this worker cannot measure: no check."""

    def __init__(self, why: str) -> None:
        self.unmeasured = why

    def poll(self) -> None:
        pass

    def busy_seconds(self) -> float | None:
        return None


@functools.cache  # once per process; NVML counts its initialisations, so the missing shutdown is harmless
def nvml() -> ModuleType:
    """NVML, initialised. Ray's vendored copy of nvidia-ml-py: ray is pinned (==2.60.0 in pyproject.toml), so
    this private module cannot move under us; it loads the driver's libnvidia-ml, never CUDA."""
    from ray._private.thirdparty import pynvml

    pynvml.nvmlInit()
    return pynvml


class GpuMeter(Meter):
    """Busy seconds of one GPU from NVML's utilisation samples: each sample is the percentage of its period (the
    gap since the sample before, at most MAX_SAMPLE_PERIOD) in which a kernel ran. Samples taken before the
    meter was made do not count; each poll adds only the samples since the last one it saw."""

    def __init__(self, nvml_index: int) -> None:
        self._nvml = nvml()
        self._handle = self._nvml.nvmlDeviceGetHandleByIndex(nvml_index)
        self._busy = 0.0
        self._last = 0  # µs: the newest sample seen (the driver's clock, whatever it is)
        self._last = max((sample.timeStamp for sample in self._samples()), default=0)

    def _samples(self) -> list:
        """The samples newer than the last one seen, oldest first."""
        try:
            _, samples = self._nvml.nvmlDeviceGetSamples(self._handle, self._nvml.NVML_GPU_UTILIZATION_SAMPLES,
                                                         self._last)
        except self._nvml.NVMLError as error:
            if error.value == self._nvml.NVML_ERROR_NOT_FOUND:  # NVML's answer when there is no new sample
                return []
            raise
        return sorted((s for s in samples if s.timeStamp > self._last), key=lambda s: s.timeStamp)

    def poll(self) -> None:
        if self.failed:
            return
        try:
            samples = self._samples()
        except self._nvml.NVMLError as error:
            self.failed = f"NVML failed while measuring: {error}"
            return
        for sample in samples:
            period = min((sample.timeStamp - self._last) / 1e6, MAX_SAMPLE_PERIOD)
            self._busy += sample.sampleValue.uiVal / 100 * period
            self._last = sample.timeStamp

    def busy_seconds(self) -> float | None:
        return self._busy


def cpu_times(pid: int) -> tuple[int, int, float] | None:
    """(start time in ticks since boot, parent pid, CPU seconds of the process and of the children it reaped) from
    /proc/PID/stat; None when it is gone. A zombie still answers, with its final times."""
    try:
        text = Path(f"/proc/{pid}/stat").read_bytes()  # not text: a process names itself with any bytes but NUL
    except OSError:
        return None
    fields = text[text.rindex(b")") + 2:].split()  # after the command name, which may hold spaces, ')' and newlines
    utime, stime, cutime, cstime = map(int, fields[11:15])
    return int(fields[19]), int(fields[1]), (utime + stime + cutime + cstime) / CLOCK_TICKS


def descendants(root: int) -> set[int]:
    """`root` and every process below it, by the parent pids of /proc/PID/stat. In the sandbox these are all its
    processes: an orphan goes to the sandbox's init (bwrap's, below `root`), and no process can leave."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if entry.name.isdigit() and (read := cpu_times(int(entry.name))):
            children.setdefault(read[1], []).append(int(entry.name))
    found, todo = set(), [root]
    while todo:
        pid = todo.pop()
        if pid not in found:
            found.add(pid)
            todo += children.get(pid, [])
    return found


class CpuMeter(Meter):
    """CPU seconds of the trial's processes (`processes()` lists them: trial.measured_processes),
    the evaluation (`spare_pid`) excepted: all their seconds, so the trial makes it before it starts the training.
    A process that is gone keeps what was last read of it, unless the parent that reaped it is still measured
    (its reaped children's seconds then hold it)."""

    def __init__(self, processes: Callable[[], Iterable[int]], spare_pid: int | None) -> None:
        self.processes, self.spare = processes, spare_pid
        # (pid, start time) -> (parent pid, seconds) at its last reading: the start time tells a pid used again
        self._seen: dict[tuple[int, int], tuple[int, float]] = {}
        self._busy = 0.0

    def poll(self) -> None:
        listed = set(self.processes())
        live: dict[int, int] = {}  # pid -> start time, of the processes read now
        # the processes seen before are read too: one may leave the list (unsandboxed, a zombie loses its marker
        # with its environment), not its times
        for pid in listed | {pid for pid, _ in self._seen}:
            read = cpu_times(pid) if pid != self.spare else None
            if read and (pid in listed or (pid, read[0]) in self._seen):
                start, ppid, seconds = read
                self._seen[pid, start] = ppid, seconds
                live[pid] = start
        total = sum(seconds for (pid, start), (ppid, seconds) in self._seen.items()
                    if live.get(pid) == start or ppid not in live)
        self._busy = max(self._busy, total)  # a child between its exit and its parent's reaping counts nowhere

    def busy_seconds(self) -> float | None:
        return self._busy


def meter_for(device: str, processes: Callable[[], Iterable[int]], spare_pid: int | None) -> Meter:
    """The meter of a trial's device: NVML on a GPU (the first entry of CUDA_VISIBLE_DEVICES, an NVML index in
    PCI bus order, as trial.gpu_name asks nvidia-smi), the CPU seconds of `processes()` on the CPU."""
    if device != "cuda":
        return CpuMeter(processes, spare_pid)
    first = os.environ.get("CUDA_VISIBLE_DEVICES", "").split(",")[0]
    if not first.isdigit():
        return Unmeasured(f"CUDA_VISIBLE_DEVICES names no GPU index ({first!r})")
    try:
        return GpuMeter(int(first))
    except Exception as error:  # no NVML library, an old driver, sampling unsupported (MIG): all the same here
        return Unmeasured(f"NVML unavailable ({type(error).__name__}: {error})")
