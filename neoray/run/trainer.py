"""Runs a training config on Ray Train: run directory, TorchTrainer, metrics files, final summary.

The run directory (neoray.run.rundir) may be local, a shared mount or object storage: Ray Train
stores its checkpoints there (``RunConfig(storage_path=RUN_DIR, name="ray")``), and the metrics rows,
checkpoint record, TensorBoard events and summary are written there by the driver side. Metrics rows are
written from the Train controller (a ``UserCallback`` that sees every report and runs on the driver's
node), so the files exist while the run goes on, whatever the workers do.

Every worker builds its own data stream (neoray.data.stream), so the TorchTrainer gets no datasets.
"""

from __future__ import annotations

import tempfile
import time

import ray.train
from ray.train.torch import TorchTrainer
from tensorboardX import SummaryWriter

from neoray import ray_compat, storage
from neoray.checkpoints import read_pointers, write_pointers
from neoray.config import Config, save_config
from neoray.engine import ranking
from neoray.engine.ray_context import PARTIAL_PREFIX, train_loop_per_worker
from neoray.run.run_tracking import RunTracker
from neoray.run.rundir import (
    RAY_DIR,
    RunDirError,
    epoch_line,
    existing_run_dir,
    new_run_dir,
    read_metrics,
    write_metrics,
    write_summary,
)
from neoray.run.setup import ResumePoint, pretrained_class_rows, resume_point

TENSORBOARD_DIR = "tensorboard"
TENSORBOARD_KEYS = ("loss", "lr", "map", "map50", "images_per_s", "peak_mem_mb", ranking.SCORE)


class RunRecorder(ray.train.UserCallback):
    """Ray Train callback (runs in the Train controller, on the driver's node): appends rank 0's
    aggregated metrics to the run's history, rewrites metrics.csv/json, records the latest and the
    best checkpoint (ranking.best, the order Ray keeps them in), writes TensorBoard events, prints
    one line per epoch and hands the row to the driver's experiment trackers (``feed``: a Ray queue that
    neoray.run.run_tracking.RunTracker reads; this callback runs in the controller's process, the tracker runs
    belong to the driver)."""

    def __init__(self, run_dir: str, verbose: bool = True, feed=None):
        self.run_dir = run_dir
        self.verbose = verbose
        self.feed = feed
        self._events_dir: str | None = None
        self._writer = None

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        row = dict(metrics[0])  # rank 0's metrics are already aggregated over all workers
        if not storage.is_dir(self.run_dir):
            return  # the run directory was deleted (the workers stop, train() says so): not made again here
        row["time"] = round(time.time(), 3)
        history = read_metrics(self.run_dir) + [row]
        write_metrics(self.run_dir, history)
        if checkpoint is not None:
            self._record_checkpoint(row, history, checkpoint.path)
        self._write_events(row)
        if self.feed is not None:
            self.feed.put(row)
        if self.verbose:
            print(epoch_line(row), flush=True)

    def _record_checkpoint(self, row: dict, history: list[dict], checkpoint_path: str) -> None:
        # Ray hands the checkpoint's path inside its filesystem ("bucket/run/ray/checkpoint_..." on S3);
        # the part from the Ray folder on is the same in every filesystem.
        relative = checkpoint_path[checkpoint_path.rindex(f"/{RAY_DIR}/") + 1:]
        pointers = read_pointers(self.run_dir)
        entry = {"path": relative, "epoch": row.get("epoch")}
        pointers["latest"] = entry
        if ranking.best(history) is row:
            pointers["best"] = {**entry, ranking.SCORE: ranking.score_of(row)}
        write_pointers(self.run_dir, pointers)

    def _write_events(self, row: dict) -> None:
        if self._writer is None:
            self._events_dir = tempfile.mkdtemp(prefix="neoray-tb-")
            self._writer = SummaryWriter(self._events_dir)
        step = int(row.get("epoch") or 0)
        for key in TENSORBOARD_KEYS:
            value = row.get(key)
            if isinstance(value, (int, float)) and value == value:
                self._writer.add_scalar(key, value, step)
        self._writer.flush()
        storage.upload_dir(self._events_dir, storage.join(self.run_dir, TENSORBOARD_DIR))


def build_trainer(cfg: Config, storage_path: str, *, resume_from: str | None = None, hooks=None,
                  callbacks: list | None = None, name: str = RAY_DIR, max_failures: int | None = None,
                  unreadable: tuple[str, ...] = ()):
    """The TorchTrainer for ``cfg``. ``name``/``storage_path`` are deterministic (RUN_DIR/ray), so a
    restarted driver with the same run directory finds the checkpoints; the sweep passes its own
    callbacks and storage. ``max_failures``: worker-group restarts (default ``train.max_failures``)."""
    ray_compat.set_train_defaults()
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "resume_from": resume_from, "unreadable": list(unreadable),
                           "hooks": hooks},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu, resources_per_worker=resources,
            placement_strategy=cfg.train.placement.upper()),
        run_config=ray.train.RunConfig(
            name=name, storage_path=storage_path,
            failure_config=ray.train.FailureConfig(
                max_failures=cfg.train.max_failures if max_failures is None else max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute=ranking.SCORE, checkpoint_score_order=ranking.MODE),
            callbacks=callbacks,
            logging_config=ray_compat.train_logging_config(),  # Ray Train's INFO lines off the console
        ),
    )


def train(cfg: Config, *, config_path: str | None = None, output: str | None = None,
          resume_dir: str | None = None, hooks=None, verbose: bool = True, track: list | None = None,
          resume: ResumePoint | None = None, start_from: str | None = None, sweep_tracking: dict | None = None) -> dict:
    """Run ``cfg`` to the end on the connected Ray cluster; returns the summary (also written).

    ``cfg`` must have been through ``neoray.run.setup.prepare_config`` (absolute paths, checked
    files) and the cluster through ``setup.check_cluster``. ``resume_dir``: continue that run (its Ray
    storage and its latest checkpoint that can be read: ``resume``, or ``setup.resume_point``'s choice) instead of
    a new one. ``start_from``: a checkpoint (of another run: a sweep's trial) that a new run, or a resumed one
    without a checkpoint of its own, continues on its schedule. ``track``: experiment trackers
    (``neoray.run.run_tracking.parse_track``), whose runs get every epoch and the summary; ``sweep_tracking``:
    the tracker record of the sweep the run continues, whose entities the runs join.
    """
    run_dir = existing_run_dir(resume_dir) if resume_dir else new_run_dir(cfg, config_path, output)
    if resume_dir:
        resume = resume or resume_point(run_dir, log=lambda line: print(f"neoray train: {line}", flush=True))
        _continue_from(run_dir, resume)
    save_config(cfg, storage.join(run_dir, "config.yaml"))
    if verbose:
        print(f"neoray train: run directory {run_dir}", flush=True)
    tracker = RunTracker.start(track, run_dir, cfg, resume=bool(resume_dir), sweep=sweep_tracking) if track else None
    recorder = RunRecorder(run_dir, verbose, feed=tracker.feed if tracker else None)
    trainer = build_trainer(cfg, run_dir, hooks=hooks, callbacks=[recorder],
                            resume_from=(resume.checkpoint if resume_dir else None) or start_from,
                            unreadable=resume.unreadable if resume_dir else ())
    start = time.perf_counter()
    error = None
    try:
        trainer.fit()
    except BaseException as exc:  # failed or interrupted (Ctrl-C, SIGTERM): the summary is written, then it goes on
        error = exc
    if not storage.is_dir(run_dir):
        raise RunDirError(f"{run_dir}: the run directory was deleted while the run went on; it stopped"
                          f"{_after(error)} and nothing more was written")
    history = read_metrics(run_dir)
    # Ray Train's SIGINT handler (SIGTERM too: neoray.interrupts) aborts the workers and leaves fit() with
    # SystemExit; before the controller runs, Python's raises KeyboardInterrupt.
    interrupted = isinstance(error, (KeyboardInterrupt, SystemExit))
    if interrupted:
        stop_reason = "interrupted"
    elif error is not None:
        text = str(error).strip().splitlines()
        stop_reason = f"failed: {type(error).__name__}: {text[-1] if text else ''}"
    else:
        stop_reason = (history[-1].get("stop_reason") if history else "") or "completed"
    summary = write_summary(run_dir, cfg, history, time.perf_counter() - start, stop_reason,
                            pretrained_classes=_pretrained_classes(cfg))
    if tracker is not None:
        tracker.finish(summary)
    if interrupted:
        raise RunInterrupted(run_dir, summary) from None
    if error is not None:
        raise error
    return summary


def _after(error: BaseException | None) -> str:
    text = str(error).strip().splitlines() if error is not None else []
    return f" ({type(error).__name__}: {text[-1]})" if text else ""


def _continue_from(run_dir: str, resume: ResumePoint) -> None:
    """Make the run directory agree with the checkpoint a resumed run continues from: metrics rows of later
    epochs are dropped (those epochs are trained again, and each epoch is recorded once), the pointers name it
    as the latest (and as the best when the best cannot be read), and a checkpoint folder a killed run was
    copying (``.partial-...``) is removed."""
    for entry in storage.list_dir(storage.join(run_dir, RAY_DIR)):
        if entry.kind == "dir" and entry.name.startswith(PARTIAL_PREFIX):
            storage.remove_dir(entry.path)
    history = read_metrics(run_dir)
    kept = [row for row in history if int(row.get("epoch") or 0) <= resume.epoch]
    if len(kept) != len(history):
        write_metrics(run_dir, kept)
    if resume.checkpoint is None:
        return
    pointers = read_pointers(run_dir)
    entry = {"path": resume.checkpoint[len(run_dir.rstrip("/")) + 1:], "epoch": resume.epoch}
    changed = pointers.get("latest") != entry
    pointers["latest"] = entry
    best = pointers.get("best") or {}
    if storage.basename(best.get("path", "")) in resume.unreadable:
        pointers["best"], changed = dict(entry), True
    if changed:
        write_pointers(run_dir, pointers)


class RunInterrupted(KeyboardInterrupt):
    """A run stopped by Ctrl-C or SIGTERM, its summary written; ``--resume run_dir`` continues it from its last
    checkpoint."""

    def __init__(self, run_dir: str, summary: dict):
        super().__init__(run_dir)
        self.run_dir, self.summary = run_dir, summary


def _pretrained_classes(cfg: Config) -> list[str]:
    """The run's classes that start from pretrained rows of ``init_from`` (what its log said)."""
    if not cfg.model.init_from:
        return []
    return pretrained_class_rows(cfg)


__all__ = ["RunDirError", "RunInterrupted", "RunRecorder", "build_trainer", "train"]
