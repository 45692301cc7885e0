"""Custody of train.py: archived sources checked against their sha256 name, hand edits recorded with their diff,
control runs counted only for the baseline they ran, state and lineage files from before still read. No Ray."""

from __future__ import annotations

import json
from datetime import datetime, timezone

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from scheduler import cli, custody, queue, results
from scheduler.layout import Layout, baseline_id, sha256_bytes
from scheduler.search import QueueSearcher
from scheduler.selection import Selection, saved_rule

GPU = "gpu-a"
BASELINE_SCORES = (2.00, 2.01, 1.99)
CANDIDATE_SCORES = (1.90, 1.91, 1.90, 1.91)  # screens well, then three reruns as good: promoted at the last one


def source(n: int) -> bytes:
    """A tiny train.py: all the selection asks of one is that it parses and has a module-level build_model()."""
    return f"# variant {n}\nLEARNING_RATE = {n}e-3\n\n\ndef build_model():\n    return None\n".encode()


def row(trial_id: str, candidate_id: str, kind: str, bpc: float | None, baseline: str, sha: str = "") -> dict:
    return {"trial_id": trial_id, "candidate_id": candidate_id, "kind": kind, "status": "ok", "val_bpc": bpc,
            "gpu_name": GPU, "baseline": baseline, "agent": "a1", "description": "d", "source_sha256": sha,
            "parent": baseline}


def scored(tmp_path) -> tuple[Layout, Selection, str]:
    """A root whose baseline has three control scores; nothing queued."""
    layout = Layout.at(tmp_path)
    layout.make()
    layout.baseline.write_bytes(source(1))
    selection = Selection(str(tmp_path))
    base = selection.sync_baseline()["baseline"]
    queue.drop(layout, base)  # the control run sync queued: the scores below stand in for it
    for i, bpc in enumerate(BASELINE_SCORES):
        selection.record(row(f"{base}-s{i}", base, "control", bpc, base))
    return layout, selection, base


def submitted(layout: Layout, data: bytes) -> str:
    """Archive a candidate's source as intake does; returns its sha256."""
    sha = sha256_bytes(data)
    (layout.sources / f"{sha}.py").write_bytes(data)
    return sha


def judged(selection: Selection, base: str, sha: str, scores=CANDIDATE_SCORES) -> dict:
    """Record the candidate `cand`'s first run and its reruns; the last decision."""
    decision = {}
    for i, bpc in enumerate(scores):
        decision = selection.record(row(f"cand-r{i + 1}", "cand", "confirm" if i else "candidate", bpc, base, sha))
    return decision


def searcher(layout: Layout) -> QueueSearcher:
    return QueueSearcher(str(layout.root), str(layout.data), {"budget": 1.0}, exit_when_idle=False)


# ---------------------------------------------------------------------------- archived sources are checked


def test_a_changed_source_is_refused_when_its_trial_config_is_built(tmp_path):
    layout = Layout.at(tmp_path)
    layout.make()
    sha = submitted(layout, source(2))
    entry = queue.Entry(trial_id="cand-r1", candidate_id="cand", kind="candidate", source_sha256=sha)
    config = searcher(layout)._config(layout, entry, "base-x")
    assert config["source"] == source(2).decode() and "refused" not in config

    (layout.sources / f"{sha}.py").write_bytes(source(2) + b"LEARNING_RATE = 1.0\n")  # rewritten after intake
    config = searcher(layout)._config(layout, entry, "base-x")
    assert "source" not in config  # nothing of it reaches the trial
    assert str(layout.sources / f"{sha}.py") in config["refused"]
    assert "no longer matches its sha256 name" in config["refused"]
    assert config["trial_id"] == "cand-r1" and config["baseline"] == "base-x"  # the row can still be written

    (layout.sources / f"{sha}.py").unlink()
    assert "is missing" in searcher(layout)._config(layout, entry, "base-x")["refused"]
    assert "refused" in results.STATUSES and "export_failed" in results.STATUSES
    results.write_row(layout.results, {"trial_id": "cand-r1", "candidate_id": "cand", "kind": "candidate",
                                       "status": "refused", "reason": config["refused"]})


def test_a_control_run_reads_the_baseline_archive_and_is_refused_when_it_changed(tmp_path):
    layout, selection, base = scored(tmp_path)
    selection._queue_control()
    [entry] = queue.pending(layout)
    assert searcher(layout)._config(layout, entry, base)["source"] == source(1).decode()
    archived = layout.baselines / f"{selection.state.baseline_sha}.py"
    archived.write_bytes(source(9))
    assert str(archived) in searcher(layout)._config(layout, entry, base)["refused"]


def test_a_source_changed_before_its_promotion_is_not_promoted(tmp_path):
    layout, selection, base = scored(tmp_path)
    sha = submitted(layout, source(2))
    assert judged(selection, base, sha, CANDIDATE_SCORES[:3])["decision"] == "pending"
    (layout.sources / f"{sha}.py").write_bytes(source(3))  # after its last rerun ran, before its verdict

    decision = selection.record(row("cand-r4", "cand", "confirm", CANDIDATE_SCORES[3], base, sha))
    assert decision["decision"] == "reject"
    assert f"{sha}.py" in decision["reason"] and "no longer matches its sha256 name" in decision["reason"]
    assert layout.baseline.read_bytes() == source(1) and selection.baseline() == base
    assert results.read_lineage(layout.results).empty
    assert "cand (a1) was not promoted" in selection.summary()["notes"][0]
    assert selection.record(row("later-r1", "later", "candidate", 2.5, base, submitted(layout, source(4))))[
        "decision"] == "reject"  # and the selection goes on


def test_a_candidate_whose_reruns_are_all_refused_is_rejected_once_they_are_in(tmp_path):
    """Its first run screened well; each refused (or crashed) rerun used to screen it again and queue three more."""
    layout, selection, base = scored(tmp_path)
    sha = submitted(layout, source(2))
    assert selection.record(row("cand-r1", "cand", "candidate", 1.90, base, sha))["decision"] == "confirm"
    ran, decision = [], {}
    while entry := next((e for e in queue.pending(layout) if e.candidate_id == "cand"), None):
        queue.take(layout)
        queue.finish(layout, entry.trial_id)
        ran.append(entry.trial_id)
        decision = selection.record({**row(entry.trial_id, "cand", "confirm", None, base, sha), "status": "refused",
                                     "reason": f"{layout.sources / sha}.py no longer matches its sha256 name"})
    assert ran == ["cand-r2", "cand-r3", "cand-r4"]
    assert decision == {"decision": "reject", "reason": "its first run screened well, and its reruns failed",
                        "verdict": "rejected"}
    assert selection.state.candidates["cand"].done


def test_a_promotion_installs_the_checked_source_and_records_its_diff(tmp_path):
    layout, selection, base = scored(tmp_path)
    sha = submitted(layout, source(2))
    assert judged(selection, base, sha)["decision"] == "promote"
    assert layout.baseline.read_bytes() == source(2) and selection.baseline() == baseline_id(sha)
    assert (layout.baselines / f"{sha}.py").read_bytes() == source(2)
    [event] = results.read_lineage(layout.results).to_dict(orient="records")
    assert event["kind"] == "promotion" and event["candidate_id"] == "cand" and event["gain"] > 0.09
    assert "-LEARNING_RATE = 1e-3" in event["diff"] and "+LEARNING_RATE = 2e-3" in event["diff"]
    assert not json.loads(layout.selection_state.read_text())["installing"]


def test_a_promotion_interrupted_before_train_py_was_replaced_is_finished_not_taken_for_a_hand_edit(tmp_path):
    layout, selection, base = scored(tmp_path)
    sha = submitted(layout, source(2))
    install = selection.custody.install
    selection.custody.install = lambda data: (_ for _ in ()).throw(SystemExit("the actor is killed"))
    try:
        judged(selection, base, sha)
    except SystemExit:
        pass
    selection.custody.install = install
    assert layout.baseline.read_bytes() == source(1)  # the old train.py, the new baseline in the state

    restarted = Selection(str(tmp_path))
    notes = restarted.sync_baseline()["notes"]
    assert layout.baseline.read_bytes() == source(2) and restarted.baseline() == baseline_id(sha)
    assert "stopped while it installed a promotion" in notes[0]
    assert list(results.read_lineage(layout.results)["kind"]) == ["promotion"]


def test_a_broken_train_py_is_not_restored_from_a_changed_archive(tmp_path):
    layout, selection, _ = scored(tmp_path)
    (layout.baselines / f"{selection.state.baseline_sha}.py").write_bytes(source(7))
    layout.baseline.write_text("def broken(:\n")
    notes = selection.sync_baseline()["notes"]
    assert layout.baseline.read_text() == "def broken(:\n"
    assert "cannot be restored" in notes[0] and "no longer matches its sha256 name" in notes[0]


# ---------------------------------------------------------------------------- hand edits are recorded


def test_a_hand_edit_is_recorded_with_its_diff_and_shown_by_baseline(tmp_path, capsys):
    layout, selection, base = scored(tmp_path)
    selection._queue_control()  # queued for the old baseline: it must not run as a score of the new one
    layout.baseline.write_bytes(source(5))
    info = selection.sync_baseline()
    new = baseline_id(sha256_bytes(source(5)))
    assert info["baseline"] == new and "edited by hand" in info["notes"][0] and base in info["notes"][0]
    assert selection.summary()["scores"] == {}  # the old scores belong to another model
    assert [(e.kind, e.candidate_id) for e in queue.pending(layout)] == [("control", new)]
    assert (layout.baselines / f"{sha256_bytes(source(5))}.py").read_bytes() == source(5)

    [edit] = results.read_lineage(layout.results).to_dict(orient="records")
    assert (edit["kind"], edit["old_baseline"], edit["new_baseline"]) == ("hand_edit", base, new)
    assert "-LEARNING_RATE = 1e-3" in edit["diff"] and "+LEARNING_RATE = 5e-3" in edit["diff"]
    assert pd.isna(edit["gain"]) and pd.isna(edit["candidate_id"])  # no figures: nothing was judged
    assert results.read_promotions(layout.results).empty
    assert selection.sync_baseline()["notes"] == []  # recorded once

    layout.baseline.write_bytes(source(1))  # `baseline` runs in a project folder only
    assert cli.main(["--root", str(tmp_path), "baseline"]) == 0
    text = capsys.readouterr().out
    assert f"hand edit of train.py: {base} -> {new} (+2 -2 lines)" in text and "gain" not in text
    assert cli.main(["--root", str(tmp_path), "baseline", "--diff"]) == 0
    assert "      +LEARNING_RATE = 5e-3" in capsys.readouterr().out
    assert cli.main(["--root", str(tmp_path), "baseline", "--json"]) == 0
    [shown] = json.loads(capsys.readouterr().out)["lineage"]
    assert shown["kind"] == "hand_edit" and shown["diff"] == edit["diff"] and shown["gain"] is None


def test_the_report_lineage_shows_a_hand_edit_as_such(tmp_path):
    from scheduler.report import write_report

    layout, selection, base = scored(tmp_path)
    sha = submitted(layout, source(2))
    judged(selection, base, sha)
    layout.baseline.write_bytes(source(5))
    selection.sync_baseline()
    text = write_report(layout.results)["summary"].read_text()
    lineage = text.split("## Lineage\n", 1)[1].split("\n## ", 1)[0].splitlines()
    promotion, edit = [line for line in lineage if line.startswith("| 1 ") or line.startswith("| 2 ")]
    assert "| cand | a1 |" in promotion and "+0.09" in promotion
    assert "| hand edit | - | edited by hand:" in edit and "(+2 -2 lines)" in edit
    assert edit.endswith("| - | - | - |")


def test_a_diff_is_cut_at_its_cap(tmp_path):
    old = b"".join(b"x = %d\n" % i for i in range(5000))
    diff = custody.baseline_diff(old, b"x = 1\n", "base-a", "base-b")
    assert len(diff) < custody.MAX_DIFF_CHARS + 200 and "cut at 20,000 of" in diff
    assert diff.startswith("--- base-a/train.py\n+++ base-b/train.py\n")


# ---------------------------------------------------------------------------- the stale control run


def test_a_control_run_of_the_old_baseline_that_finishes_after_a_promotion_is_not_counted(tmp_path):
    layout, selection, base = scored(tmp_path)
    selection._queue_control()
    stale = queue.take(layout)  # running while the candidate is promoted
    sha = submitted(layout, source(2))
    assert judged(selection, base, sha)["decision"] == "promote"
    new_scores = selection.summary()["scores"]

    # it started after the promotion, so its row names the new baseline; its source was the old one
    decision = selection.record(row(stale.trial_id, stale.candidate_id, "control", 2.0, baseline_id(sha)))
    assert "not counted" in decision["decision"]
    assert selection.summary()["scores"] == new_scores and selection.state.failed_controls == 0


def test_control_runs_of_the_old_baseline_still_queued_are_dropped_at_a_promotion(tmp_path):
    layout, selection, base = scored(tmp_path)
    selection._queue_control()
    sha = submitted(layout, source(2))
    judged(selection, base, sha)
    # the old one is gone, and the new baseline's own (it has 3 scores of 5) was not held back by it
    assert [(e.kind, e.candidate_id) for e in queue.pending(layout)] == [("control", baseline_id(sha))]


# ---------------------------------------------------------------------------- files from before still read


def test_a_selection_state_written_before_the_dataclasses_still_loads(tmp_path):
    layout = Layout.at(tmp_path)
    layout.make()
    layout.baseline.write_bytes(source(1))
    old_sha = sha256_bytes(source(1))
    (layout.baselines / f"{old_sha}.py").write_bytes(source(1))
    base = baseline_id(old_sha)
    sha = submitted(layout, source(2))
    layout.selection_state.write_text(json.dumps({  # as the actor saved it before: a candidate's row under "meta"
        "rule": {"baselines": {GPU: list(BASELINE_SCORES)}, "noise": {}}, "baseline_sha": old_sha,
        "candidates": {"cand": {"scores": {GPU: list(CANDIDATE_SCORES[:3])}, "outstanding": 1, "done": False,
                                "meta": {"agent": "a1", "description": "d", "source_sha256": sha, "parent": base}}},
        "trials_since_control": 3, "controls": 1, "failed_controls": 0, "last_recorded": "cand-r3",
        "test_scored": [base], "rule_config": {"min_baseline_runs": 3}}))
    assert saved_rule(layout.selection_state).baseline_scores(GPU) == list(BASELINE_SCORES)

    selection = Selection(str(tmp_path), rule={"min_baseline_runs": 3})
    assert selection.sync_baseline()["notes"] == []  # the same baseline: no hand edit
    candidate = selection.state.candidates["cand"]
    assert (candidate.source_sha256, candidate.agent, candidate.outstanding) == (sha, "a1", 1)
    assert selection.state.test_scored == [base] and selection.state.controls == 1
    assert selection.record(row("cand-r4", "cand", "confirm", CANDIDATE_SCORES[3], base, sha))["decision"] == "promote"
    assert layout.baseline.read_bytes() == source(2)


def test_promotion_files_written_before_kind_and_diff_still_read(tmp_path, capsys):
    layout = Layout.at(tmp_path)
    layout.make()
    old_schema = pa.schema([f for f in results.PROMOTION_SCHEMA if f.name not in ("kind", "diff")])
    event = {"promoted_at": datetime(2026, 1, 2, tzinfo=timezone.utc), "candidate_id": "p1", "agent": "a1",
             "description": "warmup", "old_baseline": "base-a", "new_baseline": "base-b", "gpu_name": GPU,
             "old_mean": 2.0, "new_mean": 1.9, "gain": 0.1, "n_candidate": 3, "n_baseline": 5, "sigma": 0.01,
             "threshold": 0.02, "reason": "reliably better"}
    results.promotions_dir(layout.results).mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([event], schema=old_schema),
                   results.promotions_dir(layout.results) / "20260102T000000000000-p1.parquet")
    [read] = results.read_lineage(layout.results).to_dict(orient="records")
    assert read["kind"] == "promotion" and pd.isna(read["diff"]) and read["gain"] == 0.1
    assert list(results.read_promotions(layout.results)["candidate_id"]) == ["p1"]
    layout.baseline.write_bytes(source(1))  # `baseline` runs in a project folder only
    assert cli.main(["--root", str(tmp_path), "baseline"]) == 0
    assert "p1 (a1): warmup gain 0.1000 on val" in capsys.readouterr().out
