"""Noise-aware promotion: when is a candidate reliably better than the baseline?

A run's val bpc is noisy (seed, data order, kernels), so "lower than the
baseline once" promotes luck. How noisy depends on the model and the budget
(three seeds of the 300 s default on an H100 spread by sigma = 0.0009 bpc; the
simulation in bench/selection_sim.py assumes 0.01), so every margin below is
in units of the pooled sigma. Scores are compared only
within one GPU type (the `gpu` string); with no baseline score on that GPU
yet the verdict is PENDING and the caller runs the baseline first.

The noise-aware rule is asked again after every run of a candidate. Gains are
baseline mean minus candidate mean (bpc, > 0 is better).

1. Screen (first run): its gain must exceed `screen_sigmas` * sigma, else REJECT.
   Most candidates are no better than the baseline; the margin stops them
   from costing reruns. One that passes gets CONFIRM: queue `confirmations`
   reruns with other seeds.
2. Confirm (every later run). The test leaves the first run out: it was
   picked for being low, so it would flatter the candidate.

       gain      = baseline mean - mean of the reruns
       threshold = max(min_delta, t * sigma * sqrt(1/n_reruns + 1/n_baseline))

   t is Student's one-sided quantile at `confidence` for the pooled sigma's
   degrees of freedom.
   - PROMOTE once all `confirmations` reruns are in and gain > threshold.
   - REJECT early, after any rerun, once the mean of all runs (the first
     included) beats the baseline by less than `reject_sigmas` * sigma: the
     candidate is hopeless, stop paying for it. Rejecting early but promoting
     only on the full set keeps false promotions near the test's level.
   - Otherwise PENDING while queued reruns remain, then CONFIRM one more run,
     up to `max_runs` runs in all; then REJECT.
   On PROMOTE or REJECT the caller drops this candidate's reruns that have
   not started.

The baseline's own noise, sigma^2 / n_baseline, is part of every test, so the
baseline is rerun too (control runs):
- a CONFIRM sets `control` when the baseline has fewer scores than the
  candidate: then one baseline run shrinks the noise more than one more
  candidate run, and it serves every later candidate as well;
- wants_control: until the baseline has `min_baseline_runs` scores, and one
  run every `control_every` trials, to follow drift.
A promoted candidate's runs become the new baseline's scores, its first run
included: that run errs on the safe side (the new baseline looks slightly
better than it is, so later candidates need slightly more), and it saves
control runs.

sigma is pooled per GPU type: `prior_sigma` counted as `prior_weight`
degrees of freedom, plus the spread of the baseline's runs, of past
baselines, of finished multi-run candidates (add_within_variance) and of the
judged candidate's own runs.

The defaults are the best that bench/selection_sim.py found (its docstring
has the figures). The test level is 97%, not 95%: only about one candidate
in ten is a real improvement, and at 95% about 6% of promotions were noise.
Lower margins or more confirmations spent over 30% of all runs on reruns.

The greedy policy is the original one-run rule (karpathy/autoresearch), for
comparison: PROMOTE iff the candidate's first score is below the baseline's
best score, the score of the one run that made it the baseline (the promoted
candidate's run; for the initial baseline its first control run). No reruns
of the candidate. Control runs follow wants_control as for the noise-aware
rule (they give the test-split score and sigma), but greedy's comparison
ignores them.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from enum import Enum
from statistics import NormalDist, fmean

POLICIES = ("noise-aware", "greedy")


@dataclass
class RuleConfig:
    policy: str = "noise-aware"  # or "greedy"
    min_delta: float = 0.002  # bpc a candidate must gain, however sure the test is
    screen_sigmas: float = 0.9  # gain the first score must show to earn reruns, in pooled sigmas
    reject_sigmas: float = 0.8  # gain the mean of all runs must keep while reruns come in, in pooled sigmas
    confirmations: int = 3  # reruns queued at once for a candidate that screens well; promotion waits for them
    confidence: float = 0.97  # one-sided test level, on the reruns
    max_runs: int = 12  # runs of a candidate that stays between the margin and the threshold
    # run-to-run sigma assumed until enough runs exist: the 95% upper bound from 3 seeds of the
    # 300 s default on an H100 (measured 0.0009), so that early decisions err on the careful side
    prior_sigma: float = 0.004
    prior_weight: int = 4  # degrees of freedom the prior counts for in the pooled sigma
    min_baseline_runs: int = 5  # control runs until the baseline has this many scores
    control_every: int = 50  # a baseline control run every N trials

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if min(self.confirmations, self.prior_weight, self.control_every, self.min_baseline_runs) < 1:
            raise ValueError("confirmations, prior_weight, control_every, min_baseline_runs must be >= 1")
        if self.max_runs < 1 + self.confirmations:
            raise ValueError(f"max_runs ({self.max_runs}) must cover the first run and the "
                             f"{self.confirmations} confirmations: raise it or lower confirmations")
        if self.prior_sigma <= 0 or min(self.min_delta, self.screen_sigmas, self.reject_sigmas) < 0:
            raise ValueError("prior_sigma must be > 0; min_delta, screen_sigmas and reject_sigmas >= 0")
        if not 0.5 < self.confidence < 1:
            raise ValueError(f"confidence must be in (0.5, 1), not {self.confidence}")


class Verdict(str, Enum):
    CONFIRM = "confirm"  # queue `reruns` more runs of this candidate (and a control run first if `control`)
    PROMOTE = "promote"  # the candidate becomes the baseline
    REJECT = "reject"  # done with this candidate; drop its queued reruns
    PENDING = "pending"  # nothing to decide: wait for queued runs (or run the baseline)


@dataclass
class Judgement:
    verdict: Verdict
    reruns: int  # how many more runs of this candidate to queue now (CONFIRM only)
    control: bool  # run the baseline before those reruns: it has fewer scores than the candidate
    candidate_mean: float  # of the runs the test uses: the first while screening, the reruns after
    baseline_mean: float  # nan without a baseline score; for greedy its best (first) score
    n_candidate: int  # runs in candidate_mean
    n_baseline: int  # runs in baseline_mean
    sigma: float  # pooled run-to-run sigma, this candidate's runs included
    threshold: float  # the gain needed now: the screening margin on the first run
    reason: str  # one human line


def t_quantile(p: float, df: float) -> float:
    """Student's t quantile by the Cornish-Fisher expansion around the normal
    one (Abramowitz & Stegun 26.7.5), to avoid a scipy dependency. At
    p <= 0.99 it is within 0.4% of the exact value for df >= 3 (2% at df = 2)."""
    z = NormalDist().inv_cdf(p)
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def _spread(scores: Sequence[float]) -> tuple[float, int]:
    """Sum of squared deviations from the mean, and its degrees of freedom."""
    if len(scores) < 2:
        return 0.0, 0
    m = fmean(scores)
    return sum((s - m) ** 2 for s in scores), len(scores) - 1


class PromotionRule:
    """Pure decision logic. State is per GPU type and round-trips through to_dict()."""

    def __init__(self, config: RuleConfig, state: dict | None = None):
        self.config = config
        state = state or {}
        # gpu -> scores of the current baseline on that GPU type
        self._baselines: dict[str, list[float]] = {g: list(s) for g, s in state.get("baselines", {}).items()}
        # gpu -> [sum of squared deviations, degrees of freedom] of finished groups
        # (past baselines, multi-run candidates): their noise evidence outlives them
        self._noise: dict[str, list] = {g: list(v) for g, v in state.get("noise", {}).items()}

    def gpus(self) -> list[str]:
        """GPU types on which the current baseline has scores."""
        return [g for g, s in self._baselines.items() if s]

    def baseline_scores(self, gpu: str) -> list[float]:
        return list(self._baselines.get(gpu, []))

    def add_baseline_score(self, gpu: str, bpc: float) -> None:
        self._baselines.setdefault(gpu, []).append(float(bpc))

    def add_within_variance(self, gpu: str, scores: list[float]) -> None:
        ss, df = _spread(scores)
        if df:
            pool = self._noise.setdefault(gpu, [0.0, 0])
            pool[0] += ss
            pool[1] += df

    def promote(self, gpu: str, scores: list[float]) -> None:
        self.new_baseline()
        self._baselines = {gpu: [float(s) for s in scores]}  # its scores elsewhere are unknown until measured

    def new_baseline(self) -> None:
        """A new model is the baseline, with no scores yet; the old one's spread stays as noise evidence."""
        for g, old in self._baselines.items():
            self.add_within_variance(g, old)
        self._baselines = {}

    def _pooled(self, gpu: str, candidate: Sequence[float] = ()) -> tuple[float, int]:
        """Pooled sigma and its degrees of freedom, the candidate's own spread included."""
        c = self.config
        ss, df = c.prior_weight * c.prior_sigma**2, c.prior_weight
        for group_ss, group_df in (self._noise.get(gpu, (0.0, 0)), _spread(self.baseline_scores(gpu)),
                                   _spread(candidate)):
            ss += group_ss
            df += group_df
        return math.sqrt(ss / df), df

    def sigma(self, gpu: str) -> float:
        return self._pooled(gpu)[0]

    def wants_control(self, gpu: str, trials_since_control: int) -> bool:
        """Should the baseline run next on this GPU type? Asked after every trial;
        a CONFIRM's `control` asks for the runs a decision waits on."""
        return (len(self._baselines.get(gpu, [])) < self.config.min_baseline_runs
                or trials_since_control >= self.config.control_every)

    def judge(self, gpu: str, scores: list[float]) -> Judgement:
        """The verdict on a candidate's scores on this GPU type, its first run first."""
        if not scores:
            raise ValueError("judge needs at least one score of the candidate")
        c = self.config
        base = self.baseline_scores(gpu)
        if c.policy == "greedy":
            # The original rule: one run against the run that made the baseline the baseline (base[0]:
            # promote() stores the candidate's scores first). The control runs appended later would
            # average the luck out of that score and make greedy a different, stronger rule.
            scores, base = scores[:1], base[:1]
        n_c, n_b = len(scores), len(base)
        tested = scores if n_c == 1 else scores[1:]  # the first run screens; the reruns decide
        sigma, df = self._pooled(gpu, scores)
        cand_mean = fmean(tested)
        if not base:
            return Judgement(Verdict.PENDING, 0, False, cand_mean, math.nan, len(tested), 0, sigma, math.nan,
                             f"no baseline score on {gpu} yet: run the baseline first")
        base_mean = fmean(base)
        gain = base_mean - cand_mean

        def judgement(verdict: Verdict, threshold: float, why: str, reruns: int = 0) -> Judgement:
            line = (f"mean {cand_mean:.4f} vs baseline {base_mean:.4f} (n={len(tested)} vs {n_b}, "
                    f"sigma {sigma:.4f}): gain {gain:+.4f}, {threshold:.4f} needed: {why}")
            return Judgement(verdict, reruns, verdict is Verdict.CONFIRM and n_b < n_c, cand_mean, base_mean,
                             len(tested), n_b, sigma, threshold, line)

        if c.policy == "greedy":
            if gain > 0:
                return judgement(Verdict.PROMOTE, 0.0, "below the baseline's best score")
            return judgement(Verdict.REJECT, 0.0, "not below the baseline's best score")

        if n_c == 1:
            margin = c.screen_sigmas * sigma
            if gain > margin:
                return judgement(Verdict.CONFIRM, margin, "screens well, confirm with other seeds",
                                 reruns=c.confirmations)
            return judgement(Verdict.REJECT, margin, "does not screen")

        n_r = n_c - 1
        threshold = max(c.min_delta, t_quantile(c.confidence, df) * sigma * math.sqrt(1 / n_r + 1 / n_b))
        if n_r >= c.confirmations and gain > threshold:
            return judgement(Verdict.PROMOTE, threshold, "reliably better")
        if base_mean - fmean(scores) < c.reject_sigmas * sigma:
            return judgement(Verdict.REJECT, threshold, "all runs together no longer beat the reject margin, "
                                                        "stop early")
        if n_r < c.confirmations:
            return judgement(Verdict.PENDING, threshold, "waiting for the queued reruns")
        if n_c < c.max_runs:
            return judgement(Verdict.CONFIRM, threshold, "undecided, one more run", reruns=1)
        return judgement(Verdict.REJECT, threshold, f"not reliably better after {n_c} runs")

    def to_dict(self) -> dict:
        return {
            "baselines": {g: list(s) for g, s in self._baselines.items()},
            "noise": {g: list(v) for g, v in self._noise.items()},
        }
