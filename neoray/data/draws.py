"""The numbers and the boxes of a training batch's augmentation: what both pixel paths share.

``draw_batch`` draws every random number of one batch from a numpy Generator the stream seeds with (seed,
epoch, rank, batch index): ONE size from ``data.multiscale`` for the whole batch (so its images stack),
then per image a horizontal flip (probability ``data.hflip``) and colour-jitter factors with their order
(strength ``data.color_jitter``), as a ``BatchDraw``. ``transform_boxes`` / ``augment_targets`` move the
boxes with numpy: scaled by the resize factor, mirrored by the flip, clipped to the image; boxes under
``MIN_BOX_SIDE`` px in width or height are dropped with their labels, iscrowd and areas, and counted.

The pixels are made from the same draw by ``neoray.data.augment`` (albumentations, ``data.decode: cpu``)
or ``neoray.data.tensor_augment`` (tensor ops on the worker's device, ``data.decode: gpu``). This module
imports numpy and the config only, so that the device path runs where albumentations is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from neoray.config import DataConfig, parse_size

MIN_BOX_SIDE = 1.0  # pixels; narrower or flatter boxes after augmentation are dropped
# Hue is a fraction of the colour wheel and is kept gentler than the other factors (strength / 8): a hue
# shift changes what colour an object is.
HUE_SHARE = 1 / 8


# ----------------------------------------------------------------------------------------------------
# Sizes
# ----------------------------------------------------------------------------------------------------


def train_sizes(data_cfg: DataConfig) -> list[tuple[int, int]]:
    """The (W, H) sizes a training batch may be resized to: ``data.multiscale``, or ``[data.size]``."""
    raw = list(data_cfg.multiscale) or [data_cfg.size]
    return [parse_size(s, "data.multiscale" if data_cfg.multiscale else "data.size") for s in raw]


def resize_factor(image_size: tuple[int, int], target_size: tuple[int, int], image_id: int) -> float:
    """The scale factor of a 16:9 -> 16:9 resize; an error naming the image when it would distort."""
    (w, h), (tw, th) = image_size, target_size
    if w * th != h * tw:
        raise ValueError(
            f"image_id {image_id}: image is {w}x{h}, which cannot be resized to {tw}x{th} without distortion "
            "(shard images must be 16:9; re-run `neoray prepare`)"
        )
    return tw / w


# ----------------------------------------------------------------------------------------------------
# The draws
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ColorDraw:
    """One image's colour jitter: torchvision-style factors (1 = unchanged; hue: a fraction of the colour
    wheel, 0 = unchanged) and the order of the four operations (0 brightness, 1 contrast, 2 saturation,
    3 hue), as albumentations' ``ColorJitter`` takes them."""

    brightness: float
    contrast: float
    saturation: float
    hue: float
    order: tuple[int, int, int, int]


@dataclass(frozen=True)
class BatchDraw:
    size: tuple[int, int]  # (W, H) of the whole batch
    flips: tuple[bool, ...]  # per image
    colors: tuple[ColorDraw | None, ...]  # per image; None: no colour jitter


def draw_batch(sizes: list[tuple[int, int]], hflip: float, color_jitter: float, count: int,
               rng: np.random.Generator) -> BatchDraw:
    """Every random number of a batch of ``count`` images, in a fixed order from ``rng``."""
    size = tuple(sizes[int(rng.integers(len(sizes)))])
    flips, colors = [], []
    low, high, hue = max(0.0, 1.0 - color_jitter), 1.0 + color_jitter, min(0.5, color_jitter * HUE_SHARE)
    for _ in range(count):
        flips.append(bool(rng.random() < hflip))
        if color_jitter > 0:
            b, c, s = (float(v) for v in rng.uniform(low, high, 3))
            order = tuple(int(i) for i in rng.permutation(4))
            colors.append(ColorDraw(b, c, s, float(rng.uniform(-hue, hue)), order))
        else:
            colors.append(None)
    return BatchDraw(size, tuple(flips), tuple(colors))


# ----------------------------------------------------------------------------------------------------
# Boxes (both paths)
# ----------------------------------------------------------------------------------------------------


def transform_boxes(boxes: np.ndarray, image_size: tuple[int, int], size: tuple[int, int],
                    flip: bool) -> tuple[np.ndarray, np.ndarray]:
    """xyxy boxes of an image of ``image_size`` (W, H) after the resize to ``size`` and the flip:
    ``(boxes float32 (M, 4), kept row indices int64 (M,))``, clipped to the image, boxes under
    ``MIN_BOX_SIDE`` px in either side dropped."""
    (w, h), (tw, th) = image_size, size
    out = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    np.clip(out[:, 0::2], 0, w, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, h, out=out[:, 1::2])
    out *= np.float32(tw / w)
    if flip:
        out[:, [0, 2]] = np.float32(tw) - out[:, [2, 0]]
    np.clip(out[:, 0::2], 0, tw, out=out[:, 0::2])
    np.clip(out[:, 1::2], 0, th, out=out[:, 1::2])
    keep = np.flatnonzero((out[:, 2] - out[:, 0] >= MIN_BOX_SIDE) & (out[:, 3] - out[:, 1] >= MIN_BOX_SIDE))
    return out[keep], keep.astype(np.int64)


def augment_targets(sample: dict, size: tuple[int, int], flip: bool) -> tuple[dict, int]:
    """``sample`` with its boxes, labels, iscrowd and areas after the draw (pixels untouched) and its
    "factor"; and the number of boxes dropped."""
    width, height = sample["width"], sample["height"]
    factor = resize_factor((width, height), size, sample["image_id"])
    boxes, keep = transform_boxes(sample["boxes"], (width, height), size, flip)
    out = {**sample, "boxes": boxes, "labels": sample["labels"][keep], "iscrowd": sample["iscrowd"][keep],
           "areas": sample["areas"][keep], "factor": factor}
    return out, len(sample["boxes"]) - len(keep)


__all__ = [
    "BatchDraw", "ColorDraw", "HUE_SHARE", "MIN_BOX_SIDE", "augment_targets", "draw_batch", "resize_factor",
    "train_sizes", "transform_boxes",
]
