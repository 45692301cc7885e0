"""The sandbox a candidate runs in (scheduler/sandbox.py): each promise, tried as an attack from inside.

Every test here starts a real bwrap (the sandboxes run `python -c` or `sh -c`),
so they need a bwrap that works on this machine, as CI's and the GPU machine's do.
The launch folders are made under /var/tmp, not under pytest's tmp_path: that lies
in /tmp, which the sandbox replaces by a private one anyway, so hiding the launch
root there would prove nothing.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import textwrap
from pathlib import Path

import pytest

from conftest import ROOT, wait_for
from scheduler import sandbox
from scheduler.sandbox import PACKAGE_PARENT, Sandbox, SandboxError, gpus, launch_folders, resolve
from scheduler.trial import DATA_CACHE_ENV, MARK, marked, training_command

OUTSIDE_TMP = Path("/var/tmp")  # where the launch folders go: outside the /tmp the sandbox replaces
GONE_AFTER = 10.0               # seconds for the kernel to take down a killed sandbox's processes


@pytest.fixture
def launch():
    """A launch's folders with something secret in each place a candidate must not see, and one trial's
    work folder. The user's home is the real one unless a test fakes it."""
    base = Path(tempfile.mkdtemp(prefix="sandbox-test-", dir=OUTSIDE_TMP)).resolve()
    root, data, ray_tmp = base / "root", base / "root" / "data", base / "ray"
    work = root / "results" / "runs" / "t1" / "work"
    for folder in (work, root / "results" / "runs" / "t2" / "work", data, root / "candidates", ray_tmp):
        folder.mkdir(parents=True)
    files = {"train.py": "baseline", "results/trials.parquet": "rows", "results/runs/t1/log.txt": "trusted log",
             "results/runs/t2/work/train.py": "another trial", "candidates/c.py": "queued",
             "data/val.bin": "validation", "data/test.bin": "test", "data/train.bin": "train split"}
    for name, text in files.items():
        (root / name).write_text(text)
    (ray_tmp / "session_latest").write_text("ray session")
    yield {"root": root, "data": data, "work": work, "ray_tmp": ray_tmp, "base": base}
    shutil.rmtree(base, ignore_errors=True)


def trial_box(launch: dict, **options) -> Sandbox:
    return Sandbox.for_trial(launch["work"], launch["data"] / "train.bin", launch["root"], launch["data"],
                             ray_tmp=launch["ray_tmp"], **options)


def base_env(box: Sandbox) -> dict[str, str]:
    """What the trial would give: a small allowlist, the package on PYTHONPATH, and the sandbox's additions."""
    return {"PATH": os.environ["PATH"], "PYTHONPATH": PACKAGE_PARENT, **box.env}


def run_inside(box: Sandbox, code: str, env: dict | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """Run python `code` in the sandbox; it prints JSON on its last line."""
    return subprocess.run(box.command([sys.executable, "-c", textwrap.dedent(code)]), cwd=box.work,
                          env=env or base_env(box), capture_output=True, text=True, timeout=timeout)


def answer(done: subprocess.CompletedProcess):
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_hidden_files_cannot_be_read_and_the_train_split_can(launch, monkeypatch):
    home = launch["base"] / "home"  # a fake home: the test must not write into the real one
    (home / ".ray").mkdir(parents=True)
    (home / ".ray" / "auth_token").write_text("token")
    monkeypatch.setenv("HOME", str(home))
    box = trial_box(launch)
    root = launch["root"]
    secrets = [root / "train.py", root / "results" / "trials.parquet", root / "results" / "runs" / "t1" / "log.txt",
               root / "results" / "runs" / "t2" / "work" / "train.py", root / "candidates" / "c.py",
               launch["data"] / "val.bin", launch["data"] / "test.bin", home / ".ray" / "auth_token",
               launch["ray_tmp"] / "session_latest"]
    seen = answer(run_inside(box, f"""
        import json, os
        def read(path):
            try:
                return open(path).read()
            except OSError as e:
                return type(e).__name__
        print(json.dumps({{"secrets": [read(p) for p in {[str(p) for p in secrets]!r}],
                          "train": read({str(launch["data"] / "train.bin")!r}),
                          "root": sorted(os.listdir({str(root)!r})), "runs": os.listdir({str(root / "results/runs")!r}),
                          "data": os.listdir({str(launch["data"])!r})}}))
        """))
    assert seen["secrets"] == ["FileNotFoundError"] * len(secrets)
    assert seen["train"] == "train split"
    assert seen["root"] == ["data", "results"] and seen["runs"] == ["t1"] and seen["data"] == ["train.bin"]


def test_a_node_reading_its_data_elsewhere_shows_no_copy_of_it(launch, monkeypatch):
    """On a cluster's worker node the trial reads the splits from the node's data cache (or its own data
    folder), not the launch's data folder. Its candidate neither sees nor writes the cache (this corpus's
    validation split, other corpora) nor the launch's data folder (on a shared file system), also where a
    system folder shows them: the test makes its own folder one. Red team: the cache of a node whose cache or
    data lay under /opt was in plain sight."""
    base, root = launch["base"], launch["root"]
    monkeypatch.setattr(sandbox, "SYSTEM_FOLDERS", (*sandbox.SYSTEM_FOLDERS, base))
    launch_data, cache = base / "launch-data", base / "cache"  # launch --data-dir outside the root; the cache
    monkeypatch.setenv(DATA_CACHE_ENV, str(cache))
    for folder in (launch_data, cache / "sha", cache / "other-sha"):
        folder.mkdir(parents=True)
        (folder / "train.bin").write_text("train split")
        (folder / "val.bin").write_text("validation")
    config = {"sandbox": "bwrap", "data_dir": str(cache / "sha"), "root": str(root), "device": "cpu"}
    command, env = training_command(config, launch["work"], {"PATH": os.environ["PATH"]}, str(launch_data))
    reads = [str(p) for p in (cache / "sha" / "val.bin", cache / "other-sha" / "val.bin", launch_data / "val.bin")]
    writes = [str(p) for p in (cache / "sha" / "train.bin", cache / "sha" / "meta.json", cache / "new" / "val.bin",
                               launch_data / "val.bin", root / "results" / "trials.parquet")]
    (launch["work"] / "train.py").write_text(textwrap.dedent(f"""
        import json, os
        def attempt(path, mode):
            try:
                if mode == "a":
                    os.makedirs(os.path.dirname(path), exist_ok=True)
                with open(path, mode) as f:
                    return f.read() if mode == "r" else "written"
            except OSError as e:
                return type(e).__name__
        print(json.dumps({{"read": [attempt(p, "r") for p in {reads!r}], "wrote": [attempt(p, "a") for p in {writes!r}],
                          "train": attempt({str(cache / "sha" / "train.bin")!r}, "r")}}))
        """))
    seen = answer(subprocess.run(command, cwd=launch["work"], env=env, capture_output=True, text=True, timeout=120))
    assert seen["read"] == ["FileNotFoundError"] * len(reads)
    assert "written" not in seen["wrote"], seen["wrote"]
    assert seen["train"] == "train split"
    for folder in (launch_data, cache / "sha", cache / "other-sha"):
        assert sorted(p.name for p in folder.iterdir()) == ["train.bin", "val.bin"]
        assert (folder / "train.bin").read_text() == "train split"


def test_linked_folders_stay_hidden_at_both_ends(launch):
    """results/ and data/ as links to other disks: hidden where they lead, and the work folder and train split
    still work at the paths through the links that the trial gives the candidate."""
    base, root = launch["base"], launch["root"]
    for name in ("results", "data"):
        shutil.move(root / name, base / f"disk-{name}")
        (root / name).symlink_to(base / f"disk-{name}")
    box = Sandbox.for_trial(launch["work"], launch["data"] / "train.bin", root, launch["data"],
                            ray_tmp=launch["ray_tmp"])
    paths = [str(p) for p in (base / "disk-results" / "trials.parquet", base / "disk-data" / "val.bin",
                              root / "results" / "trials.parquet", root / "data" / "val.bin",
                              base / "disk-results" / "runs" / "t2" / "work" / "train.py")]
    seen = answer(run_inside(box, f"""
        import json, os
        open("out.txt", "w").write("made")
        print(json.dumps({{"seen": [p for p in {paths!r} if os.path.exists(p)],
                          "train": open({str(launch["data"] / "train.bin")!r}).read()}}))
        """))
    assert seen["seen"] == [] and seen["train"] == "train split"
    assert (base / "disk-results" / "runs" / "t1" / "work" / "out.txt").read_text() == "made"


def test_it_writes_only_its_work_folder_and_its_tmp(launch):
    box = trial_box(launch)
    targets = ["/etc/sandbox-test", str(launch["root"] / "train.py"), str(launch["root"] / "new"),
               str(launch["data"] / "train.bin"), str(Path(sandbox.__file__).parent / "protocol.py"),
               str(Path(sysconfig.get_paths()["purelib"]) / "planted.py"), str(Path.home() / "planted"),
               str(launch["ray_tmp"] / "planted")]
    seen = answer(run_inside(box, f"""
        import json
        def write(path):
            try:
                with open(path, "a") as f:
                    f.write("x")
                return "written"
            except OSError as e:
                return type(e).__name__
        print(json.dumps({{"denied": [write(p) for p in {targets!r}],
                          "work": write("out.txt"), "tmp": write("/tmp/x"), "shm": write("/dev/shm/x")}}))
        """))
    assert "written" not in seen["denied"], dict(zip(targets, seen["denied"]))
    assert seen["work"] == seen["tmp"] == seen["shm"] == "written"
    assert (launch["work"] / "out.txt").read_text() == "x"
    assert (launch["data"] / "train.bin").read_text() == "train split"


def test_tmp_and_shm_are_private(launch):
    """The host's /tmp and /dev/shm are not visible inside. /tmp starts empty but for the folders that lead to
    what is put back read-only when it lies under /tmp (the interpreter or the project, as in a CI clone there)."""
    box = trial_box(launch)
    planted = [Path(tempfile.mkstemp(prefix="host-", dir=folder)[1]) for folder in ("/tmp", "/dev/shm")]
    under_tmp = {p.relative_to("/tmp").parts[0] for p in (*box.exposed, *box.readable, box.work)
                 if sandbox.inside(p, Path("/tmp")) and p != Path("/tmp")}
    try:
        seen = answer(run_inside(box, f"""
            import json, os
            print(json.dumps([os.path.exists(p) for p in {[str(p) for p in planted]!r}] + [os.listdir("/tmp")]))
            """))
        assert seen[:2] == [False, False] and set(seen[2]) <= under_tmp, (seen, under_tmp)
    finally:
        for path in planted:
            path.unlink()


def test_host_processes_cannot_be_seen_or_signalled(launch):
    host = subprocess.Popen(["sleep", "60"])
    try:
        seen = answer(run_inside(trial_box(launch), f"""
            import json, os
            pids = [int(p) for p in os.listdir("/proc") if p.isdigit()]
            try:
                os.kill({host.pid}, 9)
                signalled = "signalled"
            except OSError as e:
                signalled = type(e).__name__
            print(json.dumps({{"pids": pids, "signalled": signalled}}))
            """))
        assert host.pid not in seen["pids"] and max(seen["pids"]) < 100  # bwrap's init, python, a few of its own
        assert seen["signalled"] == "ProcessLookupError" and host.poll() is None
    finally:
        host.kill()
        host.wait()


def test_no_network(launch):
    with socket.create_server(("127.0.0.1", 0)) as server:
        port = server.getsockname()[1]
        socket.create_connection(("127.0.0.1", port), timeout=5).close()  # the host can connect
        seen = answer(run_inside(trial_box(launch), f"""
            import json, socket
            try:
                socket.create_connection(("127.0.0.1", {port}), timeout=5)
                result = "connected"
            except OSError as e:
                result = type(e).__name__
            print(json.dumps(result))
            """))
    assert seen != "connected"


def test_no_capabilities_no_remount_no_new_user_namespace(launch):
    """Also as root: without capabilities nothing can be remounted writable or unmounted to uncover what a
    hidden folder covers, and no user namespace (where it would hold capabilities again) can be made. The
    host-wide knobs in /proc/sys and /sys are read-only."""
    root = str(launch["root"])
    seen = answer(run_inside(trial_box(launch), f"""
        import ctypes, json, os
        libc = ctypes.CDLL(None, use_errno=True)
        MS_REMOUNT, MS_BIND, MNT_DETACH, CLONE_NEWUSER, CLONE_NEWNS = 32, 4096, 2, 0x10000000, 0x20000
        status = dict(line.split(":", 1) for line in open("/proc/self/status"))
        caps = {{k: int(status[k], 16) for k in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb")}}
        calls = {{
            "remount /": libc.mount(b"none", b"/", None, MS_REMOUNT | MS_BIND, None),
            "remount root": libc.mount(b"none", {root!r}.encode(), None, MS_REMOUNT | MS_BIND, None),
            "umount root": libc.umount2({root!r}.encode(), MNT_DETACH),
            "unshare user": libc.unshare(CLONE_NEWUSER),
            "unshare mount": libc.unshare(CLONE_NEWNS),
        }}
        def opens_for_writing(path):
            try:
                os.close(os.open(path, os.O_WRONLY))
                return True
            except OSError:
                return False
        knobs = [p for p in ("/proc/sys/kernel/core_pattern", "/proc/sys/vm/swappiness", "/sys/kernel/mm/ksm/run",
                             "/proc/sysrq-trigger") if opens_for_writing(p)]
        print(json.dumps({{"caps": caps, "calls": calls, "root": os.listdir({root!r}),
                          "no_new_privs": status["NoNewPrivs"].strip(), "knobs": knobs}}))
        """))
    assert set(seen["caps"].values()) == {0}
    assert set(seen["calls"].values()) == {-1}, seen["calls"]
    assert seen["knobs"] == []  # as root, a sysctl is writable without capabilities: core_pattern runs a program
    assert "train.py" not in seen["root"] and seen["no_new_privs"] == "1"
    root_cmd = subprocess.run(trial_box(launch).command(["sh", "-c", "mount -o remount,rw /; touch /planted"]),
                              capture_output=True, text=True, timeout=60)
    assert root_cmd.returncode != 0 and not Path("/planted").exists()


def fake_proc(tmp_path: Path, gpus: list[tuple[str, int]]) -> Path:
    """A /proc with the driver's information files of GPUs at (bus location, device minor)."""
    for bus, minor in gpus:
        folder = tmp_path / "proc" / "driver" / "nvidia" / "gpus" / bus
        folder.mkdir(parents=True)
        (folder / "information").write_text(
            f"Model: \t\t NVIDIA H200\nIRQ:   \t\t 42\nGPU UUID: \t GPU-{minor}\nBus Location: \t {bus}\n"
            f"Device Minor: \t {minor}\nGPU Excluded:\t No\n")
    return tmp_path / "proc"


def test_the_gpu_index_is_found_by_pci_bus_order(tmp_path):
    proc = fake_proc(tmp_path, [("0000:c1:00.0", 0), ("0000:18:00.0", 3), ("0000:9a:00.0", 1), ("0000:2a:00.0", 2)])
    assert gpus("0", proc) == [(3, "GPU-3")] and gpus("1", proc) == [(2, "GPU-2")]
    assert gpus("3", proc) == [(0, "GPU-0")]
    assert gpus("2,0", proc) == [(1, "GPU-1"), (3, "GPU-3")]
    assert gpus("2", tmp_path / "no-proc") == [(2, None)]  # no driver folder: index k is minor k
    with pytest.raises(SandboxError, match="past the 4"):
        gpus("4", proc)
    with pytest.raises(SandboxError, match="indices"):
        gpus("GPU-3", proc)


def test_only_its_own_gpu_node_is_bound(launch, tmp_path):
    proc = fake_proc(tmp_path, [("0000:18:00.0", 1), ("0000:2a:00.0", 0)])
    dev = tmp_path / "dev"
    dev.mkdir()
    for name in ("nvidia0", "nvidia1", "nvidiactl", "nvidia-uvm", "nvidia-modeset"):  # no nvidia-uvm-tools
        (dev / name).write_text(name)
    box = trial_box(launch, gpu="1", proc_root=proc, dev_root=dev)
    argv = box.command(["true"])
    bound = [argv[i + 1:i + 3] for i, flag in enumerate(argv) if flag == "--dev-bind"]
    assert bound == [[str(dev / name), f"/dev/{name}"] for name in ("nvidia0", "nvidiactl", "nvidia-uvm")]
    seen = answer(run_inside(box, """
        import json, os
        print(json.dumps(sorted(name for name in os.listdir("/dev") if name.startswith("nvidia"))))
        """))
    assert seen == ["nvidia-uvm", "nvidia0", "nvidiactl"]
    assert box.env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID" and box.env["CUDA_VISIBLE_DEVICES"] == "GPU-0"
    assert trial_box(launch, gpu="1", proc_root=tmp_path / "no-proc").env["CUDA_VISIBLE_DEVICES"] == "0"
    assert trial_box(launch).devices() == [] and trial_box(launch, gpu="").devices() == []  # a CPU trial


def test_the_sandbox_adds_nothing_to_the_environment(launch, monkeypatch, tmp_path):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "do-not-pass")
    box = trial_box(launch, gpu="0", proc_root=tmp_path)  # no driver folder there
    assert set(box.env) == {"HOME", "TMPDIR", "TORCHINDUCTOR_CACHE_DIR", "TRITON_CACHE_DIR", "CUDA_DEVICE_ORDER",
                            "CUDA_VISIBLE_DEVICES"}
    assert all(value.startswith("/tmp") for key, value in box.env.items() if not key.startswith("CUDA_"))
    given = {**base_env(box), "LANG": "C.UTF-8"}  # a locale: else python itself adds LC_CTYPE
    seen = answer(run_inside(box, "import json, os; print(json.dumps(dict(os.environ)))", env=given))
    assert seen == {**given, "PWD": str(box.work)}  # bwrap's --chdir sets PWD


def test_the_sandbox_dies_whole_with_its_bwrap(launch):
    """Children that left the session (setsid) or were double-forked die with the sandbox: its pid namespace
    ends with its init, which dies with bwrap."""
    box = trial_box(launch)
    mark = f"sandbox-test-{launch['base'].name}"
    fork_setsid_fork = "import os, time; os.fork() or (os.setsid(), os.fork() or time.sleep(300))"
    script = ("setsid sleep 300 & "                          # a new session
              "sh -c 'sleep 300 &' & "                       # a double fork: its parent exits at once
              f"{sys.executable} -c '{fork_setsid_fork}' & "  # both
              "sleep 1; echo ready; wait")
    proc = subprocess.Popen(box.command(["sh", "-c", script]), cwd=box.work, env={**base_env(box), MARK: mark},
                            stdout=subprocess.PIPE, start_new_session=True)
    try:
        assert proc.stdout.readline() == b"ready\n"
        escaped = wait_for(lambda: len(marked(mark)) >= 5 and marked(mark), 10, "the sandbox's processes")
        os.killpg(proc.pid, signal.SIGKILL)  # what trial.kill_group ends with
        proc.wait()
        wait_for(lambda: not marked(mark), GONE_AFTER, f"the end of {len(escaped)} sandboxed processes")
    finally:
        for pid in marked(mark):  # only when the test fails
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def fresh_probe():
    sandbox.bwrap_path.cache_clear()
    yield
    sandbox.bwrap_path.cache_clear()


def test_resolve_refuses_when_no_sandbox_can_be_made(fresh_probe, monkeypatch):
    assert resolve("none") == "none"
    assert resolve("auto") == resolve("bwrap") == "bwrap"  # this machine makes sandboxes
    with pytest.raises(SandboxError, match="unknown sandbox mode"):
        resolve("docker")
    sandbox.bwrap_path.cache_clear()
    monkeypatch.setattr(sandbox, "bwrap_candidates", lambda: ["/bin/false"])
    for mode in ("auto", "bwrap"):
        with pytest.raises(SandboxError) as raised:
            resolve(mode)
        assert "/bin/false: exit code 1" in str(raised.value) and "--sandbox none" in str(raised.value)
    assert resolve("none") == "none"
    monkeypatch.setattr(sandbox, "bwrap_candidates", lambda: [])
    with pytest.raises(SandboxError, match="no bwrap found"):
        resolve("auto")


def test_the_launch_root_is_never_put_back_whole(monkeypatch):
    """Launched from the project itself, with the project on PYTHONPATH (a sys.path entry that is the root):
    the scheduler package and the Python environment come back, the root and its other folders do not."""
    root = Path(PACKAGE_PARENT)
    monkeypatch.setenv("PYTHONPATH", PACKAGE_PARENT)
    sandbox.interpreter_paths.cache_clear()
    assert root in sandbox.interpreter_paths()
    hidden, exposed = launch_folders(root, root / "data")
    sandbox.interpreter_paths.cache_clear()
    assert root / "scheduler" in exposed and root not in hidden + exposed  # shown by no system folder either
    assert not [p for p in exposed if root in (p, *p.parents) and p != root / "scheduler"
                and not (p / "pyvenv.cfg").exists()]  # under the root: the package and a venv only
    assert not [p for p in exposed if sandbox.inside(root, p)]
    with pytest.raises(SandboxError, match="cannot be /"):
        launch_folders(Path("/"), root / "data")


@pytest.mark.slow  # imports torch and x-transformers three times
def test_torch_and_the_harness_import_inside(launch):
    code = "import json, torch, x_transformers, scheduler.harness; print(json.dumps(scheduler.harness.__file__))"
    assert answer(run_inside(trial_box(launch), code)).startswith(PACKAGE_PARENT)
    # the project root as the launch root: its train.py, tests/ and the rest go, the package and venv stay
    project = Sandbox.for_trial(launch["work"], launch["data"] / "train.bin", ROOT, launch["data"])
    seen = answer(run_inside(project, code.replace("print(json.dumps(scheduler.harness.__file__))",
                                               f"print(json.dumps(sorted(__import__('os').listdir({str(ROOT)!r}))))")))
    assert "train.py" not in seen and "tests" not in seen and "scheduler" in seen


@pytest.mark.slow  # makes a venv and imports torch from it
def test_a_venv_under_the_launch_root_is_put_back(launch):
    """CI keeps its venv at ROOT/.venv: simulated by a venv under the launch root whose site-packages holds a
    module of its own and points (.pth) at this environment's site-packages for torch."""
    venv = launch["root"] / ".venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    python = str(venv / "bin" / "python")
    site = Path(subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               capture_output=True, text=True, check=True).stdout.strip())
    (site / "venv_marker.py").write_text("WHERE = 'the venv under the root'\n")
    (site / "outer.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    box = Sandbox.for_trial(launch["work"], launch["data"] / "train.bin", launch["root"], launch["data"],
                            python=python)
    assert venv in box.exposed and launch["root"] not in box.exposed
    done = subprocess.run(box.command([python, "-c", "import json, torch, venv_marker, scheduler.harness; "
                                       "print(json.dumps(venv_marker.WHERE))"]),
                          cwd=box.work, env=base_env(box), capture_output=True, text=True, timeout=120)
    assert answer(done) == "the venv under the root"
