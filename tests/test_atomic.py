"""scheduler/atomic.py: a file is replaced whole, and a failed write leaves the old one and no temporary file."""

from __future__ import annotations

import pytest

from scheduler.atomic import atomic_path, atomic_write


def test_atomic_write_replaces_the_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "old")
    atomic_write(path, b"new")
    assert path.read_text() == "new"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]


def test_a_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "state.json"
    atomic_write(path, "old", fsync=False)
    with pytest.raises(RuntimeError):
        with atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("the writer failed")
    assert path.read_text() == "old"
    assert [p.name for p in tmp_path.iterdir()] == ["state.json"]
