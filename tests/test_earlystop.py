"""The early-stop rule (scheduler/earlystop.py) on made-up curves, and where its references come from: no Ray, no
training. The rule through a real launch is in tests/test_scheduler.py."""

from __future__ import annotations

import math

import pytest

from scheduler.earlystop import (CONFIRM_WINDOWS, CURVE_WINDOWS, MARGIN_EARLY, MARGIN_LATE, MIN_FRACTION, Curve,
                                 EarlyStop, Reference, references, stop_window, usable_control, window_end)

BUDGET = 300.0
BASELINE = "b-0123456789ab"


def falling(start: float = 3.0, end: float = 1.0) -> list[float]:
    """A baseline-like curve: the loss falls from `start` to `end` over the budget's windows."""
    return [start + (end - start) * math.sqrt((i + 1) / CURVE_WINDOWS) for i in range(CURVE_WINDOWS)]


def control_row(curve: list[float | None], **fields) -> dict:
    last = curve[-1]
    return {"kind": "control", "candidate_id": BASELINE, "status": "ok", "curve": curve, "gpu_name": "NVIDIA H200",
            "val_bpc": last / math.log(2), "training_seconds": BUDGET + 0.4, **fields}


def test_a_curve_is_the_mean_loss_per_window_of_counted_seconds():
    curve = Curve(BUDGET)
    for seconds, loss in [(5, 4.0), (10, 3.0), (15, 2.0), (16, 1.0), (301.3, 0.5), (-1, 9.0), (20, math.nan)]:
        curve.add(seconds, loss)
    values = curve.values()
    assert len(values) == CURVE_WINDOWS
    assert values[0] == 3.0          # 5, 10 and 15 s fall in the first 15 s window
    assert values[1] == 1.0
    assert values[-1] == 0.5         # past the budget: the last window (the last step overshoots it)
    assert values[2:-1] == [None] * (CURVE_WINDOWS - 3)
    assert curve.values(complete_only=True)[:2] == [3.0, 1.0]


def test_a_window_still_filling_is_not_judged():
    curve = Curve(BUDGET)
    curve.add(14.0, 2.0)
    assert curve.values(complete_only=True)[0] is None
    curve.add(16.0, 2.0)
    assert curve.values(complete_only=True)[0] == 2.0


def test_the_margin_is_widest_early_and_nothing_is_judged_before_the_set_fraction():
    reference = Reference.of([falling()])
    first = next(i for i in range(CURVE_WINDOWS) if reference.line(i) is not None)
    assert window_end(first, 1.0) == pytest.approx(MIN_FRACTION)
    assert all(reference.line(i) is None for i in range(first))
    assert reference.line(first) == pytest.approx(reference.mean[first] * (1 + MARGIN_EARLY))
    assert reference.line(CURVE_WINDOWS - 1) == pytest.approx(reference.mean[-1] * (1 + MARGIN_LATE))


def test_a_hopeless_curve_is_stopped_at_the_first_windows_it_may_be():
    hopeless = [5.5] * CURVE_WINDOWS  # never learns
    index = stop_window(hopeless, Reference.of([falling(), falling(3.1, 1.05)]))
    first = round(MIN_FRACTION * CURVE_WINDOWS) - 1
    assert index == first + CONFIRM_WINDOWS - 1


def test_nothing_is_stopped_without_a_reference_or_within_the_margin():
    assert stop_window([5.5] * CURVE_WINDOWS, None) is None
    assert Reference.of([]) is None
    slightly_worse = [v * (1 + MARGIN_LATE * 0.9) for v in falling()]
    assert stop_window(slightly_worse, Reference.of([falling()])) is None


def test_one_noisy_window_stops_nothing():
    curve = falling()
    curve[10] *= 1.5
    assert stop_window(curve, Reference.of([falling()])) is None


def test_missing_windows_neither_count_for_nor_against():
    curve: list[float | None] = [5.5 if i % 2 else None for i in range(CURVE_WINDOWS)]
    assert stop_window(curve, Reference.of([falling()])) is not None


def test_an_early_crossing_within_the_lenient_margin_is_not_stopped():
    """A slow start (longer warmup, higher learning rate) runs above the baseline early and catches up."""
    base = falling()
    slow_start = [v * (1 + MARGIN_EARLY * 0.8 * (1 - i / CURVE_WINDOWS)) for i, v in enumerate(base)]
    assert stop_window(slow_start, Reference.of([base])) is None


def test_the_control_runs_spread_widens_the_line():
    wide = Reference.of([falling(3.0, 1.0), falling(3.0, 1.2)])
    narrow = Reference.of([falling(3.0, 1.1)])
    assert wide.line(CURVE_WINDOWS - 1) > narrow.line(CURVE_WINDOWS - 1)


def test_shadow_records_when_it_would_stop_and_stops_nothing():
    curve = Curve(BUDGET)
    for seconds in range(5, 300, 5):
        curve.add(seconds, 5.5)
    curve.add(300.2, 5.5)
    shadow = EarlyStop("shadow", [falling()], BUDGET)
    assert shadow.overdue(curve) is None
    assert shadow.stopped_at == window_end(stop_window(curve.values(), Reference.of([falling()])), BUDGET)
    on = EarlyStop("on", [falling()], BUDGET)
    assert "stopped early at" in on.overdue(curve) and "baseline's" in on.reason
    off = EarlyStop("off", [falling()], BUDGET)
    off.settle(curve)
    assert off.overdue(curve) is None and off.stopped_at is None
    with pytest.raises(ValueError, match="use one of off, shadow, on"):
        EarlyStop("maybe", None, BUDGET)


def test_references_come_only_from_the_current_baselines_scored_control_runs():
    good = control_row(falling())
    rows = [
        good,
        {**good, "kind": "candidate"},                        # a candidate's curve is never a reference
        {**good, "kind": "confirm"},
        {**good, "candidate_id": "b-older"},                  # a control run of another baseline
        {**good, "status": "crash"},
        {**good, "training_seconds": 45.0},                   # another budget
        {**good, "curve": None},
        {**good, "gpu_name": "NVIDIA A100", "curve": falling(4.0, 2.0), "val_bpc": 2.0 / math.log(2)},
    ]
    found = references(rows, BASELINE, BUDGET)
    assert found == {"NVIDIA H200": [good["curve"]], "NVIDIA A100": [falling(4.0, 2.0)]}


def test_a_control_curve_that_ends_below_its_trusted_score_is_no_reference():
    """A baseline's code prints its own loss: one that claims far lower training loss than the evaluation finds
    for its weights would make every candidate look worse; it is left out."""
    honest = control_row(falling())
    assert usable_control(honest, BASELINE, BUDGET)
    forged = {**honest, "curve": [v * 0.5 for v in falling()]}
    assert not usable_control(forged, BASELINE, BUDGET)
