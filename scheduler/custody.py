"""Custody of the baseline train.py, and the integrity of archived sources.

The selection actor (scheduler/selection.py) is the only writer of the root
train.py, and it writes through this module:

    custody = Custody(layout, git_commit=False)
    sha = custody.archive(source)        # results/baselines/<sha256>.py, kept for good
    custody.install(source)              # train.py replaced atomically (fsync, rename) under a lock
    custody.restore(sha)                 # train.py put back from the archive
    custody.commit("Promote ...")        # the optional git commit of train.py

Every source the scheduler keeps is named by the sha256 of its content:
results/sources/<sha>.py (accepted candidates, written by intake) and
results/baselines/<sha>.py (every baseline). What was judged is what runs and
what becomes the baseline only if those files still hold what they held when
they were named, so every read of one by the trusted side (the searcher
building a trial's config, a promotion, a restore) goes through
`read_archived`, which refuses (`SourceRefused`) a file whose content no longer
hashes to its name, or that is gone.

`baseline_diff` is the unified diff that the lineage keeps for each change of
the baseline, promotions and hand edits alike.
"""

from __future__ import annotations

import difflib
import subprocess
from pathlib import Path

from scheduler.atomic import atomic_write
from scheduler.layout import Layout, sha256_bytes

LOCK_NAME = "train.py.lock"  # under results/: held while train.py is replaced
MAX_DIFF_CHARS = 20_000      # a lineage entry's diff is cut here; both whole files stay archived
GIT_ERROR_CHARS = 200        # of git's complaint kept in the note when a commit fails


class SourceRefused(Exception):
    """An archived source that must not be used: changed after it was archived, or gone. The message says which
    file and why; it is the `reason` of the trial or promotion that is refused."""

    def __init__(self, path: Path, why: str) -> None:
        super().__init__(f"{path} {why}")
        self.path = path


def read_archived(path: Path) -> bytes:
    """The content of an archived source named <sha256>.py, checked against its name."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise SourceRefused(path, "is missing: it was removed after it was archived") from None
    actual = sha256_bytes(data)
    if actual != path.stem:
        raise SourceRefused(path, f"no longer matches its sha256 name: its content hashes to {actual[:12]}..., "
                                  f"so it was changed after it was archived")
    return data


def source_path(layout: Layout, kind: str, sha: str) -> Path:
    """Where a trial's source is archived: a control run's (a baseline) under baselines/, a candidate's and its
    reruns' under sources/."""
    return (layout.baselines if kind == "control" else layout.sources) / f"{sha}.py"


def baseline_diff(old: bytes, new: bytes, old_id: str, new_id: str) -> str:
    """The unified diff from one baseline to the next, cut at MAX_DIFF_CHARS (the note at the cut says where the
    whole files are)."""
    text = "\n".join(difflib.unified_diff(old.decode("utf-8", "replace").splitlines(),
                                          new.decode("utf-8", "replace").splitlines(),
                                          f"{old_id}/train.py", f"{new_id}/train.py", lineterm=""))
    if len(text) <= MAX_DIFF_CHARS:
        return text
    cut = text.rfind("\n", 0, MAX_DIFF_CHARS)
    return (text[:cut if cut > 0 else MAX_DIFF_CHARS]
            + f"\n... cut at {MAX_DIFF_CHARS:,} of {len(text):,} characters: the whole files are under "
              f"results/baselines/, named by their sha256")


def diff_size(diff: str) -> tuple[int, int]:
    """Lines added and removed by a unified diff (its file headers left out)."""
    lines = [line for line in diff.splitlines() if not line.startswith(("+++ ", "--- "))]
    return sum(line.startswith("+") for line in lines), sum(line.startswith("-") for line in lines)


class Custody:
    """The root train.py and the archive of baselines, written only by the selection actor."""

    def __init__(self, layout: Layout, git_commit: bool = False) -> None:
        self.layout = layout
        self.git_commit = git_commit

    def current(self) -> bytes | None:
        """train.py as it is now; None when it is missing."""
        try:
            return self.layout.baseline.read_bytes()
        except FileNotFoundError:
            return None

    def archive(self, source: bytes) -> str:
        """Keep `source` as results/baselines/<sha256>.py; returns the sha256. A copy that no longer matches its
        name is replaced by the right content, which is in hand."""
        sha = sha256_bytes(source)
        self.layout.baselines.mkdir(parents=True, exist_ok=True)
        path = self.layout.baselines / f"{sha}.py"
        if not path.exists() or sha256_bytes(path.read_bytes()) != sha:
            atomic_write(path, source)
        return sha

    def baseline_source(self, sha: str) -> bytes:
        """An archived baseline, checked against its name (SourceRefused if changed or gone)."""
        return read_archived(self.layout.baselines / f"{sha}.py")

    def candidate_source(self, sha: str) -> bytes:
        """An accepted candidate's archived source, checked against its name (SourceRefused if changed or gone)."""
        return read_archived(self.layout.sources / f"{sha}.py")

    def install(self, source: bytes) -> None:
        """Make `source` the root train.py, atomically, under the lock that readers of train.py may take."""
        from filelock import FileLock  # imported here: `status` reads the selection's state through this module

        self.layout.results.mkdir(parents=True, exist_ok=True)
        with FileLock(str(self.layout.results / LOCK_NAME)):
            atomic_write(self.layout.baseline, source)

    def restore(self, sha: str) -> None:
        """Put the archived baseline `sha` back as train.py (SourceRefused if its archive is changed or gone)."""
        self.install(self.baseline_source(sha))

    def commit(self, message: str) -> str | None:
        """Commit train.py with `message` when asked to (launch --git-commit); why it failed, or None."""
        if not self.git_commit:
            return None
        done = subprocess.run(["git", "commit", "-m", message, "--", self.layout.baseline.name],
                              cwd=self.layout.root, capture_output=True, text=True)
        return None if done.returncode == 0 else done.stderr.strip()[:GIT_ERROR_CHARS]
