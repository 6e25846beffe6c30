"""Train-time augmentation: 16:9 kept exactly, boxes follow flip and resize, degenerate boxes dropped."""

from __future__ import annotations

import cv2
import numpy as np
import pytest

from neoray.config import ConfigError, DataConfig, is_16_9
from neoray.data.augment import TrainAugment, resize_image
from neoray.data.draws import resize_factor, train_sizes


def _image(w=320, h=180, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _sample(boxes, image=None, image_id=1):
    boxes = np.asarray(boxes, np.float32).reshape(-1, 4)
    n = len(boxes)
    return {
        "image": _image() if image is None else image,
        "boxes": boxes,
        "labels": np.arange(n, dtype=np.int64) + 10,
        "iscrowd": np.arange(n) % 2 == 1,
        "areas": np.arange(n, dtype=np.float32) * 100 + 7,
        "image_id": image_id,
        "scale": 2.0,
        "pad": (0.0, 5.0),
    }


BOXES = [[10, 20, 60, 90], [100, 0, 320, 180], [250.5, 30.25, 300.75, 31.5]]


def test_horizontal_flip_mirrors_boxes_and_pixels():
    cfg = DataConfig(size=(320, 180), hflip=1.0, color_jitter=0.0)
    sample = _sample(BOXES)
    out, size, dropped = TrainAugment(cfg)([sample], np.random.default_rng(0))
    assert size == (320, 180) and dropped == 0
    src = np.asarray(BOXES, np.float32)
    expected = np.stack([320 - src[:, 2], src[:, 1], 320 - src[:, 0], src[:, 3]], axis=1)
    np.testing.assert_allclose(out[0]["boxes"], expected, atol=1e-3)
    np.testing.assert_array_equal(out[0]["image"], sample["image"][:, ::-1])
    np.testing.assert_array_equal(out[0]["labels"], sample["labels"])


def test_no_flip_no_jitter_leaves_image_and_boxes_alone():
    cfg = DataConfig(size=(320, 180), hflip=0.0, color_jitter=0.0)
    sample = _sample(BOXES)
    out, _, _ = TrainAugment(cfg)([sample], np.random.default_rng(0))
    np.testing.assert_array_equal(out[0]["image"], sample["image"])
    np.testing.assert_allclose(out[0]["boxes"], np.asarray(BOXES, np.float32), atol=1e-4)
    assert out[0]["factor"] == 1.0


def test_color_jitter_changes_pixels_but_not_boxes():
    cfg = DataConfig(size=(320, 180), hflip=0.0, color_jitter=0.4)
    sample = _sample(BOXES)
    out, _, _ = TrainAugment(cfg)([sample], np.random.default_rng(0))
    assert out[0]["image"].dtype == np.uint8 and out[0]["image"].shape == (180, 320, 3)
    assert np.abs(out[0]["image"].astype(int) - sample["image"].astype(int)).mean() > 1.0
    np.testing.assert_allclose(out[0]["boxes"], np.asarray(BOXES, np.float32), atol=1e-4)


@pytest.mark.parametrize("target", [(160, 90), (480, 270), (1920, 1080)])
def test_multiscale_resize_scales_boxes_by_the_size_ratio(target):
    cfg = DataConfig(size=(320, 180), multiscale=[target], hflip=0.0, color_jitter=0.0)
    sample = _sample(BOXES)
    out, size, dropped = TrainAugment(cfg)([sample], np.random.default_rng(3))
    ratio = target[0] / 320
    assert size == target and out[0]["image"].shape == (target[1], target[0], 3)
    assert out[0]["factor"] == pytest.approx(ratio)
    kept = out[0]["labels"] - 10  # labels carry the source row
    np.testing.assert_allclose(out[0]["boxes"], np.asarray(BOXES, np.float32)[kept] * ratio, atol=0.5)
    assert dropped == len(BOXES) - len(kept)


def test_degenerate_boxes_are_dropped_with_their_labels():
    # Box 1 is 1.5 px wide: 0.75 px after halving the size. Box 2 is 1.25 px high: 0.625 px after.
    boxes = [[10, 10, 50, 50], [100, 10, 101.5, 60], [200, 100, 260, 101.25], [0, 0, 320, 180]]
    cfg = DataConfig(size=(320, 180), multiscale=[(160, 90)], hflip=0.0, color_jitter=0.0)
    sample = _sample(boxes)
    out, _, dropped = TrainAugment(cfg)([sample], np.random.default_rng(0))
    assert dropped == 2
    np.testing.assert_array_equal(out[0]["labels"], [10, 13])
    np.testing.assert_array_equal(out[0]["iscrowd"], sample["iscrowd"][[0, 3]])
    np.testing.assert_array_equal(out[0]["areas"], sample["areas"][[0, 3]])  # original-pixel areas unchanged
    np.testing.assert_allclose(out[0]["boxes"], np.asarray(boxes, np.float32)[[0, 3]] / 2, atol=0.5)
    widths = out[0]["boxes"][:, 2] - out[0]["boxes"][:, 0]
    heights = out[0]["boxes"][:, 3] - out[0]["boxes"][:, 1]
    assert (widths >= 1).all() and (heights >= 1).all()


def test_empty_image_passes_through_with_zero_by_four_boxes():
    cfg = DataConfig(size=(320, 180), multiscale=[(160, 90)], hflip=0.5, color_jitter=0.4)
    out, _, dropped = TrainAugment(cfg)([_sample([])], np.random.default_rng(0))
    assert dropped == 0
    assert out[0]["boxes"].shape == (0, 4) and out[0]["boxes"].dtype == np.float32
    assert out[0]["labels"].shape == (0,) and out[0]["iscrowd"].shape == (0,) and out[0]["areas"].shape == (0,)


def test_sizes_come_only_from_the_list_and_one_per_batch():
    sizes = [(160, 90), (256, 144), (320, 180)]
    aug = TrainAugment(DataConfig(size=(320, 180), multiscale=sizes, hflip=0.5, color_jitter=0.0))
    seen = set()
    for index in range(30):
        batch = [_sample(BOXES, image_id=i) for i in range(3)]
        out, size, _ = aug(batch, np.random.default_rng([0, 0, 0, index]))
        assert {s["image"].shape for s in out} == {(size[1], size[0], 3)}
        seen.add(size)
    assert seen == set(sizes)
    assert all(is_16_9(*s) for s in seen)


def test_train_sizes_default_and_validation():
    assert train_sizes(DataConfig(size=(640, 360))) == [(640, 360)]
    assert train_sizes(DataConfig(size=(640, 360), multiscale=["320x180", [480, 270]])) == [(320, 180), (480, 270)]
    with pytest.raises(ConfigError, match="not 16:9"):
        train_sizes(DataConfig(size=(640, 360), multiscale=[(640, 480)]))


def test_non_16_9_image_is_an_error_naming_the_image():
    cfg = DataConfig(size=(320, 180), color_jitter=0.0)
    with pytest.raises(ValueError, match="image_id 42"):
        TrainAugment(cfg)([_sample(BOXES, image=_image(320, 240), image_id=42)], np.random.default_rng(0))


def test_same_seed_same_result_other_seed_differs():
    cfg = DataConfig(size=(320, 180), multiscale=[(160, 90), (320, 180), (480, 270)], hflip=0.5, color_jitter=0.4)
    batch = [_sample(BOXES, image=_image(seed=i), image_id=i) for i in range(4)]

    def run(seed):
        out, size, _ = TrainAugment(cfg)(batch, np.random.default_rng(seed))
        return size, [s["image"] for s in out], [s["boxes"] for s in out]

    a, b = run(5), run(5)
    assert a[0] == b[0]
    for x, y in zip(a[1] + a[2], b[1] + b[2]):
        np.testing.assert_array_equal(x, y)
    others = [run(seed) for seed in range(6, 10)]
    assert any(o[0] != a[0] or any(not np.array_equal(x, y) for x, y in zip(o[1], a[1])) for o in others)


def test_resize_image_and_factor_for_eval():
    image = _image(320, 180)
    assert resize_image(image, (320, 180)) is image
    small = resize_image(image, (160, 90))
    assert small.shape == (90, 160, 3)
    np.testing.assert_array_equal(small, cv2.resize(image, (160, 90), interpolation=cv2.INTER_AREA))
    assert resize_factor((320, 180), (640, 360), 1) == 2.0
    with pytest.raises(ValueError, match="image_id 7"):
        resize_factor((320, 180), (640, 480), 7)
