"""The selection actor: the only writer of the baseline.

Every finished trial is sent here (`record`). Scores feed the promotion rule
in scheduler/promotion.py; its verdicts queue confirmation reruns (ahead of
new candidates), drop reruns that are no longer needed, or promote: train.py
is replaced atomically under a file lock, the old one stays archived under
results/baselines/, and a promotion row is written. Control runs of the
baseline are queued when the rule wants them (first of all when the baseline
has no score yet). The first control run of each baseline also scores the test
split, once: a fresh run, not one selected for a good score, so the lineage
shows whether gains on validation hold on test.

All state lives in results/selection.json, rewritten after every change, so
a relaunch, or Ray restarting a killed actor, restores it exactly. In Ray the
class runs as one named actor, `selection` (see `selection_actor`).
"""

from __future__ import annotations

import ast
import json
import os
import subprocess
import time
from dataclasses import asdict
from pathlib import Path

from filelock import FileLock

from scheduler import queue, results
from scheduler.layout import Layout, baseline_id, sha256_bytes
from scheduler.promotion import PromotionRule, RuleConfig, Verdict

ACTOR_NAME = "selection"
MAX_FAILED_CONTROLS = 2  # a baseline that fails this many control runs in a row is not run again by itself


def saved_rule(state_path: Path) -> PromotionRule | None:
    """The promotion rule as the selection actor last saved it (settings, scores, noise); None before any launch."""
    if not state_path.exists():
        return None
    state = json.loads(state_path.read_text())
    return PromotionRule(RuleConfig(**state.get("rule_config", {})), state.get("rule"))


def usable_baseline(source: bytes) -> str | None:
    """Why this train.py cannot be the baseline, or None when it can."""
    try:
        tree = ast.parse(source.decode("utf-8"))
    except (UnicodeDecodeError, SyntaxError) as error:
        return f"it does not parse ({error})"
    if not any(isinstance(n, ast.FunctionDef) and n.name == "build_model" for n in tree.body):
        return "it has no module-level build_model()"
    return None


class Selection:
    def __init__(self, root: str, rule: dict | None = None, git_commit: bool = False) -> None:
        self.layout = Layout.at(root)
        self.git_commit = git_commit
        self.rule_config = RuleConfig(**(rule or {}))
        path = self.layout.selection_state
        state = json.loads(path.read_text()) if path.exists() else {}
        self.rule = PromotionRule(self.rule_config, state.get("rule"))
        self.baseline_sha: str | None = state.get("baseline_sha")
        self.candidates: dict[str, dict] = state.get("candidates", {})   # id -> {scores: {gpu: [...]}, outstanding, done}
        self.trials_since_control: int = state.get("trials_since_control", 0)
        self.controls: int = state.get("controls", 0)
        self.failed_controls: int = state.get("failed_controls", 0)
        self.test_scored: list[str] = state.get("test_scored", [])  # baselines scored on the test split
        # Ray re-sends a call that was running when the actor died: the one trial recorded last is not counted twice
        self.last_recorded: str | None = state.get("last_recorded")
        self.notes: list[str] = []

    # ------------------------------------------------------------------ state

    def _save(self) -> None:
        state = {"rule": self.rule.to_dict(), "baseline_sha": self.baseline_sha, "candidates": self.candidates,
                 "trials_since_control": self.trials_since_control, "controls": self.controls,
                 "failed_controls": self.failed_controls, "last_recorded": self.last_recorded,
                 "test_scored": self.test_scored,
                 "rule_config": asdict(self.rule_config)}
        path = self.layout.selection_state
        tmp = path.with_name(f".{path.name}.tmp")
        tmp.write_text(json.dumps(state, indent=1))
        os.replace(tmp, path)

    def baseline(self) -> str:
        return baseline_id(self.baseline_sha)

    def _archive_baseline(self, source: bytes) -> str:
        sha = sha256_bytes(source)
        self.layout.baselines.mkdir(parents=True, exist_ok=True)
        path = self.layout.baselines / f"{sha}.py"
        if not path.exists():
            path.write_bytes(source)
        return sha

    def sync_baseline(self) -> dict:
        """Check train.py against the recorded baseline (launch start, and before each trial).

        An edit by hand that still works becomes the new (unscored) baseline; a
        missing or broken train.py is restored from the archive, and the note says so.
        """
        path = self.layout.baseline
        source = path.read_bytes() if path.exists() else None
        problem = "it is missing" if source is None else usable_baseline(source)
        if problem is None:
            sha = sha256_bytes(source)
            if sha != self.baseline_sha:
                self._archive_baseline(source)
                if self.baseline_sha:  # edited by hand: the old scores belong to another model
                    self.rule.new_baseline()
                self.baseline_sha, self.failed_controls = sha, 0
                self._save()
        elif self.baseline_sha:
            archived = (self.layout.baselines / f"{self.baseline_sha}.py").read_bytes()
            self._write_train_py(archived)
            self.notes.append(f"train.py was unusable ({problem}); restored baseline {self.baseline()} from the archive")
        else:
            raise RuntimeError(f"{path} cannot be the baseline: {problem}. Put a working train.py there.")
        if not self.rule.gpus() and not self._control_queued():
            self._queue_control()  # the first thing to do with an unscored baseline: run it
        return {"baseline": self.baseline(), "sha": self.baseline_sha, "notes": self._take_notes()}

    def _take_notes(self) -> list[str]:
        notes, self.notes = self.notes, []
        return notes

    # ------------------------------------------------------------------ queueing

    def _control_queued(self) -> bool:
        return any(e.kind == "control" for e in queue.pending(self.layout) + queue.running(self.layout))

    def _queue_control(self) -> None:
        if self.failed_controls >= MAX_FAILED_CONTROLS:
            self.notes.append(f"the baseline failed its last {self.failed_controls} control runs: see "
                              f"`python -m scheduler show {self.baseline()}` and fix train.py")
            return
        self.controls += 1
        queue.push(self.layout, queue.Entry(
            trial_id=f"{self.baseline()}-c{self.controls}", candidate_id=self.baseline(), kind="control",
            source_sha256=self.baseline_sha, agent="baseline", parent=self.baseline(),
            description="control run of the baseline", seed=sum(len(self.rule.baseline_scores(g)) for g in self.rule.gpus()),
            submitted_at=time.time(), score_test=self.baseline() not in self.test_scored), priority=queue.URGENT)
        self.trials_since_control = 0
        self._save()

    # ------------------------------------------------------------------ decisions

    def record(self, row: dict) -> dict:
        """Take one finished trial's row; returns what was decided."""
        gpu, kind, status = row.get("gpu_name") or "unknown", row["kind"], row["status"]
        if row["trial_id"] == self.last_recorded:
            return {"decision": "already recorded"}
        self.last_recorded = row["trial_id"]
        if kind == "control":
            if row.get("baseline") != self.baseline():
                return {"decision": "control run of an older baseline, not counted"}
            if status == "ok":
                self.failed_controls = 0
                self.rule.add_baseline_score(gpu, row["val_bpc"])
                if row.get("test_bpc") is not None and self.baseline() not in self.test_scored:
                    self.test_scored.append(self.baseline())
                self._save()
                return self._rejudge_waiting(gpu)
            self.failed_controls += 1
            self._save()
            return {"decision": "control run not counted", "status": status}

        self.trials_since_control += 1
        candidate = self.candidates.setdefault(row["candidate_id"], {"scores": {}, "outstanding": 0, "done": False,
                                                                      "meta": {}})
        candidate["meta"] = {k: row.get(k) for k in ("agent", "description", "source_sha256", "parent")}
        if kind == "confirm":
            candidate["outstanding"] = max(0, candidate["outstanding"] - 1)
        if candidate["done"]:
            self._save()
            return {"decision": "already decided"}
        if status == "ok":
            candidate["scores"].setdefault(gpu, []).append(row["val_bpc"])
        decision = self._judge(row["candidate_id"], gpu)
        if self.rule.wants_control(gpu, self.trials_since_control) and not self._control_queued():
            self._queue_control()
        self._save()
        return decision

    def _rejudge_waiting(self, gpu: str) -> dict:
        decisions = {}
        for cid, candidate in self.candidates.items():
            if not candidate["done"] and candidate["scores"].get(gpu) and candidate["outstanding"] == 0:
                decisions[cid] = self._judge(cid, gpu)
        self._save()
        return {"decision": "baseline scored", "rejudged": decisions}

    def _judge(self, cid: str, gpu: str) -> dict:
        candidate = self.candidates[cid]
        scores = candidate["scores"].get(gpu, [])
        if not scores:
            if candidate["outstanding"] == 0:
                candidate["done"] = True
                return {"decision": "reject", "reason": "no successful run to judge"}
            return {"decision": "pending", "reason": "no successful run yet"}
        judgement = self.rule.judge(gpu, scores)
        verdict = judgement.verdict
        if verdict == Verdict.PENDING and not self.rule.baseline_scores(gpu):
            if not self._control_queued():
                self._queue_control()
        elif verdict == Verdict.PENDING and candidate["outstanding"] == 0:
            verdict = Verdict.REJECT  # its reruns failed: nothing more will come
        if verdict == Verdict.CONFIRM:
            if judgement.control and not self._control_queued():
                self._queue_control()  # queued first, so the baseline's run comes before the reruns
            for i in range(judgement.reruns):
                run = len(scores) + candidate["outstanding"] + 1
                meta = candidate["meta"]
                queue.push(self.layout, queue.Entry(
                    trial_id=f"{cid}-r{run}", candidate_id=cid, kind="confirm", source_sha256=meta["source_sha256"],
                    agent=meta["agent"] or "", parent=meta["parent"] or "", description=meta["description"] or "",
                    seed=run - 1, submitted_at=time.time()), priority=queue.URGENT)
                candidate["outstanding"] += 1
        elif verdict == Verdict.PROMOTE:
            self._promote(cid, gpu, scores, judgement)
        elif verdict == Verdict.REJECT:
            candidate["done"] = True
            queue.drop(self.layout, cid)
            self.rule.add_within_variance(gpu, scores)
        return {"decision": verdict.value, "reason": judgement.reason}

    def _promote(self, cid: str, gpu: str, scores: list[float], judgement) -> None:
        candidate = self.candidates[cid]
        source = (self.layout.sources / f"{candidate['meta']['source_sha256']}.py").read_bytes()
        old = self.baseline()
        self._archive_baseline(source)
        self._write_train_py(source)
        self.baseline_sha, self.failed_controls = sha256_bytes(source), 0
        self.rule.promote(gpu, scores)
        candidate["done"] = True
        queue.drop(self.layout, cid)
        meta = candidate["meta"]
        results.write_promotion(self.layout.results, {
            "promoted_at": results.now(), "candidate_id": cid, "agent": meta["agent"],
            "description": meta["description"], "old_baseline": old, "new_baseline": self.baseline(),
            "gpu_name": gpu, "old_mean": judgement.baseline_mean, "new_mean": judgement.candidate_mean,
            "gain": judgement.baseline_mean - judgement.candidate_mean, "n_candidate": judgement.n_candidate,
            "n_baseline": judgement.n_baseline, "sigma": judgement.sigma, "threshold": judgement.threshold,
            "reason": judgement.reason,
        })
        if self.git_commit:
            self._commit(cid, meta, judgement)

    def _write_train_py(self, source: bytes) -> None:
        """Replace train.py atomically: temporary file, fsync, rename, under a lock shared with readers."""
        path = self.layout.baseline
        with FileLock(str(self.layout.results / "train.py.lock")):
            tmp = path.with_name(f".{path.name}.tmp")
            with open(tmp, "wb") as out:
                out.write(source)
                out.flush()
                os.fsync(out.fileno())
            os.replace(tmp, path)

    def _commit(self, cid: str, meta: dict, judgement) -> None:
        message = (f"Promote {cid} ({meta['agent']}): {meta['description']}\n\n"
                   f"val bpc {judgement.baseline_mean:.4f} -> {judgement.candidate_mean:.4f} "
                   f"(gain {judgement.baseline_mean - judgement.candidate_mean:.4f}, n={judgement.n_candidate})")
        done = subprocess.run(["git", "commit", "-m", message, "--", "train.py"], cwd=self.layout.root,
                              capture_output=True, text=True)
        if done.returncode != 0:
            self.notes.append(f"git commit of the promotion failed: {done.stderr.strip()[:200]}")

    # ------------------------------------------------------------------ reading

    def summary(self) -> dict:
        return {"baseline": self.baseline(), "baseline_sha": self.baseline_sha,
                "scores": {g: self.rule.baseline_scores(g) for g in self.rule.gpus()},
                "sigma": {g: self.rule.sigma(g) for g in self.rule.gpus()},
                "undecided": [c for c, v in self.candidates.items() if not v["done"]],
                "notes": self._take_notes()}


def selection_actor(root: str, rule: dict, git_commit: bool):
    """The named actor, created if absent; Ray restarts it if it dies (its state is on disk)."""
    import ray

    return ray.remote(Selection).options(
        name=ACTOR_NAME, get_if_exists=True, max_restarts=-1, max_task_retries=3, num_cpus=0,
    ).remote(root, rule, git_commit)
