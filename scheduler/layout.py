"""Where everything lives under a launch's root folder (the current folder by default).

    train.py              the baseline (replaced on promotion)
    candidates/           drop folder: .py variants; dot-files and *.tmp / *.part are still being written
    data/                 train.bin, val.bin, test.bin (python -m scheduler prepare)
    results/trials/       one Parquet row per trial            results/promotions/  one per promotion
    results/sources/      accepted candidate sources by sha256 results/rejected/    files that failed intake
    results/queue/        queued trials (survive restarts)     results/queue/running/ trials handed to Ray
    results/runs/ID/      a trial's working folder and log     results/live/        progress of running trials
    results/baselines/    archived baselines                   results/control/     stop requests
    results/index/        each row again as JSON (fast reads)  results/selection.json  the selection's state
    results/launch.lock   held by the running launch           results/launch.json  its heartbeat
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path


SELECTION_STATE = "selection.json"  # the selection actor's state, under results/

@dataclass(frozen=True)
class Layout:
    root: Path
    data: Path

    @classmethod
    def at(cls, root: Path | str = ".", data: Path | str | None = None) -> "Layout":
        root = Path(root).resolve()
        return cls(root=root, data=Path(data).resolve() if data else root / "data")

    @property
    def baseline(self) -> Path:
        return self.root / "train.py"

    @property
    def candidates(self) -> Path:
        return self.root / "candidates"

    @property
    def results(self) -> Path:
        return self.root / "results"

    @property
    def sources(self) -> Path:
        return self.results / "sources"

    @property
    def rejected(self) -> Path:
        return self.results / "rejected"

    @property
    def queue(self) -> Path:
        return self.results / "queue"

    @property
    def runs(self) -> Path:
        return self.results / "runs"

    @property
    def live(self) -> Path:
        return self.results / "live"

    def live_file(self, trial_id: str) -> Path:
        """A running trial's progress, as `status` and `wait` show it."""
        return self.live / f"{trial_id}.json"

    @property
    def baselines(self) -> Path:
        return self.results / "baselines"

    @property
    def control(self) -> Path:
        return self.results / "control"

    @property
    def running(self) -> Path:
        return self.results / "queue" / "running"

    @property
    def selection_state(self) -> Path:
        return self.results / SELECTION_STATE

    def make(self) -> None:
        for folder in (self.candidates, self.sources, self.rejected, self.running, self.runs,
                       self.live, self.baselines, self.control):
            folder.mkdir(parents=True, exist_ok=True)


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def baseline_id(sha: str | None) -> str:
    """A baseline is named by its content's sha256, so any copy of the same train.py has the same id."""
    return "base-" + sha[:12] if sha else "base-none"
