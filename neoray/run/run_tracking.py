"""Experiment trackers, opt-in: ``--track mlflow[:URI]`` and ``--track wandb[:PROJECT]`` on ``neoray train`` and
``neoray sweep``, through Ray's own integrations (``ray.air.integrations.mlflow`` / ``.wandb``).

This module parses ``--track`` for both commands and tracks ``neoray train``; neoray.tune.sweep_tracking tracks a
sweep with Tune's logger callbacks. Neither tracker is a dependency of neoray: one asked for and not installed
is a ``ConfigError`` naming the extra to install (``pip install "neoray[mlflow]"``), raised before Ray starts.

Where things land (both commands):

* MLflow: tracking URI from ``mlflow:URI``, else ``MLFLOW_TRACKING_URI``, else MLflow's default (a local path
  or a relative URI is made absolute against the working directory); experiment ``MLFLOW_EXPERIMENT_NAME`` or
  ``neoray``. A training run is one MLflow run named after its run directory.
* W&B: project from ``wandb:PROJECT``, else ``WANDB_PROJECT``, else ``neoray``; ``WANDB_MODE`` and
  ``WANDB_DIR`` of the command's environment apply (offline runs stay on disk for ``wandb sync``). A training
  run is one W&B run (job type ``train``) named after its run directory.

``neoray train``: Ray Train V2 has no tracker callback (Tune's logger callbacks do not apply to a TorchTrainer);
what Ray offers is ``setup_mlflow`` / ``setup_wandb``. neoray calls them in the driver, which owns the tracker
run from before the TorchTrainer starts until after the summary is written, however the run ends. Called on
rank 0 inside the training function instead, the run would belong to a worker that is gone (a restart, the end
of ``fit()``) before the summary exists, and every worker node would have to reach the tracking store. Each
epoch's row comes from the Train controller's ``RunRecorder`` (the callback that sees every report, in the
controller's own process) through a Ray queue, and a driver thread logs it: the config as parameters, every
number of the epoch (loss and each named loss, lr, score, mAP, mAP50 ..., images/s, per-class AP) at
step = epoch, then the summary's numbers (``summary/...``), ``summary.json``, ``summary.md``, ``config.yaml``
and ``metrics.csv`` as files, and the stop reason. ``RUN_DIR/tracking.json`` keeps the tracker runs' ids, so
``neoray train --resume`` continues the same runs.
"""

from __future__ import annotations

import importlib.util
import math
import os
import re
import tempfile
import threading
import time
import uuid
from dataclasses import dataclass

from ray.util.queue import Empty, Queue

from neoray import storage
from neoray.config import Config, ConfigError
from neoray.run.rundir import ended_well

TRACKERS = ("mlflow", "wandb")
DEFAULT_EXPERIMENT = "neoray"  # MLflow experiment and W&B project when the user names none
RECORD_FILE = "tracking.json"
RUN_FILES = ("summary.json", "summary.md", "config.yaml", "metrics.csv")
# The driver's W&B choices, passed to wandb.init: Ray's processes (Tune's W&B logging actors) inherit the
# environment the Ray instance was started with, not the environment of the command that asked for W&B.
WANDB_ENV_ARGS = {"WANDB_MODE": "mode", "WANDB_DIR": "dir"}


@dataclass(frozen=True)
class TrackSpec:
    kind: str  # "mlflow" or "wandb"
    target: str | None = None  # the MLflow tracking URI or the W&B project


def add_track_argument(parser, command: str) -> None:
    parser.add_argument(
        "--track", action="append", default=[], metavar="TRACKER",
        help=f"log the {command} to an experiment tracker (repeat for both): mlflow (tracking URI from "
             "MLFLOW_TRACKING_URI), mlflow:URI, wandb, or wandb:PROJECT; needs pip install \"neoray[mlflow]\" "
             "or \"neoray[wandb]\"")


def installed(package: str) -> bool:
    return importlib.util.find_spec(package) is not None


def parse_track(values: list[str] | None) -> list[TrackSpec]:
    """``--track`` values -> specs, checked: a known tracker, once each, its package installed, an MLflow
    store the installed MLflow writes to (not a folder, which MLflow 3 refuses), W&B credentials unless W&B runs
    offline. One line (``ConfigError``) otherwise."""
    specs = {}
    for value in values or []:
        kind, _, target = value.partition(":")
        kind = kind.strip().lower()
        if kind not in TRACKERS:
            raise ConfigError(f"--track {value}: unknown tracker; use mlflow, mlflow:URI, wandb or wandb:PROJECT")
        if kind in specs:
            raise ConfigError(f"--track {value}: {kind} given twice")
        if not installed(kind):
            raise ConfigError(f'--track {kind} needs the {kind} package: pip install "neoray[{kind}]"')
        specs[kind] = TrackSpec(kind, target.strip() or None)
    if "mlflow" in specs:
        _check_mlflow_store(specs["mlflow"])
    if "wandb" in specs:
        _check_wandb_credentials()
    return list(specs.values())


def _file_store_path(uri: str) -> str | None:
    """The folder of an MLflow file store URI (``file:...`` or a plain path), None for anything else."""
    if uri.startswith("file:"):
        return re.sub(r"^file:(//)?", "", uri)
    return None if "://" in uri or uri.startswith("sqlite:") else uri


def _check_mlflow_store(spec: TrackSpec) -> None:
    """Refuse, before anything starts, a tracking URI that is a folder (a file store) when the installed MLflow
    refuses file stores (MLflow 3 does, unless MLFLOW_ALLOW_FILE_STORE is set): it would fail in the driver
    after Ray started, with MLflow's traceback."""
    uri = spec.target or os.environ.get("MLFLOW_TRACKING_URI")
    folder = _file_store_path(uri) if uri else None
    if folder is None:
        return
    import mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])
    from mlflow import environment_variables  # noqa: PLC0415

    allowed = getattr(environment_variables, "MLFLOW_ALLOW_FILE_STORE", None)
    if allowed is None or allowed.get():  # an MLflow that still writes file stores, or the user opted in
        return
    given = f"--track mlflow:{uri}" if spec.target else f"--track mlflow (MLFLOW_TRACKING_URI={uri})"
    database = "sqlite:///" + os.path.join(os.path.abspath(folder), "mlflow.db")
    raise ConfigError(f"{given}: MLflow {mlflow.__version__} no longer tracks to a folder (a file store); give a "
                      f"database such as mlflow:{database}, or a tracking server (mlflow:http://HOST:5000)")


def _check_wandb_credentials() -> None:
    """Fail before anything starts rather than when Tune or the driver first calls wandb.init."""
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "dryrun") or os.environ.get("WANDB_API_KEY"):
        return
    import wandb  # noqa: PLC0415 - optional dependency (neoray[wandb])

    if not getattr(getattr(wandb, "api", None), "api_key", None):
        raise ConfigError("--track wandb: no W&B credentials; run `wandb login`, set WANDB_API_KEY, or set "
                          "WANDB_MODE=offline to keep the runs on disk (wandb sync uploads them later)")


def absolute_uri(uri: str) -> str:
    """A tracking URI that means the same from any working directory: local paths, ``file:`` and
    ``sqlite:///relative.db`` are made absolute; server and database URIs are left as they are."""
    if uri.startswith("sqlite:///") and not uri.startswith("sqlite:////"):
        return "sqlite:///" + os.path.abspath(uri[len("sqlite:///"):])
    if uri.startswith("file:"):
        path = re.sub(r"^file:(//)?", "", uri)
        return "file://" + os.path.abspath(path)
    if "://" not in uri:
        return os.path.abspath(uri)
    return uri


def mlflow_settings(spec: TrackSpec) -> dict:
    uri = spec.target or os.environ.get("MLFLOW_TRACKING_URI")
    if not uri:
        import mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])

        uri = mlflow.get_tracking_uri()  # MLflow's own default for this working directory
    return {"tracking_uri": absolute_uri(uri),
            "experiment": os.environ.get("MLFLOW_EXPERIMENT_NAME") or DEFAULT_EXPERIMENT}


def artifact_location(tracking_uri: str) -> str | None:
    """Where a new experiment in a local SQLite store keeps its artifacts: ``mlruns/`` next to the database
    file (MLflow's own default is ``./mlruns`` in whatever directory the command ran from); None for servers."""
    if tracking_uri.startswith("sqlite:///"):
        return "file://" + os.path.join(os.path.dirname(tracking_uri[len("sqlite:///"):]), "mlruns")
    return None


def wandb_settings(spec: TrackSpec) -> dict:
    return {"project": spec.target or os.environ.get("WANDB_PROJECT") or DEFAULT_EXPERIMENT}


def wandb_env_args() -> dict:
    return {arg: os.environ[var] for var, arg in WANDB_ENV_ARGS.items() if os.environ.get(var)}


def wandb_run_id(name: str) -> str:
    """A W&B run id: the name's safe characters and a random suffix (ids are unique per project)."""
    return f"{re.sub(r'[^A-Za-z0-9_-]', '-', name)[:40]}-{uuid.uuid4().hex[:8]}"


def artifact_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "-", name)


def epoch_numbers(row: dict) -> dict:
    """The finite numbers of an epoch's row, per-class AP as ``per_class_ap/<class>``."""
    out = {}
    for key, value in row.items():
        if isinstance(value, dict):
            out.update({f"{key}/{k}": v for k, v in epoch_numbers(value).items()})
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[key] = float(value)
    return out


def flat_config(cfg: Config) -> dict:
    """The config as ``section.key`` parameters (lists and nested options as text)."""
    out = {}
    for section, values in cfg.to_dict().items():
        if isinstance(values, dict):
            out.update({f"{section}.{k}": v if isinstance(v, (int, float, str, bool)) else str(v)
                        for k, v in values.items()})
        else:
            out[section] = values if isinstance(values, (int, float, str, bool)) else str(values)
    return out


def copy_files(src_dir: str, names: tuple[str, ...], dest: str) -> list[str]:
    """Copy the files of ``src_dir`` (local or a URI) that exist to the local folder ``dest``."""
    copied = []
    for name in names:
        try:
            data = storage.read_bytes(storage.join(src_dir, name))
        except (FileNotFoundError, OSError):
            continue
        with open(os.path.join(dest, name), "wb") as handle:
            handle.write(data)
        copied.append(name)
    return copied


def _stop_status(summary: dict) -> tuple[str, int]:
    """(MLflow run status, process exit code for W&B) of a training run's stop reason."""
    reason = str(summary.get("stop_reason") or "")
    if reason == "interrupted":
        return "KILLED", 1
    if ended_well(reason):
        return "FINISHED", 0
    return "FAILED", 1


def _warn_once(flags: set, key: str, exc: Exception) -> None:
    if key not in flags:
        flags.add(key)
        print(f"neoray train: warning: {key} logging failed ({type(exc).__name__}: {exc}); training goes on",
              flush=True)


class RunTracker:
    """The tracker runs of one ``neoray train`` run, owned by the driver (see the module docstring)."""

    def __init__(self, run_dir: str, record: dict):
        self.run_dir = run_dir
        self.record = record  # tracker -> what reopens its run: written to RUN_DIR/tracking.json
        self.feed = Queue(actor_options={"num_cpus": 0})  # RunRecorder (controller) -> this driver
        self._mlflow_client = None
        self._wandb_run = None
        self._failed: set = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._pump, name="neoray-tracker", daemon=True)

    @classmethod
    def start(cls, specs: list[TrackSpec], run_dir: str, cfg: Config, resume: bool = False,
              sweep: dict | None = None) -> RunTracker:
        """``sweep``: the tracker record of the sweep this run belongs to (its sweep.json "tracking"); the run
        lands in the sweep's MLflow store, nested under its parent run, and in its W&B project and group."""
        previous = _read_record(run_dir) if resume else {}
        sweep = sweep or {}
        tracker = cls(run_dir, {})
        name = storage.basename(run_dir)
        for spec in specs:
            if spec.kind == "mlflow":
                tracker._start_mlflow(spec, previous.get("mlflow"), cfg, name, sweep.get("mlflow"))
            else:
                tracker._start_wandb(spec, previous.get("wandb"), cfg, name, sweep.get("wandb"))
        storage.write_json(storage.join(run_dir, RECORD_FILE), tracker.record, indent=2)
        tracker._thread.start()
        return tracker

    def _start_mlflow(self, spec: TrackSpec, previous: dict | None, cfg: Config, name: str,
                      sweep: dict | None) -> None:
        # Ray's integration modules import the tracker itself (seconds): only when a run asks for it, never
        # in the controller or trial processes that import this module for RunRecorder.
        import mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])
        from ray.air.integrations.mlflow import setup_mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])

        settings = mlflow_settings(spec)
        tags = {"neoray.command": "train", "neoray.run_dir": self.run_dir}
        if sweep:
            settings = {k: sweep[k] for k in ("tracking_uri", "experiment")}
            tags.update({"mlflow.parentRunId": sweep["parent_run_id"], "neoray.command": "sweep"})
        if previous and (spec.target is None or absolute_uri(spec.target) == previous["tracking_uri"]):
            settings = {k: previous[k] for k in ("tracking_uri", "experiment")}
            mlflow.set_tracking_uri(settings["tracking_uri"])
            run_id = mlflow.start_run(run_id=previous["run_id"]).info.run_id  # RUNNING again
        else:
            module = setup_mlflow(flat_config(cfg), tracking_uri=settings["tracking_uri"],
                                  experiment_name=settings["experiment"], run_name=name,
                                  artifact_location=artifact_location(settings["tracking_uri"]),
                                  create_experiment_if_not_exists=True, tags=tags)
            run_id = module.active_run().info.run_id
        self._mlflow_client = mlflow.MlflowClient(settings["tracking_uri"])
        self.record["mlflow"] = {**settings, "run_id": run_id}
        print(f"neoray train: MLflow run {run_id} in experiment '{settings['experiment']}' at "
              f"{settings['tracking_uri']}", flush=True)

    def _start_wandb(self, spec: TrackSpec, previous: dict | None, cfg: Config, name: str,
                     sweep: dict | None) -> None:
        from ray.air.integrations.wandb import setup_wandb  # noqa: PLC0415 - optional dependency (neoray[wandb])

        settings = {"project": sweep["project"]} if sweep else wandb_settings(spec)
        same = previous and (spec.target is None or spec.target == previous["project"])
        run_id = previous["id"] if same else wandb_run_id(name)
        project = previous["project"] if same else settings["project"]
        self._wandb_run = setup_wandb(cfg.to_dict(), trial_id=run_id, trial_name=name, project=project,
                                      group=sweep["group"] if sweep else None, job_type="train", resume="allow",
                                      **wandb_env_args())
        self.record["wandb"] = {"project": project, "id": run_id}

    def _pump(self) -> None:
        """Log each epoch the controller hands over, until ``finish`` and the queue is empty."""
        while True:
            try:
                row = self.feed.get(timeout=1.0)
            except Empty:
                if self._stop.is_set():
                    return
                continue
            self.log_epoch(row)

    def log_epoch(self, row: dict) -> None:
        numbers = epoch_numbers(row)
        step = int(row.get("epoch") or 0)
        if self._mlflow_client is not None:
            try:
                self._log_mlflow_metrics(numbers, step)
            except Exception as exc:  # a tracker that is down never stops training
                _warn_once(self._failed, "MLflow", exc)
        if self._wandb_run is not None:
            try:
                self._wandb_run.log(numbers, step=step)
            except Exception as exc:
                _warn_once(self._failed, "W&B", exc)

    def _log_mlflow_metrics(self, numbers: dict, step: int) -> None:
        from mlflow.entities import Metric  # noqa: PLC0415 - optional dependency (neoray[mlflow])

        now = int(time.time() * 1000)
        # MLflow keys allow letters, digits, _ - . / and spaces; a class name may hold anything else.
        metrics = [Metric(re.sub(r"[^\w\-./ ]", "_", key), value, now, step) for key, value in numbers.items()]
        self._mlflow_client.log_batch(self.record["mlflow"]["run_id"], metrics=metrics)

    def finish(self, summary: dict) -> None:
        """Log the last epochs, the summary and the run's files; end the tracker runs with the run's outcome."""
        self._stop.set()
        self._thread.join(timeout=120)
        self.feed.shutdown()
        status, exit_code = _stop_status(summary)
        numbers = {f"summary/{k}": v for k, v in epoch_numbers(summary).items()}
        with tempfile.TemporaryDirectory(prefix="neoray-track-") as tmp:
            files = copy_files(self.run_dir, RUN_FILES, tmp)
            if self._mlflow_client is not None:
                self._finish_mlflow(numbers, summary, tmp, status)
            if self._wandb_run is not None:
                self._finish_wandb(numbers, summary, [os.path.join(tmp, f) for f in files], exit_code)

    def _finish_mlflow(self, numbers: dict, summary: dict, files_dir: str, status: str) -> None:
        import mlflow  # noqa: PLC0415 - optional dependency (neoray[mlflow])

        run_id = self.record["mlflow"]["run_id"]
        try:
            self._log_mlflow_metrics(numbers, int(summary.get("epochs_run") or 0))
            self._mlflow_client.set_tag(run_id, "neoray.stop_reason", str(summary.get("stop_reason")))
            self._mlflow_client.log_artifacts(run_id, files_dir)
        except Exception as exc:
            _warn_once(self._failed, "MLflow", exc)
        active = mlflow.active_run()
        if active is not None and active.info.run_id == run_id:
            mlflow.end_run(status=status)
        else:
            self._mlflow_client.set_terminated(run_id, status=status)

    def _finish_wandb(self, numbers: dict, summary: dict, files: list[str], exit_code: int) -> None:
        import wandb  # noqa: PLC0415 - optional dependency (neoray[wandb])

        run = self._wandb_run
        try:
            run.summary.update({**numbers, "stop_reason": str(summary.get("stop_reason"))})
            artifact = wandb.Artifact(artifact_name(f"{storage.basename(self.run_dir)}-summary"), type="run-summary")
            for path in files:
                artifact.add_file(path)
            run.log_artifact(artifact)
        except Exception as exc:
            _warn_once(self._failed, "W&B", exc)
        run.finish(exit_code=exit_code)
        wandb.teardown()  # every record written when the command returns (finish() leaves W&B's service writing)


def _read_record(run_dir: str) -> dict:
    try:
        return storage.read_json(storage.join(run_dir, RECORD_FILE))
    except (FileNotFoundError, ValueError):
        return {}


__all__ = [
    "RECORD_FILE", "RunTracker", "TrackSpec", "absolute_uri", "add_track_argument", "artifact_location",
    "artifact_name", "copy_files", "epoch_numbers", "flat_config", "installed", "mlflow_settings", "parse_track",
    "wandb_env_args", "wandb_run_id", "wandb_settings",
]
