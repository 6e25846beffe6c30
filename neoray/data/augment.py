"""Train-time augmentation that keeps 16:9 exactly, and the plain resize used by evaluation.

A training batch is augmented in three steps, on every path the same:

1. ``draw_batch`` (neoray.data.draws): every random number of the batch, drawn from one numpy Generator
   seeded by the caller with (seed, epoch, rank, batch index): ONE size from ``data.multiscale`` for the
   whole batch (so its images stack), then per image a horizontal flip (probability ``data.hflip``) and
   colour jitter factors with their order (strength ``data.color_jitter``), as a ``BatchDraw``.
2. the boxes (``draws.batch_targets``, numpy, shared by both paths): scaled by the resize factor, mirrored
   by the flip, clipped to the image; boxes under ``MIN_BOX_SIDE`` px in width or height are dropped with
   their labels, iscrowd and areas (never passed on as zero-area targets) and counted. With strong
   augmentations each piece's boxes move with it and are clipped to its part of the canvas
   (``draws.layout_targets``).
3. the pixels: ``data.decode: cpu`` applies the draw with albumentations here (``apply_draw``:
   ``Resize`` -> ``HorizontalFlip`` -> ``ColorJitter``, each transform's ``apply`` given the drawn
   parameters); ``data.decode: gpu`` applies the very same draw with tensor ops on the training worker's
   device (``neoray.data.tensor_augment``), numerically matched to these albumentations/OpenCV kernels.
   With strong augmentations (mosaic, mixup, zoom: the draw's ``Layout``s) ``compose`` first builds each
   output from the batch's images: each piece resized as above (``Resize``), pasted on a grey canvas by
   slicing, a mixup layer blended in integers; flip and jitter then apply to the composed image. The
   pasting and the blend are exact, so both paths stay as close as their resize and jitter kernels.
   albumentations' own ``Mosaic`` is not used: it draws its own numbers (the GPU path could not repeat
   them) and fits every tile into its cell, shrinking the objects that mosaic must keep at their size.

Drawing the numbers in neoray rather than inside albumentations is what lets the two paths produce the
same batch: the pixels differ by the decoders' and kernels' rounding only (tests/test_tensor_augment.py).

Resizing 16:9 to 16:9 is a pure scale (W is a multiple of 16 and H of 9 for every 16:9 size, so
W'/W == H'/H exactly): area averaging to shrink (no aliasing), bilinear to grow. Without strong
augmentations nothing is cropped or padded, so the letterbox mapping of the shard stays affine: ``scale``
and ``pad`` just multiply by the resize factor (a zoomed or mosaic output's mapping also adds its anchor
piece's offset to ``pad``, and holds for that piece only). A horizontal flip mirrors x, which that mapping
does not describe: ``orig = (pixel - pad) / scale`` holds for UNFLIPPED images only. Training does not
need the mapping (targets are already in the tensor's pixels); evaluation never flips.

``decode_augment_batch`` is the CPU path's Ray task: JPEG bytes of one batch in, the augmented batch out
as one (B, 3, H, W) uint8 array, decoded, resized, flipped and jittered image by image while each
image is in cache, written straight into its CHW slot (with layouts the whole batch is decoded first: an
output takes pieces of several images).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Iterable, Iterator

# albumentations checks PyPI for a newer version on import; workers have no internet and need no nagging.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402
from albumentations.augmentations.geometric import functional as fgeometric  # noqa: E402

from neoray.config import DataConfig  # noqa: E402
from neoray.data.decode import decode_jpeg  # noqa: E402
from neoray.data.draws import (  # noqa: E402
    FILL,
    MIX_UNIT,
    BatchDraw,
    ColorDraw,
    Layout,
    Piece,
    batch_targets,
    draw_batch,
    piece_window,
    strong_augment,
    train_sizes,
    visible_rect,
)

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


@lru_cache(maxsize=256)  # zoom draws sizes on the 16x9 grid: up to one per 16 px of width
def _resize(size: tuple[int, int]) -> A.Resize:
    width, height = size
    return A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR, area_for_downscale="image")


_FLIP = A.HorizontalFlip(p=1.0)
# Ranges do not matter: ``apply`` takes the drawn factors.
_JITTER = A.ColorJitter(p=1.0)


def finish(image: np.ndarray, flip: bool, color: ColorDraw | None) -> np.ndarray:
    """An image at the batch's size flipped and colour-jittered as drawn (albumentations)."""
    if flip:
        image = _FLIP.apply(image)
    if color is not None:
        image = _JITTER.apply(image, brightness=color.brightness, contrast=color.contrast,
                              saturation=color.saturation, hue=color.hue, order=list(color.order))
    return image


def apply_draw(image: np.ndarray, size: tuple[int, int], flip: bool, color: ColorDraw | None) -> np.ndarray:
    """One HWC uint8 RGB image resized to ``size``, flipped and colour-jittered as drawn (albumentations)."""
    return finish(_resize(tuple(size)).apply(image), flip, color)


# ----------------------------------------------------------------------------------------------------
# Layouts: mosaic, mixup, zoom (neoray.data.draws)
# ----------------------------------------------------------------------------------------------------


def _resize_crop(image: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """What ``_resize(size).apply`` does (albumentations' resize: area to shrink, linear to grow), without
    building a ``Resize`` per size: crops come in every size, and building one costs more than resizing."""
    width, height = size
    shrink = height < image.shape[0] or width < image.shape[1]
    return fgeometric.resize(image, (height, width), interpolation=cv2.INTER_AREA if shrink else cv2.INTER_LINEAR)


def _paste(images: list[np.ndarray], pieces: tuple[Piece, ...], size: tuple[int, int]) -> np.ndarray:
    """A grey canvas of ``size`` with ``pieces`` on it: of each, only its window's crop is resized."""
    canvas = np.full((size[1], size[0], 3), FILL, np.uint8)
    for piece in pieces:
        x0, y0, x1, y1 = visible_rect(piece, size)
        if x1 > x0 and y1 > y0:
            image = images[piece.source]
            window = piece_window(piece, (image.shape[1], image.shape[0]), size)
            (left, top, right, bottom), (ax, ay) = window.crop, window.at
            part = _resize_crop(image[top:bottom, left:right], window.size)
            canvas[y0:y1, x0:x1] = part[y0 - ay:y1 - ay, x0 - ax:x1 - ax]
    return canvas


def blend(a: np.ndarray, b: np.ndarray, weight: int) -> np.ndarray:
    """uint8 ``a`` and ``b`` mixed as ``(a * (MIX_UNIT - weight) + b * weight) / MIX_UNIT``, rounded half up."""
    # In place in uint16 (255 * 256 + 128 fits): a third of the time of the same sums on temporaries.
    mixed = np.multiply(a, np.uint16(MIX_UNIT - weight), dtype=np.uint16)
    mixed += np.multiply(b, np.uint16(weight), dtype=np.uint16)
    mixed += np.uint16(MIX_UNIT // 2)
    mixed //= np.uint16(MIX_UNIT)
    return mixed.astype(np.uint8)


def compose(images: list[np.ndarray], layout: Layout, size: tuple[int, int]) -> np.ndarray:
    """A layout's HWC uint8 pixels at ``size``: its pieces resized (as ``apply_draw``) and pasted on a grey
    canvas, the mix layer blended in."""
    canvas = _paste(images, layout.pieces, size)
    if layout.mix:
        canvas = blend(canvas, _paste(images, layout.mix, size), layout.mix_weight)
    return canvas


def augment_images(images: Iterable[np.ndarray], draw: BatchDraw) -> Iterator[np.ndarray]:
    """A batch's HWC uint8 images augmented as ``draw`` says, one by one. Without layouts each image is taken
    only when its turn comes (a decode can run just before its augmentation); with layouts all are needed."""
    if not draw.layouts:
        for image, flip, color in zip(images, draw.flips, draw.colors):
            yield apply_draw(image, draw.size, flip, color)
        return
    images = list(images)
    for layout, flip, color in zip(draw.layouts, draw.flips, draw.colors):
        yield finish(compose(images, layout, draw.size), flip, color)


class TrainAugment:
    """Augment one batch of decoded samples: one drawn size for all images, flip and colour jitter per
    image, and the strong augmentations on in ``epoch`` of ``epochs`` (albumentations), boxes following."""

    def __init__(self, data_cfg: DataConfig, epoch: int = 0, epochs: int | None = None):
        self.sizes = train_sizes(data_cfg)
        self.hflip = float(data_cfg.hflip)
        self.color_jitter = float(data_cfg.color_jitter)
        self.strong = strong_augment(data_cfg, epoch, epochs)

    def draw(self, count: int, rng: np.random.Generator) -> BatchDraw:
        return draw_batch(self.sizes, self.hflip, self.color_jitter, count, rng, self.strong)

    def __call__(self, samples: list[dict], rng: np.random.Generator) -> tuple[list[dict], tuple[int, int], int]:
        """Augment ``samples`` (dicts with "image" HWC uint8, "boxes" float32 (N, 4) xyxy, "labels",
        "iscrowd", "areas", "image_id"; other keys are passed through) with draws from ``rng``.

        Returns ``(augmented samples, (W, H) of the batch, number of boxes dropped)``. Each returned sample
        also has "factor": the resize factor applied to its image (scale and pad multiply by it), and with
        strong augmentations "offset" (added to pad; see neoray.data.draws).
        """
        draw = self.draw(len(samples), rng)
        sized = [{**s, "width": s["image"].shape[1], "height": s["image"].shape[0]} for s in samples]
        out, dropped = batch_targets(sized, draw)
        for sample, image in zip(out, augment_images([s["image"] for s in samples], draw)):
            sample["image"] = image
            del sample["width"], sample["height"]
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
    decoded = (decode_jpeg(data, shapes[i], where[i]) for i, data in enumerate(jpegs))
    for i, image in enumerate(augment_images(decoded, draw)):
        # One strided copy turns HWC into the batch's CHW slot (no intermediate per-image array).
        np.copyto(out[i], image.transpose(2, 0, 1))
    return out


__all__ = ["TrainAugment", "apply_draw", "augment_images", "blend", "compose", "decode_augment_batch", "finish",
           "resize_image"]
