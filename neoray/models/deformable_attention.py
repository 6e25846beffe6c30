"""Multi-scale deformable attention (Deformable DETR / RT-DETR) in plain PyTorch.

Each query looks at ``num_points`` learned sampling locations per head and per feature level around its
reference box, reads the value map there with bilinear interpolation (``F.grid_sample``: zero padding,
``align_corners=False`` — pixel centres at (i + 0.5) / size), and sums the samples with softmax weights.
No custom CUDA kernel: the same code runs on CPU and GPU.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def deformable_sampling(
    value: torch.Tensor,
    shapes: list[tuple[int, int]],
    locations: torch.Tensor,
    weights: torch.Tensor,
) -> torch.Tensor:
    """Sample and sum multi-level values.

    value: (B, S, heads, head_dim), the levels' tokens concatenated in flatten order (S = sum H*W).
    shapes: (H, W) of each level. locations: (B, Q, heads, levels, points, 2) as (x, y) in [0, 1] of the
    map. weights: (B, Q, heads, levels, points). Returns (B, Q, heads * head_dim).
    """
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    per_level = value.split([h * w for h, w in shapes], dim=1)
    grids = 2 * locations - 1  # grid_sample wants [-1, 1]
    samples = []
    for level, (height, width) in enumerate(shapes):
        # (B, H*W, heads, d) -> (B*heads, d, H, W): one image per head so each head has its own grid.
        level_value = per_level[level].permute(0, 2, 3, 1).reshape(batch * heads, head_dim, height, width)
        # (B, Q, heads, points, 2) -> (B*heads, Q, points, 2)
        level_grid = grids[:, :, :, level].transpose(1, 2).flatten(0, 1)
        # In the grid's precision (float32 from MSDeformableAttention), whatever autocast did to the values.
        samples.append(F.grid_sample(level_value.to(level_grid.dtype), level_grid, mode="bilinear",
                                     padding_mode="zeros", align_corners=False))  # (B*heads, d, Q, points)
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (B*heads, d, Q, levels*points)
    w = weights.transpose(1, 2).reshape(batch * heads, 1, queries, levels * points)
    out = (stacked * w).sum(-1)  # (B*heads, d, Q)
    return out.view(batch, heads * head_dim, queries).transpose(1, 2)


class MSDeformableAttention(nn.Module):
    def __init__(self, dim: int, heads: int, levels: int, points: int):
        super().__init__()
        if dim % heads != 0:
            raise ValueError(f"deformable attention: dim {dim} is not divisible by heads {heads}")
        self.heads, self.levels, self.points = heads, levels, points
        self.sampling_offsets = nn.Linear(dim, heads * levels * points * 2)
        self.attention_weights = nn.Linear(dim, heads * levels * points)
        self.value_proj = nn.Linear(dim, dim)
        self.output_proj = nn.Linear(dim, dim)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Start with each head's points spread on rays in different directions (as Deformable DETR),
        # so the heads look at different places from the first step.
        nn.init.zeros_(self.sampling_offsets.weight)
        angles = torch.arange(self.heads, dtype=torch.float32) * (2.0 * torch.pi / self.heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True).values
        bias = directions.view(self.heads, 1, 1, 2).repeat(1, self.levels, self.points, 1)
        bias *= torch.arange(1, self.points + 1, dtype=torch.float32).view(1, 1, -1, 1)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.zeros_(self.value_proj.bias)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.zeros_(self.output_proj.bias)

    def forward(
        self, query: torch.Tensor, reference_boxes: torch.Tensor, value: torch.Tensor, shapes: list[tuple[int, int]]
    ) -> torch.Tensor:
        """query (B, Q, C); reference_boxes (B, Q, 4) cxcywh in [0, 1]; value (B, S, C) -> (B, Q, C)."""
        batch, queries, _ = query.shape
        value = self.value_proj(value).view(batch, value.shape[1], self.heads, -1)
        offsets = self.sampling_offsets(query).view(batch, queries, self.heads, self.levels, self.points, 2)
        weights = self.attention_weights(query).view(batch, queries, self.heads, self.levels * self.points)
        weights = weights.softmax(-1).view(batch, queries, self.heads, self.levels, self.points)
        # Offsets are relative to the reference box: a point moves at most about half the box size. The sampling
        # locations are float32 under AMP too (as in the reference; a bf16 grid is off by up to a few pixels at
        # 1080p): the float32 grid makes grid_sample run in float32 (CUDA autocast promotes it to its widest
        # input, CPU autocast always runs it in float32).
        centre = reference_boxes[:, :, None, None, None, :2].float()
        size = reference_boxes[:, :, None, None, None, 2:].float()
        locations = centre + offsets.float() / self.points * size * 0.5
        return self.output_proj(deformable_sampling(value, shapes, locations, weights))
