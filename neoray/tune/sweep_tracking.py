"""Experiment trackers for a sweep (``--track``, parsed and resolved by neoray.run.run_tracking).

Ray Tune's own logger callbacks log the trials, ``MLflowLoggerCallback`` and ``WandbLoggerCallback``: each trial
is a run with its searched parameters and every result Tune gets (one per epoch: loss and each named loss, lr,
score, mAP, mAP50 ..., images_per_s, step = Tune's training_iteration = the epoch). neoray adds the sweep as one
parent entity, each trial's neoray status when it ends (finished, stopped early (ASHA), errored; as the trial
table names them), and the sweep's results at its end:

* MLflow: the sweep is a parent run named after it (its settings and base config as parameters) in experiment
  ``MLFLOW_EXPERIMENT_NAME`` or ``neoray``; each trial is a run nested under it (tag ``mlflow.parentRunId``, how
  MLflow nests runs, passed through the callback's ``tags``) named ``trial_0001`` ..., tagged ``neoray.status``.
  At the end the parent run gets ``best_config.yaml``, ``trials.md``, ``trials.csv`` and ``sweep.json`` as
  artifacts, the best trial's numbers as metrics, and ends FINISHED (KILLED when the sweep was interrupted;
  ``--resume`` reopens it).
* W&B: a group per sweep (the sweep's name) in the project: each trial a run (Ray's logging actor, one process
  per trial) with ``neoray_status`` in its config; at the end a run named after the sweep (job type ``sweep``)
  with the trial table, the best trial in its summary and an artifact holding the files above.

``sweep.json`` records under ``"tracking"`` what the end of a resumed sweep needs (tracking URI, experiment and
parent run id; W&B project, group and the sweep run's id). Tune restores the callbacks themselves from its saved
state, and the MLflow callback's trial -> run map through ``get_state``/``set_state``, so a resumed trial keeps
logging to its own run. Tune's callbacks run in the driver: a local MLflow store or W&B offline files land on
the driver's machine.
"""

from __future__ import annotations

import os
import tempfile

from ray.air.constants import TRAINING_ITERATION
from ray.air.integrations.mlflow import MLflowLoggerCallback, setup_mlflow
from ray.air.integrations.wandb import WandbLoggerCallback, setup_wandb

from neoray import ray_compat, storage
from neoray.config import ConfigError
from neoray.run.run_tracking import (
    TrackSpec,
    artifact_location,
    artifact_name,
    copy_files,
    flat_config,
    mlflow_settings,
    parse_track,
    wandb_env_args,
    wandb_run_id,
    wandb_settings,
)
from neoray.tune import asha
from neoray.tune.record import SweepRecord
from neoray.tune.results import trial_status

SWEEP_FILES = ("best_config.yaml", "trials.md", "trials.csv", "sweep.json", "report.md")
STATUS_TAG = "neoray.status"  # MLflow tag of a trial's run
STATUS_KEY = "neoray_status"  # W&B config key of a trial's run
BEST_KEYS = ("best_map", "best_map50", "best_score")


def ended_as(trial, failed: bool, sweep_dir: str) -> str:
    """A trial's status when Tune reports its end (``failed``: Tune's own flag, set before the trial's state)."""
    return "errored" if failed else trial_status(trial, asha.read_stopped(sweep_dir))


class SweepMLflowLogger(MLflowLoggerCallback):
    """Ray's MLflow logger with each trial's run nested under the sweep's run and tagged with its status."""

    def __init__(self, sweep_dir: str, settings: dict, parent_run_id: str, sweep_name: str):
        super().__init__(settings["tracking_uri"], experiment_name=settings["experiment"],
                         tags={"mlflow.parentRunId": parent_run_id, "neoray.sweep": sweep_name})
        self.sweep_dir = sweep_dir
        self._restored_runs: dict = {}  # trial id -> run id, from a resumed sweep's saved state

    def log_trial_start(self, trial):
        run_id = self._restored_runs.pop(trial.trial_id, None)
        if run_id is not None:  # the same trial after --resume: its run, not a second one
            ray_compat.mlflow_trial_runs(self)[trial] = run_id
        super().log_trial_start(trial)

    def log_trial_end(self, trial, failed: bool = False):
        run_id = ray_compat.mlflow_trial_runs(self).get(trial)
        if run_id is not None:
            import mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])

            mlflow.MlflowClient(self.tracking_uri).set_tag(run_id, STATUS_TAG, ended_as(trial, failed, self.sweep_dir))
        super().log_trial_end(trial, failed)

    def get_state(self):
        runs = ray_compat.mlflow_trial_runs(self) if hasattr(self, "_trial_runs") else {}
        return {"runs": {**self._restored_runs, **{t.trial_id: r for t, r in runs.items()}}}

    def set_state(self, state):
        self._restored_runs = dict((state or {}).get("runs", {}))


class FlushedWandbLoggingActor(ray_compat.wandb_logging_actor_base()):
    """Ray's W&B logging actor, which returns only once W&B has written everything (see
    ray_compat.wandb_logging_actor_base: Ray kills the actor as soon as ``run()`` returns)."""

    def run(self):
        super().run()
        import wandb  # noqa: PLC0415 - optional dependency (neoray[wandb])

        wandb.teardown()


class SweepWandbLogger(WandbLoggerCallback):
    """Ray's W&B logger, one group per sweep, with each trial's status in its run's config."""

    _logger_actor_cls = FlushedWandbLoggingActor

    def __init__(self, sweep_dir: str, project: str, group: str):
        # resume="allow": a trial resumed with --resume logs to its run (the W&B run id is Tune's trial id).
        super().__init__(project=project, group=group, resume="allow", **wandb_env_args())
        self.sweep_dir = sweep_dir

    def log_trial_end(self, trial, failed: bool = False):
        # A result's "config" entry goes to the run's config (Ray's logging actor); the iteration keeps W&B's
        # step where the trial left it.
        iteration = (trial.last_result or {}).get(TRAINING_ITERATION)
        update = {"config": {STATUS_KEY: ended_as(trial, failed, self.sweep_dir)}}
        if iteration:
            update[TRAINING_ITERATION] = iteration
        self.log_trial_result(iteration or 0, trial, update)
        super().log_trial_end(trial, failed)


def _sweep_params(record: SweepRecord) -> dict:
    params = {"num_samples": record.num_samples, "metric": record.metric, "mode": record.mode, "seed": record.seed,
              "searched": ", ".join(record.params), **{f"asha.{k}": v for k, v in record.asha.to_dict().items()}}
    if record.base_config is not None:
        params.update({f"base.{k}": v for k, v in flat_config(record.base_config).items()})
    return params


def start_tracking(specs: list[TrackSpec], record: SweepRecord, sweep_dir: str) -> dict:
    """A new sweep's tracker record (sweep.json "tracking"); opens the MLflow parent run."""
    trackers = {}
    for spec in specs:
        if spec.kind == "mlflow":
            settings = mlflow_settings(spec)
            module = setup_mlflow(_sweep_params(record), tracking_uri=settings["tracking_uri"],
                                  experiment_name=settings["experiment"], run_name=record.name,
                                  artifact_location=artifact_location(settings["tracking_uri"]),
                                  create_experiment_if_not_exists=True,
                                  tags={"neoray.command": "sweep", "neoray.sweep_dir": sweep_dir})
            trackers["mlflow"] = {**settings, "parent_run_id": module.active_run().info.run_id}
        else:
            trackers["wandb"] = {**wandb_settings(spec), "group": record.name,
                                 "sweep_run_id": wandb_run_id(record.name)}
    return trackers


def resume_tracking(record: SweepRecord, track: list[str] | None) -> None:
    """A resumed sweep keeps the trackers it started with (Tune restores their callbacks); reopens the MLflow
    parent run (RUNNING again)."""
    started = record.track
    if track and list(track) != list(started):
        raise ConfigError(f"--resume continues with the trackers the sweep started with ({', '.join(started) or 'none'}"
                          "; sweep.json: tracking); drop --track or give the same ones")
    parse_track(started)  # still installed (and W&B still logged in): one line now, not a traceback from Tune
    parent = record.tracking.get("mlflow")
    if parent:
        import mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])

        mlflow.set_tracking_uri(parent["tracking_uri"])
        mlflow.start_run(run_id=parent["parent_run_id"])


def tracking_callbacks(record: SweepRecord, sweep_dir: str) -> list:
    trackers = record.tracking
    callbacks = []
    if "mlflow" in trackers:
        mlflow_record = trackers["mlflow"]
        callbacks.append(SweepMLflowLogger(sweep_dir, mlflow_record, mlflow_record["parent_run_id"], record.name))
    if "wandb" in trackers:
        callbacks.append(SweepWandbLogger(sweep_dir, trackers["wandb"]["project"], trackers["wandb"]["group"]))
    return callbacks


def _best_numbers(best: dict | None) -> dict:
    return {k: float(best[k]) for k in BEST_KEYS if best and isinstance(best.get(k), (int, float))}


def finish_tracking(record: SweepRecord, sweep_dir: str, rows: list[dict], best: dict | None,
                    interrupted: bool) -> None:
    """The sweep's results to its tracker entities (see the module docstring); errors are one warning line."""
    trackers = record.tracking
    if not trackers:
        return
    with tempfile.TemporaryDirectory(prefix="neoray-track-") as tmp:
        files = [os.path.join(tmp, f) for f in copy_files(sweep_dir, SWEEP_FILES, tmp)]
        for kind, finish in (("mlflow", _finish_mlflow), ("wandb", _finish_wandb)):
            if kind in trackers:
                try:
                    finish(trackers[kind], record, sweep_dir, rows, best, interrupted, tmp, files)
                except Exception as exc:  # the sweep's results are on disk whatever a tracker does
                    print(f"[neoray] warning: {kind}: the sweep's results were not logged ({type(exc).__name__}: "
                          f"{exc})", flush=True)


def _finish_mlflow(settings, record, sweep_dir, rows, best, interrupted, files_dir, files) -> None:
    import mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])

    parent = settings["parent_run_id"]
    client = mlflow.MlflowClient(settings["tracking_uri"])
    client.log_artifacts(parent, files_dir)
    for key, value in _best_numbers(best).items():
        client.log_metric(parent, key, value)
    if best:
        client.set_tag(parent, "neoray.best_trial", best["trial"])
    status = "KILLED" if interrupted else "FINISHED"
    active = mlflow.active_run()
    if active is not None and active.info.run_id == parent:
        mlflow.end_run(status=status)
    else:
        client.set_terminated(parent, status=status)
    print(f"[neoray] MLflow: sweep run {parent} in experiment '{settings['experiment']}' at "
          f"{settings['tracking_uri']}", flush=True)


def _finish_wandb(settings, record, sweep_dir, rows, best, interrupted, files_dir, files) -> None:
    import wandb  # noqa: PLC0415 - optional dependency (neoray[wandb])

    env = wandb_env_args()
    if "dir" not in env and storage.local_path(sweep_dir):
        env["dir"] = sweep_dir  # the sweep's own W&B files next to its results
    run = setup_wandb(_sweep_params(record), trial_id=settings["sweep_run_id"], trial_name=record.name,
                      project=settings["project"], group=settings["group"], job_type="sweep", resume="allow", **env)
    columns = list(rows[0]) if rows else []
    run.log({"trials": wandb.Table(columns=columns, data=[[_cell(r.get(c)) for c in columns] for r in rows])})
    run.summary.update({**_best_numbers(best), "best_trial": best["trial"] if best else None,
                        "interrupted": interrupted})
    artifact = wandb.Artifact(artifact_name(f"{record.name}-results"), type="sweep-results")
    for path in files:
        artifact.add_file(path)
    run.log_artifact(artifact)
    run.finish(exit_code=1 if interrupted else 0)
    wandb.teardown()  # every record written when the sweep returns (finish() leaves W&B's service writing)


def _cell(value):
    return value if isinstance(value, (int, float, str)) or value is None else str(value)


__all__ = [
    "STATUS_KEY", "STATUS_TAG", "FlushedWandbLoggingActor", "SweepMLflowLogger", "SweepWandbLogger", "finish_tracking",
    "resume_tracking", "start_tracking", "tracking_callbacks",
]
