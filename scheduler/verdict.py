"""The selection's verdict on a candidate, with the figures it was judged on, read from files alone (no Ray).

    pending     not judged yet: queued, running, or scored while the baseline has no score on its GPU type
    confirming  its first run screened well: reruns with other seeds are queued or running
    rejected    not reliably better than the baseline, or no run of it gave a score (judged by the selection),
                or the file failed intake (`by` says which)
    promoted    it became the baseline

    from scheduler.verdict import load_state, verdict_of
    verdict_of(layout, load_state(layout), "20260101-120000-abcdef", rows)
    # {"verdict": "rejected", "by": "selection", "reason": "mean 0.7641 vs baseline 0.7600 (...): does not screen",
    #  "gpu": "NVIDIA H200", "candidate_mean": 0.7641, "baseline_mean": 0.76, "gain": -0.0041, "n_candidate": 1,
    #  "n_baseline": 5, "sigma": 0.004, "threshold": 0.0036}

The selection actor keeps each candidate's verdict and figures in results/selection.json
(scheduler/selection.py, `Candidate.verdict` and `Candidate.judged`); `verdict_of` is the one
place that turns them, or their absence, into what `wait`, `show` and `results` print.
"""

from __future__ import annotations

from scheduler.layout import Layout
from scheduler.selection import (CONFIRMING, JUDGED, PENDING, PROMOTED, REJECTED, VERDICTS,  # noqa: F401
                                 Candidate, State)

SELECTION, INTAKE = "selection", "intake"  # who judged: the `by` of a verdict
# a state written before the selection kept verdicts: the decision is known, its figures are not
NO_FIGURES = "decided before the selection kept its figures"


def load_state(layout: Layout) -> State | None:
    """The selection's saved state; None before the first launch."""
    return State.load(layout.selection_state) if layout.selection_state.exists() else None


def verdict_of(layout: Layout, state: State | None, candidate_id: str, rows: list[dict]) -> dict | None:
    """The verdict on a candidate (see the module docstring), from the selection's saved state and the
    candidate's rows (results.read_rows); None for a baseline's control runs, which are not judged."""
    if any(row["kind"] == "control" for row in rows):
        return None
    candidate = state.candidates.get(candidate_id) if state else None
    if candidate is None:
        refused = [row for row in rows if row["status"] == "rejected"]
        if refused:
            return _verdict(REJECTED, INTAKE, refused[-1]["reason"])
        return _verdict(PENDING, SELECTION, "not judged yet: its first run is queued or running" if not rows
                        else "not judged yet")
    if candidate.verdict is not None:
        return _verdict(candidate.verdict, SELECTION, **(candidate.judged or {}))
    return _legacy(layout, candidate)


def _verdict(verdict: str, by: str, reason: str | None = None, gpu: str | None = None, **figures) -> dict:
    figures = {k: figures.get(k) for k in JUDGED}
    mean, base = figures["candidate_mean"], figures["baseline_mean"]
    return {"verdict": verdict, "by": by, "reason": reason, "gpu": gpu, **figures,
            "gain": None if mean is None or base is None else base - mean}


def _legacy(layout: Layout, candidate: Candidate) -> dict:
    """A candidate of a state file written before verdicts were kept: decided and promoted when its source
    became a baseline (every baseline is archived by its sha256), decided and rejected otherwise."""
    if not candidate.done:
        verdict = CONFIRMING if candidate.outstanding else PENDING
        return _verdict(verdict, SELECTION, NO_FIGURES)
    promoted = bool(candidate.source_sha256) and (layout.baselines / f"{candidate.source_sha256}.py").exists()
    return _verdict(PROMOTED if promoted else REJECTED, SELECTION, NO_FIGURES)


def describe(verdict: dict) -> str:
    """One line for people: the verdict, who gave it, and why with the figures."""
    who = "at intake" if verdict["by"] == INTAKE else "by the selection"
    if verdict["verdict"] == PENDING:
        return f"pending: {verdict['reason']}"
    return f"{verdict['verdict']} {who}: {verdict['reason']}"
