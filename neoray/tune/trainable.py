"""The per-trial function that Ray Tune runs, on one of two paths.

* one worker: the engine's training loop runs right here, inside the Tune trial, through
  ``TuneTrialContext`` (``tune.report`` with a ``tune.Checkpoint``, ``tune.get_checkpoint`` to restore).
  A TorchTrainer costs ~25 s of start-up per trial on a small machine; this path costs none of it.
* several workers: the trial builds and fits its own TorchTrainer (the Train V2 pattern) whose reports
  reach Tune through Ray's ``TuneReportCallback``. Its run is named after the trial and stored under
  ``SWEEP_DIR/trials`` (local, a shared mount or object storage), so that a retried trial's trainer
  finds and restores its own checkpoints; Tune retries a failed trial (``--max-failures``), the
  trial's TorchTrainer does not restart its workers itself.

The trial's config holds only its sampled parameters (see space.PARAMS: lr, warmup_steps, batch "4x2",
...), so that Tune's tables and params.json show what differs between trials. What every trial shares
comes through ``tune.with_parameters`` as ``setup``: ``{"base": Config.to_dict(), "sweep_dir": str,
"lr_scaling": {"rule", "reference_batch"}, "hooks": TrainHooks | None}`` (hooks: tests only; they are not
part of the sweep's record).

Every epoch's metrics carry ``score`` (neoray.engine.ranking), the key ASHA and OptunaSearch read.
"""

from __future__ import annotations

import logging
import time

from ray import tune
from ray.tune.integration.ray_train import TuneReportCallback

from neoray import ray_compat, storage
from neoray.config import Config, from_dict
from neoray.engine.loop import run_training_loop
from neoray.engine.ray_context import checkpoint_location
from neoray.engine.shard_batches import ShardBatches
from neoray.run.trainer import build_trainer
from neoray.tune.placement_groups import RecordPlacementGroupCallback, release_worker_pgs, trial_record_path
from neoray.tune.space import trial_config


class TuneTrialContext:
    """The engine's ``TrainContext`` for a single worker running inside a Tune trial."""

    world_rank = 0
    world_size = 1
    local_rank = 0
    device = None

    def __init__(self, cfg: Config):
        # One INFO line per checkpoint from Ray would bury Tune's trial table in the sweep's log.
        logging.getLogger("ray.train").setLevel(logging.WARNING)
        self.data = ShardBatches(cfg)

    def persist(self, checkpoint_dir: str) -> str:
        return checkpoint_dir  # Tune copies (or uploads) it in report

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        # Tune copies (or uploads) the directory into the trial's storage before returning.
        checkpoint = tune.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        tune.report(metrics, checkpoint=checkpoint)

    def latest_checkpoint(self) -> str | None:
        return checkpoint_location(tune.get_checkpoint())


def _run_direct(cfg: Config, hooks) -> None:
    run_training_loop(cfg, TuneTrialContext(cfg), hooks=hooks)


def _run_torch_trainer(cfg: Config, trial_name: str, sweep_dir: str, hooks) -> None:
    record = trial_record_path(sweep_dir, trial_name)
    trainer = build_trainer(
        cfg, storage.join(sweep_dir, "trials"), hooks=hooks,
        callbacks=[TuneReportCallback(), RecordPlacementGroupCallback(record)],
        name=trial_name,  # deterministic: a retried trial's trainer restores this run's checkpoints
        # A trial's failures are Tune's to retry (--max-failures, from the trial's last checkpoint). A
        # TorchTrainer that restarted its own workers outlived its trial: when Tune ended the trial and
        # its placement group was released, the trainer's controller saw its workers gone, started a
        # new worker group and held its CPUs, and the next trial waited forever (measured, Ray 2.60).
        max_failures=0,
    )
    try:
        trainer.fit()
    finally:
        removed = release_worker_pgs(record)
        if removed:
            print(f"[neoray] {trial_name}: released {removed} leftover Train placement group(s)", flush=True)


def sweep_trainable(params: dict, setup: dict) -> None:
    """Ray Tune function trainable: one trial of a sweep (see the module docstring)."""
    ray_compat.quiet_sigterm_exit()
    trial_name = tune.get_context().get_trial_name()
    cfg = trial_config(from_dict(setup["base"]), params, setup.get("lr_scaling"))
    started = time.perf_counter()
    if cfg.train.workers == 1:
        _run_direct(cfg, setup.get("hooks"))
    else:
        _run_torch_trainer(cfg, trial_name, setup["sweep_dir"], setup.get("hooks"))
    print(f"[neoray] {trial_name}: training took {time.perf_counter() - started:.1f} s", flush=True)


__all__ = ["TuneTrialContext", "sweep_trainable"]
