"""A trial's compile cache: private (default), own, or seeded (`launch --compile-cache`).

Why: every sandboxed trial would compile its model from scratch, as Inductor's
and Triton's caches live in the sandbox's private /tmp. On an H200 that costs
about 20 s a trial (docs/design.md, "A trial's fixed cost").

How, for sandboxed trials only (unsandboxed ones already use the user's
machine-wide cache), on the CPU too (nothing compiles there, but the mechanics
run, so tests can exercise them):

- Each trial gets a compile-cache folder of its own on the host,
  `runs/TRIAL/compile-cache/` (beside, not in, the candidate's work folder),
  bound read-write into the sandbox at INSIDE, the same path in every trial
  (Inductor's cache entries may embed absolute paths); the sandbox's
  TORCHINDUCTOR_CACHE_DIR and TRITON_CACHE_DIR point below it.
- A seed is the cache a source left: it lives on the node in
  `data_cache()/compile/KEY`, KEY the source's whole sha256 (not its short
  id: 48 bits a candidate can match by search) and the GPU's name, in a folder
  the sandbox hides (the node's data cache), so no trial sees or writes it.
- A trial that ends `ok` seals the seed of the source it ran (hashed here, by
  the trusted side) where none exists: the trusted side copies its cache there
  (into a temporary folder beside it, then a rename, under a file lock).
- `private` (default): nothing is shared, nothing sealed.
- `own` (opt-in): a trial starts from a copy of its own source's seed: reruns
  and control runs start warm, and no code reaches a trial that its own source
  did not write. But a seed holds whatever the run wrote there, trained weights
  too: a rerun may train on from its first run's model, past the budget, in the
  runs that decide a promotion (and a promoted baseline's control runs set the
  bar so). Nothing tells compiler output from a candidate's file.
- `seeded` (opt-in): a trial whose source has no seed yet starts from its
  baseline's seed instead: first runs of candidates start warm too, and the
  promoted baseline's compiler output runs in its candidates' training
  (docs/reliability.md).

The copier treats a cache as hostile input (code in a sandbox wrote it): it
walks by directory file descriptors without following links, copies only
regular files and folders, skips links, devices, fifos and sockets, and gives
up past MAX_BYTES, MAX_FILES or MAX_DEPTH; so a copy never reads anything
outside the folder it copies. The evaluation runs no compiled code from these
caches: a seed never reaches a score.
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import stat
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from scheduler.layout import sha256_bytes

MODES = ("own", "seeded", "private")
DEFAULT_MODE = "private"          # no run starts from what an earlier one left: a seed can carry trained weights
INSIDE = Path("/tmp/compile-cache")  # where a trial's cache is bound: one path for all, as entries embed paths
FOLDER = "compile-cache"          # under a trial's folder, beside (not in) the candidate's work folder. Not a
                                  # module name: the evaluation runs as `python -m` in the trial's folder (its
                                  # sys.path[0]), and what the candidate writes here must not be importable
SEEDS = "compile"                 # under the node's data cache, which the sandbox hides
MAX_BYTES = 1024**3               # a cache is hostile input: what a copy reads at most (the baseline's: 26 MB)
MAX_FILES = 50_000                # files and folders a copy makes at most
MAX_DEPTH = 32                    # folder nesting a copy follows at most (no recursion error on a deep tree)
CHUNK = 1 << 20
KEEP_SEEDS = 8                    # seeds a node keeps, the last used: a source's reruns come soon after its
                                  # first run, and older sources' seeds would only fill the disk
STALE_STAGING_S = 3600            # a staging folder this old was left by a seal that was killed mid-copy
NOTE = "compile cache: "          # the trial log's line


class CopyRefused(Exception):
    """A cache passed a cap: nothing of it is used."""


@dataclass
class Copied:
    """What a copy made and what it left out."""

    files: int = 0
    folders: int = 0
    size: int = 0
    skipped: list[str] = field(default_factory=list)  # relative paths of links and special files, the first few

    def take(self, size: int) -> None:
        self.size += size
        if self.size > MAX_BYTES or self.files + self.folders > MAX_FILES:
            raise CopyRefused(f"over the cap of {MAX_BYTES:,} bytes or {MAX_FILES:,} files")

    def summary(self) -> str:
        left = f", {len(self.skipped)} links or special files skipped" if self.skipped else ""
        return f"{self.files} files, {self.size / 1e6:.1f} MB{left}"


def applies(config: dict) -> bool:
    """Whether this trial's cache is bound from the host (own or seeded), not its sandbox's private /tmp."""
    return config.get("compile_cache", DEFAULT_MODE) != "private" and config["sandbox"] != "none"


def key(source_sha: str, gpu: str) -> str:
    """A seed's folder name: the source's sha256 and the GPU's name, file-name safe (a short hash of the
    name keeps two names that differ only in unsafe characters apart)."""
    def safe(text: str) -> str:
        return re.sub(r"[^A-Za-z0-9.-]+", "_", text)[:64]

    return f"{safe(source_sha)}-{safe(gpu)}-{hashlib.sha256(gpu.encode()).hexdigest()[:8]}"


def seed_root() -> Path:
    from scheduler.trial import data_cache  # trial imports this module

    return data_cache() / SEEDS


def own_seed(config: dict, gpu: str) -> Path:
    """The seed of the source this trial runs, hashed here: never what the config claims it is."""
    return seed_root() / key(sha256_bytes(config["source"].encode("utf-8")), gpu)


def seed_choices(config: dict, gpu: str) -> list[Path]:
    """The seeds a trial may start from, the first that exists taken: its own source's, and with `seeded`
    its baseline's after it."""
    own = own_seed(config, gpu)
    if config.get("compile_cache", DEFAULT_MODE) != "seeded":
        return [own]
    return list(dict.fromkeys([own, seed_root() / key(config["baseline_sha256"], gpu)]))


def env() -> dict[str, str]:
    """The compilers' caches inside the bound folder."""
    return {"TORCHINDUCTOR_CACHE_DIR": str(INSIDE / "torchinductor"), "TRITON_CACHE_DIR": str(INSIDE / "triton")}


def sandbox_options(cache: Path | None) -> dict:
    """What Sandbox.for_trial adds for a trial's cache folder; nothing for a private cache."""
    if cache is None:
        return {}
    return {"binds": ((Path(os.path.abspath(cache)), INSIDE),), "env_overrides": tuple(env().items())}


def copy_tree(source: Path, target: Path) -> Copied:
    """Copy the folder `source` to `target` (which must not exist): regular files and folders only, never
    through a link, within the caps. Raises CopyRefused past a cap (`target` is then removed), OSError
    when `source` is not a real folder."""
    copied = Copied()
    fd = os.open(source, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        target.mkdir()
    except BaseException:
        os.close(fd)
        raise
    try:
        _copy_folder(fd, target, "", copied, 0)
    except BaseException:
        shutil.rmtree(target, ignore_errors=True)
        raise
    finally:
        os.close(fd)
    return copied


def _copy_folder(fd: int, target: Path, prefix: str, copied: Copied, depth: int) -> None:
    """The entries of the open folder `fd` into `target`; `prefix` is its path relative to the copy's start."""
    if depth > MAX_DEPTH:
        raise CopyRefused(f"folders nested deeper than {MAX_DEPTH} at {prefix!r}")
    with os.scandir(fd) as entries:
        for entry in entries:
            mode = entry.stat(follow_symlinks=False).st_mode  # lstat, relative to fd
            if stat.S_ISDIR(mode):
                copied.folders += 1
                copied.take(0)
                child = os.open(entry.name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fd)
                try:
                    (target / entry.name).mkdir()
                    _copy_folder(child, target / entry.name, f"{prefix}{entry.name}/", copied, depth + 1)
                finally:
                    os.close(child)
            elif stat.S_ISREG(mode):
                copied.files += 1
                _copy_file(fd, entry.name, target / entry.name, copied)
            elif len(copied.skipped) < 20:  # links, devices, fifos, sockets: never opened
                copied.skipped.append(prefix + entry.name)


def _copy_file(fd: int, name: str, target: Path, copied: Copied) -> None:
    # O_NOFOLLOW and O_NONBLOCK: a link or fifo put in place since the lstat is neither followed nor waited on
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fd)
    try:
        info = os.fstat(src)
        if not stat.S_ISREG(info.st_mode):
            copied.files -= 1
            copied.skipped.append(name)
            return
        copied.take(info.st_size)  # refused before reading
        with open(src, "rb", closefd=False) as reader, open(target, "xb") as writer:
            left = info.st_size
            while left > 0 and (chunk := reader.read(min(CHUNK, left))):  # at most the size the cap counted
                writer.write(chunk)
                left -= len(chunk)
        os.chmod(target, info.st_mode & 0o755)  # no setuid or setgid bits from a sandbox
    finally:
        os.close(src)


def start(config: dict, folder: Path, gpu: str, note: Callable[[str], None]) -> Path | None:
    """Before the sandbox starts: the trial's cache folder (None: a private cache, as without this module),
    holding a copy of a seed where there is one. A seed that cannot be copied is noted and the trial starts
    with an empty cache: the cache only saves time."""
    if not applies(config):
        return None
    cache = folder / FOLDER
    shutil.rmtree(cache, ignore_errors=True)
    seed = next((s for s in seed_choices(config, gpu) if s.is_dir()), None)
    if seed is None:
        cache.mkdir(parents=True)
        note(f"{NOTE}no seed of this source on this node: compiles from scratch and seals "
             f"{own_seed(config, gpu).name} if it ends ok")
        return cache
    try:
        copied = copy_tree(seed, cache)
        os.utime(seed, follow_symlinks=False)  # the last used are kept (prune)
        note(f"{NOTE}started from seed {seed.name} ({copied.summary()})")
    except (CopyRefused, OSError) as error:
        shutil.rmtree(cache, ignore_errors=True)
        cache.mkdir(parents=True)
        note(f"{NOTE}seed {seed.name} not used ({error}): compiles from scratch; delete {seed} if it stays so")
    return cache


def finish(config: dict, cache: Path | None, status: str, gpu: str, note: Callable[[str], None]) -> None:
    """After the sandbox is gone: seal the seed of the source this trial ran where it ended ok and none
    exists yet, then remove the trial's cache folder."""
    if cache is None:
        return
    try:
        seed = own_seed(config, gpu)
        if status == "ok" and not seed.exists():
            note(f"{NOTE}{seal(cache, seed)}")
    finally:
        shutil.rmtree(cache, ignore_errors=True)


def seal(cache: Path, seed: Path) -> str:
    """Copy `cache` to `seed` atomically, once: into a temporary folder beside it, then renamed, under a file
    lock; a seed that appeared meanwhile is kept and the copy dropped. Returns what happened, for the log."""
    from filelock import FileLock

    seed.parent.mkdir(parents=True, exist_ok=True)
    staging = seed.parent / f".{seed.name}.{uuid.uuid4().hex}"
    with FileLock(seed.parent / f".{seed.name}.lock"):
        if seed.exists():
            return f"seed {seed.name} already sealed by another trial: kept"
        try:
            copied = copy_tree(cache, staging)
            os.rename(staging, seed)  # fails where a seed appeared past the lock (another tool): kept
        except (CopyRefused, OSError) as error:
            return f"seed {seed.name} not sealed: {error}"
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    removed = prune(seed.parent, keep=seed.name)
    return f"sealed seed {seed.name} ({copied.summary()})" + (f"; removed {', '.join(removed)}" if removed else "")


def prune(seeds: Path, keep: str) -> list[str]:
    """Remove all but the KEEP_SEEDS last used seeds in `seeds` (never `keep`, the one just sealed), and staging
    folders of killed seals. A trial copying a seed removed under it compiles from scratch (start() notes it).
    Returns the names removed."""
    now, removed = time.time(), []
    folders = [p for p in seeds.iterdir() if p.is_dir() and not p.is_symlink()]
    for staging in (p for p in folders if p.name.startswith(".")):
        if now - staging.stat().st_mtime > STALE_STAGING_S:
            shutil.rmtree(staging, ignore_errors=True)
            removed.append(staging.name)
    sealed = sorted((p for p in folders if not p.name.startswith(".") and p.name != keep),
                    key=lambda p: p.stat().st_mtime, reverse=True)
    for old in sealed[KEEP_SEEDS - 1:]:
        shutil.rmtree(old, ignore_errors=True)
        removed.append(old.name)
    return removed
