"""RT-DETR's hybrid encoder: AIFI on the stride-32 map, then CCFM cross-scale fusion.

AIFI (attention-based intra-scale feature interaction) is one transformer encoder layer over the tokens
of the coarsest map only — attention there is cheap and that is where semantics live. CCFM (CNN-based
cross-scale feature fusion) is a PAN-like path: top-down (upsample, concatenate, CSP block) then
bottom-up (stride-2 conv, concatenate, CSP block). CSP blocks use RepVGG-style 3x3 + 1x1 branches.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neoray.models.position import POSITION_ORDERS, sine_position_embedding


class ConvNormAct(nn.Sequential):
    def __init__(self, cin: int, cout: int, kernel: int, stride: int = 1, act: bool = True):
        super().__init__(
            nn.Conv2d(cin, cout, kernel, stride, padding=(kernel - 1) // 2, bias=False),
            nn.BatchNorm2d(cout),
            nn.SiLU() if act else nn.Identity(),
        )


class RepVGGBlock(nn.Module):
    """3x3 and 1x1 conv branches summed (the two can be fused into one 3x3 for deployment)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv3 = ConvNormAct(channels, channels, 3, act=False)
        self.conv1 = ConvNormAct(channels, channels, 1, act=False)
        self.act = nn.SiLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.act(self.conv3(x) + self.conv1(x))


class CSPRepLayer(nn.Module):
    """Cross-stage partial block: a RepVGG path and a 1x1 shortcut path, summed."""

    def __init__(self, cin: int, cout: int, blocks: int, expansion: float):
        super().__init__()
        hidden = max(1, int(cout * expansion))
        self.main = nn.Sequential(ConvNormAct(cin, hidden, 1), *[RepVGGBlock(hidden) for _ in range(blocks)])
        self.shortcut = ConvNormAct(cin, hidden, 1)
        self.out = ConvNormAct(hidden, cout, 1) if hidden != cout else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.main(x) + self.shortcut(x))


class TransformerEncoderLayer(nn.Module):
    """Post-norm self-attention + FFN; the position embedding is added to queries and keys only."""

    def __init__(self, dim: int, heads: int, ffn_dim: int, dropout: float = 0.0):
        super().__init__()
        self.attn = nn.MultiheadAttention(dim, heads, dropout=dropout, batch_first=True)
        self.ffn = nn.Sequential(nn.Linear(dim, ffn_dim), nn.GELU(), nn.Dropout(dropout), nn.Linear(ffn_dim, dim))
        self.norm1, self.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        q = k = x + pos
        x = self.norm1(x + self.dropout(self.attn(q, k, x, need_weights=False)[0]))
        return self.norm2(x + self.dropout(self.ffn(x)))


class HybridEncoder(nn.Module):
    def __init__(
        self,
        in_channels: list[int],
        dim: int = 256,
        heads: int = 8,
        ffn_dim: int = 1024,
        csp_blocks: int = 3,
        expansion: float = 1.0,
        dropout: float = 0.0,
        position_order: str = "xy",
    ):
        super().__init__()
        if position_order not in POSITION_ORDERS:
            raise ValueError(f"position_order must be one of {list(POSITION_ORDERS)}, got {position_order!r}")
        levels = len(in_channels)
        self.dim = dim
        self.position_order = position_order  # see neoray.models.position
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(c, dim, 1, bias=False), nn.BatchNorm2d(dim)) for c in in_channels
        )
        self.aifi = TransformerEncoderLayer(dim, heads, ffn_dim, dropout)
        # Top-down: lateral 1x1 on the coarser map, upsample, fuse with the finer map.
        self.lateral = nn.ModuleList(ConvNormAct(dim, dim, 1) for _ in range(levels - 1))
        self.top_down = nn.ModuleList(CSPRepLayer(2 * dim, dim, csp_blocks, expansion) for _ in range(levels - 1))
        # Bottom-up: stride-2 conv on the finer map, fuse with the coarser map.
        self.downsample = nn.ModuleList(ConvNormAct(dim, dim, 3, stride=2) for _ in range(levels - 1))
        self.bottom_up = nn.ModuleList(CSPRepLayer(2 * dim, dim, csp_blocks, expansion) for _ in range(levels - 1))

    def forward(self, features: list[torch.Tensor]) -> list[torch.Tensor]:
        """features: backbone maps fine to coarse -> the same number of (B, dim, H_l, W_l) maps."""
        maps = [proj(f) for proj, f in zip(self.input_proj, features)]
        coarse = maps[-1]
        batch, _, height, width = coarse.shape
        pos = sine_position_embedding(height, width, self.dim, device=coarse.device, order=self.position_order)
        pos = pos.to(coarse.dtype)
        tokens = self.aifi(coarse.flatten(2).transpose(1, 2), pos[None])
        maps[-1] = tokens.transpose(1, 2).reshape(batch, self.dim, height, width)

        # Top-down, coarse to fine. inner[0] ends as the finest fused map.
        inner = [maps[-1]]
        for i in range(len(maps) - 1, 0, -1):
            step = len(maps) - 1 - i
            top = self.lateral[step](inner[0])
            inner[0] = top
            finer = maps[i - 1]
            up = F.interpolate(top, size=finer.shape[-2:], mode="nearest")
            inner.insert(0, self.top_down[step](torch.cat([up, finer], dim=1)))

        # Bottom-up, fine to coarse.
        outs = [inner[0]]
        for i in range(len(maps) - 1):
            down = self.downsample[i](outs[-1])
            outs.append(self.bottom_up[i](torch.cat([down, inner[i + 1]], dim=1)))
        return outs
