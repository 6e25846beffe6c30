"""Train-time augmentation that keeps 16:9 exactly, and the plain resize used by evaluation.

A training batch is augmented in three steps, on every path the same:

1. ``draw_batch``: every random number of the batch, drawn here from one numpy Generator seeded by the
   caller with (seed, epoch, rank, batch index): ONE size from ``data.multiscale`` for the whole batch
   (so its images stack), then per image a horizontal flip (probability ``data.hflip``) and colour
   jitter factors with their order (strength ``data.color_jitter``), as a ``BatchDraw``.
2. the boxes (``transform_boxes``, numpy, shared by both paths): scaled by the resize factor, mirrored by
   the flip, clipped to the image; boxes under ``MIN_BOX_SIDE`` px in width or height are dropped with
   their labels, iscrowd and areas (never passed on as zero-area targets) and counted.
3. the pixels: ``data.decode: cpu`` applies the draw with albumentations here (``apply_draw``:
   ``Resize`` -> ``HorizontalFlip`` -> ``ColorJitter``, each transform's ``apply`` given the drawn
   parameters); ``data.decode: gpu`` applies the very same draw with tensor ops on the training worker's
   device (``neoray.data.tensor_augment``), numerically matched to these albumentations/OpenCV kernels.

Drawing the numbers in neoray rather than inside albumentations is what lets the two paths produce the
same batch: the pixels differ by the decoders' and kernels' rounding only (tests/test_tensor_augment.py).

Resizing 16:9 to 16:9 is a pure scale (W is a multiple of 16 and H of 9 for every 16:9 size, so
W'/W == H'/H exactly): area averaging to shrink (no aliasing), bilinear to grow. Nothing is cropped or
padded, so the letterbox mapping of the shard stays affine: ``scale`` and ``pad`` just multiply by the
resize factor. A horizontal flip mirrors x, which that mapping does not describe: ``orig = (pixel - pad) /
scale`` holds for UNFLIPPED images only. Training does not need the mapping (targets are already in the
tensor's pixels); evaluation never flips.

``decode_augment_batch`` is the CPU path's Ray task: JPEG bytes of one batch in, the augmented batch out
as one (B, 3, H, W) uint8 array, decoded, resized, flipped and jittered image by image while each
image is in cache, written straight into its CHW slot.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache

# albumentations checks PyPI for a newer version on import; workers have no internet and need no nagging.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from neoray.config import DataConfig, parse_size  # noqa: E402
from neoray.data.decode import decode_jpeg  # noqa: E402

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


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a whole HWC image to ``size`` = (W, H): area averaging to shrink (no aliasing), linear to grow."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    interpolation = cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR
    return cv2.resize(image, tuple(size), interpolation=interpolation)


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


# ----------------------------------------------------------------------------------------------------
# Pixels with albumentations (the CPU path)
# ----------------------------------------------------------------------------------------------------


@lru_cache(maxsize=32)
def _resize(size: tuple[int, int]) -> A.Resize:
    width, height = size
    return A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")


_FLIP = A.HorizontalFlip(p=1.0)
# Ranges do not matter: ``apply`` takes the drawn factors.
_JITTER = A.ColorJitter(p=1.0)


def apply_draw(image: np.ndarray, size: tuple[int, int], flip: bool, color: ColorDraw | None) -> np.ndarray:
    """One HWC uint8 RGB image resized to ``size``, flipped and colour-jittered as drawn (albumentations)."""
    image = _resize(tuple(size)).apply(image)
    if flip:
        image = _FLIP.apply(image)
    if color is not None:
        image = _JITTER.apply(image, brightness=color.brightness, contrast=color.contrast,
                              saturation=color.saturation, hue=color.hue, order=list(color.order))
    return image


class TrainAugment:
    """Augment one batch of decoded samples: one drawn size for all images, flip and colour jitter per
    image (albumentations), boxes following."""

    def __init__(self, data_cfg: DataConfig):
        self.sizes = train_sizes(data_cfg)
        self.hflip = float(data_cfg.hflip)
        self.color_jitter = float(data_cfg.color_jitter)

    def draw(self, count: int, rng: np.random.Generator) -> BatchDraw:
        return draw_batch(self.sizes, self.hflip, self.color_jitter, count, rng)

    def __call__(self, samples: list[dict], rng: np.random.Generator) -> tuple[list[dict], tuple[int, int], int]:
        """Augment ``samples`` (dicts with "image" HWC uint8, "boxes" float32 (N, 4) xyxy, "labels",
        "iscrowd", "areas", "image_id"; other keys are passed through) with draws from ``rng``.

        Returns ``(augmented samples, (W, H) of the batch, number of boxes dropped)``. Each returned sample
        also has "factor": the resize factor applied to its image (scale and pad multiply by it).
        """
        draw = self.draw(len(samples), rng)
        out, dropped = [], 0
        for sample, flip, color in zip(samples, draw.flips, draw.colors):
            height, width = sample["image"].shape[:2]
            moved, lost = augment_targets({**sample, "width": width, "height": height}, draw.size, flip)
            moved["image"] = apply_draw(sample["image"], draw.size, flip, color)
            del moved["width"], moved["height"]
            out.append(moved)
            dropped += lost
        return out, draw.size, dropped


# ----------------------------------------------------------------------------------------------------
# The CPU path's Ray task: decode + augment + collate one batch
# ----------------------------------------------------------------------------------------------------


def decode_augment_batch(jpegs: list[bytes], shapes: list[tuple[int, int]], draw: BatchDraw,
                         where: list[str]) -> np.ndarray:
    """Decode a batch's JPEGs (each of its row's ``shapes`` (W, H)), augment them as ``draw`` says and
    return them as one C-contiguous uint8 (B, 3, H', W') array. ``where`` names each record in errors
    ("shard file: image_id N")."""
    # The task holds one CPU, and the node runs one such task per free core: OpenCV's own thread pool (one
    # thread per core by default) would only oversubscribe it.
    cv2.setNumThreads(1)
    width, height = draw.size
    out = np.empty((len(jpegs), 3, height, width), np.uint8)
    for i, data in enumerate(jpegs):
        image = apply_draw(decode_jpeg(data, shapes[i], where[i]), draw.size, draw.flips[i], draw.colors[i])
        # One strided copy turns HWC into the batch's CHW slot (no intermediate per-image array).
        np.copyto(out[i], image.transpose(2, 0, 1))
    return out


__all__ = [
    "BatchDraw", "ColorDraw", "HUE_SHARE", "MIN_BOX_SIDE", "TrainAugment", "apply_draw", "augment_targets",
    "decode_augment_batch", "draw_batch", "resize_factor", "resize_image", "train_sizes", "transform_boxes",
]
