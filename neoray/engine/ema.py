"""Exponential moving average of the model weights (evaluated and saved alongside the raw weights).

The decay ramps up as ``decay * (1 - exp(-updates / warmup_steps))`` (the RT-DETR / YOLO recipe), so the
average follows the fast-moving early weights instead of staying stuck near the random initialisation.
"""

from __future__ import annotations

import copy
import math

import torch
from torch import nn


class ModelEMA:
    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup_steps: int = 200):
        # A private copy in eval mode; it never receives gradients.
        self.module = copy.deepcopy(model).eval()
        for param in self.module.parameters():
            param.requires_grad_(False)
        self.decay = decay
        self.warmup_steps = warmup_steps
        self.updates = 0

    @torch.no_grad()
    def reset(self, model: nn.Module) -> None:
        """Start the average again from ``model``'s current weights (after they were loaded or
        broadcast; the copy made in ``__init__`` may predate that)."""
        self.module.load_state_dict(model.state_dict())
        self.updates = 0

    def current_decay(self) -> float:
        if self.warmup_steps <= 0:
            return self.decay
        return self.decay * (1 - math.exp(-self.updates / self.warmup_steps))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """Blend ``model``'s weights in (call after every optimizer step, with the unwrapped model)."""
        self.updates += 1
        decay = self.current_decay()
        model_state = model.state_dict()
        for name, ema_value in self.module.state_dict().items():
            value = model_state[name].detach()
            if ema_value.dtype.is_floating_point:
                ema_value.mul_(decay).add_(value.to(ema_value.dtype), alpha=1 - decay)
            else:
                ema_value.copy_(value)  # integer buffers such as BatchNorm's num_batches_tracked


__all__ = ["ModelEMA"]
