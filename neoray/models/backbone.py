"""torchvision backbones that return the stride 8, 16 and 32 feature maps.

Output channels are measured with a dummy forward at build time, never written down per architecture,
so any torchvision ResNet or MobileNetV3 plugs in. ``make_backbone`` also builds the reference's ResNet-vd
(``presnet18vd`` ... ``presnet101vd``, neoray.models.presnet) and a small ResNet for CPUs (``tiny_resnet``,
neoray.models.tiny_resnet). Both take ``freeze_norm`` (FrozenBatchNorm2d)
and ``freeze_at`` (-1 none, 0 the stem, k the stem and the first k stages; see neoray.models.norm).
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter

from neoray.models.norm import freeze_batch_norm, freeze_parameters
from neoray.models.presnet import ARCHITECTURES as PRESNET_ARCHITECTURES
from neoray.models.presnet import PResNet
from neoray.models.tiny_resnet import ARCHITECTURES as TINY_ARCHITECTURES
from neoray.models.tiny_resnet import TinyResNet
from neoray.models.weights import load_backbone_weights

# name -> (builder, ImageNet weights enum)
ARCHITECTURES = {
    "resnet18": (models.resnet18, models.ResNet18_Weights.IMAGENET1K_V1),
    "resnet34": (models.resnet34, models.ResNet34_Weights.IMAGENET1K_V1),
    "resnet50": (models.resnet50, models.ResNet50_Weights.IMAGENET1K_V1),
    "mobilenet_v3_small": (models.mobilenet_v3_small, models.MobileNet_V3_Small_Weights.IMAGENET1K_V1),
    "mobilenet_v3_large": (models.mobilenet_v3_large, models.MobileNet_V3_Large_Weights.IMAGENET1K_V1),
}
STRIDES = (8, 16, 32)


def _last_layer_per_stride(layers: nn.Sequential) -> dict[str, str]:
    """For a Sequential of stages, the name of the last stage producing each stride in STRIDES."""
    size = 64
    x = torch.zeros(1, 3, size, size)
    last = {}
    layers.eval()  # the probe must not touch BatchNorm running statistics
    with torch.no_grad():
        for name, layer in layers.named_children():
            x = layer(x)
            stride = size // x.shape[-1]
            if stride in STRIDES:
                last[stride] = name
    layers.train()
    return {last[s]: str(i) for i, s in enumerate(STRIDES)}


def backbone_names() -> list[str]:
    return sorted([*ARCHITECTURES, *PRESNET_ARCHITECTURES, *TINY_ARCHITECTURES])


def make_backbone(arch: str, weights: str = "none", freeze_norm: bool = False, freeze_at: int = -1) -> nn.Module:
    """A torchvision ``Backbone``, a ``PResNet`` or a ``TinyResNet``: each has ``out_channels`` and returns 3
    maps."""
    if arch in PRESNET_ARCHITECTURES:
        return PResNet(arch, weights, freeze_norm=freeze_norm, freeze_at=freeze_at)
    if arch in TINY_ARCHITECTURES:
        return TinyResNet(arch, weights, freeze_norm=freeze_norm, freeze_at=freeze_at)
    return Backbone(arch, weights, freeze_norm=freeze_norm, freeze_at=freeze_at)


class Backbone(nn.Module):
    """``body`` is the torchvision trunk; forward returns [stride 8, stride 16, stride 32] maps."""

    def __init__(self, arch: str, weights: str = "none", freeze_norm: bool = False, freeze_at: int = -1):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {arch!r}; valid: {backbone_names()}")
        builder, imagenet = ARCHITECTURES[arch]
        net = builder(weights=None)
        if arch.startswith("resnet"):
            self.body = IntermediateLayerGetter(net, {"layer2": "0", "layer3": "1", "layer4": "2"})
        else:
            self.body = IntermediateLayerGetter(net.features, _last_layer_per_stride(net.features))
        self.arch = arch
        # torchvision's MobileNetV3 uses BatchNorm momentum 0.01: its running statistics then trail the
        # batch statistics by ~100 steps, and a model trained for a few hundred steps predicts nothing
        # in eval mode. 0.1 (PyTorch's default, and what the ResNets use) keeps them in step.
        for module in self.body.modules():
            if isinstance(module, nn.BatchNorm2d):
                module.momentum = 0.1
        was_training = self.body.training
        self.body.eval()  # the probe must not touch BatchNorm running statistics
        with torch.no_grad():
            self.out_channels = [f.shape[1] for f in self(torch.zeros(1, 3, 64, 64))]
        self.body.train(was_training)
        self._freeze(freeze_norm, freeze_at)
        self.freeze_norm, self.freeze_at = freeze_norm, freeze_at
        self.loaded_tensors = load_backbone_weights(self.body, weights, imagenet.url, arch, "backbone.body.")

    def _freeze(self, freeze_norm: bool, freeze_at: int) -> None:
        if self.arch.startswith("resnet"):
            stages = [self.body.layer1, self.body.layer2, self.body.layer3, self.body.layer4]
            stem = [self.body.conv1, self.body.bn1]
        else:  # MobileNetV3: the stem is the first conv block; its later blocks are not stages
            stages, stem = [], [self.body["0"]]
        if not -1 <= freeze_at <= len(stages):
            raise ValueError(f"freeze_at for {self.arch} must be in [-1, {len(stages)}], got {freeze_at}")
        if freeze_at >= 0:
            freeze_parameters(*stem, *stages[:freeze_at])
        if freeze_norm:
            freeze_batch_norm(self.body)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x).values())
