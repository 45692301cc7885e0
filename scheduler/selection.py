"""The selection actor: the only writer of the baseline.

Every finished trial is sent here (`record`). Scores feed the promotion rule
in scheduler/promotion.py; its verdicts queue confirmation reruns (ahead of
new candidates), drop reruns that are no longer needed, or promote: the
candidate's archived source, checked against its sha256 name, becomes train.py
through scheduler/custody.py (archived, replaced atomically under a lock), and a
lineage row is written with the diff. Control runs of the baseline are queued
when the rule wants them (first of all when the baseline has no score yet), and
count only for the baseline whose source they ran. The first control run of
each baseline also scores the test split, once: a fresh run, not one selected
for a good score, so the lineage shows whether gains on validation hold on test.

`sync_baseline` (launch start, and before each trial) compares train.py with
the baseline: an edit by hand is adopted as the new, unscored baseline and
recorded in the lineage as a hand edit with its diff; a broken or missing
train.py is restored from the archive.

Each judgement leaves its verdict on the candidate (pending, confirming,
rejected, promoted) with the figures it was judged on (`Candidate.verdict`,
`Candidate.judged`): `wait`, `show` and `results` read them through
scheduler/verdict.py, without Ray.

A first run the early-stop rule would have stopped that scores within its
noise of the baseline (an audited run of `launch --early-stop on`, or any run
in shadow mode) refutes the baseline's reference curves: in mode `on` the
searcher then judges no more candidates against them, and the candidates they
stopped run again, as confirmation reruns (`_audit`; scheduler/earlystop.py).

The parts, in the order of the file: `Candidate` and `State`, what is kept;
`rule_on`, the rule's answer on one candidate; `BaselineKeeper`, the baseline's
side (its changes, the lineage, its control runs); `Selection`, the actor, which
records rows, acts on the rulings and saves.

All state lives in results/selection.json (`State`), rewritten after every
change, so a relaunch, or Ray restarting a killed actor, restores it exactly.
In Ray the class runs as one named actor, `selection` (see `selection_actor`).
"""

from __future__ import annotations

import ast
import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from statistics import fmean

from scheduler import queue, results
from scheduler.atomic import atomic_write
from scheduler.custody import Custody, SourceRefused, baseline_diff, diff_size
from scheduler.earlystop import STOPPED_EARLY, WRONG_STOP_SIGMAS
from scheduler.intake import defines_build_model
from scheduler.layout import Layout, baseline_id, sha256_bytes
from scheduler.promotion import Judgement, PromotionRule, RuleConfig, Verdict

ACTOR_NAME = "selection"
MAX_FAILED_CONTROLS = 2  # a baseline that fails this many control runs in a row is not run again by itself
HAND_EDIT = "edited by hand"  # the description of a hand edit in the lineage
PENDING, CONFIRMING, REJECTED, PROMOTED = VERDICTS = ("pending", "confirming", "rejected", "promoted")
# the figures a verdict was judged on, as Judgement names them; nan (no baseline score yet) is kept as None
JUDGED = ("candidate_mean", "baseline_mean", "n_candidate", "n_baseline", "sigma", "threshold")


@dataclass
class Candidate:
    """What the selection knows of one candidate: its scores per GPU type, its reruns still to come, whether
    it is decided, and what its rows said of it (for its reruns and its promotion)."""
    scores: dict[str, list[float]] = field(default_factory=dict)
    runs: int = 0  # rows recorded, failed runs included (numbers its reruns)
    outstanding: int = 0
    done: bool = False
    agent: str | None = None
    description: str | None = None
    source_sha256: str | None = None
    parent: str | None = None
    # the verdict (one of VERDICTS) and the figures it was judged on (JUDGED): what `wait`, `show` and `results`
    # report through scheduler/verdict.py; None in files written before verdicts were kept
    verdict: str | None = None
    judged: dict | None = None
    stopped_by: str | None = None  # the baseline whose reference curves stopped its first run early
    excused: int = 0               # its runs stopped by a reference later refuted: not failures

    def failed(self) -> int:
        """Its runs that gave no score, and no fault of its own."""
        return self.runs - sum(len(s) for s in self.scores.values()) - self.excused

    def take(self, row: dict, gpu: str) -> None:
        """Count one finished run of it (a first run or a rerun) and its score, if it scored."""
        self.runs += 1
        self.agent, self.description = row.get("agent"), row.get("description")
        self.source_sha256, self.parent = row.get("source_sha256"), row.get("parent")
        if row["kind"] == "confirm":
            self.outstanding = max(0, self.outstanding - 1)
        if row["status"] == STOPPED_EARLY:
            self.stopped_by = row.get("baseline")
        if row["status"] == "ok" and not self.done:
            self.scores.setdefault(gpu, []).append(row["val_bpc"])

    def keep_verdict(self, ruling: Ruling, gpu: str) -> None:
        """Keep the verdict and the figures it was judged on (nan, no baseline score yet, kept as None)."""
        if ruling.verdict == Verdict.PROMOTE:
            self.verdict = PROMOTED
        elif ruling.verdict == Verdict.REJECT:
            self.verdict = REJECTED
        else:  # confirm, or pending: waiting for its reruns, or for a score of the baseline
            self.verdict = CONFIRMING if self.outstanding else PENDING
        figures = {k: getattr(ruling.judgement, k) for k in JUDGED} if ruling.judgement else {}
        self.judged = {"gpu": gpu, "reason": ruling.reason, **dict.fromkeys(JUDGED),
                       **{k: None if isinstance(v, float) and math.isnan(v) else v for k, v in figures.items()}}

    @classmethod
    def from_saved(cls, saved: dict) -> "Candidate":
        """From selection.json; files written before this class kept the row's fields under "meta" and did not
        count runs (their scores are the best count there is)."""
        runs = saved.get("runs", sum(len(s) for s in saved["scores"].values()))
        return cls(**{k: v for k, v in saved.items() if k not in ("meta", "runs")}, **saved.get("meta", {}),
                   runs=runs)


@dataclass
class State:
    """Everything the selection actor keeps in results/selection.json."""
    rule: dict = field(default_factory=dict)  # PromotionRule.to_dict(): baseline scores and noise, per GPU type
    rule_config: dict = field(default_factory=dict)  # the rule's settings (`status` reads them)
    baseline_sha: str | None = None
    candidates: dict[str, Candidate] = field(default_factory=dict)
    trials_since_control: int = 0
    controls: int = 0  # control runs queued so far (numbers their trial ids)
    failed_controls: int = 0  # in a row, of the current baseline
    test_scored: list[str] = field(default_factory=list)  # baselines scored on the test split
    # Ray re-sends a call that was running when the actor died: the one trial recorded last is not counted twice
    last_recorded: str | None = None
    # set while a promotion replaces train.py: an actor that died meanwhile finishes the job when it restarts
    installing: bool = False
    refuted: list[str] = field(default_factory=list)  # baselines whose reference curves stopped a run wrongly

    @classmethod
    def load(cls, path: Path) -> "State":
        if not path.exists():
            return cls()
        saved = json.loads(path.read_text())
        state = cls(**{f.name: saved[f.name] for f in fields(cls) if f.name in saved})
        state.candidates = {cid: Candidate.from_saved(c) for cid, c in state.candidates.items()}
        return state

    def save(self, path: Path) -> None:
        atomic_write(path, json.dumps(asdict(self), indent=1))


def saved_rule(state_path: Path) -> PromotionRule | None:
    """The promotion rule as the selection actor last saved it (settings, scores, noise); None before any launch."""
    if not state_path.exists():
        return None
    state = State.load(state_path)
    return PromotionRule(RuleConfig(**state.rule_config), state.rule)


def usable_baseline(source: bytes) -> str | None:
    """Why this train.py cannot be the baseline, or None when it can."""
    try:
        tree = ast.parse(source.decode("utf-8"))
    except (UnicodeDecodeError, SyntaxError) as error:
        return f"it does not parse ({error})"
    if not defines_build_model(tree):
        return "it has no module-level build_model()"
    return None


@dataclass
class Ruling:
    """What the selection does about one candidate after asking the rule (`rule_on`)."""
    verdict: Verdict
    reason: str
    judgement: Judgement | None = None  # the rule's, when the candidate had scores to judge
    reruns: int = 0                     # confirmation reruns to queue now
    control: bool = False               # a control run of the baseline to queue first


def rule_on(candidate: Candidate, gpu: str, rule: PromotionRule) -> Ruling:
    """The promotion rule's answer on one candidate's scores on one GPU type, corrected for what the rule does not
    see: runs of it that failed, and reruns still to come."""
    scores = candidate.scores.get(gpu, [])
    if not scores:
        if candidate.outstanding == 0:
            return Ruling(Verdict.REJECT, "no successful run to judge: every run of it failed")
        return Ruling(Verdict.PENDING, "no successful run yet")
    judgement = rule.judge(gpu, scores)
    verdict, reason = judgement.verdict, judgement.reason
    if verdict == Verdict.PENDING and not rule.baseline_scores(gpu):
        return Ruling(verdict, reason, judgement, control=True)  # the baseline's first score comes first
    if verdict == Verdict.PENDING and candidate.outstanding == 0:
        verdict = Verdict.REJECT  # its reruns failed: nothing more will come
    elif verdict == Verdict.CONFIRM and len(scores) == 1 and candidate.failed():
        # its first run screened and its reruns so far all failed (crashed, refused): screening it again would
        # queue reruns for ever; it is rejected once those still queued are in, unless one of them scores
        verdict = Verdict.PENDING if candidate.outstanding else Verdict.REJECT
        reason = "its first run screened well, and its reruns failed" if verdict == Verdict.REJECT else reason
    if verdict == Verdict.CONFIRM:
        return Ruling(verdict, reason, judgement, reruns=judgement.reruns, control=judgement.control)
    return Ruling(verdict, reason, judgement)


def queue_reruns(layout: Layout, cid: str, candidate: Candidate, n: int) -> None:
    """Queue `n` confirmation reruns of a candidate, ahead of new candidates, each with a seed of its own."""
    for _ in range(n):
        run = candidate.runs + candidate.outstanding + 1
        queue.push(layout, queue.Entry(
            trial_id=f"{cid}-r{run}", candidate_id=cid, kind="confirm", source_sha256=candidate.source_sha256,
            agent=candidate.agent or "", parent=candidate.parent or "", description=candidate.description or "",
            seed=run - 1, submitted_at=time.time()), priority=queue.URGENT)
        candidate.outstanding += 1


class BaselineKeeper:
    """The baseline's side of the selection: which train.py is the baseline (`State.baseline_sha`), its control
    runs, and each change of it (adopted, edited by hand, promoted to, restored), archived and installed through
    custody (scheduler/custody.py) and written to the lineage with its diff. It never saves the state itself
    except where a write of train.py must follow the save (`promote`, `restore`); Selection saves the rest."""

    def __init__(self, layout: Layout, state: State, custody: Custody, notes: list[str],
                 save: Callable[[], None]) -> None:
        self.layout, self.state, self.custody, self.notes, self.save = layout, state, custody, notes, save

    @property
    def id(self) -> str:
        return baseline_id(self.state.baseline_sha)

    def adopt(self, source: bytes) -> None:
        """The first baseline of this results folder."""
        self.state.baseline_sha = self.custody.archive(source)

    def restore(self, why: str) -> None:
        try:
            self.custody.restore(self.state.baseline_sha)
        except SourceRefused as refused:
            self.notes.append(f"{why}, and it cannot be restored: {refused}. Put a working train.py back by hand")
            return
        self.state.installing = False
        self.save()
        self.notes.append(f"{why}; restored baseline {self.id} from the archive")

    def record_hand_edit(self, source: bytes) -> None:
        """train.py was changed outside the selection actor: it becomes the baseline, recorded as a hand edit."""
        old, diff = self._change(source)
        results.write_promotion(self.layout.results, {
            "promoted_at": results.now(), "kind": "hand_edit", "description": HAND_EDIT, "old_baseline": old,
            "new_baseline": self.id, "diff": diff})
        added, removed = diff_size(diff)
        self.notes.append(f"train.py was edited by hand: baseline {old} -> {self.id} (+{added} -{removed} "
                          f"lines), recorded in the lineage with its diff (`python -m scheduler baseline`); "
                          f"it is unscored until its control runs")

    def promote(self, cid: str, candidate: Candidate, gpu: str, judgement: Judgement, source: bytes) -> None:
        """Make the candidate's `source` the baseline: lineage, archive, train.py, and the optional git commit."""
        old, diff = self._change(source)
        gain = judgement.baseline_mean - judgement.candidate_mean
        # Lineage first, then the state saved as installing, then train.py: an actor killed in between finishes
        # the install when it restarts (sync_baseline), instead of taking the old train.py for a hand edit.
        results.write_promotion(self.layout.results, {
            "promoted_at": results.now(), "kind": "promotion", "candidate_id": cid, "agent": candidate.agent,
            "description": candidate.description, "old_baseline": old, "new_baseline": self.id,
            "gpu_name": gpu, "old_mean": judgement.baseline_mean, "new_mean": judgement.candidate_mean,
            "gain": gain, "n_candidate": judgement.n_candidate, "n_baseline": judgement.n_baseline,
            "sigma": judgement.sigma, "threshold": judgement.threshold, "reason": judgement.reason, "diff": diff,
        })
        self.state.installing = True
        self.save()
        self.custody.install(source)
        self.state.installing = False
        failed = self.custody.commit(
            f"Promote {cid} ({candidate.agent}): {candidate.description}\n\n"
            f"val bpc {judgement.baseline_mean:.4f} -> {judgement.candidate_mean:.4f} "
            f"(gain {gain:.4f}, n={judgement.n_candidate})")
        if failed:
            self.notes.append(f"git commit of the promotion failed: {failed}")

    def _change(self, source: bytes) -> tuple[str, str]:
        """Archive `source` and make it the baseline; returns the old baseline's id and the diff from it. Control
        runs of the old baseline still queued are dropped: they would score a model that is no longer the
        baseline."""
        old_sha, old = self.state.baseline_sha, self.id
        new_sha = self.custody.archive(source)
        try:
            diff = baseline_diff(self.custody.baseline_source(old_sha), source, old, baseline_id(new_sha))
        except SourceRefused as refused:
            diff = f"no diff: {refused}"
        queue.drop(self.layout, old)
        self.state.baseline_sha, self.state.failed_controls = new_sha, 0
        return old, diff

    def control_queued(self) -> bool:
        """Is a control run of the current baseline queued or running?"""
        return any(e.kind == "control" and e.candidate_id == self.id
                   for e in queue.pending(self.layout) + queue.running(self.layout))

    def queue_control(self, seed: int) -> None:
        if self.state.failed_controls >= MAX_FAILED_CONTROLS:
            self.notes.append(f"the baseline failed its last {self.state.failed_controls} control runs: see "
                              f"`python -m scheduler show {self.id}` and fix train.py")
            return
        self.state.controls += 1
        queue.push(self.layout, queue.Entry(
            trial_id=f"{self.id}-c{self.state.controls}", candidate_id=self.id, kind="control",
            source_sha256=self.state.baseline_sha, agent="baseline", parent=self.id,
            description="control run of the baseline", seed=seed, submitted_at=time.time(),
            score_test=self.id not in self.state.test_scored),
            priority=queue.URGENT)
        self.state.trials_since_control = 0

    def count_control(self, row: dict) -> dict | None:
        """Take a control run's row: None when its score counts for the baseline, else the decision saying why
        not. A control run's candidate_id is the baseline whose source it ran: one queued before a promotion or
        a hand edit and run after it scored the old model, whatever baseline was current when it started."""
        if row["candidate_id"] != self.id:
            return {"decision": f"control run of {row['candidate_id']}, not the current baseline: not counted"}
        if row["status"] != "ok":
            self.state.failed_controls += 1
            return {"decision": "control run not counted", "status": row["status"]}
        self.state.failed_controls = 0
        if row.get("test_bpc") is not None and self.id not in self.state.test_scored:
            self.state.test_scored.append(self.id)
        return None


class Selection:
    """The promotion rule's state and its decisions on candidates; the baseline's side is its BaselineKeeper."""

    def __init__(self, root: str, rule: dict | None = None, git_commit: bool = False) -> None:
        self.layout = Layout.at(root)
        self.custody = Custody(self.layout, git_commit)
        self.rule_config = RuleConfig(**(rule or {}))
        self.state = State.load(self.layout.selection_state)
        self.rule = PromotionRule(self.rule_config, self.state.rule)
        self.notes: list[str] = []
        self.keeper = BaselineKeeper(self.layout, self.state, self.custody, self.notes, self._save)

    def _save(self) -> None:
        self.state.rule, self.state.rule_config = self.rule.to_dict(), asdict(self.rule_config)
        self.state.save(self.layout.selection_state)

    def baseline(self) -> str:
        return self.keeper.id

    def sync_baseline(self) -> dict:
        """Check train.py against the recorded baseline (launch start, and before each trial): an edit by hand
        that still works becomes the new, unscored baseline, recorded in the lineage with its diff; a missing or
        broken train.py is restored from the archive. The notes say what happened."""
        if self.state.installing:
            self.keeper.restore("the selection actor stopped while it installed a promotion")
        source = self.custody.current()
        problem = "it is missing" if source is None else usable_baseline(source)
        if problem is None:
            if sha256_bytes(source) != self.state.baseline_sha:
                if self.state.baseline_sha:
                    self.keeper.record_hand_edit(source)
                    self.rule.new_baseline()  # the old scores belong to another model: it starts unscored
                else:
                    self.keeper.adopt(source)
                self._save()
        elif self.state.baseline_sha:
            self.keeper.restore(f"train.py was unusable ({problem})")
        else:
            raise RuntimeError(f"{self.layout.baseline} cannot be the baseline: {problem}. Put a working train.py "
                               f"there.")
        if not self.rule.gpus() and not self.keeper.control_queued():
            self._queue_control()  # the first thing to do with an unscored baseline: run it
        return {"baseline": self.baseline(), "sha": self.state.baseline_sha, "notes": self._take_notes(),
                "refuted": self.baseline() in self.state.refuted}

    def _take_notes(self) -> list[str]:
        notes = self.notes[:]
        self.notes.clear()  # the keeper holds the same list
        return notes

    def _queue_control(self) -> None:
        self.keeper.queue_control(seed=sum(len(self.rule.baseline_scores(g)) for g in self.rule.gpus()))
        self._save()

    def record(self, row: dict) -> dict:
        """Take one finished trial's row; returns what was decided."""
        gpu, kind = row.get("gpu_name") or "unknown", row["kind"]
        if row["trial_id"] == self.state.last_recorded:
            return {"decision": "already recorded"}
        self.state.last_recorded = row["trial_id"]
        if kind == "control":
            return self._record_control(row, gpu)

        self.state.trials_since_control += 1
        candidate = self.state.candidates.setdefault(row["candidate_id"], Candidate())
        candidate.take(row, gpu)
        if row["status"] == STOPPED_EARLY and row.get("baseline") in self.state.refuted:
            # stopped by curves already refuted: a trial that was handed them before the refutation, its row late
            self._excuse(row["candidate_id"], candidate)
        self._audit(row, gpu)
        if candidate.done:
            self._save()
            return {"decision": "already decided"}
        decision = self._judge(row["candidate_id"], gpu)
        if self.rule.wants_control(gpu, self.state.trials_since_control) and not self.keeper.control_queued():
            self._queue_control()
        self._save()
        return decision

    def _record_control(self, row: dict, gpu: str) -> dict:
        not_counted = self.keeper.count_control(row)
        if not_counted:
            self._save()
            return not_counted
        self.rule.add_baseline_score(gpu, row["val_bpc"])
        self._save()
        decisions = {cid: self._judge(cid, gpu) for cid, candidate in self.state.candidates.items()
                     if not candidate.done and candidate.scores.get(gpu) and candidate.outstanding == 0}
        self._save()
        return {"decision": "baseline scored", "rejudged": decisions}

    def _audit(self, row: dict, gpu: str) -> None:
        """A scored run that the early-stop rule would have stopped against the current baseline's curves and
        that ended within WRONG_STOP_SIGMAS σ of the baseline, or better, refutes those curves (honest noise, or a
        baseline printing its loss lower than it is): they stop nothing more, and every candidate they stopped
        gets a rerun (its stopped run no fault of its own)."""
        base, scores = self.keeper.id, self.rule.baseline_scores(gpu)
        would_stop = row["status"] == "ok" and row.get("early_stop_at") is not None and row.get("baseline") == base
        if not would_stop or base in self.state.refuted or not scores:
            return
        if row["val_bpc"] > fmean(scores) + WRONG_STOP_SIGMAS * self.rule.sigma(gpu):
            return  # a right stop
        self.state.refuted.append(base)
        reopened = [cid for cid, c in self.state.candidates.items() if c.stopped_by == base and c.done
                    and not any(c.scores.values())]
        for cid in reopened:
            self._excuse(cid, self.state.candidates[cid])
        self.notes.append(f"{row['trial_id']} scored {row['val_bpc']:.4f} bpc, within the noise of baseline {base}, "
                          f"where the early-stop rule would have stopped it: the rule stops nothing more against "
                          f"this baseline's curves, and {len(reopened)} candidate(s) they stopped run again")

    def _excuse(self, cid: str, candidate: Candidate) -> None:
        """A candidate whose first run refuted curves stopped: that run is not held against it, and it runs again."""
        candidate.done, candidate.stopped_by, candidate.excused = False, None, candidate.excused + 1
        queue_reruns(self.layout, cid, candidate, 1)
        candidate.verdict = CONFIRMING

    def _judge(self, cid: str, gpu: str) -> dict:
        """Ask the rule about a candidate and act on its answer; the candidate keeps the verdict and its figures."""
        candidate = self.state.candidates[cid]
        ruling = rule_on(candidate, gpu, self.rule)
        if ruling.control and not self.keeper.control_queued():
            self._queue_control()  # queued first, so the baseline's run comes before the reruns
        queue_reruns(self.layout, cid, candidate, ruling.reruns)
        if ruling.verdict == Verdict.PROMOTE:
            refused = self._promote(cid, gpu, ruling.judgement)
            if refused:
                ruling = Ruling(Verdict.REJECT, refused, ruling.judgement)
        elif ruling.verdict == Verdict.REJECT:
            candidate.done = True
            if ruling.judgement:  # rejected on its scores, which are noise evidence (not for having none)
                queue.drop(self.layout, cid)
                self.rule.add_within_variance(gpu, candidate.scores[gpu])
        candidate.keep_verdict(ruling, gpu)
        return {"decision": ruling.verdict.value, "reason": ruling.reason, "verdict": candidate.verdict}

    def _promote(self, cid: str, gpu: str, judgement: Judgement) -> str | None:
        """Make the candidate the baseline; returns why not when its archived source is refused (it is then
        rejected, and its scores are not kept as noise evidence: they may not be of the source's model)."""
        candidate = self.state.candidates[cid]
        candidate.done = True
        queue.drop(self.layout, cid)
        try:
            source = self.custody.candidate_source(candidate.source_sha256)
        except SourceRefused as refused:
            reason = f"promotion refused: {refused}"
            self.notes.append(f"{cid} ({candidate.agent}) was not promoted: {reason}")
            return reason
        self.rule.promote(gpu, candidate.scores[gpu])
        self.keeper.promote(cid, candidate, gpu, judgement, source)
        return None

    def summary(self) -> dict:
        return {"baseline": self.baseline(), "baseline_sha": self.state.baseline_sha,
                "scores": {g: self.rule.baseline_scores(g) for g in self.rule.gpus()},
                "sigma": {g: self.rule.sigma(g) for g in self.rule.gpus()},
                "undecided": [c for c, v in self.state.candidates.items() if not v.done],
                "notes": self._take_notes()}


def selection_actor(root: str, rule: dict, git_commit: bool):
    """The named actor, created if absent; Ray restarts it if it dies (its state is on disk). It runs on the
    caller's node (launch's), also in a cluster: it writes train.py and results/ under the root there."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    here = NodeAffinitySchedulingStrategy(ray.get_runtime_context().get_node_id(), soft=False)
    return ray.remote(Selection).options(
        name=ACTOR_NAME, get_if_exists=True, max_restarts=-1, max_task_retries=3, num_cpus=0,
        scheduling_strategy=here,
    ).remote(root, rule, git_commit)
