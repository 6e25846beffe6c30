"""Every private Ray API and Ray-specific default neoray relies on, in one place.

Checked on Ray 2.60.0 (pyproject pins ``ray>=2.60,<2.61``); tests/test_ray_compat.py fails loudly when a
Ray upgrade breaks one of them. Each entry says why neoray needs it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys

import ray
import ray.train
from ray.train.v2._internal.execution import context as train_context
from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

CHECKED_RAY_VERSION = "2.60"

# Ray Train's controller polls its workers every RAY_TRAIN_HEALTH_CHECK_INTERVAL_S (2 s by default), and
# a worker's ray.train.report waits until the previous report was polled: with short epochs every report
# blocked 1-2 s. 0.25 s makes that wait negligible; a user's own setting wins.
TRAIN_ENV_DEFAULTS = {"RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.25"}
# Tune's default console output in 2.60 infers its columns from the first four result keys and ignores a
# progress reporter; the legacy output (RAY_AIR_NEW_OUTPUT=0) honours the sweep's CLIReporter columns.
TUNE_ENV_DEFAULTS = {"RAY_AIR_NEW_OUTPUT": "0", **TRAIN_ENV_DEFAULTS}


def set_train_defaults() -> None:
    """Ray Train environment defaults, read when a TorchTrainer starts (the driver's environment is
    propagated to the Train controller)."""
    for key, value in TRAIN_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


def set_tune_defaults() -> None:
    for key, value in TUNE_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)


# Ray Train V2 logs "Reporting training result N: TrainingReport(checkpoint=..., metrics={...every key...})" at
# INFO on every ray.train.report, from a logger named after its module's file path (``logging.getLogger(__file__)``
# in ray/train/v2/_internal/execution/context.py), so neither the "ray.train" logger's level nor RunConfig's
# LoggingConfig (both filter by the "ray.train" name) reaches it. The worker's root logger, which Ray Train sets to
# INFO with a console handler, prints it, and Ray forwards it to the driver's terminal: kilobytes per epoch
# burying neoray's one-line epoch summary. Every value in it is in the run's metrics.json and checkpoints.json.
TRAIN_REPORT_LOGGER = train_context.__file__
# The level of Ray Train's console output (controller and workers): its INFO lines (resources requested, worker
# group started with every rank's pid, process group set up) go to Ray's train log files only; its warnings and
# errors (worker failures, restarts) still show.
TRAIN_CONSOLE_LOG_LEVEL = "WARNING"


def train_logging_config():
    """``RunConfig(logging_config=...)`` for every TorchTrainer neoray builds (the public knob in Ray 2.60)."""
    return ray.train.LoggingConfig(log_level=TRAIN_CONSOLE_LOG_LEVEL)


def quiet_train_worker_logs() -> None:
    """Call in a Ray Train worker (or a Tune trial that reports through Ray Train's session) after Ray set up
    its logging: Ray Train's INFO lines and its per-report ``TrainingReport(...)`` dump stay off the console."""
    level = getattr(logging, TRAIN_CONSOLE_LOG_LEVEL)
    logging.getLogger("ray.train").setLevel(level)
    logging.getLogger(TRAIN_REPORT_LOGGER).setLevel(level)


# The search-quality replay runs hundreds of short Tune runs whose trials only replay recorded numbers:
# Tune's automatic CSV/JSON/TensorBoard result files would be most of its cost.
REPLAY_ENV_DEFAULTS = {"TUNE_DISABLE_AUTO_CALLBACK_LOGGERS": "1", "RAY_AIR_NEW_OUTPUT": "0"}


@contextlib.contextmanager
def replay_environment():
    """REPLAY_ENV_DEFAULTS (where unset) for the duration of a replay, then the environment as it was:
    a sweep later in the same process (or its child processes) needs Tune's result files."""
    before = {key: os.environ.get(key) for key in REPLAY_ENV_DEFAULTS}
    for key, value in REPLAY_ENV_DEFAULTS.items():
        os.environ.setdefault(key, value)
    # Without those result files, the ResultGrid Tune builds at the end of fit() warns once per trial that
    # it found none; the replay reads its results from its own stopper, not from the grid.
    analysis_logger = logging.getLogger("ray.tune.analysis.experiment_analysis")
    level = analysis_logger.level
    analysis_logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        analysis_logger.setLevel(level)
        for key, value in before.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def quiet_sigterm_exit() -> None:
    """Call in a Ray worker process (a sweep trial's actor, a Train worker). At ``ray.shutdown`` Ray's
    SIGTERM handler (``ray._private.worker.sigterm_handler``) raises SystemExit wherever the process is;
    inside a finaliser (a weakref callback, ``__del__``) Python reports that as "Exception ignored ...
    SystemExit: 1" with a traceback, which Ray streams to the user's terminal after a sweep that
    succeeded. The process exits as before; only that report is dropped (other unraisable errors keep
    Python's report)."""
    if getattr(sys.unraisablehook, "neoray_quiet_sigterm", False):
        return
    previous = sys.unraisablehook

    def hook(unraisable):
        if not isinstance(unraisable.exc_value, SystemExit):
            previous(unraisable)

    hook.neoray_quiet_sigterm = True
    sys.unraisablehook = hook


def train_run_storage():
    """(pyarrow filesystem, path of the run's Ray folder in it, a new checkpoint directory name) of the Ray Train
    run this worker belongs to: ``ray.train.get_context().get_storage()`` (a DeveloperAPI in 2.60, the way Ray's
    own error messages point to for a ``checkpoint_upload_fn``). neoray writes each checkpoint there itself,
    before ``ray.train.report(..., checkpoint_upload_mode=NO_UPLOAD)`` registers it, so that a full disk or a
    deleted output folder is known to every rank before the report, instead of failing the worker inside Ray's
    upload (a traceback, a restart that meets the same disk, a partial checkpoint folder left behind)."""
    context = ray.train.get_context().get_storage()
    return context.storage_filesystem, context.experiment_fs_path, context.make_default_checkpoint_dir_name()


def prefer_node(node_id: str) -> NodeAffinitySchedulingStrategy:
    """Run on ``node_id`` when it has the resources free, else on any node that has. Public ``soft=True`` falls
    back only when the node is gone or can never fit the task: on a node whose CPUs are all held (by training
    workers' placement groups) the task waits for that node forever, and a training worker waiting for its
    batch never frees one (measured: three 1-CPU workers packed onto a 3-CPU node never finished an epoch). The
    private ``_spill_on_unavailable`` (Ray 2.60) is what spills it to a node with a free CPU instead."""
    return NodeAffinitySchedulingStrategy(node_id, soft=True, _spill_on_unavailable=True)


def local_instance_pids() -> list[int]:
    """The pids of the processes ``ray.init()`` started for a local instance in this driver (GCS, raylet,
    dashboard, log monitor, ...: ``ray._private.worker._global_node.all_processes``, private in 2.60); what
    neoray.ray_reaper watches, with everything below them. Empty when this process did not start Ray."""
    node = getattr(ray._private.worker, "_global_node", None)
    processes = getattr(node, "all_processes", None) or {}
    return sorted({info.process.pid for infos in processes.values() for info in infos
                   if getattr(info, "process", None) is not None})


def worker_group_callback_base():
    """Base class of callbacks that see Ray Train's worker group (``WorkerGroupCallback``, internal in
    2.60). The sweep records each trial's worker placement group with it: after a trial's TorchTrainer
    finished inside Tune, that group stayed CREATED and starved every later trial (the sweep hung), so
    the sweep removes it itself."""
    return WorkerGroupCallback


def worker_group_placement_group_id(worker_group) -> str:
    """The hex id of a Train worker group's placement group (``WorkerGroupState`` is internal)."""
    return worker_group.get_worker_group_state().placement_group_handle.placement_group.id.hex()


def mlflow_trial_runs(callback) -> dict:
    """Trial -> MLflow run id of a Tune ``MLflowLoggerCallback`` (its ``_trial_runs``, filled in
    ``log_trial_start``). The sweep tags each trial's run with neoray's status when the trial ends, and
    carries the map across ``--resume`` (Tune restores callbacks' state, not this attribute), so a resumed
    trial keeps logging to its own run."""
    return callback._trial_runs


def optuna_search_trials(searcher) -> dict:
    """Tune trial id -> the ``optuna.Trial`` an ``OptunaSearch`` asked for it (its ``_ot_trials``). Tune hands
    the result that ends a trial (its last epoch, or the rung where ASHA stops it) to the searcher's
    ``on_trial_complete`` only, so OptunaSearch never reports it as an intermediate value; neoray's searcher
    (neoray.tune.study.StudySearch) reports it on that trial before Optuna closes it."""
    return searcher._ot_trials


def optuna_search_study(searcher):
    """The ``optuna.Study`` an ``OptunaSearch`` tells its trials' ends to (its ``_ot_study``). OptunaSearch tells
    every trial that ends with a score COMPLETE, one that ASHA stopped included, with its rung score as if it
    were a final one; neoray's searcher tells those trials PRUNED instead (neoray.tune.study.StudySearch)."""
    return searcher._ot_study


def optuna_search_completed(searcher) -> set:
    """The Tune trial ids whose end an ``OptunaSearch`` has told its study (its ``_completed_trials``): neoray's
    searcher tells a pruned trial's end itself and must add it there, or OptunaSearch would tell it again."""
    return searcher._completed_trials


def wandb_logging_actor_base():
    """Ray's W&B logging actor class (``_WandbLoggingActor``: one process per trial that owns the trial's W&B
    run), which ``WandbLoggerCallback`` builds from its ``_logger_actor_cls`` class attribute. Ray kills that
    actor as soon as its ``run()`` returns, and with wandb 0.31 ``finish()`` returns before W&B's service has
    written the run's last records: an offline run of a trial that errored at once was left with none. neoray's
    actor (neoray.tune.sweep_tracking) waits for the service (``wandb.teardown()``) before returning."""
    from ray.air.integrations.wandb import _WandbLoggingActor  # noqa: PLC0415 - optional dependency (neoray[wandb])

    return _WandbLoggingActor


def tune_trials(result_grid) -> list:
    """The ``Trial`` objects behind a ``ResultGrid``: their status (ERROR, TERMINATED...), last result
    and failure count tell finished, ASHA-stopped, errored and interrupted trials apart, which the public
    ``Result`` objects do not."""
    return list(result_grid._experiment_analysis.trials)


def trial_index(trial) -> int:
    """The search generator's counter of a trial (1, 2, ...), the first field of its experiment tag; it
    is kept across ``Tuner.restore``, so trial names built from it are stable."""
    return int(str(trial.experiment_tag).split("_", 1)[0])


__all__ = [
    "CHECKED_RAY_VERSION",
    "TRAIN_REPORT_LOGGER",
    "local_instance_pids",
    "mlflow_trial_runs",
    "optuna_search_completed",
    "optuna_search_study",
    "optuna_search_trials",
    "prefer_node",
    "quiet_sigterm_exit",
    "quiet_train_worker_logs",
    "set_train_defaults",
    "set_tune_defaults",
    "train_logging_config",
    "train_run_storage",
    "trial_index",
    "tune_trials",
    "wandb_logging_actor_base",
    "worker_group_callback_base",
    "worker_group_placement_group_id",
]
