"""Search quality: does a neoray sweep find the better detector for an epoch budget, and can ASHA be trusted?

Measured as hyperparameter-optimisation research measures searchers (tabular benchmarks): a fixed design of
configurations is trained once to full length with neoray's own training function, recording every epoch,
and every method is replayed on the recorded curves through Ray Tune (benchmarks/search_replay.py).

    # 1. ground truth (about an hour per task on 2 cores; resumable: finished configurations are kept)
    python benchmarks/bench_search.py ground-truth --task default
    python benchmarks/bench_search.py ground-truth --task dense
    # 2. the same configurations at half resolution, for the first epochs (resolution as a fidelity)
    python benchmarks/bench_search.py ground-truth --task default --size 160x90 --stop-after 4
    # 3. the replay: methods x seeds on the tables (minutes), the figures README quotes
    python benchmarks/bench_search.py replay --seeds 20
    python benchmarks/bench_search.py fidelity

Tables live in benchmarks/data/ (search_<task>.csv, one row per configuration, size and epoch, and
search_<task>.json with the command, the commit and the machine that made them); the replay writes
benchmarks/data/replay_<task>.json and search_quality.png.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from portable import portable  # noqa: E402
from search_replay import (  # noqa: E402
    TABLE_COLUMNS,
    Method,
    budget_to_within,
    load_table,
    rank_correlation,
    regret_at,
    run_method,
    summarise,
    trajectory,
)

from neoray import storage  # noqa: E402
from neoray.config import format_size, load_config, parse_size  # noqa: E402
from neoray.data.demo import ensure_default_data  # noqa: E402
from neoray.engine.context import LocalContext  # noqa: E402
from neoray.engine.loop import run_training_loop  # noqa: E402
from neoray.engine.shard_batches import ShardBatches  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
RECIPE = Path(__file__).resolve().parent / "configs" / "search_v2.yaml"  # the recipe the v2 tables were made with
TASKS = {
    # the README's default sweep: its synthetic data (256 training, 64 validation images), model and recipe
    "default": {"layout": "shapes", "train": 256, "val": 64},
    # many small objects per image (12-30 shapes of 7-22 px): the same detector on a harder task. Half the
    # images, each with ~6x the objects: at 256 images a configuration took 4x the default's time here
    # (matching and losses grow with the objects); at 128 one takes 4-5 minutes, two at a time on 2 cores.
    "dense": {"layout": "dense", "train": 128, "val": 48},
    # Held out (issue 23): never used to choose a default; steps that choose (simulate, success, replay,
    # fidelity) leave it out unless named, and its table is printed as held out. Aerial-like photographs
    # (`neoray synth --layout photo`: one class in natural-texture clutter, occlusion, per-image counts, empty
    # images, validation from another site), a task of another kind than the two shape tasks above.
    "photo": {"layout": "photo", "train": 96, "val": 48, "held_out": True},
}
CHOOSING_TASKS = sorted(name for name, task in TASKS.items() if not task.get("held_out"))
EPOCHS = 12
# The v2 design: for each batch pair, 16 points of a scrambled Sobol sequence over the shipped space's two
# continuous parameters (log-uniform lr from 0.5x to 8x the recipe's 2e-3; warmup 20-100 steps): 48
# configurations, balanced over the pairs (16 = 2^4 keeps each pair's Sobol points balanced).
DESIGN_BATCHES = ("4x1", "4x2", "8x1")  # effective batches 4, 8 (accumulated) and 8
DESIGN_LR = (1e-3, 1.6e-2)
DESIGN_WARMUP = (20, 100)
POINTS_PER_BATCH = 16
DESIGN_SEED = 2026
# Training-seed noise: the best configurations of seed 0 trained again with these seeds.
REPEAT_CONFIGS = 8
REPEAT_SEEDS = (1, 2)


def design(task: str = "default") -> list[dict]:
    """The task's 48 configurations (the same design on every task: tables compare the tasks, not designs)."""
    from scipy.stats import qmc

    points = []
    for i, batch in enumerate(DESIGN_BATCHES):
        unit = qmc.Sobol(d=2, scramble=True, seed=DESIGN_SEED + i).random(POINTS_PER_BATCH)
        for u_lr, u_warmup in unit:
            lr = DESIGN_LR[0] * (DESIGN_LR[1] / DESIGN_LR[0]) ** float(u_lr)
            warmup = round(DESIGN_WARMUP[0] + (DESIGN_WARMUP[1] - DESIGN_WARMUP[0]) * float(u_warmup))
            points.append({"config": f"c{len(points) + 1:02d}", "lr": float(f"{lr:.4g}"), "warmup_steps": warmup,
                           "batch": batch})
    return points


class StopAfter(Exception):
    """Raised by the context's report to end a run after ``--stop-after`` epochs (low-fidelity rows)."""


class RecordingContext(LocalContext):
    """A plain-process context that records each epoch's metrics and wall time, and can end the run."""

    def __init__(self, data, stop_after: int):
        super().__init__(data)
        self.stop_after, self.rows, self._last = stop_after, [], time.perf_counter()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        now = time.perf_counter()
        self.rows.append({**metrics, "seconds": round(now - self._last, 2)})
        self._last = now
        if self.stop_after and metrics["epoch"] >= self.stop_after:
            raise StopAfter()


def _connect_worker(address: str, threads: int) -> None:
    """A training process: joins the benchmark's own Ray instance (for Ray Data) with ``threads`` torch
    threads. Processes, not Ray tasks: inside a Ray task the same run was 4x slower per epoch here."""
    torch.set_num_threads(threads)
    ray.init(address=address, configure_logging=False, log_to_driver=False)


def train_point(point: dict, shards: dict, size: tuple[int, int], epochs: int, stop_after: int,
                seed: int = 0) -> list[dict]:
    """One configuration trained with neoray's own training function (the recipe of RECIPE, training seed
    ``seed``); its per-epoch rows."""
    batch_size, accumulate = (int(v) for v in point["batch"].split("x"))
    cfg = load_config(str(RECIPE), {
        "data.train": str(shards["train"]), "data.val": str(shards["val"]), "data.size": format_size(size),
        "train.lr": point["lr"], "train.warmup_steps": point["warmup_steps"], "train.batch_size": batch_size,
        "train.accumulate": accumulate, "train.epochs": epochs, "train.eval_every": 1, "train.seed": seed,
    })
    ctx = RecordingContext(ShardBatches(cfg), stop_after)
    try:
        run_training_loop(cfg, ctx, log=None)
    except StopAfter:
        pass
    return ctx.rows


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def _write_rows(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(str(path), out.getvalue())


def ground_truth(args) -> None:
    """Train the design (seed 0), then the REPEAT_CONFIGS best of it again with REPEAT_SEEDS; every finished
    run is written at once, and a rerun trains only what the table lacks (it accumulates over sessions)."""
    size = parse_size(args.size or "320x180", "--size")
    path = Path(args.data_dir) / f"search_{args.task}.csv"
    rows = _read_rows(path)
    cpus = os.cpu_count() or 1
    threads = max(1, cpus // args.parallel)
    check_same_recipe(path, rows, size)
    _write_record(args, size, 0.0, threads)  # the recipe, before any run
    task = TASKS[args.task]
    shards = ensure_default_data(train=task["train"], val=task["val"], layout=task["layout"])
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    started = time.time()
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=spawn, initializer=_connect_worker,
                             initargs=(ray.get_runtime_context().gcs_address, threads)) as pool:
        for repeats in (False, True):  # the repeats are chosen once the design is complete, so after its runs
            todo = _runs_to_do(args, rows, size, repeats=repeats)
            futures = {pool.submit(train_point, p, shards, size, args.epochs, args.stop_after, seed): (p, seed)
                       for p, seed in todo}
            for future in as_completed(futures):
                point, seed = futures[future]
                _record_point(args, size, point, seed, future.result(), rows, path)
    _write_record(args, size, time.time() - started, threads)


def recipe_config() -> dict:
    """RECIPE's keys and values as written (the benchmark sets the data, searched parameters, epochs and seed)."""
    return yaml.safe_load(RECIPE.read_text())


def check_same_recipe(table: Path, rows: list[dict], size) -> None:
    """A table accumulates over days: refuse to add runs trained with another recipe than its earlier ones
    (the record beside the table keeps the recipe they were trained with)."""
    runs = {(r["config"], r.get("seed", "0")) for r in rows if r["size"] == format_size(size)}
    if not runs:
        return
    record_path = table.with_suffix(".json")
    record = json.loads(record_path.read_text()).get(format_size(size), {}) if record_path.exists() else {}
    recorded = record.get("recipe_config")
    if recorded is None:
        raise SystemExit(f"{table}: {len(runs)} runs at {format_size(size)} but {record_path.name} records no "
                         f"recipe for them (field recipe_config); move the table away to start it over")
    changed = _changed_keys(recorded, recipe_config())
    if changed:
        raise SystemExit(f"{table}: its {len(runs)} runs at {format_size(size)} were trained with another recipe "
                         f"than {RECIPE.name} ({', '.join(changed)} differ); move the table away to start it over "
                         f"on the new recipe, or restore the old one")


def _changed_keys(old: dict, new: dict, prefix: str = "") -> list[str]:
    keys = sorted(set(old) | set(new))
    changed = []
    for key in keys:
        a, b = old.get(key), new.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            changed += _changed_keys(a, b, f"{prefix}{key}.")
        elif a != b:
            changed.append(f"{prefix}{key}")
    return changed


def _runs_to_do(args, rows: list[dict], size, repeats: bool) -> list[tuple[dict, int]]:
    """The (configuration, seed) runs the table lacks: the design at seed 0, or (``repeats``, once the design
    is complete) its REPEAT_CONFIGS best final scores at REPEAT_SEEDS."""
    points = design(args.task)[:args.configs or None]
    done = {(r["config"], int(r.get("seed") or 0)) for r in rows if r["size"] == format_size(size)}
    if not repeats:
        return [(p, 0) for p in points if (p["config"], 0) not in done]
    if args.stop_after or any((p["config"], 0) not in done for p in points):
        return []
    finals = {r["config"]: float(r["score"]) for r in rows if int(r.get("seed") or 0) == 0
              and r["size"] == format_size(size) and int(r["epoch"]) == args.epochs}
    best = sorted(points, key=lambda p: -finals.get(p["config"], float("-inf")))[:REPEAT_CONFIGS]
    return [(p, seed) for seed in REPEAT_SEEDS for p in best if (p["config"], seed) not in done]


def _record_point(args, size, point: dict, seed: int, epochs: list[dict], rows: list[dict], path: Path) -> None:
    """Add one run's rows to the table and rewrite it (a killed run keeps what it finished)."""
    for m in epochs:
        rows.append({"task": args.task, **point, "seed": seed, "size": format_size(size), "epoch": m["epoch"],
                     "score": m["score"], "loss": m.get("loss", ""), "map": m.get("map", ""),
                     "map50": m.get("map50", ""), "seconds": m["seconds"]})
    _write_rows(path, rows)
    last = epochs[-1]
    print(f"{args.task} {format_size(size)} {point['config']} seed {seed} lr {point['lr']:g} warmup "
          f"{point['warmup_steps']} batch {point['batch']}: {len(epochs)} epochs in "
          f"{sum(m['seconds'] for m in epochs):.0f} s, final mAP {last.get('map', float('nan')):.4f} mAP50 "
          f"{last.get('map50', float('nan')):.4f}", flush=True)


def _write_record(args, size, seconds: float, threads: int) -> None:
    """search_<task>.json: the command, commit and machine behind each size's rows."""
    path = Path(args.data_dir) / f"search_{args.task}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[format_size(size)] = {
        "command": "python benchmarks/bench_search.py " + " ".join(sys.argv[1:]), "commit": _git_commit(),
        "epochs": args.epochs, "stop_after": args.stop_after, "design": design(args.task),
        "recipe": str(RECIPE.relative_to(RECIPE.parents[2])), "recipe_config": recipe_config(),
        "repeat_configs": REPEAT_CONFIGS,
        "repeat_seeds": list(REPEAT_SEEDS),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs; {args.parallel} configurations at a time, "
                   f"{threads} torch thread(s) each",
        "seconds_this_invocation": round(seconds),
    }
    storage.write_json(str(path), record, indent=2)


# ----------------------------------------------------------------------------------------------------
# The cost of an epoch, measured one run at a time
# ----------------------------------------------------------------------------------------------------


def cost(args) -> None:
    """Seconds per epoch of each batch pair, each trained alone for ``--epochs`` epochs (the second and later
    epochs count: the first pays the start-up) with one torch thread, as a sweep's trial runs."""
    task = TASKS[args.task]
    shards = ensure_default_data(train=task["train"], val=task["val"], layout=task["layout"])
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    spawn = multiprocessing.get_context("spawn")
    out = {}
    for batch in DESIGN_BATCHES:
        point = {"config": f"cost-{batch}", "lr": 2e-3, "warmup_steps": 20, "batch": batch}
        with ProcessPoolExecutor(1, mp_context=spawn, initializer=_connect_worker,
                                 initargs=(ray.get_runtime_context().gcs_address, 1)) as pool:
            rows = pool.submit(train_point, point, shards, (320, 180), EPOCHS, args.epochs).result()
        out[batch] = round(sum(r["seconds"] for r in rows[1:]) / max(1, len(rows) - 1), 2)
        print(f"{args.task} {batch}: {out[batch]} s per epoch (epochs 2-{len(rows)}, alone, 1 thread)", flush=True)
    path = Path(args.data_dir) / f"search_cost_{args.task}.json"
    storage.write_json(str(path), {"seconds_per_epoch": out, "epochs": args.epochs, "commit": _git_commit(),
                                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, alone, 1 thread",
                                   "command": "python benchmarks/bench_search.py " + " ".join(sys.argv[1:])},
                       indent=2)


# ----------------------------------------------------------------------------------------------------
# One real sweep against the table (benchmarks/search_real_sweep.py)
# ----------------------------------------------------------------------------------------------------


def real_sweep(args) -> None:
    """``experiments/sweep_lr.py`` as a user runs it (the recipe, the default space, the task's data at the
    tables' size), then its pick against the task's table; an interrupted sweep resumes, a finished one is read."""
    from search_real_sweep import compare, markdown, read_sweep
    from search_sim import load_table

    task = TASKS[args.task]
    shards = ensure_default_data(train=task["train"], val=task["val"], layout=task["layout"])
    sweep_dir = Path(args.work) / f"sweep_{args.task}"
    command = [sys.executable, str(Path(__file__).resolve().parents[1] / "experiments" / "sweep_lr.py"),
               "--config", str(RECIPE), "--num-samples", str(args.num_samples), "--output", str(args.work),
               # the tables hold whole runs: every trial trains its schedule, none is continued
               "--name", sweep_dir.name, "--trial-epochs", "0", f"data.train={shards['train']}",
               f"data.val={shards['val']}", "data.size=320x180", f"train.epochs={EPOCHS}"]
    started = time.time()
    if not (sweep_dir / "best_config.yaml").exists():
        resume = ["--resume"] if sweep_dir.exists() else []
        if subprocess.run(command + resume).returncode != 0:
            raise SystemExit(f"bench_search sweep: the sweep in {sweep_dir} did not finish (its own message is "
                             f"above); the same command resumes it")
    if not (sweep_dir / "trials.csv").exists():
        raise SystemExit(f"bench_search sweep: {sweep_dir / 'trials.csv'} is missing: the sweep wrote no trial table")
    table_path = Path(args.data_dir) / f"search_{args.task}.csv"
    table = load_table(table_path.read_text(), args.task)
    if len(table.configs) < len(design(args.task)):
        print(f"note: {table_path} holds {len(table.configs)} of {len(design(args.task))} configurations; the "
              f"table's best is the best of those")
    result = compare(table, read_sweep(sweep_dir))
    result.update({"command": "python benchmarks/bench_search.py " + " ".join(sys.argv[1:]),
                   "sweep_command": "python " + " ".join(command[1:]), "commit": _git_commit(),
                   "seconds_this_invocation": round(time.time() - started),
                   "machine": f"{platform.machine()}, {os.cpu_count()} CPUs"})
    print(markdown(result))
    storage.write_json(str(Path(args.data_dir) / f"sweep_{args.task}.json"), portable(result), indent=2)


# ----------------------------------------------------------------------------------------------------
# The simulated sweeps (v2: benchmarks/search_sim.py)
# ----------------------------------------------------------------------------------------------------

def policies(which: str) -> list:
    from search_sim import Policy

    if which == "quick":
        return [Policy("random", scheduler="none"), Policy("tpe", 4, "asha", 4, 2)]
    if which == "focus":  # the candidates for the default and their baselines, at a third of core's cost
        return [Policy("random", 10), Policy("random", 10, "asha", 1, 3), Policy("random", 10, "asha", 4, 2),
                Policy("random", 10, "promotion", 1, 3), Policy("tpe", 4), Policy("tpe", 10),
                *(Policy("tpe", 4, "asha", g, rf) for g, rf in ((1, 3), (4, 2), (6, 2))),
                Policy("tpe", 4, "promotion", 1, 3), Policy("tpe", 10, "asha", 4, 2),
                Policy("tpe", 4, "asha", 4, 2, tell_stopped="complete")]  # the shipped default before the fix
    if which == "gp":  # Optuna's GPSampler (about 2 s of CPU per simulated sweep, 40x TPE's)
        return [Policy("gp", 4), Policy("gp", 10)]  # no early stopping: every ASHA setting lost the v1 dense best
    out = []
    for sampler, startup in (("random", 10), ("tpe", 4), ("tpe", 10)):
        out.append(Policy(sampler, startup))
        out += [Policy(sampler, startup, "asha", g, rf) for g, rf in ((1, 3), (2, 2), (4, 2), (6, 2))]
        out += [Policy(sampler, startup, "promotion", g, rf) for g, rf in ((1, 3), (2, 2))]
    out.append(Policy("tpe", 4, "asha", 4, 2, tell_stopped="complete"))  # before neoray told Optuna the truth
    out.append(Policy("tpe", 4, "asha", 1, 3, tell_stopped="complete"))
    if which == "all":
        out += [Policy("gp", 4), Policy("gp", 4, "asha", 4, 2), Policy("gp", 4, "promotion", 1, 3)]
    return out


def _simulate_seed(job) -> tuple:
    from search_sim import simulate, success_at

    table, policy, seed, budgets_epochs, budgets_seconds = job
    events = simulate(table, policy, seed, max_epochs=int(max(budgets_epochs)), max_seconds=max(budgets_seconds))
    return (policy.name, seed, success_at(table, events, budgets_epochs, "epochs"),
            success_at(table, events, budgets_seconds, "seconds"))


def simulate_step(args) -> None:
    """Every policy x search seed on each task's table, both seed blocks; success at each budget in epochs and in
    seconds, written to benchmarks/data/sim_<task>.json with every seed's outcome (for paired comparisons).

    The file is rewritten after each policy, so a long policy set (GPSampler's) keeps what it finished when it is
    stopped; ``--resume`` then skips the policies the file already holds for these seeds and budgets."""

    from search_peers import load_task_table
    from search_sim import budgets, seed_blocks

    seeds = seed_blocks(args.seeds)
    with _sweep_runner(args.parallel) as run_all:
        for task in args.tasks:
            table = load_task_table(args.data_dir, task, args.noise_from)
            budgets_epochs, budgets_seconds = budgets(table)
            path = _sim_path(args.data_dir, task, args.noise_from)
            outcomes = _outcomes_to_keep(path, table, seeds, budgets_epochs)
            started = time.perf_counter()
            for policy in policies(args.policies):
                if args.resume and all(str(s) in outcomes.get(policy.name, {}) for s in seeds):
                    print(f"{task}: {policy.name} is already in {path.name} for these seeds (--resume): kept",
                          flush=True)
                    continue
                jobs = [(table, policy, seed, budgets_epochs, budgets_seconds) for seed in seeds]
                outcomes[policy.name] = _simulate_policy(task, policy.name, jobs, run_all)
                storage.write_json(str(path), _sim_record(task, table, seeds, outcomes, time.perf_counter() - started))
            print_success(_sim_record(task, table, seeds, outcomes, time.perf_counter() - started))


@contextlib.contextmanager
def _sweep_runner(parallel: int):
    """A map over simulated sweeps: in this process, or in one pool of spawned processes for the whole step."""
    if parallel <= 1:
        yield map
        return
    _one_thread_per_process()
    with ProcessPoolExecutor(parallel, mp_context=multiprocessing.get_context("spawn")) as pool:
        yield lambda fn, jobs: pool.map(fn, jobs, chunksize=8)


def _simulate_policy(task: str, name: str, jobs: list, run_all) -> dict:
    """One policy's outcome at every seed: {seed (str, as JSON keeps it): {"epochs": [...], "seconds": [...]}}."""
    by_seed: dict = {}
    for done, (_, seed, by_epochs, by_seconds) in enumerate(run_all(_simulate_seed, jobs), 1):
        by_seed[str(seed)] = {"epochs": by_epochs, "seconds": by_seconds}
        if done % 250 == 0:
            print(f"{task}: {name}: {done}/{len(jobs)} sweeps simulated", flush=True)
    return by_seed


def _one_thread_per_process() -> None:
    """GPSampler fits its Gaussian process with torch and scipy: each simulating process gets one thread of
    every numeric library (the spawned processes read these when they load them), instead of each starting a
    thread per core on the same cores. A value the user set is kept."""
    for variable in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ.setdefault(variable, "1")


def _sim_record(task: str, table, seeds: list[int], outcomes: dict, seconds: float) -> dict:
    """sim_<task>.json: the header the peers' records share (search_peers.new_record), this run's outcomes."""
    from search_peers import new_record
    from search_sim import REPORT_SEEDS, SELECT_SEEDS

    return {**new_record(table), "task": task,
            "select_seeds": [s for s in seeds if s in SELECT_SEEDS],
            "report_seeds": [s for s in seeds if s in REPORT_SEEDS],
            "outcomes": outcomes, "seconds": round(seconds),
            "command": "python benchmarks/bench_search.py " + " ".join(sys.argv[1:]), "commit": _git_commit()}


def _outcomes_to_keep(path: Path, table, seeds: list[int], budgets_epochs: list) -> dict:
    """The other policies' outcomes of a previous simulate on the same table, seeds and budgets by the same
    simulator version: a second policy set adds rows instead of replacing the file, and outcomes made on another
    table (one that grew) or scored by another simulator are dropped, not shown beside new ones."""
    from search_sim import SIMULATOR_VERSION, table_digest

    if not path.exists():
        return {}
    previous = json.loads(path.read_text())
    same = (previous["select_seeds"] + previous["report_seeds"] == seeds
            and previous["budgets_epochs"] == budgets_epochs
            and previous.get("table_digest") == table_digest(table)
            and previous.get("simulator") == SIMULATOR_VERSION)
    return previous["outcomes"] if same else {}


def success_step(args) -> None:
    """The success table of each task from sim_<task>.json, with the peers of peers_<task>.json (same seeds and
    budgets) as rows beside neoray's policies."""
    from search_peers import record_name

    for task in args.tasks:
        record = json.loads(_sim_path(args.data_dir, task, args.noise_from).read_text())
        peers_path = Path(args.data_dir) / record_name("peers", task, args.noise_from)
        peers = json.loads(peers_path.read_text()) if peers_path.exists() else {}
        if peers and peers.get("margin") == record["margin"]:  # scored by the same rule, or not shown beside
            record["outcomes"].update({name: by_seed for name, by_seed in peers["outcomes"].items()
                                       if all(str(s) in by_seed or s in by_seed for s in record[args.block])})
        print_success(record, args.block)


def _noise_from_help() -> str:
    from search_peers import NOISE_FROM_HELP

    return NOISE_FROM_HELP


def _sim_path(data_dir: str, task: str, noise_from: str | None) -> Path:
    from search_peers import record_name

    return Path(data_dir) / record_name("sim", task, noise_from)


def print_success(record: dict, block: str = "report_seeds") -> None:
    """Success rate (95% interval) at each budget, in epochs and in seconds, on one block of seeds; the paired
    difference to random search without early stopping at the same seeds."""
    from search_sim import wilson

    seeds = record[block]
    base = record["outcomes"].get("random+no-ES")
    held_out = " HELD OUT (never used to choose a default)" if TASKS.get(record["task"], {}).get("held_out") else ""
    print(f"\n## {record['task']}{held_out}: {record['configs']} configurations, best {record['best']} "
          f"({record['best_score']:.4f}), margin {record['margin']:.4f}; {len(seeds)} seeds ({block})")
    for unit in ("epochs", "seconds"):
        print(f"\nsuccess rate by budget in {unit} (full-run equivalents "
              f"{', '.join(str(b) for b in record['budgets_full_runs'])}); [95% interval]; paired vs random+no-ES")
        ranked = sorted(record["outcomes"].items(), key=lambda kv: -sum(sum(_outcome(kv[1], s)[unit]) for s in seeds))
        for name, by_seed in ranked:
            cells = []
            for i in range(len(record["budgets_full_runs"])):
                wins = [bool(_outcome(by_seed, s)[unit][i]) for s in seeds]
                low, high = wilson(sum(wins), len(wins))
                diff = ""
                if base is not None and name != "random+no-ES":
                    base_wins = [bool(_outcome(base, s)[unit][i]) for s in seeds]
                    better = sum(w and not b for w, b in zip(wins, base_wins))
                    worse = sum(b and not w for w, b in zip(wins, base_wins))
                    diff = f" {better - worse:+d}"
                cells.append(f"{sum(wins) / len(wins):.2f} [{low:.2f},{high:.2f}]{diff}")
            print(f"| {name} | " + " | ".join(cells) + " |")


def _outcome(by_seed: dict, seed: int) -> dict:
    return by_seed[str(seed)] if str(seed) in by_seed else by_seed[seed]


# ----------------------------------------------------------------------------------------------------
# The replay
# ----------------------------------------------------------------------------------------------------

# (grace period, reduction factor): rungs at epochs 1-3-9, 2-4-8, 3-9, 4-8 and 6 of a 12-epoch run.
ASHA_SETTINGS = [(1, 3), (2, 2), (3, 3), (4, 2), (6, 2)]
SEARCHERS = [("random", 10), ("tpe", 10), ("tpe", 4)]  # (sampler, TPE start-up trials)


def methods(which: str) -> list[Method]:
    """``all``: every searcher with no early stopping and with every ASHA setting, and the LR rules with
    TPE; ``core``: the contenders the default task's ``all`` left (12 of the 22, for a second task at
    half the cost); ``quick``: three methods for a smoke run (CI)."""
    if which == "quick":
        return [Method("random"), Method("tpe", 2, 3, startup_trials=4), Method("tpe", 2, 3, 4, lr_rule="sqrt")]
    if which == "core":
        return [*(Method(searcher, grace, rf, startup) for searcher, startup in (("random", 10), ("tpe", 4))
                  for grace, rf in ((0, 2), (3, 3), (4, 2), (6, 2))),
                Method("random", 1, 3, 10), Method("tpe", startup_trials=10), Method("tpe", 4, 2, 10),
                Method("tpe", 4, 2, 4, lr_rule="sqrt")]
    out = []
    for searcher, startup in SEARCHERS:
        out.append(Method(searcher, startup_trials=startup))
        out += [Method(searcher, grace, rf, startup) for grace, rf in ASHA_SETTINGS]
    for rule in ("linear", "sqrt"):
        out += [Method("tpe", 0, 2, 4, lr_rule=rule), Method("tpe", 4, 2, 4, lr_rule=rule)]
    return out


def _replay_one(table, method: Method, seed: int, budget: int) -> list:
    return run_method(table, method, seed, budget)


def replay(args) -> None:
    """Every method x seed on each task's table (one Tune run each, several processes at a time)."""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    spawn = multiprocessing.get_context("spawn")
    report = {}
    for task in args.tasks:
        table = load_table(str(Path(args.data_dir) / f"search_{task}.csv"), size="320x180")
        started = time.perf_counter()
        jobs = [(m, seed) for m in methods(args.methods) for seed in range(args.seeds)]
        with ProcessPoolExecutor(args.parallel, mp_context=spawn, initializer=_connect_worker,
                                 initargs=(ray.get_runtime_context().gcs_address, 1)) as pool:
            futures = {pool.submit(_replay_one, table, m, seed, args.budget): (m, seed) for m, seed in jobs}
            logs = {}
            for done, future in enumerate(as_completed(futures), 1):
                logs[futures[future]] = future.result()
                if done % 20 == 0 or done == len(jobs):
                    print(f"{task}: {done}/{len(jobs)} runs replayed", flush=True)
        report[task] = _summarise_task(table, logs, args.budget)
        report[task]["seconds"] = round(time.perf_counter() - started)
        _print_task(task, table, report[task])
    out = Path(args.data_dir) / f"replay_{args.methods}.json"
    record = json.loads(out.read_text()) if out.exists() else {"tasks": {}}  # other tasks' results stay
    for task in report:
        record["tasks"][task] = {**report[task], "command": "python benchmarks/bench_search.py "
                                 + " ".join(sys.argv[1:]), "commit": _git_commit(), "seeds": args.seeds}
    storage.write_json(str(out), record, indent=1)
    _plot(record["tasks"], Path(args.data_dir) / f"search_quality_{args.methods}.png")
    print(f"wrote {out}")


def _summarise_task(table, logs: dict, max_budget: int) -> dict:
    """Per method: median and quartiles of the regret at budgets of 1, 2, 4 ... full trainings, and of
    the budget needed to come within 2% of the design's best."""
    budgets = [b for b in (table.epochs * k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24)) if b <= max_budget]
    out = {"best_final": table.best_final, "epochs": table.epochs, "configs": len(table.points),
           "budgets": budgets, "methods": {}}
    for method in {m for m, _seed in logs}:
        trajectories = [trajectory(log, table) for (m, _seed), log in sorted(logs.items(), key=lambda kv: kv[0][1])
                        if m == method]
        regrets = [regret_at(t, table, budgets) for t in trajectories]
        within = [budget_to_within(t, table) for t in trajectories]
        out["methods"][method.name] = {"regret_seeds": regrets, "budget_to_2pct_seeds": within}
    return _with_summaries(out)


def _with_summaries(result: dict) -> dict:
    """Median and quartiles over seeds of every method's regrets and budgets to within 2%."""
    for m in result["methods"].values():
        regrets, within = m.get("regret_seeds"), m["budget_to_2pct_seeds"]
        if regrets is not None:
            m["regret"] = [summarise([r[i] for r in regrets]) for i in range(len(result["budgets"]))]
        m["budget_to_2pct"] = summarise(within)
        m["reached_2pct"] = sum(1 for w in within if w != float("inf"))
    return result


def _print_task(task: str, table, result: dict) -> None:
    print(f"\n## {task}: {result['configs']} configurations x {result['epochs']} epochs, best final mAP "
          f"{result['best_final']:.4f}; {result['seconds']} s of replay")
    budgets = result["budgets"]
    print("| method | epochs to within 2% (median [IQR]) | seeds within 2% | "
          + " | ".join(f"regret @{b}" for b in budgets) + " |")
    print("|---" * (3 + len(budgets)) + "|")
    ranked = sorted(result["methods"].items(), key=lambda kv: (kv[1]["budget_to_2pct"]["median"],
                                                                kv[1]["regret"][-1]["median"]))
    for name, m in ranked:
        w = m["budget_to_2pct"]
        cells = [f"{r['median']:.4f}" for r in m["regret"]]
        print(f"| {name} | {w['median']:g} [{w['q25']:g}, {w['q75']:g}] | {m['reached_2pct']} | "
              + " | ".join(cells) + " |")


def _plot(report: dict, path: Path) -> None:
    """Median regret against the budget (in full trainings) with the interquartile band, per task, for the
    baselines and the best method of each searcher."""
    fig = Figure(figsize=(6 * len(report), 4), layout="constrained")
    axes = fig.subplots(1, len(report), squeeze=False)[0]
    for ax, (task, result) in zip(axes, report.items()):
        x = [b / result["epochs"] for b in result["budgets"]]
        for name in _plotted(result):
            regret = result["methods"][name]["regret"]
            line = ax.plot(x, [r["median"] for r in regret], marker="o", markersize=3, label=name)[0]
            ax.fill_between(x, [r["q25"] for r in regret], [r["q75"] for r in regret], alpha=0.15,
                            color=line.get_color())
        ax.set(xlabel=f"budget (in {result['epochs']}-epoch trainings)", ylabel="regret (best final mAP - pick's)",
               title=f"{task} ({result['configs']} configurations)")
        ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    storage.write_bytes(str(path), buffer.getvalue())


def _plotted(result: dict) -> list[str]:
    names = list(result["methods"])
    chosen = [n for n in ("random+no-ES", "tpe10+no-ES") if n in names]
    for prefix in ("random+asha", "tpe10+asha", "tpe4+asha"):
        candidates = [n for n in names if n.startswith(prefix) and ", lr" not in n]
        if candidates:
            chosen.append(min(candidates, key=lambda n: (result["methods"][n]["budget_to_2pct"]["median"],
                                                         result["methods"][n]["regret"][-1]["median"])))
    return chosen or names


def summary(args) -> None:
    """The table and plot of a replay already run (its JSON keeps every seed's numbers)."""
    path = Path(args.data_dir) / f"replay_{args.methods}.json"
    record = json.loads(path.read_text())
    for task, result in record["tasks"].items():
        _print_task(task, None, _with_summaries(result))
    _plot(record["tasks"], Path(args.data_dir) / f"search_quality_{args.methods}.png")


def fidelity(args) -> None:
    """Do early rankings at a lower resolution agree with the full-resolution final ranking? Spearman's rank
    correlation at each early epoch, against the same at full resolution, with each epoch's cost; the
    tables go to stdout and to fidelity.md."""
    lines = []
    for task in args.tasks:
        path = str(Path(args.data_dir) / f"search_{task}.csv")
        full, low = load_table(path, size="320x180"), load_table(path, size=args.low)
        keys = sorted(set(full.points) & set(low.points))
        final = [full.points[k].final_score for k in keys]
        lines += [f"\n## {task}: rank correlation with the full-resolution final score ({len(keys)} configurations)",
                  f"| epoch | 320x180 | {args.low} | s/epoch 320x180 | s/epoch {args.low} |", "|---|---|---|---|---|"]
        for epoch in range(1, low.epochs + 1):
            at_full = rank_correlation([full.points[k].curve[epoch - 1]["score"] for k in keys], final)
            at_low = rank_correlation([low.points[k].curve[epoch - 1]["score"] for k in keys], final)
            lines.append(f"| {epoch} | {at_full:.2f} | {at_low:.2f} | {_mean_seconds(full, keys, epoch):.1f} | "
                         f"{_mean_seconds(low, keys, epoch):.1f} |")
    print("\n".join(lines))
    storage.write_text(str(Path(args.data_dir) / "fidelity.md"), "\n".join(lines).lstrip() + "\n")


def _mean_seconds(table, keys: list[str], epoch: int) -> float:
    return sum(float(table.points[k].curve[epoch - 1].get("seconds") or 0) for k in keys) / len(keys)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    gt = sub.add_parser("ground-truth", help="train the design to full length (or --stop-after N epochs)")
    gt.add_argument("--task", choices=sorted(TASKS), required=True)
    gt.add_argument("--size", default=None, help="training and evaluation size (default 320x180)")
    gt.add_argument("--epochs", type=int, default=EPOCHS, help=f"the schedule's length (default {EPOCHS})")
    gt.add_argument("--stop-after", type=int, default=0, help="end each run after N epochs (0: run them all)")
    gt.add_argument("--configs", type=int, default=0, help="only the first N configurations (a smoke run)")
    gt.add_argument("--data-dir", default=str(DATA_DIR), help="where the tables go (default benchmarks/data)")
    gt.add_argument("--parallel", type=int, default=max(2, (os.cpu_count() or 1) // 2),
                    help="configurations trained at a time (default: half the CPUs, at least 2; on 2 cores two "
                         "1-thread runs trained 1.3x faster than one 2-thread run at 320x180; at 160x90 they kept "
                         "Ray starting and reaping idle workers, epochs stalled for up to 150 s: use 1 there)")
    rp = sub.add_parser("replay", help="replay the methods on the tables through Ray Tune")
    rp.add_argument("--tasks", nargs="+", default=CHOOSING_TASKS, choices=sorted(TASKS))
    rp.add_argument("--seeds", type=int, default=20)
    rp.add_argument("--budget", type=int, default=16 * EPOCHS, help="epochs per run, summed over trials")
    rp.add_argument("--methods", choices=("all", "core", "quick"), default="all")
    rp.add_argument("--parallel", type=int, default=6, help="Tune runs at a time (each waits on its trials more "
                                                             "than it computes)")
    rp.add_argument("--data-dir", default=str(DATA_DIR))
    sm = sub.add_parser("summary", help="the table and plot of a replay already run")
    sm.add_argument("--methods", choices=("all", "core", "quick"), default="all")
    sm.add_argument("--data-dir", default=str(DATA_DIR))
    fd = sub.add_parser("fidelity", help="rank correlation of early epochs at a lower resolution")
    fd.add_argument("--tasks", nargs="+", default=CHOOSING_TASKS, choices=sorted(TASKS))
    fd.add_argument("--low", default="160x90")
    fd.add_argument("--data-dir", default=str(DATA_DIR))
    co = sub.add_parser("cost", help="seconds per epoch of each batch pair, one run at a time (a quiet machine)")
    co.add_argument("--task", choices=sorted(TASKS), required=True)
    co.add_argument("--epochs", type=int, default=4, help="epochs per pair (the first is not counted)")
    co.add_argument("--data-dir", default=str(DATA_DIR))
    si = sub.add_parser("simulate", help="the v2 replay: every policy x seed on the tables (benchmarks/search_sim.py)")
    si.add_argument("--tasks", nargs="+", default=CHOOSING_TASKS, choices=sorted(TASKS))
    si.add_argument("--seeds", type=int, default=500, help="search seeds per block (two blocks)")
    si.add_argument("--policies", choices=("all", "core", "focus", "gp", "quick"), default="core")
    si.add_argument("--parallel", type=int, default=max(1, os.cpu_count() or 1))
    si.add_argument("--data-dir", default=str(DATA_DIR))
    si.add_argument("--noise-from", help=_noise_from_help())
    si.add_argument("--resume", action="store_true",
                    help="keep the policies sim_<task>.json already holds for these seeds; simulate the rest")
    su = sub.add_parser("success", help="the simulated success tables, the peers' rows beside them")
    su.add_argument("--tasks", nargs="+", default=CHOOSING_TASKS, choices=sorted(TASKS))
    su.add_argument("--block", choices=("select_seeds", "report_seeds"), default="report_seeds",
                    help="the seeds the defaults were chosen on, or those the headline is read on")
    su.add_argument("--data-dir", default=str(DATA_DIR))
    su.add_argument("--noise-from", help=_noise_from_help())
    rs = sub.add_parser("sweep", help="one real sweep (experiments/sweep_lr.py) against the task's table")
    rs.add_argument("--task", choices=sorted(TASKS), required=True)
    rs.add_argument("--num-samples", type=int, default=12)
    rs.add_argument("--work", default=".neoray_cache/search_sweeps", help="where the sweep's directory goes")
    rs.add_argument("--data-dir", default=str(DATA_DIR))
    args = parser.parse_args(argv)
    steps = {"ground-truth": ground_truth, "replay": replay, "summary": summary, "fidelity": fidelity, "cost": cost,
             "simulate": simulate_step, "success": success_step,
             "sweep": real_sweep}
    steps[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
