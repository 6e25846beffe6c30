"""Letterbox geometry: fit an image into a 16:9 canvas with its aspect kept, and move boxes with it.

Coordinates are continuous pixel coordinates: pixel ``i`` covers ``[i, i + 1)``, so a box spanning a
whole 640-pixel-wide image is ``x1=0, x2=640``. The letterbox transform is the affine map

    x_target = x_orig * scale + pad_x        y_target = y_orig * scale + pad_y

with one ``scale`` for both axes and centred padding. Pads are kept as floats (half a pixel when the
leftover space is odd) and ``letterbox_image`` draws the image with exactly this map (sub-pixel
placement through ``cv2.warpAffine``), so pixels and boxes agree and ``boxes_from_letterbox`` undoes
``boxes_to_letterbox`` exactly, up to float rounding. Nothing here rounds to integers except the
intermediate size of the anti-aliasing resize, whose rounding is compensated in the affine map.

Boxes are numpy arrays of shape (N, 4); every function returns a new float64 array unless stated.
"""

from __future__ import annotations

import cv2
import numpy as np

LETTERBOX_FILL = 114  # the grey that YOLO/RT-DETR pipelines pad with


def xywh_to_xyxy(boxes) -> np.ndarray:
    """COCO ``[x, y, w, h]`` -> ``[x1, y1, x2, y2]``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)


def xyxy_to_xywh(boxes) -> np.ndarray:
    """``[x1, y1, x2, y2]`` -> COCO ``[x, y, w, h]``."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([b[:, :2], b[:, 2:] - b[:, :2]], axis=1)


def cxcywh_to_xyxy(boxes) -> np.ndarray:
    """YOLO-style centre boxes ``[cx, cy, w, h]`` -> ``[x1, y1, x2, y2]`` (same units)."""
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    half = b[:, 2:] / 2
    return np.concatenate([b[:, :2] - half, b[:, :2] + half], axis=1)


def xyxy_to_cxcywh(boxes) -> np.ndarray:
    b = np.asarray(boxes, dtype=np.float64).reshape(-1, 4)
    return np.concatenate([(b[:, :2] + b[:, 2:]) / 2, b[:, 2:] - b[:, :2]], axis=1)


def letterbox_params(orig_w: int, orig_h: int, target_w: int, target_h: int) -> tuple[float, float, float]:
    """``(scale, pad_x, pad_y)`` fitting ``orig`` inside ``target`` with the aspect kept, centred.

    The limiting axis gets a pad of exactly 0.0 (not 1e-14) so that 16:9 -> 16:9 is a pure scale.
    """
    if min(orig_w, orig_h, target_w, target_h) <= 0:
        raise ValueError(f"letterbox: sizes must be positive, got {orig_w}x{orig_h} -> {target_w}x{target_h}")
    if target_w * orig_h <= target_h * orig_w:  # width is the limiting axis (integer test: no float ties)
        scale = target_w / orig_w
        return scale, 0.0, (target_h - orig_h * scale) / 2
    scale = target_h / orig_h
    return scale, (target_w - orig_w * scale) / 2, 0.0


def letterbox_image(img: np.ndarray, target_w: int, target_h: int, fill: int = LETTERBOX_FILL) -> np.ndarray:
    """Draw ``img`` (H, W[, C]) into a ``target_w x target_h`` canvas of grey ``fill``, per ``letterbox_params``."""
    h, w = img.shape[:2]
    scale, pad_x, pad_y = letterbox_params(w, h, target_w, target_h)
    src, sx, sy = img, scale, scale
    if scale < 1.0:
        # Shrink with area averaging first: warpAffine's bilinear sampling aliases on big reductions.
        # The integer size rounds; the residual scale (close to 1) below puts every pixel back in place.
        rw, rh = max(1, round(w * scale)), max(1, round(h * scale))
        src = cv2.resize(img, (rw, rh), interpolation=cv2.INTER_AREA)
        sx, sy = scale * w / rw, scale * h / rh
    # cv2 maps pixel *centres* (index i sits at i + 0.5): i' = s*i + pad + (s - 1)/2.
    matrix = np.array([[sx, 0.0, pad_x + (sx - 1) / 2], [0.0, sy, pad_y + (sy - 1) / 2]], dtype=np.float64)
    border = (fill,) * (img.shape[2] if img.ndim == 3 else 1)
    return cv2.warpAffine(src, matrix, (target_w, target_h), flags=cv2.INTER_LINEAR,
                          borderMode=cv2.BORDER_CONSTANT, borderValue=border)


def boxes_to_letterbox(boxes_xyxy, scale: float, pad_x: float, pad_y: float) -> np.ndarray:
    """Original-image xyxy boxes -> letterboxed-image xyxy boxes."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return b * scale + np.array([pad_x, pad_y, pad_x, pad_y])


def boxes_from_letterbox(boxes_xyxy, scale: float, pad_x: float, pad_y: float) -> np.ndarray:
    """Letterboxed-image xyxy boxes -> original-image xyxy boxes: ``(b - pad) / scale``."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return (b - np.array([pad_x, pad_y, pad_x, pad_y])) / scale


def clip_boxes(boxes_xyxy, width: float, height: float) -> np.ndarray:
    """Clip xyxy boxes to ``[0, width] x [0, height]`` (boxes may become empty; callers decide)."""
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4).copy()
    b[:, [0, 2]] = b[:, [0, 2]].clip(0, width)
    b[:, [1, 3]] = b[:, [1, 3]].clip(0, height)
    return b


def box_areas(boxes_xyxy) -> np.ndarray:
    b = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    return (b[:, 2] - b[:, 0]).clip(0) * (b[:, 3] - b[:, 1]).clip(0)


__all__ = [
    "LETTERBOX_FILL", "box_areas", "boxes_from_letterbox", "boxes_to_letterbox", "clip_boxes",
    "cxcywh_to_xyxy", "letterbox_image", "letterbox_params", "xywh_to_xyxy", "xyxy_to_cxcywh", "xyxy_to_xywh",
]
