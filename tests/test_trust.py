"""Rung trust (neoray.tune.rung_trust): how well ASHA's rungs forecast a sweep's final ranking, on hand-made
sweep histories whose answers are known."""

from __future__ import annotations

import pytest

from neoray.tune.asha import AshaSettings
from neoray.tune.rung_trust import rung_trust, verdict


def _history(scores: list[float]) -> list[dict]:
    return [{"epoch": epoch, "score": score} for epoch, score in enumerate(scores, 1)]


# A, B, C ran to epoch 4; D and E were stopped at the rung (epoch 2). At the rung C led and A trailed;
# at the end A is best: the rung's ranking of A, B, C is exactly reversed.
REVERSED = {
    "trial_0001": _history([0.05, 0.10, 0.30, 0.50]),  # A
    "trial_0002": _history([0.10, 0.20, 0.30, 0.40]),  # B
    "trial_0003": _history([0.20, 0.30, 0.30, 0.30]),  # C
    "trial_0004": _history([0.01, 0.05]),  # D
    "trial_0005": _history([0.15, 0.25]),  # E
}


def test_a_rung_whose_ranking_is_reversed_at_the_end_is_flagged_with_the_fix():
    [trust] = rung_trust(REVERSED, rungs=[2], reduction_factor=2, max_t=4)
    assert trust.finished == 3 and trust.trials_at_rung == 5
    assert trust.correlation == pytest.approx(-1.0)
    # The cut is the median of the five rung scores (0.2); A stood at 0.1: fourth of five, 0.1 below.
    assert trust.best_trial == "trial_0001" and trust.best_rank == 4
    assert trust.best_margin == pytest.approx(-0.1)
    assert not trust.trusted
    line = verdict([trust], AshaSettings(grace_period=2, reduction_factor=2, max_t=4))
    assert "epoch 2" in line and "-1.00" in line and "trial_0001" in line and "--grace-period 3" in line
    assert "BELOW the cut" in trust.line(2)


def test_a_rung_that_orders_trials_as_the_end_does_is_trusted():
    ordered = {name: _history([s / 2, s, s * 1.5, s * 2]) for name, s in
               (("trial_0001", 0.1), ("trial_0002", 0.2), ("trial_0003", 0.3), ("trial_0004", 0.4))}
    ordered["trial_0005"] = _history([0.01, 0.02])  # stopped at the rung
    [trust] = rung_trust(ordered, rungs=[2], reduction_factor=2, max_t=4)
    assert trust.correlation == pytest.approx(1.0) and trust.best_trial == "trial_0004" and trust.best_rank == 1
    assert trust.best_margin == pytest.approx(0.4 - 0.2) and trust.trusted
    line = verdict([trust], AshaSettings(grace_period=2, reduction_factor=2, max_t=4))
    assert "its ranking agreed with the final one (rank correlation 1.00)" in line and "not measured" not in line


def test_a_near_miss_is_flagged_even_when_too_few_trials_finished_to_correlate():
    history = {
        "trial_0001": _history([0.02, 0.04, 0.30]),  # the eventual best, slow to start
        "trial_0002": _history([0.10, 0.20, 0.25]),
        "trial_0003": _history([0.08, 0.06]),
        "trial_0004": _history([0.09, 0.07]),
    }
    [trust] = rung_trust(history, rungs=[2], reduction_factor=2, max_t=3)
    assert trust.finished == 2 and trust.correlation is None  # two finished trials tell nothing
    assert trust.best_trial == "trial_0001" and trust.best_margin < 0 and not trust.trusted
    assert "too few" in trust.line(2)
    assert "stood below the cut" in verdict([trust], AshaSettings(grace_period=2, reduction_factor=3, max_t=3))


def test_a_rung_too_few_trials_reached_is_reported_as_not_measured_not_as_held():
    # Two trials at the end: no ranking can be measured at either rung, though the eventual best's place can.
    # The verdict must say which was measured instead of claiming that the rungs' rankings agreed.
    history = {
        "trial_0001": _history([0.10, 0.20, 0.30]),
        "trial_0002": _history([0.05, 0.10, 0.20]),
    }
    trust = rung_trust(history, rungs=[1, 2], reduction_factor=2, max_t=3)
    line = verdict(trust, AshaSettings(grace_period=1, reduction_factor=2, max_t=3))
    assert "agreed" not in line
    assert line.count("its ranking was not measured (2 trial(s) reached the end; 3 needed)") == 2
    assert line.count("the eventual best stood above the cut") == 2


def test_a_rung_no_trial_reached_says_nothing_was_measured_there():
    history = {"trial_0001": _history([0.10]), "trial_0002": _history([0.05])}
    trust = rung_trust(history, rungs=[2], reduction_factor=2, max_t=3)
    line = verdict(trust, AshaSettings(grace_period=2, reduction_factor=2, max_t=3))
    assert "Rung at epoch 2: its ranking was not measured" in line and "never reached the rung" in line
