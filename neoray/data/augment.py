"""Train-time augmentation that keeps 16:9 exactly, and the plain resize used by evaluation.

A training batch is augmented in three steps, on every path the same:

1. ``draw_batch`` (neoray.data.draws): every random number of the batch, drawn from one numpy Generator
   seeded by the caller with (seed, epoch, rank, batch index): ONE size from ``data.multiscale`` for the
   whole batch (so its images stack), then per image a horizontal flip (probability ``data.hflip``) and
   colour jitter factors with their order (strength ``data.color_jitter``), as a ``BatchDraw``.
2. the boxes (``draws.transform_boxes``, numpy, shared by both paths): scaled by the resize factor, mirrored by
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
from functools import lru_cache

# albumentations checks PyPI for a newer version on import; workers have no internet and need no nagging.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from neoray.config import DataConfig  # noqa: E402
from neoray.data.decode import decode_jpeg  # noqa: E402
from neoray.data.draws import BatchDraw, ColorDraw, augment_targets, draw_batch, train_sizes  # noqa: E402

# ----------------------------------------------------------------------------------------------------
# Resizing a whole image (evaluation)
# ----------------------------------------------------------------------------------------------------


def resize_image(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resize a whole HWC image to ``size`` = (W, H): area averaging to shrink (no aliasing), linear to grow."""
    h, w = image.shape[:2]
    if (w, h) == tuple(size):
        return image
    interpolation = cv2.INTER_AREA if size[0] < w else cv2.INTER_LINEAR
    return cv2.resize(image, tuple(size), interpolation=interpolation)


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


__all__ = ["TrainAugment", "apply_draw", "decode_augment_batch", "resize_image"]
