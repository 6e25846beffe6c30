"""The numbers and the boxes of a training batch's augmentation: what both pixel paths share.

``draw_batch`` draws every random number of one batch from a numpy Generator the stream seeds with (seed,
epoch, rank, batch index): ONE size from ``data.multiscale`` for the whole batch (so its images stack),
then per image a horizontal flip (probability ``data.hflip``) and colour-jitter factors with their order
(strength ``data.color_jitter``), as a ``BatchDraw``. ``transform_boxes`` / ``augment_targets`` move the
boxes with numpy: scaled by the resize factor, mirrored by the flip, clipped to the image; boxes under
``MIN_BOX_SIDE`` px in width or height are dropped with their labels, iscrowd and areas, and counted.

The strong augmentations (``data.mosaic``, ``data.mixup``, ``data.zoom``; ``strong_augment`` says which
are on in an epoch, ``data.strong_aug_until`` ending them) are drawn after those numbers, so a config
without them draws exactly what it drew before. They give every output image a ``Layout``: ``Piece``s,
each a source image of the SAME batch resized to a 16:9 size (16k x 9k px: a pure scale) and pasted at an
integer offset onto a grey (``FILL``) canvas of the batch's size, only its part on the canvas showing:

* zoom: one piece, the image scaled by a factor drawn uniformly from ``data.zoom`` (rounded to the 16x9
  grid). Above 1 the canvas is a random window of the enlarged image (= a random 16:9 crop resized back);
  below 1 the shrunk image lands at a random place on the grey canvas. Off: the batch's own scale.
* mosaic (YOLO's, at 16:9): output i shows images i, i+1, i+2, i+3 (mod the batch size) in the four
  quadrants (in a random order) around a random centre in the middle half of the canvas, each at the
  scale the zoom drew for i (the batch's own scale without zoom), so small objects keep their size; a
  2x2 grid shrunk by half would halve every one of them. Taking the tiles from the batch keeps the
  epoch's rows and the batch tasks' inputs as they were; every row is still an output's anchor once.
* mixup (YOLO's): a second layer, drawn as above for image i + B/2 (mod B), blended with weight
  Beta(32, 32), in integer 1/256 steps (``MIX_UNIT``) so both paths blend bit-identically; the boxes of
  both layers are kept.

The flip and the colour jitter then apply to the whole composed image. A layout's boxes
(``layout_targets``) are each piece's boxes scaled and shifted as its pixels, clipped to the piece's part
of the canvas; a box keeping less than ``MIN_VISIBLE_SHARE`` of its area, or under ``MIN_BOX_SIDE`` px,
is dropped with its labels, iscrowd and areas and counted. Areas stay in original pixels, times the
share of the box that remains visible. The output keeps its anchor's (image i's) id, orig_size and letterbox
mapping (scale and pad follow the anchor's piece: ``factor`` and ``offset``), true of that piece only.

The pixels are made from the same draw by ``neoray.data.augment`` (albumentations, ``data.decode: cpu``)
or ``neoray.data.tensor_augment`` (tensor ops on the worker's device, ``data.decode: gpu``). This module
imports numpy and the config only, so that the device path runs where albumentations is not installed.
"""

from __future__ import annotations

from dataclasses import dataclass
from math import gcd

import numpy as np

from neoray.config import DataConfig, parse_size

MIN_BOX_SIDE = 1.0  # pixels; narrower or flatter boxes after augmentation are dropped
# Hue is a fraction of the colour wheel and is kept gentler than the other factors (strength / 8): a hue
# shift changes what colour an object is.
HUE_SHARE = 1 / 8
# A box cut by a crop, a mosaic tile or the canvas edge that keeps less than this share of its area is
# dropped: a sliver of an object is not a target worth matching (YOLO drops below 0.1; small objects here
# have few pixels to spare).
MIN_VISIBLE_SHARE = 0.25
FILL = 114  # the grey of the canvas where no image lands (YOLO's)
MIX_UNIT = 256  # mixup weights are integers out of MIX_UNIT: (a * (256 - w) + b * w + 128) >> 8, exact
MIXUP_BETA = 32.0  # mixup's weight ~ Beta(32, 32) (YOLO's): about 0.5, rarely beyond 0.35..0.65
MOSAIC_CENTRE = (0.25, 0.75)  # the mosaic's centre, a share of the canvas's width and height
# Source pixels a piece's crop reaches beyond what the piece shows: bilinear reads one neighbour outside.
CROP_MARGIN = 2


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
class Piece:
    """A source image of the batch resized to ``size`` (W, H; 16:9) with its top-left corner at ``offset``
    (x, y) on the canvas (it may start left of or above the canvas: only its part on the canvas shows)."""

    source: int  # index in the batch
    size: tuple[int, int]
    offset: tuple[int, int]


@dataclass(frozen=True)
class Layout:
    """One output image: ``pieces`` pasted in order on a grey canvas of the batch's size; with mixup,
    ``mix`` is a second canvas blended in with weight ``mix_weight`` / ``MIX_UNIT``. ``pieces[0]`` is the
    anchor: the batch row whose id the output keeps."""

    pieces: tuple[Piece, ...]
    mix: tuple[Piece, ...] = ()
    mix_weight: int = 0


@dataclass(frozen=True)
class BatchDraw:
    size: tuple[int, int]  # (W, H) of the whole batch
    flips: tuple[bool, ...]  # per image
    colors: tuple[ColorDraw | None, ...]  # per image; None: no colour jitter
    layouts: tuple[Layout, ...] = ()  # per image with strong augmentations; (): each image just resized


@dataclass(frozen=True)
class StrongAugment:
    """The strong augmentations of an epoch (see the module docstring)."""

    mosaic: float  # probability per output image
    mixup: float  # probability per output image
    zoom: tuple[float, float] | None  # scale range; None: the batch's own scale


def strong_aug_until_epoch(data_cfg: DataConfig, epochs: int | None) -> int | None:
    """The first epoch without strong augmentations (None: they never stop). ``data.strong_aug_until`` is
    an epoch number, or a fraction of ``epochs`` (the run's train.epochs), which must then be given."""
    until = float(data_cfg.strong_aug_until)
    if until <= 0:
        return None
    if until >= 1:
        return int(until)
    if epochs is None:
        raise ValueError(f"data.strong_aug_until: {until:g} is a fraction of train.epochs, which was not given")
    return round(until * epochs)


def strong_augment(data_cfg: DataConfig, epoch: int, epochs: int | None = None) -> StrongAugment | None:
    """The strong augmentations on in ``epoch`` (0-based) of a run of ``epochs``; None when none is."""
    until = strong_aug_until_epoch(data_cfg, epochs)
    zoom = tuple(float(z) for z in data_cfg.zoom) or None
    if (until is not None and epoch >= until) or not (data_cfg.mosaic > 0 or data_cfg.mixup > 0 or zoom):
        return None
    return StrongAugment(float(data_cfg.mosaic), float(data_cfg.mixup), zoom)


def draw_batch(sizes: list[tuple[int, int]], hflip: float, color_jitter: float, count: int,
               rng: np.random.Generator, strong: StrongAugment | None = None) -> BatchDraw:
    """Every random number of a batch of ``count`` images, in a fixed order from ``rng``; the strong
    augmentations' last, so that without them the draw is what it always was."""
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
    layouts = tuple(_draw_layout(i, count, size, strong, rng) for i in range(count)) if strong else ()
    return BatchDraw(size, tuple(flips), tuple(colors), layouts)


def _draw_layout(anchor: int, count: int, size: tuple[int, int], strong: StrongAugment,
                 rng: np.random.Generator) -> Layout:
    pieces = _draw_layer(anchor, count, size, strong, rng)
    if not (strong.mixup > 0 and rng.random() < strong.mixup):
        return Layout(pieces)
    partner = (anchor + max(1, count // 2)) % count
    mix = _draw_layer(partner, count, size, strong, rng)
    return Layout(pieces, mix, int(round(rng.beta(MIXUP_BETA, MIXUP_BETA) * MIX_UNIT)))


def _draw_layer(anchor: int, count: int, size: tuple[int, int], strong: StrongAugment,
                rng: np.random.Generator) -> tuple[Piece, ...]:
    scaled = _zoomed_size(size, strong.zoom, rng)
    if strong.mosaic > 0 and rng.random() < strong.mosaic:
        return _mosaic(anchor, count, size, scaled, rng)
    return (Piece(anchor, scaled, (_offset(size[0] - scaled[0], rng), _offset(size[1] - scaled[1], rng))),)


def _zoomed_size(size: tuple[int, int], zoom: tuple[float, float] | None, rng: np.random.Generator
                 ) -> tuple[int, int]:
    """``size`` (16n x 9n) times a factor drawn from ``zoom``, on the 16x9 grid (at least 16x9)."""
    if zoom is None:
        return size
    k = max(1, round(float(rng.uniform(*zoom)) * (size[0] // 16)))
    return 16 * k, 9 * k


def _offset(room: int, rng: np.random.Generator) -> int:
    """Along one axis, the offset of a piece ``room`` px shorter than the canvas (negative: longer): drawn
    uniformly from those where it lies inside the canvas (room >= 0) or covers all of it (room < 0)."""
    return int(rng.integers(min(0, room), max(0, room) + 1))


def _mosaic(anchor: int, count: int, size: tuple[int, int], scaled: tuple[int, int],
            rng: np.random.Generator) -> tuple[Piece, ...]:
    (w, h), (sw, sh) = size, scaled
    cx = int(rng.integers(round(w * MOSAIC_CENTRE[0]), round(w * MOSAIC_CENTRE[1]) + 1))
    cy = int(rng.integers(round(h * MOSAIC_CENTRE[0]), round(h * MOSAIC_CENTRE[1]) + 1))
    corners = ((cx - sw, cy - sh), (cx, cy - sh), (cx - sw, cy), (cx, cy))  # the quadrants' top-left corners
    quadrants = rng.permutation(4)
    return tuple(Piece((anchor + k) % count, scaled, corners[int(quadrants[k])]) for k in range(4))


def visible_rect(piece: Piece, size: tuple[int, int]) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1): the part of the canvas of ``size`` that ``piece`` covers (may be empty)."""
    (ox, oy), (pw, ph) = piece.offset, piece.size
    x0, y0 = max(0, ox), max(0, oy)
    return x0, y0, max(x0, min(size[0], ox + pw)), max(y0, min(size[1], oy + ph))


@dataclass(frozen=True)
class Window:
    """What a piece takes from its source image: the source pixels ``crop`` (x0, y0, x1, y1) resized to
    ``size`` (W, H), whose top-left pixel lands at ``at`` (x, y) on the canvas.

    Only the crop is resized, not the whole image: a mosaic tile shows about a quarter of its image, a
    zoomed-in window 1/zoom^2. The crop starts and ends where source and resized pixels align (every
    m / gcd(m, k) source px for an image of 16m x 9m px resized to 16k x 9k), so its pixels land exactly
    where the whole image's would, and it reaches ``CROP_MARGIN`` px beyond the part shown, so the pixels
    shown read the same neighbours (up to the kernels' float rounding of positions: a level, rarely)."""

    crop: tuple[int, int, int, int]
    size: tuple[int, int]
    at: tuple[int, int]


def piece_window(piece: Piece, image_size: tuple[int, int], canvas: tuple[int, int]) -> Window:
    """The ``Window`` of ``piece`` (its image of ``image_size`` (W, H)) on a canvas of ``canvas`` (W, H);
    the piece must show (``visible_rect`` not empty)."""
    m, k = image_size[0] // 16, piece.size[0] // 16
    x0, y0, x1, y1 = visible_rect(piece, canvas)
    (ox, oy), grid, step = piece.offset, m // gcd(m, k), k // gcd(m, k)
    left, right, width, start_x = _window_axis(x0 - ox, x1 - ox, image_size[0], m, k, grid, step)
    top, bottom, height, start_y = _window_axis(y0 - oy, y1 - oy, image_size[1], m, k, grid, step)
    return Window((left, top, right, bottom), (width, height), (ox + start_x, oy + start_y))


def _window_axis(low: int, high: int, length: int, m: int, k: int, grid: int, step: int) -> tuple[int, int, int, int]:
    """Along one axis, for the resized pixels [low, high) shown: the source range [a, b) on the grid (``grid``
    source px = ``step`` resized px), its resized length, and where it starts among the resized pixels."""
    unit = k * grid  # source px u * m / k, in units of grid px: (u * m) / (k * grid)
    a = max(0, (low * m - CROP_MARGIN * k) // unit) * grid
    b = min(length, -(-(high * m + CROP_MARGIN * k) // unit) * grid)
    return a, b, (b - a) // grid * step, a // grid * step


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


def _area(boxes: np.ndarray) -> np.ndarray:
    return (boxes[:, 2] - boxes[:, 0]) * (boxes[:, 3] - boxes[:, 1])


def place_boxes(boxes: np.ndarray, image_size: tuple[int, int], piece: Piece, canvas: tuple[int, int],
                image_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """xyxy boxes of an image of ``image_size`` (W, H) placed as ``piece`` on a canvas of ``canvas`` (W, H):
    ``(boxes float32 (M, 4), kept row indices int64 (M,), visible share float32 (M,))``. Each box (clipped to
    its image) is scaled and shifted as the pixels are, then clipped to the piece's part of the canvas;
    it is kept if ``MIN_VISIBLE_SHARE`` of its area and ``MIN_BOX_SIDE`` px per side remain."""
    (w, h), (ox, oy) = image_size, piece.offset
    factor = np.float32(resize_factor(image_size, piece.size, image_id))
    moved = np.asarray(boxes, np.float32).reshape(-1, 4).copy()
    np.clip(moved[:, 0::2], 0, w, out=moved[:, 0::2])
    np.clip(moved[:, 1::2], 0, h, out=moved[:, 1::2])
    moved = moved * factor + np.array([ox, oy, ox, oy], np.float32)
    x0, y0, x1, y1 = visible_rect(piece, canvas)
    shown = moved.copy()
    np.clip(shown[:, 0::2], x0, x1, out=shown[:, 0::2])
    np.clip(shown[:, 1::2], y0, y1, out=shown[:, 1::2])
    full = _area(moved)
    share = np.divide(_area(shown), full, out=np.zeros_like(full), where=full > 0)
    keep = np.flatnonzero((shown[:, 2] - shown[:, 0] >= MIN_BOX_SIDE) & (shown[:, 3] - shown[:, 1] >= MIN_BOX_SIDE)
                          & (share >= MIN_VISIBLE_SHARE))
    return shown[keep], keep.astype(np.int64), share[keep]


def layout_targets(samples: list[dict], layout: Layout, size: tuple[int, int], flip: bool) -> tuple[dict, int]:
    """The output of ``layout``: its anchor sample with the boxes, labels, iscrowd and areas of every piece
    (mirrored when ``flip``), its "factor" and "offset" (the anchor piece's); and the boxes dropped."""
    parts, dropped = [], 0
    for piece in layout.pieces + layout.mix:
        sample = samples[piece.source]
        boxes, keep, share = place_boxes(sample["boxes"], (sample["width"], sample["height"]), piece, size,
                                         sample["image_id"])
        parts.append((boxes, sample["labels"][keep], sample["iscrowd"][keep], sample["areas"][keep] * share))
        dropped += len(sample["boxes"]) - len(keep)
    boxes, labels, iscrowd, areas = (np.concatenate(column) for column in zip(*parts))
    if flip:
        boxes[:, [0, 2]] = np.float32(size[0]) - boxes[:, [2, 0]]
    anchor = layout.pieces[0]
    sample = samples[anchor.source]
    factor = resize_factor((sample["width"], sample["height"]), anchor.size, sample["image_id"])
    out = {**sample, "boxes": boxes, "labels": labels, "iscrowd": iscrowd, "areas": areas.astype(np.float32),
           "factor": factor, "offset": anchor.offset}
    return out, dropped


def batch_targets(samples: list[dict], draw: BatchDraw) -> tuple[list[dict], int]:
    """Every output's sample with its targets after ``draw`` (pixels untouched; each sample needs "width"
    and "height"), and the number of boxes dropped."""
    if draw.layouts:
        moved = [layout_targets(samples, layout, draw.size, flip) for layout, flip in zip(draw.layouts, draw.flips)]
    else:
        moved = [augment_targets(sample, draw.size, flip) for sample, flip in zip(samples, draw.flips)]
    return [sample for sample, _ in moved], sum(lost for _, lost in moved)


__all__ = [
    "BatchDraw", "CROP_MARGIN", "ColorDraw", "FILL", "HUE_SHARE", "Layout", "MIN_BOX_SIDE", "MIN_VISIBLE_SHARE",
    "MIX_UNIT", "MOSAIC_CENTRE", "Piece", "StrongAugment", "Window", "augment_targets", "batch_targets", "draw_batch",
    "layout_targets", "piece_window", "place_boxes", "resize_factor", "strong_aug_until_epoch", "strong_augment",
    "train_sizes", "transform_boxes", "visible_rect",
]
