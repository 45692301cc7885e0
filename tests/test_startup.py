"""What a trial's start-up may spend (scheduler/startup.py): the meters of device work before the first progress
line and the check that refuses too much of it. No Ray, no training: the GPU meter reads a fake NVML, the CPU meter
real processes. The attack it stops runs in tests/test_attacks.py (test_training_before_the_first_progress_line...)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from types import SimpleNamespace

import pytest

from scheduler import startup
from scheduler.startup import FREE_SECONDS, CpuMeter, GpuMeter, Unmeasured, meter_for, verdict
from scheduler.trial import MARK, StartupWork, marked, measured_processes

from conftest import wait_for

# A process that burns `seconds` of CPU time, then says so and sleeps (so that a meter can read it alive)
BURN = ("import sys, time\nstarted = time.process_time()\nwhile time.process_time() - started < float(sys.argv[1]):\n"
        "    pass\nprint('burnt', flush=True)\ntime.sleep(float(sys.argv[2]))\n")
# A parent that runs BURN as its child and waits for it: the child's seconds come back in the parent's reaped times
PARENT = ("import subprocess, sys, time\nsubprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2], '0'])\n"
          "print('reaped', flush=True)\ntime.sleep(float(sys.argv[3]))\n")
BURN_SECONDS = 1.0
PYTHON_START = 0.3  # CPU seconds of a process's own start and end (python -c: 0.03 s on 2 cores)


class FakeNvml:
    """What GpuMeter uses of pynvml, with samples the test adds: (timestamp in µs, percent busy)."""

    NVML_GPU_UTILIZATION_SAMPLES = 1
    NVML_ERROR_NOT_FOUND = 6
    NVML_ERROR_NOT_SUPPORTED = 3

    class NVMLError(Exception):
        def __init__(self, value: int) -> None:
            super().__init__(f"NVML error {value}")
            self.value = value

    def __init__(self) -> None:
        self.samples: list[tuple[int, int]] = []
        self.failure: int | None = None
        self.handles: list[int] = []

    def add(self, start_s: float, seconds: float, percent: int, every: float = 0.2) -> None:
        steps = round(seconds / every)
        self.samples += [(round((start_s + every * (i + 1)) * 1e6), percent) for i in range(steps)]

    def nvmlDeviceGetHandleByIndex(self, index: int) -> str:
        self.handles.append(index)
        return f"gpu{index}"

    def nvmlDeviceGetSamples(self, handle: str, kind: int, last_seen: int):
        assert kind == self.NVML_GPU_UTILIZATION_SAMPLES
        if self.failure is not None:
            raise self.NVMLError(self.failure)
        newer = [SimpleNamespace(timeStamp=t, sampleValue=SimpleNamespace(uiVal=p)) for t, p in self.samples
                 if t > last_seen]
        if not newer:  # as NVML answers when it holds no sample after last_seen
            raise self.NVMLError(self.NVML_ERROR_NOT_FOUND)
        return 0, newer


@pytest.fixture
def fake_nvml(monkeypatch) -> FakeNvml:
    fake = FakeNvml()
    monkeypatch.setattr(startup, "nvml", lambda: fake)
    return fake


def test_the_gpu_meter_adds_up_new_samples_after_its_start(fake_nvml):
    fake_nvml.add(0.0, 5.0, 100)                   # before the meter: not counted
    meter = GpuMeter(0)
    assert meter.busy_seconds() == 0.0
    meter.poll()                                   # nothing new: NVML's "not found"
    assert meter.busy_seconds() == 0.0
    fake_nvml.add(5.0, 2.0, 50)                    # 2 s half busy
    meter.poll()
    assert meter.busy_seconds() == pytest.approx(1.0)
    meter.poll()                                   # the same samples are not counted twice
    assert meter.busy_seconds() == pytest.approx(1.0)
    fake_nvml.add(7.0, 3.0, 100)
    fake_nvml.add(10.0, 1.0, 0)
    meter.poll()
    assert meter.busy_seconds() == pytest.approx(4.0)
    fake_nvml.samples.append((round(20.0 * 1e6), 100))  # after a 9 s gap: one period of at most MAX_SAMPLE_PERIOD
    meter.poll()
    assert meter.busy_seconds() == pytest.approx(4.0 + startup.MAX_SAMPLE_PERIOD)


def test_the_gpu_meter_on_a_fresh_buffer_counts_at_most_a_period_for_its_first_sample(fake_nvml):
    meter = GpuMeter(0)
    fake_nvml.add(1000.0, 1.0, 100)
    meter.poll()
    assert meter.busy_seconds() == pytest.approx(0.8 + startup.MAX_SAMPLE_PERIOD)


def test_a_gpu_is_measured_by_its_nvml_index_or_not_at_all(fake_nvml, monkeypatch):
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,1")
    assert isinstance(meter_for("cuda", list, None), GpuMeter) and fake_nvml.handles == [3]
    fake_nvml.failure = fake_nvml.NVML_ERROR_NOT_SUPPORTED  # no utilisation samples (a MIG slice, say)
    unmeasured = meter_for("cuda", list, None)
    assert isinstance(unmeasured, Unmeasured) and unmeasured.busy_seconds() is None
    assert unmeasured.unmeasured.startswith("NVML unavailable (NVMLError: NVML error 3)"), unmeasured.unmeasured
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "GPU-1234")
    assert "names no GPU index" in meter_for("cuda", list, None).unmeasured


def test_a_gpu_meter_whose_nvml_fails_later_stops_the_run(fake_nvml):
    """NVML that worked at the start and fails during it: the run cannot be checked, so it is not run on (the
    check must not be a thing a candidate can turn off)."""
    meter = GpuMeter(0)
    fake_nvml.add(0.0, 1.0, 100)
    meter.poll()
    fake_nvml.failure = 999
    work = StartupWork(meter, "cuda")
    assert work.overdue(None) == work.reason and "NVML failed while measuring: NVML error 999" in work.reason
    assert work.reason.endswith("the run could not be checked; submit it again") and work.seconds() == 1.0


def test_no_nvml_on_a_gpu_means_no_check(monkeypatch):
    def missing():
        raise OSError("libnvidia-ml.so.1: cannot open shared object file")

    monkeypatch.setattr(startup, "nvml", missing)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0")
    meter = meter_for("cuda", list, None)
    assert meter.unmeasured == "NVML unavailable (OSError: libnvidia-ml.so.1: cannot open shared object file)"
    assert verdict(meter.busy_seconds(), "cuda") is None


def marked_python(mark: str, code: str, *args: object) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", code, *map(str, args)], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, MARK: mark, "OMP_NUM_THREADS": "1"})


def read_until(meter: CpuMeter, proc: subprocess.Popen, line: str) -> None:
    """Poll the meter every 0.2 s until the process prints `line`, as the trial reads it at every look, and once
    more after it."""
    os.set_blocking(proc.stdout.fileno(), False)
    seen = []

    def printed() -> bool:
        meter.poll()
        seen.append(proc.stdout.readline())
        return any(text.strip() == line for text in seen)

    wait_for(printed, 30, f"{line!r} from the burning process")
    meter.poll()


def test_the_cpu_meter_counts_the_marked_processes_and_keeps_what_ended(tmp_path):
    mark = f"{tmp_path}/burn"
    spared = marked_python(mark, BURN, BURN_SECONDS, 30)            # the evaluation, say: never counted
    other = marked_python(f"{mark}-other", BURN, BURN_SECONDS, 30)  # another trial's
    ended = marked_python(mark, BURN, BURN_SECONDS, 1)              # burns, sleeps a second, exits
    meter = CpuMeter(lambda: marked(mark), spared.pid)
    later = None
    try:
        read_until(meter, ended, "burnt")
        assert BURN_SECONDS <= meter.busy_seconds() <= BURN_SECONDS + PYTHON_START, meter.busy_seconds()
        ended.wait()  # reaped by this test, which the meter does not measure
        later = marked_python(mark, BURN, BURN_SECONDS, 30)
        read_until(meter, later, "burnt")
        busy = meter.busy_seconds()
        assert 2 * BURN_SECONDS <= busy <= 2 * (BURN_SECONDS + PYTHON_START), busy  # the one that ended counts too
    finally:
        for proc in (spared, other, ended, later):
            if proc:
                proc.kill()
                proc.wait()


def test_the_cpu_meter_counts_a_reaped_child_once(tmp_path):
    """The child burns, exits and is reaped by its marked parent: its seconds move to the parent's reaped
    times, and count once."""
    mark = f"{tmp_path}/tree"
    parent = marked_python(mark, PARENT, BURN, BURN_SECONDS, 30)
    meter = CpuMeter(lambda: marked(mark), None)
    try:
        read_until(meter, parent, "reaped")
        busy = meter.busy_seconds()
        assert BURN_SECONDS <= busy <= BURN_SECONDS + PYTHON_START, busy
    finally:
        parent.kill()
        parent.wait()


def test_work_above_the_free_seconds_is_refused_and_below_is_not():
    assert verdict(None, "cuda") is None and verdict(0.0, "cpu") is None
    assert verdict(FREE_SECONDS["cuda"], "cuda") is None and verdict(FREE_SECONDS["cpu"], "cpu") is None
    reason = verdict(23.44, "cuda")
    assert reason == ("the GPU worked 23.4 s before the first progress line (10 s allowed for compilation and the "
                      "first steps; training or autotuning's benchmarks there are work outside the budget): train "
                      "only inside the budget, through run.step"), reason
    assert verdict(FREE_SECONDS["cpu"] + 0.1, "cpu").startswith(
        f"the CPU worked {FREE_SECONDS['cpu'] + 0.1:.1f} s before the first progress line")


class Scripted(startup.Meter):
    """A meter whose readings the test scripts: each poll takes the next."""

    def __init__(self, readings: list[float]) -> None:
        self.readings, self.busy = readings, 0.0

    def poll(self) -> None:
        self.busy = self.readings.pop(0)

    def busy_seconds(self) -> float | None:
        return self.busy


def test_the_trial_reads_its_meter_until_the_first_look_after_the_first_progress_line():
    work = StartupWork(Scripted([2.0, 9.0, 9.96, 30.0]), "cuda")
    assert work.overdue(None) is None and work.overdue(None) is None
    first_progress = time.monotonic()
    assert work.overdue(first_progress) is None and work.settled   # 9.96 s: allowed, and read for the last time
    assert work.overdue(first_progress) is None                    # never read again: training is the budget's
    assert work.seconds() == 10.0 and work.reason is None

    silent = StartupWork(Scripted([4.0, 12.0]), "cuda")
    assert silent.overdue(None) is None
    assert silent.overdue(None) == silent.reason and silent.reason.startswith("the GPU worked 12.0 s")
    assert StartupWork(Unmeasured("no NVML"), "cuda").seconds() is None


# A parent that starts BURN with an empty environment (as `env -i` does, or os.execve with a new one): the child
# carries no marker. It waits, so the child is not reaped before the meter's last look.
DROPS_THE_MARK = ("import subprocess, sys, time\n"
                  "subprocess.Popen([sys.executable, '-c', sys.argv[1], sys.argv[2], sys.argv[3]], env={})\n"
                  "time.sleep(float(sys.argv[3]))\n")
# A parent that never waits for its children (SIGCHLD ignored: the kernel reaps them at once) and runs BURN twice,
# one after the other: an auto-reaped child's seconds reach no one's reaped times
NEVER_WAITS = ("import signal, subprocess, sys, time\nsignal.signal(signal.SIGCHLD, signal.SIG_IGN)\n"
               "for _ in range(2):\n    subprocess.run([sys.executable, '-c', sys.argv[1], sys.argv[2], '0.5'])\n"
               "print('both', flush=True)\ntime.sleep(float(sys.argv[3]))\n")


def kill_session(proc: subprocess.Popen) -> None:
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def test_the_cpu_meter_counts_a_child_that_dropped_the_marker(tmp_path):
    """(Was: the meter read the processes that carried the trial's marker, so a child started with an empty
    environment trained unseen; run_trial's meter reads the training's process tree.)"""
    mark = f"{tmp_path}/hides"
    parent = subprocess.Popen([sys.executable, "-c", DROPS_THE_MARK, BURN, str(BURN_SECONDS), "30"],
                              stdout=subprocess.PIPE, text=True, start_new_session=True,  # its child: killpg
                              env={**os.environ, MARK: mark, "OMP_NUM_THREADS": "1"})
    meter = CpuMeter(lambda: measured_processes(parent.pid, mark, sandboxed=True), None)
    try:
        read_until(meter, parent, "burnt")
        assert [parent.pid] == marked(mark)  # the child is not marked ...
        busy = meter.busy_seconds()
        assert BURN_SECONDS <= busy <= BURN_SECONDS + 2 * PYTHON_START, busy  # ... but measured
    finally:
        kill_session(parent)


def test_a_sandboxed_trial_measures_its_process_tree_and_never_a_forged_marker(tmp_path):
    """Another trial's candidate can start a process carrying this trial's marker (the trial's folder: a baseline's
    control run's is `runs/base-SHA12-cN`, all of it known to an agent). (Was: the meter counted it, and an honest
    run was refused.) In the sandbox only the training's own tree counts. Unsandboxed the marked processes count
    too: a double fork leaves the tree there."""
    mark = f"{tmp_path}/base-0123456789ab-c1"
    training = marked_python(mark, "import time; time.sleep(30)")
    forger = marked_python(mark, "import time; time.sleep(30)")
    try:
        wait_for(lambda: len(marked(mark)) == 2, 10, "two marked processes")
        assert measured_processes(training.pid, mark, sandboxed=True) == {training.pid}
        assert measured_processes(training.pid, mark, sandboxed=False) == {training.pid, forger.pid}
    finally:
        for proc in (training, forger):
            proc.kill()
            proc.wait()


def test_a_command_name_of_any_bytes_is_read(tmp_path):
    """A process may name itself with any bytes but NUL (prctl PR_SET_NAME). (Was: a name that is not UTF-8 made
    the meter's reading raise, and the trial with it.)"""
    mark = f"{tmp_path}/named"
    named = marked_python(mark, "import ctypes, time\nctypes.CDLL(None).prctl(15, b'\\xff) 1 2\\n(', 0, 0, 0)\n"
                                "print('named', flush=True)\ntime.sleep(30)\n")
    try:
        assert named.stdout.readline() == "named\n"
        assert startup.descendants(named.pid) == {named.pid}
        meter = CpuMeter(lambda: measured_processes(named.pid, mark, sandboxed=False), None)
        meter.poll()
        assert 0 < meter.busy_seconds() < PYTHON_START
    finally:
        named.kill()
        named.wait()


@pytest.mark.xfail(strict=True, reason="open (CPU mode only): a child whose parent ignores SIGCHLD is reaped by "
                   "the kernel at once, and its CPU seconds reach no parent's reaped times; /proc cannot count it")
def test_the_cpu_meter_counts_children_that_are_never_waited_for(tmp_path):
    mark = f"{tmp_path}/never-waits"
    parent = marked_python(mark, NEVER_WAITS, BURN, BURN_SECONDS, 30)
    meter = CpuMeter(lambda: measured_processes(parent.pid, mark, sandboxed=True), None)
    try:
        read_until(meter, parent, "both")
        assert meter.busy_seconds() >= 2 * BURN_SECONDS, meter.busy_seconds()
    finally:
        parent.kill()
        parent.wait()
