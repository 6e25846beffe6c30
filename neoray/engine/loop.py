"""The per-worker training function: one loop for Ray Train (DDP), Ray Tune and a plain process.

The loop talks to its runner only through a ``TrainContext`` (rank, batches, report, restore; see
context.py), so the same code runs under ``TorchTrainer`` (ray_context.py), inside a Tune trial and in a
plain process; nothing here imports Ray.
It keeps no global mutable state, so several trials can share a process.

Per epoch, every rank calls ``ctx.report`` exactly once (Ray's report is a barrier), with metrics
already aggregated over all ranks (docs/ARCHITECTURE.md names them); rank 0 passes the epoch's checkpoint
(persisted first, see ``_report``), the others None. What "better" means (the ``score``) is
neoray.engine.ranking's.
"""

from __future__ import annotations

import errno
import itertools
import shutil
import tempfile
from typing import Callable, Iterator

import torch
from torch import nn

from neoray.checkpoints import load_checkpoint, save_checkpoint
from neoray.config import Config
from neoray.distributed import broadcast_module, from_rank0, gather
from neoray.engine import guards, ranking
from neoray.engine.context import TrainContext
from neoray.engine.device import default_device, device_name, node_id, peak_memory_mb
from neoray.engine.hooks import TrainHooks
from neoray.engine.optim import optimizer_steps_per_epoch
from neoray.engine.seeding import capture_rng_state, restore_rng_state, seed_everything
from neoray.engine.state import TrainState
from neoray.engine.step import EpochStats, Log, train_one_epoch
from neoray.evaluation.coco_eval import evaluate
from neoray.models import build_model_from_config


def run_training_loop(cfg: Config, ctx: TrainContext, *, hooks: TrainHooks | None = None,
                      resume_from: str | None = None, model_fn: Callable[[int], nn.Module] | None = None,
                      log: Log = print) -> None:
    """Train ``cfg`` on this worker, reporting once per epoch through ``ctx``.

    ``resume_from``: a checkpoint to continue from when ``ctx`` has none (``neoray train --resume``).
    ``model_fn(num_classes)``: build a custom model instead of ``cfg.model`` (tests, benchmarks); its
    train forward is called as ``model(images, targets, num_boxes=...)``, like ``Detector.forward``.
    """
    hooks = hooks or TrainHooks()
    log = log if ctx.world_rank == 0 else None
    state = _build_state(cfg, ctx, model_fn, resume_from, log)
    first_epoch_of_process = True
    while state.epoch < last_epoch(cfg):
        state.set_backbone_frozen(state.epoch < cfg.train.freeze_backbone_until_epoch)
        batches = iter(ctx.data.train(state.epoch))
        if first_epoch_of_process:
            first_epoch_of_process = False
            batches, failure = _preflight(state, batches, len(ctx.data.categories))
            if failure:
                # A score too: Tune checks every result for the sweep's metric, and a missing one would
                # end the whole sweep instead of this trial.
                ctx.report({"epoch": state.epoch, "step": state.step, "evaluated": 0,
                            ranking.SCORE: ranking.WORST, "stop_reason": failure}, None)
                return
        hooks.epoch_start(state.epoch + 1, state.rank)
        if state.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(state.device)
        stats = train_one_epoch(state, batches, hooks, log)
        hooks.epoch_end(state.epoch + 1, state.rank)
        state.epoch += 1
        metrics = {**_epoch_metrics(state, stats, ctx.world_size), **_evaluate(state, ctx)}
        metrics[ranking.SCORE] = ranking.epoch_score(metrics)
        metrics["stop_reason"] = _stop_reason(state, stats, metrics)
        _report(ctx, state, metrics)
        if metrics["stop_reason"]:
            if log:
                log(f"stopping after epoch {state.epoch}: {metrics['stop_reason']}")
            return


def last_epoch(cfg: Config) -> int:
    """The epoch this run stops after: ``train.stop_after_epoch`` when it ends the run before its schedule does."""
    stop = cfg.train.stop_after_epoch
    return min(stop, cfg.train.epochs) if stop > 0 else cfg.train.epochs


def _build_state(cfg: Config, ctx: TrainContext, model_fn, resume_from: str | None, log: Log) -> TrainState:
    """Seed, build the model and the training state, and continue a checkpoint or start from
    pretrained weights; wrap DDP; start the EMA from the weights every rank trains."""
    if cfg.train.torch_threads:
        torch.set_num_threads(cfg.train.torch_threads)
    seed_everything(cfg.train.seed + ctx.world_rank)  # different augmentations per rank, reproducible
    categories = ctx.data.categories
    checkpoint = ctx.latest_checkpoint() or resume_from
    # A checkpoint brings every weight: the backbone's pretrained file is not read again (it may be gone).
    model = (model_fn(len(categories)) if model_fn
             else build_model_from_config(cfg.model, len(categories), with_weights=not checkpoint))
    device = ctx.device or default_device(cfg, ctx.local_rank)
    total_steps = cfg.train.epochs * optimizer_steps_per_epoch(ctx.data.micro_batches_per_epoch(), cfg.train.accumulate)
    state = TrainState.build(cfg, model, device, total_steps, rank=ctx.world_rank)
    if checkpoint:
        payload = load_checkpoint(checkpoint)
        state.load_state_dict(payload)
        rng = payload.get("rng") or {}
        if len(rng.get("per_rank", [])) == ctx.world_size:
            restore_rng_state(rng["per_rank"][ctx.world_rank])
        if log:
            log(f"resumed from {checkpoint}: {state.epoch} epochs and {state.step} steps done")
    elif cfg.model.init_from:
        names = [c["name"] for c in sorted(categories, key=lambda c: c["label"])]
        state.init_from(cfg.model.init_from, names, log)
    # Every rank trains rank 0's weights (DDP would broadcast them when the first epoch wraps the model); the
    # EMA must start from those (a checkpoint's EMA is kept), not from this rank's own random initialisation.
    broadcast_module(state.model)
    if state.ema is not None and not checkpoint:
        state.ema.reset(state.model)
    return state


def _preflight(state: TrainState, batches: Iterator, num_classes: int) -> tuple[Iterator, str | None]:
    """The first batch through forward and backward on every rank before the first step; returns the
    batches (the first one put back) and the failure message (the same on all ranks) or None.
    BatchNorm statistics and the RNG streams (the trial forward draws e.g. denoising noise) are put
    back afterwards, so a resumed run continues its checkpoint's RNG stream and a fresh run draws the
    same numbers as without the preflight."""
    first = next(batches, None)
    message = None
    if first is not None:
        buffers = {name: b.detach().clone() for name, b in state.model.named_buffers()}
        rng = capture_rng_state()
        try:
            guards.preflight(state.model, first, num_classes, state.device, state.amp_dtype)
        except guards.PreflightError as exc:
            message = str(exc)
        finally:
            restore_rng_state(rng)
        with torch.no_grad():
            for name, b in state.model.named_buffers():
                b.copy_(buffers[name])
    messages = [m for m in gather(message) if m]
    return itertools.chain([first] if first is not None else [], batches), messages[0] if messages else None


def _epoch_metrics(state: TrainState, stats: EpochStats, world_size: int) -> dict:
    """Epoch metrics over all ranks: losses averaged, images/s summed, step time averaged, memory max;
    the guards' counters (equal on every rank: each skip was decided by all ranks together)."""
    local = {"loss_sums": stats.loss_sums, "loss_count": stats.loss_count, "images": stats.images,
             "seconds": stats.seconds, "updates": stats.counters.updates, "peak_mb": peak_memory_mb(state.device),
             "node": node_id()}
    every = gather(local)
    count = sum(r["loss_count"] for r in every)
    names = sorted({n for r in every for n in r["loss_sums"]})
    losses = {f"loss_{n}": sum(r["loss_sums"].get(n, 0.0) for r in every) / max(1, count) for n in names}
    seconds = [r["seconds"] for r in every]
    updates = max(1, max(r["updates"] for r in every))
    counters = stats.counters
    return {
        "epoch": state.epoch, "step": state.step, "lr": _main_lr(state.optimizer),
        "loss": sum(losses.values()) if count else float("nan"), **losses,
        "images_per_s": sum(r["images"] / r["seconds"] for r in every if r["seconds"] > 0),
        "step_time_s": sum(seconds) / len(seconds) / updates,
        "peak_mem_mb": max(r["peak_mb"] for r in every),
        "skipped_steps": counters.skipped, "oom_skipped": counters.oom, "amp_overflow_steps": counters.amp_overflow,
        "workers": world_size, "device": device_name(state.device),
        "nodes": ",".join(r["node"] for r in every),  # the Ray node of each rank, in rank order
    }


def _evaluate(state: TrainState, ctx: TrainContext) -> dict:
    """COCO metrics of the EMA (or raw) weights on evaluation epochs (every ``train.eval_every`` and the
    last), ``{"evaluated": 0}`` on the others; collective over the ranks."""
    cfg = state.cfg.train
    batches = ctx.data.val()
    if batches is None or not (state.epoch % cfg.eval_every == 0 or state.epoch == last_epoch(state.cfg)):
        return {"evaluated": 0}
    metrics = evaluate(state.eval_module(), batches, ctx.data.categories, state.device,
                       score_threshold=cfg.eval_score_threshold, amp_dtype=state.amp_dtype)
    return {**metrics, "evaluated": 1}


def _stop_reason(state: TrainState, stats: EpochStats, metrics: dict) -> str:
    """Why the run stops after this epoch ("" to go on), the same on every rank: the guards, or early
    stopping on evaluation epochs."""
    cfg = state.cfg.train
    reason = guards.epoch_stop_reason(stats.counters, cfg.max_skipped_fraction, cfg.max_oom_per_epoch,
                                      cfg.batch_size, cfg.accumulate) or ""
    if metrics.get("evaluated"):
        reason = reason or state.early.update(float(metrics["map"]), state.epoch)
    return from_rank0(reason)  # rank 0's words for a decision every rank took


def _report(ctx: TrainContext, state: TrainState, metrics: dict) -> None:
    """Report the epoch with its checkpoint: rank 0 writes it to a local temporary directory and has the
    runner make it durable (``ctx.persist``) before anyone reports. A checkpoint that cannot be written (a full
    disk, the output folder deleted) stops the run on every rank, with the reason, instead of failing one
    worker (whose restart would meet the same disk); nothing partial is left, and ``--resume`` continues from
    the last checkpoint that was written."""
    rng_states = gather(capture_rng_state())
    tmp_dir, checkpoint, failure = None, None, None
    if state.rank == 0:
        tmp_dir = tempfile.mkdtemp(prefix="neoray-ckpt-")
        categories = ctx.data.categories
        try:
            save_checkpoint(tmp_dir, {
                **state.state_dict(), "rng": {"per_rank": rng_states}, "config": state.cfg.to_dict(),
                "model_name": state.cfg.model.name, "num_classes": len(categories), "categories": categories,
                "metrics": metrics,
            })
            checkpoint = ctx.persist(tmp_dir)
        except OSError as exc:
            failure = checkpoint_failure(exc, state.epoch)
    failure = from_rank0(failure)
    if failure:
        metrics["stop_reason"] = failure
        checkpoint = None
    try:
        ctx.report(metrics, checkpoint)
    finally:
        if tmp_dir:
            shutil.rmtree(tmp_dir, ignore_errors=True)


def checkpoint_failure(exc: OSError, epoch: int) -> str:
    """The stop reason for a checkpoint that could not be written, in one line."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT) or "No space left" in text or "quota" in text.lower():
        return (f"disk full: the checkpoint of epoch {epoch} could not be written ({text}); free space, then "
                "continue with --resume from the last checkpoint")
    return f"the checkpoint of epoch {epoch} could not be written: {text}"


def _main_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of the head groups (the backbone's is scaled by backbone_lr_mult)."""
    for group in optimizer.param_groups:
        if not str(group.get("name", "")).startswith("backbone"):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


__all__ = ["Log", "last_epoch", "run_training_loop"]
