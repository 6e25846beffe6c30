"""Train-time augmentation that keeps 16:9 exactly, and the plain resize used by evaluation.

Everything here works on one batch of decoded images (uint8 HWC RGB numpy arrays, all 16:9) and their
targets, on the training worker after ``iter_batches`` (decode happens earlier, in Ray Data). Doing it
per batch is what makes multi-scale possible: every batch is resized to ONE size drawn from
``data.multiscale``, so the images of a batch always stack.

Per image, with albumentations (boxes in ``pascal_voc`` = xyxy pixels, following every transform):

    Resize to the batch size  ->  HorizontalFlip(p=data.hflip)  ->  ColorJitter(strength data.color_jitter)

Resizing 16:9 to 16:9 is a pure scale (W is a multiple of 16 and H of 9 for every 16:9 size, so
W'/W == H'/H exactly); nothing is cropped or padded, so the letterbox mapping of the shard stays affine:
``scale`` and ``pad`` just multiply by the resize factor. A horizontal flip mirrors x, which that mapping
does not describe: ``orig = (pixel - pad) / scale`` holds for UNFLIPPED images only. Training does not
need the mapping (targets are already in the tensor's pixels); evaluation never flips.

Boxes smaller than 1 px in width or height after the transforms (or clipped away at the border) are
dropped with their labels, iscrowd and areas, never passed on as zero-area targets; the number dropped is
returned so that the caller can count and report it.

Random draws are deterministic: the batch size comes from a numpy Generator seeded by the caller with
(seed, epoch, rank, batch index), and albumentations gets a seed drawn from that same Generator.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for a newer version on import; workers have no internet and need no nagging.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import albumentations as A  # noqa: E402
import cv2  # noqa: E402
import numpy as np  # noqa: E402

from neoray.config import DataConfig, parse_size  # noqa: E402

MIN_BOX_SIDE = 1.0  # pixels; narrower or flatter boxes after augmentation are dropped


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


class TrainAugment:
    """Augment one training batch: one drawn size for all images, then flip and colour jitter per image."""

    def __init__(self, data_cfg: DataConfig):
        self.sizes = train_sizes(data_cfg)
        self.hflip = float(data_cfg.hflip)
        self.color_jitter = float(data_cfg.color_jitter)
        self._pipelines: dict[tuple[int, int], A.Compose] = {}  # one per target size, built on first use

    def _pipeline(self, size: tuple[int, int]) -> A.Compose:
        if size not in self._pipelines:
            width, height = size
            transforms = [
                # Resize first: flip and jitter then run on the (usually smaller) output.
                A.Resize(height=height, width=width, interpolation=cv2.INTER_LINEAR, area_for_downscale="image"),
                A.HorizontalFlip(p=self.hflip),
            ]
            if self.color_jitter > 0:
                s = self.color_jitter
                # torchvision-style factors in [1 - s, 1 + s]; hue is a fraction of the colour wheel and is
                # kept gentler (s / 8) because a hue shift changes what colour an object is.
                transforms.append(A.ColorJitter(brightness=s, contrast=s, saturation=s, hue=min(0.5, s / 8), p=1.0))
            self._pipelines[size] = A.Compose(
                transforms,
                bbox_params=A.BboxParams(
                    format="pascal_voc",
                    label_fields=["box_index"],  # the row of each surviving box, to carry labels/iscrowd/areas
                    min_width=MIN_BOX_SIDE,
                    min_height=MIN_BOX_SIDE,
                    clip=True,
                    filter_invalid_bboxes=True,
                ),
            )
        return self._pipelines[size]

    def __call__(self, samples: list[dict], rng: np.random.Generator) -> tuple[list[dict], tuple[int, int], int]:
        """Augment ``samples`` (dicts with "image" HWC uint8, "boxes" float32 (N, 4) xyxy, "labels",
        "iscrowd", "areas", "image_id"; other keys are passed through) with draws from ``rng``.

        Returns ``(augmented samples, (W, H) of the batch, number of boxes dropped)``. Each returned sample
        also has "factor": the resize factor applied to its image (scale and pad multiply by it).
        """
        size = self.sizes[int(rng.integers(len(self.sizes)))]
        pipeline = self._pipeline(size)
        pipeline.set_random_seed(int(rng.integers(2**31)))  # fixes every flip/jitter draw of this batch
        out, dropped = [], 0
        for sample in samples:
            image = sample["image"]
            h, w = image.shape[:2]
            factor = resize_factor((w, h), size, sample["image_id"])
            boxes = sample["boxes"]
            result = pipeline(image=image, bboxes=boxes, box_index=np.arange(len(boxes)))
            keep = np.asarray(result["box_index"], dtype=np.int64)
            new_boxes = np.asarray(result["bboxes"], dtype=np.float32).reshape(-1, 4)
            dropped += len(boxes) - len(keep)
            out.append({
                **sample,  # keeps image_id, scale, pad, orig_size
                "image": result["image"],
                "boxes": new_boxes,
                "labels": sample["labels"][keep],
                "iscrowd": sample["iscrowd"][keep],
                "areas": sample["areas"][keep],
                "factor": factor,
            })
        return out, size, dropped


__all__ = ["MIN_BOX_SIDE", "TrainAugment", "resize_factor", "resize_image", "train_sizes"]
