"""Draw detections on an image with OpenCV: a box per detection, labelled with class name and score."""

from __future__ import annotations

import cv2
import numpy as np

from neoray import storage

# Distinct BGR colours (tab10); class k gets PALETTE[k % len(PALETTE)].
PALETTE = [
    (180, 119, 31), (14, 127, 255), (44, 160, 44), (40, 39, 214), (189, 103, 148),
    (75, 86, 140), (194, 119, 227), (127, 127, 127), (34, 189, 188), (207, 190, 23),
]


def draw_detections(image_bgr: np.ndarray, boxes_xyxy, labels, scores, class_names: list[str]) -> np.ndarray:
    """A copy of ``image_bgr`` with each box drawn; boxes are xyxy in this image's pixels."""
    canvas = image_bgr.copy()
    height, width = canvas.shape[:2]
    # Line and text sizes follow the image size, so that 4K frames and thumbnails both stay readable.
    thickness = max(1, round(min(width, height) / 300))
    font_scale = max(0.35, min(width, height) / 900)
    boxes = np.asarray(boxes_xyxy, dtype=np.float64).reshape(-1, 4)
    order = np.argsort(np.asarray(scores, dtype=np.float64))  # highest score drawn last, on top
    for i in order:
        label = int(labels[i])
        colour = PALETTE[label % len(PALETTE)]
        x1, y1, x2, y2 = (int(round(v)) for v in boxes[i])
        cv2.rectangle(canvas, (x1, y1), (x2, y2), colour, thickness)  # crisp edges, exact colour
        name = class_names[label] if 0 <= label < len(class_names) else f"class {label}"
        text = f"{name} {float(scores[i]):.2f}"
        (tw, th), baseline = cv2.getTextSize(text, cv2.FONT_HERSHEY_SIMPLEX, font_scale, 1)
        ty = y1 - 2 if y1 - th - baseline - 2 >= 0 else min(height - 1, y1 + th + baseline + 2)  # inside if no room
        cv2.rectangle(canvas, (x1, ty - th - baseline), (x1 + tw + 2, ty + baseline // 2), colour, cv2.FILLED)
        cv2.putText(canvas, text, (x1 + 1, ty - baseline // 2), cv2.FONT_HERSHEY_SIMPLEX, font_scale,
                    (255, 255, 255), 1, cv2.LINE_AA)
    return canvas


def write_image_atomic(path: str, image_bgr: np.ndarray) -> None:
    """Encode by the file's extension and write it atomically, to any storage."""
    suffix = "." + storage.basename(path).rsplit(".", 1)[-1] if "." in storage.basename(path) else ".png"
    ok, encoded = cv2.imencode(suffix, image_bgr)
    if not ok:
        raise ValueError(f"{path}: OpenCV could not encode the image as {suffix}")
    storage.write_bytes(path, encoded.tobytes())


__all__ = ["PALETTE", "draw_detections", "write_image_atomic"]
