"""Frozen BatchNorm and frozen stems: the backbone options ``freeze_norm`` and ``freeze_at``.

A detector trains with a few images per GPU: batch statistics of 2-8 images are noisy, so the reference
RT-DETR (like DETR and most detectors with an ImageNet backbone) keeps the backbone's BatchNorm fixed:
its scale, shift and running statistics are constants and it normalises with the running statistics in
training too. ``FrozenBatchNorm2d`` is that layer. Its tensors are buffers with the same names as
BatchNorm2d's (``weight``, ``bias``, ``running_mean``, ``running_var``), so state dicts of either load
into it; ``num_batches_tracked`` has no meaning for it and is dropped when loading.

``freeze_at`` (reference PResNet semantics): -1 trains everything, 0 freezes the stem, k > 0 the stem and
the first k stages (``requires_grad=False``; the engine never unfreezes what was frozen at build time).
"""

from __future__ import annotations

import torch
from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """BatchNorm2d with fixed statistics and affine parameters (buffers, never trained)."""

    def __init__(self, num_features: int, eps: float = 1e-5):
        super().__init__()
        self.num_features, self.eps = num_features, eps
        self.register_buffer("weight", torch.ones(num_features))
        self.register_buffer("bias", torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.pop(prefix + "num_batches_tracked", None)  # a BatchNorm2d counter; nothing to load here
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scale = self.weight * (self.running_var + self.eps).rsqrt()
        shift = self.bias - self.running_mean * scale
        return x * scale.view(1, -1, 1, 1).to(x.dtype) + shift.view(1, -1, 1, 1).to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.num_features}, eps={self.eps}"


def freeze_batch_norm(module: nn.Module) -> nn.Module:
    """Replace every BatchNorm2d under ``module`` (itself included) by a FrozenBatchNorm2d holding the same
    values; returns the module (a new one when ``module`` itself was a BatchNorm2d)."""
    if isinstance(module, nn.BatchNorm2d):
        frozen = FrozenBatchNorm2d(module.num_features, module.eps)
        with torch.no_grad():
            if module.affine:
                frozen.weight.copy_(module.weight)
                frozen.bias.copy_(module.bias)
            if module.track_running_stats:
                frozen.running_mean.copy_(module.running_mean)
                frozen.running_var.copy_(module.running_var)
        return frozen
    for name, child in module.named_children():
        replaced = freeze_batch_norm(child)
        if replaced is not child:
            setattr(module, name, replaced)
    return module


def freeze_parameters(*modules: nn.Module) -> None:
    for module in modules:
        for param in module.parameters():
            param.requires_grad_(False)


__all__ = ["FrozenBatchNorm2d", "freeze_batch_norm", "freeze_parameters"]
