"""Syne Tune's schedulers on neoray's search tables: peers' rows beside neoray's own methods (issue 23).

Syne Tune is a benchmark-only extra that neoray never imports; its pins (numpy < 1.27) clash with the project's
environment, so it runs from a virtualenv of its own, made once:

    python -m venv .venv-peers
    .venv-peers/bin/pip install -r benchmarks/requirements-peers.txt
    nice -n 15 .venv-peers/bin/python benchmarks/bench_search_peers.py --tasks default dense --seeds 500

0.14.2 is the last version with MOBSTER, DyHPO and promotion ASHA (0.15.0 dropped them); there they live in
``syne_tune.optimizer.legacy_baselines`` (its ``baselines`` module already holds the newer, smaller set).

Each (method, search seed) is one ``syne_tune.Tuner`` with 2 workers on Syne Tune's simulator backend
(``UserBlackboxBackend``) over a tabular blackbox of the table:

* the space is the shipped sweep's, as neoray's simulator (benchmarks/search_sim.py) has it: log-uniform lr,
  warmup in steps of 10, the batch pairs; the config's own values are evaluated first (``points_to_evaluate``);
* a suggestion trains the design configuration nearest to it, by ``search_sim.Table.nearest`` itself;
* the fidelity is the epoch (1..12), the objective the score column (maximised), an epoch's elapsed time the
  seconds per epoch of the configuration's batch pair; every trial of a sweep reads its configuration at the
  sweep's one training seed (``search_sim.sweep_training_seed``, as neoray's simulator and ``neoray sweep``), not
  at a seed Syne Tune's backend would draw per trial;
* the simulated clock is event-driven: when every worker is busy it jumps to the next event, and the searcher's
  own compute time is not charged (Syne Tune's simulator adds the real time spent outside the backend, which
  would make the numbers depend on the machine's load; neoray's simulator charges none either);
* a sweep runs until both the largest epoch budget and the largest seconds budget are spent.

The pick after every report is the trial with the best reported score so far, and a budget's outcome is
whether the pick's configuration is within the table's margin of the best (``search_sim.success_at``), exactly
as bench_search.py simulate scores neoray's methods. benchmarks/data/peers_<task>.json holds every seed's
outcomes under sim_<task>.json's keys, with the command, Syne Tune's version, the machine and the CPU seconds
per run; a rerun on the same table and budgets runs only the (method, seed) pairs the file lacks.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import platform
import random
import shutil
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import syne_tune
from search_peers import (
    NOISE_FROM_HELP,
    add_outcome,
    blackbox_arrays,
    compare,
    load_task_table,
    new_record,
    outcome,
    record_name,
    resumable,
    success_table,
    write_json_atomically,
)
from search_sim import Event, Table, budgets, seed_blocks, sweep_training_seed
from syne_tune import Tuner
from syne_tune.backend.simulator_backend.simulator_backend import SimulatorConfig
from syne_tune.backend.simulator_backend.simulator_callback import SimulatorCallback
from syne_tune.blackbox_repository.blackbox_tabular import BlackboxTabular
from syne_tune.blackbox_repository.simulated_tabular_backend import UserBlackboxBackend
from syne_tune.config_space import choice, finrange, loguniform, randint
from syne_tune.constants import ST_TUNER_TIME
from syne_tune.optimizer import legacy_baselines

DATA_DIR = Path(__file__).resolve().parent / "data"
WORKERS = 2
RESOURCE = "epoch"  # the fidelity
MAX_RESOURCE = "epochs"  # the config key promotion-type schedulers set to the epoch a (resumed) trial runs to


# ----------------------------------------------------------------------------------------------------
# The methods
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Peer:
    """One row: a class of ``syne_tune.optimizer.legacy_baselines`` and its options (Syne Tune's defaults else)."""

    name: str
    baseline: str
    options: dict = field(default_factory=dict)

    @property
    def multi_fidelity(self) -> bool:
        return self.baseline not in ("RandomSearch", "BayesianOptimization")


def _sh(kind: str, grace: int, rf: int, **more) -> dict:
    return {"type": kind, "grace_period": grace, "reduction_factor": rf, **more}


PEERS = [
    Peer("st:RandomSearch", "RandomSearch"),
    Peer("st:BayesianOptimization", "BayesianOptimization"),  # GP, expected improvement
    Peer("st:ASHA-stop(g1,rf3)", "ASHA", _sh("stopping", 1, 3)),
    Peer("st:ASHA-stop(g4,rf2)", "ASHA", _sh("stopping", 4, 2)),  # neoray's default's rungs
    Peer("st:ASHA-promo(g1,rf3)", "ASHA", _sh("promotion", 1, 3)),
    Peer("st:Hyperband-promo(g1,rf3)", "ASHA", _sh("promotion", 1, 3, brackets=3)),
    Peer("st:BOHB(g1,rf3)", "BOHB", _sh("stopping", 1, 3)),  # KDE searcher, ASHA stopping
    Peer("st:MOBSTER-promo(g1,rf3)", "MOBSTER", _sh("promotion", 1, 3)),  # GP multi-task searcher
    Peer("st:DyHPO", "DyHPO", {"grace_period": 1}),  # rungs every 2 epochs (Syne Tune's rung_increment)
]
QUICK = ["st:RandomSearch", "st:ASHA-stop(g4,rf2)"]


def peers(which: str, names: list[str] | None) -> list[Peer]:
    by_name = {p.name: p for p in PEERS}
    if names:
        unknown = [n for n in names if n not in by_name]
        if unknown:
            raise SystemExit(f"--methods: unknown {', '.join(unknown)}; known: {', '.join(by_name)}")
        return [by_name[n] for n in names]
    return [by_name[n] for n in QUICK] if which == "quick" else list(PEERS)


def config_space(table: Table) -> dict:
    """The shipped sweep's space, as search_sim.Table.distributions has it, and the run's length."""
    low, high = table.warmup_range
    return {"lr": loguniform(*table.lr_range),
            "warmup_steps": finrange(low, high, (high - low) // table.warmup_step + 1, cast_int=True),
            "batch": choice(list(table.batches)), MAX_RESOURCE: table.epochs}


def make_scheduler(peer: Peer, table: Table, seed: int):
    kwargs = {"config_space": config_space(table), "metric": "score", "mode": "max", "random_seed": seed,
              "points_to_evaluate": [dict(table.own)], **peer.options}
    if peer.multi_fidelity:
        kwargs.update(resource_attr=RESOURCE, max_resource_attr=MAX_RESOURCE)
    return getattr(legacy_baselines, peer.baseline)(**kwargs)


# ----------------------------------------------------------------------------------------------------
# The simulator
# ----------------------------------------------------------------------------------------------------


class NearestDesignBlackbox(BlackboxTabular):
    """The table as Syne Tune's tabular blackbox, queried anywhere in the space: a configuration is looked up at
    the design point ``Table.nearest`` maps it to (as neoray's simulator does)."""

    def __init__(self, table: Table):
        import pandas as pd

        arrays = blackbox_arrays(table)
        space = {k: v for k, v in config_space(table).items() if k != MAX_RESOURCE}
        super().__init__(hyperparameters=pd.DataFrame(arrays.hyperparameters), configuration_space=space,
                         fidelity_space={RESOURCE: randint(1, table.epochs)}, objectives_evaluations=arrays.objectives,
                         objectives_names=["score", "elapsed_time"])
        self.table, self.arrays = table, arrays
        self.training_seed_row = 0  # the row of the sweep's training seed (simulate_peer sets it per sweep)

    def design_key(self, config: dict) -> str:
        return self.table.nearest(float(config["lr"]), float(config["warmup_steps"]), config["batch"]).key

    def _objective_function(self, configuration, fidelity=None, seed=None):
        if isinstance(configuration, dict):
            configuration = self.arrays.index(self.design_key(configuration))
        # The backend passes a seed it drew for this trial; every trial of a sweep trains at the sweep's seed.
        values = super()._objective_function(configuration, None, self.training_seed_row)  # (epochs, objectives)
        if fidelity is None:
            return values
        return dict(zip(self.objectives_names, values[self.fidelity_map[list(fidelity.values())[0]]]))


class EventDrivenBackend(UserBlackboxBackend):
    """Syne Tune's simulator backend, without charging the real time spent outside it to the simulated clock."""

    def _advance_by_outside_time(self):
        pass

    def next_event_time(self) -> float | None:
        heap = self._simulator_state.event_heap
        return heap[0][0] if heap else None


class SweepRecorder(SimulatorCallback):
    """Records every report as a search_sim.Event; jumps the clock to the next event when the tuner would sleep;
    keeps no results file."""

    def __init__(self, blackbox: NearestDesignBlackbox, max_epochs: int, max_seconds: float):
        super().__init__()
        self.blackbox, self.max_epochs, self.max_seconds = blackbox, max_epochs, max_seconds
        self.events: list[Event] = []
        self._backend = None
        self._keys: dict[int, str] = {}

    def on_tuning_start(self, tuner):
        super().on_tuning_start(tuner)
        self.csv_file = None
        self._backend = tuner.trial_backend

    def on_tuning_sleep(self, sleep_time: float):
        upcoming = self._backend.next_event_time()
        if upcoming is None:
            self._time_keeper.advance(self._tuner_sleep_time)
        else:
            self._time_keeper.advance_to(upcoming)

    def on_trial_result(self, trial, status: str, result: dict, decision: str):
        key = self._keys.get(trial.trial_id)
        if key is None:
            key = self._keys[trial.trial_id] = self.blackbox.design_key(trial.config)
        self.events.append(Event(float(result[ST_TUNER_TIME]), len(self.events) + 1, trial.trial_id,
                                 int(result[RESOURCE]), float(result["score"]), key))

    def budget_spent(self, status=None) -> bool:
        return bool(self.events) and len(self.events) >= self.max_epochs and self.events[-1].seconds >= self.max_seconds


def simulate_peer(blackbox: NearestDesignBlackbox, peer: Peer, seed: int, max_epochs: int,
                  max_seconds: float) -> list[Event]:
    """One simulated sweep of ``peer`` with search seed ``seed``; its reports in the order of the simulated clock."""
    np.random.seed(seed)  # the schedulers' and backend's own draws use numpy's and Python's global generators
    random.seed(seed)
    blackbox.training_seed_row = blackbox.table.seeds.index(sweep_training_seed(blackbox.table, seed))
    backend = EventDrivenBackend(blackbox=blackbox, elapsed_time_attr="elapsed_time", max_resource_attr=MAX_RESOURCE,
                                 simulator_config=SimulatorConfig(0, 0, 0, 0, 0))
    recorder = SweepRecorder(blackbox, max_epochs, max_seconds)
    tuner = Tuner(trial_backend=backend, scheduler=make_scheduler(peer, blackbox.table, seed),
                  stop_criterion=recorder.budget_spent, n_workers=WORKERS, sleep_time=0, callbacks=[recorder],
                  tuner_name=f"peers-{os.getpid()}-{seed}", suffix_tuner_name=False, save_tuner=False,
                  results_update_interval=1e9, print_update_interval=1e9)
    try:
        with contextlib.redirect_stdout(io.StringIO()):  # the tuner prints a summary of every sweep
            tuner.run()
    finally:
        shutil.rmtree(tuner.tuner_path, ignore_errors=True)
    return recorder.events


# ----------------------------------------------------------------------------------------------------
# Many seeds
# ----------------------------------------------------------------------------------------------------

_WORKER: dict = {}


def _init_worker(data_dir: str, task: str, folder: str, noise_from: str | None) -> None:
    """A simulation process: quiet logs, Syne Tune's experiment folders in ``folder``, the task's blackbox."""
    os.environ["SYNETUNE_FOLDER"] = folder
    logging.getLogger("syne_tune").setLevel(logging.ERROR)
    logging.getLogger().setLevel(logging.ERROR)
    # BOHB's kernel density estimates divide by zero where the good configurations share one batch pair
    # (statsmodels' categorical kernel), thousands of times a sweep; pandas warns of a future default it passes on.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="statsmodels")
    warnings.filterwarnings("ignore", category=FutureWarning)
    table = load_task_table(data_dir, task, noise_from)
    _WORKER.update(table=table, blackbox=NearestDesignBlackbox(table), budgets=budgets(table))


def _run_job(job: tuple[Peer, int]) -> tuple[str, int, dict, float]:
    peer, seed = job
    budgets_epochs, budgets_seconds = _WORKER["budgets"]
    started = time.process_time()
    events = simulate_peer(_WORKER["blackbox"], peer, seed, max(budgets_epochs), max(budgets_seconds))
    result = outcome(_WORKER["table"], events, budgets_epochs, budgets_seconds)
    return peer.name, seed, result, time.process_time() - started


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def run_task(args, task: str, folder: str) -> dict:
    table = load_task_table(args.data_dir, task, args.noise_from)
    path = Path(args.out_dir) / record_name("peers", task, args.noise_from)
    record = new_record(table)
    if path.exists():
        previous = json.loads(path.read_text())
        if resumable(previous, record):
            record.update({k: previous[k] for k in ("select_seeds", "report_seeds", "outcomes", "timing")})
        else:
            print(f"{path}: made on another table or budgets; starting afresh", flush=True)
    record.update(command="python benchmarks/bench_search_peers.py " + " ".join(sys.argv[1:]),
                  syne_tune=syne_tune.__version__, commit=_git_commit(),
                  machine=f"{platform.machine()}, {os.cpu_count()} CPUs, Python {platform.python_version()}; "
                          f"{args.parallel} simulation process(es)")
    chosen = peers(args.which, args.methods)
    jobs = [(p, s) for p in chosen for s in seed_blocks(args.seeds) if str(s) not in record["outcomes"].get(p.name, {})]
    print(f"{task}: {len(jobs)} sweeps to simulate ({len(chosen)} methods x {args.seeds} seeds per block, "
          f"those not in {path} yet)", flush=True)
    started, last_write = time.perf_counter(), time.perf_counter()
    for done, (name, seed, result, cpu) in enumerate(_results(args, task, folder, jobs), 1):
        add_outcome(record, name, seed, result)
        timing = record["timing"].setdefault(name, {"runs": 0, "cpu_seconds": 0.0})
        timing["runs"] += 1
        timing["cpu_seconds"] = round(timing["cpu_seconds"] + cpu, 3)
        if time.perf_counter() - last_write > 60 or done == len(jobs):
            write_json_atomically(path, record)
            last_write = time.perf_counter()
            print(f"{task}: {done}/{len(jobs)} sweeps in {time.perf_counter() - started:.0f} s", flush=True)
    write_json_atomically(path, record)
    return record


def _results(args, task: str, folder: str, jobs: list):
    if args.parallel <= 1:
        _init_worker(args.data_dir, task, folder, args.noise_from)
        yield from map(_run_job, jobs)
        return
    with ProcessPoolExecutor(args.parallel, mp_context=get_context("spawn"), initializer=_init_worker,
                             initargs=(args.data_dir, task, folder, args.noise_from)) as pool:
        yield from pool.map(_run_job, jobs, chunksize=4)


def print_record(record: dict) -> None:
    seeds = record["report_seeds"] or record["select_seeds"]
    block = "report_seeds" if record["report_seeds"] else "select_seeds"
    print(f"\n## {record['task']}: {record['configs']} configurations, best {record['best']} "
          f"({record['best_score']:.4f}), margin {record['margin']:.4f}; Syne Tune {record['syne_tune']}, {block}")
    print("\n".join(success_table(record, seeds)))
    print("\nCPU seconds per simulated sweep: " + ", ".join(
        f"{name} {t['cpu_seconds'] / t['runs']:.2f}" for name, t in record["timing"].items() if t["runs"]))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=["default", "dense"])
    parser.add_argument("--seeds", type=int, default=500, help="search seeds per block (two blocks, as simulate)")
    parser.add_argument("--which", choices=("all", "quick"), default="all", help="all: every peer; quick: two")
    parser.add_argument("--methods", nargs="+", help="only these peers (their names, e.g. st:RandomSearch)")
    parser.add_argument("--parallel", type=int, default=1, help="simulation processes")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="where search_<task>.csv is (default %(default)s)")
    parser.add_argument("--noise-from", help=NOISE_FROM_HELP)
    parser.add_argument("--out-dir", default=None, help="where peers_<task>.json goes (default: --data-dir)")
    parser.add_argument("--compare", nargs=2, metavar=("PEER", "METHOD"),
                        help="print PEER's rates against METHOD of --data-dir's sim_<task>.json (unpaired)")
    args = parser.parse_args(argv)
    args.out_dir = args.out_dir or args.data_dir
    folder = tempfile.mkdtemp(prefix="syne-tune-peers-")
    os.environ["SYNETUNE_FOLDER"] = folder
    try:
        for task in args.tasks:
            record = run_task(args, task, folder)
            print_record(record)
            if args.compare:
                _print_comparison(args, task, record)
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return 0


def _print_comparison(args, task: str, record: dict) -> None:
    sim_path = Path(args.data_dir) / record_name("sim", task, args.noise_from)
    if not sim_path.exists():
        raise SystemExit(f"{sim_path}: no such file (bench_search.py simulate writes it)")
    other = json.loads(sim_path.read_text())
    peer, method = args.compare
    if method not in other["outcomes"]:
        raise SystemExit(f"{sim_path}: no method {method!r} (it has {', '.join(other['outcomes'])})")
    print("\n".join(compare(record, peer, other, method, seed_blocks(args.seeds))))


if __name__ == "__main__":
    sys.exit(main())
