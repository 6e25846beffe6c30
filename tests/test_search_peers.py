"""Syne Tune's peers on the search tables (benchmarks/search_peers.py, benchmarks/bench_search_peers.py): the table
becomes a blackbox with one row per training seed, a sweep reads every trial at its one training seed and is
scored by neoray's own success rule at neoray's budgets, and the record is the one bench_search.py simulate
prints. The simulations themselves need Syne Tune (its own virtualenv, see bench_search_peers.py) and are
skipped without it."""

from __future__ import annotations

import csv
import io
import json
import math
from pathlib import Path

import numpy as np
import pytest
from search_peers import (
    add_outcome,
    blackbox_arrays,
    compare,
    load_task_table,
    new_record,
    outcome,
    rate_difference,
    resumable,
)
from search_sim import BUDGETS_FULL_RUNS, Configuration, Event, Table, budgets, seed_blocks, sweep_training_seed

REPO_ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["task", "config", "lr", "warmup_steps", "batch", "seed", "size", "epoch", "score", "loss", "map", "map50",
           "seconds"]
EPOCHS = 6  # enough for ASHA with grace 4 and rf 2 (rungs below the last epoch)
SECONDS = {"4x1": 10.0, "4x2": 12.0, "8x1": 14.0}


def curve(config: int, seed: int) -> list[float]:
    """A distinct rising curve per (configuration, seed); configuration 5 ends best, seed noise is small."""
    top = 0.5 if config == 5 else 0.2 + 0.02 * config
    return [round(top * (e / EPOCHS) + 0.001 * seed, 6) for e in range(1, EPOCHS + 1)]


def table_csv(seeds_of: dict[int, tuple[int, ...]] | None = None) -> str:
    """12 configurations (lr 2e-3 / 8e-3 x warmup 20 / 100 x the 3 batch pairs), each with its seeds."""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n")
    writer.writeheader()
    i = 0
    for batch in ("4x1", "4x2", "8x1"):
        for lr in (2e-3, 8e-3):
            for warmup in (20, 100):
                for seed in (seeds_of or {}).get(i, (0,)):
                    for epoch, score in enumerate(curve(i, seed), 1):
                        writer.writerow({"task": "t", "config": f"c{i:02d}", "lr": lr, "warmup_steps": warmup,
                                         "batch": batch, "seed": seed, "size": "320x180", "epoch": epoch,
                                         "score": score, "loss": 1.0, "map": score, "map50": score,
                                         "seconds": SECONDS[batch] + epoch})  # the medians differ from SECONDS
                i += 1
    return out.getvalue()


def write_table(tmp_path: Path, seeds_of=None, costs: dict | None = None) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "search_t.csv").write_text(table_csv(seeds_of))
    if costs is not None:
        (tmp_path / "search_cost_t.json").write_text(json.dumps({"seconds_per_epoch": costs}))
    return tmp_path


def test_the_blackbox_has_one_row_per_training_seed_recorded_or_moved_by_the_seeds_shift(tmp_path):
    table = load_task_table(write_table(tmp_path, {0: (0, 1, 2), 5: (0, 1)}, SECONDS), "t")
    arrays = blackbox_arrays(table)
    assert arrays.objectives.shape == (12, 3, EPOCHS, 2)  # the table's seeds 0, 1, 2
    assert arrays.keys == sorted(table.configs)
    for i, key in enumerate(arrays.keys):
        config = table.configs[key]
        assert arrays.hyperparameters[i] == {"lr": config.lr, "warmup_steps": config.warmup_steps,
                                             "batch": config.batch}
        for row, seed in enumerate((0, 1, 2)):
            assert np.allclose(arrays.objectives[i, row, :, 0], table.curve(config, seed)), (key, seed)
        expected = np.arange(1, EPOCHS + 1) * SECONDS[config.batch]
        assert np.allclose(arrays.objectives[i, :, :, 1], expected)  # cumulative seconds of the batch pair
    c03 = arrays.keys.index("c03")  # seed 0 only: seed 2 is seed 0 moved by c00's shift at seed 2 (+0.002)
    assert np.allclose(arrays.objectives[c03, 2, :, 0], np.add(curve(3, 0), 0.002))


def test_the_table_takes_the_measured_seconds_per_epoch_else_its_own_medians(tmp_path):
    measured = load_task_table(write_table(tmp_path / "a", costs=SECONDS), "t")
    assert measured.seconds_per_epoch == SECONDS
    medians = load_task_table(write_table(tmp_path / "b"), "t")
    assert medians.seconds_per_epoch == {b: s + (EPOCHS + 1) / 2 for b, s in SECONDS.items()}  # epoch e at s + e


def test_a_bad_table_or_cost_file_is_one_clear_error(tmp_path):
    with pytest.raises(SystemExit, match="search_t.csv: no such table"):
        load_task_table(tmp_path, "t")
    write_table(tmp_path, costs={"4x1": 10.0, "4x2": 12.0})
    with pytest.raises(SystemExit, match="search_cost_t.json: no seconds per epoch for batch pair.* 8x1"):
        load_task_table(tmp_path, "t")
    (tmp_path / "search_cost_t.json").write_text(json.dumps({"seconds": 1}))
    with pytest.raises(SystemExit, match="search_cost_t.json: no 'seconds_per_epoch'"):
        load_task_table(tmp_path, "t")


def test_budgets_in_seconds_are_the_sweeps_clock_with_two_trials_at_a_time():
    curves = {0: tuple(0.1 * e for e in range(1, 13))}
    table = Table("t", {"c01": Configuration("c01", 1e-3, 20, "4x1", curves)}, {"4x1": 10.0, "4x2": 20.0, "8x1": 30.0})
    by_epochs, by_seconds = budgets(table)
    assert by_epochs == [12 * k for k in BUDGETS_FULL_RUNS]
    # A full run at the median pair (20 s an epoch) is 240 s; k of them, two at a time, take k x 120 s of the clock.
    assert by_seconds == [120.0 * k for k in BUDGETS_FULL_RUNS]
    assert seed_blocks(3) == [0, 1, 2, 1000, 1001, 1002]


def test_a_sweep_succeeds_from_the_budget_at_which_its_pick_is_within_the_margin(tmp_path):
    table = load_task_table(write_table(tmp_path, costs=SECONDS), "t")
    budgets_epochs, budgets_seconds = budgets(table)
    assert budgets_epochs == [EPOCHS * k for k in BUDGETS_FULL_RUNS]
    assert budgets_seconds == pytest.approx([EPOCHS * 12.0 * k / 2 for k in BUDGETS_FULL_RUNS])
    # a worse configuration for 20 epochs (200 s), then the best one reports a better score at epoch 25 (250 s)
    events = [Event(10.0 * n, n, 1, n, 0.01 * n / 20, "c00") for n in range(1, 21)]
    events.append(Event(250.0, 25, 2, 1, 0.5, table.best.key))
    result = outcome(table, events, budgets_epochs, budgets_seconds)
    assert table.best.key == "c05"
    assert result == {"epochs": [e >= 25 for e in budgets_epochs], "seconds": [s >= 250 for s in budgets_seconds]}


def test_a_record_resumes_only_on_the_same_table_and_keeps_both_seed_blocks(tmp_path):
    table = load_task_table(write_table(tmp_path, costs=SECONDS), "t")
    record = new_record(table)
    add_outcome(record, "st:RandomSearch", 1001, {"epochs": [True] * 6, "seconds": [True] * 6})
    add_outcome(record, "st:RandomSearch", 2, {"epochs": [False] * 6, "seconds": [False] * 6})
    assert record["select_seeds"] == [2] and record["report_seeds"] == [1001]
    assert set(record["outcomes"]["st:RandomSearch"]) == {"2", "1001"}
    stored = json.loads(json.dumps(record))
    assert resumable(stored, new_record(table))
    other_costs = load_task_table(write_table(tmp_path / "costs", costs={**SECONDS, "8x1": 20.0}), "t")
    assert budgets(other_costs) == budgets(table)  # the same median: the same budgets, yet other sweeps
    assert not resumable(stored, new_record(other_costs))
    another_seed = load_task_table(write_table(tmp_path / "seeds", {3: (0, 1)}, SECONDS), "t")
    assert another_seed.best.key == table.best.key and not resumable(stored, new_record(another_seed))


def test_rate_differences_and_comparisons():
    diff, low, high = rate_difference((50, 100), (40, 100))
    half = 1.96 * math.sqrt(0.25 / 100 + 0.24 / 100)
    assert (diff, low, high) == pytest.approx((0.1, 0.1 - half, 0.1 + half))
    a = {"best": "c05", "budgets_epochs": [1], "budgets_full_runs": [1],
         "outcomes": {"x": {"0": {"epochs": [True], "seconds": [False]}, "1": {"epochs": [True], "seconds": [True]}}}}
    b = {**a, "outcomes": {"y": {"0": {"epochs": [False], "seconds": [False]}}}}
    lines = compare(a, "x", b, "y", [0, 1])
    assert "| 1 | 2/2 | 0/1 | +1.000 [+1.000, +1.000] |" in lines
    with pytest.raises(SystemExit, match="not on the same table"):
        compare(a, "x", {**b, "best": "c01"}, "y", [0, 1])


def test_bench_search_prints_a_peers_record(tmp_path, capsys):
    pytest.importorskip("ray")  # bench_search.py imports Ray and torch
    import bench_search

    table = load_task_table(write_table(tmp_path, costs=SECONDS), "t")
    record = new_record(table)
    for seed in seed_blocks(4):
        add_outcome(record, "st:RandomSearch", seed, {"epochs": [seed % 2 == 0] * 6, "seconds": [True] * 6})
    bench_search.print_success(json.loads(json.dumps(record)))
    assert "| st:RandomSearch | 0.50 [" in capsys.readouterr().out


# ----------------------------------------------------------------------------------------------------
# With Syne Tune (its own virtualenv)
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def peers_module(tmp_path, monkeypatch):
    pytest.importorskip("syne_tune")
    monkeypatch.setenv("SYNETUNE_FOLDER", str(tmp_path / "syne-tune"))
    import bench_search_peers

    return bench_search_peers


def test_a_suggestion_trains_the_design_point_nearest_to_it(tmp_path, peers_module):
    table = load_task_table(write_table(tmp_path, {0: (0, 1)}, SECONDS), "t")
    blackbox = peers_module.NearestDesignBlackbox(table)
    for lr, warmup, batch in [(2.1e-3, 30, "4x1"), (7e-3, 90, "8x1"), (1e-3, 60, "4x2"), (1.6e-2, 20, "4x2")]:
        nearest = table.nearest(lr, warmup, batch)
        values = blackbox.objective_function({"lr": lr, "warmup_steps": warmup, "batch": batch}, seed=0)
        assert list(values[:, 0]) == list(nearest.curves[0])
        assert list(values[:, 1]) == [e * SECONDS[batch] for e in range(1, EPOCHS + 1)]
    blackbox.training_seed_row = 1  # the sweep's training seed, whatever seed the backend passes for a trial
    assert blackbox.objective_function({"lr": 2e-3, "warmup_steps": 20, "batch": "4x1"}, fidelity=3,
                                       seed=0) == {"score": curve(0, 1)[2], "elapsed_time": 3 * SECONDS["4x1"]}


def test_a_simulated_sweep_runs_two_trials_at_a_time_until_both_budgets_are_spent(tmp_path, peers_module):
    table = load_task_table(write_table(tmp_path, costs=SECONDS), "t")
    blackbox = peers_module.NearestDesignBlackbox(table)
    by_name = {p.name: p for p in peers_module.PEERS}
    for name in ("st:RandomSearch", "st:ASHA-stop(g1,rf3)", "st:ASHA-promo(g1,rf3)"):
        events = peers_module.simulate_peer(blackbox, by_name[name], 3, 40, 500.0)
        assert spent(events, 40, 500.0) and not spent(events[:-2], 40, 500.0)  # at most 2 reports arrive at once
        assert [e.epochs for e in events] == list(range(1, len(events) + 1))
        assert all(a.seconds <= b.seconds for a, b in zip(events, events[1:]))
        assert {events[0].trial, events[1].trial} == {0, 1}  # two trials at a time ...
        first = [e for e in events if e.trial == 0]
        assert first[0].config == table.nearest(2e-3, 20, "4x1").key  # ... the config's own values first
        assert first[0].seconds == SECONDS["4x1"]
        per_trial: dict = {}
        for e in events:
            per_trial.setdefault(e.trial, []).append(e.epoch)
        assert all(epochs == list(range(1, len(epochs) + 1)) for epochs in per_trial.values())  # resumed, not rerun
        finished = sorted(per_trial)[:-2]  # the last two may still be running
        cut_short = [t for t in finished if len(per_trial[t]) < EPOCHS]
        assert bool(cut_short) == (name != "st:RandomSearch"), name
    again = peers_module.simulate_peer(blackbox, by_name["st:ASHA-stop(g1,rf3)"], 3, 40, 500.0)
    assert again == peers_module.simulate_peer(blackbox, by_name["st:ASHA-stop(g1,rf3)"], 3, 40, 500.0)


def spent(events: list, epochs: int, seconds: float) -> bool:
    return len(events) >= epochs and events[-1].seconds >= seconds


def test_every_trial_of_a_peers_sweep_trains_at_the_sweeps_training_seed(tmp_path, peers_module):
    own = 0  # c00 is lr 2e-3, warmup 20, 4x1: the config's own values, every sweep's first trial
    table = load_task_table(write_table(tmp_path, {own: (0, 1, 2), 5: (0, 1, 2)}, SECONDS), "t")
    blackbox = peers_module.NearestDesignBlackbox(table)
    random_search = peers_module.PEERS[0]
    firsts = set()
    for seed in range(20):
        events = peers_module.simulate_peer(blackbox, random_search, seed, 60, 0.0)
        training_seed = sweep_training_seed(table, seed)
        for e in events:  # every report is its configuration's curve at the sweep's seed, as neoray's simulator
            assert e.score == pytest.approx(table.curve(table.configs[e.config], training_seed)[e.epoch - 1])
        firsts.add(next(e.score for e in events if e.trial == 0))
    assert firsts == {curve(own, s)[0] for s in (0, 1, 2)}


def test_the_command_writes_every_seeds_outcomes_and_resumes(tmp_path, peers_module, capsys):
    write_table(tmp_path, costs=SECONDS)
    argv = ["--tasks", "t", "--seeds", "2", "--which", "quick", "--data-dir", str(tmp_path)]
    assert peers_module.main(argv) == 0
    record = json.loads((tmp_path / "peers_t.json").read_text())
    assert set(record["outcomes"]) == {"st:RandomSearch", "st:ASHA-stop(g4,rf2)"}
    assert record["select_seeds"] == [0, 1] and record["report_seeds"] == [1000, 1001]
    assert all(len(o["epochs"]) == len(o["seconds"]) == 6 for m in record["outcomes"].values() for o in m.values())
    assert record["syne_tune"] and record["command"].startswith("python benchmarks/bench_search_peers.py")
    assert record["timing"]["st:RandomSearch"]["runs"] == 4
    capsys.readouterr()
    assert peers_module.main(argv) == 0
    assert "0 sweeps to simulate" in capsys.readouterr().out
    assert json.loads((tmp_path / "peers_t.json").read_text())["outcomes"] == record["outcomes"]
