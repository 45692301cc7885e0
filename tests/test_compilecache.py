"""The compile cache's seeds (scheduler/compilecache.py, `launch --compile-cache own|seeded|private`).

A seed is written by code that ran in a sandbox, so the copier is tried as an
attack: links out of the seed (to a "val.bin"), special files, oversized
caches. Then which seed a run seals (its own source's, hashed by the trusted
side, when it ends ok, once, atomically), which seeds a trial starts from (none
by default, `private`: a seed can carry trained weights; with `own` never one
another source wrote: a candidate that poisons its cache reaches only its own
reruns), that a trial's writes stay its own, the
seed's key, the sandbox's command and environment, and that `private` leaves
both as they were. No Ray, no training; one test runs a real bwrap and is
skipped where none works.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import stat
import subprocess
import sys
import tempfile
import threading
from pathlib import Path

import pytest

from scheduler import compilecache, sandbox
from scheduler.compilecache import INSIDE, CopyRefused, copy_tree, finish, key, seal, start
from scheduler.layout import baseline_id, sha256_bytes
from scheduler.sandbox import Sandbox, SandboxError
from scheduler.trial import DATA_CACHE_ENV, training_command

SOURCE = "def build_model(): ...\n"
GPU = "NVIDIA H200"


OTHER = "def build_model(): return 2\n"
THIRD = "def build_model(): return 3\n"


def trial_config(kind: str = "candidate", source: str = SOURCE, baseline_source: str = SOURCE, mode: str = "own",
                 **more) -> dict:
    """A trial's config as the searcher builds it, as far as the compile cache reads it."""
    return {"kind": kind, "source": source, "source_sha256": sha256_bytes(source.encode()),
            "baseline": baseline_id(sha256_bytes(baseline_source.encode())),
            "baseline_sha256": sha256_bytes(baseline_source.encode()), "sandbox": "bwrap",
            "compile_cache": mode, "device": "cpu", **more}


def seed_of(node: dict, source: str) -> Path:
    return node["seeds"] / key(sha256_bytes(source.encode()), GPU)


def tree(folder: Path) -> dict[str, bytes]:
    """Every regular file below `folder` by relative path, and where links are (never followed)."""
    found = {}
    for path in sorted(folder.rglob("*")):
        name = str(path.relative_to(folder))
        if path.is_symlink():
            found[name] = b"-> " + os.readlink(path).encode()
        elif path.is_file():
            found[name] = path.read_bytes()
    return found


@pytest.fixture
def node(tmp_path, monkeypatch):
    """A node whose data cache (where seeds live) is under tmp_path; a trial folder; the notes logged."""
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / "node-cache"))
    folder = tmp_path / "runs" / "t1"
    folder.mkdir(parents=True)
    return {"seeds": tmp_path / "node-cache" / compilecache.SEEDS, "folder": folder, "notes": [],
            "tmp": tmp_path}


def run(node: dict, config: dict, writes: dict[str, str], status: str = "ok") -> Path | None:
    """One trial's life as run_trial drives it: start, what its training writes into its cache, finish."""
    cache = start(config, node["folder"], GPU, node["notes"].append)
    for name, text in writes.items():
        (cache / name).parent.mkdir(parents=True, exist_ok=True)
        (cache / name).write_text(text)
    finish(config, cache, status, GPU, node["notes"].append)
    return cache


def test_the_copier_skips_links_and_special_files_and_reads_nothing_outside(tmp_path, monkeypatch):
    outside = tmp_path / "data"
    outside.mkdir()
    (outside / "val.bin").write_text("validation split")
    seed = tmp_path / "seed"
    (seed / "triton" / "abc").mkdir(parents=True)
    (seed / "triton" / "abc" / "kernel.so").write_bytes(b"\x7fELF kernel")
    (seed / "index.json").write_text("{}")
    (seed / "val.bin").symlink_to(outside / "val.bin")       # a link to the split, by its name
    (seed / "triton" / "data").symlink_to(outside)           # a link to the folder holding it
    (seed / "up").symlink_to("../data/val.bin")              # relative, out of the seed
    os.mkfifo(seed / "fifo")                                 # would block a reader that opens it
    monkeypatch.chdir(seed)                                  # a socket's path must be short: bind it relatively
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock")
        if os.geteuid() == 0:
            os.mknod(seed / "null", stat.S_IFCHR | 0o600, os.makedev(1, 3))
        copied = copy_tree(seed, tmp_path / "copy")
    assert tree(tmp_path / "copy") == {"index.json": b"{}", "triton/abc/kernel.so": b"\x7fELF kernel"}
    assert not any(p.is_symlink() for p in (tmp_path / "copy").rglob("*"))
    assert (copied.files, copied.size) == (2, len(b"{}\x7fELF kernel"))
    assert sorted(copied.skipped) == sorted(["val.bin", "triton/data", "up", "fifo", "sock"]
                                            + (["null"] if os.geteuid() == 0 else []))
    with pytest.raises(OSError):  # the seed itself a link to a folder: not followed either
        copy_tree(seed / "triton" / "data", tmp_path / "copy2")
    assert not (tmp_path / "copy2").exists()


def test_a_seed_that_is_a_link_to_the_data_is_never_copied(node):
    """A seed's own folder replaced by a link to the data folder: the trial starts empty, the split stays out."""
    (node["tmp"] / "data").mkdir()
    (node["tmp"] / "data" / "val.bin").write_text("validation split")
    config = trial_config()
    node["seeds"].mkdir(parents=True)
    (node["seeds"] / key(config["baseline_sha256"], GPU)).symlink_to(node["tmp"] / "data")
    cache = start(config, node["folder"], GPU, node["notes"].append)
    assert cache == node["folder"] / compilecache.FOLDER and list(cache.iterdir()) == []
    assert "not used" in node["notes"][0] and "compiles from scratch" in node["notes"][0]


def test_a_cap_refuses_an_oversized_cache_and_it_is_not_sealed(node, monkeypatch):
    monkeypatch.setattr(compilecache, "MAX_BYTES", 1000)
    big = node["tmp"] / "big"
    big.mkdir()
    (big / "a").write_bytes(b"x" * 600)
    (big / "b").write_bytes(b"x" * 600)
    with pytest.raises(CopyRefused, match="cap"):
        copy_tree(big, node["tmp"] / "copy")
    assert not (node["tmp"] / "copy").exists()
    monkeypatch.setattr(compilecache, "MAX_BYTES", 10**9)
    monkeypatch.setattr(compilecache, "MAX_FILES", 3)
    many = node["tmp"] / "many"
    (many / "d").mkdir(parents=True)
    for i in range(4):
        (many / "d" / str(i)).write_text("x")
    with pytest.raises(CopyRefused):
        copy_tree(many, node["tmp"] / "copy")
    monkeypatch.setattr(compilecache, "MAX_BYTES", 1000)
    control = trial_config("control")
    run(node, control, {"triton/a": "x" * 600, "triton/b": "x" * 600})
    assert not (node["seeds"] / key(control["baseline_sha256"], GPU)).exists()
    assert "not sealed: over the cap" in node["notes"][-1]
    assert [p.name for p in node["seeds"].iterdir()] == [f".{key(control['baseline_sha256'], GPU)}.lock"]  # no staging


def test_an_ok_run_seals_the_seed_of_the_source_it_ran_once(node):
    seed = seed_of(node, SOURCE)
    for status in ("crash", "timeout", "stopped_early", "interrupted"):
        cache = run(node, trial_config("control"), {"torchinductor/x.py": "poison"}, status)
        assert not seed.exists() and not cache.exists()
    # a config whose sha256 names the baseline's source, running another: sealed as what it ran, if anything
    run(node, {**trial_config("control"), "source": OTHER}, {"torchinductor/x.py": "other's"})
    assert not seed.exists() and tree(seed_of(node, OTHER)) == {"torchinductor/x.py": b"other's"}
    assert all("compiles from scratch" in n for n in node["notes"][:5])
    run(node, trial_config("control"), {"torchinductor/x.py": "kernel", "triton/k.so": "so"})
    assert tree(seed) == {"torchinductor/x.py": b"kernel", "triton/k.so": b"so"}
    assert node["notes"][-2].endswith(f"compiles from scratch and seals {seed.name} if it ends ok")
    assert node["notes"][-1].startswith(f"compile cache: sealed seed {seed.name} (2 files")
    old = os.stat(seed).st_mtime - 3600
    os.utime(seed, (old, old))
    cache = run(node, trial_config("confirm"), {"torchinductor/x.py": "a later run's"})
    assert node["notes"][-1].startswith(f"compile cache: started from seed {seed.name} (2 files")
    assert (seed / "torchinductor" / "x.py").read_text() == "kernel" and not cache.exists()
    assert os.stat(seed).st_mtime > old + 60  # used now: the last to be pruned
    assert not [p for p in seed.parent.iterdir() if p.is_dir() and p.name.startswith(".")]  # no staging left


def test_own_mode_never_runs_what_another_source_wrote(node):
    """The attack: a candidate's first run plants code in its compile cache and ends ok. With `own` that code
    reaches its own reruns only: not the baseline's control runs, not other candidates."""
    run(node, trial_config("candidate", source=OTHER), {"torchinductor/planted.py": "poison"})
    assert tree(seed_of(node, OTHER)) == {"torchinductor/planted.py": b"poison"}
    for config in (trial_config("control"), trial_config("candidate", source=THIRD),
                   trial_config("candidate", source=THIRD, baseline_source=OTHER)):  # even with OTHER promoted
        cache = start(config, node["folder"], GPU, node["notes"].append)
        assert list(cache.iterdir()) == [] and "compiles from scratch" in node["notes"][-1]
        finish(config, cache, "crash", GPU, node["notes"].append)
    cache = start(trial_config("confirm", source=OTHER), node["folder"], GPU, node["notes"].append)
    assert (cache / "torchinductor" / "planted.py").read_text() == "poison"  # its own rerun: what it wrote


def test_by_default_no_run_starts_from_what_an_earlier_run_of_its_source_left(node):
    """The attack: a first run saves its trained weights in its compile cache and ends ok; with `own` they become
    its source's seed, and its confirmation reruns (and, once it is promoted, the baseline's control runs) load them
    and train on from there: twice the budget, in the runs that decide its promotion and the bar after it. A seed
    can hold anything a run wrote, so by default (`private`) no run's cache outlives it."""
    default = {k: v for k, v in trial_config().items() if k != "compile_cache"}
    assert start(default, node["folder"], GPU, node["notes"].append) is None  # the sandbox's own /tmp
    finish(default, None, "ok", GPU, node["notes"].append)
    assert not node["seeds"].exists() and node["notes"] == []
    run(node, trial_config(), {"weights.pt": "trained for the budget"})  # opt-in `own`: it carries over
    cache = start(trial_config("confirm"), node["folder"], GPU, node["notes"].append)
    assert (cache / "weights.pt").read_text() == "trained for the budget"


def test_seeded_mode_starts_a_first_run_from_its_baselines_seed_and_seals_its_own(node):
    run(node, trial_config("control"), {"torchinductor/x.py": "baseline's"})
    first = trial_config("candidate", source=OTHER, mode="seeded")
    cache = run(node, first, {"torchinductor/y.py": "candidate's"})
    assert node["notes"][-2].startswith(f"compile cache: started from seed {seed_of(node, SOURCE).name}")
    assert tree(seed_of(node, OTHER)) == {"torchinductor/x.py": b"baseline's", "torchinductor/y.py": b"candidate's"}
    cache = start({**first, "kind": "confirm"}, node["folder"], GPU, node["notes"].append)
    assert node["notes"][-1].startswith(f"compile cache: started from seed {seed_of(node, OTHER).name}")
    assert (cache / "torchinductor" / "y.py").exists()
    assert tree(seed_of(node, SOURCE)) == {"torchinductor/x.py": b"baseline's"}


def test_sealing_is_atomic_and_once_when_two_trials_race(node):
    source = node["tmp"] / "cache"
    source.mkdir()
    (source / "k").write_text("kernel")
    seed = node["seeds"] / "base-x-gpu"
    barrier, said = threading.Barrier(4), []

    def one() -> None:
        barrier.wait()
        said.append(seal(source, seed))

    threads = [threading.Thread(target=one) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(s.split(" (")[0] for s in said) == sorted([f"seed {seed.name} already sealed by another trial: kept"] * 3
        + [f"sealed seed {seed.name}"])
    assert tree(seed) == {"k": b"kernel"}
    assert sorted(p.name for p in seed.parent.iterdir()) == sorted([seed.name, f".{seed.name}.lock"])


def test_a_seal_keeps_the_last_used_seeds_and_clears_what_killed_seals_left(node):
    """Older sources' seeds would only fill the node's disk: a seal keeps KEEP_SEEDS, the new one among them,
    and removes the staging folders of seals killed mid-copy (old ones only: a fresh one may be in use)."""
    seeds = node["seeds"]
    seeds.mkdir(parents=True, exist_ok=True)
    hour = compilecache.STALE_STAGING_S
    for age in range(compilecache.KEEP_SEEDS + 1):  # base-0 the last used
        old = seeds / f"base-{age}-gpu"
        old.mkdir()
        stamp = os.stat(old).st_mtime - (age + 1) * hour
        os.utime(old, (stamp, stamp))
    killed, fresh = seeds / ".base-9-gpu.dead", seeds / ".base-8-gpu.busy"
    killed.mkdir()
    fresh.mkdir()
    stamp = os.stat(killed).st_mtime - 2 * hour
    os.utime(killed, (stamp, stamp))
    source = node["tmp"] / "cache"
    source.mkdir()
    (source / "k").write_text("kernel")
    said = seal(source, seeds / "base-new-gpu")
    assert said.startswith("sealed seed base-new-gpu") and "removed" in said
    left = sorted(p.name for p in seeds.iterdir() if p.is_dir())
    assert left == sorted([".base-8-gpu.busy", "base-new-gpu"]
                          + [f"base-{age}-gpu" for age in range(compilecache.KEEP_SEEDS - 1)])


def test_a_candidates_writes_to_its_copy_never_reach_the_seed(node):
    config = trial_config("control")
    run(node, config, {"torchinductor/x.py": "kernel"})
    seed = seed_of(node, SOURCE)
    before = tree(seed)
    candidate = trial_config("candidate", source=THIRD, mode="seeded")
    cache = start(candidate, node["folder"], GPU, node["notes"].append)
    assert (cache / "torchinductor" / "x.py").read_text() == "kernel"
    (cache / "torchinductor" / "x.py").write_text("poisoned")     # rewrite the copy of a seeded file
    (cache / "torchinductor" / "planted.py").write_text("poisoned")
    (cache / "val.bin").symlink_to("/etc/hostname")
    finish(candidate, cache, "ok", GPU, node["notes"].append)
    assert tree(seed) == before and not cache.exists()
    assert tree(seed_of(node, THIRD)) == {"torchinductor/x.py": b"poisoned", "torchinductor/planted.py": b"poisoned"}


def test_the_key_differs_per_source_and_gpu_and_is_a_safe_file_name():
    keys = {key(s, g) for s in ("a" * 64, "b" * 64)
            for g in ("NVIDIA H200", "NVIDIA H100 80GB HBM3", "NVIDIA H100_80GB HBM3", "cpu")}
    assert len(keys) == 8
    odd = key("a" * 64, "../../etc/x y\n")
    assert all(c.isalnum() or c in "-_." for c in odd) and odd.startswith("a" * 64 + "-") and len(odd) < 200


def test_two_sources_whose_short_ids_match_have_seeds_of_their_own(node, monkeypatch):
    """The attack: a candidate searches for a source whose sha256 starts with the baseline's 12 digits (its short
    id, `base-…`: 2^48 hashes, hours of one GPU), and seals its code as the baseline's seed, which the baseline's
    control runs would then load. A seed is keyed by the whole sha256."""
    monkeypatch.setattr(compilecache, "sha256_bytes",
                        lambda data: "abcdef012345" + ("0" if data == SOURCE.encode() else "1") * 52)
    forged = trial_config("candidate", source=OTHER)
    run(node, forged, {"torchinductor/planted.py": "poison"})
    cache = start(trial_config("control"), node["folder"], GPU, node["notes"].append)
    assert list(cache.iterdir()) == [] and "compiles from scratch" in node["notes"][-1]


def test_the_trials_cache_folder_cannot_be_imported_by_the_evaluation():
    """The evaluation runs `python -m` in the trial's folder, so that folder is its sys.path[0]."""
    assert not compilecache.FOLDER.isidentifier() and compilecache.FOLDER != "work"


def fake_bwrap(monkeypatch) -> None:
    monkeypatch.setattr(sandbox, "bwrap_path", lambda: "/fake/bwrap")  # the command is read, never run


def test_the_bind_comes_after_the_private_tmp_and_the_env_points_there(tmp_path, monkeypatch):
    fake_bwrap(monkeypatch)
    box = Sandbox(work=tmp_path / "work", **compilecache.sandbox_options(tmp_path / "compile-cache"))
    cmd = box.command(["python"])
    at = [i for i in range(len(cmd) - 2) if cmd[i:i + 3] == ["--bind", str(tmp_path / "compile-cache"), str(INSIDE)]]
    tmp = cmd.index("--tmpfs")
    assert len(at) == 1 and cmd[tmp + 1] == "/tmp" and at[0] > tmp and at[0] < cmd.index("--chdir")
    assert box.env["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/compile-cache/torchinductor"
    assert box.env["TRITON_CACHE_DIR"] == "/tmp/compile-cache/triton"
    assert box.env["HOME"] == box.env["TMPDIR"] == "/tmp"
    with pytest.raises(SandboxError, match="absolute"):
        Sandbox(work=tmp_path, binds=((tmp_path, Path("relative")),)).command(["python"])


def test_private_leaves_the_command_and_env_as_they_were(node, monkeypatch):
    fake_bwrap(monkeypatch)
    root = node["tmp"] / "root"
    (root / "data").mkdir(parents=True)
    (root / "data" / "train.bin").write_text("train")
    work = node["folder"] / "work"
    base = {"sandbox": "bwrap", "data_dir": str(root / "data"), "root": str(root), "device": "cpu"}
    env = {"PATH": os.environ["PATH"]}
    today = training_command(base, work, env, str(root / "data"))
    for config in ({**base, "kind": "candidate", "compile_cache": "private"},
                   {**trial_config(), **base, "compile_cache": "private"}, {**trial_config(), **base, "sandbox": "none"},
                   {**trial_config(mode="seeded"), **base, "sandbox": "none"}):
        assert start(config, node["folder"], GPU, node["notes"].append) is None
    assert training_command({**base, "compile_cache": "private"}, work, env, str(root / "data"), None) == today
    assert today[1]["TORCHINDUCTOR_CACHE_DIR"] == "/tmp/torchinductor" and str(INSIDE) not in today[0]
    assert list(node["folder"].iterdir()) == [] and node["notes"] == [] and not node["seeds"].exists()
    finish(base, None, "ok", GPU, node["notes"].append)
    assert node["notes"] == []


def bwrap_works() -> bool:
    try:
        sandbox.bwrap_path()
        return True
    except SandboxError:
        return False


@pytest.mark.skipif(not bwrap_works(), reason="no working bubblewrap on this machine")
def test_inside_the_sandbox_the_seed_is_hidden_and_the_cache_writable(monkeypatch):
    base = Path(tempfile.mkdtemp(prefix="compilecache-test-", dir="/var/tmp")).resolve()  # outside the private /tmp
    try:
        root, seeds = base / "root", base / "node-cache" / compilecache.SEEDS
        (root / "data").mkdir(parents=True)
        (root / "data" / "train.bin").write_text("train")
        monkeypatch.setenv(DATA_CACHE_ENV, str(base / "node-cache"))
        monkeypatch.setattr(sandbox, "SYSTEM_FOLDERS", (*sandbox.SYSTEM_FOLDERS, base))  # as if under /opt
        config = {**trial_config(), "data_dir": str(root / "data"), "root": str(root)}
        seed = seeds / key(config["baseline_sha256"], "cpu")
        (seed / "triton").mkdir(parents=True)
        (seed / "triton" / "seeded.txt").write_text("from the seed")
        folder = root / "results" / "runs" / "t1"
        (folder / "work").mkdir(parents=True)
        cache = start(config, folder, "cpu", lambda line: None)
        command, env = training_command(config, folder / "work", {"PATH": os.environ["PATH"]},
                                        str(root / "data"), cache)
        code = f"""
import json, os
tri = os.environ["TRITON_CACHE_DIR"]
os.makedirs(os.environ["TORCHINDUCTOR_CACHE_DIR"])
open(os.path.join(os.environ["TORCHINDUCTOR_CACHE_DIR"], "new.py"), "w").write("written inside")
open(os.path.join(tri, "seeded.txt"), "a").write(" and changed")
print(json.dumps({{"seed": os.path.exists({str(seed)!r}), "seeds": os.path.exists({str(seeds)!r}),
                  "seeded": open(os.path.join(tri, "seeded.txt")).read(), "tri": tri}}))
"""
        done = subprocess.run([*command[:-2], sys.executable, "-c", code], cwd=folder / "work", env=env,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode == 0, done.stderr
        seen = json.loads(done.stdout.strip().splitlines()[-1])
        assert seen == {"seed": False, "seeds": False, "seeded": "from the seed and changed",
                        "tri": "/tmp/compile-cache/triton"}
        assert (cache / "torchinductor" / "new.py").read_text() == "written inside"
        assert tree(seed) == {"triton/seeded.txt": b"from the seed"}
    finally:
        shutil.rmtree(base, ignore_errors=True)


MARKER = """
import os as _os, pathlib as _pathlib
_cache = _pathlib.Path(_os.environ["TORCHINDUCTOR_CACHE_DIR"])
_mark = _cache / "mark.txt"
print("SEEDED:", _mark.read_text() if _mark.exists() else "nothing")
_cache.mkdir(parents=True, exist_ok=True)
_mark.write_text(WHO)
"""


@pytest.mark.slow
@pytest.mark.skipif(not bwrap_works(), reason="no working bubblewrap on this machine")
def test_run_trial_seals_with_the_control_run_and_seeds_the_candidate(tmp_path, data_dir, tiny_train_source,
                                                                     monkeypatch):
    """run_trial itself, without Ray (its reports collected), sandboxed on the CPU: the baseline's control run
    writes a file into its compile cache and seals it; the candidate's run then finds that file in its own."""
    from ray import tune

    from scheduler.trial import run_trial

    reports: list[dict] = []
    monkeypatch.setattr(tune, "report", reports.append)
    monkeypatch.setenv(DATA_CACHE_ENV, str(tmp_path / "node-cache"))
    baseline = tiny_train_source + "\nWHO = 'the control run'\n" + MARKER
    candidate = tiny_train_source + "\nWHO = 'the candidate'\n" + MARKER
    common = {"agent": "a", "parent": "b", "description": "", "seed": 0, "sandbox": "bwrap", "root": str(tmp_path),
              "data_dir": str(data_dir), "runs_dir": str(tmp_path / "runs"), "compile_cache": "seeded",
              "data_sha256": json.loads((data_dir / "meta.json").read_text())["sha256"], "budget": 2.0,
              "device": "cpu", "omp_threads": 1, "startup_allowance": 60.0, "eval_timeout": 120.0}
    for trial, kind, source in (("b-c0", "control", baseline), ("c-r1", "candidate", candidate)):
        config = {**trial_config(kind, source=source, baseline_source=baseline), **common, "trial_id": trial,
                  "candidate_id": trial.split("-")[0]}
        run_trial(config)
        row = json.loads(reports[-1]["result_row"])
        assert row["status"] == "ok", row["reason"]
        assert not (tmp_path / "runs" / trial / compilecache.FOLDER).exists()
    control_log, candidate_log = ((tmp_path / "runs" / t / "log.txt").read_text() for t in ("b-c0", "c-r1"))
    seed = tmp_path / "node-cache" / compilecache.SEEDS / key(sha256_bytes(baseline.encode()), "cpu")
    assert "SEEDED: nothing" in control_log and f"compile cache: sealed seed {seed.name} (1 files" in control_log
    assert f"compile cache: started from seed {seed.name} (1 files" in candidate_log
    assert "SEEDED: the control run" in candidate_log
    assert tree(seed) == {"torchinductor/mark.txt": b"the control run"}
