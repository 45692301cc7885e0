"""Early stopping against the baseline's curve: a candidate whose training loss runs far above the baseline's,
at equal counted training seconds, is stopped before its budget is spent (issue 22, part 2).

    from scheduler.earlystop import Curve, Reference, stop_window
    curve = Curve(budget=300.0)
    curve.add(training_seconds=91.2, loss=1.31)    # from each progress line
    reference = Reference.of([control_curve, ...])  # the current baseline's control runs on this GPU type
    stop_window(curve.values(), reference)          # None, or the window at whose end the rule stops it

A curve is the mean training loss in each of CURVE_WINDOWS equal windows of the budget's counted seconds (the
progress lines' `training_seconds`, the harness's clock), None where no progress line fell. The reference is the
mean and spread of the curves of the baseline's runs (its control runs, and the runs that made it the baseline),
window by window. A candidate is stopped at the end of a
window from MIN_FRACTION of the budget on (before the last), once it has been above the line for CONFIRM_WINDOWS
windows in a row:

    line(f) = reference mean * (1 + margin(f)) + SPREAD_SIGMAS * reference spread,
    margin(f) = MARGIN_LATE + (MARGIN_EARLY - MARGIN_LATE) * (1 - f) / (1 - MIN_FRACTION)

f being the window's end as a fraction of the budget: the margin is widest early, where learning-rate schedules
and warm-down make curves cross, and narrowest at the end. A window above the line counts as below it while the
candidate is catching up: if CATCH_UP of the pace at which its relative gap to the reference's mean closed since
the last earlier window, kept to the end of the budget, would bring the gap within MARGIN_LATE (a wider model
starts slower and ends level). With no reference (fewer than MIN_CURVES control runs of this baseline on this GPU
type have a curve) nothing is stopped. docs/design.md, "Early stopping", says why these numbers.

Which trials the rule judges, and where curves come from (the trust model): only first runs of candidates are
judged (never control runs, never confirmation reruns of a candidate that already scored well). The loss in a
progress line is what the candidate's process printed: a forged curve can keep its own trial from being stopped,
or get it stopped, nothing more. References are built only from runs of the current baseline's own source (its
control runs, and the runs that made it the baseline; matched by the full sha256 the queue entry carries, not by
anything the candidate says), and a curve whose end claims a loss well below the trusted evaluation's score of
its model on windows of the train split (`train_bpc`, ANCHOR_TOLERANCE) is left out.

`launch --early-stop off|shadow|on` (default shadow): `shadow` judges every first run and records in its row when
the rule would have stopped it (`early_stop_at`, counted seconds), and stops nothing; `on` stops it (status
`stopped_early`, not scored, never promoted), except an audit: AUDIT_FRACTION of the runs it would stop, drawn by
the trial, run on as in shadow mode. A baseline's code can print its control runs' curves lower than its model's
loss in mid-budget (the anchor checks only the end) to get honest candidates stopped; an audited run that then
scores within WRONG_STOP_SIGMAS of the baseline shows it, and the selection (scheduler/selection.py) turns the
rule off for that baseline and runs its stopped candidates again.
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterable
from dataclasses import dataclass

CURVE_WINDOWS = 20       # a curve holds the mean loss in each 5% of the budget (15 s of a 300 s budget)
MIN_FRACTION = 0.3       # nothing is stopped before 30% of the budget: early curves cross
MARGIN_EARLY = 0.05      # relative excess over the reference's mean tolerated at MIN_FRACTION ...
MARGIN_LATE = 0.04       # ... narrowing linearly to this at the end of the budget: weight decay 0.3 ran 4-5.5% above
                         # the baseline's training loss through the middle of a 300 s H200 run and ended 3.3 σ
                         # better; 3.5% -> 3% stopped it (docs/design.md, "A regulariser that ends better")
SPREAD_SIGMAS = 3.0      # and on top, this many times the control runs' spread in that window
CONFIRM_WINDOWS = 2      # windows in a row above the line before a stop: one noisy window stops nothing
CATCH_UP = 0.25          # a candidate closing its gap is credited with this share of its latest pace to the end:
                         # the CPU curves' one wrong stop (a wider model, 20% above at 30%, level at the end) needs it
MIN_CURVES = 3           # baseline curves a reference needs: with one, its spread is unknown, and one fast control
                         # run stopped the best CPU candidate (it crossed back below by the end)
ANCHOR_TOLERANCE = 0.10  # a control curve whose last window, in bits, is below the evaluation's score of its model
                         # on text it trained on (train_bpc) by more than this fraction claims a training loss its
                         # model does not have: it is not a reference
BUDGET_MATCH = 0.10      # a reference's runs trained the budget, and at most this fraction ...
OVERSHOOT_S = 5.0        # ... and these seconds more (the last step: 1.5 s on a loaded CPU); budgets in use (300,
                         # 90, 60, 45 s) are further apart
WRONG_STOP_SIGMAS = 3.0  # a stop of a run that ended within this many σ of the baseline's mean, or better, is wrong
                         # (issue 22's bar: none on the recorded curves); report and bench/early_stop_sim.py judge by it
AUDIT_FRACTION = 0.25    # of the runs `on` would stop, those that run on to be scored: a reference that stops runs
                         # wrongly is found after 4 such stops on average, at a quarter of the rule's saving
EARLY_STOP_MODES = ("off", "shadow", "on")
DEFAULT_MODE = "shadow"  # judge and record, stop nothing, until the recorded curves show the rule makes no wrong stop
STOPPED_EARLY = "stopped_early"  # the status of a trial the rule stopped (launch --early-stop on)


def window_of(training_seconds: float, budget: float) -> int:
    """The window a point at `training_seconds` falls in; points past the budget (the last step overshoots it) fall
    in the last."""
    return max(0, min(CURVE_WINDOWS - 1, math.ceil(training_seconds / budget * CURVE_WINDOWS) - 1))


def window_end(index: int, budget: float) -> float:
    """Counted training seconds at the end of window `index`."""
    return (index + 1) * budget / CURVE_WINDOWS


class Curve:
    """The mean loss per window of the budget, built from progress lines; a fixed size whatever is printed."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self._sums = [0.0] * CURVE_WINDOWS
        self._counts = [0] * CURVE_WINDOWS
        self.last_seconds = 0.0  # the latest counted seconds seen: windows that end before it are complete

    def add(self, training_seconds: float, loss: float) -> None:
        """One progress line's point."""
        if not (math.isfinite(training_seconds) and math.isfinite(loss)) or training_seconds <= 0 or self.budget <= 0:
            return
        index = window_of(training_seconds, self.budget)
        if not math.isfinite(self._sums[index] + loss):  # forged figures near the float's limit would sum to inf,
            return                                        # which rows keep and strict JSON readers refuse
        self._sums[index] += loss
        self._counts[index] += 1
        self.last_seconds = max(self.last_seconds, training_seconds)

    def values(self, complete_only: bool = False) -> list[float | None]:
        """The mean loss per window (None where no line fell); with `complete_only`, only windows that ended
        before the latest line, so that a judgement during training sees what the finished curve will hold."""
        shown = CURVE_WINDOWS
        if complete_only:
            shown = sum(1 for i in range(CURVE_WINDOWS) if window_end(i, self.budget) < self.last_seconds)
        return [round(s / c, 5) if c and i < shown else None
                for i, (s, c) in enumerate(zip(self._sums, self._counts))]


@dataclass(frozen=True)
class Reference:
    """The baseline's control curves, window by window: their mean, their spread (0 with one curve) and count."""
    mean: list[float | None]
    spread: list[float]
    curves: int

    @classmethod
    def of(cls, curves: Iterable[list[float | None]]) -> Reference | None:
        curves = [c for c in curves if c and len(c) == CURVE_WINDOWS]
        if len(curves) < MIN_CURVES:
            return None
        mean, spread = [], []
        for i in range(CURVE_WINDOWS):
            values = [c[i] for c in curves if c[i] is not None and math.isfinite(c[i])]
            mean.append(sum(values) / len(values) if values else None)
            spread.append(math.sqrt(sum((v - mean[-1]) ** 2 for v in values) / (len(values) - 1))
                          if len(values) > 1 else 0.0)
        return cls(mean, spread, len(curves))

    def line(self, index: int) -> float | None:
        """The loss above which window `index` counts against a candidate; None where the rule does not look."""
        fraction = (index + 1) / CURVE_WINDOWS
        if self.mean[index] is None or fraction < MIN_FRACTION - 1e-9:
            return None
        margin = MARGIN_LATE + (MARGIN_EARLY - MARGIN_LATE) * (1 - fraction) / (1 - MIN_FRACTION)
        return self.mean[index] * (1 + margin) + SPREAD_SIGMAS * self.spread[index]


def stop_window(curve: list[float | None], reference: Reference | None) -> int | None:
    """The first window at whose end the rule stops this curve, or None. Windows either side lacks are skipped:
    they neither count for nor against it. A window above the line while the curve is `catching_up` counts as
    below it (the windows in a row start again). The last window is not judged: a stop at the budget's end would
    save nothing and cost the run its score."""
    if reference is None:
        return None
    above = 0
    for index, value in enumerate(curve[:CURVE_WINDOWS - 1]):
        line = reference.line(index)
        if line is None or value is None:
            continue
        above = above + 1 if value > line and not catching_up(curve, reference, index) else 0
        if above >= CONFIRM_WINDOWS:
            return index
    return None


def catching_up(curve: list[float | None], reference: Reference, index: int) -> bool:
    """Whether CATCH_UP of the pace (per window) at which the curve's relative gap to the reference's mean closed
    since the last earlier window both have, kept to the end of the budget, brings the gap within MARGIN_LATE. A
    curve that closes fast is not stopped; one that holds its gap or widens it is judged by its line alone."""
    gap = relative_gap(curve, reference, index)
    earlier = next(((i, g) for i in range(index - 1, -1, -1)
                    if (g := relative_gap(curve, reference, i)) is not None), None)
    if gap is None or earlier is None:
        return False
    pace = (gap - earlier[1]) / (index - earlier[0])
    return gap + CATCH_UP * pace * (CURVE_WINDOWS - 1 - index) <= MARGIN_LATE


def relative_gap(curve: list[float | None], reference: Reference, index: int) -> float | None:
    """How far above the reference's mean the curve lies in window `index`, as a fraction; None where either
    lacks the window."""
    mean, value = reference.mean[index], curve[index]
    return None if mean is None or mean <= 0 or value is None else value / mean - 1


def seconds(value: float) -> str:
    """Seconds as a reason gives them: whole ones, or two digits for a CPU test's seconds budget."""
    return f"{value:.0f} s" if value >= 10 else f"{value:.2g} s"


def stop_reason(curve: list[float | None], reference: Reference, index: int, budget: float) -> str:
    """One line on why the rule stops a curve at window `index`, with the figures."""
    return (f"stopped early at {seconds(window_end(index, budget))} of {seconds(budget)}: training loss "
            f"{curve[index]:.4f} against the baseline's {reference.mean[index]:.4f} (stopped above "
            f"{reference.line(index):.4f}, {reference.curves} runs of the baseline), for {CONFIRM_WINDOWS} windows "
            f"of {seconds(budget / CURVE_WINDOWS)} in a row")


def usable_control(row: dict, baseline_sha: str, budget: float) -> bool:
    """Whether a result row's curve may be a reference for candidates of the baseline whose source has sha256
    `baseline_sha`, at `budget`: a scored run of that very source (a control run, or a run that made it the
    baseline when it was a candidate), at about that budget, whose curve does not end below what its trusted
    score on the train split allows (not the validation score: at 300 s a model's loss on text it trained on is
    20-25% below it, and a curve anchored there was never a reference on a GPU)."""
    curve = row.get("curve")
    if (row.get("source_sha256") != baseline_sha or row.get("status") != "ok"
            or not curve or len(curve) != CURVE_WINDOWS or row.get("val_bpc") is None
            or not at_budget(row.get("training_seconds"), budget)):
        return False
    return anchored(curve, row.get("train_bpc"))


def anchored(curve: list[float | None], train_bpc: float | None) -> bool:
    """Whether a curve's last window (nats) claims no lower a loss than the evaluation found, `train_bpc`, on
    windows of the train split, by more than ANCHOR_TOLERANCE (False without that figure)."""
    last = next((v for v in reversed(curve) if v is not None), None)
    return (last is not None and train_bpc is not None and math.isfinite(train_bpc)
            and last / math.log(2) >= train_bpc * (1 - ANCHOR_TOLERANCE))


def at_budget(training_seconds: float | None, budget: float) -> bool:
    """Whether a run that trained `training_seconds` ran at `budget` (the harness stops at the first step past it)."""
    if training_seconds is None:
        return False
    return budget - 0.01 <= training_seconds <= budget * (1 + BUDGET_MATCH) + OVERSHOOT_S  # rows round to 1 ms


def references(rows: Iterable[dict], baseline_sha: str, budget: float) -> dict[str, list[list[float | None]]]:
    """The curves of the baseline's runs (source sha256 `baseline_sha`) at `budget` per GPU type (`gpu_name`),
    from result rows (results.read_rows): what a candidate's first run is judged against on its GPU type."""
    found: dict[str, list[list[float | None]]] = {}
    for row in rows:
        if usable_control(row, baseline_sha, budget):
            found.setdefault(row.get("gpu_name") or "unknown", []).append(list(row["curve"]))
    return found


class EarlyStop:
    """The rule applied to one running trial: asked during training (`overdue`, with the trial's clock) and once
    at its end (`settle`). It remembers the first window at which the rule stopped the curve; only in mode `on`,
    and when the run is not audited, does it ask the trial to stop. `audit`: None draws it (the trusted trial's
    random source: the candidate cannot know)."""

    def __init__(self, mode: str, curves: list[list[float | None]] | None, budget: float,
                 audit: bool | None = None) -> None:
        if mode not in EARLY_STOP_MODES:
            raise ValueError(f"early stop mode {mode!r}: use one of {', '.join(EARLY_STOP_MODES)}")
        self.mode, self.budget = mode, budget
        self.audit = random.SystemRandom().random() < AUDIT_FRACTION if audit is None else audit
        self.reference = Reference.of(curves or []) if mode != "off" else None
        self.stopped_at: float | None = None  # counted seconds at which the rule stopped (or would have)
        self.reason: str | None = None

    def _judge(self, values: list[float | None]) -> None:
        if self.stopped_at is not None:
            return
        index = stop_window(values, self.reference)
        if index is not None:
            self.stopped_at = window_end(index, self.budget)
            self.reason = stop_reason(values, self.reference, index, self.budget)

    def overdue(self, curve: Curve) -> str | None:
        """During training: the reason to stop it now (mode `on`, not audited), else None."""
        self._judge(curve.values(complete_only=True))
        return self.reason if self.mode == "on" and not self.audit else None

    def settle(self, curve: Curve) -> None:
        """At the end of training: judge the whole curve, so that a shadow row records what the rule, run on the
        finished curve (bench/early_stop_sim.py), says."""
        self._judge(curve.values())
