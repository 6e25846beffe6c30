"""ResNet-vd ("PResNet"), the backbone of the reference RT-DETR (lyuwenyu/RT-DETR, rtdetr_pytorch).

ResNet-vd differs from torchvision's ResNet in three places, which is why the reference's weights do not
load into a torchvision ResNet:

* the stem is three 3x3 convolutions (32, 32, 64 channels; the first with stride 2) instead of one 7x7;
* a shortcut that halves the resolution average-pools 2x2 first and then projects with a stride-1 1x1
  convolution (torchvision projects with a stride-2 1x1, which reads one pixel in four);
* in a bottleneck the stride sits on the 3x3 convolution (as torchvision's v1.5), and the first block
  of the first stage of ResNet-18/34 also projects its shortcut (1x1 conv + norm) although the channel
  count does not change.

Module names are the reference's, so ``state_dict()`` keys are exactly its PResNet keys
(``conv1.conv1_1.conv.weight``, ``res_layers.2.blocks.0.short.conv.norm.running_var``, ...). In a
detector this module *is* ``backbone``, so a reference detector checkpoint's ``backbone.*`` tensors load
by name. The output is the stride 8, 16 and 32 maps (the reference's ``return_idx=[1, 2, 3]``).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from neoray.models.norm import freeze_batch_norm, freeze_parameters
from neoray.models.weights import load_backbone_weights

# depth -> blocks per stage
DEPTHS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3), 50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
ARCHITECTURES = {f"presnet{depth}vd": depth for depth in DEPTHS}
# The ImageNet weights the reference starts from (converted from PaddlePaddle by its author); plain
# PResNet state dicts with exactly this module's keys.
IMAGENET_URLS = {
    18: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet18_vd_pretrained_from_paddle.pth",
    34: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet34_vd_pretrained_from_paddle.pth",
    50: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet50_vd_ssld_v2_pretrained_from_paddle.pth",
    101: "https://github.com/lyuwenyu/storage/releases/download/v0.1/ResNet101_vd_ssld_pretrained_from_paddle.pth",
}
STAGE_WIDTHS = (64, 128, 256, 512)
STRIDES = (8, 16, 32)


class ConvNormLayer(nn.Module):
    """conv (no bias) -> norm -> optional ReLU; names ``conv`` and ``norm`` as in the reference."""

    def __init__(self, cin: int, cout: int, kernel: int, stride: int, act: bool = False):
        super().__init__()
        self.conv = nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=False)
        self.norm = nn.BatchNorm2d(cout)
        self.act = nn.ReLU(inplace=True) if act else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.norm(self.conv(x)))


def _shortcut(cin: int, cout: int, stride: int) -> nn.Module:
    if stride == 2:  # the "d" in vd: average-pool, then a stride-1 projection that sees every pixel
        return nn.Sequential(OrderedDict([
            ("pool", nn.AvgPool2d(2, 2, 0, ceil_mode=True)),
            ("conv", ConvNormLayer(cin, cout, 1, 1)),
        ]))
    return ConvNormLayer(cin, cout, 1, stride)


class BasicBlock(nn.Module):
    expansion = 1

    def __init__(self, cin: int, width: int, stride: int, project: bool):
        super().__init__()
        if project:
            self.short = _shortcut(cin, width, stride)
        self.branch2a = ConvNormLayer(cin, width, 3, stride, act=True)
        self.branch2b = ConvNormLayer(width, width, 3, 1)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2b(self.branch2a(x))
        return self.act(out + (self.short(x) if hasattr(self, "short") else x))


class BottleNeck(nn.Module):
    expansion = 4

    def __init__(self, cin: int, width: int, stride: int, project: bool):
        super().__init__()
        self.branch2a = ConvNormLayer(cin, width, 1, 1, act=True)
        self.branch2b = ConvNormLayer(width, width, 3, stride, act=True)  # stride on the 3x3
        self.branch2c = ConvNormLayer(width, width * self.expansion, 1, 1)
        if project:
            self.short = _shortcut(cin, width * self.expansion, stride)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.branch2c(self.branch2b(self.branch2a(x)))
        return self.act(out + (self.short(x) if hasattr(self, "short") else x))


class Blocks(nn.Module):
    """One stage; its first block changes the resolution (except in the first stage) and projects."""

    def __init__(self, block: type, cin: int, width: int, count: int, first_stage: bool):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i in range(count):
            stride = 2 if i == 0 and not first_stage else 1
            self.blocks.append(block(cin, width, stride, project=(i == 0)))
            cin = width * block.expansion

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for block in self.blocks:
            x = block(x)
        return x


class PResNet(nn.Module):
    """ResNet-vd returning [stride 8, stride 16, stride 32] maps; see the module docstring.

    freeze_norm: BatchNorm -> FrozenBatchNorm2d everywhere in the backbone. freeze_at: -1 trains every
    layer, 0 freezes the stem, k > 0 the stem and the first k stages (see neoray.models.norm).
    """

    def __init__(self, arch: str, weights: str = "none", freeze_norm: bool = False, freeze_at: int = -1):
        super().__init__()
        if arch not in ARCHITECTURES:
            raise ValueError(f"unknown backbone {arch!r}; valid: {sorted(ARCHITECTURES)}")
        if not -1 <= freeze_at <= len(STAGE_WIDTHS):
            raise ValueError(f"freeze_at must be in [-1, {len(STAGE_WIDTHS)}], got {freeze_at}")
        depth = ARCHITECTURES[arch]
        self.arch, self.depth = arch, depth
        self.conv1 = nn.Sequential(OrderedDict([
            ("conv1_1", ConvNormLayer(3, 32, 3, 2, act=True)),
            ("conv1_2", ConvNormLayer(32, 32, 3, 1, act=True)),
            ("conv1_3", ConvNormLayer(32, 64, 3, 1, act=True)),
        ]))
        block = BottleNeck if depth >= 50 else BasicBlock
        self.res_layers = nn.ModuleList()
        cin = 64
        for i, (width, count) in enumerate(zip(STAGE_WIDTHS, DEPTHS[depth])):
            self.res_layers.append(Blocks(block, cin, width, count, first_stage=(i == 0)))
            cin = width * block.expansion
        self.out_channels = [width * block.expansion for width in STAGE_WIDTHS[1:]]
        self.strides = list(STRIDES)
        if freeze_at >= 0:
            freeze_parameters(self.conv1, *self.res_layers[:freeze_at])
        if freeze_norm:
            freeze_batch_norm(self)
        self.freeze_norm, self.freeze_at = freeze_norm, freeze_at
        self.loaded_tensors = load_backbone_weights(self, weights, IMAGENET_URLS[depth], arch, "backbone.")

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        x = F.max_pool2d(self.conv1(x), kernel_size=3, stride=2, padding=1)
        outs = []
        for i, stage in enumerate(self.res_layers):
            x = stage(x)
            if i >= 1:
                outs.append(x)
        return outs


__all__ = ["ARCHITECTURES", "BasicBlock", "BottleNeck", "PResNet"]
