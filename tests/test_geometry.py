"""Letterbox geometry: parameters, box round trips, and that the drawn pixels agree with the box map."""

from __future__ import annotations

import numpy as np
import pytest

from neoray.data.geometry import (
    box_areas,
    boxes_from_letterbox,
    boxes_to_letterbox,
    clip_boxes,
    cxcywh_to_xyxy,
    letterbox_image,
    letterbox_params,
    xywh_to_xyxy,
    xyxy_to_cxcywh,
    xyxy_to_xywh,
)


@pytest.mark.parametrize("orig, target, expected", [
    ((1920, 1080), (640, 360), (1 / 3, 0.0, 0.0)),  # 16:9 -> 16:9: a pure scale
    ((160, 90), (320, 180), (2.0, 0.0, 0.0)),
    ((640, 480), (320, 180), (0.375, 40.0, 0.0)),  # 4:3: bars left and right
    ((180, 320), (320, 180), (0.5625, 109.375, 0.0)),  # portrait: fractional pad kept
    ((400, 100), (320, 180), (0.8, 0.0, 50.0)),  # wider than 16:9: bars top and bottom
])
def test_letterbox_params(orig, target, expected):
    scale, pad_x, pad_y = letterbox_params(*orig, *target)
    assert (scale, pad_x, pad_y) == pytest.approx(expected, abs=1e-12)
    # The scaled image fills one axis exactly and is centred on the other.
    assert orig[0] * scale + 2 * pad_x == pytest.approx(target[0])
    assert orig[1] * scale + 2 * pad_y == pytest.approx(target[1])


def test_letterbox_params_rejects_empty_sizes():
    with pytest.raises(ValueError, match="positive"):
        letterbox_params(0, 10, 320, 180)


def test_box_round_trip_is_exact():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 500, size=(50, 2))
    boxes = np.concatenate([xy, xy + rng.uniform(1, 200, size=(50, 2))], axis=1)
    for orig in [(1920, 1080), (640, 480), (181, 333)]:
        params = letterbox_params(*orig, 320, 180)
        back = boxes_from_letterbox(boxes_to_letterbox(boxes, *params), *params)
        np.testing.assert_allclose(back, boxes, atol=1e-9)


def test_format_conversions_round_trip():
    xywh = np.array([[10, 20, 30, 40], [0.5, 0.25, 1.0, 2.0]])
    xyxy = xywh_to_xyxy(xywh)
    np.testing.assert_array_equal(xyxy[0], [10, 20, 40, 60])
    np.testing.assert_allclose(xyxy_to_xywh(xyxy), xywh)
    np.testing.assert_allclose(cxcywh_to_xyxy(xyxy_to_cxcywh(xyxy)), xyxy)
    np.testing.assert_array_equal(xyxy_to_cxcywh([[10, 20, 40, 60]])[0], [25, 40, 30, 40])
    np.testing.assert_array_equal(box_areas(xyxy), [1200, 2])


def test_clip_boxes():
    clipped = clip_boxes([[-5, -5, 50, 50], [10, 10, 400, 200]], 320, 180)
    np.testing.assert_array_equal(clipped, [[0, 0, 50, 50], [10, 10, 320, 180]])


def _white_extent(img: np.ndarray) -> tuple[float, float, float, float]:
    """xyxy extent (continuous pixel coordinates) of the pixels that are mostly white."""
    ys, xs = np.nonzero(img[..., 0] > 184)  # above the midpoint of 114 (pad) and 255 (white)
    return xs.min(), ys.min(), xs.max() + 1, ys.max() + 1


@pytest.mark.parametrize("orig", [(1920, 1080), (160, 90), (640, 480), (180, 320), (333, 181), (101, 77)])
def test_drawn_image_agrees_with_box_map(orig):
    """A white box drawn on black lands where boxes_to_letterbox says, within a pixel."""
    w, h = orig
    src = np.zeros((h, w, 3), np.uint8)
    box = np.array([w * 0.25, h * 0.3, w * 0.7, h * 0.9]).round()
    x1, y1, x2, y2 = box.astype(int)
    src[y1:y2, x1:x2] = 255
    out = letterbox_image(src, 320, 180)
    assert out.shape == (180, 320, 3) and out.dtype == np.uint8
    params = letterbox_params(w, h, 320, 180)
    expected = boxes_to_letterbox(box, *params)[0]
    np.testing.assert_allclose(_white_extent(out), expected, atol=1.0)
    scale, pad_x, pad_y = params
    if pad_x >= 1:  # the bars are the letterbox grey, the image area is not
        assert (out[:, : int(pad_x)] == 114).all() and (out[:, 320 - int(pad_x):] == 114).all()
    if pad_y >= 1:
        assert (out[: int(pad_y)] == 114).all()
    # Inside the image (one source pixel in from the edge, past the interpolated border): black, not grey.
    assert out[int(pad_y + max(scale, 1)) + 1, int(pad_x + max(scale, 1)) + 1].max() == 0


def test_same_aspect_downscale_by_integer_factor_is_area_average():
    """1920x1080 -> 640x360 is exact 3x3 block averaging: no blur from the affine step."""
    rng = np.random.default_rng(1)
    src = rng.integers(0, 256, size=(1080, 1920, 3), dtype=np.uint8)
    out = letterbox_image(src, 640, 360)
    blocks = src.reshape(360, 3, 640, 3, 3).astype(np.float64).mean(axis=(1, 3))
    assert np.abs(out.astype(np.float64) - blocks).max() <= 1.0
