"""Search on a prefix of the schedule, then continue the best trial to its end.

With ``search.trial_epochs`` every trial trains only the first N epochs of the config's ``train.epochs``
schedule (``train.stop_after_epoch``): the LR it sees is the one a full run sees in those epochs, and its last
checkpoint is a point on that run's way. When every trial has ended, the best one (``results.best_row``) goes on
from that checkpoint to the end of the same schedule as an ordinary run, ``SWEEP_DIR/final`` (config.yaml,
metrics, checkpoints, summary: neoray.run.rundir), on the resources the whole sweep had. Nothing the trial
trained is thrown away, and the final model is one run of the full schedule, not a trial cut short.

This is where a sweep on a small budget gets its quality: on the photo-like task four 12-epoch trials reached
mAP50 0.14 where one run of the same time reached far more (README "Quality against YOLO11n").

With ``--track`` the final run is tracked as a training run is (every epoch, the summary, its files), in the
sweep's MLflow experiment nested under the sweep's run and in its W&B group.

A sweep stopped during the continuation (Ctrl-C, a lost driver) continues it with ``--resume`` from the final
run's own last checkpoint, or from the trial's again when the final run had written none.
"""

from __future__ import annotations

import math

from neoray import storage
from neoray.checkpoints import CheckpointError
from neoray.checkpoints.format import FILE_NAME
from neoray.cluster import DATA_HEADROOM_CPUS, alive_nodes
from neoray.config import Config, ConfigError
from neoray.run.run_tracking import parse_track
from neoray.run.rundir import RunDirError
from neoray.run.setup import resume_point
from neoray.run.trainer import train
from neoray.tune.record import SweepRecord
from neoray.tune.results import load_history
from neoray.tune.space import trial_config

FINAL_DIR = "final"  # SWEEP_DIR/final: the best trial continued to the end of its schedule
TRIALS_DIR = "trials"  # SWEEP_DIR/trials: the TorchTrainer runs of multi-worker trials (neoray.tune.trainable)


class ContinuationError(ConfigError):
    """The best trial cannot be continued (its checkpoint is gone, the final run directory is not one)."""


def final_dir(sweep_dir: str) -> str:
    return storage.join(sweep_dir, FINAL_DIR)


def trial_checkpoint(sweep_dir: str, trial: str) -> str:
    """The checkpoint of the trial's last report, as a path in the sweep's storage. A one-worker trial's
    reports name Tune's checkpoint folder (``checkpoint_dir_name``, in the trial's directory); a multi-worker
    trial's name its TorchTrainer's (``checkpoint_path`` in that filesystem's form, under SWEEP_DIR/trials)."""
    for row in reversed(load_history(sweep_dir, trial)):
        if row.get("checkpoint_path"):
            path, marker = str(row["checkpoint_path"]), f"/{TRIALS_DIR}/{trial}/"
            if marker in path:
                found = storage.join(sweep_dir, path[path.rindex(marker) + 1:])
            else:
                found = path
        elif row.get("checkpoint_dir_name"):
            found = storage.join(sweep_dir, trial, str(row["checkpoint_dir_name"]))
        else:
            continue
        if not storage.is_file(storage.join(found, FILE_NAME)):
            raise ContinuationError(f"{found}: the checkpoint of {trial}'s last epoch is gone; the best trial "
                                    "cannot be continued (train its config: neoray train SWEEP_DIR/best_config.yaml)")
        return found
    raise ContinuationError(f"{storage.join(sweep_dir, trial)}: {trial} reported no checkpoint to continue from")


def final_config(record: SweepRecord, params: dict) -> Config:
    """The best trial's config without the stop (its whole schedule). A trial on CPUs only goes on with the
    cores the sweep's trials shared: as many CPUs as leave Ray Data its own (neoray.cluster's headroom) and
    torch threads on every core of the node, as a ``neoray train`` on the whole machine runs: the same
    computation, faster. A GPU trial keeps its own resources."""
    cfg = trial_config(record.base_config, params, record.lr_scaling).with_overrides(
        {"train.stop_after_epoch": 0, "name": FINAL_DIR})
    if cfg.train.use_gpu:
        return cfg
    nodes = alive_nodes()
    largest = max((float(node.get("CPU", 0)) for node in nodes), default=0.0)
    total = sum(float(node.get("CPU", 0)) for node in nodes)
    workers = cfg.train.workers
    reserved = math.floor(min(largest, (total - DATA_HEADROOM_CPUS) / workers))
    threads = math.floor(min(largest, total / workers))
    updates = {}
    if reserved > cfg.train.cpus_per_worker:
        updates["train.cpus_per_worker"] = reserved
    if threads > max(reserved, cfg.train.cpus_per_worker) and not cfg.train.torch_threads:
        updates["train.torch_threads"] = threads
    return cfg.with_overrides(updates) if updates else cfg


def continue_best(record: SweepRecord, sweep_dir: str, best: dict, log) -> dict:
    """Train the best trial (a ``results`` row) from its last checkpoint to the end of its schedule in
    SWEEP_DIR/final, or continue that run where a stopped sweep left it; returns the run's summary."""
    run_dir = final_dir(sweep_dir)
    cfg = final_config(record, {name: best[name] for name in record.params})
    start = trial_checkpoint(sweep_dir, best["trial"])
    resume = None
    if storage.is_file(storage.join(run_dir, "config.yaml")):
        resume = resume_point(run_dir, log=log)
        log(f"continuing the final run {run_dir} from "
            f"{'epoch ' + str(resume.epoch) if resume.checkpoint else best['trial'] + ' again (it had no checkpoint)'}")
    elif storage.exists(run_dir):
        storage.remove_dir(run_dir)  # claimed by a stopped sweep before it wrote anything
    if resume is None:
        log(f"continuing {best['trial']} from its epoch {record.search.trial_epochs} to epoch {cfg.train.epochs} "
            f"({cfg.train.workers} worker(s), {cfg.train.cpus_per_worker:g} CPUs"
            f"{f' and {cfg.train.torch_threads} torch threads' if cfg.train.torch_threads else ''} each): {run_dir}")
    try:
        return train(cfg, output=sweep_dir, resume_dir=run_dir if resume else None, resume=resume,
                     start_from=start, verbose=True, track=parse_track(record.track) or None,
                     sweep_tracking=record.tracking)
    except (RunDirError, CheckpointError) as exc:
        raise ContinuationError(str(exc)) from None
    except Exception as exc:  # the run failed: its summary is written; one line here, not a traceback
        text = str(exc).strip().splitlines()
        raise ContinuationError(f"the final run {run_dir} failed: {type(exc).__name__}: {text[-1] if text else ''}; "
                                "continue it with --resume") from None


__all__ = ["FINAL_DIR", "ContinuationError", "continue_best", "final_config", "final_dir", "trial_checkpoint"]
