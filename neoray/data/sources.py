"""COCO and YOLO readers: validate a source dataset into per-image records plus a list of problems.

Reading happens in two stages, and this module is the first: everything that can be checked without
opening an image (file structure, ids, categories, bbox numbers, unsafe file names). The second stage,
in ``neoray.data.prepare``'s workers, opens each image and checks what needs its real size (missing or
unreadable files, size mismatches, boxes outside the image).

Two kinds of bad input:

* a broken annotation file (not JSON/YAML, a required key missing, a wrong type) raises ``SourceError``
  with one line naming the file, the record and the key: nothing sensible can be written from it;
* a bad record (duplicate id, unknown category, degenerate bbox, unsafe file name, bad YOLO label line)
  is skipped and becomes a ``Problem``, counted by reason. Nothing is dropped without a count. A bad
  value that the real data can replace is replaced and reported instead: a declared image width/height
  that is not a positive integer (the decoded size is used, as for a mismatch), an ``area`` that is not a
  positive number (the box area is used). An ``iscrowd`` other than 0/1 (or false/true) drops its
  annotation: guessing would either turn an ignore region into a target or hide a real object.

Images whose file name is absolute or climbs out of the image root (``..``) are refused here, before
anything is opened. Symlinks inside the image root are followed on purpose (DVC and many dataset
mirrors are trees of symlinks), so the check is on the name, not on the resolved path.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

import yaml

# Problem reasons: fixed strings, so that reports can be grouped and tests can look for them.
UNSAFE_FILE_NAME = "unsafe file name"
DUPLICATE_IMAGE_ID = "duplicate image id"
IMAGE_MISSING = "image file missing"
IMAGE_UNREADABLE = "image unreadable"
IMAGE_TRUNCATED = "image truncated"
IMAGE_SIZE_MISMATCH = "image size differs from annotation"
IMAGE_SIZE_INVALID = "declared image size invalid"
UNSUPPORTED_FILE = "unsupported file type"
LABEL_FILE_UNREADABLE = "label file unreadable"
LABEL_WITHOUT_IMAGE = "label file without image"
IMAGE_SKIPPED = "image skipped"  # an annotation of an image that was skipped for its own reason
UNKNOWN_IMAGE_ID = "unknown image id"
UNKNOWN_CATEGORY = "unknown category id"
DUPLICATE_ANNOTATION_ID = "duplicate annotation id"
BBOX_MALFORMED = "bbox malformed"
BBOX_NOT_FINITE = "bbox not finite"
BBOX_NON_POSITIVE = "bbox non-positive size"
BBOX_OUTSIDE = "bbox outside image"
BBOX_CLIPPED = "bbox partly outside image"
AREA_INVALID = "area not a positive number"
ISCROWD_INVALID = "iscrowd not 0 or 1"
LABEL_FIELD_COUNT = "label line wrong field count"
LABEL_NON_NUMERIC = "label line non-numeric"
CLASS_OUT_OF_RANGE = "class index out of range"

# Actions taken for a problem.
SKIP_IMAGE = "image skipped"
DROP_ANNOTATION = "annotation dropped"
CLIP_BOX = "box clipped"
USE_REAL_SIZE = "used the real image size"
USE_BOX_AREA = "used the box area"
IGNORED = "ignored"

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}


class SourceError(ValueError):
    """An annotation file that cannot be used at all; the message is one line naming file and key."""


@dataclass
class Problem:
    reason: str
    action: str
    file_name: str | None = None
    image_id: int | None = None
    annotation_id: int | None = None
    detail: str = ""

    def to_dict(self) -> dict:
        out = {"file_name": self.file_name, "image_id": self.image_id, "annotation_id": self.annotation_id,
               "reason": self.reason, "action": self.action}
        if self.detail:
            out["detail"] = self.detail
        return out


@dataclass
class Annotation:
    ann_id: int
    category_id: int  # source id: the COCO category id, or the YOLO class index
    bbox: list[float]  # COCO: [x, y, w, h] in pixels; YOLO: [cx, cy, w, h] normalised to [0, 1]
    normalized: bool = False
    area: float | None = None  # COCO `area` in original pixels, when given
    iscrowd: bool = False


@dataclass
class ImageRecord:
    image_id: int
    file_name: str  # relative to the image root
    width: int | None  # as declared by the annotation file (None: not declared, as in YOLO)
    height: int | None
    annotations: list[Annotation] = field(default_factory=list)


@dataclass
class Source:
    """A validated source: records that passed the first stage, sorted by image id, and what did not."""

    kind: str  # "coco" | "yolo"
    description: dict  # where it came from (paths as given), recorded in the manifest's options
    image_root: Path
    categories: list[dict]  # [{"id", "name", "label"}] sorted by id; label = position
    images: list[ImageRecord]
    images_in: int
    annotations_in: int
    problems: list[Problem] = field(default_factory=list)
    skipped_images: Counter = field(default_factory=Counter)
    skipped_annotations: Counter = field(default_factory=Counter)

    def skip_image(self, reason: str, file_name=None, image_id=None, detail="") -> None:
        self.problems.append(Problem(reason, SKIP_IMAGE, file_name, image_id, None, detail))
        self.skipped_images[reason] += 1

    def drop_annotation(self, reason: str, ann_id, file_name=None, image_id=None, detail="") -> None:
        self.problems.append(Problem(reason, DROP_ANNOTATION, file_name, image_id, ann_id, detail))
        self.skipped_annotations[reason] += 1


def is_unsafe_file_name(name: str) -> bool:
    """True for names that are empty, absolute (POSIX or Windows) or contain a ``..`` component."""
    if not name or "\x00" in name:
        return True
    posix = PurePosixPath(name.replace("\\", "/"))
    return posix.is_absolute() or bool(PureWindowsPath(name).drive) or ".." in posix.parts


def bbox_problem(values) -> str | None:
    """The reason a 4-number bbox (x, y, w, h or cx, cy, w, h) is unusable before the image is known."""
    if not isinstance(values, (list, tuple)) or len(values) != 4:
        return BBOX_MALFORMED
    if any(isinstance(v, bool) or not isinstance(v, (int, float)) for v in values):
        return BBOX_MALFORMED
    if not all(math.isfinite(v) for v in values):
        return BBOX_NOT_FINITE
    if values[2] <= 0 or values[3] <= 0:
        return BBOX_NON_POSITIVE
    return None


def make_categories(id_to_name: dict[int, str]) -> list[dict]:
    """Contiguous labels: label = index of the category in the categories sorted by id."""
    return [{"id": cid, "name": id_to_name[cid], "label": label} for label, cid in enumerate(sorted(id_to_name))]


# ----------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _require(path: Path, where: str, record, key: str, check, expected: str, optional: bool = False):
    if not isinstance(record, dict):
        raise SourceError(f"{path}: {where}: expected an object, got {type(record).__name__}")
    if key not in record or (optional and record[key] is None):
        if optional:
            return None
        raise SourceError(f"{path}: {where}: missing required key '{key}'")
    value = record[key]
    if not check(value):
        raise SourceError(f"{path}: {where}: '{key}' must be {expected}, got {value!r}"[:300])
    return value


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require_image_root(image_root: Path, what: str) -> None:
    """A missing image folder is a wrong argument, not N missing images: one line, exit 1."""
    if not image_root.is_dir():
        state = "is not a directory" if image_root.exists() else "not found"
        raise SourceError(f"{image_root}: {what} {state}")


def _declared_size(img: dict, where: str) -> tuple[int | None, int | None, str]:
    """(width, height, "") as declared, or (None, None, why) when either is present but not a positive
    integer: the image is then read with its real size, like one whose annotation declares none."""
    width, height = img.get("width"), img.get("height")
    for key, value in (("width", width), ("height", height)):
        if value is not None and not (_is_int(value) and value > 0):
            return None, None, f"{where}: '{key}' {value!r} is not a positive integer"[:200]
    if (width is None) != (height is None):  # one side alone cannot be compared with the file
        return None, None, f"{where}: only one of 'width'/'height' is declared"
    return width, height, ""


def _load_coco_json(path: Path) -> dict:
    try:
        data = json.loads(path.read_bytes())
    except FileNotFoundError:
        raise SourceError(f"{path}: annotation file not found") from None
    except IsADirectoryError:
        raise SourceError(f"{path}: is a directory, expected a COCO annotation JSON file") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object with images/annotations/categories at the top level")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise SourceError(f"{path}: missing required key '{key}'")
        if not isinstance(data[key], list):
            raise SourceError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def read_coco(ann_json, image_dir) -> Source:
    """Read and validate a COCO detection annotation file whose ``file_name``s are relative to ``image_dir``."""
    path = Path(ann_json)
    _require_image_root(Path(image_dir), "image folder (--images)")
    data = _load_coco_json(path)

    id_to_name: dict[int, str] = {}
    for i, cat in enumerate(data["categories"]):
        cid = _require(path, f"categories[{i}]", cat, "id", _is_int, "an integer")
        name = _require(path, f"categories[{i}]", cat, "name", lambda v: isinstance(v, str), "a string")
        if cid in id_to_name:
            raise SourceError(f"{path}: categories[{i}]: duplicate category id {cid}")
        id_to_name[cid] = name

    source = Source("coco", {"annotations": str(path), "images": str(image_dir)}, Path(image_dir),
                    make_categories(id_to_name), [], len(data["images"]), len(data["annotations"]))
    by_id: dict[int, ImageRecord] = {}
    refused_ids: set[int] = set()  # images skipped here; their annotations count as "image skipped"
    for i, img in enumerate(data["images"]):
        where = f"images[{i}]"
        image_id = _require(path, where, img, "id", _is_int, "an integer")
        file_name = _require(path, where, img, "file_name", lambda v: isinstance(v, str), "a string")
        if image_id in by_id or image_id in refused_ids:
            source.skip_image(DUPLICATE_IMAGE_ID, file_name, image_id, f"{where} repeats id {image_id}")
        elif is_unsafe_file_name(file_name):
            source.skip_image(UNSAFE_FILE_NAME, file_name, image_id, "absolute or outside the image root; not read")
            refused_ids.add(image_id)
        else:
            width, height, bad_size = _declared_size(img, where)
            if bad_size:
                source.problems.append(Problem(IMAGE_SIZE_INVALID, USE_REAL_SIZE, file_name, image_id, None, bad_size))
            by_id[image_id] = ImageRecord(image_id, file_name, width, height)

    seen_ann_ids: set[int] = set()
    for i, ann in enumerate(data["annotations"]):
        where = f"annotations[{i}]"
        ann_id = _require(path, where, ann, "id", _is_int, "an integer")
        image_id = _require(path, where, ann, "image_id", _is_int, "an integer")
        category_id = _require(path, where, ann, "category_id", _is_int, "an integer")
        if "bbox" not in ann:
            raise SourceError(f"{path}: {where}: missing required key 'bbox'")
        area = ann.get("area")
        iscrowd = 0 if ann.get("iscrowd") is None else ann["iscrowd"]  # absent or null: not a crowd
        record = by_id.get(image_id)
        file_name = record.file_name if record else None
        if ann_id in seen_ann_ids:
            source.drop_annotation(DUPLICATE_ANNOTATION_ID, ann_id, file_name, image_id)
            continue
        seen_ann_ids.add(ann_id)
        if record is None:
            if image_id in refused_ids:
                source.skipped_annotations[IMAGE_SKIPPED] += 1  # reported once, with the image
            else:
                source.drop_annotation(UNKNOWN_IMAGE_ID, ann_id, None, image_id)
            continue
        if category_id not in id_to_name:
            source.drop_annotation(UNKNOWN_CATEGORY, ann_id, file_name, image_id, f"category_id {category_id}")
            continue
        reason = bbox_problem(ann["bbox"])
        if reason:
            source.drop_annotation(reason, ann_id, file_name, image_id, f"bbox {ann['bbox']!r}"[:200])
            continue
        # 0/1 or false/true (== 0/1 in Python); anything else has no agreed meaning (see the docstring).
        if iscrowd not in (0, 1):
            source.drop_annotation(ISCROWD_INVALID, ann_id, file_name, image_id, f"iscrowd {iscrowd!r}"[:200])
            continue
        area_value = float(area) if _is_number(area) and math.isfinite(area) and area > 0 else None
        if area is not None and area_value is None:
            source.problems.append(Problem(AREA_INVALID, USE_BOX_AREA, file_name, image_id, ann_id,
                                           f"area {area!r}"[:200]))
        record.annotations.append(Annotation(ann_id, category_id, [float(v) for v in ann["bbox"]], False,
                                             area_value, bool(iscrowd)))
    source.images = sorted(by_id.values(), key=lambda r: r.image_id)
    return source


# ----------------------------------------------------------------------------------------------------
# YOLO (Ultralytics layout)
# ----------------------------------------------------------------------------------------------------


def _find_data_yaml(data_dir: Path) -> Path:
    if data_dir.is_file():
        return data_dir
    if not data_dir.is_dir():
        raise SourceError(f"{data_dir}: YOLO dataset directory not found")
    if (data_dir / "data.yaml").is_file():
        return data_dir / "data.yaml"
    candidates = sorted(p for p in data_dir.iterdir() if p.suffix in (".yaml", ".yml") and p.is_file())
    if len(candidates) != 1:
        found = ", ".join(p.name for p in candidates) or "none"
        raise SourceError(f"{data_dir}: expected data.yaml or exactly one .yaml file, found {found}")
    return candidates[0]


def _yolo_names(yaml_path: Path, names) -> dict[int, str]:
    if isinstance(names, list) and all(isinstance(n, str) for n in names):
        return dict(enumerate(names))
    if isinstance(names, dict) and all(_is_int(k) and isinstance(v, str) for k, v in names.items()):
        return dict(names)
    raise SourceError(f"{yaml_path}: 'names' must be a list of names or a mapping {{index: name}}, got {names!r}"[:300])


def label_path_for(image_path: Path) -> Path:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    text = str(image_path)
    images, labels = f"{os.sep}images{os.sep}", f"{os.sep}labels{os.sep}"
    if images in text:
        text = labels.join(text.rsplit(images, 1))
    return Path(text).with_suffix(".txt")


def _parse_label_file(source: Source, record: ImageRecord, label_path: Path, names: dict[int, str],
                      next_ann_id: int) -> int:
    """Append the valid lines of one label file to ``record``; returns the next annotation id."""
    try:
        lines = label_path.read_text().splitlines()
    except FileNotFoundError:
        return next_ann_id  # no label file: an image with no objects (Ultralytics' convention)
    except (OSError, UnicodeDecodeError) as exc:
        source.skip_image(LABEL_FILE_UNREADABLE, record.file_name, record.image_id, str(exc)[:200])
        record.annotations = None  # type: ignore[assignment]  (marks the record as skipped)
        return next_ann_id
    for line_no, line in enumerate(lines, 1):
        fields = line.split()
        if not fields:
            continue
        ann_id, next_ann_id = next_ann_id, next_ann_id + 1
        source.annotations_in += 1
        detail = f"{label_path.name}:{line_no}: {line.strip()!r}"[:200]
        if len(fields) != 5:
            source.drop_annotation(LABEL_FIELD_COUNT, ann_id, record.file_name, record.image_id, detail)
            continue
        try:
            values = [float(v) for v in fields]
        except ValueError:
            source.drop_annotation(LABEL_NON_NUMERIC, ann_id, record.file_name, record.image_id, detail)
            continue
        cls = values[0]
        if not (math.isfinite(cls) and cls.is_integer() and int(cls) in names):
            source.drop_annotation(CLASS_OUT_OF_RANGE, ann_id, record.file_name, record.image_id, detail)
            continue
        reason = bbox_problem(values[1:])
        if reason:
            source.drop_annotation(reason, ann_id, record.file_name, record.image_id, detail)
            continue
        record.annotations.append(Annotation(ann_id, int(cls), values[1:], True))
    return next_ann_id


def read_yolo(data_dir, split: str = "train") -> Source:
    """Read an Ultralytics dataset: ``data.yaml`` with ``names`` and ``train``/``val`` image directories,
    ``images/<split>/*.jpg`` and ``labels/<split>/*.txt`` (``class cx cy w h`` normalised per line).

    Image ids are positions in the sorted list of image paths; annotation ids count label lines from 1
    in that same order, so both are stable across runs.
    """
    if split not in ("train", "val"):
        raise SourceError(f"--split must be train or val, got {split!r}")
    yaml_path = _find_data_yaml(Path(data_dir))
    try:
        spec = yaml.safe_load(yaml_path.read_text())
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SourceError(f"{yaml_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    if not isinstance(spec, dict):
        raise SourceError(f"{yaml_path}: expected a mapping with 'names' and '{split}'")
    for key in ("names", split):
        if key not in spec:
            raise SourceError(f"{yaml_path}: missing required key '{key}'")
    names = _yolo_names(yaml_path, spec["names"])
    base = yaml_path.parent
    if isinstance(spec.get("path"), str) and (base / spec["path"]).is_dir():
        base = base / spec["path"]  # relative `path:` resolved against the yaml's folder
    if not isinstance(spec[split], str):
        raise SourceError(f"{yaml_path}: '{split}' must be one image directory, got {spec[split]!r}"[:300])
    image_root = base / spec[split]
    if not image_root.is_dir():
        raise SourceError(f"{yaml_path}: '{split}': image directory {spec[split]!r} not found under {base}")

    files = sorted(p for p in image_root.rglob("*") if p.is_file())
    source = Source("yolo", {"data": str(yaml_path), "split": split, "images": str(image_root)}, image_root,
                    make_categories(names), [], len(files), 0)
    next_ann_id, image_index, used_labels = 1, 0, set()
    for path in files:
        file_name = path.relative_to(image_root).as_posix()
        if path.suffix.lower() not in IMAGE_EXTENSIONS:
            source.skip_image(UNSUPPORTED_FILE, file_name, None, f"extension {path.suffix!r} is not an image")
            continue
        record = ImageRecord(image_index, file_name, None, None)
        image_index += 1
        label_path = label_path_for(path)
        used_labels.add(label_path)
        next_ann_id = _parse_label_file(source, record, label_path, names, next_ann_id)
        if record.annotations is not None:
            source.images.append(record)

    label_root = label_path_for(image_root / "x.jpg").parent
    if label_root != image_root and label_root.is_dir():
        for orphan in sorted(set(label_root.rglob("*.txt")) - used_labels):
            source.problems.append(Problem(LABEL_WITHOUT_IMAGE, IGNORED, orphan.relative_to(label_root).as_posix()))
    return source


__all__ = [
    "Annotation", "ImageRecord", "Problem", "Source", "SourceError", "bbox_problem", "is_unsafe_file_name",
    "label_path_for", "make_categories", "read_coco", "read_yolo",
]
