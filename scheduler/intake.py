"""Intake: turn files in candidates/ into queued trials or rejected rows, before any GPU time is spent.

`submit` is the front door (python -m scheduler submit FILE --agent A -m "..."): it
writes the metadata and then the file into candidates/ under temporary names and
renames them, so intake never reads half a file. `scan` (called by the scheduler
about once a second) claims each finished file with an atomic rename, checks it,
archives accepted sources by sha256 under results/sources/, and queues a trial;
anything else gets a `rejected` row with the reason. Every file dropped gets
exactly one row or one queue entry; nothing is deleted that is not kept elsewhere
(rejected files are moved to results/rejected/).
"""

from __future__ import annotations

import ast
import json
import os
import re
import secrets
import shutil
import time
from pathlib import Path

from scheduler import queue, results
from scheduler.atomic import atomic_path, atomic_write
from scheduler.console import say
from scheduler.layout import Layout, baseline_id, sha256_bytes

MAX_BYTES = 1_000_000
SAFE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,200}$")
IN_PROGRESS = (".tmp", ".part")
META_SUFFIX = ".meta.json"
FIRST_SEED = 0  # every first run uses the same seed: candidates are compared on the same data order


class SubmitError(Exception):
    """The file cannot be submitted; the message says why and what to do."""


def new_candidate_id() -> str:
    return time.strftime("%Y%m%d-%H%M%S-") + secrets.token_hex(3)


def _meta_path(folder: Path, name: str) -> Path:
    return folder / f".{name}{META_SUFFIX}"


def submit(layout: Layout, file: Path, agent: str, description: str, parent: str) -> str:
    """Copy `file` into candidates/ atomically with its metadata; returns the candidate id."""
    if not file.is_file():
        raise SubmitError(f"{file} is not a file; give the path of your train.py variant")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", agent):
        raise SubmitError(f"agent name {agent!r}: use 1-64 letters, digits, '.', '_' or '-'")
    layout.candidates.mkdir(parents=True, exist_ok=True)
    while True:  # two submissions in the same second may draw the same id: the metadata file claims it
        candidate_id = new_candidate_id()
        name = f"{candidate_id}.py"
        try:
            meta_file = open(_meta_path(layout.candidates, name), "x")
            break
        except FileExistsError:
            continue
    with meta_file:  # scan reads it only once the .py below appears, after it is complete
        json.dump({"candidate_id": candidate_id, "agent": agent, "description": description,
                   "parent": parent, "submitted_at": time.time()}, meta_file)
    with atomic_path(layout.candidates / name) as tmp:
        shutil.copyfile(file, tmp)
    return candidate_id


def _ignored(name: str) -> bool:
    return name.startswith(".") or name.endswith(IN_PROGRESS)


def check(path: Path, name: str) -> tuple[str | None, bytes]:
    """(reason it is rejected or None, its bytes). Reads at most MAX_BYTES + 1 bytes."""
    if path.is_symlink():
        return "is a symbolic link; submit the file itself", b""
    if path.is_dir():
        return "is a folder, not a file", b""
    if not path.is_file():
        return "is not a regular file", b""
    if not SAFE_NAME.match(name) or ".." in name:
        return f"unsafe file name {name!r}: use letters, digits, '.', '_' and '-'", b""
    if not name.endswith(".py"):
        return "not a .py file", b""
    with open(path, "rb") as f:
        data = f.read(MAX_BYTES + 1)
    if not data.strip():
        return "empty file", data
    if len(data) > MAX_BYTES:
        return f"over the size limit of {MAX_BYTES:,} bytes", data[:0]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"not UTF-8 text (byte {error.start}); a train.py variant is Python source", data
    if "\x00" in text:
        return "contains NUL bytes: binary, not Python source", data
    try:
        tree = ast.parse(text, filename=name)
    except SyntaxError as error:
        return f"does not parse: line {error.lineno}: {error.msg}", data
    if not defines_build_model(tree):
        return "no module-level build_model() function: the model it returns is what the harness hands over", data
    return None, data


def defines_build_model(tree: ast.Module) -> bool:
    """The candidate contract's one structural rule: a module-level `def build_model` (not `async def`: it must
    return the model, not a coroutine). Intake checks it of every candidate, the selection of every baseline."""
    return any(isinstance(node, ast.FunctionDef) and node.name == "build_model" for node in tree.body)


def _known_source(layout: Layout, sha: str) -> str | None:
    """Id of an accepted candidate, or of a baseline, with this hash, if any."""
    record = layout.sources / f"{sha}.json"
    if record.exists():
        return json.loads(record.read_text())["candidate_id"]
    return baseline_id(sha) if (layout.baselines / f"{sha}.py").exists() else None


def _archive(layout: Layout, sha: str, data: bytes, candidate_id: str) -> None:
    layout.sources.mkdir(parents=True, exist_ok=True)
    source = layout.sources / f"{sha}.py"
    if not source.exists():
        atomic_write(source, data)
    atomic_write(layout.sources / f"{sha}.json", json.dumps({"candidate_id": candidate_id}))


def scan(layout: Layout, baseline: str) -> list[str]:
    """Claim and check every finished file in candidates/; returns the candidate ids handled.

    When the disk refuses a write (full, read-only), the file goes back into
    candidates/ with its metadata, the scan stops, and the next scan tries again:
    nothing is lost and launch keeps running.
    """
    handled = []
    try:
        names = sorted(os.listdir(layout.candidates))
    except FileNotFoundError:
        return handled
    for name in names:
        if _ignored(name):
            continue
        meta_path = _meta_path(layout.candidates, name)
        meta = {}
        if meta_path.exists():
            try:
                meta = json.loads(meta_path.read_text())
            except (OSError, ValueError):
                meta = {}
        candidate_id = meta.get("candidate_id") or new_candidate_id()
        claimed = layout.rejected / f".claim-{candidate_id}"
        layout.rejected.mkdir(parents=True, exist_ok=True)
        try:
            os.rename(layout.candidates / name, claimed)  # atomic: one scanner wins, a writer's rename is complete
        except FileNotFoundError:
            continue
        kept = layout.rejected / f"{candidate_id}-{re.sub(r'[^A-Za-z0-9_.-]', '_', name)[:100]}"
        try:
            _take_in(layout, claimed, kept, name, meta, candidate_id, baseline)
        except OSError as error:
            for path in (claimed, kept):
                if path.exists():
                    os.rename(path, layout.candidates / name)
            say(f"could not take in {name!r} ({error}); it stays in candidates/ and is tried again at the next scan")
            break
        meta_path.unlink(missing_ok=True)
        handled.append(candidate_id)
    return handled


def _take_in(layout: Layout, claimed: Path, kept: Path, name: str, meta: dict, candidate_id: str,
             baseline: str) -> None:
    """Check one claimed file, then queue it (source archived) or reject it (file kept, row written)."""
    reason, data = check(claimed, name)
    sha = sha256_bytes(data) if data and reason is None else None
    duplicate_of = _known_source(layout, sha) if sha else None
    if duplicate_of == candidate_id:  # archived by an earlier attempt whose queueing the disk refused
        duplicate_of = None
    if duplicate_of:
        reason = f"identical to {duplicate_of} (same sha256): see its result"
    row = {
        "candidate_id": candidate_id, "agent": meta.get("agent", ""), "description": meta.get("description", ""),
        "parent": meta.get("parent") or baseline, "submitted_at": meta.get("submitted_at", time.time()),
    }
    if reason is None:
        _archive(layout, sha, data, candidate_id)
        queue.push(layout, queue.Entry(trial_id=f"{candidate_id}-r1", kind="candidate", source_sha256=sha,
                                       seed=FIRST_SEED, **row))
        claimed.unlink()
    else:
        os.rename(claimed, kept)
        results.write_row(layout.results, {
            **row, "trial_id": candidate_id, "kind": "candidate", "status": "rejected",
            "reason": f"{name!r} {reason}", "source_sha256": sha256_bytes(data) if data else None,
            "duplicate_of": duplicate_of, "baseline": baseline, "stale": False,
            "submitted_at": results.from_unix(row["submitted_at"]), "finished_at": results.now(),
        })


def submitted(layout: Layout) -> list[dict]:
    """The files waiting in candidates/ for intake (submitted, not yet taken in by a launch), oldest first: each
    {"file", "candidate_id", "agent", "description", "submitted_at"}; the id is None for a file dropped by hand
    (intake names it when it takes it in)."""
    try:
        names = [name for name in os.listdir(layout.candidates) if not _ignored(name)]
    except FileNotFoundError:
        return []
    waiting = []
    for name in names:
        try:
            meta = json.loads(_meta_path(layout.candidates, name).read_text())
        except (OSError, ValueError):  # dropped by hand: no metadata
            meta = {}
        waiting.append({"file": name, "candidate_id": meta.get("candidate_id"), "agent": meta.get("agent", ""),
                        "description": meta.get("description", ""), "submitted_at": meta.get("submitted_at", 0.0)})
    return sorted(waiting, key=lambda w: (w["submitted_at"], w["file"]))


def waiting(layout: Layout) -> bool:
    """Is a finished file waiting in candidates/ (one that scan would claim)?"""
    try:
        return any(not _ignored(name) for name in os.listdir(layout.candidates))
    except FileNotFoundError:
        return False
