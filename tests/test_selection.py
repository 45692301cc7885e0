"""The selection actor: noise-aware promotion end to end, atomic replacement of train.py, state on disk."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from scheduler import queue, results
from scheduler.layout import Layout, sha256_bytes
from scheduler.selection import Selection

from conftest import make_root, scheduler, variant


def row(trial_id: str, candidate_id: str, kind: str, bpc: float, baseline: str, sha: str = "") -> dict:
    return {"trial_id": trial_id, "candidate_id": candidate_id, "kind": kind, "status": "ok", "val_bpc": bpc,
            "gpu_name": "gpu-a", "baseline": baseline, "agent": "a1", "description": "d", "source_sha256": sha,
            "parent": baseline}


def fresh(root: Path) -> tuple[Layout, Selection, str]:
    """A root with the tiny baseline and a selection that has seen it (its control run queued)."""
    layout = Layout.at(root)
    layout.make()
    layout.baseline.write_text(variant())
    selection = Selection(str(root))
    return layout, selection, selection.sync_baseline()["baseline"]


def scored(root: Path) -> tuple[Layout, Selection, str, str]:
    """fresh(), with three control runs of the baseline scored, and a candidate's source archived (its sha256)."""
    layout, selection, base = fresh(root)
    for i, bpc in enumerate([2.00, 2.01, 1.99]):
        selection.record(row(f"c{i}", base, "control", bpc, base))
    source = variant(LEARNING_RATE=9e-3).encode()
    sha = sha256_bytes(source)
    (layout.sources / f"{sha}.py").write_bytes(source)
    return layout, selection, base, sha


def test_rule_in_the_actor_confirms_then_promotes_and_state_survives(tmp_path):
    layout, selection, base = fresh(tmp_path)
    old_source = layout.baseline.read_bytes()
    assert [e.kind for e in queue.pending(layout)] == ["control"]  # an unscored baseline is run first
    for i, bpc in enumerate([2.00, 2.01, 1.99]):
        selection.record(row(f"c{i}", base, "control", bpc, base))

    better = variant(LEARNING_RATE=9e-3).encode()
    sha = sha256_bytes(better)
    (layout.sources / f"{sha}.py").write_bytes(better)
    first = selection.record(row("cand-r1", "cand", "candidate", 1.90, base, sha))
    assert first["decision"] == "confirm"
    reruns = [e for e in queue.pending(layout) if e.kind == "confirm"]
    assert [e.seed for e in reruns] == [1, 2, 3] and all(e.candidate_id == "cand" for e in reruns)

    again = Selection(str(tmp_path))  # a restarted actor: the same state from disk
    assert again.summary()["scores"] == selection.summary()["scores"]
    for trial_id, bpc in [("cand-r2", 1.91), ("cand-r3", 1.90)]:
        assert again.record(row(trial_id, "cand", "confirm", bpc, base, sha))["decision"] == "pending"
    decided = again.record(row("cand-r4", "cand", "confirm", 1.91, base, sha))
    assert decided["decision"] == "promote", decided  # promotion waits for all three reruns
    assert not [e for e in queue.pending(layout) if e.candidate_id == "cand"]
    assert layout.baseline.read_bytes() == better
    assert (layout.baselines / f"{sha256_bytes(old_source)}.py").read_bytes() == old_source
    event = results.read_promotions(layout.results).iloc[0]
    assert event["candidate_id"] == "cand" and event["n_candidate"] == 3 and event["gain"] > 0.09
    assert not list(layout.root.glob(".train.py*.tmp"))
    assert json.loads(layout.selection_state.read_text())["baseline_sha"] == sha


def test_the_baseline_runs_before_the_next_rerun_when_it_has_fewer_scores(tmp_path):
    layout, _, base = fresh(tmp_path)
    selection = Selection(str(tmp_path), rule={"min_baseline_runs": 3})
    queue.drop(layout, base)  # the control fresh() queued: the three scores below stand in for it
    for i, bpc in enumerate([2.00, 2.01, 1.99]):
        selection.record(row(f"c{i}", base, "control", bpc, base))
    sha = "0" * 64
    selection.record(row("cand-r1", "cand", "candidate", 1.98, base, sha))
    for bpc in (1.99, 1.99, 1.99):  # its three reruns: 0.01 better, not enough against three baseline scores
        entry = queue.take(layout)
        queue.finish(layout, entry.trial_id)
        decision = selection.record(row(entry.trial_id, "cand", entry.kind, bpc, base, sha))
    assert decision["decision"] == "confirm", decision
    assert [(e.kind, e.candidate_id) for e in queue.pending(layout)] == [("control", base), ("confirm", "cand")]


def test_candidate_identical_in_score_is_not_promoted(tmp_path):
    layout, selection, base = fresh(tmp_path)
    for i, bpc in enumerate([2.00, 2.02, 1.98]):
        selection.record(row(f"c{i}", base, "control", bpc, base))
    same = layout.baseline.read_bytes() + b"\n# same model\n"
    sha = sha256_bytes(same)
    (layout.sources / f"{sha}.py").write_bytes(same)
    assert selection.record(row("same-r1", "same", "candidate", 2.00, base, sha))["decision"] == "reject"
    assert layout.baseline.read_bytes() == variant().encode()


def test_a_call_retried_after_a_restart_is_not_counted_twice(tmp_path):
    """Ray re-sends the call that was running when the actor died; the restarted actor has already saved it."""
    layout, selection, base = fresh(tmp_path)
    control = row("c1", base, "control", 2.0, base)
    selection.record(control)
    restarted = Selection(str(tmp_path))
    assert restarted.record(control)["decision"] == "already recorded"
    assert restarted.summary()["scores"] == {"gpu-a": [2.0]}


def test_broken_train_py_is_restored_from_the_archive(tmp_path):
    layout, selection, _ = fresh(tmp_path)
    good = layout.baseline.read_bytes()
    layout.baseline.write_text("def broken(:\n")
    notes = selection.sync_baseline()["notes"]
    assert layout.baseline.read_bytes() == good and "restored" in notes[0]
    layout.baseline.unlink()
    assert "restored" in selection.sync_baseline()["notes"][0] and layout.baseline.read_bytes() == good


@pytest.mark.slow
def test_launch_promotes_a_clearly_better_candidate(tmp_path, corpus):
    root = make_root(tmp_path, corpus)
    before = (root / "train.py").read_bytes()
    good = tmp_path / "good.py"
    good.write_text(variant(LEARNING_RATE=1e-2, MUON_LEARNING_RATE=1e-2))  # learns much faster in 2 s
    cid = scheduler(root, "submit", str(good), "--agent", "a1", "-m", "learning rate 1e-2").stdout.strip()
    # the fewest runs a noise-aware promotion takes (2 control runs, 1 rerun): the rule's numbers are tested above
    done = scheduler(root, "launch", "--pretend-gpus", "2", "--device", "cpu", "--budget", "2", "--no-dashboard",
                     "--exit-when-idle", "--min-baseline-runs", "2", "--confirmations", "1")
    assert done.returncode == 0, done.stderr[-3000:]
    rows = results.read_trials(root / "results")
    mine = rows[rows["candidate_id"] == cid]
    assert {"candidate", "confirm"} <= set(mine["kind"]), mine[["trial_id", "kind", "val_bpc"]]
    assert (root / "train.py").read_text() == good.read_text()
    assert (root / "results" / "baselines" / f"{sha256_bytes(before)}.py").exists()
    info = json.loads(scheduler(root, "baseline", "--json").stdout)
    assert info["lineage"][0]["candidate_id"] == cid
    first_baseline = info["lineage"][0]["old_baseline"]
    tested = rows[(rows["candidate_id"] == first_baseline) & rows["test_bpc"].notna()]
    assert list(tested["kind"]) == ["control"] and 0 < tested["test_bpc"].iloc[0] < 9  # scored on test, once


def test_a_failing_baseline_is_not_rerun_for_ever(tmp_path):
    layout, selection, base = fresh(tmp_path)
    for i in range(3):
        for entry in queue.pending(layout):
            queue.take(layout)
            queue.finish(layout, entry.trial_id)
            selection.record({**row(entry.trial_id, base, "control", None, base), "status": "crash"})
        selection.sync_baseline()
    assert not queue.pending(layout)
    assert selection.state.controls == 2
    assert "failed its last 2 control runs" in " ".join(selection.summary()["notes"] + selection.sync_baseline()["notes"])


def test_each_baseline_is_scored_on_the_test_split_once(tmp_path):
    layout, selection, base = fresh(tmp_path)
    [first] = queue.pending(layout)
    assert first.score_test  # the first control run of a baseline scores the test split too
    queue.take(layout)
    queue.finish(layout, first.trial_id)
    selection.record({**row(first.trial_id, base, "control", 2.0, base), "test_bpc": 2.1})
    selection._queue_control()
    [second] = queue.pending(layout)
    assert not second.score_test  # once is enough
    queue.drop(layout, base)
    layout.baseline.write_text(variant(LEARNING_RATE=5e-3))  # an edit by hand: a new, unscored baseline
    new = selection.sync_baseline()["baseline"]
    assert new != base and [(e.candidate_id, e.score_test) for e in queue.pending(layout)] == [(new, True)]


def test_a_decision_made_twice_queues_each_rerun_once(tmp_path):
    """The actor killed after queueing reruns but before saving: the re-sent call decides again from the old
    state, and the queue keeps one entry per rerun."""
    layout, selection, base, sha = scored(tmp_path)
    before = layout.selection_state.read_text()
    first = row("cand-r1", "cand", "candidate", 1.90, base, sha)
    assert selection.record(first)["decision"] == "confirm"
    queued = sorted(e.trial_id for e in queue.pending(layout))
    layout.selection_state.write_text(before)  # as if the actor died before its save
    assert Selection(str(tmp_path)).record(first)["decision"] == "confirm"
    assert sorted(e.trial_id for e in queue.pending(layout)) == queued


def test_a_forged_reference_is_refuted_by_an_audited_run_and_what_it_stopped_runs_again(tmp_path):
    """The attack (docs/reliability.md, "A forged loss curve"): a baseline prints its control runs' curves lower
    than its loss in mid-budget, so that `--early-stop on` stops honest candidates. A quarter of the runs the rule
    would stop are audited (run on and scored, earlystop.AUDIT_FRACTION); one that ends within the baseline's noise
    refutes its curves: the searcher is told, and each candidate they stopped gets a rerun, its stopped run not
    held against it."""
    layout, selection, base, sha = scored(tmp_path)
    stopped = {**row("a-r1", "a", "candidate", None, base, sha), "status": "stopped_early", "early_stop_at": 90.0}
    assert selection.record(stopped)["verdict"] == "rejected"
    hopeless = {**row("h-r1", "h", "candidate", 2.60, base, sha), "early_stop_at": 90.0}  # a right stop: no refutation
    assert selection.record(hopeless)["verdict"] == "rejected"
    assert selection.sync_baseline()["refuted"] is False and not [e for e in queue.pending(layout) if e.kind == "confirm"]
    audited = {**row("b-r1", "b", "candidate", 2.005, base, sha), "early_stop_at": 90.0}
    selection.record(audited)
    info = selection.sync_baseline()
    assert info["refuted"] is True and any("run again" in note for note in info["notes"])
    rerun = [e for e in queue.pending(layout) if e.candidate_id == "a"]
    assert [(e.kind, e.trial_id) for e in rerun] == [("confirm", "a-r2")]
    assert selection.state.candidates["a"].verdict == "confirming"
    decided = selection.record(row("a-r2", "a", "confirm", 1.90, base, sha))
    assert decided["decision"] == "confirm", decided  # judged on its score, not rejected for the stopped run
    again = Selection(str(tmp_path))  # the refutation survives a restart of the actor
    assert again.sync_baseline()["refuted"] is True


def test_a_run_stopped_by_refuted_curves_after_the_refutation_runs_again_too(tmp_path):
    """The race: trials already running when an audited run refutes the baseline's curves were handed those
    curves, and the rule may still stop them; their rows come in after the refutation. Each is excused and run
    again like those stopped before it, not rejected for a stop the selection already knows to be wrong."""
    layout, selection, base = fresh(tmp_path)
    for i, bpc in enumerate([2.00, 2.01, 1.99]):
        selection.record(row(f"c{i}", base, "control", bpc, base))
    sha = "0" * 64
    selection.record({**row("b-r1", "b", "candidate", 2.005, base, sha), "early_stop_at": 90.0})
    assert selection.sync_baseline()["refuted"] is True
    late = {**row("a-r1", "a", "candidate", None, base, sha), "status": "stopped_early", "early_stop_at": 90.0}
    assert selection.record(late)["verdict"] == "confirming"
    assert [(e.kind, e.trial_id) for e in queue.pending(layout) if e.candidate_id == "a"] == [("confirm", "a-r2")]
    decided = selection.record(row("a-r2", "a", "confirm", 1.90, base, sha))
    assert decided["decision"] == "confirm", decided  # judged on its score, its stopped run excused
