"""A small synthetic COCO dataset that a detector can actually learn (and the ``neoray synth`` command).

Each image has a textured background (a two-colour gradient, faint clutter lines, mild noise) and 0-6
coloured shapes; the class is the *shape* (colour is random), sizes span COCO's small/medium/large
area ranges, and shapes may partly overlap. The ``dense`` layout puts 12-30 small shapes in each image
instead (many small objects, as in traffic or aerial footage: the harder task of the search benchmark).
The ``photo`` layout (neoray.data.synth_photo, whose docstring says why it resembles real data and where
it does not) draws small vehicles and structures seen from above in cluttered, photographed-looking
scenes at 8-64 px, with occlusion, heavy-tailed counts and photometric variation; its validation images
come from "another site" (other palette and textures). Its classes are object kinds, not shapes.
One image in 16 is empty, as in real video. Category ids are
deliberately non-contiguous (1, 3, 7, 8, ...), so the contiguous label mapping downstream is exercised.

Output layout (real COCO, loadable with pycocotools)::

    OUT_DIR/train/000001.jpg ...        OUT_DIR/annotations/instances_train.json
    OUT_DIR/val/000001.jpg ...          OUT_DIR/annotations/instances_val.json

Boxes are tight integer-pixel boxes of the drawn shape; ``area`` is the box area. Every image draws from
its own generator seeded by (seed, split, index), so the same arguments give byte-identical files.
With ``aspect_mix`` every fifth image (index 3 mod 5) is 4:3 and every fifth (index 4 mod 5) is portrait
9:16, so that the letterbox path of ``neoray prepare`` has something to do.

Files are written through ``neoray.storage``: ``OUT_DIR`` may be a URI (``s3://bucket/synth``), and local
files get the umask's permissions, so that teammates can read a shared dataset.

Only numpy and cv2 are imported: ``neoray synth`` does not pay for torch or Ray.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from neoray import storage
from neoray.config import parse_size
from neoray.data import synth_photo

# (id, name): non-contiguous ids on purpose. ``classes=K`` uses the first K.
SHAPES = [
    (1, "rectangle"), (3, "outlined_rectangle"), (7, "ellipse"), (8, "triangle"),
    (11, "cross"), (14, "ring"), (17, "diamond"), (20, "star"),
]
EMPTY_EVERY = 16  # image index 7 mod 16 has no objects
# Shapes may overlap, but at most this share of the smaller one is covered: nothing is hidden.
MAX_COVERED = 0.25


@dataclass(frozen=True)
class Layout:
    """How many objects an image holds and how big they are: a side is drawn log-uniform between
    ``min_side`` and ``max_side`` of the image's short side; no side is below ``floor`` of it (nor 6 px)."""

    min_objects: int
    max_objects: int
    min_side: float
    max_side: float
    floor: float


LAYOUTS = {
    # 1-6 shapes of every COCO size class: small, medium and large.
    "shapes": Layout(1, 6, 0.08, 0.7, 1 / 14),
    # Many small objects, as in aerial, traffic or crowd footage: 12-30 shapes of 4-12% of the short side
    # (7-22 pixels at 320x180, COCO "small"), a harder task for the same detector.
    "dense": Layout(12, 30, 0.04, 0.12, 0.035),
}
PHOTO = "photo"  # drawn by neoray.data.synth_photo
LAYOUT_NAMES = (*LAYOUTS, PHOTO)
DEFAULT_CLASSES = {"shapes": 6, "dense": 6, PHOTO: 1}  # photo: one labelled kind, as the held-out real set
SHAPES_JPEG_QUALITY = 92  # photo: synth_photo draws each image's quality (35-95)


def categories_of(layout: str, classes: int) -> list[tuple[int, str, str]]:
    """(id, name, supercategory) of the layout's first ``classes`` categories."""
    if layout == PHOTO:
        return list(synth_photo.KINDS[:classes])
    return [(cid, name, "shape") for cid, name in SHAPES[:classes]]


def default_classes(layout: str) -> int:
    return DEFAULT_CLASSES[layout]


def _bgr(hue: int, sat: int, val: int) -> tuple[int, int, int]:
    pixel = cv2.cvtColor(np.uint8([[[hue, sat, val]]]), cv2.COLOR_HSV2BGR)[0, 0]
    return tuple(int(c) for c in pixel)


def _background(rng: np.random.Generator, w: int, h: int) -> np.ndarray:
    """Gradient between two muted colours in a random direction, faint lines, mild noise."""
    c0 = np.array(_bgr(int(rng.integers(0, 180)), int(rng.integers(0, 70)), int(rng.integers(50, 200))), np.float32)
    c1 = np.array(_bgr(int(rng.integers(0, 180)), int(rng.integers(0, 70)), int(rng.integers(50, 200))), np.float32)
    angle = rng.uniform(0, 2 * np.pi)
    ys, xs = np.mgrid[0:h, 0:w].astype(np.float32)
    t = xs / w * np.cos(angle) + ys / h * np.sin(angle)
    t = (t - t.min()) / max(float(t.max() - t.min()), 1e-6)
    img = c0 + t[..., None] * (c1 - c0)
    img += rng.normal(0.0, 5.0, size=img.shape).astype(np.float32)
    img = img.clip(0, 255).astype(np.uint8)
    for _ in range(int(rng.integers(0, 4))):  # clutter that is not an object
        p0 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        p1 = (int(rng.integers(0, w)), int(rng.integers(0, h)))
        shade = int(rng.integers(-30, 31))
        colour = tuple(int(np.clip(c + shade, 0, 255)) for c in c0)
        cv2.line(img, p0, p1, colour, 1, cv2.LINE_AA)
    return img


def _draw_shape(img: np.ndarray, name: str, x1: int, y1: int, x2: int, y2: int, colour) -> None:
    """Draw ``name`` filling the pixels x1..x2-1, y1..y2-1 (so the box [x1, y1, x2, y2] is tight)."""
    w, h = x2 - x1, y2 - y1
    r, b = x2 - 1, y2 - 1  # inclusive right/bottom pixel
    cx, cy = (x1 + r) // 2, (y1 + b) // 2
    if name == "rectangle":
        cv2.rectangle(img, (x1, y1), (r, b), colour, -1)
    elif name == "outlined_rectangle":
        t = max(2, min(w, h) // 6)
        inner = img[y1 + t:y2 - t, x1 + t:x2 - t].copy()  # the hole shows what was there before
        cv2.rectangle(img, (x1, y1), (r, b), colour, -1)
        img[y1 + t:y2 - t, x1 + t:x2 - t] = inner
    elif name == "ellipse":
        cv2.ellipse(img, (cx, cy), (max(1, (w - 1) // 2), max(1, (h - 1) // 2)), 0, 0, 360, colour, -1)
    elif name == "triangle":
        cv2.fillPoly(img, [np.int32([(x1, b), (r, b), (cx, y1)])], colour)
    elif name == "cross":
        tx, ty = max(2, w // 3), max(2, h // 3)
        cv2.rectangle(img, (x1, cy - ty // 2), (r, cy + ty // 2), colour, -1)
        cv2.rectangle(img, (cx - tx // 2, y1), (cx + tx // 2, b), colour, -1)
    elif name == "ring":
        t = max(2, min(w, h) // 5)
        axes = (max(1, (w - t) // 2), max(1, (h - t) // 2))
        cv2.ellipse(img, (cx, cy), axes, 0, 0, 360, colour, t)
    elif name == "diamond":
        cv2.fillPoly(img, [np.int32([(cx, y1), (r, cy), (cx, b), (x1, cy)])], colour)
    elif name == "star":
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2 == 0, 1.0, 0.45)
        pts = np.stack([np.cos(angles) * radii, np.sin(angles) * radii], axis=1)
        pts = (pts - pts.min(0)) / (pts.max(0) - pts.min(0))  # fill the box exactly
        pts = pts * [r - x1, b - y1] + [x1, y1]
        cv2.fillPoly(img, [np.round(pts).astype(np.int32)], colour)
    else:  # pragma: no cover - SHAPES and this function are edited together
        raise ValueError(f"unknown shape {name!r}")


def _covered_share(a, b) -> float:
    """Intersection over the smaller box's area (IoU would allow a small box hidden inside a big one)."""
    ix = max(0, min(a[2], b[2]) - max(a[0], b[0]))
    iy = max(0, min(a[3], b[3]) - max(a[1], b[1]))
    smaller = min((a[2] - a[0]) * (a[3] - a[1]), (b[2] - b[0]) * (b[3] - b[1]))
    return ix * iy / smaller if smaller > 0 else 0.0


def _image_size(index: int, size: tuple[int, int], aspect_mix: bool) -> tuple[int, int]:
    w, h = size
    if aspect_mix and index % 5 == 3:
        return round(h * 4 / 3), h  # 4:3, same height
    if aspect_mix and index % 5 == 4:
        return h, w  # portrait 9:16
    return w, h


def _make_image(rng, w: int, h: int, shapes: list[tuple[int, str]], empty: bool, layout: Layout):
    img = _background(rng, w, h)
    boxes: list[tuple[int, int, int, int]] = []
    objects: list[tuple[int, tuple[int, int, int, int]]] = []
    count = 0 if empty else int(rng.integers(layout.min_objects, layout.max_objects + 1))
    min_side = max(6, int(min(w, h) * layout.floor))
    for _ in range(count):
        for _attempt in range(20):
            bh = int(np.exp(rng.uniform(np.log(layout.min_side), np.log(layout.max_side))) * min(w, h))
            bw = int(bh * np.exp(rng.uniform(np.log(0.6), np.log(1.7))))
            bw, bh = int(np.clip(bw, min_side, w * 0.9)), int(np.clip(bh, min_side, h * 0.9))
            x1, y1 = int(rng.integers(0, w - bw + 1)), int(rng.integers(0, h - bh + 1))
            box = (x1, y1, x1 + bw, y1 + bh)
            if all(_covered_share(box, other) <= MAX_COVERED for other in boxes):
                break
        else:
            continue  # no room for one more object; fewer objects is fine
        cat_id, name = shapes[int(rng.integers(0, len(shapes)))]
        colour = _bgr(int(rng.integers(0, 180)), int(rng.integers(150, 256)), int(rng.integers(150, 256)))
        _draw_shape(img, name, *box, colour)
        boxes.append(box)
        objects.append((cat_id, box))
    return img, objects


def _render(rng, w: int, h: int, split: str, categories, empty: bool, layout: str):
    """(image, [(category id, box)], JPEG quality) of one image."""
    if layout == PHOTO:
        scene = synth_photo.render(rng, w, h, synth_photo.SITES[split], len(categories), empty=empty)
        return scene.image, scene.labelled(), scene.jpeg_quality
    shapes = [(cid, name) for cid, name, _super in categories]
    img, objects = _make_image(rng, w, h, shapes, empty=empty, layout=LAYOUTS[layout])
    return img, objects, SHAPES_JPEG_QUALITY


def _write_split(root: str, split: str, split_index: int, count: int, size, categories, seed: int, aspect_mix: bool,
                 layout: str):
    image_dir = storage.join(root, split)
    storage.makedirs(image_dir)
    images, annotations = [], []
    for i in range(count):
        rng = np.random.default_rng([seed, split_index, i])
        w, h = _image_size(i, size, aspect_mix)
        img, objects, quality = _render(rng, w, h, split, categories, (i % EMPTY_EVERY == 7), layout)
        file_name = f"{i + 1:06d}.jpg"
        ok, encoded = cv2.imencode(".jpg", img, [cv2.IMWRITE_JPEG_QUALITY, quality])
        if not ok:  # pragma: no cover - cv2 always encodes a uint8 BGR array
            raise RuntimeError(f"cv2 could not encode {file_name}")
        storage.write_bytes(storage.join(image_dir, file_name), encoded.tobytes())
        images.append({"id": i + 1, "file_name": file_name, "width": w, "height": h})
        for cat_id, (x1, y1, x2, y2) in objects:
            annotations.append({
                "id": len(annotations) + 1, "image_id": i + 1, "category_id": cat_id,
                "bbox": [float(x1), float(y1), float(x2 - x1), float(y2 - y1)],
                "area": float((x2 - x1) * (y2 - y1)), "iscrowd": 0,
            })
    coco = {
        "info": {"description": f"neoray synthetic {'photo' if layout == PHOTO else 'shapes'} ({split}, seed {seed})"},
        "images": images,
        "annotations": annotations,
        "categories": [{"id": cid, "name": name, "supercategory": sup} for cid, name, sup in categories],
    }
    ann_path = storage.join(root, "annotations", f"instances_{split}.json")
    storage.write_bytes(ann_path, json.dumps(coco, indent=1).encode())
    return image_dir, ann_path


def _as_given(path: str):
    """A local path as a ``Path`` (what callers have always got), a URI as a string."""
    return path if storage.is_uri(path) else Path(path)


def write_synthetic_dataset(out_dir, train: int = 256, val: int = 64, size=(320, 180), classes: int | None = None,
                            seed: int = 0, aspect_mix: bool = False, layout: str = "shapes") -> dict:
    """Write the dataset; returns ``{"root", "train_images", "train_annotations", "val_images",
    "val_annotations", "categories"}`` (paths: ``Path`` locally, ``str`` for a URI; and the COCO
    category list). ``classes``: None is the layout's default (``DEFAULT_CLASSES``)."""
    width, height = parse_size(size, "size", require_16_9=False, bounded=True)
    if layout not in LAYOUT_NAMES:
        raise ValueError(f"layout must be one of {', '.join(LAYOUT_NAMES)}, got {layout!r}")
    classes = default_classes(layout) if classes is None else classes
    available = len(synth_photo.KINDS) if layout == PHOTO else len(SHAPES)
    if not 1 <= classes <= available:
        raise ValueError(f"classes must be between 1 and {available} for layout {layout}, got {classes}")
    if train < 0 or val < 0:
        raise ValueError(f"image counts must be >= 0, got train={train} val={val}")
    if min(width, height) < 32:
        raise ValueError(f"size {width}x{height} is too small for shapes (need at least 32 pixels per side)")
    root = os.fspath(out_dir)
    categories = categories_of(layout, classes)
    result: dict = {"root": _as_given(root), "categories": [{"id": c, "name": n} for c, n, _sup in categories]}
    for split_index, (split, count) in enumerate((("train", train), ("val", val))):
        image_dir, ann_path = _write_split(root, split, split_index, count, (width, height), categories, seed,
                                           aspect_mix, layout)
        result[f"{split}_images"], result[f"{split}_annotations"] = _as_given(image_dir), _as_given(ann_path)
    return result


