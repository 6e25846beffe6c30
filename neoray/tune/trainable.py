"""The per-trial function that Ray Tune runs, on one of two paths.

* one worker: the engine's training loop runs right here, inside the Tune trial, through
  ``TuneTrialContext`` (``tune.report`` with a ``tune.Checkpoint``, ``tune.get_checkpoint`` to restore).
  A TorchTrainer costs ~28 s of start-up per trial on a small machine; this path costs none of it.
* several workers: the trial builds and fits its own TorchTrainer (the Train V2 pattern) whose reports
  reach Tune through ``ScoreReportCallback`` (Ray's ``TuneReportCallback`` plus the ``score`` key).
  Its run is named after the trial and stored under ``SWEEP_DIR/trials``, so that a retried trial's
  trainer finds and restores its own checkpoints.

The trial's config holds only its sampled parameters (see space.PARAMS: lr, warmup_steps, batch "4x2",
...), so that Tune's tables and params.json show what differs between trials. What every trial shares
comes through ``tune.with_parameters`` as ``setup``::

    {"base": Config.to_dict(), "sweep_dir": str,
     "fail": [{"trial": "trial_0002", "times": 1}],  # test-only fault injection (optional)
     "loop": "module:function"}                      # test-only training function (optional)

ASHA and OptunaSearch read one key, ``score`` (``SCORE_DOC``; higher is better in every case). The engine
computes no validation loss today, so on epochs without evaluation the score is minus the training loss.
"""

from __future__ import annotations

import copy
import math
import os
import time
from pathlib import Path

from ray.train.v2._internal.execution.callback import WorkerGroupCallback
from ray.tune.integration.ray_train import TuneReportCallback

from neoray.config import Config, apply_overrides, from_dict
from neoray.tune.space import params_to_overrides

SCORE = "score"
# What ``with_score`` computes, in words: printed at the start of a sweep and stored in sweep.json.
SCORE_DOC = "score = map on evaluation epochs, else -val_loss if present, else -training loss"
PG_RECORD = "train_placement_groups.txt"  # ids of a trial's Train worker placement groups


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def with_score(metrics: dict) -> dict:
    """A copy of an epoch's metrics with ``score`` (and ``score_from``, saying which metric it came from)."""
    out = dict(metrics)
    # The engine repeats the last mAP on epochs without evaluation (flag ``evaluated``=0); that stale
    # value must not drive ASHA, so such epochs fall through to the losses.
    keys = (("map", 1.0), ("val_loss", -1.0), ("loss", -1.0))
    if not out.get("evaluated", 1):
        keys = keys[1:]
    for key, sign in keys:
        if _finite(out.get(key)):
            out[SCORE], out["score_from"] = sign * float(out[key]), key
            return out
    # A non-finite loss is the worst possible result, not a crash of the scheduler.
    out[SCORE], out["score_from"] = -1e9, "none"
    return out


def trial_config_to_cfg(base: dict, params: dict) -> Config:
    """The validated training config of one trial: the sweep's base config with its sampled parameters."""
    raw = apply_overrides(copy.deepcopy(base), params_to_overrides(params))
    return from_dict(raw)


def _inject_failure(specs: list | None, trial_name: str, trial_dir: str) -> None:
    """Test-only hook: ``[{"trial": "trial_0002", "times": 1}, ...]`` fails that trial's first ``times``
    attempts (-1: always). The attempt count lives in the trial directory, which survives Tune's retries."""
    for spec in specs or []:
        if spec.get("trial") != trial_name:
            continue
        counter = Path(trial_dir) / "_injected_failures"
        done = int(counter.read_text()) if counter.exists() else 0
        times = int(spec.get("times", 1))
        if times < 0 or done < times:
            counter.write_text(str(done + 1))
            raise RuntimeError(f"injected failure {done + 1} of {trial_name} (test hook fail)")


class TuneTrialContext:
    """The engine's context protocol for a single worker running inside a Tune trial."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, cfg: Config):
        self._cfg = cfg
        self._datasets = None

    def dataset(self, name: str):
        if self._datasets is None:  # built on first use, inside the trial (Ray Data plans lazily anyway)
            self._datasets = _datasets(self._cfg)
        ds = self._datasets.get(name)
        # A DataIterator, as ray.train.get_dataset_shard gives each worker; it can be iterated every epoch.
        return ds.iterator() if ds is not None else None

    def report(self, metrics: dict, checkpoint_dir: str | None = None) -> None:
        from ray import tune

        metrics = with_score(metrics)
        if checkpoint_dir:
            # Tune copies the directory into the trial's storage before returning.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(checkpoint_dir))
        else:
            tune.report(metrics)

    def latest_checkpoint_dir(self) -> str | None:
        from ray import tune

        checkpoint = tune.get_checkpoint()
        if checkpoint is None:
            return None
        if os.path.isdir(checkpoint.path):  # local storage: read it in place
            return checkpoint.path
        return checkpoint.to_directory()


def _categories(cfg: Config):
    from neoray.data.shards import read_manifest

    return read_manifest(cfg.data.train).get("categories")


def _datasets(cfg: Config) -> dict:
    from neoray.data.stream import eval_dataset, quiet_ray_data, train_dataset

    # Per-epoch progress bars of every trial would bury Tune's trial table in the job log.
    quiet_ray_data()

    datasets = {"train": train_dataset(cfg.data.train, seed=cfg.train.seed, max_images=cfg.data.max_train_images)}
    if cfg.data.val:
        datasets["val"] = eval_dataset(cfg.data.val)
    return datasets


def _load_loop(spec: str | None):
    """The training function: the engine's, or (test-only ``_loop`` key, "module:function") another one
    that follows the same context protocol."""
    if not spec:
        from neoray.engine.loop import run_training_loop

        return run_training_loop
    import importlib

    module, _, function = spec.partition(":")
    return getattr(importlib.import_module(module), function)


def _run_direct(cfg: Config, loop_spec: str | None) -> None:
    _load_loop(loop_spec)(cfg, TuneTrialContext(cfg), categories=_categories(cfg))


class ScoreReportCallback(TuneReportCallback):
    """Ray's TuneReportCallback, adding ``score`` so that ASHA sees the same key on both paths."""

    def after_report(self, run_context, metrics, checkpoint):
        super().after_report(run_context, [with_score(metrics[0])] + list(metrics[1:]), checkpoint)


class RecordPlacementGroupCallback(WorkerGroupCallback):
    """Writes the id of the trial's Train worker placement group to a file, for ``_release_worker_pg``.

    Measured with Ray 2.60 inside Tune: after a trial's TorchTrainer finished, its worker placement group
    stayed CREATED, so the next trial's workers could never be placed and the sweep hung ("worker group
    startup timed out", retried forever). The trial removes the group itself once fit() returns.
    Ray passes non-UserCallback run_config callbacks to its controller for such workarounds.
    """

    def __init__(self, record_path: str):
        self.record_path = record_path

    def after_worker_group_start(self, worker_group):
        pg = worker_group.get_worker_group_state().placement_group_handle.placement_group
        with open(self.record_path, "a") as handle:  # one line per worker-group (re)start
            handle.write(pg.id.hex() + "\n")


def release_worker_pgs(record_path: Path) -> int:
    """Remove the placement groups listed in ``record_path`` that are still alive; returns how many."""
    import ray
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    if not record_path.exists():
        return 0
    removed = 0
    for line in set(record_path.read_text().split()):
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(line)))
        if ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            removed += 1
    return removed


def _run_torch_trainer(cfg: Config, trial_name: str, sweep_dir: str, trial_dir: str) -> None:
    from neoray.engine.trainer import build_trainer

    record = Path(trial_dir) / PG_RECORD
    trainer = build_trainer(
        cfg, Path(sweep_dir) / "trials", categories=_categories(cfg),
        callbacks=[ScoreReportCallback(), RecordPlacementGroupCallback(str(record))],
        name=trial_name,  # deterministic: a retried trial's trainer restores this run's checkpoints
    )
    try:
        trainer.fit()
    finally:
        removed = release_worker_pgs(record)
        if removed:
            print(f"[neoray] {trial_name}: released {removed} leftover Train placement group(s)", flush=True)


def sweep_trainable(params: dict, setup: dict) -> None:
    """Ray Tune function trainable: one trial of a sweep (see the module docstring)."""
    from ray import tune

    context = tune.get_context()
    trial_name = context.get_trial_name()
    cfg = trial_config_to_cfg(setup["base"], params)
    _inject_failure(setup.get("fail"), trial_name, context.get_trial_dir())
    started = time.perf_counter()
    if cfg.train.workers == 1:
        _run_direct(cfg, setup.get("loop"))
    else:
        _run_torch_trainer(cfg, trial_name, setup["sweep_dir"], context.get_trial_dir())
    print(f"[neoray] {trial_name}: training took {time.perf_counter() - started:.1f} s", flush=True)
