"""Peers on neoray's search tables: what benchmarks/bench_search_peers.py (Syne Tune's schedulers) shares with
neoray's own simulator (benchmarks/search_sim.py), kept free of Syne Tune so that it is tested without it.

* the table: a ground-truth CSV read by ``search_sim.load_table``, with the per-epoch seconds of
  ``search_cost_<task>.json`` where it exists (else the table's median per batch pair), as bench_search.py
  simulate reads it;
* the blackbox's arrays: the design's hyperparameters, and per configuration one row of (score, cumulative
  seconds) per epoch for each of the table's training seeds: ``Table.curve``, the recorded curve or seed 0's
  moved by the seed's shift. A sweep reads every trial from the one row of its training seed
  (``search_sim.sweep_training_seed``), as neoray's simulator does;
* the budgets (full-run equivalents of BUDGETS_FULL_RUNS, in epochs and in seconds) and the two blocks of
  search seeds, the same as bench_search.py's;
* the outcome of one simulated sweep: ``search_sim.success_at`` at every budget, in epochs and in seconds;
* the record: the keys of bench_search.py simulate's ``sim_<task>.json``, so that one printer and one paired
  comparison serve both files.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from search_sim import (
    BUDGETS_FULL_RUNS,
    SELECT_SEEDS,
    SIMULATOR_VERSION,
    Event,
    Table,
    budgets,
    load_table,
    success_at,
    table_digest,
    wilson,
)

# The same as bench_search.py's (tests/test_search_peers.py holds them equal): bench_search.py imports Ray, torch
# and neoray, which the peers' virtualenv does not have.

OBJECTIVES = ("score", "elapsed_time")  # the blackbox's objective columns, in this order


def load_task_table(data_dir: str | Path, task: str, noise_from: str | Path | None = None) -> Table:
    """``search_<task>.csv`` of ``data_dir`` with the seconds per epoch of ``search_cost_<task>.json`` if present.
    ``noise_from``: a table of the same task with seed repeats whose noise, relative to its best, scores this one
    (a table trained at one seed, as v1's are, has no noise of its own to widen its 2% margin)."""
    borrowed = _relative_noise_of(Path(noise_from), task) if noise_from else None
    data_dir = Path(data_dir)
    table_path = data_dir / f"search_{task}.csv"
    if not table_path.exists():
        raise SystemExit(f"{table_path}: no such table (bench_search.py ground-truth writes it)")
    costs_path = data_dir / f"search_cost_{task}.json"
    costs = None
    if costs_path.exists():
        try:
            costs = {k: float(v) for k, v in json.loads(costs_path.read_text())["seconds_per_epoch"].items()}
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise SystemExit(f"{costs_path}: no 'seconds_per_epoch' mapping of batch pair to seconds ({e})") from None
    try:
        table = load_table(table_path.read_text(), task, costs, borrowed_relative_noise=borrowed)
    except ValueError as error:
        raise SystemExit(f"{table_path}: {error}") from None
    if not table.configs:
        raise SystemExit(f"{table_path}: no configuration with a complete seed-0 curve at 320x180")
    missing = sorted({c.batch for c in table.configs.values()} - set(table.seconds_per_epoch))
    if missing:
        raise SystemExit(f"{costs_path}: no seconds per epoch for batch pair(s) {', '.join(missing)}")
    return table


NOISE_FROM_HELP = ("a table of the same task with seed repeats (e.g. benchmarks/data/search_dense.csv): score a "
                   "table trained at one seed (--data-dir benchmarks/data/v1) with its noise relative to the best")


def _relative_noise_of(path: Path, task: str) -> float:
    if not path.exists():
        raise SystemExit(f"--noise-from {path}: no such table")
    donor = load_table(path.read_text(), task)
    if donor.seed_sigma == 0:
        raise SystemExit(f"--noise-from {path}: it has no seed repeats, so it has no noise to lend")
    return donor.relative_noise


def record_name(kind: str, task: str, noise_from: str | Path | None) -> str:
    """sim_<task>.json / peers_<task>.json, or sim_<task>.borrowed-noise.json etc. for outcomes scored with a
    borrowed noise: both kinds of record are kept side by side."""
    return f"{kind}_{task}.borrowed-noise.json" if noise_from else f"{kind}_{task}.json"


@dataclass(frozen=True)
class DesignArrays:
    """The table as a tabular blackbox: row i of ``objectives`` is configuration ``keys[i]`` with the
    hyperparameters ``hyperparameters[i]``; its shape is (configurations, the table's seeds, epochs, OBJECTIVES)."""

    keys: list[str]
    hyperparameters: list[dict]
    objectives: np.ndarray

    def index(self, key: str) -> int:
        return self.keys.index(key)


def blackbox_arrays(table: Table) -> DesignArrays:
    configs = [table.configs[k] for k in sorted(table.configs)]
    objectives = np.empty((len(configs), len(table.seeds), table.epochs, len(OBJECTIVES)))
    epochs = np.arange(1, table.epochs + 1)
    for i, config in enumerate(configs):
        for row, seed in enumerate(table.seeds):
            objectives[i, row, :, 0] = table.curve(config, seed)
            objectives[i, row, :, 1] = epochs * table.seconds_per_epoch[config.batch]
    hyperparameters = [{"lr": c.lr, "warmup_steps": c.warmup_steps, "batch": c.batch} for c in configs]
    return DesignArrays([c.key for c in configs], hyperparameters, objectives)


def outcome(table: Table, events: list[Event], budgets_epochs: list[int], budgets_seconds: list[float]) -> dict:
    """One sweep's success at every budget, as bench_search.py simulate writes it."""
    return {"epochs": success_at(table, events, budgets_epochs, "epochs"),
            "seconds": success_at(table, events, budgets_seconds, "seconds")}


def new_record(table: Table) -> dict:
    """The header of a peers record: sim_<task>.json's keys (outcomes and seeds filled in as runs finish)."""
    budgets_epochs, budgets_seconds = budgets(table)
    return {"task": table.task, "configs": len(table.configs), "epochs": table.epochs, "best": table.best.key,
            "best_score": table.true_score(table.best.key), "margin": table.margin, "noise_sigma": table.noise_sigma,
            "noise_borrowed": table.borrowed_relative_noise is not None,
            "seed_sigma": table.seed_sigma,
            "seconds_per_epoch": table.seconds_per_epoch, "budgets_full_runs": list(BUDGETS_FULL_RUNS),
            "budgets_epochs": budgets_epochs, "budgets_seconds": budgets_seconds,
            "table_digest": table_digest(table), "simulator": SIMULATOR_VERSION,
            "select_seeds": [], "report_seeds": [], "outcomes": {}, "timing": {}}


# The margin too: a table's outcomes scored with its own noise are not kept beside those with a borrowed one.
SAME_TABLE_KEYS = ("task", "table_digest", "simulator", "budgets_epochs", "budgets_seconds", "margin")


def resumable(previous: dict, fresh: dict) -> bool:
    """Whether a stored record's outcomes were made on the same table and budgets by the same simulator version
    (a rerun keeps them)."""
    return all(previous.get(k) == fresh[k] for k in SAME_TABLE_KEYS)


def add_outcome(record: dict, method: str, seed: int, result: dict) -> None:
    record["outcomes"].setdefault(method, {})[str(seed)] = result
    block = "select_seeds" if seed in SELECT_SEEDS else "report_seeds"
    if seed not in record[block]:
        record[block] = sorted([*record[block], seed])


def write_json_atomically(path: Path, data: dict) -> None:
    """The whole file or nothing: a killed run leaves the previous record."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def rates(record: dict, method: str, unit: str, seeds: list[int]) -> list[tuple[int, int]]:
    """(successes, seeds) at each budget for one method over ``seeds`` (those it has)."""
    by_seed = record["outcomes"][method]
    have = [str(s) for s in seeds if str(s) in by_seed]
    return [(sum(bool(by_seed[s][unit][i]) for s in have), len(have)) for i in range(len(record["budgets_full_runs"]))]


def success_table(record: dict, seeds: list[int]) -> list[str]:
    """Markdown rows: each method's success rate [95% interval] at each budget, in epochs and in seconds."""
    lines = []
    for unit in ("epochs", "seconds"):
        lines += ["", f"success rate by budget in {unit} (full-run equivalents "
                  f"{', '.join(str(b) for b in record['budgets_full_runs'])}); [95% interval]",
                  "| method | seeds | " + " | ".join(str(b) for b in record["budgets_full_runs"]) + " |",
                  "|---" * (2 + len(record["budgets_full_runs"])) + "|"]
        for method in record["outcomes"]:
            cells = rates(record, method, unit, seeds)
            n = cells[0][1] if cells else 0
            text = [f"{k / n:.2f} [{wilson(k, n)[0]:.2f},{wilson(k, n)[1]:.2f}]" if n else "-" for k, n in cells]
            lines.append(f"| {method} | {n} | " + " | ".join(text) + " |")
    return lines


def rate_difference(a: tuple[int, int], b: tuple[int, int], z: float = 1.96) -> tuple[float, float, float]:
    """Difference of two independent success rates, with its 95% interval (normal approximation)."""
    (ka, na), (kb, nb) = a, b
    pa, pb = ka / na, kb / nb
    half = z * math.sqrt(pa * (1 - pa) / na + pb * (1 - pb) / nb)
    return pa - pb, pa - pb - half, pa - pb + half


def compare(record: dict, method: str, other: dict, other_method: str, seeds: list[int]) -> list[str]:
    """Markdown rows: two methods' success rates at each budget (each over ``seeds``, from its own record), and
    the difference with its 95% interval. The two runs draw from different random streams, so the comparison
    is between independent samples, not paired."""
    if record["best"] != other["best"] or record["budgets_epochs"] != other["budgets_epochs"]:
        raise SystemExit("the two records are not on the same table and budgets")
    lines = []
    for unit in ("epochs", "seconds"):
        mine, theirs = rates(record, method, unit, seeds), rates(other, other_method, unit, seeds)
        lines += ["", f"{method} against {other_method}, budget in {unit}: rate, rate, difference [95% interval]",
                  "| full runs | " + method + " | " + other_method + " | difference |", "|---|---|---|---|"]
        for full_runs, a, b in zip(record["budgets_full_runs"], mine, theirs):
            diff, low, high = rate_difference(a, b)
            lines.append(f"| {full_runs} | {a[0]}/{a[1]} | {b[0]}/{b[1]} | {diff:+.3f} [{low:+.3f}, {high:+.3f}] |")
    return lines


__all__ = ["DesignArrays", "NOISE_FROM_HELP", "OBJECTIVES",
           "add_outcome", "blackbox_arrays", "compare", "load_task_table", "new_record",
           "outcome", "rate_difference", "rates", "record_name", "resumable", "success_table", "table_digest",
           "write_json_atomically"]
