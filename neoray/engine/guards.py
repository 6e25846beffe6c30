"""Guards that keep a run alive, or stop it with a reason, instead of crashing hours in.

- ``preflight``: one batch through forward and backward before the first step, targets checked on the
  CPU first, so a label outside ``[0, num_classes)`` is a one-line error and not a CUDA assert.
- non-finite loss / gradient norm: the update is skipped and counted (``skipped_steps``).
- fp16 GradScaler overflow (an inf/NaN gradient after unscaling while the loss scale settles): the
  update is skipped, the scale lowered and counted apart (``amp_overflow_steps``); not a reason to stop.
- CUDA out-of-memory in a step (forward; backward or optimizer step where skipping is safe, see
  step.py): memory is freed, the batch skipped and counted (``oom_skipped``).
- ``epoch_stop_reason``: too many non-finite updates or OOMs in one epoch stops the run with advice.

Every skip decision is taken on all DDP ranks together (``neoray.distributed.any_flags``): if one rank
skipped an update that the others made, the replicas would silently diverge (or deadlock in the next
all-reduce).
"""

from __future__ import annotations

import gc
import math
from dataclasses import dataclass

import torch

from neoray.models import check_targets


class PreflightError(ValueError):
    """The first batch cannot be trained on; the message says why in one line."""


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError)


def free_memory() -> None:
    """Drop what an interrupted step left behind (call after the step's tensors are out of scope)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def check_batch(batch, num_classes: int) -> None:
    """Shapes, dtype and label range of one Batch, checked on the CPU with a clear message."""
    images = batch.images
    if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
        raise PreflightError(f"preflight: images must be uint8 (B, 3, H, W), got {images.dtype} "
                             f"{tuple(images.shape)}")
    if len(batch.targets) != images.shape[0]:
        raise PreflightError(f"preflight: {images.shape[0]} images but {len(batch.targets)} targets")
    try:
        check_targets(batch.targets, num_classes, (images.shape[3], images.shape[2]))
    except ValueError as exc:
        raise PreflightError(f"preflight: {exc}; check the dataset's categories and the shards") from None


def preflight(model: torch.nn.Module, batch, num_classes: int, device: torch.device,
              amp_dtype: torch.dtype | None = None) -> dict[str, float]:
    """Check one batch, then run it through forward and backward of the UNWRAPPED model (no DDP
    collective) and clear the gradients. Returns the losses; raises ``PreflightError``."""
    check_batch(batch, num_classes)
    batch = batch.to(device)
    model.train()
    try:
        with torch.autocast(device.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            losses = model(batch.images, batch.targets)
        if not isinstance(losses, dict) or not losses:
            raise PreflightError(f"preflight: the model's train forward must return a dict of losses, "
                                 f"got {type(losses).__name__}")
        total = sum(losses.values())
        if not torch.isfinite(total):
            raise PreflightError(f"preflight: the first batch's loss is not finite ({total.item()}); "
                                 f"check the data and train.lr")
        total.backward()
    except PreflightError:
        raise
    except Exception as exc:
        if is_oom(exc):
            raise PreflightError(f"preflight: out of memory on the first batch at batch_size "
                                 f"{batch.images.shape[0]} and {batch.images.shape[3]}x"
                                 f"{batch.images.shape[2]}; lower train.batch_size and raise "
                                 f"train.accumulate") from None
        raise PreflightError(f"preflight: forward/backward failed: {type(exc).__name__}: {exc}") from exc
    finally:
        model.zero_grad(set_to_none=True)
    return {name: float(value.detach()) for name, value in losses.items()}


@dataclass
class EpochCounters:
    """What the guards counted in one epoch (per rank; decisions are already rank-consistent)."""

    updates: int = 0  # optimizer steps attempted (made + skipped + amp overflows)
    skipped: int = 0  # updates skipped for a non-finite loss or gradient norm
    oom: int = 0  # micro-batches (or updates) skipped for out-of-memory
    amp_overflow: int = 0  # updates the fp16 GradScaler skipped (inf/NaN gradient after unscaling)


def oom_advice(batch_size: int, accumulate: int) -> str:
    return (f"try train.batch_size={max(1, batch_size // 2)} with train.accumulate={accumulate * 2}, "
            f"or a smaller data.size")


def epoch_stop_reason(counters: EpochCounters, max_skipped_fraction: float, max_oom: int,
                      batch_size: int, accumulate: int) -> str | None:
    """Why the run must stop after this epoch, or None. fp16 overflows are the GradScaler finding its
    scale (it halves the scale and skips the step): they are neither skipped updates nor counted in
    the fraction's denominator."""
    if counters.oom > max_oom:
        return (f"out of memory {counters.oom} times in one epoch (train.max_oom_per_epoch={max_oom}); "
                f"{oom_advice(batch_size, accumulate)}")
    judged = counters.updates - counters.amp_overflow
    if judged > 0 and counters.skipped / judged > max_skipped_fraction:
        return (f"{counters.skipped} of {judged} updates had a non-finite loss or gradient "
                f"(> train.max_skipped_fraction={max_skipped_fraction}); lower train.lr, raise "
                f"train.warmup_steps or enable train.clip_grad_norm")
    return None


def finite(value: float | torch.Tensor) -> bool:
    value = float(value)
    return not (math.isnan(value) or math.isinf(value))


__all__ = [
    "EpochCounters", "PreflightError", "check_batch", "epoch_stop_reason",
    "finite", "free_memory", "is_oom", "oom_advice", "preflight",
]
