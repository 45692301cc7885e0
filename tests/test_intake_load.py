"""Intake under load and damaged results: every file exactly once, nothing lost, damaged files named."""

from __future__ import annotations

import multiprocessing
import warnings
from pathlib import Path

import pytest

from scheduler import intake, queue, results
from scheduler.layout import Layout

SOURCE = "def build_model():\n    return None\n# {agent} {i}\n"


def submit_many(root: str, agent: str, count: int) -> list[str]:
    layout = Layout.at(root)
    ids = []
    for i in range(count):
        path = Path(root) / f"src-{agent}-{i}.py"
        path.write_text(SOURCE.format(agent=agent, i=i))
        ids.append(intake.submit(layout, path, agent, f"variant {i}", "base-x"))
    return ids


def test_eight_agents_submitting_while_intake_scans(tmp_path):
    layout = Layout.at(tmp_path)
    layout.make()
    with multiprocessing.get_context("spawn").Pool(8) as pool:
        pending = pool.starmap_async(submit_many, [(str(tmp_path), f"agent{a}", 25) for a in range(8)])
        while not pending.ready():
            intake.scan(layout, "base-x")  # scanning while files arrive
        submitted = [i for ids in pending.get() for i in ids]
    intake.scan(layout, "base-x")
    queued = [e.candidate_id for e in queue.pending(layout)]
    assert len(submitted) == 200 and len(set(submitted)) == 200
    assert sorted(queued) == sorted(submitted)  # each exactly once, none rejected, none lost
    assert not intake.waiting(layout)


def test_a_damaged_result_file_is_skipped_and_named(tmp_path):
    results.write_row(tmp_path, {"trial_id": "good", "status": "ok", "val_bpc": 1.0, "finished_at": results.now()})
    (tmp_path / "trials" / "truncated.parquet").write_bytes(
        (tmp_path / "trials" / "good.parquet").read_bytes()[:100])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        frame = results.read_trials(tmp_path)
    assert list(frame["trial_id"]) == ["good"]
    assert any("truncated.parquet" in str(w.message) for w in caught)


def test_a_failed_result_write_is_kept_and_retried(tmp_path, monkeypatch):
    from scheduler import record

    callback = record.RecordResults(str(tmp_path), str(tmp_path / "data"))
    layout = Layout.at(tmp_path)
    row = {"trial_id": "t1", "status": "ok", "val_bpc": 1.0}
    real_write = results.write_row

    def full_disk(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(results, "write_row", full_disk)
    callback.unwritten.append(row)
    callback._write_rows(layout)
    assert callback.unwritten == [row] and not results.has_row(tmp_path / "results", "t1")
    monkeypatch.setattr(results, "write_row", real_write)
    callback._write_rows(layout)
    assert callback.unwritten == [] and results.has_row(tmp_path / "results", "t1")
