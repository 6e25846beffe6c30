"""The search-quality replay: Ray Tune's searchers and schedulers, run on recorded learning curves.

This is how hyperparameter-optimisation research measures searchers (tabular benchmarks): a fixed design
of configurations is trained once to full length with neoray's own training function, one row per
epoch (``benchmarks/bench_search.py ground-truth`` writes the table), and every method is then replayed
on the recorded curves, many seeds at no training cost.

* ``CurveTable``: the design and its curves, read from the CSV (``load_table``).
* ``replay_trainable``: a Tune function trainable that reports, epoch by epoch, the recorded curve of the
  design point nearest to the parameters Tune gives it. The searcher samples the same continuous space a
  sweep does (log-uniform learning rate, warmup steps, batch pairs); its suggestion is mapped to the
  nearest design point, in grid steps of log-lr and warmup, with the batch pair matched exactly.
* ``run_method``: one Tuner run of one method and seed (OptunaSearch with TPE or random sampling, ASHA or
  no early stopping), trials one at a time, until an epoch budget is spent; returns the ordered log of
  what every trial reported.
* ``regret_curve``: at each budget B (epochs trained, summed over trials), the method's pick is the trial
  with the best reported score among those that ended within B, as ``neoray sweep`` picks its best
  trial; its regret is the design's best final score minus the final score of the picked configuration
  (what training that configuration to full length gives).

Nothing here decides a trial: the searchers are Optuna's and the scheduler is Ray Tune's ASHA.
"""

from __future__ import annotations

import csv
import io
import math
import sys
import tempfile
from dataclasses import dataclass, field

import optuna
import ray.cloudpickle
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, FIFOScheduler
from ray.tune.search.optuna import OptunaSearch
from scipy.stats import spearmanr

from neoray import ray_compat, storage
from neoray.engine import ranking
from neoray.tune.space import LR_RULES, scaled_lr

WITHIN = 0.02  # "close to the best": a final score within 2% (relative) of the design's best


@dataclass(frozen=True)
class DesignPoint:
    key: str
    lr: float
    warmup_steps: int
    batch: str  # "BxA": per-worker batch x accumulation
    curve: tuple  # one dict per epoch: epoch, score, loss, map, map50, seconds

    @property
    def final_score(self) -> float:
        return float(self.curve[-1][ranking.SCORE])

    @property
    def effective_batch(self) -> int:
        per_worker, accumulate = (int(v) for v in self.batch.split("x"))
        return per_worker * accumulate


@dataclass
class CurveTable:
    task: str
    size: str
    points: dict[str, DesignPoint]

    @property
    def epochs(self) -> int:
        return min(len(p.curve) for p in self.points.values())

    @property
    def best_final(self) -> float:
        return max(p.final_score for p in self.points.values())

    def grid(self, name: str) -> list:
        return sorted({getattr(p, name) for p in self.points.values()})

    def nearest(self, lr: float, warmup_steps: float, batch: str) -> DesignPoint:
        """The design point nearest to a suggestion: distance in grid steps of log-lr and of warmup, the
        batch pair exactly (a pair the design lacks: the nearest effective batch); ties go to the
        smaller key, so the mapping is deterministic."""
        lr_step = _grid_step([math.log(v) for v in self.grid("lr")])
        warmup_step = _grid_step([float(v) for v in self.grid("warmup_steps")])
        candidates = [p for p in self.points.values() if p.batch == batch]
        if not candidates:
            wanted = math.prod(int(v) for v in batch.split("x"))
            closest = min(abs(math.log(p.effective_batch / wanted)) for p in self.points.values())
            candidates = [p for p in self.points.values()
                          if abs(math.log(p.effective_batch / wanted)) == closest]

        def distance(p: DesignPoint) -> tuple[float, str]:
            return (abs(math.log(p.lr) - math.log(lr)) / lr_step
                    + abs(p.warmup_steps - warmup_steps) / warmup_step, p.key)

        return min(candidates, key=distance)


def _grid_step(values: list[float]) -> float:
    gaps = [b - a for a, b in zip(values, values[1:]) if b > a]
    return min(gaps) if gaps else 1.0


TABLE_COLUMNS = ["task", "config", "lr", "warmup_steps", "batch", "seed", "size", "epoch", "score", "loss", "map",
                 "map50", "seconds"]


def load_table(path: str, size: str | None = None) -> CurveTable:
    """The curves of one task at one size (the table's first size when None) from a ground-truth CSV."""
    rows = list(csv.DictReader(io.StringIO(storage.read_text(path))))
    if not rows:
        raise ValueError(f"{path}: no rows")
    missing = [c for c in TABLE_COLUMNS if c not in rows[0] and c != "seed"]  # v1 tables: one seed, no column
    if missing:
        raise ValueError(f"{path}: missing columns {missing}")
    size = size or rows[0]["size"]
    curves: dict[str, list[dict]] = {}
    params: dict[str, dict] = {}
    for row in rows:
        if row["size"] != size or int(row.get("seed") or 0) != 0:
            continue
        key = row["config"]
        params[key] = {"lr": float(row["lr"]), "warmup_steps": int(row["warmup_steps"]), "batch": row["batch"]}
        curves.setdefault(key, []).append({
            "epoch": int(row["epoch"]), ranking.SCORE: float(row["score"]), "loss": _number(row["loss"]),
            "map": _number(row["map"]), "map50": _number(row["map50"]), "seconds": _number(row["seconds"]),
        })
    points = {key: DesignPoint(key, **params[key], curve=tuple(sorted(curve, key=lambda r: r["epoch"])))
              for key, curve in curves.items()}
    return CurveTable(rows[0]["task"], size, points)


def _number(text: str) -> float:
    return float(text) if text not in ("", None) else float("nan")


# ----------------------------------------------------------------------------------------------------
# Methods
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Method:
    """A searcher (``tpe`` or ``random``, Optuna's samplers through OptunaSearch) with ASHA (``grace``
    epochs, ``reduction_factor``) or without early stopping (``grace`` 0), and the space's LR rule."""

    searcher: str
    grace: int = 0
    reduction_factor: float = 2
    startup_trials: int = 10  # TPE: random trials before it models the results (Optuna's default is 10)
    lr_rule: str = "none"  # LR_RULES: the searched lr is per reference batch and scaled to the trial's
    reference_batch: int = 4

    @property
    def name(self) -> str:
        search = self.searcher if self.searcher != "tpe" else f"tpe{self.startup_trials}"
        stop = f"asha(g{self.grace},rf{self.reduction_factor:g})" if self.grace else "no-ES"
        rule = f", lr {self.lr_rule}" if self.lr_rule != "none" else ""
        return f"{search}+{stop}{rule}"


def search_space(table: CurveTable) -> dict:
    """The continuous space a sweep over this design searches (Optuna distributions)."""
    lrs, warmups = table.grid("lr"), table.grid("warmup_steps")
    return {
        "lr": FloatDistribution(min(lrs), max(lrs), log=True),
        "warmup_steps": IntDistribution(min(warmups), max(warmups)),
        "batch": CategoricalDistribution(table.grid("batch")),
    }


def design_point_for(params: dict, table: CurveTable, method: Method) -> DesignPoint:
    """The design point a trial of ``method`` trains: the suggestion, its lr scaled by the method's rule
    to the trial's effective batch, mapped to the nearest design point."""
    per_worker, accumulate = (int(v) for v in str(params["batch"]).split("x"))
    lr = scaled_lr(float(params["lr"]), per_worker * accumulate, method.lr_rule, method.reference_batch)
    return table.nearest(lr, float(params["warmup_steps"]), str(params["batch"]))


def report_epochs(method: Method, max_t: int) -> list[int]:
    """The epochs a replayed trial reports: ASHA's rungs (``grace * rf^k``, where it decides) and the
    last. Reporting the epochs in between would change no decision (ASHA reads only the first result at
    or past each rung; OptunaSearch tells its sampler a trial's last result) and costs Tune's per-result
    work; the trial's standing is still its best score over every epoch it trained (see ``trajectory``)."""
    epochs, rung = [], float(method.grace)
    while method.grace and rung < max_t:
        epochs.append(math.ceil(rung))
        rung *= method.reduction_factor
    return sorted(set(epochs) | {max_t})


def replay_trainable(params: dict, table: CurveTable, method: Method) -> None:
    """Report the recorded curve of the design point nearest to ``params`` at ``report_epochs``."""
    point = design_point_for(params, table, method)
    for epoch in report_epochs(method, table.epochs):
        row = point.curve[epoch - 1]
        tune.report({"epoch": row["epoch"], ranking.SCORE: row[ranking.SCORE], "design_point": point.key})


class EpochBudget(tune.Stopper):
    """Ends the whole run once ``budget`` epochs have been trained, summed over trials, and keeps every
    report in the order Tune saw it: ``rows`` of (trial id, epoch, score, design point)."""

    def __init__(self, budget: int):
        self.budget, self.used = budget, 0
        self.rows: list[tuple[str, int, float, str]] = []
        self._last_epoch: dict[str, int] = {}

    def __call__(self, trial_id, result) -> bool:
        trial_id, epoch = str(trial_id), int(result["epoch"])
        if self._last_epoch.get(trial_id) != epoch:  # a finished trial's last result comes again, done
            self.used += epoch - self._last_epoch.get(trial_id, 0)
            self._last_epoch[trial_id] = epoch
            self.rows.append((trial_id, epoch, float(result[ranking.SCORE]), str(result["design_point"])))
        return False

    def stop_all(self) -> bool:
        return self.used >= self.budget


def _searcher(table: CurveTable, method: Method, seed: int) -> OptunaSearch:
    if method.searcher == "tpe":
        sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=method.startup_trials)
    elif method.searcher == "random":
        sampler = optuna.samplers.RandomSampler(seed=seed)
    else:
        raise ValueError(f"unknown searcher {method.searcher!r}; expected tpe or random")
    return OptunaSearch(space=search_space(table), metric=ranking.SCORE, mode=ranking.MODE, sampler=sampler)


def _scheduler(table: CurveTable, method: Method):
    if not method.grace:
        return FIFOScheduler()
    return AsyncHyperBandScheduler(time_attr="epoch", max_t=table.epochs, grace_period=method.grace,
                                   reduction_factor=method.reduction_factor)


def run_method(table: CurveTable, method: Method, seed: int, budget: int) -> list[tuple[str, int, float, str]]:
    """One replay: trials one at a time until ``budget`` epochs are spent; the ordered result log."""
    if method.lr_rule not in LR_RULES:
        raise ValueError(f"unknown lr rule {method.lr_rule!r}; expected one of {', '.join(LR_RULES)}")
    budget_log = EpochBudget(budget)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    # This module lives in benchmarks/, which Ray's workers cannot import: its trainable and tables travel by value.
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    with ray_compat.replay_environment(), tempfile.TemporaryDirectory(prefix="neoray-replay-") as tmp:
        tuner = tune.Tuner(
            tune.with_parameters(replay_trainable, table=table, method=method),
            tune_config=tune.TuneConfig(
                metric=ranking.SCORE, mode=ranking.MODE, search_alg=_searcher(table, method, seed),
                scheduler=_scheduler(table, method), num_samples=max(1, budget // max(1, method.grace or 1)),
                max_concurrent_trials=1, reuse_actors=True,
            ),
            run_config=tune.RunConfig(storage_path=tmp, name="replay", stop=budget_log, verbose=0),
        )
        tuner.fit()
    return budget_log.rows


# ----------------------------------------------------------------------------------------------------
# Regret
# ----------------------------------------------------------------------------------------------------


@dataclass
class Trajectory:
    """What a method had found as its budget was spent: after ``spent[i]`` epochs (summed over trials, at
    the end of a trial) its pick was a configuration whose final score is ``picked_final[i]``."""

    spent: list[int] = field(default_factory=list)
    picked_final: list[float] = field(default_factory=list)

    def picked_at(self, budget: int) -> float:
        """The pick's final score once ``budget`` epochs were spent (nan: no trial had ended)."""
        value = float("nan")
        for spent, picked in zip(self.spent, self.picked_final):
            if spent > budget:
                break
            value = picked
        return value


def trajectory(log: list[tuple[str, int, float, str]], table: CurveTable) -> Trajectory:
    """The pick after each trial's end, from a run's reports in order (one trial at a time). A trial ends
    at its last report, when the next trial starts (stopped by ASHA, or finished), except a last trial cut
    by the budget before its last epoch. Its standing is its best score over every epoch it trained (its
    design point's curve up to there: what neoray's sweep ranks by), and the pick is the best standing
    so far (the earlier trial on ties)."""
    ends: list[tuple[str, int, str]] = []  # (trial, last epoch, design point) in order
    for index, (trial_id, epoch, _score, point) in enumerate(log):
        last_row = index + 1 == len(log)
        if (last_row and epoch >= table.epochs) or (not last_row and log[index + 1][0] != trial_id):
            ends.append((trial_id, epoch, point))
    out, spent, best = Trajectory(), 0, None  # best: (standing, design point)
    for _trial, epoch, point in ends:
        spent += epoch
        standing = max(row[ranking.SCORE] for row in table.points[point].curve[:epoch])
        if best is None or standing > best[0]:
            best = (standing, point)
        out.spent.append(spent)
        out.picked_final.append(table.points[best[1]].final_score)
    return out


def regret_at(traj: Trajectory, table: CurveTable, budgets: list[int]) -> list[float]:
    """Regret (the design's best final score minus the pick's) at each budget; nan before any pick."""
    return [table.best_final - traj.picked_at(budget) for budget in budgets]


def budget_to_within(traj: Trajectory, table: CurveTable, within: float = WITHIN) -> float:
    """The epochs spent when the pick's final score first came within ``within`` (relative) of the
    design's best; inf when the budget ran out first."""
    target = (1.0 - within) * table.best_final
    for spent, picked in zip(traj.spent, traj.picked_final):
        if picked >= target:
            return float(spent)
    return math.inf


def summarise(values: list[float]) -> dict:
    """Median and quartiles over seeds; an inf (a budget never reached) counts as larger than any."""
    return {"median": _quantile(values, 0.5), "q25": _quantile(values, 0.25), "q75": _quantile(values, 0.75)}


def _quantile(values: list[float], q: float) -> float:
    """The q-quantile, halfway between the two nearest ranks where it falls between them. Written out
    because NumPy interpolates as a + t * (b - a), which turns inf - inf into nan."""
    ordered = sorted(values)
    position = (len(ordered) - 1) * q
    low, high = ordered[math.floor(position)], ordered[math.ceil(position)]
    return float(low) if low == high else float((low + high) / 2)


def rank_correlation(xs: list[float], ys: list[float]) -> float:
    """Spearman's rank correlation (SciPy's, ties averaged); nan with fewer than 3 pairs or no spread."""
    if len(xs) < 3 or len(set(xs)) < 2 or len(set(ys)) < 2:
        return float("nan")
    return float(spearmanr(xs, ys).statistic)


__all__ = [
    "CurveTable", "DesignPoint", "EpochBudget", "Method", "TABLE_COLUMNS", "Trajectory", "WITHIN",
    "budget_to_within", "design_point_for", "load_table", "rank_correlation", "regret_at", "replay_trainable",
    "report_epochs",
    "run_method", "search_space", "summarise", "trajectory",
]
