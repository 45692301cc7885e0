import json
import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))  # bench/ holds scripts, not a package
import selection_sim as sim  # noqa: E402  (it puts the repo root on the path too)

from scheduler.promotion import PromotionRule, RuleConfig, Verdict, t_quantile  # noqa: E402

H100 = "NVIDIA H100 80GB HBM3"
A100 = "NVIDIA A100-SXM4-80GB"
BASELINE = [1.000, 1.010, 0.990, 1.004, 0.996]  # mean 1.000, sd ~0.008
NOISE = 0.01  # the prior sigma these scores are written for (the product's default is smaller)


def rule_with_baseline(gpu: str = H100, **config) -> PromotionRule:
    rule = PromotionRule(RuleConfig(**{"prior_sigma": NOISE, **config}))
    for s in BASELINE:
        rule.add_baseline_score(gpu, s)
    return rule


def test_state_round_trip():
    rule = rule_with_baseline()
    rule.add_baseline_score(A100, 1.1)
    rule.add_within_variance(H100, [0.99, 1.01, 1.0])
    state = json.loads(json.dumps(rule.to_dict()))  # as the actor stores it
    restored = PromotionRule(rule.config, state=state)
    assert restored.to_dict() == rule.to_dict()
    assert restored.sigma(H100) == rule.sigma(H100)
    assert restored.judge(H100, [0.98, 0.985]) == rule.judge(H100, [0.98, 0.985])


def test_pending_without_baseline_score():
    rule = rule_with_baseline(H100)
    j = rule.judge(A100, [0.9])
    assert j.verdict is Verdict.PENDING and j.n_baseline == 0 and math.isnan(j.baseline_mean)
    assert rule.wants_control(A100, 0)


def test_candidate_equal_to_baseline_is_not_promoted():
    rule = rule_with_baseline()
    verdicts = [rule.judge(H100, BASELINE[:n]).verdict for n in range(1, len(BASELINE) + 1)]
    assert Verdict.PROMOTE not in verdicts
    assert verdicts[0] is Verdict.REJECT  # the first score does not screen


def test_clearly_better_candidate_is_promoted_once_its_confirmations_are_in():
    rule = rule_with_baseline()
    first = rule.judge(H100, [0.95])
    assert first.verdict is Verdict.CONFIRM and first.reruns == rule.config.confirmations
    scores = [0.95, 0.945, 0.955, 0.95]
    assert rule.judge(H100, scores[:3]).verdict is Verdict.PENDING  # promotion waits for all confirmations
    j = rule.judge(H100, scores)
    assert j.verdict is Verdict.PROMOTE and j.threshold < 0.05 - 0.01
    assert (j.n_candidate, j.candidate_mean) == (3, pytest.approx(0.95))  # the reruns
    rule.promote(H100, scores)
    assert rule.baseline_scores(H100) == scores


def test_the_lucky_first_run_is_left_out_of_the_test():
    rule = rule_with_baseline()
    scores = [0.90, 0.995, 0.995, 0.995]  # all four: gain 0.029; the reruns: 0.005
    j = rule.judge(H100, scores)
    assert j.verdict is Verdict.CONFIRM and j.candidate_mean == pytest.approx(0.995)


def test_screened_candidate_that_falls_back_is_rejected_early():
    rule = rule_with_baseline()
    assert rule.judge(H100, [0.98]).verdict is Verdict.CONFIRM
    j = rule.judge(H100, [0.98, 1.02])  # mean 1.0: no longer beats the margin
    assert j.verdict is Verdict.REJECT and "early" in j.reason


def test_undecided_candidate_gets_single_reruns_up_to_max_runs():
    rule = rule_with_baseline(max_runs=5)
    scores = [0.99] * 4  # gain 0.01: above the reject margin, below the threshold
    assert rule.judge(H100, scores[:3]).verdict is Verdict.PENDING  # the third queued rerun is still out
    j = rule.judge(H100, scores)
    assert (j.verdict, j.reruns, j.control) == (Verdict.CONFIRM, 1, False)  # 5 baseline scores are enough
    assert rule.judge(H100, [0.99] * 5).verdict is Verdict.REJECT


def test_a_baseline_with_fewer_runs_than_the_candidate_is_rerun_too():
    rule = PromotionRule(RuleConfig(prior_sigma=NOISE))
    for s in BASELINE[:3]:
        rule.add_baseline_score(H100, s)
    assert not rule.judge(H100, [0.98]).control  # screening: one run against three
    j = rule.judge(H100, [0.99] * 4)
    assert (j.verdict, j.control) == (Verdict.CONFIRM, True)


def test_gpu_types_are_separate():
    rule = rule_with_baseline(H100)
    rule.add_baseline_score(A100, 1.2)  # another GPU type scores differently
    assert rule.judge(A100, [1.1]).baseline_mean == 1.2
    assert rule.judge(H100, [1.1]).verdict is Verdict.REJECT
    rule.promote(H100, [0.95, 0.95, 0.95])
    assert rule.baseline_scores(A100) == []  # the new baseline must be measured there
    assert rule.judge(A100, [1.1]).verdict is Verdict.PENDING
    # the old baselines' spread still counts towards sigma
    assert rule.sigma(H100) != RuleConfig().prior_sigma


def test_sigma_pools_prior_and_reruns():
    rule = PromotionRule(RuleConfig(prior_sigma=0.01, prior_weight=4))
    assert rule.sigma(H100) == pytest.approx(0.01)
    for s in (1.0, 1.02, 0.98, 1.0, 1.0):  # sample variance 2e-4 with 4 df
        rule.add_baseline_score(H100, s)
    assert rule.sigma(H100) == pytest.approx(math.sqrt((4 * 1e-4 + 4 * 2e-4) / 8))


def test_greedy_promotes_on_one_score_below_the_baseline_best():
    rule = rule_with_baseline(policy="greedy")  # best (first) score 1.000
    j = rule.judge(H100, [0.9999])
    assert j.verdict is Verdict.PROMOTE and j.reruns == 0
    assert (j.baseline_mean, j.n_baseline) == (BASELINE[0], 1)
    assert rule.judge(H100, [1.0001]).verdict is Verdict.REJECT
    rule.promote(H100, [0.9999])
    assert rule.judge(H100, [0.9998]).verdict is Verdict.PROMOTE  # now against the promoting run


def test_greedy_ignores_later_control_runs():
    rule = PromotionRule(RuleConfig(policy="greedy", prior_sigma=NOISE))
    for s in (0.90, 1.00, 1.00):  # the run that made it the baseline, then two control runs: mean 0.967
        rule.add_baseline_score(H100, s)
    j = rule.judge(H100, [0.95])  # below the mean, not below the best
    assert j.verdict is Verdict.REJECT and j.baseline_mean == 0.90 and "best score" in j.reason
    assert rule.judge(H100, [0.89]).verdict is Verdict.PROMOTE


def test_wants_control():
    rule = rule_with_baseline(control_every=10, min_baseline_runs=5)
    assert not rule.wants_control(H100, 9)
    assert rule.wants_control(H100, 10)
    rule.promote(H100, [0.95, 0.95, 0.95])  # three scores: top up to five
    assert rule.wants_control(H100, 0)


# Student's t quantiles from scipy.stats.t.ppf (scipy is not a dependency of the project).
T_TABLE = {
    0.90: {3: 1.637744, 4: 1.533206, 8: 1.396815, 30: 1.310415, 200: 1.285799},
    0.95: {3: 2.353363, 4: 2.131847, 8: 1.859548, 30: 1.697261, 200: 1.652508},
    0.99: {3: 4.540703, 4: 3.746947, 8: 2.896459, 30: 2.457262, 200: 2.345137},
}


@pytest.mark.parametrize("p", sorted(T_TABLE))
@pytest.mark.parametrize("df", [3, 4, 8, 30, 200])
def test_t_quantile_matches_scipy(p, df):
    assert t_quantile(p, df) == pytest.approx(T_TABLE[p][df], rel=4e-3)


@pytest.fixture(scope="module", params=[0, 100_000], ids=["seeds 0-99", "seeds 100000-100099"])
def simulated(request) -> dict[str, dict[str, float]]:
    return sim.compare(offset=request.param)  # two disjoint blocks of SEEDS seeds, about 1 s each


def test_simulation_bars(simulated):
    s = simulated["noise-aware"]
    assert s["false_pct"] <= sim.MAX_FALSE_PCT
    assert s["big_found_pct"] >= sim.MIN_BIG_FOUND_PCT
    assert s["rerun_pct"] <= sim.MAX_RERUN_PCT


def test_simulation_final_gain_above_greedy(simulated):
    assert simulated["noise-aware"]["final_gain"] > simulated[sim.GREEDY]["final_gain"]
