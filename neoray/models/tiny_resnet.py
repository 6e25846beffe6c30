"""A small ResNet of plain 3x3 convolutions, for training from scratch on CPUs.

torchvision has no ResNet narrower than 64-512 channels, and its small mobile networks (MobileNetV3) are
built from depthwise convolutions, which CPUs run at a fraction of the arithmetic rate of dense 3x3
convolutions. At 640x360 this network does 1.8 GMACs per image (2.8 M parameters) against MobileNetV3-small's
0.26 GMACs (0.9 M), and still trains faster: ``benchmarks/bench_models.py --models rtdetr_cpu --backbones
tiny_resnet`` measures the whole detector's training step with each backbone.

Layout: a stride-4 stem (two 3x3 convolutions, 16 and 32 channels, then one basic block), then three
stages of two basic blocks each at strides 8, 16 and 32 with 64, 128 and 256 channels. The blocks, shortcuts and
module names are ResNet-vd's (neoray.models.presnet). There are no ImageNet weights for it: it trains from
scratch, or from a file of its own (``backbone_weights``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn

from neoray.models.norm import freeze_batch_norm, freeze_parameters
from neoray.models.presnet import BasicBlock, Blocks, ConvNormLayer
from neoray.models.weights import load_backbone_weights

ARCHITECTURES = {"tiny_resnet": {"stem": (16, 32), "widths": (64, 128, 256), "blocks": (2, 2, 2)}}
STRIDES = (8, 16, 32)


class TinyResNet(nn.Module):
    """Returns [stride 8, stride 16, stride 32] maps. freeze_norm and freeze_at as PResNet's (0: the stem,
    k > 0: the stem and the first k stages)."""

    def __init__(self, arch: str = "tiny_resnet", weights: str = "none", freeze_norm: bool = False,
                 freeze_at: int = -1):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {arch!r}; valid: {sorted(ARCHITECTURES)}")
        if weights == "imagenet":
            raise ValueError(f"{arch} has no ImageNet weights: train it from scratch (backbone_weights: none) "
                             f"or give a file of its own")
        spec = ARCHITECTURES[arch]
        if not -1 <= freeze_at <= len(spec["widths"]):
            raise ValueError(f"freeze_at must be in [-1, {len(spec['widths'])}], got {freeze_at}")
        stem_a, stem_b = spec["stem"]
        self.arch = arch
        self.stem = nn.Sequential(OrderedDict([
            ("conv1", ConvNormLayer(3, stem_a, 3, 2, act=True)),
            ("conv2", ConvNormLayer(stem_a, stem_b, 3, 2, act=True)),
            ("block", BasicBlock(stem_b, stem_b, 1, project=False)),
        ]))
        self.stages = nn.ModuleList()
        cin = stem_b
        for width, count in zip(spec["widths"], spec["blocks"]):
            self.stages.append(Blocks(BasicBlock, cin, width, count, first_stage=False))
            cin = width
        self.out_channels = list(spec["widths"])
        self.strides = list(STRIDES)
        if freeze_at >= 0:
            freeze_parameters(self.stem, *self.stages[:freeze_at])
        if freeze_norm:
            freeze_batch_norm(self)
        self.freeze_norm, self.freeze_at = freeze_norm, freeze_at
        self.loaded_tensors = load_backbone_weights(self, weights, "", arch, "backbone.")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = self.stem(x)
        outs = []
        for stage in self.stages:
            x = stage(x)
            outs.append(x)
        return outs


__all__ = ["ARCHITECTURES", "TinyResNet"]
