"""Mosaic, mixup and zoom (neoray.data.draws layouts, CPU pixels by neoray.data.augment): the geometry.

Every test image is black with solid rectangles of distinct colours at known integer boxes, and a box's
label names its colour. After each augmentation, the pixels of that colour in the output must span the
box the targets say, within 1 px (``_assert_boxes_match_pixels``); a source box that was dropped must show
less than ``MIN_VISIBLE_SHARE`` of its area. The paths' agreement (CPU vs tensor ops) is in
tests/test_tensor_augment.py, the stream's in tests/test_stream.py.
"""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from neoray.config import DataConfig, is_16_9
from neoray.data.augment import TrainAugment, compose
from neoray.data.draws import (
    FILL,
    MIN_VISIBLE_SHARE,
    MIX_UNIT,
    Layout,
    Piece,
    draw_batch,
    layout_targets,
    strong_aug_until_epoch,
    strong_augment,
    train_sizes,
)

W, H = 320, 180
PALETTE = np.array([(255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 0), (0, 255, 255), (255, 0, 255),
                    (255, 255, 255)], np.int32)
# Image j's rectangles (label = colour): none overlaps another image's, so that mixup's two layers never
# paint one rectangle over another. Some touch an edge; one is small (8 x 8).
SCENES = [
    {0: (10, 10, 90, 70), 1: (250, 120, 320, 180)},
    {2: (110, 20, 170, 60), 3: (0, 100, 40, 170)},
    {4: (190, 10, 240, 70), 5: (60, 110, 68, 118)},
    {6: (120, 80, 230, 150)},
]


def _sample(j: int) -> dict:
    image = np.zeros((H, W, 3), np.uint8)
    labels, boxes = zip(*SCENES[j].items())
    for label, (x1, y1, x2, y2) in zip(labels, boxes):
        image[y1:y2, x1:x2] = PALETTE[label]
    n = len(boxes)
    return {"image": image, "boxes": np.array(boxes, np.float32), "labels": np.array(labels, np.int64),
            "iscrowd": np.zeros(n, bool), "areas": np.array([(b[2] - b[0]) * (b[3] - b[1]) * 4.0 for b in boxes],
                                                             np.float32),
            "image_id": 100 + j, "scale": 0.5, "pad": (0.0, 0.0)}


def _batch() -> list[dict]:
    return [_sample(j) for j in range(len(SCENES))]


def _extent(image: np.ndarray, colour) -> tuple[np.ndarray | None, int]:
    """The pixel box [x1, y1, x2, y2) of the pixels of ``colour``, and their count. A pixel is the colour's
    when every channel is within half the colour's brightest channel of it: on black, a pixel more than
    half covered by the rectangle (resizing blurs its edges; this puts them half way)."""
    colour = np.asarray(colour, np.int32)
    mask = np.all(np.abs(image.astype(np.int32) - colour) <= colour.max() // 2, axis=-1)
    ys, xs = np.nonzero(mask)
    if len(xs) == 0:
        return None, 0
    return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1], np.float32), int(mask.sum())


def _assert_boxes_match_pixels(sample: dict, colour_of=lambda label: PALETTE[label]) -> None:
    for box, label in zip(sample["boxes"], sample["labels"]):
        extent, _ = _extent(sample["image"], colour_of(int(label)))
        assert extent is not None, (label, box)
        np.testing.assert_allclose(extent, box, atol=1.0, err_msg=f"label {label}")


def _assert_dropped_boxes_hardly_show(sample: dict, layout: Layout, batch: list[dict]) -> None:
    """A box of a piece's image missing from the targets shows under MIN_VISIBLE_SHARE of its area (plus
    its blurred rim), or under one pixel per side."""
    for piece in layout.pieces:
        factor = piece.size[0] / W
        for box, label in zip(batch[piece.source]["boxes"], batch[piece.source]["labels"]):
            if label in sample["labels"]:
                continue
            extent, count = _extent(sample["image"], PALETTE[label])
            w, h = (box[2] - box[0]) * factor, (box[3] - box[1]) * factor
            assert count <= MIN_VISIBLE_SHARE * w * h + 2 * (w + h) + 4, (label, count, w * h)


def _run(cfg: DataConfig, seed: int, batch: list[dict] | None = None):
    """(augmented samples, the draw they came from, boxes dropped)."""
    batch = batch or _batch()
    augment = TrainAugment(cfg)
    out, size, dropped = augment(batch, np.random.default_rng(seed))
    draw = augment.draw(len(batch), np.random.default_rng(seed))
    assert draw.size == size and len(draw.layouts) == len(batch)
    return out, draw, dropped


def _expected_dropped(batch: list[dict], out: list[dict], draw) -> int:
    sources = sum(len(batch[p.source]["boxes"]) for layout in draw.layouts for p in layout.pieces + layout.mix)
    return sources - sum(len(s["boxes"]) for s in out)


# ----------------------------------------------------------------------------------------------------
# Zoom
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("zoom, hflip", [((1.5, 1.5), 0.0), ((1.3, 1.8), 1.0), ((0.5, 0.5), 0.0), ((0.4, 0.9), 1.0)])
def test_zoom_crops_in_or_shrinks_onto_grey_and_boxes_follow(zoom, hflip):
    cfg = DataConfig(size=(W, H), hflip=hflip, color_jitter=0.0, zoom=list(zoom))
    offsets, clipped = set(), 0
    for seed in range(12):
        batch = _batch()
        out, draw, dropped = _run(cfg, seed, batch)
        assert dropped == _expected_dropped(batch, out, draw)
        for i, (sample, layout) in enumerate(zip(out, draw.layouts)):
            (piece,) = layout.pieces
            (ox, oy), (sw, sh) = piece.offset, piece.size
            assert piece.source == i and sw * 9 == sh * 16 and zoom[0] - 0.05 <= sw / W <= zoom[1] + 0.05
            # The pixels: the image resized as a whole (OpenCV) and pasted at the offset on grey, then flipped.
            interpolation = cv2.INTER_AREA if sw < W else cv2.INTER_LINEAR
            scaled = cv2.resize(batch[i]["image"], (sw, sh), interpolation=interpolation)
            canvas = np.full((H, W, 3), FILL, np.uint8)
            x0, y0 = max(0, ox), max(0, oy)
            x1, y1 = min(W, ox + sw), min(H, oy + sh)
            canvas[y0:y1, x0:x1] = scaled[y0 - oy:y1 - oy, x0 - ox:x1 - ox]
            if sw > W:
                assert (x0, y0, x1, y1) == (0, 0, W, H)  # zoomed in: a window of the enlarged image
            else:
                assert ox >= 0 and oy >= 0 and x1 - x0 == sw  # zoomed out: all of the image, on grey
            expected = canvas[:, ::-1] if draw.flips[i] else canvas
            np.testing.assert_array_equal(sample["image"], expected)
            _assert_boxes_match_pixels(sample)
            _assert_dropped_boxes_hardly_show(sample, layout, batch)
            assert sample["factor"] == pytest.approx(sw / W) and sample["offset"] == (ox, oy)
            offsets.add((ox, oy))
            moved = batch[i]["boxes"][np.searchsorted(batch[i]["labels"], sample["labels"])] * (sw / W)
            moved += np.array([ox, oy, ox, oy], np.float32)
            inside = np.clip(moved, 0, [W, H, W, H])
            clipped += int(np.sum(np.any(inside != moved, axis=1)))
            if draw.flips[i]:
                inside[:, [0, 2]] = W - inside[:, [2, 0]]
            np.testing.assert_allclose(sample["boxes"], inside, atol=1e-3)
    assert len(offsets) > 10  # a random place, not a fixed one
    assert clipped > 0 or zoom[1] < 1  # zooming in cuts boxes at the window's edge


def test_resizing_only_the_window_gives_the_whole_image_resize():
    # A piece resizes only the source crop it needs (draws.piece_window); on a textured image, the pixels
    # shown must be those of resizing the whole image and cutting it, up to a level of float rounding.
    rng = np.random.default_rng(0)
    image = cv2.GaussianBlur(rng.integers(0, 256, (H, W, 3), dtype=np.uint8), (0, 0), 1.5)
    exact = 0
    for k in [3, 7, 11, 13, 19, 20, 21, 27, 29, 31, 40, 41, 53]:  # 48x27 .. 848x477 from 320x180 (m = 20)
        piece_size = (16 * k, 9 * k)
        scaled = cv2.resize(image, piece_size, interpolation=cv2.INTER_AREA if k < 20 else cv2.INTER_LINEAR)
        for _ in range(4):
            offset = (int(rng.integers(-piece_size[0], W)), int(rng.integers(-piece_size[1], H)))
            layout = Layout((Piece(0, piece_size, offset),))
            got = compose([image], layout, (W, H))
            canvas = np.full((H, W, 3), FILL, np.uint8)
            x0, y0 = max(0, offset[0]), max(0, offset[1])
            x1, y1 = min(W, offset[0] + piece_size[0]), min(H, offset[1] + piece_size[1])
            if x1 > x0 and y1 > y0:
                canvas[y0:y1, x0:x1] = scaled[y0 - offset[1]:y1 - offset[1], x0 - offset[0]:x1 - offset[0]]
            diff = np.abs(got.astype(int) - canvas.astype(int))
            assert diff.max() <= 1 and (diff > 0).mean() < 0.01, (k, offset)
            exact += int(diff.max() == 0)
    assert exact > 26  # most are bit for bit


# ----------------------------------------------------------------------------------------------------
# Mosaic
# ----------------------------------------------------------------------------------------------------


def test_mosaic_tiles_four_images_at_their_own_scale_and_boxes_follow():
    cfg = DataConfig(size=(W, H), hflip=0.5, color_jitter=0.0, mosaic=1.0)
    corners, drops = set(), 0
    for seed in range(16):
        batch = _batch()
        out, draw, dropped = _run(cfg, seed, batch)
        assert dropped == _expected_dropped(batch, out, draw)
        drops += dropped
        for i, (sample, layout) in enumerate(zip(out, draw.layouts)):
            assert sorted(p.source for p in layout.pieces) == [0, 1, 2, 3] and layout.pieces[0].source == i
            assert all(p.size == (W, H) for p in layout.pieces)  # the scale is kept, not halved
            xs = {p.offset[0] for p in layout.pieces}
            ys = {p.offset[1] for p in layout.pieces}
            cx, cy = max(xs), max(ys)  # the centre: the right and lower tiles start there
            assert xs == {cx - W, cx} and ys == {cy - H, cy} and W // 4 <= cx <= 3 * W // 4
            corners.add((cx, cy))
            assert not np.any(np.all(sample["image"] == FILL, axis=-1))  # four full-size tiles cover the canvas
            _assert_boxes_match_pixels(sample)
            _assert_dropped_boxes_hardly_show(sample, layout, batch)
            assert sample["image_id"] == batch[i]["image_id"]
    assert len(corners) > 10 and drops > 0


def test_mosaic_with_zoom_and_multiscale_keeps_16_9_of_the_drawn_size():
    sizes = [(256, 144), (W, H), (480, 270)]
    cfg = DataConfig(size=(W, H), multiscale=sizes, hflip=0.5, color_jitter=0.0, mosaic=0.7, zoom=[0.5, 1.5])
    seen = set()
    for seed in range(16):
        batch = _batch()
        out, draw, dropped = _run(cfg, seed, batch)
        assert dropped == _expected_dropped(batch, out, draw)
        seen.add(draw.size)
        for sample, layout in zip(out, draw.layouts):
            assert sample["image"].shape == (draw.size[1], draw.size[0], 3) and is_16_9(*draw.size)
            assert all(is_16_9(*p.size) for p in layout.pieces)
            _assert_boxes_match_pixels(sample)
            _assert_dropped_boxes_hardly_show(sample, layout, batch)
            boxes = sample["boxes"]
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= draw.size[0]).all()
            assert (boxes[:, 3] <= draw.size[1]).all()
    assert seen == set(sizes)


# ----------------------------------------------------------------------------------------------------
# Mixup
# ----------------------------------------------------------------------------------------------------


def _blend(a, b, weight: int) -> np.ndarray:
    a, b = np.asarray(a, np.int64), np.asarray(b, np.int64)
    return (a * (MIX_UNIT - weight) + b * weight + MIX_UNIT // 2) // MIX_UNIT


@pytest.mark.parametrize("hflip", [0.0, 1.0])
def test_mixup_blends_two_images_and_keeps_the_boxes_of_both(hflip):
    cfg = DataConfig(size=(W, H), hflip=hflip, color_jitter=0.0, mixup=1.0)
    weights = set()
    for seed in range(6):
        batch = _batch()
        out, draw, dropped = _run(cfg, seed, batch)
        assert dropped == 0
        for i, (sample, layout) in enumerate(zip(out, draw.layouts)):
            partner = (i + 2) % 4
            assert [p.source for p in layout.pieces] == [i] and [p.source for p in layout.mix] == [partner]
            w = layout.mix_weight
            weights.add(w)
            assert 0.3 * MIX_UNIT < w < 0.7 * MIX_UNIT
            expected = _blend(batch[i]["image"], batch[partner]["image"], w)
            np.testing.assert_array_equal(sample["image"], expected[:, ::-1] if hflip else expected)
            assert sorted(sample["labels"]) == sorted([*SCENES[i], *SCENES[partner]])
            mine = set(SCENES[i])

            def colour(label, mine=mine, w=w):
                return _blend(PALETTE[label], 0, w) if label in mine else _blend(0, PALETTE[label], w)

            _assert_boxes_match_pixels(sample, colour)
    assert len(weights) > 5


# ----------------------------------------------------------------------------------------------------
# Boxes cut at a piece's edge: clipped, slivers dropped and counted
# ----------------------------------------------------------------------------------------------------


def test_boxes_cut_by_the_canvas_are_clipped_and_slivers_dropped_with_their_fields():
    sample = {"width": W, "height": H, "image_id": 7, "scale": 1.0, "pad": (0.0, 0.0),
              "boxes": np.array([[0, 0, 40, 20], [0, 40, 100, 60], [20, 100, 30, 110], [200, 50, 260, 90],
                                 [-10, 150, 10, 170], [0, 60, 35, 70]], np.float32),
              "labels": np.arange(6, dtype=np.int64), "iscrowd": np.array([0, 1, 0, 1, 0, 1], bool),
              "areas": np.array([800, 2000, 100, 2400, 400, 350], np.float32)}
    # Enlarged 2x (640x360) and shifted left by 60 px: x = 2 * x - 60.
    layout = Layout((Piece(0, (2 * W, 2 * H), (-60, 0)),))
    out, dropped = layout_targets([sample], layout, (W, H), flip=False)
    # Box 0 -> [-60, 0, 20, 40]: a quarter visible, kept at the limit. Box 1 -> [-60, 80, 140, 120]: 70 %.
    # Box 2 -> [-20, 200, 0, 220]: nothing left. Box 3 -> [340, 100, 460, 180]: beyond the right edge.
    # Box 4 is clipped to its image first ([0, 150, 10, 170]) -> [-60, 300, -40, 340]: outside.
    # Box 5 -> [-60, 120, 10, 140]: a 10 x 20 px remnant, but only 1/7 of the box: a sliver.
    np.testing.assert_array_equal(out["labels"], [0, 1])
    np.testing.assert_allclose(out["boxes"], [[0, 0, 20, 40], [0, 80, 140, 120]])
    np.testing.assert_array_equal(out["iscrowd"], [False, True])
    np.testing.assert_allclose(out["areas"], [800 * 0.25, 2000 * 0.7], rtol=1e-6)  # the visible share
    assert dropped == 4 and out["factor"] == 2.0 and out["offset"] == (-60, 0)
    # Mirrored: x -> 320 - x.
    flipped, _ = layout_targets([sample], layout, (W, H), flip=True)
    np.testing.assert_allclose(flipped["boxes"], [[300, 0, 320, 40], [180, 80, 320, 120]])
    # A remnant under one pixel wide goes too, however large a share of its box: [-0.4, 0, 0.4, 40] keeps half.
    thin = {**sample, "boxes": np.array([[29.8, 0, 30.2, 20]], np.float32), "labels": np.array([3]),
            "iscrowd": np.array([False]), "areas": np.array([10.0], np.float32)}
    out, dropped = layout_targets([thin], layout, (W, H), flip=True)
    assert len(out["boxes"]) == 0 and dropped == 1 and out["boxes"].shape == (0, 4)


def test_a_non_16_9_image_is_an_error_naming_it():
    cfg = DataConfig(size=(W, H), color_jitter=0.0, mosaic=1.0)
    batch = _batch()
    batch[2]["image"] = np.zeros((240, W, 3), np.uint8)
    with pytest.raises(ValueError, match="image_id 102"):
        TrainAugment(cfg)(batch, np.random.default_rng(0))


# ----------------------------------------------------------------------------------------------------
# Draws: reproducible, off by default, and off after data.strong_aug_until
# ----------------------------------------------------------------------------------------------------


def test_same_seed_same_batch_other_seed_another():
    cfg = DataConfig(size=(W, H), multiscale=[(256, 144), (W, H)], hflip=0.5, color_jitter=0.4, mosaic=0.5,
                     mixup=0.5, zoom=[0.5, 1.5])

    def run(seed):
        out, size, dropped = TrainAugment(cfg)(_batch(), np.random.default_rng(seed))
        return size, dropped, [(s["image"], s["boxes"], s["labels"], s["areas"]) for s in out]

    a, b = run(3), run(3)
    assert a[:2] == b[:2]
    for x, y in zip(a[2], b[2]):
        for u, v in zip(x, y):
            np.testing.assert_array_equal(u, v)
    assert any(not np.array_equal(run(seed)[2][0][0], a[2][0][0]) for seed in range(4, 8))


def test_strong_draws_come_after_the_usual_ones():
    sizes = [(256, 144), (W, H)]
    strong = strong_augment(DataConfig(mosaic=0.5, mixup=0.5, zoom=[0.5, 1.5]), 0)
    plain = draw_batch(sizes, 0.5, 0.4, 8, np.random.default_rng(11))
    rich = draw_batch(sizes, 0.5, 0.4, 8, np.random.default_rng(11), strong)
    assert (plain.size, plain.flips, plain.colors) == (rich.size, rich.flips, rich.colors)
    assert plain.layouts == () and len(rich.layouts) == 8
    kinds = {(len(layout.pieces), bool(layout.mix)) for layout in rich.layouts}
    assert {1, 4} <= {pieces for pieces, _ in kinds} and {True, False} <= {mix for _, mix in kinds}


def test_strong_augmentations_are_off_by_default():
    assert strong_augment(DataConfig(), 0) is None
    cfg = DataConfig(size=(W, H), hflip=0.0, color_jitter=0.0)
    assert TrainAugment(cfg).draw(4, np.random.default_rng(0)).layouts == ()
    assert strong_augment(DataConfig(mosaic=0.0, mixup=0.0, zoom=[], strong_aug_until=3), 0) is None


@pytest.mark.parametrize("until, epochs, stop", [(0, 10, None), (0.75, 8, 6), (0.9, 10, 9), (0.29, 100, 29),
                                                 (3, 10, 3), (3, None, 3), (12, 10, 12)])
def test_strong_augmentations_stop_at_the_configured_epoch(until, epochs, stop):
    cfg = DataConfig(mosaic=1.0, strong_aug_until=until)
    assert strong_aug_until_epoch(cfg, epochs) == stop
    on = [strong_augment(cfg, epoch, epochs) is not None for epoch in range(epochs or 10)]
    assert on == [stop is None or epoch < stop for epoch in range(epochs or 10)]


def test_a_fraction_needs_the_run_length():
    with pytest.raises(ValueError, match="data.strong_aug_until: 0.5 is a fraction of train.epochs"):
        strong_augment(DataConfig(zoom=[0.5, 1.5], strong_aug_until=0.5), 0)


def test_zoom_sizes_stay_on_the_16_9_grid_and_in_range():
    cfg = DataConfig(size=(640, 360), zoom=[0.25, 2.0])
    strong = strong_augment(cfg, 0)
    seen = set()
    for seed in range(40):
        draw = draw_batch(train_sizes(cfg), 0.0, 0.0, 4, np.random.default_rng(seed), strong)
        for layout in draw.layouts:
            (w, h), = {p.size for p in layout.pieces}
            assert w % 16 == 0 and h == w * 9 // 16 and 0.25 * 640 - 8 <= w <= 2.0 * 640 + 8
            seen.add(w)
    assert len(seen) > 30
