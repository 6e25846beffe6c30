"""A sweep: Ray Tune runs trials of the engine's training function, OptunaSearch proposes the parameters
(seeded TPE, the config's own values first) and ASHA stops bad trials early on ``score``.

Layout of a sweep directory (``OUTPUT/NAME``; Tune's experiment directory)::

    sweep.json            what ran: options, space, ASHA settings, the metric that drives ASHA
    trial_0001/ ...       Tune's trial directories: params.json, progress.csv, result.json, TensorBoard
                          events, checkpoints; the per-epoch history that ``neoray report`` reads
    trials/trial_0001/    the TorchTrainer run of a multi-worker trial (its own checkpoints)
    asha_stopped.json     trials the ASHA scheduler stopped before max_t (its own decisions)
    trials.csv, trials.md the results table; best_config.yaml the best trial as a training config (only
                          when every trial ended: an interrupted sweep writes a partial table, no best config)
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ray import tune
from ray.tune.schedulers import AsyncHyperBandScheduler, TrialScheduler

from neoray.config import Config, ConfigError, apply_overrides, from_dict, load_config, save_config
from neoray.io import write_text_atomic
from neoray.tune.space import (
    PARAMS, SearchSpace, load_space, optuna_distributions, params_to_overrides, points_to_evaluate,
)
from neoray.tune.trainable import PG_RECORD, SCORE, SCORE_DOC, release_worker_pgs, sweep_trainable

REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CONFIG = REPO_ROOT / "experiments" / "configs" / "synthetic_cpu.yaml"
DEFAULT_SPACE = REPO_ROOT / "experiments" / "configs" / "space_default.yaml"
# Ray Data's read and map tasks need CPUs of their own; trials that hold every CPU starve them and hang.
DATA_HEADROOM_CPUS = 1.0
# A multi-worker trial's driver only waits on its TorchTrainer; Tune refuses 0, so it asks for a sliver.
TRAINER_DRIVER_CPUS = 0.01
MODE = "max"
# Tune's trial states in which a trial has ended; any other state when fit() returns means an interrupt.
# The live trial table's metric columns (result key -> header); Tune's default shows only the first 4 keys.
TABLE_METRICS = {"epoch": "epoch", "loss": "loss", SCORE: SCORE, "map": "mAP", "map50": "mAP50", "lr": "lr now"}


@dataclass
class SweepOptions:
    config: str | None = None
    space: str | None = None
    num_samples: int | None = None
    max_concurrent: int | None = None  # None: as many trials as the cluster can hold
    workers_per_trial: int | None = None  # None: the config's train.workers
    gpus_per_worker: float | None = None  # None: the config's train.gpus_per_worker if use_gpu, else 0
    autoscale: bool = False  # the cluster adds nodes on demand: do not fail fast on today's resources
    output: str = "sweeps"
    name: str = "sweep_lr"
    resume: bool = False
    overrides: list[str] = field(default_factory=list)
    grace_period: int | None = None  # override the space file's ASHA settings
    reduction_factor: float | None = None
    max_failures: int = 2  # retries of a failed trial before it is reported as errored
    fail: list | None = None  # test-only fault injection, see trainable._inject_failure
    loop: str | None = None  # test-only training function "module:function", see trainable._load_loop

    @property
    def sweep_dir(self) -> Path:
        return Path(self.output).resolve() / self.name


@dataclass
class SweepResult:
    sweep_dir: Path
    rows: list[dict]
    best: dict | None
    best_config_path: Path | None
    interrupted: bool = False  # fit() returned before every trial ended (Ctrl-C): continue with --resume


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _placeholder(path: str) -> bool:
    """Empty, or a path into the default cache that does not exist yet (synthetic_cpu.yaml's convention):
    both mean the embedded synthetic dataset."""
    path = (path or "").strip()
    return not path or (path.startswith(".neoray_cache/") and not Path(path).exists())


def resolve_config(opts: SweepOptions) -> Config:
    """The training config every trial starts from: file + overrides + sweep options + default data."""
    cfg = load_config(opts.config or DEFAULT_CONFIG, opts.overrides)
    updates = {}
    if opts.workers_per_trial is not None:
        updates["train.workers"] = opts.workers_per_trial
    if opts.gpus_per_worker is not None:
        updates["train.use_gpu"] = opts.gpus_per_worker > 0
        if opts.gpus_per_worker > 0:
            updates["train.gpus_per_worker"] = opts.gpus_per_worker
    if _placeholder(cfg.data.train):
        from neoray.tune.default_data import ensure_default_data

        shards = ensure_default_data(size=cfg.data.size)
        updates["data.train"] = str(shards["train"])
        if _placeholder(cfg.data.val):
            updates["data.val"] = str(shards["val"])
    if updates:
        cfg = from_dict(apply_overrides(cfg.to_dict(), updates))
    return cfg


def resolve_space(opts: SweepOptions) -> SearchSpace:
    space = load_space(opts.space or DEFAULT_SPACE)
    if opts.num_samples is not None:
        if opts.num_samples < 1:
            raise ConfigError("--num-samples must be >= 1")
        space.num_samples = opts.num_samples
    if opts.grace_period is not None:
        space.asha.grace_period = opts.grace_period
    if opts.reduction_factor is not None:
        space.asha.reduction_factor = opts.reduction_factor
    return space


# ----------------------------------------------------------------------------------------------------
# Resources
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrialResources:
    tune_request: dict  # what Tune reserves for the trial itself
    cpus: float  # what one trial holds in all (its driver + its workers)
    gpus: float
    max_concurrent: int
    direct: bool  # True: the single-worker path runs the loop inside the trial


def worker_gpus(cfg: Config, gpus_per_worker: float | None) -> float:
    """The GPUs one worker really gets: --gpus-per-worker, which resolve_config also writes into
    train.gpus_per_worker, the number both the direct path's Tune request and the TorchTrainer's
    resources_per_worker use, so planning and placement agree (a fraction works on both paths)."""
    if gpus_per_worker is not None:
        return float(gpus_per_worker)
    return float(cfg.train.gpus_per_worker) if cfg.train.use_gpu else 0.0


def plan_resources(cfg: Config, gpus_per_worker: float | None, max_concurrent: int | None,
                   cluster: dict, nodes: list[dict] | None = None, autoscale: bool = False) -> TrialResources:
    """Size each trial and the concurrency so that every admitted trial can place all its workers.

    ``cluster`` is ray.cluster_resources(); ``nodes`` the resources of each alive node. On a fixed cluster
    this fails fast (ConfigError) when one trial cannot fit, in total or because no single node holds one
    worker: otherwise its Train workers wait for resources forever and the sweep hangs without an error.
    With ``autoscale`` today's resources say nothing about tomorrow's, so nothing is refused: a trial that
    does not fit waits for the autoscaler (Tune keeps it pending; a TorchTrainer retries its worker group).
    """
    workers, cpw = cfg.train.workers, cfg.train.cpus_per_worker
    direct = workers == 1
    gpw = worker_gpus(cfg, gpus_per_worker)
    trial_cpus = workers * cpw + (0.0 if direct else TRAINER_DRIVER_CPUS)
    trial_gpus = workers * gpw
    have_cpus, have_gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    usable_cpus = have_cpus - DATA_HEADROOM_CPUS
    opt_in = "; if the cluster autoscales (ray up cluster.yaml), pass --autoscale to let trials wait for new nodes"
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError("--max-concurrent must be >= 1")
    if not autoscale:
        if trial_cpus > usable_cpus + 1e-9:
            raise ConfigError(
                f"one trial needs {trial_cpus:g} CPUs ({workers} workers x {cpw:g} train.cpus_per_worker) plus "
                f"{DATA_HEADROOM_CPUS:g} for Ray Data, but the cluster has {have_cpus:g}; lower --workers-per-trial "
                f"or train.cpus_per_worker, or add nodes{opt_in}")
        if trial_gpus > have_gpus + 1e-9:
            raise ConfigError(
                f"one trial needs {trial_gpus:g} GPUs ({workers} workers x {gpw:g} --gpus-per-worker), but the "
                f"cluster has {have_gpus:g}; lower --workers-per-trial or --gpus-per-worker, or add GPU nodes{opt_in}")
        # One worker is one bundle, placed on one node: cluster totals can hide that no node is big enough.
        if nodes is not None and not any(n.get("CPU", 0) + 1e-9 >= cpw and n.get("GPU", 0) + 1e-9 >= gpw
                                         for n in nodes):
            raise ConfigError(
                f"one worker needs {cpw:g} CPUs and {gpw:g} GPUs on a single node, but no node has that (largest: "
                f"{max((n.get('CPU', 0) for n in nodes), default=0):g} CPUs, "
                f"{max((n.get('GPU', 0) for n in nodes), default=0):g} GPUs); lower train.cpus_per_worker or "
                f"--gpus-per-worker, or add a bigger node{opt_in}")
    fit = math.floor(max(usable_cpus, 0.0) / trial_cpus + 1e-9) if trial_cpus > 0 else 1
    if trial_gpus > 0:
        fit = min(fit, math.floor(have_gpus / trial_gpus + 1e-9))
    if autoscale:
        # The autoscaler adds nodes for pending trials; without --max-concurrent, admit what fits today
        # (at least one) rather than guess the cluster's maximum.
        fit = max_concurrent if max_concurrent is not None else max(1, fit)
        print(f"[neoray] --autoscale: trials that do not fit today's cluster ({have_cpus:g} CPUs, {have_gpus:g} "
              f"GPUs) wait for the autoscaler; up to {fit} at a time", flush=True)
    elif max_concurrent is not None:
        if max_concurrent > fit:
            print(f"[neoray] --max-concurrent {max_concurrent} lowered to {fit}: more trials than that cannot "
                  f"place their workers on this cluster", flush=True)
        fit = min(fit, max_concurrent)
    if direct:
        request = {"cpu": cpw, "gpu": gpw}  # the trial itself is the worker
    else:
        request = {"cpu": TRAINER_DRIVER_CPUS}  # the trial's TorchTrainer places its own workers
    return TrialResources(request, trial_cpus, trial_gpus, max(1, fit), direct)


def _alive_nodes() -> list[dict]:
    import ray

    return [node["Resources"] for node in ray.nodes() if node.get("Alive")]


# ----------------------------------------------------------------------------------------------------
# Tune pieces
# ----------------------------------------------------------------------------------------------------


def trial_name(trial) -> str:
    """trial_0001, trial_0002, ...: the search generator's counter (kept across --resume), nothing random,
    so that a retried trial's TorchTrainer run (named after the trial) finds its own checkpoints."""
    index = int(str(trial.experiment_tag).split("_", 1)[0])
    return f"trial_{index:04d}"


class RecordingASHA(AsyncHyperBandScheduler):
    """ASHA that writes down the trials it stops before max_t: Tune marks both those and the trials
    that ran to the end TERMINATED, and the results table must tell them apart. The record is ASHA's
    own decision, written atomically as it is made (it survives a killed driver)."""

    def __init__(self, record: str, **kwargs):
        super().__init__(**kwargs)
        self.record = record

    def on_trial_result(self, tune_controller, trial, result):
        action = super().on_trial_result(tune_controller, trial, result)
        t = result.get(self._time_attr)
        if action == TrialScheduler.STOP and t is not None and t < self._max_t:
            path = Path(self.record)
            stopped = json.loads(path.read_text()) if path.exists() else {}
            stopped[str(trial)] = {self._time_attr: t, SCORE: result.get(SCORE)}
            write_text_atomic(path, json.dumps(stopped, indent=2))
            print(f"[neoray] ASHA stopped {trial} at {self._time_attr} {t} ({SCORE} {_fmt(result.get(SCORE))})",
                  flush=True)
        return action


class AnnounceTrials(tune.Callback):
    """One line when a trial starts (or restarts), with its parameters: the live table Tune prints every
    30 s (see _progress_reporter) says nothing about starts."""

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={_fmt(v)}" for k, v in trial.config.items())
        print(f"[neoray] {trial} started: {params}", flush=True)


class ReleaseTrainPlacementGroups(tune.Callback):
    """When a multi-worker trial ends, remove its Train worker placement group (listed by the trial, see
    trainable.RecordPlacementGroupCallback). Tune ends a trial by killing its actor as soon as it
    reports its last epoch or ASHA stops it, so the trial cannot clean up after its TorchTrainer, and
    with Ray 2.60 the orphaned group stayed CREATED and starved every later trial (the sweep hung)."""

    def _release(self, trial) -> None:
        removed = release_worker_pgs(Path(trial.local_path) / PG_RECORD)
        if removed:
            print(f"[neoray] {trial}: released {removed} Train placement group(s)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


def _progress_reporter(space: SearchSpace):
    """Tune's live trial table with the columns that matter (TABLE_METRICS) and the searched parameters.
    Tune 2.60's default output infers its columns from the first 4 result keys (epoch, step, lr, loss)
    and ignores a progress reporter; run_sweep selects the output that honours this one
    (RAY_AIR_NEW_OUTPUT=0)."""
    from ray.tune import CLIReporter

    # print_intermediate_tables: its default follows Tune's global verbosity when the reporter is made,
    # which the previous fit() in this process left at 1 (no table at all).
    return CLIReporter(metric_columns=dict(TABLE_METRICS), parameter_columns=list(space.params),
                       max_report_frequency=30, sort_by_metric=False, print_intermediate_tables=True)


def _make_scheduler(space: SearchSpace, max_t: int, record_path: Path) -> RecordingASHA:
    asha = space.asha
    return RecordingASHA(
        str(record_path), time_attr=asha.time_attr, max_t=max_t,
        grace_period=min(asha.grace_period, max_t), reduction_factor=asha.reduction_factor,
    )


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The milestones at which ASHA compares trials: grace_period * rf^k below max_t."""
    rungs, t = [], float(grace_period)
    while t < max_t:
        rungs.append(t)
        t *= reduction_factor
    return rungs


def _trainable(resources: TrialResources, setup: dict):
    from ray import tune

    # The shared setup (base config, test hooks) travels in the object store, not in each trial's config.
    return tune.with_resources(tune.with_parameters(sweep_trainable, setup=setup), resources.tune_request)


def _setup(cfg: Config, opts: SweepOptions) -> dict:
    return {"base": cfg.to_dict(), "sweep_dir": str(opts.sweep_dir), "fail": opts.fail, "loop": opts.loop}


def _build_tuner(cfg: Config, space: SearchSpace, opts: SweepOptions, resources: TrialResources):
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    sweep_dir = opts.sweep_dir
    points = points_to_evaluate(cfg, space)
    searcher = OptunaSearch(
        space=optuna_distributions(space), metric=SCORE, mode=MODE, points_to_evaluate=points,
        seed=space.seed,  # OptunaSearch builds a TPESampler(seed=seed)
    )
    return tune.Tuner(
        _trainable(resources, _setup(cfg, opts)),
        tune_config=tune.TuneConfig(
            metric=SCORE, mode=MODE, search_alg=searcher,
            scheduler=_make_scheduler(space, _max_t(cfg, space), sweep_dir / "asha_stopped.json"),
            num_samples=space.num_samples, max_concurrent_trials=resources.max_concurrent,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            # Direct path: a finished trial's actor (imports done, Ray Data workers warm) runs the next
            # trial, since the training function keeps no global state; measured 6.4 -> 2.5 s of
            # overhead per trial. Not for TorchTrainer trials: a reused driver actor broke the next
            # trial's worker group (ActorDiedError), and their cost is the worker group anyway.
            reuse_actors=resources.direct,
        ),
        run_config=tune.RunConfig(
            name=opts.name, storage_path=str(sweep_dir.parent),
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[ReleaseTrainPlacementGroups(), AnnounceTrials()],
            progress_reporter=_progress_reporter(space),
            verbose=1,  # the trial table and experiment messages, not every result of every trial
        ),
    )


def _max_t(cfg: Config, space: SearchSpace) -> int:
    return cfg.train.epochs  # both time attributes count epochs (one report per epoch)


# ----------------------------------------------------------------------------------------------------
# Results
# ----------------------------------------------------------------------------------------------------


def _history(trial_dir: Path) -> list[dict]:
    """Per-epoch results of one trial from Tune's result.json (one JSON object per report)."""
    path = trial_dir / "result.json"
    if not path.exists():
        return []
    rows = []
    for line in path.read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def load_history(sweep_dir: Path, trial: str) -> list[dict]:
    return _history(Path(sweep_dir) / trial)


def _best(values) -> float | None:
    finite = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    return max(finite) if finite else None


def trial_ended(trial, asha_stopped: dict) -> bool:
    """Whether a trial ended on its own terms: errored, stopped by ASHA, or its training function returned
    (Tune then sets ``done`` in its last result, also when a stop criterion ended it). After Ctrl-C, Tune
    marks the trials it stops TERMINATED as well, but their last result is not ``done``."""
    return trial.status == "ERROR" or str(trial) in asha_stopped or bool((trial.last_result or {}).get("done"))


def _status(trial, asha_stopped: dict) -> str:
    if trial.status == "ERROR":
        return "errored"
    if not trial_ended(trial, asha_stopped):
        return "interrupted"  # pending, running or stopped by Ctrl-C when fit() returned
    return "stopped early (ASHA)" if str(trial) in asha_stopped else "finished"


def read_asha_stopped(sweep_dir: Path) -> dict:
    path = Path(sweep_dir) / "asha_stopped.json"
    return json.loads(path.read_text()) if path.exists() else {}


def sweep_interrupted(trials: list, asha_stopped: dict, num_samples: int) -> bool:
    """True when fit() returned before the sweep's end: a trial that has not ended on its own terms, or
    trials the searcher never created (Ctrl-C between two trials)."""
    return len(trials) < num_samples or not all(trial_ended(t, asha_stopped) for t in trials)


def collect_rows(result_grid, sweep_dir: Path, space_params) -> list[dict]:
    """One row per trial, from Tune's trial state and each trial's on-disk history."""
    asha_stopped = read_asha_stopped(sweep_dir)
    rows = []
    for trial in result_grid._experiment_analysis.trials:  # Trial objects carry Tune's status
        name = str(trial)
        history = _history(sweep_dir / name)
        last = history[-1] if history else {}
        row = {"trial": name, "status": _status(trial, asha_stopped)}
        for param in space_params:
            row[param] = trial.config.get(param)
        row.update({
            # Only evaluated epochs: on the others the engine repeats the last mAP (0 before the first).
            "best_map": _best(h.get("map") for h in history if h.get("evaluated", 1)),
            "best_map50": _best(h.get("map50") for h in history if h.get("evaluated", 1)),
            "best_score": _best(h.get(SCORE) for h in history),
            "epochs": last.get("epoch", last.get("training_iteration", 0)),
            "failures": trial.num_failures,
            "time_s": round(float(last.get("time_total_s", 0.0)), 1),
            "error": _short_error(trial),
        })
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    return rows


def _short_error(trial) -> str:
    if trial.status != "ERROR":
        return ""
    error_file = Path(trial.local_path or "") / "error.txt"
    text = error_file.read_text() if error_file.exists() else "failed"
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "failed"


def best_row(rows: list[dict]) -> dict | None:
    """Highest best mAP; trials that never evaluated are ranked by score after those that did."""
    ok = [r for r in rows if r["best_score"] is not None]
    if not ok:
        return None
    return max(ok, key=lambda r: (r["best_map"] is not None, r["best_map"] or 0.0, r["best_score"]))


def _fmt(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def rows_to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)\n"
    keys = [k for k in rows[0] if k != "error"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(_fmt(r[k]) for k in keys) + " |" for r in rows]
    errors = [f"- {r['trial']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors:"] + errors
    return "\n".join(lines) + "\n"


def export_best_config(base: Config, row: dict, path: Path, sweep_name: str) -> Config:
    """The best trial's parameters applied to the base config: ready for `neoray train BEST_CONFIG`."""
    overrides = params_to_overrides({k: row[k] for k in PARAMS if k in row and row[k] is not None})
    overrides["name"] = f"{sweep_name}_best"
    cfg = from_dict(apply_overrides(base.to_dict(), overrides))
    save_config(cfg, path)
    return cfg


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------


def _ensure_ray() -> None:
    import ray

    if not ray.is_initialized():
        # Inside `ray job submit` this connects to the job's cluster; otherwise it starts a local one.
        ray.init(configure_logging=False)


def run_sweep(opts: SweepOptions) -> SweepResult:
    from ray import tune

    os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
    # Tune's legacy console output: the only one in Ray 2.60 that honours a progress reporter's columns
    # (see _progress_reporter). Read when fit() starts, in this driver only.
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    cfg = resolve_config(opts)
    space = resolve_space(opts)
    sweep_dir = opts.sweep_dir
    if not opts.resume and (sweep_dir / "tuner.pkl").exists():
        raise ConfigError(f"{sweep_dir} already holds a sweep; pass --resume to continue it or another --name")
    if opts.resume and not tune.Tuner.can_restore(str(sweep_dir)):
        raise ConfigError(f"{sweep_dir}: no sweep to resume there")

    _ensure_ray()
    import ray

    sweep_dir.mkdir(parents=True, exist_ok=True)
    meta_path = sweep_dir / "sweep.json"
    if opts.resume and meta_path.exists():
        # The restored sweep keeps its own config, space and resources (Tune's saved state).
        meta = json.loads(meta_path.read_text())
        cfg = from_dict(meta["base_config"])
        resources = TrialResources(**meta["resources"])
        opts.fail, opts.loop = meta.get("test_hooks", {}).get("fail"), meta.get("test_hooks", {}).get("loop")
    else:
        resources = plan_resources(cfg, opts.gpus_per_worker, opts.max_concurrent, ray.cluster_resources(),
                                   nodes=_alive_nodes(), autoscale=opts.autoscale)
        meta = {
            "name": opts.name, "metric": SCORE, "mode": MODE,
            "metric_doc": SCORE_DOC,
            "asha": {**asdict(space.asha), "max_t": _max_t(cfg, space)},
            "rungs": asha_rungs(space.asha.grace_period, space.asha.reduction_factor, _max_t(cfg, space)),
            "params": space.params, "seed": space.seed, "num_samples": space.num_samples,
            "resources": asdict(resources), "options": {k: v for k, v in asdict(opts).items() if k not in ("fail", "loop")},
            "base_config": cfg.to_dict(),
            "test_hooks": {"fail": opts.fail, "loop": opts.loop},
        }
        write_text_atomic(meta_path, json.dumps(meta, indent=2, default=str))
    num_samples = meta["num_samples"]
    path = "direct (training loop inside the trial)" if resources.direct else "TorchTrainer per trial"
    print(f"[neoray] sweep {sweep_dir}: {num_samples} trials, up to {resources.max_concurrent} at a time, "
          f"{cfg.train.workers} worker(s) per trial, {path}", flush=True)
    print(f"[neoray] ASHA stops trials early on '{SCORE}' (max; {SCORE_DOC}) at {meta['asha']['time_attr']} "
          f"rungs {meta['rungs']}", flush=True)

    if opts.resume:
        tuner = tune.Tuner.restore(str(sweep_dir), trainable=_trainable(resources, _setup(cfg, opts)),
                                   resume_unfinished=True,
                                   resume_errored=True)
    else:
        tuner = _build_tuner(cfg, space, opts, resources)
    # Tune catches Ctrl-C itself and returns from fit() as if the sweep had ended (see trial_ended).
    result_grid = tuner.fit()
    trials = result_grid._experiment_analysis.trials  # Trial objects: status and last result
    asha_stopped = read_asha_stopped(sweep_dir)
    interrupted = sweep_interrupted(trials, asha_stopped, num_samples)

    rows = collect_rows(result_grid, sweep_dir, list(meta["params"]))
    write_text_atomic(sweep_dir / "trials.csv", rows_to_csv(rows))
    table = rows_to_markdown(rows)
    if interrupted:
        ended = sum(trial_ended(t, asha_stopped) for t in trials)
        table = (f"**Partial results: the sweep was interrupted with {ended} of {num_samples} trials ended; "
                 f"continue it with --resume.**\n\n") + table
    write_text_atomic(sweep_dir / "trials.md", table)
    print("\n" + table, flush=True)
    best = best_row(rows)
    best_path = None
    if interrupted:
        # Not a result yet: best_config.yaml is written only when every trial has ended.
        if best is not None:
            print(f"[neoray] best trial so far {best['trial']}: mAP {_fmt(best['best_map'])}, "
                  f"mAP50 {_fmt(best['best_map50'])}; no best_config.yaml until the sweep ends", flush=True)
        print(f"[neoray] sweep interrupted; partial results: {sweep_dir}/trials.md", flush=True)
        return SweepResult(sweep_dir, rows, best, None, interrupted=True)
    if best is not None:
        best_path = sweep_dir / "best_config.yaml"
        export_best_config(cfg, best, best_path, opts.name)
        print(f"[neoray] best trial {best['trial']}: mAP {_fmt(best['best_map'])}, mAP50 {_fmt(best['best_map50'])}"
              f"; its config: {best_path}", flush=True)
    else:
        print("[neoray] no trial reported a result; no best config written", flush=True)
    print(f"[neoray] results: {sweep_dir}/trials.md; plots: neoray report {sweep_dir}; "
          f"TensorBoard: tensorboard --logdir {sweep_dir}", flush=True)
    return SweepResult(sweep_dir, rows, best, best_path)
