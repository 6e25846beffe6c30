"""A sweep: Ray Tune runs trials of the engine's training function, OptunaSearch proposes the parameters
(seeded TPE, the config's own values first) and ASHA stops bad trials early on ``score``
(neoray.engine.ranking).

A sweep directory (``OUTPUT/NAME``; Tune's experiment directory) may be local, a shared mount or object
storage (``--output s3://bucket/sweeps``)::

    sweep.json            the sweep record (neoray.tune.record): options, space, ASHA settings, the metric
    trial_0001/ ...       Tune's trial directories: params.json, progress.csv, result.json, TensorBoard
                          events, checkpoints; the per-epoch history that ``neoray report`` reads
    trials/trial_0001/    the TorchTrainer run of a multi-worker trial (its own checkpoints)
    asha_stopped.json     trials the ASHA scheduler stopped before max_t (its own decisions)
    .neoray-sweep.lock    held (flock) by the driver running the sweep: a second one is refused
    optuna.db             the Optuna study, written while the sweep runs (neoray.tune.study; not with
                          --optuna-storage URL, whose database holds it)
    rung_trust.json       how far the rungs forecast the final ranking (neoray.tune.rung_trust)
    trials.csv, trials.md the results table; best_config.yaml the best trial as a training config (only
                          when every trial ended: an interrupted sweep writes a partial table, no best config)
    final/                with search.trial_epochs: the best trial continued to the end of its schedule, an
                          ordinary run directory (neoray.tune.continue_best)
"""

from __future__ import annotations

import fcntl
import os
from dataclasses import asdict, dataclass, field, replace

import optuna
from ray import tune
from ray.tune import CLIReporter
from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback, TBXLoggerCallback
from ray.tune.search.optuna import OptunaSearch

from neoray import ray_compat, storage
from neoray.cluster import TrialResources, check_visible_on_all_nodes, connect
from neoray.config import Config, ConfigError, load_config
from neoray.configs import DEFAULT_CONFIG, DEFAULT_SPACE
from neoray.data.demo import ensure_default_data
from neoray.data.shards import read_manifest
from neoray.engine import ranking
from neoray.run.run_tracking import parse_track
from neoray.run.rundir import claim_directory
from neoray.run.setup import check_batches, check_cluster, check_output_dir, needed_everywhere, prepare_config
from neoray.tune import asha as asha_record
from neoray.tune.best_config import FILE_NAME as BEST_CONFIG
from neoray.tune.best_config import export_best_config
from neoray.tune.continue_best import FINAL_DIR, continue_best
from neoray.tune.placement_groups import release_worker_pgs, trial_record_path
from neoray.tune.record import SearchSettings, SweepRecord, WarmStart, read_record, record_path, write_record
from neoray.tune.results import (
    TABLE_CSV,
    TABLE_MARKDOWN,
    best_row,
    collect_rows,
    format_value,
    rows_to_csv,
    rows_to_markdown,
    sweep_interrupted,
    trial_ended,
)
from neoray.tune.rung_trust import measure_trust
from neoray.tune.scheduler import OrderedASHA
from neoray.tune.space import (
    SearchSpace,
    check_space_against_config,
    load_space,
    lr_scaling_record,
    optuna_distributions,
    parse_batch,
    parse_trial_epochs,
    points_to_evaluate,
    relative_to_config,
)
from neoray.tune.study import (
    StudySearch,
    check_resume_storage,
    finish_study,
    new_study,
    redact,
    resume_study,
    searcher_arguments,
    study_callbacks,
)
from neoray.tune.sweep_tracking import finish_tracking, resume_tracking, start_tracking, tracking_callbacks
from neoray.tune.trainable import sweep_trainable
from neoray.tune.warm_start import warm_start_record

# The live trial table's metric columns (result key -> header); Tune's default shows only the first 4 keys.
TABLE_METRICS = {"epoch": "epoch", "loss": "loss", ranking.SCORE: ranking.SCORE, "map": "mAP", "map50": "mAP50",
                 "lr": "lr now"}


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
    warm_start: str | None = None  # a previous sweep directory: its best configurations run first
    overrides: list[str] = field(default_factory=list)
    trial_epochs: int | float | None = None  # override the space file's search.trial_epochs (0: whole runs)
    grace_period: int | None = None  # override the space file's ASHA settings
    reduction_factor: float | None = None
    max_failures: int = 2  # retries of a failed trial before it is reported as errored
    address: str | None = None  # the Ray cluster (neoray.cluster's policy)
    track: list[str] = field(default_factory=list)  # experiment trackers (neoray.run.run_tracking.parse_track)
    optuna_storage: str | None = None  # a database URL for the study (None: SWEEP_DIR/optuna.db)
    hooks: object = None  # a TrainHooks for every trial (tests); not recorded in sweep.json

    @property
    def sweep_dir(self) -> str:
        return storage.join(storage.absolute(self.output), self.name)


@dataclass
class SweepResult:
    sweep_dir: str
    rows: list[dict]
    best: dict | None
    best_config_path: str | None
    interrupted: bool = False  # fit() returned before every trial ended (Ctrl-C): continue with --resume
    final: dict | None = None  # the summary of the best trial continued to the end (search.trial_epochs)


# ----------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------


def _placeholder(path: str) -> bool:
    """Empty, or a path into the default cache that does not exist yet (synthetic_cpu.yaml's convention):
    both mean the embedded synthetic dataset."""
    path = (path or "").strip()
    return not path or (path.startswith(".neoray_cache/") and not storage.exists(path))


def resolve_config(opts: SweepOptions) -> Config:
    """The training config every trial starts from: file + overrides + sweep options + default data,
    through ``neoray.run.setup.prepare_config`` (absolute paths, every file checked)."""
    cfg = load_config(opts.config or DEFAULT_CONFIG, opts.overrides)
    updates = {}
    if opts.workers_per_trial is not None:
        updates["train.workers"] = opts.workers_per_trial
    if opts.gpus_per_worker is not None:
        updates["train.use_gpu"] = opts.gpus_per_worker > 0
        if opts.gpus_per_worker > 0:
            updates["train.gpus_per_worker"] = opts.gpus_per_worker
    if _placeholder(cfg.data.train):
        shards = ensure_default_data(size=cfg.data.size)
        updates["data.train"] = str(shards["train"])
        if _placeholder(cfg.data.val):
            updates["data.val"] = str(shards["val"])
    return prepare_config(cfg.with_overrides(updates), writes_output=False)


def resolve_space(opts: SweepOptions) -> SearchSpace:
    space = load_space(opts.space or DEFAULT_SPACE)
    if opts.num_samples is not None:
        if opts.num_samples < 1:
            raise ConfigError("--num-samples must be >= 1")
        space.num_samples = opts.num_samples
    if opts.trial_epochs is not None:
        space.trial_epochs = parse_trial_epochs(opts.trial_epochs, "--trial-epochs")
    return replace(space, asha=space.asha.with_overrides(opts.grace_period, opts.reduction_factor))


# ----------------------------------------------------------------------------------------------------
# Tune pieces
# ----------------------------------------------------------------------------------------------------


def trial_name(trial) -> str:
    """trial_0001, trial_0002, ...: the search generator's counter (kept across --resume), nothing random,
    so that a retried trial's TorchTrainer run (named after the trial) finds its own checkpoints."""
    return f"trial_{ray_compat.trial_index(trial):04d}"


class AnnounceTrials(tune.Callback):
    """One line when a trial starts (or restarts), with its parameters: the live table Tune prints every
    30 s (see _progress_reporter) says nothing about starts."""

    def on_trial_start(self, iteration, trials, trial, **info):
        params = ", ".join(f"{k}={format_value(v)}" for k, v in trial.config.items())
        print(f"[neoray] {trial} started: {params}", flush=True)


class ReleaseTrainPlacementGroups(tune.Callback):
    """When a multi-worker trial ends, remove its Train worker placement group (listed by the trial, see
    placement_groups.RecordPlacementGroupCallback). Tune ends a trial by killing its actor as soon as it
    reports its last epoch or ASHA stops it, so the trial cannot clean up after its TorchTrainer."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def _release(self, trial) -> None:
        removed = release_worker_pgs(trial_record_path(self.sweep_dir, str(trial)))
        if removed:
            print(f"[neoray] {trial}: released {removed} Train placement group(s)", flush=True)

    def on_trial_complete(self, iteration, trials, trial, **info):
        self._release(trial)

    def on_trial_error(self, iteration, trials, trial, **info):
        self._release(trial)


class TrialTable(CLIReporter):
    """Tune's live trial table with the columns that matter (TABLE_METRICS) and the searched parameters
    (shown by the legacy console output, see ray_compat.TUNE_ENV_DEFAULTS), whose "current best trial" line
    names the trial as every neoray line does (trial_0004), not by Ray's trial id."""

    def __init__(self, params: list[str]):
        # print_intermediate_tables: its default follows Tune's global verbosity when the reporter is made,
        # which the previous fit() in this process left at 1 (no table at all).
        super().__init__(metric_columns=dict(TABLE_METRICS), parameter_columns=params, max_report_frequency=30,
                         sort_by_metric=False, print_intermediate_tables=True)

    def set_search_properties(self, metric, mode) -> bool:
        # Without a metric the base class writes no best-trial line of its own (it names Ray's trial id).
        return True

    def report(self, trials, done: bool, *sys_info: str):
        super().report(trials, done, *sys_info, *_best_trial_line(trials))


def _best_trial_line(trials) -> list[str]:
    scored = sorted((str(t), t.last_result[ranking.SCORE]) for t in trials
                    if isinstance((t.last_result or {}).get(ranking.SCORE), (int, float)))
    if not scored:
        return []
    name, score = max(scored, key=lambda pair: pair[1])  # the first (earliest trial) of equal scores
    return [f"Current best trial: {name} with {ranking.SCORE}={format_value(score)} (its last report)"]


def _trainable(resources: TrialResources, setup: dict):
    # The shared setup (base config, test hooks) travels in the object store, not in each trial's config.
    return tune.with_resources(tune.with_parameters(sweep_trainable, setup=setup), resources.tune_request)


def _setup(record: SweepRecord, opts: SweepOptions) -> dict:
    base = record.base_config
    if record.search.trial_epochs:  # a prefix of the schedule (neoray.tune.continue_best)
        base = base.with_overrides({"train.stop_after_epoch": record.search.trial_epochs})
    return {"base": base.to_dict(), "sweep_dir": opts.sweep_dir, "lr_scaling": record.lr_scaling,
            "hooks": opts.hooks}


def _searcher(cfg: Config, space: SearchSpace, record: SweepRecord, record_dir: str,
              study: dict | None = None) -> OptunaSearch:
    """OptunaSearch with the space's sampler, seeded; the warm start's configurations first, then the
    config's own values and the space file's points. ``study``: its storage and study name (neoray.tune.study)."""
    if space.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=space.seed)
    elif space.sampler == "gp":
        sampler = optuna.samplers.GPSampler(seed=space.seed, n_startup_trials=space.startup_trials)
    else:
        sampler = optuna.samplers.TPESampler(seed=space.seed, n_startup_trials=space.startup_trials)
    own = points_to_evaluate(cfg, space)
    warm = [{**own[0], **w["params"]} for w in (record.warm_start.trials if record.warm_start else ())]
    return StudySearch(space=optuna_distributions(space), metric=ranking.SCORE, mode=ranking.MODE,
                       points_to_evaluate=warm + own, sampler=sampler, sweep_dir=record_dir, **(study or {}))


def _build_tuner(cfg: Config, space: SearchSpace, opts: SweepOptions, record: SweepRecord):
    sweep_dir, resources = opts.sweep_dir, record.resources
    return tune.Tuner(
        _trainable(resources, _setup(record, opts)),
        tune_config=tune.TuneConfig(
            metric=ranking.SCORE, mode=ranking.MODE, scheduler=OrderedASHA(sweep_dir, record.asha, log=_log_raw),
            search_alg=_searcher(cfg, space, record, sweep_dir,
                                 searcher_arguments(sweep_dir, opts.name, opts.optuna_storage)),
            num_samples=record.num_samples, max_concurrent_trials=resources.max_concurrent,
            trial_name_creator=trial_name, trial_dirname_creator=trial_name,
            # Direct path: a finished trial's actor (imports done, Ray Data workers warm) runs the next
            # trial, since the training function keeps no global state; measured 6.4 -> 2.5 s of
            # overhead per trial. Not for TorchTrainer trials: a reused driver actor broke the next
            # trial's worker group (ActorDiedError), and their cost is the worker group anyway.
            reuse_actors=resources.direct,
        ),
        run_config=tune.RunConfig(
            name=opts.name, storage_path=storage.parent(sweep_dir),
            failure_config=tune.FailureConfig(max_failures=opts.max_failures),
            checkpoint_config=tune.CheckpointConfig(num_to_keep=2),
            callbacks=[*result_file_loggers(), ReleaseTrainPlacementGroups(sweep_dir), AnnounceTrials(),
                       *study_callbacks(record.optuna, sweep_dir), *tracking_callbacks(record, sweep_dir)],
            progress_reporter=TrialTable(list(space.params)),
            verbose=1,  # the trial table and experiment messages, not every result of every trial
        ),
    )


def result_file_loggers() -> list:
    """Tune's result files, asked for explicitly: the summary, report and resume read each trial's
    result.json, and Tune leaves all three loggers out when TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1 is set
    in the environment."""
    return [JsonLoggerCallback(), CSVLoggerCallback(), TBXLoggerCallback()]


# ----------------------------------------------------------------------------------------------------
# The sweep
# ----------------------------------------------------------------------------------------------------


def _new_record(cfg: Config, space: SearchSpace, opts: SweepOptions, resources: TrialResources,
                warm_start: WarmStart | None) -> SweepRecord:
    options = {k: v for k, v in asdict(opts).items() if k != "hooks"}
    options["optuna_storage"] = redact(opts.optuna_storage)
    return SweepRecord(
        name=opts.name, asha=space.asha, params=space.params, num_samples=space.num_samples, seed=space.seed,
        # given: configurations run before the sampler's own (the config's values and the space file's points)
        search=SearchSettings(space.sampler, space.startup_trials, 1 + len(space.points_to_evaluate),
                              space.trial_epochs),
        lr_scaling=lr_scaling_record(space, cfg), resources=resources, base_config=cfg, track=list(opts.track),
        options=options,
        warm_start=warm_start,
    )


def _new_sweep(opts: SweepOptions) -> tuple[SweepRecord, tune.Tuner]:
    """A new sweep: config and space checked, the sweep directory claimed (before Ray starts), the cluster
    planned, the record written, the Tuner built. A start that fails before Tune has the sweep removes the
    directory it claimed, so the name is free again."""
    sweep_dir = opts.sweep_dir
    track = parse_track(opts.track)  # a tracker that is not installed fails before anything starts
    cfg = resolve_config(opts)
    space = relative_to_config(resolve_space(opts), cfg)
    check_space_against_config(space, cfg)
    _check_space_batches(cfg, space)
    warm_start = (warm_start_record(opts.warm_start, space.params, max(1, space.num_samples // 2))
                  if opts.warm_start else None)
    # --output itself: a probe in the sweep directory would make it exist on object storage (pyarrow keeps a
    # folder marker), and the claim below would then find it taken.
    check_output_dir(storage.parent(sweep_dir), "--output")
    if not claim_directory(sweep_dir):
        raise ConfigError(f"{sweep_dir} already exists (a sweep, or one starting there now); continue it with "
                          "--resume, or pass another --name")
    try:
        hold_sweep_lock(sweep_dir)
        info = connect(opts.address, log=_log)
        resources = check_cluster(cfg, info, sweep_dir, gpus_per_worker=opts.gpus_per_worker,
                                  max_concurrent=opts.max_concurrent, autoscale=opts.autoscale)
        record = _new_record(cfg, space, opts, resources, warm_start)
        record.optuna = new_study(sweep_dir, opts.name, opts.optuna_storage)
        record.tracking = start_tracking(track, record, sweep_dir)
        write_record(sweep_dir, record)
        return record, _build_tuner(cfg, space, opts, record)
    except BaseException:
        release_sweep_lock()
        storage.remove_dir(sweep_dir)  # claimed by this start alone, and no sweep yet
        raise


def _resumed_sweep(opts: SweepOptions) -> tuple[SweepRecord, tune.Tuner]:
    """A sweep continued with --resume: its own config, space and resources (Tune's saved state)."""
    sweep_dir = opts.sweep_dir
    if not tune.Tuner.can_restore(sweep_dir) or not storage.is_file(record_path(sweep_dir)):
        raise ConfigError(f"{sweep_dir}: no sweep to resume there")
    check_output_dir(sweep_dir, "--output")
    hold_sweep_lock(sweep_dir)
    record = read_record(sweep_dir)
    if record.resources is None or record.base_config is None:
        raise ConfigError(f"{record_path(sweep_dir)}: not a neoray sweep record (no trial resources or base config "
                          "to resume with)")
    check_resume_storage(record.optuna, opts.optuna_storage)
    resume_study(record.optuna, sweep_dir)  # before Tune restores the searcher that writes to it
    resume_tracking(record, opts.track)
    info = connect(opts.address, log=_log)
    if info.nodes > 1:
        check_visible_on_all_nodes(needed_everywhere(record.base_config, sweep_dir))
    tuner = tune.Tuner.restore(sweep_dir, trainable=_trainable(record.resources, _setup(record, opts)),
                               resume_unfinished=True, resume_errored=True)
    return record, tuner


LOCK_FILE = ".neoray-sweep.lock"
_held_lock: list[int] = []  # the open lock file of the sweep this process runs (at most one)


def hold_sweep_lock(sweep_dir: str) -> None:
    """Hold SWEEP_DIR/.neoray-sweep.lock (an flock) while this process runs the sweep, so that a second driver
    (a second --resume, or a new sweep racing a resume) is refused in one line. The kernel lets go of it when
    the process ends, however it ends: a killed sweep leaves nothing to clean. Object storage has no locks
    (its new sweeps are told apart by ``claim_directory``); a filesystem without flock goes without."""
    local = storage.local_path(sweep_dir)
    if local is None or _held_lock:
        return
    try:
        fd = os.open(os.path.join(local, LOCK_FILE), os.O_RDWR | os.O_CREAT, storage.umask_mode())
    except OSError as exc:
        raise storage.StorageError(f"{sweep_dir}: cannot write there ({exc.strerror or exc})") from None
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ConfigError(f"{sweep_dir}: another sweep is running there now; wait for it to end (or stop it), "
                          "or pass another --name") from None
    except OSError:  # no flock on this filesystem
        os.close(fd)
        return
    _held_lock.append(fd)


def release_sweep_lock() -> None:
    while _held_lock:
        os.close(_held_lock.pop())


def _check_space_batches(cfg: Config, space: SearchSpace) -> None:
    """Every batch the space can draw gives each worker at least one full batch per epoch."""
    if "batch" not in space.params:
        return
    num_images = read_manifest(cfg.data.train)["num_images"]
    for value in space.params["batch"]["values"]:
        batch_size, accumulate = parse_batch(value)
        trial = cfg.with_overrides({"train.batch_size": batch_size})
        try:
            check_batches(trial, num_images)
        except ConfigError as exc:
            raise ConfigError(f"search space: params.batch {value}: {exc}") from None


def search_line(record: SweepRecord) -> str:
    """What the searcher will do with this sweep's trials, said plainly: Optuna's TPE samples at random
    until it has ``startup_trials`` results, so a short sweep may never use its model."""
    search, n = record.search, record.num_samples
    # the warm start's configurations, then the config's own values and the space file's points
    given = len(record.warm_start.trials if record.warm_start else ()) + search.given
    if search.sampler == "random":
        return f"search: random (seeded), after {given} given configuration(s)"
    model = {"tpe": "TPE", "gp": "GP (Gaussian-process Bayesian optimisation)"}[search.sampler]
    modelled = n - max(given, search.startup_trials)
    if modelled <= 0:
        return (f"search: Optuna {model}, but all {n} trials fall in its start-up ({search.startup_trials} trials "
                f"before it models results): this sweep is {given} given configuration(s) and random search")
    return (f"search: Optuna {model}: {given} given configuration(s), random trials up to {search.startup_trials} "
            f"(its start-up), then {modelled} trial(s) suggested from the results so far")


def _log(line: str) -> None:
    print(f"[neoray] {line}", flush=True)


def _log_raw(line: str) -> None:
    print(line, flush=True)


def run_sweep(opts: SweepOptions) -> SweepResult:
    ray_compat.set_tune_defaults()
    try:
        return _run(opts)
    finally:
        release_sweep_lock()


def _run(opts: SweepOptions) -> SweepResult:
    record, tuner = _resumed_sweep(opts) if opts.resume else _new_sweep(opts)
    sweep_dir, resources, cfg = opts.sweep_dir, record.resources, record.base_config
    path = "direct (training loop inside the trial)" if resources.direct else "TorchTrainer per trial"
    _log(f"sweep {sweep_dir}: {record.num_samples} trials, up to {resources.max_concurrent} at a time, "
         f"{cfg.train.workers} worker(s) per trial, {path}")
    if record.rungs:
        _log(f"ASHA stops trials early on '{ranking.SCORE}' (max; {ranking.SCORE_DOC}) at {record.asha.time_attr} "
             f"rungs {record.rungs}, deciding in trial order")
    else:
        _log(f"no early stopping: every trial trains its {record.asha.max_t} epochs")
    if record.search.trial_epochs:
        _log(f"each trial trains epochs 1-{record.search.trial_epochs} of the {cfg.train.epochs}-epoch schedule; the "
             f"best then continues to epoch {cfg.train.epochs} ({storage.join(sweep_dir, FINAL_DIR)})")
    _log(search_line(record))
    if record.optuna:
        _log(f"Optuna study '{record.optuna['study_name']}', live: {record.optuna['dashboard']}")
    # Tune catches Ctrl-C itself and returns from fit() as if the sweep had ended (see trial_ended).
    trials = ray_compat.tune_trials(tuner.fit())
    asha_stopped = asha_record.read_stopped(sweep_dir)
    interrupted = sweep_interrupted(trials, asha_stopped, record.num_samples, record.asha.max_t)
    rows = collect_rows(trials, sweep_dir, record)
    table = rows_to_markdown(rows)
    if interrupted:
        ended = sum(trial_ended(t, asha_stopped, record.asha.max_t) for t in trials)
        table = (f"**Partial results: the sweep was interrupted with {ended} of {record.num_samples} trials ended; "
                 f"continue it with --resume.**\n\n") + table
    storage.write_text(storage.join(sweep_dir, TABLE_CSV), rows_to_csv(rows))
    storage.write_text(storage.join(sweep_dir, TABLE_MARKDOWN), table)
    print("\n" + table, flush=True)
    result = _finish(opts, record, rows, interrupted)
    finish_study(record.optuna, sweep_dir, opts.optuna_storage, interrupted)
    finish_tracking(record, sweep_dir, rows, result.best, interrupted)
    if record.search.trial_epochs and result.best is not None and not interrupted:
        result.final = continue_best(record, sweep_dir, result.best, _log)
        line = (f"final model: {result.best['trial']} continued to epoch {cfg.train.epochs}, "
                f"{_final_text(result.final)}; run directory {storage.join(sweep_dir, FINAL_DIR)}")
        storage.write_text(storage.join(sweep_dir, TABLE_MARKDOWN), f"{table}\n\n**{line[0].upper()}{line[1:]}**\n")
        _log(line)
    return result


def _log_trust(sweep_dir: str, record: SweepRecord, rows: list[dict]) -> None:
    """The end-of-sweep summary of how far ASHA's rungs can be trusted (neoray.tune.rung_trust)."""
    trust, line = measure_trust(sweep_dir, record, rows)
    for rung in trust:
        _log(rung.line(float(record.asha.reduction_factor)))
    _log(line)


def _finish(opts: SweepOptions, record: SweepRecord, rows: list[dict], interrupted: bool) -> SweepResult:
    sweep_dir, best = opts.sweep_dir, best_row(rows)
    if interrupted:
        # Not a result yet: best_config.yaml is written only when every trial has ended.
        if best is not None:
            _log(f"best trial so far {_best_text(best)}; no best_config.yaml until the sweep ends")
        _log(f"sweep interrupted; partial results: {sweep_dir}/{TABLE_MARKDOWN}")
        return SweepResult(sweep_dir, rows, best, None, interrupted=True)
    best_path = None
    if record.rungs:
        _log_trust(sweep_dir, record, rows)
    if best is not None:
        best_path = storage.join(sweep_dir, BEST_CONFIG)
        export_best_config(record.base_config, best, best_path, opts.name, record.lr_scaling)
        _log(f"best trial {_best_text(best)}; its config: {best_path}")
    else:
        _log("no trial reported a result; no best config written")
    _log(f"results: {sweep_dir}/{TABLE_MARKDOWN}; plots: neoray report {sweep_dir}; "
         f"TensorBoard: tensorboard --logdir {sweep_dir}")
    return SweepResult(sweep_dir, rows, best, best_path)


def _final_text(summary: dict) -> str:
    best = summary.get("best_metrics") or {}
    scores = (f"best mAP {format_value(best.get('map'))}, mAP50 {format_value(best.get('map50'))} at epoch "
              f"{summary.get('best_epoch')}" if best else "no evaluation")
    return f"{summary.get('stop_reason')}; {scores}"


def _best_text(best: dict) -> str:
    return f"{best['trial']}: mAP {format_value(best['best_map'])}, mAP50 {format_value(best['best_map50'])}"
