"""The grid_sample deformable attention equals a hand-written bilinear sampler, on non-square maps."""

import math

import torch

from neoray.models.deformable_attention import MSDeformableAttention, deformable_sampling


def bilinear_by_hand(value_map: torch.Tensor, x: float, y: float) -> torch.Tensor:
    """value_map (d, H, W); (x, y) in [0, 1] of the map; align_corners=False: pixel i's centre is (i+0.5)/size."""
    _, height, width = value_map.shape
    px, py = x * width - 0.5, y * height - 0.5
    x0, y0 = math.floor(px), math.floor(py)
    out = torch.zeros(value_map.shape[0], dtype=torch.float64)
    for yy in (y0, y0 + 1):
        for xx in (x0, x0 + 1):
            weight = (1 - abs(px - xx)) * (1 - abs(py - yy))
            if 0 <= xx < width and 0 <= yy < height:  # zero padding outside the map
                out += weight * value_map[:, yy, xx].double()
    return out


def naive_deformable(value, shapes, locations, weights):
    batch, _, heads, head_dim = value.shape
    _, queries, _, levels, points, _ = locations.shape
    starts = [0]
    for h, w in shapes:
        starts.append(starts[-1] + h * w)
    out = torch.zeros(batch, queries, heads, head_dim, dtype=torch.float64)
    for b in range(batch):
        for q in range(queries):
            for m in range(heads):
                for lvl, (h, w) in enumerate(shapes):
                    # tokens of this level in flatten order -> (d, H, W)
                    level_map = value[b, starts[lvl] : starts[lvl + 1], m].T.reshape(head_dim, h, w)
                    for p in range(points):
                        x, y = locations[b, q, m, lvl, p].tolist()
                        out[b, q, m] += weights[b, q, m, lvl, p].double() * bilinear_by_hand(level_map, x, y)
    return out.reshape(batch, queries, heads * head_dim)


def test_grid_sample_matches_naive_loop_on_non_square_levels():
    torch.manual_seed(0)
    shapes = [(3, 5), (2, 7)]  # H != W on both levels, different aspect ratios
    batch, queries, heads, head_dim, points = 2, 3, 2, 4, 3
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim)
    # Locations slightly outside [0, 1] too, so that zero padding is exercised.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2) * 1.3 - 0.15
    weights = torch.rand(batch, queries, heads, len(shapes), points)
    fast = deformable_sampling(value, shapes, locations, weights)
    slow = naive_deformable(value, shapes, locations, weights)
    assert fast.shape == (batch, queries, heads * head_dim)
    torch.testing.assert_close(fast.double(), slow, atol=1e-5, rtol=1e-5)


def test_sampling_at_a_pixel_centre_reads_that_pixel():
    # One level 2x3, one point exactly at the centre of row 1, column 2 -> that token's value.
    value = torch.arange(6, dtype=torch.float32).view(1, 6, 1, 1)
    location = torch.tensor([(2 + 0.5) / 3, (1 + 0.5) / 2]).view(1, 1, 1, 1, 1, 2)
    out = deformable_sampling(value, [(2, 3)], location, torch.ones(1, 1, 1, 1, 1))
    assert out.item() == 5.0  # token index h*W + w = 1*3 + 2


def test_module_output_shape_and_gradients():
    torch.manual_seed(0)
    attn = MSDeformableAttention(dim=16, heads=4, levels=2, points=2)
    shapes = [(4, 6), (2, 3)]
    query = torch.randn(2, 5, 16, requires_grad=True)
    value = torch.randn(2, 24 + 6, 16, requires_grad=True)
    boxes = torch.rand(2, 5, 4) * 0.5 + 0.25
    out = attn(query, boxes, value, shapes)
    assert out.shape == (2, 5, 16)
    out.sum().backward()
    assert value.grad.abs().sum() > 0 and attn.sampling_offsets.weight.grad is not None
