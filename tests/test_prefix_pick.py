"""benchmarks/bench_prefix_pick.py: picking on a prefix of the curves against picking on their finals."""

from __future__ import annotations

import pytest
from bench_prefix_pick import main, prefix_pick
from search_sim import Configuration, Table


def _table(crossing: bool) -> Table:
    """Four configurations; with ``crossing`` the slowest starter ends best (epoch 1 ranks them in reverse)."""
    configs = {}
    for i in range(4):
        final = 0.2 + 0.1 * i
        start = 0.4 - 0.1 * i if crossing else 0.05 + 0.01 * i
        configs[f"c{i}"] = Configuration(f"c{i}", 1e-3 * (i + 1), 20, "4x1", {0: (start, (start + final) / 2, final)})
    return Table("toy", configs, {"4x1": 10.0}, batches=("4x1",))


def test_a_prefix_that_orders_as_the_finals_picks_the_same_and_one_that_crosses_does_not():
    same = prefix_pick(_table(crossing=False), trials=4, epoch=1, samples=20)
    assert same == {"same": 1.0, "ratio": 1.0, "within": 1.0}
    crossed = prefix_pick(_table(crossing=True), trials=4, epoch=1, samples=20)
    # epoch 1 picks c0 (final 0.2) instead of c3 (0.5); 0.3 below is outside the 2% margin
    assert crossed["same"] == 0.0 and crossed["ratio"] == pytest.approx(0.2 / 0.5) and crossed["within"] == 0.0
    # at the last epoch the pick is the whole-run pick by definition
    assert prefix_pick(_table(crossing=True), trials=4, epoch=3, samples=20)["same"] == 1.0


def test_the_table_is_printed_for_the_recorded_tasks(capsys):
    assert main(["--tasks", "photo", "--trials", "4", "--epochs", "4", "--samples", "200"]) == 0
    row = capsys.readouterr().out.splitlines()[-1].strip("|").split("|")
    assert [c.strip() for c in row[:3]] == ["photo", "4", "4"] and 0 < float(row[3]) < 1
    with pytest.raises(SystemExit, match="the photo table has 12"):
        main(["--tasks", "photo", "--trials", "4", "--epochs", "13", "--samples", "10"])
