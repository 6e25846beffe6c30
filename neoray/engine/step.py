"""One training epoch: forward, backward and optimizer steps with accumulation, clipping, AMP and guards.

Gradient accumulation under DDP: the loss is divided by ``train.accumulate`` and the micro-steps that
do not step the optimizer run under ``model.no_sync()``, so gradients are all-reduced once per update.
The ranks agree (a MAX all-reduce of small flags) on whether each rank still has a batch, so they stop
an epoch together even if their batch counts differ; every rank therefore sees the same group lengths.
A partial accumulation group at the end of an epoch is all-reduced and STEPS on every rank; its
gradient is rescaled by accumulate / (micro-batches in it), so it is the mean over its micro-batches
like a full group's.

Out of memory: in the forward, the whole accumulation group is dropped on every rank (the flags after
the forward say so). In a backward that does not all-reduce (one worker, or a ``no_sync`` micro-step)
the rank drops its gradients and the next flag all-reduce tells the others, which drop the group too.
In a backward that all-reduces under DDP, or in the optimizer step under DDP, skipping could leave the
replicas different (bucket all-reduces half done, some parameters updated), so the worker fails with
advice instead; with one worker an OOM in the optimizer step skips that update.
"""

from __future__ import annotations

import contextlib
import enum
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Iterator

import torch
from torch.nn.parallel import DistributedDataParallel

from neoray.distributed import any_flags, is_distributed, mean_over_ranks
from neoray.engine import guards
from neoray.engine.hooks import TrainHooks
from neoray.engine.state import TrainState

Log = Callable[[str], None] | None


@dataclass
class EpochStats:
    loss_sums: dict = field(default_factory=dict)  # name -> sum over finite micro-batches
    loss_count: int = 0
    images: int = 0
    seconds: float = 0.0
    last_loss: float = float("nan")  # of the last micro-batch that ran its backward
    counters: guards.EpochCounters = field(default_factory=guards.EpochCounters)


def _trainable_params(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def _drop_group(state: TrainState, stats: EpochStats, where: str, log: Log) -> None:
    """Out of memory: forget the accumulation group's gradients, free memory, count the skip (called on
    every rank together; the caller has dropped its references to the step's tensors)."""
    state.optimizer.zero_grad(set_to_none=True)
    guards.free_memory()
    stats.counters.oom += 1
    if log:
        log(f"out of memory in the {where}: skipped the batch ({stats.counters.oom} this epoch)")


def _clip(state: TrainState, group_len: int) -> bool:
    """Unscale and clip this group's gradients; whether their norm is finite (the same on every rank:
    gradients are all-reduced by now)."""
    cfg = state.cfg.train
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
    return guards.finite(torch.nn.utils.clip_grad_norm_(params, max_norm))


def _optimizer_step(state: TrainState, hooks: TrainHooks, micro_step: int) -> bool:
    """Step the optimizer; False when it ran out of memory with one worker (the update is dropped)."""
    try:
        hooks.before_optimizer_step(micro_step, state.rank)
        if state.scaler.is_enabled():
            state.scaler.step(state.optimizer)
            state.scaler.update()
        else:
            state.optimizer.step()
        return True
    except torch.OutOfMemoryError as exc:
        if is_distributed():
            # The other ranks may have stepped, and this one may have updated some parameter groups
            # already: skipping would leave the replicas different.
            raise RuntimeError(f"out of memory in the optimizer step under DDP (it cannot be skipped without "
                               f"the workers' weights diverging); "
                               f"{guards.oom_advice(state.cfg.train.batch_size, state.cfg.train.accumulate)}") from exc
    return False


def finish_update(state: TrainState, stats: EpochStats, group_bad: bool, group_len: int,
                  hooks: TrainHooks | None = None, micro_step: int = 0, log: Log = None) -> None:
    """End of an accumulation group of ``group_len`` micro-batches (the same on every rank): clip,
    check, step (or skip) — the same decision on every rank."""
    hooks = hooks or TrainHooks()
    stats.counters.updates += 1
    norm_ok = _clip(state, group_len) if not group_bad else True
    any_group_bad, any_norm_bad = any_flags([group_bad, not norm_ok], state.device)
    if any_group_bad or any_norm_bad:
        if any_norm_bad and not any_group_bad and state.scaler.is_enabled():
            # An inf/NaN gradient after unscaling is how the fp16 GradScaler finds its scale: normal
            # while the scale settles, so it is counted apart and does not count toward stopping.
            stats.counters.amp_overflow += 1
        else:
            stats.counters.skipped += 1
        if state.scaler.is_enabled() and not group_bad:
            state.scaler.update()  # lowers the fp16 loss scale after an overflow
    elif not _optimizer_step(state, hooks, micro_step):
        # One worker: nothing to keep in sync (outside the except block, so that the traceback no
        # longer holds tensors). Parameter groups stepped before the OOM keep their update; the
        # optimizer allocates a group's state before updating it, where OOM is likely.
        if state.scaler.is_enabled():
            state.scaler.update()  # unscale_ ran: reset the scaler's per-step state
        _drop_group(state, stats, "optimizer step", log)
        return
    else:
        state.scheduler.step()
        state.step += 1
        if state.ema is not None:
            state.ema.update(state.model)
    state.optimizer.zero_grad(set_to_none=True)


class _Group:
    """The accumulation group in progress on this rank."""

    def __init__(self):
        self.reset()

    def reset(self) -> None:
        self.length = 0  # micro-batches so far
        self.bad = False  # a micro-batch had a non-finite loss on some rank: the update is skipped
        self.backward_oom = False  # this rank ran out of memory in the last micro-step's local backward


class Outcome(enum.Enum):
    """What became of one micro-batch; the first three are the same on every rank."""

    OK = "ok"
    OOM_FORWARD = "out of memory in the forward (on some rank)"
    NONFINITE = "non-finite loss (on some rank): no backward"
    OOM_BACKWARD = "out of memory in this rank's local backward"


_END = object()


def with_last(items: Iterable) -> Iterator[tuple[object, bool]]:
    """``(item, is_last)`` for each item: the epoch's last batch ends its accumulation group."""
    iterator = iter(items)
    current = next(iterator, _END)
    while current is not _END:
        upcoming = next(iterator, _END)
        yield current, upcoming is _END
        current = upcoming


def _forward(state: TrainState, module, batch, hooks: TrainHooks, micro: int):
    """(losses, total loss), or (None, None) when this rank ran out of memory.

    The loss normaliser (boxes per worker, averaged over the ranks) is agreed on here, before the
    forward: a collective inside the forward would pair up with another collective on a rank whose
    forward ran out of memory, and the ranks would hang or exchange garbage."""
    num_boxes = mean_over_ranks(sum(len(t["labels"]) for t in batch.targets), state.device)
    try:
        with torch.autocast(state.device.type, dtype=state.amp_dtype, enabled=state.amp_dtype is not None):
            losses = module(batch.images, batch.targets, num_boxes=num_boxes)
            loss = sum(losses.values())
        return losses, hooks.after_forward(micro, state.rank, loss)
    except torch.OutOfMemoryError:
        return None, None


def _backward(state: TrainState, loss, hooks: TrainHooks, micro: int, syncs: bool) -> bool:
    """Backward of one micro-batch; False when a local backward ran out of memory (the group is then
    dropped on every rank at the next flag exchange)."""
    try:
        state.scaler.scale(loss / state.cfg.train.accumulate).backward()
        hooks.after_backward(micro, state.rank)
        return True
    except torch.OutOfMemoryError as exc:
        if syncs and is_distributed():
            # This backward launched DDP's bucket all-reduces, which the other ranks are now waiting to
            # match: it cannot be skipped consistently. Fail (Ray Train restarts the workers from the
            # last checkpoint, up to train.max_failures).
            raise RuntimeError(f"out of memory in the backward pass of a gradient all-reduce under DDP (it cannot "
                               f"be skipped without desynchronising the workers); "
                               f"{guards.oom_advice(state.cfg.train.batch_size, state.cfg.train.accumulate)}") from exc
        return False


def _micro_step(state: TrainState, module, batch, hooks: TrainHooks, syncs: bool, stats: EpochStats) -> Outcome:
    """Forward and backward of one micro-batch (gradients all-reduced only when ``syncs``); records its
    losses in ``stats`` when it ran."""
    micro = state.micro_step
    state.micro_step += 1
    batch = batch.to(state.device)
    hooks.before_forward(micro, state.rank, batch)
    is_ddp = isinstance(module, DistributedDataParallel)
    with module.no_sync() if (is_ddp and not syncs) else contextlib.nullcontext():
        losses, loss = _forward(state, module, batch, hooks, micro)
        local_nonfinite = loss is not None and not bool(torch.isfinite(loss.detach()))
        any_oom, any_nonfinite = any_flags([loss is None, local_nonfinite], state.device)
        if any_oom:
            return Outcome.OOM_FORWARD  # the group's all-reduce may never happen: drop it on every rank
        if any_nonfinite:
            return Outcome.NONFINITE
        if not _backward(state, loss, hooks, micro, syncs):
            return Outcome.OOM_BACKWARD
    for name, value in losses.items():
        stats.loss_sums[name] = stats.loss_sums.get(name, 0.0) + float(value.detach())
    stats.loss_count += 1
    stats.last_loss = float(loss.detach())
    return Outcome.OK


def train_one_epoch(
    state: TrainState, batches: Iterable, hooks: TrainHooks | None = None, log: Log = None
) -> EpochStats:
    """One pass over ``batches`` with accumulation, clipping, AMP and the guards."""
    hooks = hooks or TrainHooks()
    accumulate, log_every = state.cfg.train.accumulate, state.cfg.train.log_every
    stats, group = EpochStats(), _Group()
    module = state.forward_module()
    module.train()
    state.optimizer.zero_grad(set_to_none=True)
    batches_left = with_last(batches)
    start = time.perf_counter()
    while True:
        batch, last = next(batches_left, (None, True))
        # The ranks stop together when one runs out, know whether this is the epoch's last batch, and
        # learn whether a rank's local backward ran out of memory in the previous micro-step.
        none_left, last_of_epoch, group_oom = any_flags([batch is None, last, group.backward_oom], state.device)
        if group_oom:
            # That backward did not all-reduce, so the group had not stepped yet on any rank.
            _drop_group(state, stats, "backward", log)
            group.reset()
        if none_left:
            break
        syncs = group.length == accumulate - 1 or last_of_epoch
        outcome = _micro_step(state, module, batch, hooks, syncs, stats)
        if outcome is Outcome.OOM_FORWARD:
            _drop_group(state, stats, "forward", log)
            group.reset()
            continue
        if outcome is Outcome.OOM_BACKWARD:
            group.backward_oom = True  # dropped on every rank at the top of the loop
            continue
        group.bad |= outcome is Outcome.NONFINITE  # no backward: the group's update is skipped on every rank
        stats.images += len(batch.images)
        if not syncs:
            group.length += 1
            continue
        finish_update(state, stats, group.bad, group.length + 1, hooks, state.micro_step - 1, log)
        group.reset()
        if log and log_every and state.step % log_every == 0:
            log(f"step {state.step}: loss {stats.last_loss:.4f}")
    stats.seconds = time.perf_counter() - start
    return stats


__all__ = ["EpochStats", "finish_update", "train_one_epoch"]
