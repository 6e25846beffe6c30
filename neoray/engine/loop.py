"""The per-worker training function: one loop for Ray Train (DDP), Ray Tune and a plain process.

The loop talks to its runner only through a small ``TrainContext`` (rank, data, report, restore), so the
same code runs under ``TorchTrainer`` (``RayTrainContext``), inside a Tune function trainable for
single-worker trials (the sweep's own context) and in a plain process (``LocalContext``: tests,
benchmarks). It keeps no global mutable state, so several trials can share a process.

Per epoch, every rank calls ``ctx.report`` exactly once (Ray's report is a barrier), with metrics
already aggregated over all ranks (docs/ARCHITECTURE.md names them); rank 0 passes a checkpoint
directory, the others None.

Gradient accumulation under DDP: the loss is divided by ``train.accumulate`` and the micro-steps that
do not step the optimizer run under ``model.no_sync()``, so gradients are all-reduced once per update.
The ranks agree (a MAX all-reduce of small flags) on whether each rank still has a batch, so they stop
an epoch together even if their shards differ in length; every rank therefore sees the same group
lengths. A partial accumulation group at the end of an epoch is all-reduced and STEPS on every rank;
its gradient is rescaled by accumulate / (micro-batches in it), so it is the mean over its micro-batches
like a full group's.

Out of memory: in the forward, the whole accumulation group is dropped on every rank (the flags after
the forward say so). In a backward that does not all-reduce (one worker, or a ``no_sync`` micro-step)
the rank drops its gradients and the next flag all-reduce tells the others, which drop the group too.
In a backward that all-reduces under DDP, or in the optimizer step under DDP, skipping could leave the
replicas different (bucket all-reduces half done, some parameters updated), so the worker fails with
advice instead; with one worker an OOM in the optimizer step skips that update.

Frozen backbone under DDP: ``requires_grad`` is set before DDP wraps the model, so frozen parameters are
not registered with DDP at all (``find_unused_parameters`` stays False); at the unfreeze epoch the model
is re-wrapped. The optimizer knows the backbone parameters from the start (it skips params without grad).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import resource
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
import torch.distributed as dist
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from neoray.config import Config, from_dict
from neoray.engine import guards
from neoray.engine.checkpoint import (
    capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint, seed_everything,
)
from neoray.engine.ema import ModelEMA
from neoray.engine.optim import (
    build_optimizer, build_scheduler, optimizer_steps_per_epoch, steps_per_epoch,
)


# ----------------------------------------------------------------------------------------------------
# The context protocol and its implementations
# ----------------------------------------------------------------------------------------------------


class TrainContext(Protocol):
    """What the loop needs from whoever runs it.

    ``dataset(name)`` ("train" or "val") returns a Ray ``DataIterator`` (a worker's shard), a Ray
    ``Dataset`` (single process), a ``list`` of ready ``Batch``es used as-is every epoch (tests,
    benchmarks) or None. ``report`` is called once per epoch on every rank; ``checkpoint_dir`` is a
    directory the runner must copy or move before returning (the loop deletes it afterwards).
    ``latest_checkpoint_dir`` is the checkpoint to continue from after a restart, or None.
    Optional attributes: ``device`` (torch.device; default cuda:local_rank when train.use_gpu and CUDA
    is available, else cpu) and ``should_stop() -> bool`` (checked once per epoch, on every rank).
    """

    world_rank: int
    world_size: int
    local_rank: int

    def dataset(self, name: str) -> Any: ...

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint_dir(self) -> str | None: ...


class RayTrainContext:
    """``TrainContext`` on a Ray Train worker (ray.train.*)."""

    def __init__(self):
        import ray.train
        import ray.train.torch

        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.device = ray.train.torch.get_device()
        self._train = ray.train

    def dataset(self, name: str):
        try:
            return self._train.get_dataset_shard(name)
        except KeyError:
            return None

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = self._train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        self._train.report(metrics, checkpoint=checkpoint)
        # ray.train.report only queues this worker's result; the controller registers the epoch's
        # checkpoint once every rank's result is queued. Without this barrier a rank that reports
        # quickly (no checkpoint to write) could fail in the next epoch before rank 0 has queued its
        # checkpoint, and the restart would redo a finished epoch.
        if self.world_size > 1 and torch.distributed.is_initialized():
            torch.distributed.barrier()

    def latest_checkpoint_dir(self) -> str | None:
        checkpoint = self._train.get_checkpoint()
        if checkpoint is None:
            return None
        import pyarrow.fs

        if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
            return checkpoint.path  # local or shared storage: read it in place
        return checkpoint.to_directory()  # cloud storage: download once


class LocalContext:
    """``TrainContext`` for a plain single process: keeps the reports in memory and copies each
    checkpoint to ``checkpoint_root/epoch_NNNN`` (when given)."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, datasets: dict[str, Any], checkpoint_root: str | os.PathLike | None = None,
                 resume_dir: str | None = None, device: torch.device | None = None):
        self._datasets = datasets
        self._checkpoint_root = Path(checkpoint_root) if checkpoint_root else None
        self._latest = resume_dir
        self.reports: list[dict] = []
        if device is not None:
            self.device = device

    def dataset(self, name: str):
        return self._datasets.get(name)

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self._checkpoint_root is not None:
            target = self._checkpoint_root / f"epoch_{int(metrics['epoch']):04d}"
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self._latest = str(target)

    def latest_checkpoint_dir(self) -> str | None:
        return self._latest


# ----------------------------------------------------------------------------------------------------
# Fault injection (tests only)
# ----------------------------------------------------------------------------------------------------


@dataclass
class FaultInjection:
    """Faults the tests inject into a run. Micro-step indices count this process's micro-batches
    from 0; epochs are 1-based. Picklable, so it travels in TorchTrainer's ``train_loop_config``."""

    nan_loss_at: tuple = ()  # micro-steps whose loss is replaced by NaN
    oom_at: tuple = ()  # micro-steps whose forward raises torch.OutOfMemoryError
    oom_backward_at: tuple = ()  # micro-steps whose backward raises it (after accumulating gradients)
    oom_step_at: tuple = ()  # micro-steps whose update (they must end a group) raises it in optimizer.step
    oom_rank: int = -1  # the rank the three OOM faults apply to (-1: every rank)
    raise_in_epoch: int = 0  # the worker of rank ``raise_rank`` raises in this epoch ...
    raise_rank: int = 0
    raise_marker: str = ""  # ... once: the file is created before raising and checked first
    record_dir: str = ""  # every rank appends {"epoch", "rank", "image_ids"} to rank<r>.jsonl

    def oom(self, at: tuple, micro_step: int, rank: int) -> bool:
        return micro_step in at and self.oom_rank in (-1, rank)

    def maybe_raise(self, epoch: int, rank: int) -> None:
        if self.raise_in_epoch != epoch or self.raise_rank != rank:
            return
        if self.raise_marker:
            if os.path.exists(self.raise_marker):
                return
            Path(self.raise_marker).write_text("raised\n")
        raise RuntimeError(f"injected worker failure in epoch {epoch} on rank {rank}")

    def record(self, epoch: int, rank: int, image_ids: list[int]) -> None:
        if self.record_dir:
            with open(Path(self.record_dir) / f"rank{rank}.jsonl", "a") as f:
                f.write(json.dumps({"epoch": epoch, "rank": rank, "image_ids": image_ids}) + "\n")


# ----------------------------------------------------------------------------------------------------
# Small helpers
# ----------------------------------------------------------------------------------------------------


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler). auto: bf16 on CUDA GPUs that support it, fp16 with
    a GradScaler on other CUDA GPUs, off on CPU. On CPU only an explicit bf16 is honoured."""
    if mode == "off":
        return None, False
    if device.type != "cuda":
        return (torch.bfloat16, False) if mode == "bf16" else (None, False)
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def default_device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.train.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated this epoch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024  # macOS reports bytes


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _gather(obj: Any, world_size: int) -> list:
    """Every rank's ``obj`` on every rank (a list of one item when not distributed)."""
    if not guards.distributed(world_size):
        return [obj]
    out: list = [None] * world_size
    dist.all_gather_object(out, obj)
    return out


def _any_flags(flags: list[bool], world_size: int, device: torch.device) -> list[bool]:
    """Element-wise OR of boolean flags over all ranks (one small all-reduce)."""
    if not guards.distributed(world_size):
        return flags
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in value.tolist()]


# ----------------------------------------------------------------------------------------------------
# Training state and one epoch
# ----------------------------------------------------------------------------------------------------


@dataclass
class TrainState:
    """Everything one worker trains with. ``model`` is the plain module; ``wrapped`` is what the
    forward goes through (DDP on several ranks, the module itself otherwise)."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    world_size: int = 1
    rank: int = 0
    ema: ModelEMA | None = None
    amp_dtype: torch.dtype | None = None
    wrapped: nn.Module | None = None
    step: int = 0  # optimizer steps done
    micro_step: int = 0  # micro-batches seen by this process (fault injection counts these)
    frozen: bool = False
    backbone_trainable: list = field(default_factory=list)

    def forward_module(self) -> nn.Module:
        return self.wrapped if self.wrapped is not None else self.model


def set_backbone_frozen(state: TrainState, frozen: bool) -> None:
    """Freeze/unfreeze the backbone parameters that were trainable when the model was built, and
    (re)wrap DDP so that it registers exactly the trainable parameters."""
    if frozen != state.frozen:
        for param in state.backbone_trainable:
            param.requires_grad_(not frozen)
        state.frozen = frozen
        state.wrapped = None  # the old DDP knows the wrong parameter set
    if guards.distributed(state.world_size) and state.wrapped is None:
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        state.wrapped = DistributedDataParallel(state.model, device_ids=device_ids,
                                                find_unused_parameters=False)


@dataclass
class EpochStats:
    loss_sums: dict = field(default_factory=dict)  # name -> sum over finite micro-batches
    loss_count: int = 0
    images: int = 0
    seconds: float = 0.0
    updates_made: int = 0
    counters: guards.EpochCounters = field(default_factory=guards.EpochCounters)
    image_ids: list = field(default_factory=list)


def _trainable_params(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _drop_group(state: TrainState, stats: EpochStats, where: str, log: Callable[[str], None] | None) -> None:
    """Out of memory: forget the accumulation group's gradients, free memory, count the skip (called on
    every rank together; the caller has dropped its references to the step's tensors)."""
    state.optimizer.zero_grad(set_to_none=True)
    guards.free_memory()
    stats.counters.oom += 1
    if log:
        log(f"out of memory in the {where}: skipped the batch ({stats.counters.oom} this epoch)")


def _finish_update(state: TrainState, stats: EpochStats, group_bad: bool, group_len: int,
                   step_oom: bool = False, log: Callable[[str], None] | None = None) -> None:
    """End of an accumulation group of ``group_len`` micro-batches (the same on every rank): clip,
    check, step (or skip) — the same decision on every rank. ``step_oom``: fault injection."""
    cfg = state.cfg.train
    stats.counters.updates += 1
    norm_ok = True
    if not group_bad:
        params = _trainable_params(state.model)
        if group_len < cfg.accumulate:
            # The epoch's last, partial group: each loss was divided by `accumulate`, so make the
            # gradient the mean over the micro-batches the group holds (before clipping sees it).
            for param in params:
                if param.grad is not None:
                    param.grad.mul_(cfg.accumulate / group_len)
        if state.scaler.is_enabled():
            state.scaler.unscale_(state.optimizer)
        max_norm = cfg.clip_grad_norm if cfg.clip_grad_norm > 0 else float("inf")
        # Gradients are already all-reduced, so the norm is the global one (and equal on all ranks).
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        norm_ok = guards.finite(norm)
    any_group_bad, any_norm_bad = _any_flags([group_bad, not norm_ok], state.world_size, state.device)
    if any_group_bad or any_norm_bad:
        if any_norm_bad and not any_group_bad and state.scaler.is_enabled():
            # An inf/NaN gradient after unscaling is how the fp16 GradScaler finds its scale: normal
            # while the scale settles, so it is counted apart and does not count toward stopping.
            stats.counters.amp_overflow += 1
        else:
            stats.counters.skipped += 1
        if state.scaler.is_enabled() and not group_bad:
            state.scaler.update()  # lowers the fp16 loss scale after an overflow
    else:
        stepped = False
        try:
            if step_oom:
                raise torch.OutOfMemoryError("injected out of memory in the optimizer step")
            if state.scaler.is_enabled():
                state.scaler.step(state.optimizer)
                state.scaler.update()
            else:
                state.optimizer.step()
            stepped = True
        except torch.OutOfMemoryError as exc:
            if guards.distributed(state.world_size):
                # The other ranks may have stepped, and this one may have updated some parameter
                # groups already: skipping would leave the replicas different.
                raise RuntimeError(f"out of memory in the optimizer step under DDP (it cannot be skipped "
                                   f"without the workers' weights diverging); "
                                   f"{guards.oom_advice(cfg.batch_size, cfg.accumulate)}") from exc
        if not stepped:  # outside the except block, so that the traceback no longer holds tensors
            # One worker: nothing to keep in sync. (Parameter groups stepped before the OOM keep their
            # update; the optimizer allocates a group's state before updating it, where OOM is likely.)
            if state.scaler.is_enabled():
                state.scaler.update()  # unscale_ ran: reset the scaler's per-step state
            _drop_group(state, stats, "optimizer step", log)
            return
        state.scheduler.step()
        state.step += 1
        stats.updates_made += 1
        if state.ema is not None:
            state.ema.update(state.model)
    state.optimizer.zero_grad(set_to_none=True)


def train_one_epoch(state: TrainState, batches: Iterable, fault: FaultInjection | None = None,
                    log: Callable[[str], None] | None = None) -> EpochStats:
    """One pass over ``batches`` with accumulation, clipping, AMP and the guards."""
    cfg = state.cfg.train
    stats = EpochStats()
    module = state.forward_module()
    module.train()
    state.optimizer.zero_grad(set_to_none=True)
    is_ddp = isinstance(module, DistributedDataParallel)
    iterator = iter(batches)
    current = next(iterator, None)
    micro_in_group = 0
    group_bad = False  # a micro-batch of this group had a non-finite loss on some rank
    backward_oom = False  # this rank ran out of memory in the previous micro-step's backward
    start = time.perf_counter()
    while True:
        upcoming = next(iterator, None) if current is not None else None
        # The ranks stop together when one runs out, know whether this is the epoch's last batch, and
        # learn whether a rank's (local) backward ran out of memory in the previous micro-step.
        none_left, last_of_epoch, group_oom = _any_flags(
            [current is None, upcoming is None, backward_oom], state.world_size, state.device)
        if group_oom:
            # Every rank drops the group, as for an OOM in the forward. That backward did not
            # all-reduce, so the group had not stepped yet on any rank.
            _drop_group(state, stats, "backward", log)
            micro_in_group, group_bad, backward_oom = 0, False, False
        if none_left:
            break
        sync = micro_in_group == cfg.accumulate - 1 or last_of_epoch
        batch = current.to(state.device)
        micro, rank = state.micro_step, state.rank
        injected_nan = fault is not None and micro in fault.nan_loss_at
        injected_oom = fault is not None and fault.oom(fault.oom_at, micro, rank)
        injected_backward_oom = fault is not None and fault.oom(fault.oom_backward_at, micro, rank)
        injected_step_oom = fault is not None and fault.oom(fault.oom_step_at, micro, rank)
        state.micro_step += 1
        no_sync = module.no_sync() if (is_ddp and not sync) else contextlib.nullcontext()
        with no_sync:
            oom = False
            loss = losses = None
            try:
                if injected_oom:
                    raise torch.OutOfMemoryError("injected out of memory")
                with torch.autocast(state.device.type, dtype=state.amp_dtype,
                                    enabled=state.amp_dtype is not None):
                    losses = module(batch.images, batch.targets)
                    loss = sum(losses.values())
                if injected_nan:
                    loss = loss * float("nan")
            except torch.OutOfMemoryError:
                oom = True
                loss = losses = None
            local_nonfinite = not oom and not bool(torch.isfinite(loss.detach()))
            any_oom, any_nonfinite = _any_flags([oom, local_nonfinite], state.world_size, state.device)
            if any_oom:
                # Drop the whole accumulation group on every rank: its all-reduce may never happen.
                del loss, losses, batch
                _drop_group(state, stats, "forward", log)
                micro_in_group, group_bad = 0, False
                current = upcoming
                continue
            if any_nonfinite:
                group_bad = True  # no backward: this group's update is skipped on every rank
            else:
                try:
                    state.scaler.scale(loss / cfg.accumulate).backward()
                    if injected_backward_oom:  # after the backward, so that there are gradients to drop
                        raise torch.OutOfMemoryError("injected out of memory in backward")
                except torch.OutOfMemoryError as exc:
                    if is_ddp and sync:
                        # This backward launched DDP's bucket all-reduces, which the other ranks are
                        # now waiting to match: it cannot be skipped consistently. Fail (Ray Train
                        # restarts the workers from the last checkpoint, up to train.max_failures).
                        raise RuntimeError(f"out of memory in the backward pass of a gradient all-reduce "
                                           f"under DDP (it cannot be skipped without desynchronising the "
                                           f"workers); {guards.oom_advice(cfg.batch_size, cfg.accumulate)}"
                                           ) from exc
                    backward_oom = True  # a local backward: the next flag all-reduce tells every rank
                if backward_oom:
                    loss = losses = batch = None  # the group is dropped at the top of the loop
                    current = upcoming
                    continue
                for name, value in losses.items():
                    stats.loss_sums[name] = stats.loss_sums.get(name, 0.0) + float(value.detach())
                stats.loss_count += 1
        stats.images += int(batch.images.shape[0])
        stats.image_ids.extend(int(i) for i in batch.image_ids)
        if sync:
            _finish_update(state, stats, group_bad, micro_in_group + 1, injected_step_oom, log)
            micro_in_group, group_bad = 0, False
            if log and cfg.log_every and state.step % cfg.log_every == 0 and state.rank == 0:
                log(f"step {state.step}: loss {float(loss) if loss is not None else float('nan'):.4f}")
        else:
            micro_in_group += 1
        current = upcoming
    stats.seconds = time.perf_counter() - start
    return stats


# ----------------------------------------------------------------------------------------------------
# The whole run
# ----------------------------------------------------------------------------------------------------


def _build_model(cfg: Config, num_classes: int) -> nn.Module:
    from neoray.models import build_model

    options = dict(cfg.model.options)
    options.setdefault("backbone_weights", cfg.model.backbone_weights)
    options.setdefault("max_detections", cfg.model.max_detections)
    options.setdefault("score_threshold", cfg.model.score_threshold)
    return build_model(cfg.model.name, num_classes, **options)


def _num_train_images(cfg: Config) -> int:
    from neoray.data.shards import read_manifest

    num = int(read_manifest(cfg.data.train)["num_images"])
    return min(num, cfg.data.max_train_images) if cfg.data.max_train_images else num


def _epoch_batches(data: Any, cfg: Config, epoch: int, rank: int) -> Iterable:
    if isinstance(data, list):  # ready batches (tests, benchmarks)
        return data
    from neoray.data.stream import iter_train_batches

    return iter_train_batches(data, cfg.train.batch_size, cfg.data, seed=cfg.train.seed, epoch=epoch,
                              rank=rank)


def _eval_batches(data: Any, cfg: Config) -> Iterable:
    if isinstance(data, list):
        return data
    from neoray.data.stream import iter_eval_batches

    return iter_eval_batches(data, cfg.train.batch_size, size=cfg.data.size)


def _run_preflight(state: TrainState, first_batch, num_classes: int) -> str | None:
    """Preflight on every rank; returns the failure message (the same on all ranks) or None.
    BatchNorm statistics and the RNG streams (the trial forward draws e.g. denoising noise) are put
    back afterwards, so a resumed run continues its checkpoint's RNG stream and a fresh run draws the
    same numbers as without the preflight."""
    message = None
    if first_batch is not None:
        buffers = {name: b.detach().clone() for name, b in state.model.named_buffers()}
        rng = capture_rng_state()
        try:
            guards.preflight(state.model, first_batch, num_classes, state.device, state.amp_dtype)
        except guards.PreflightError as exc:
            message = str(exc)
        finally:
            restore_rng_state(rng)
        with torch.no_grad():
            for name, b in state.model.named_buffers():
                b.copy_(buffers[name])
    messages = [m for m in _gather(message, state.world_size) if m]
    return messages[0] if messages else None


def _aggregate(stats: EpochStats, state: TrainState, peak_mb: float) -> dict:
    """Epoch metrics over all ranks: losses averaged, images/s summed, step time averaged, memory max."""
    local = {
        "loss_sums": stats.loss_sums, "loss_count": stats.loss_count, "images": stats.images,
        "seconds": stats.seconds, "updates": stats.counters.updates, "peak_mb": peak_mb,
    }
    every = _gather(local, state.world_size)
    count = sum(r["loss_count"] for r in every)
    names = sorted({n for r in every for n in r["loss_sums"]})
    losses = {f"loss_{n}": sum(r["loss_sums"].get(n, 0.0) for r in every) / max(1, count) for n in names}
    seconds = [r["seconds"] for r in every]
    updates = max(1, max(r["updates"] for r in every))
    return {
        "loss": sum(losses.values()) if count else float("nan"),
        **losses,
        "images_per_s": sum(r["images"] / r["seconds"] for r in every if r["seconds"] > 0),
        "step_time_s": sum(seconds) / len(seconds) / updates,
        "peak_mem_mb": max(r["peak_mb"] for r in every),
    }


def run_training_loop(cfg: Config, ctx: TrainContext, *, categories: list | None = None,
                      resume_from: str | None = None, fault_injection: FaultInjection | None = None,
                      model_fn: Callable[[int], nn.Module] | None = None,
                      log: Callable[[str], None] | None = print) -> None:
    """Train ``cfg`` on this worker, reporting once per epoch through ``ctx``.

    ``categories``: the train manifest's categories (read from ``cfg.data.train`` when None).
    ``resume_from``: a checkpoint to continue from when ``ctx`` has none (``neoray train --resume``).
    ``model_fn(num_classes)``: build a custom model instead of ``cfg.model.name`` (tests, benchmarks).
    """
    from neoray.data.stream import quiet_ray_data

    quiet_ray_data()  # this worker iterates the datasets: keep its log to epochs, not data progress
    rank, world_size = ctx.world_rank, ctx.world_size
    device = getattr(ctx, "device", None) or default_device(cfg, ctx.local_rank)
    log = log if rank == 0 else None
    seed_everything(cfg.train.seed + rank)  # different augmentations per rank, reproducible
    if categories is None:
        from neoray.data.shards import read_manifest

        categories = read_manifest(cfg.data.train)["categories"]
    num_classes = len(categories)

    model = (model_fn(num_classes) if model_fn else _build_model(cfg, num_classes)).to(device)
    amp_dtype, use_scaler = resolve_amp(cfg.train.amp, device)
    train_data, val_data = ctx.dataset("train"), ctx.dataset("val")
    if train_data is None:
        raise ValueError("no training data: the context returned None for dataset 'train'")
    micro = len(train_data) if isinstance(train_data, list) else steps_per_epoch(
        _num_train_images(cfg), cfg.train.batch_size, world_size)
    total_steps = cfg.train.epochs * optimizer_steps_per_epoch(micro, cfg.train.accumulate)
    optimizer = build_optimizer(model, cfg.train)
    backbone = getattr(model, "backbone", None)
    state = TrainState(
        cfg=cfg, model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.train, total_steps),
        scaler=torch.amp.GradScaler(device.type, enabled=use_scaler), device=device,
        world_size=world_size, rank=rank, amp_dtype=amp_dtype,
        ema=ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_warmup_steps) if cfg.train.ema else None,
        backbone_trainable=[p for p in backbone.parameters() if p.requires_grad] if backbone else [],
    )
    progress = {"best_map": -1.0, "best_epoch": 0, "evals_since_best": 0, "last_map": None}
    start_epoch = 0

    ema_restored = False
    checkpoint_dir = ctx.latest_checkpoint_dir() or resume_from
    if checkpoint_dir:
        payload = load_checkpoint(checkpoint_dir, map_location=device)
        model.load_state_dict(payload["model"])
        if state.ema is not None and payload.get("ema") is not None:
            state.ema.module.load_state_dict(payload["ema"])
            state.ema.updates = int(payload.get("ema_updates", 0))
            ema_restored = True
        optimizer.load_state_dict(payload["optimizer"])
        state.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            state.scaler.load_state_dict(payload["scaler"])
        start_epoch, state.step = int(payload["epoch"]), int(payload["step"])
        progress.update(payload.get("progress") or {})
        rng = payload.get("rng") or {}
        if len(rng.get("per_rank", [])) == world_size:
            restore_rng_state(rng["per_rank"][rank])
        if log:
            log(f"resumed from {checkpoint_dir}: {start_epoch} epochs and {state.step} steps done")
    elif cfg.model.init_from:
        from neoray.models import load_matching_state_dict

        source = load_checkpoint(cfg.model.init_from, map_location=device)
        loaded, skipped = load_matching_state_dict(model, source.get("ema") or source["model"])
        if log:
            log(f"init_from {cfg.model.init_from}: {len(loaded)} tensors loaded, {len(skipped)} not loaded")
            for key, reason in skipped:  # e.g. the class heads of another class count
                if reason.startswith("shape"):
                    reason += " (checkpoint vs model; keeps its initial value)"
                elif reason == "missing":
                    reason = "not in the checkpoint (keeps its initial value)"
                log(f"init_from: not loaded {key}: {reason}")

    # DDP's constructor broadcasts rank 0's parameters and buffers (the ranks were seeded differently),
    # so wrap before the EMA copies the weights: the EMA must start from the weights every rank trains,
    # loaded by init_from where given, not from this rank's random initialisation. A checkpoint's EMA
    # is kept.
    set_backbone_frozen(state, start_epoch < cfg.train.freeze_backbone_until_epoch)
    if state.ema is not None and not ema_restored:
        state.ema.reset(model)

    first_epoch_of_process = True
    for epoch in range(start_epoch, cfg.train.epochs):
        set_backbone_frozen(state, epoch < cfg.train.freeze_backbone_until_epoch)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        batches = iter(_epoch_batches(train_data, cfg, epoch, rank))
        if first_epoch_of_process:
            first_epoch_of_process = False
            first = next(batches, None)
            batches = itertools.chain([first] if first is not None else [], batches)
            failure = _run_preflight(state, first, num_classes)
            if failure:
                ctx.report({"epoch": epoch, "step": state.step, "stop_reason": failure}, None)
                return
        if fault_injection is not None:
            fault_injection.maybe_raise(epoch + 1, rank)
        stats = train_one_epoch(state, batches, fault_injection, log)
        if fault_injection is not None:
            fault_injection.record(epoch + 1, rank, stats.image_ids)

        metrics = {"epoch": epoch + 1, "step": state.step,
                   "lr": _main_lr(state.optimizer),
                   **_aggregate(stats, state, peak_memory_mb(device))}
        counters = stats.counters  # equal on every rank: each skip was decided by all ranks together
        metrics.update(skipped_steps=counters.skipped, oom_skipped=counters.oom,
                       amp_overflow_steps=counters.amp_overflow, workers=world_size,
                       device=device_name(device))
        stop_reason = guards.epoch_stop_reason(counters, cfg.train.max_skipped_fraction,
                                               cfg.train.max_oom_per_epoch, cfg.train.batch_size,
                                               cfg.train.accumulate) or ""

        last = epoch + 1 == cfg.train.epochs
        evaluated = val_data is not None and ((epoch + 1) % cfg.train.eval_every == 0 or last)
        if evaluated:
            from neoray.engine.coco_eval import evaluate

            eval_model = state.ema.module if state.ema is not None else model
            eval_metrics = evaluate(eval_model, _eval_batches(val_data, cfg), categories, device,
                                    score_threshold=cfg.train.eval_score_threshold, amp_dtype=amp_dtype)
            metrics.update(eval_metrics)
            current = float(eval_metrics["map"])
            progress["last_map"] = current
            if current > progress["best_map"]:
                progress.update(best_map=current, best_epoch=epoch + 1, evals_since_best=0)
            else:
                progress["evals_since_best"] += 1
                patience = cfg.train.early_stop_patience
                if patience and progress["evals_since_best"] >= patience and not stop_reason:
                    stop_reason = (f"early stop: mAP did not improve in {patience} evaluations "
                                   f"(best {progress['best_map']:.4f} at epoch {progress['best_epoch']})")
        if val_data is not None:
            # Tune needs `map` in every report: on epochs without evaluation it repeats the last value
            # (0 before the first). `ckpt_score` ranks checkpoints: only evaluated epochs compete.
            metrics.setdefault("map", progress["last_map"] if progress["last_map"] is not None else 0.0)
            metrics["ckpt_score"] = float(metrics["map"]) if evaluated else -1.0
        else:
            # No validation set: rank checkpoints by the training loss (a NaN loss ranks last in Ray).
            # Without the key Ray logs an error on every report and ranks checkpoints arbitrarily.
            metrics["ckpt_score"] = -float(metrics["loss"])
        metrics["evaluated"] = int(evaluated)
        should_stop = getattr(ctx, "should_stop", None)
        if not stop_reason and _any_flags([bool(should_stop and should_stop())], world_size, device)[0]:
            stop_reason = "stopped by the runner"
        if stop_reason and guards.distributed(world_size):
            stop_reason = _gather(stop_reason, world_size)[0]  # rank 0's words, the same decision
        metrics["stop_reason"] = stop_reason

        rng_states = _gather(capture_rng_state(), world_size)
        tmp_dir = None
        if rank == 0:
            tmp_dir = tempfile.mkdtemp(prefix="neoray-ckpt-")
            save_checkpoint(tmp_dir, {
                "model": model.state_dict(),
                "ema": state.ema.module.state_dict() if state.ema is not None else None,
                "ema_updates": state.ema.updates if state.ema is not None else 0,
                "optimizer": optimizer.state_dict(),
                "scheduler": state.scheduler.state_dict(),
                "scaler": state.scaler.state_dict() if state.scaler.is_enabled() else None,
                "epoch": epoch + 1, "step": state.step, "rng": {"per_rank": rng_states},
                "config": cfg.to_dict(), "model_name": cfg.model.name, "num_classes": num_classes,
                "categories": categories, "metrics": metrics, "progress": progress,
            })
        try:
            ctx.report(metrics, tmp_dir)
        finally:
            if tmp_dir:
                shutil.rmtree(tmp_dir, ignore_errors=True)
        if stop_reason:
            if log:
                log(f"stopping after epoch {epoch + 1}: {stop_reason}")
            return


def _main_lr(optimizer: torch.optim.Optimizer) -> float:
    """The LR of the head groups (the backbone's is scaled by backbone_lr_mult)."""
    for group in optimizer.param_groups:
        if not str(group.get("name", "")).startswith("backbone"):
            return float(group["lr"])
    return float(optimizer.param_groups[0]["lr"])


def train_loop_per_worker(loop_config: dict) -> None:
    """What ``TorchTrainer`` runs on each worker. ``loop_config``: {"config": Config.to_dict(),
    "categories": [...], "resume_from": str | None, "fault_injection": FaultInjection | None}."""
    run_training_loop(
        from_dict(loop_config["config"]), RayTrainContext(),
        categories=loop_config.get("categories"),
        resume_from=loop_config.get("resume_from"),
        fault_injection=loop_config.get("fault_injection"),
    )


__all__ = [
    "EpochStats", "FaultInjection", "LocalContext", "RayTrainContext", "TrainContext", "TrainState",
    "default_device", "resolve_amp", "run_training_loop", "set_backbone_frozen", "train_loop_per_worker",
    "train_one_epoch",
]
