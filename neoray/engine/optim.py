"""Optimizer parameter groups and learning-rate schedules.

Weight decay is not applied to normalisation layers, biases and embeddings (decaying them towards zero
only hurts: DETR/RT-DETR practice), and the backbone gets ``train.backbone_lr_mult`` of the base LR (the config
resolves ``auto`` to 0.1 for a pretrained backbone, 1.0 for one trained from scratch).

Schedules are counted in OPTIMIZER steps, never in micro-batches, so ``warmup_steps`` means the same
thing whatever the batch size and gradient accumulation are. ``lr_factor`` is the pure function behind
the ``LambdaLR``; ``lr_at`` gives the absolute LR of the main group at a step (tests, reports).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from neoray.config import FROM_SCRATCH_BACKBONE_LR_MULT, TrainConfig

# A parameter registered directly on a custom module (nn.Parameter, not inside a layer) whose own name
# says it is an embedding or a learned query/position gets no weight decay either. Only the parameter's
# own attribute name is matched, never the module path: ``decoder.query_pos_head.layers.0.weight`` is
# an ordinary Linear weight and must decay.
_NO_DECAY_NAME_PARTS = ("embed", "query", "pos")


def optimizer_steps_per_epoch(micro_batches: int, accumulate: int) -> int:
    """A partial accumulation group at the end of an epoch still steps (see step.py), hence ceil."""
    return math.ceil(micro_batches / accumulate)


def _is_norm(module: nn.Module) -> bool:
    # Covers BatchNorm*, LayerNorm, GroupNorm, RMSNorm and custom ones such as FrozenBatchNorm2d.
    return "Norm" in type(module).__name__


def no_decay_names(model: nn.Module) -> set[str]:
    """Names of parameters that must not get weight decay: norms, biases and embeddings (by module
    type; by the parameter's own name only for raw parameters of custom modules)."""
    names: set[str] = set()
    for module_name, module in model.named_modules():
        for param_name, _ in module.named_parameters(recurse=False):
            full = f"{module_name}.{param_name}" if module_name else param_name
            if (
                _is_norm(module)
                or isinstance(module, nn.Embedding)
                or param_name == "bias"
                or any(part in param_name.lower() for part in _NO_DECAY_NAME_PARTS)
            ):
                names.add(full)
    return names


def param_groups(model: nn.Module, lr: float, weight_decay: float, backbone_lr_mult: float) -> list[dict]:
    """Up to four groups: (backbone | rest) x (decay | no decay). Frozen parameters are included, so a
    backbone unfrozen later is already known to the optimizer (it skips params whose grad is None)."""
    backbone = getattr(model, "backbone", None)
    backbone_ids = {id(p) for p in backbone.parameters()} if isinstance(backbone, nn.Module) else set()
    skip_decay = no_decay_names(model)
    buckets: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        key = (id(param) in backbone_ids, name in skip_decay)
        buckets.setdefault(key, []).append(param)
    groups = []
    for (is_backbone, no_decay), params in sorted(buckets.items()):
        groups.append({
            "params": params,
            "lr": lr * (backbone_lr_mult if is_backbone else 1.0),
            "weight_decay": 0.0 if no_decay else weight_decay,
            "name": f"{'backbone' if is_backbone else 'head'}_{'no_decay' if no_decay else 'decay'}",
        })
    return groups


def build_optimizer(model: nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """AdamW (default) or SGD over ``param_groups``; fused kernels when every parameter is on CUDA."""
    # None: a TrainConfig made in code, not resolved by load_config; nothing says its backbone is pretrained.
    mult = FROM_SCRATCH_BACKBONE_LR_MULT if train.backbone_lr_mult is None else train.backbone_lr_mult
    groups = param_groups(model, train.lr, train.weight_decay, mult)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    # fused is the fastest CUDA implementation; foreach (the CPU default) is used otherwise.
    kernel = {"fused": True} if on_cuda else {}
    if train.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=train.lr, momentum=train.momentum, **kernel)
    return torch.optim.AdamW(groups, lr=train.lr, **kernel)


@dataclass(frozen=True)
class Schedule:
    """Everything the LR factor depends on; built once from the config and the step count."""

    kind: str
    total_steps: int
    warmup_steps: int = 0
    min_lr_ratio: float = 0.01
    milestones: tuple = ()
    gamma: float = 0.1
    flat_fraction: float = 0.5

    @classmethod
    def from_config(cls, train: TrainConfig, total_steps: int) -> "Schedule":
        return cls(train.schedule, max(1, total_steps), train.warmup_steps, train.min_lr_ratio,
                   tuple(train.milestones), train.gamma, train.flat_fraction)

    def milestone_steps(self) -> list[int]:
        """Milestones below 1 are fractions of the total steps, the others are step numbers."""
        return sorted(int(m * self.total_steps) if float(m) < 1 else int(m) for m in self.milestones)


def lr_factor(schedule: Schedule, step: int) -> float:
    """Multiplier of each group's base LR for the update made at optimizer step ``step`` (0-based)."""
    s = schedule
    if s.kind == "onecycle":
        # One-cycle: linear rise from 1/25 (warmup_steps, or 30% of the run when 0), cosine fall after.
        rise = s.warmup_steps or max(1, int(0.3 * s.total_steps))
        if step < rise:
            return 0.04 + 0.96 * step / rise
        progress = min(1.0, (step - rise) / max(1, s.total_steps - rise))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    if step < s.warmup_steps:
        return (step + 1) / s.warmup_steps
    if s.kind == "constant":
        return 1.0
    if s.kind == "multistep":
        return s.gamma ** sum(1 for m in s.milestone_steps() if step >= m)
    if s.kind in ("cosine", "flat_cosine"):
        # flat_cosine (DEIM's FlatCosine): the full LR for flat_fraction of the steps after warmup, then the
        # cosine over the rest; with flat_fraction 0 it is the cosine.
        flat = s.flat_fraction if s.kind == "flat_cosine" else 0.0
        start = s.warmup_steps + int(flat * (s.total_steps - s.warmup_steps))
        progress = min(1.0, max(0, step - start) / max(1, s.total_steps - start))
        return s.min_lr_ratio + (1 - s.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {s.kind!r}; expected cosine, flat_cosine, multistep, onecycle or constant")


def lr_at(train: TrainConfig, total_steps: int, step: int) -> float:
    """The LR of the main (non-backbone) group at optimizer step ``step``."""
    return train.lr * lr_factor(Schedule.from_config(train, total_steps), step)


def build_scheduler(optimizer: torch.optim.Optimizer, train: TrainConfig, total_steps: int):
    schedule = Schedule.from_config(train, total_steps)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(schedule, step))


__all__ = [
    "Schedule", "build_optimizer", "build_scheduler", "lr_at", "lr_factor", "no_decay_names",
    "optimizer_steps_per_epoch", "param_groups",
]
