"""Noise-aware promotion: when is a candidate reliably better than the baseline?

A 5-minute run's val bpc is noisy (sigma ~ 0.01 bpc from seed to seed), so
"lower than the baseline once" mostly promotes luck. Scores are compared only
within one GPU type (the `gpu` string); with no baseline score on that GPU
yet the verdict is PENDING and the caller runs the baseline first.

The noise-aware rule is a sequential test, asked again after every run of a
candidate. With n_c runs of the candidate and n_b runs of the baseline:

    gain      = baseline mean - candidate mean          (bpc, > 0 is better)
    threshold = max(min_delta, t * sigma * sqrt(1/n_c + 1/n_b))

t is Student's one-sided quantile at `confidence` for the pooled sigma's
degrees of freedom.

1. Screen (first run): gain must exceed `screen_margin`, else REJECT. Most
   candidates are no better than the baseline; the margin stops them from
   costing reruns. A candidate that passes gets CONFIRM: queue
   `confirmations` reruns with other seeds.
2. Confirm (every later run): PROMOTE once gain > threshold. REJECT early once
   gain < `screen_margin` (the mean no longer screens: hopeless). While queued
   reruns remain, PENDING. When they are done and the gain sits between the
   two, CONFIRM one more run, up to `max_runs`; then REJECT. On PROMOTE or
   REJECT the caller drops this candidate's reruns that have not started.

Why `confidence` = 0.99 and not 0.95: only about one candidate in ten is a
real improvement, so a 5% false-positive rate on every screened candidate
promotes noise about as often as real gains. The first score is kept in the
mean although it was picked for being low; the strict level pays for that
too. bench/selection_sim.py measures the result.

sigma is pooled per GPU type: `prior_sigma` counted as `prior_weight`
degrees of freedom, plus the spread of the baseline's runs, of past
baselines, of finished multi-run candidates (add_within_variance) and of
the judged candidate's own runs.

Control runs of the baseline (wants_control): after a promotion the new
baseline's scores are the candidate's few runs, picked for being low; fresh
runs up to `min_baseline_runs` make its mean honest and the test tighter.
One every `control_every` runs follows drift; an idle GPU runs one for free.

The greedy policy, for comparison: PROMOTE iff the first score is below the
baseline mean; one run, no reruns.
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
    confirmations: int = 2  # reruns queued at once for a candidate that screens well
    confidence: float = 0.99  # one-sided test level
    prior_sigma: float = 0.01  # run-to-run sigma assumed until enough reruns exist
    prior_weight: int = 4  # degrees of freedom the prior counts for in the pooled sigma
    control_every: int = 50  # a baseline control run every N runs
    screen_margin: float = 0.009  # gain the first score, and later the mean, must keep
    max_runs: int = 12  # runs of a candidate that stays between the margin and the threshold
    min_baseline_runs: int = 5  # control runs until the baseline has this many scores

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"policy must be one of {POLICIES}, not {self.policy!r}")
        if min(self.confirmations, self.prior_weight, self.control_every, self.min_baseline_runs) < 1:
            raise ValueError("confirmations, prior_weight, control_every, min_baseline_runs must be >= 1")
        if self.max_runs < 1 + self.confirmations:
            raise ValueError("max_runs must cover the first run and the confirmations")
        if not 0.5 < self.confidence < 1:
            raise ValueError("confidence must be in (0.5, 1)")


class Verdict(str, Enum):
    CONFIRM = "confirm"  # queue `reruns` more runs of this candidate
    PROMOTE = "promote"  # the candidate becomes the baseline
    REJECT = "reject"  # done with this candidate; drop its queued reruns
    PENDING = "pending"  # nothing to decide: wait for queued runs (or run the baseline)


@dataclass
class Judgement:
    verdict: Verdict
    reruns: int  # how many more runs of this candidate to queue now (CONFIRM only)
    candidate_mean: float
    baseline_mean: float  # nan without a baseline score
    n_candidate: int
    n_baseline: int
    sigma: float  # pooled run-to-run sigma, this candidate's runs included
    threshold: float  # the gain needed now: screen_margin on the first run
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
        for g, old in self._baselines.items():
            self.add_within_variance(g, old)
        # a new model: its scores elsewhere are unknown until measured there
        self._baselines = {gpu: [float(s) for s in scores]}

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

    def wants_control(self, trials_since_control: int, gpu_idle: bool, gpu: str | None = None) -> bool:
        """Should the next run be the baseline? Pass `gpu`, the GPU type about to
        run, so a baseline with too few scores there is topped up first."""
        if gpu is not None and len(self._baselines.get(gpu, [])) < self.config.min_baseline_runs:
            return True
        return gpu_idle or trials_since_control >= self.config.control_every

    def judge(self, gpu: str, scores: list[float]) -> Judgement:
        if not scores:
            raise ValueError("judge needs at least one score of the candidate")
        c = self.config
        base = self.baseline_scores(gpu)
        n_c, n_b = len(scores), len(base)
        sigma, df = self._pooled(gpu, scores)
        cand_mean = fmean(scores)
        if not base:
            return Judgement(Verdict.PENDING, 0, cand_mean, math.nan, n_c, 0, sigma, math.nan,
                             f"no baseline score on {gpu} yet: run the baseline first")
        base_mean = fmean(base)
        gain = base_mean - cand_mean

        def judgement(verdict: Verdict, threshold: float, why: str, reruns: int = 0) -> Judgement:
            line = (f"mean {cand_mean:.4f} vs baseline {base_mean:.4f} (n={n_c} vs {n_b}, sigma {sigma:.4f}): "
                    f"gain {gain:+.4f}, {threshold:.4f} needed: {why}")
            return Judgement(verdict, reruns, cand_mean, base_mean, n_c, n_b, sigma, threshold, line)

        if c.policy == "greedy":
            if gain > 0:
                return judgement(Verdict.PROMOTE, 0.0, "below the baseline mean")
            return judgement(Verdict.REJECT, 0.0, "not below the baseline mean")

        if n_c == 1:
            if gain > c.screen_margin:
                return judgement(Verdict.CONFIRM, c.screen_margin, "screens well, confirm with other seeds",
                                 reruns=c.confirmations)
            return judgement(Verdict.REJECT, c.screen_margin, "does not screen")

        threshold = max(c.min_delta, t_quantile(c.confidence, df) * sigma * math.sqrt(1 / n_c + 1 / n_b))
        if gain > threshold:
            return judgement(Verdict.PROMOTE, threshold, "reliably better")
        if gain < c.screen_margin:
            return judgement(Verdict.REJECT, threshold, "no longer screens, stop early")
        if n_c < 1 + c.confirmations:
            return judgement(Verdict.PENDING, threshold, "waiting for the queued reruns")
        if n_c < c.max_runs:
            return judgement(Verdict.CONFIRM, threshold, "undecided, one more run", reruns=1)
        return judgement(Verdict.REJECT, threshold, f"not reliably better after {n_c} runs")

    def to_dict(self) -> dict:
        return {
            "baselines": {g: list(s) for g, s in self._baselines.items()},
            "noise": {g: list(v) for g, v in self._noise.items()},
        }
