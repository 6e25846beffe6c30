"""A real sweep's directory read and judged against a ground-truth table (benchmarks/search_real_sweep.py)."""

from __future__ import annotations

import pytest
from search_real_sweep import compare, markdown, read_sweep
from search_sim import Configuration, Table

TRIALS_HEADER = "trial,status,lr,warmup_steps,batch,best_map,best_map50,best_score,epochs,failures,time_s,error\n"


def _table() -> Table:
    """Three configurations; the best (c03, lr 8e-3) has three seeds: true score 0.50, noise 0.01."""
    configs = {
        "c01": Configuration("c01", 1e-3, 20, "4x1", {0: (0.1, 0.20)}),
        "c02": Configuration("c02", 2e-3, 20, "4x1", {0: (0.2, 0.40)}),
        "c03": Configuration("c03", 8e-3, 100, "4x1", {0: (0.1, 0.49), 1: (0.1, 0.50), 2: (0.1, 0.51)}),
    }
    return Table("toy", configs, {"4x1": 10.0}, batches=("4x1",))


def _sweep_dir(tmp_path, trials: list[tuple]):
    """trials: (name, lr, warmup, best_score, scores per epoch)."""
    lines = [TRIALS_HEADER]
    for name, lr, warmup, best, scores in trials:
        lines.append(f"{name},finished,{lr},{warmup},4x1,{best},{best},{best},{len(scores)},0,10.0,\n")
        (tmp_path / name).mkdir()
        progress = "epoch,score,map50\n" + "".join(f"{e},{s},{s}\n" for e, s in enumerate(scores, 1))
        (tmp_path / name / "progress.csv").write_text(progress)
    (tmp_path / "trials.csv").write_text("".join(lines))
    return tmp_path


def test_a_trials_final_score_is_the_last_epoch_it_reported(tmp_path):
    sweep = _sweep_dir(tmp_path, [("trial_0001", 2e-3, 20, 0.45, (0.3, 0.45, 0.42))])
    (trial,) = read_sweep(sweep)
    assert trial["final_score"] == pytest.approx(0.42)


def test_the_pick_is_the_best_reported_score_and_is_judged_by_what_it_trained_to_the_end(tmp_path):
    sweep = _sweep_dir(tmp_path, [
        ("trial_0001", 2e-3, 20, 0.41, (0.3, 0.41)),
        ("trial_0002", 7.5e-3, 90, 0.47, (0.47, 0.45)),  # the best reported score; it ends at 0.45
        ("trial_0003", 1.1e-3, 30, 0.20, (0.1, 0.20)),
    ])
    result = compare(_table(), read_sweep(sweep))
    assert result["pick"] == "trial_0002" and result["pick_final_score"] == pytest.approx(0.45)
    assert result["table_best"] == "c03" and result["margin"] == pytest.approx(0.02)  # 2 x 0.01 > 2% of 0.50
    assert result["pick_within_margin"] is False  # 0.45 < 0.49 (c03 at the sweep's seed 0) - 0.02
    by_trial = {r["trial"]: r for r in result["trials"]}
    assert by_trial["trial_0002"]["nearest"] == "c03" and by_trial["trial_0002"]["nearest_rank"] == 1
    assert by_trial["trial_0001"]["nearest"] == "c02" and by_trial["trial_0001"]["nearest_rank"] == 2
    assert result["trials_within_margin"] == 0
    assert "outside" in markdown(result)


def test_a_pick_that_trained_to_within_the_margin_succeeds(tmp_path):
    sweep = _sweep_dir(tmp_path, [("trial_0001", 8e-3, 100, 0.49, (0.2, 0.49))])
    result = compare(_table(), read_sweep(sweep))
    assert result["pick_within_margin"] is True and result["trials_within_margin"] == 1


def test_a_table_still_accumulating_may_hold_no_configuration_of_a_trials_batch_pair(tmp_path):
    sweep = _sweep_dir(tmp_path, [("trial_0001", 2e-3, 20, 0.41, (0.3, 0.41))])
    (tmp_path / "trials.csv").write_text((tmp_path / "trials.csv").read_text().replace("4x1", "8x1"))
    result = compare(_table(), read_sweep(sweep))
    assert result["trials"][0]["nearest"] is None and "none of its batch pair" in markdown(result)
    assert result["pick_within_margin"] is False  # 0.41 < 0.49 - 0.02, judged without the mapping


def test_the_pick_is_judged_against_the_best_at_the_training_seed_the_sweep_trained_with(tmp_path):
    # c03 trained 0.49 at seed 0, the sweep's seed, and 0.50 on average over seeds: a pick that ended at 0.475
    # is within 0.02 of the former, and would be outside it against the latter.
    sweep = _sweep_dir(tmp_path, [("trial_0001", 8e-3, 100, 0.475, (0.2, 0.475))])
    result = compare(_table(), read_sweep(sweep))
    assert result["table_best_true_score"] == pytest.approx(0.50)
    assert result["table_best_at_training_seed"] == pytest.approx(0.49)
    assert result["pick_within_margin"] is True
