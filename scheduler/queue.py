"""The queue of trials waiting for a GPU: one JSON file each, so it survives a restart of launch.

Pending entries are results/queue/<priority>-<time>-<trial_id>.json and are taken in
name order: priority 0 (confirmation reruns, control runs of the baseline) before
priority 1 (new candidates), then first come first served. Taking an entry moves
it to results/queue/running/<trial_id>.json (an atomic rename), and a finished
trial's entry is removed. Entries left in running/ when launch starts belong to
trials that a dead launch was running.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from scheduler.atomic import atomic_write
from scheduler.layout import Layout

URGENT, NORMAL = 0, 1


@dataclass
class Entry:
    trial_id: str
    candidate_id: str
    kind: str                 # candidate | confirm | control
    source_sha256: str
    agent: str = ""
    parent: str = ""
    description: str = ""
    seed: int = 0
    submitted_at: float = 0.0  # unix time the candidate was submitted
    attempt: int = 1           # 2 after an interrupted first attempt
    score_test: bool = False   # also score the test split (a new baseline's first control run)

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_file(cls, path: Path) -> "Entry":
        return cls(**json.loads(path.read_text()))


def push(layout: Layout, entry: Entry, priority: int = NORMAL) -> bool:
    """Queue an entry; False (and nothing queued) when a trial with its id is already queued or running.

    So a decision made twice (the selection actor killed after queueing reruns but
    before saving its state, and the call re-sent) queues each rerun once.
    """
    layout.queue.mkdir(parents=True, exist_ok=True)
    queued = {_trial_id(p) for p in _pending_files(layout)}
    if entry.trial_id in queued or (layout.running / f"{entry.trial_id}.json").exists():
        return False
    atomic_write(layout.queue / f"{priority}-{time.time_ns():020d}-{entry.trial_id}.json", entry.to_json())
    return True


def _trial_id(path: Path) -> str:
    """The trial id in a pending entry's file name, <priority>-<time>-<trial id>.json."""
    return path.name.split("-", 2)[2].removesuffix(".json")


def pending(layout: Layout) -> list[Entry]:
    return [Entry.from_file(p) for p in _pending_files(layout)]


def _pending_files(layout: Layout) -> list[Path]:
    if not layout.queue.is_dir():
        return []
    return sorted(p for p in layout.queue.glob("*.json") if not p.name.startswith("."))


def take(layout: Layout) -> Entry | None:
    """Move the first pending entry to running/ and return it; None when nothing is queued."""
    layout.running.mkdir(parents=True, exist_ok=True)
    for path in _pending_files(layout):
        entry = Entry.from_file(path)
        try:
            os.replace(path, layout.running / f"{entry.trial_id}.json")
        except FileNotFoundError:  # dropped meanwhile (a verdict cancelled its reruns)
            continue
        return entry
    return None


def running(layout: Layout) -> list[Entry]:
    if not layout.running.is_dir():
        return []
    return [Entry.from_file(p) for p in sorted(layout.running.glob("*.json"))]


def finish(layout: Layout, trial_id: str) -> None:
    (layout.running / f"{trial_id}.json").unlink(missing_ok=True)


def drop(layout: Layout, candidate_id: str) -> int:
    """Remove a candidate's pending reruns (its verdict is in); returns how many."""
    dropped = 0
    for path in _pending_files(layout):
        if Entry.from_file(path).candidate_id == candidate_id:
            path.unlink(missing_ok=True)
            dropped += 1
    return dropped
