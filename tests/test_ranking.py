"""One ranking contract (neoray.engine.ranking) for checkpoints, a run's best epoch, trials and ASHA."""

from __future__ import annotations

import math

from neoray.engine import ranking
from neoray.tune.results import best_row


def test_epoch_score_is_map_when_evaluated_else_minus_the_loss():
    assert ranking.epoch_score({"evaluated": 1, "map": 0.4, "loss": 2.0}) == 0.4
    assert ranking.epoch_score({"evaluated": 0, "loss": 2.0}) == -2.0
    # A non-finite loss is the worst score, still a number (ASHA takes percentiles of scores).
    assert ranking.epoch_score({"evaluated": 0, "loss": math.nan}) == ranking.WORST
    assert ranking.epoch_score({"evaluated": 1, "map": math.nan, "loss": 1.0}) == ranking.WORST


def test_best_epoch_prefers_evaluated_epochs_and_the_later_one_on_ties():
    rows = [{"epoch": 1, "score": -0.2}, {"epoch": 2, "score": 0.0}, {"epoch": 3, "score": 0.0},
            {"epoch": 4, "score": None}, {"epoch": 5, "score": math.nan}]
    assert ranking.best(rows)["epoch"] == 3  # mAP 0 still beats any loss; ties go to the later epoch
    assert ranking.best_score(rows) == 0.0
    assert ranking.best([{"epoch": 1}]) is None


def test_sweep_ranks_trials_by_their_best_score_earliest_on_ties():
    rows = [{"trial": "trial_0001", "best_score": 0.3}, {"trial": "trial_0002", "best_score": 0.5},
            {"trial": "trial_0003", "best_score": 0.5}, {"trial": "trial_0004", "best_score": None}]
    assert best_row(rows)["trial"] == "trial_0002"
    assert best_row([{"trial": "trial_0001", "best_score": -3.0}, {"trial": "trial_0002", "best_score": 0.0}])[
        "trial"] == "trial_0002"  # a trial that evaluated beats one that never did
    assert best_row([{"trial": "trial_0001", "best_score": None}]) is None
