"""Sine position embeddings and anchor boxes for flattened feature maps.

Both follow the token order of ``feature.flatten(2)`` on a (B, C, H, W) map: token ``h * W + w`` is row
``h``, column ``w``. They are built from the real (H, W) of every map (16:9 maps are never square) and are
recomputed for each input size, so a model trained at 640x360 also decodes correctly at 1920x1080.

Two orders of the sine embedding exist (``POSITION_ORDERS``):

* "xy" (neoray's): the first half of the channels encodes the column (x), the second half the row (y);
* "yx": the halves swapped, rows first. This is what the reference RT-DETR and the Hugging Face port
  compute on the square grids they were trained on: their formula builds the grid as (W, H) with "ij"
  indexing and flattens it, so token k gets the pair (k // H, k % H) in the "x" then "y" slots, while
  the feature map flattens token k as row k // W, column k % W. On a square map that puts the row in
  the first half and the column in the second; on a non-square map it mixes rows and columns. "yx" is
  the consistent version of that convention on any grid, so their checkpoints see at 16:9 what they
  learned at 640x640.
"""

from __future__ import annotations

import math

import torch


def grid_coordinates(height: int, width: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(rows, cols) of every token in flatten order: both of shape (H*W,), index h*W + w -> (h, w)."""
    rows, cols = torch.meshgrid(
        torch.arange(height, dtype=torch.float32, device=device),
        torch.arange(width, dtype=torch.float32, device=device),
        indexing="ij",  # "ij" keeps rows first, matching flatten(2) of (H, W)
    )
    return rows.flatten(), cols.flatten()


POSITION_ORDERS = ("xy", "yx")


def sine_position_embedding(
    height: int, width: int, dim: int, temperature: float = 10000.0, device=None, order: str = "xy"
) -> torch.Tensor:
    """(H*W, dim) embedding: [sin(x w_k), cos(x w_k), sin(y w_k), cos(y w_k)] with x = column, y = row
    for order "xy"; [sin(y w_k), cos(y w_k), sin(x w_k), cos(x w_k)] for order "yx"."""
    if dim % 4 != 0:
        raise ValueError(f"position embedding dim must be divisible by 4, got {dim}")
    if order not in POSITION_ORDERS:
        raise ValueError(f"position order must be one of {list(POSITION_ORDERS)}, got {order!r}")
    rows, cols = grid_coordinates(height, width, device)
    quarter = dim // 4
    omega = 1.0 / temperature ** (torch.arange(quarter, dtype=torch.float32, device=device) / quarter)
    x = cols[:, None] * omega[None]
    y = rows[:, None] * omega[None]
    first, second = (x, y) if order == "xy" else (y, x)
    return torch.cat([first.sin(), first.cos(), second.sin(), second.cos()], dim=1)


def make_anchors(
    shapes: list[tuple[int, int]],
    valid_fraction: tuple[float, float] = (1.0, 1.0),
    base_size: float = 0.05,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Anchors for all levels in flatten order, in logit space, and a validity mask.

    shapes: (H, W) per level. Anchors are (cx, cy, w, h) normalised by the padded input; level l gets
    size ``base_size * 2**l``. valid_fraction = (real width / padded width, real height / padded height):
    anchors whose centre lies in the bottom/right padding are marked invalid, as are anchors too close
    to the border for a finite logit, so query selection never starts a query in the padding.
    Returns anchors (1, S, 4) and valid (1, S, 1) bool.
    """
    anchors = []
    for level, (height, width) in enumerate(shapes):
        rows, cols = grid_coordinates(height, width, device)
        cx = (cols + 0.5) / width
        cy = (rows + 0.5) / height
        size = torch.full_like(cx, base_size * 2.0**level)
        anchors.append(torch.stack([cx, cy, size, size], dim=-1))
    anchors = torch.cat(anchors, dim=0)[None]
    eps = 0.01
    valid = ((anchors > eps) & (anchors < 1 - eps)).all(-1, keepdim=True)
    # Out of place: ONNX export (TorchScript tracing) has no symbolic for the in-place aten::__iand_.
    valid = valid & (anchors[..., 0:1] < valid_fraction[0]) & (anchors[..., 1:2] < valid_fraction[1])
    logits = torch.log(anchors / (1 - anchors))
    # Invalid anchors get a huge logit instead of inf so that arithmetic on them stays finite.
    logits = torch.where(valid, logits, torch.full_like(logits, math.log(1e4)))
    return logits, valid
