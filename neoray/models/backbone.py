"""torchvision backbones that return the stride 8, 16 and 32 feature maps.

Output channels are measured with a dummy forward at build time, never written down per architecture,
so any torchvision ResNet or MobileNetV3 plugs in.
"""

from __future__ import annotations

import torch
from torch import nn
from torchvision import models
from torchvision.models._utils import IntermediateLayerGetter

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


class Backbone(nn.Module):
    """``body`` is the torchvision trunk; forward returns [stride 8, stride 16, stride 32] maps."""

    def __init__(self, arch: str, weights: str = "none"):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {arch!r}; valid: {sorted(ARCHITECTURES)}")
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
        self.loaded_tensors = load_backbone_weights(self.body, weights, imagenet, arch)

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        return list(self.body(x).values())
