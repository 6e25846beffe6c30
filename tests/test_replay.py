"""The search-quality replay (benchmarks/search_replay.py): recorded curves replayed through Ray Tune, and regret."""

from __future__ import annotations

import math
import os

import pytest
from search_replay import (
    CurveTable,
    DesignPoint,
    Method,
    budget_to_within,
    design_point_for,
    load_table,
    rank_correlation,
    regret_at,
    report_epochs,
    run_method,
    trajectory,
)


def _curve(scores: list[float]) -> tuple:
    return tuple({"epoch": e + 1, "score": s, "loss": 1.0, "map": s, "map50": s, "seconds": 1.0}
                 for e, s in enumerate(scores))


def _table() -> CurveTable:
    """Three configurations of three epochs; c2 starts slowly and ends best (final 0.5), c1 leads at
    epoch 1 and ends at 0.3, c3 ends at 0.49 (within 2% of the best)."""
    points = {
        "c1": DesignPoint("c1", 1e-3, 10, "4x1", _curve([0.2, 0.25, 0.3])),
        "c2": DesignPoint("c2", 2e-3, 10, "4x1", _curve([0.05, 0.3, 0.5])),
        "c3": DesignPoint("c3", 4e-3, 10, "4x1", _curve([0.1, 0.2, 0.49])),
    }
    return CurveTable("hand-made", "320x180", points)


def test_regret_and_budget_to_within_two_percent_on_a_hand_made_log():
    table = _table()
    # Trials in order: c1 to the end (3 epochs), c2 stopped at epoch 1, c3 to the end.
    log = [("t1", 1, 0.2, "c1"), ("t1", 2, 0.25, "c1"), ("t1", 3, 0.3, "c1"),
           ("t2", 1, 0.05, "c2"),
           ("t3", 1, 0.1, "c3"), ("t3", 2, 0.2, "c3"), ("t3", 3, 0.49, "c3")]
    traj = trajectory(log, table)
    # c1 ends after 3 epochs and is the pick (final 0.3); c2's stopped trial (best 0.05 in its one epoch)
    # never beats it; c3 ends after 3 + 1 + 3 = 7 epochs with standing 0.49 and becomes the pick.
    assert traj.spent == [3, 4, 7] and traj.picked_final == [0.3, 0.3, 0.49]
    assert regret_at(traj, table, [2, 3, 6, 7, 20]) == pytest.approx([math.nan, 0.2, 0.2, 0.01, 0.01], nan_ok=True)
    assert budget_to_within(traj, table) == 7  # 0.49 >= 0.98 * 0.5
    assert budget_to_within(trajectory(log[:6], table), table) == math.inf  # c3 never ended


def test_a_trial_stands_by_its_best_score_over_the_epochs_it_trained():
    table = _table()
    # t2 is stopped at epoch 2 of c2 (standing 0.3 = c1's best): the earlier pick stays on a tie; t3 (c3)
    # reports only its last epoch, but its standing counts every epoch it trained (0.49).
    log = [("t1", 3, 0.3, "c1"), ("t2", 2, 0.3, "c2"), ("t3", 3, 0.49, "c3")]
    traj = trajectory(log, table)
    assert traj.spent == [3, 5, 8] and traj.picked_final == [0.3, 0.3, 0.49]


def test_trials_report_at_asha_rungs_and_the_last_epoch():
    assert report_epochs(Method("tpe"), 12) == [12]
    assert report_epochs(Method("tpe", grace=1, reduction_factor=3), 12) == [1, 3, 9, 12]
    assert report_epochs(Method("tpe", grace=2, reduction_factor=2), 12) == [2, 4, 8, 12]


def test_suggestions_map_to_the_nearest_design_point_and_the_lr_rule_scales_first():
    table = _table()
    assert design_point_for({"lr": 1.9e-3, "warmup_steps": 11, "batch": "4x1"}, table, Method("tpe")).key == "c2"
    assert design_point_for({"lr": 3.9e-3, "warmup_steps": 0, "batch": "4x1"}, table, Method("tpe")).key == "c3"
    # lr 1e-3 given per reference batch 2: a batch of 4 trains at 2e-3 (linear) -> c2; at 1.41e-3 (sqrt)
    # -> nearest in log-lr to c1 (1e-3) or c2 (2e-3): log-distances 0.35 vs 0.35, the smaller key.
    linear = Method("tpe", lr_rule="linear", reference_batch=2)
    assert design_point_for({"lr": 1e-3, "warmup_steps": 10, "batch": "4x1"}, table, linear).key == "c2"
    sqrt = Method("tpe", lr_rule="sqrt", reference_batch=2)
    assert design_point_for({"lr": 1.5e-3, "warmup_steps": 10, "batch": "4x1"}, table, sqrt).key == "c2"


def test_rank_correlation_is_spearmans():
    assert rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    assert rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert math.isnan(rank_correlation([1, 2], [1, 2]))


def test_load_table_reads_the_ground_truth_csv(tmp_path):
    path = tmp_path / "search.csv"
    lines = ["task,config,lr,warmup_steps,batch,size,epoch,score,loss,map,map50,seconds"]
    for size, factor in (("320x180", 1.0), ("160x90", 0.5)):
        for key, lr, scores in (("c1", 0.001, [0.1, 0.2]), ("c2", 0.002, [0.3, 0.4])):
            for epoch, score in enumerate(scores, 1):
                lines.append(f"t,{key},{lr},20,4x1,{size},{epoch},{score * factor},1.0,{score * factor},0.5,2.0")
    path.write_text("\n".join(lines) + "\n")
    table = load_table(str(path))
    assert table.size == "320x180" and table.epochs == 2 and table.best_final == 0.4
    half = load_table(str(path), size="160x90")
    assert half.points["c2"].final_score == pytest.approx(0.2)


@pytest.mark.slow
def test_the_replay_trainable_reports_exactly_the_recorded_curve_through_tune(ray_session):
    table = _table()
    method = Method("random", grace=1, reduction_factor=2)  # reports at the rungs (1, 2) and the last epoch
    log = run_method(table, method, seed=0, budget=9)
    trials: dict[str, list] = {}
    for trial_id, epoch, score, point in log:
        trials.setdefault(trial_id, []).append((epoch, score, point))
    assert len(trials) >= 3
    for rows in trials.values():
        epochs = [e for e, _s, _p in rows]
        assert epochs == report_epochs(method, 3)[:len(epochs)]  # stopped at a rung, or to the end
        curve = table.points[rows[0][2]].curve
        assert [s for _e, s, _p in rows] == [curve[e - 1]["score"] for e in epochs]  # the recorded scores


@pytest.mark.slow
def test_asha_stops_trials_in_the_replay_and_the_budget_counts_epochs(ray_session, monkeypatch):
    monkeypatch.delenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", raising=False)
    table = _table()
    log = run_method(table, Method("random", grace=1, reduction_factor=3), seed=1, budget=12)
    # the replay's environment (no Tune result files) ends with it: a later sweep in this process needs them
    assert "TUNE_DISABLE_AUTO_CALLBACK_LOGGERS" not in os.environ
    lengths = {}
    for trial_id, epoch, _score, _point in log:
        lengths[trial_id] = epoch
    assert 12 <= sum(lengths.values()) <= 12 + 2  # the last report may overshoot by what is left of a trial
    assert any(length == 1 for length in list(lengths.values())[:-1])  # some trial stopped at the rung


def test_quartiles_keep_a_budget_never_reached_as_larger_than_any():
    from search_replay import summarise

    assert summarise([1.0, 2.0, 3.0, 4.0]) == {"median": 2.5, "q25": 1.5, "q75": 3.5}
    assert summarise([1.0, 2.0, 3.0, math.inf]) == {"median": 2.5, "q25": 1.5, "q75": math.inf}
    assert summarise([1.0, 2.0, math.inf, math.inf])["median"] == math.inf
