"""COCO and YOLO readers: validate a source dataset into per-image records plus a list of problems.

Reading happens in two stages, and this module is the first: everything that can be checked without
opening an image (file structure, ids, categories, bbox numbers, unsafe file names). The second stage,
in ``neoray.data.prepare``'s workers, opens each image and checks what needs its real size (missing,
unreadable or oversized files, size mismatches, boxes outside the image).

Every path goes through ``neoray.storage``: the annotation file, the image root and the YOLO layout may
be local, on a shared mount, or URIs (``s3://...``). Roots are made absolute here, on the driver, so
that workers on other nodes (whose working directory differs) open the same files.

Three kinds of bad input:

* a broken annotation file (not JSON/YAML, a required key missing, a wrong type) raises ``SourceError``
  with one line naming the file, the record and the key: nothing sensible can be written from it;
* a bad record (duplicate id, an id that does not fit in int64, unknown category, degenerate bbox,
  unsafe file name, a file name that is not UTF-8, bad YOLO label line) is skipped and becomes a
  ``Problem``, counted by reason.
  Nothing is dropped without a count. A bad value that the real data can replace is replaced and
  reported instead: a declared image width/height that is not a positive integer (the decoded size is
  used, as for a mismatch), an ``area`` that is not a positive number (the box area is used). An
  ``iscrowd`` other than 0/1 (or false/true) drops its annotation: guessing would either turn an ignore
  region into a target or hide a real object;
* something legal but suspicious is a warning: a ``Problem`` whose action is ``KEPT`` (two categories
  with one name, one file under two image ids, a YOLO split without a single label file, a box thinner
  than a pixel after letterboxing). Warnings never skip anything; the manifest counts them.

Images whose file name is absolute or climbs out of the image root (``..``) are refused here, before
anything is opened; so are names that are not valid UTF-8 (a YOLO file whose name is other bytes, a COCO
``file_name`` with a lone surrogate escape such as ``\\udcff``): pyarrow cannot address them and Parquet
cannot store them. Reports show such a name with the odd bytes escaped (``bad\\xff.jpg``). A name that
is valid text (a newline included) is read and written as it is. Symlinks inside the image root are
followed where they lead to a regular file (DVC and many dataset mirrors are trees of symlinks), so the
check is on the name, not on the resolved path; a link to a device or a FIFO is never read. YOLO's
listing does not enter symlinked directories.

Orientation: YOLO labels are in the displayed frame (EXIF orientation applied, as Ultralytics reads
images), so YOLO images are decoded with their EXIF orientation. COCO boxes are in the frame whose size
the annotation declares, which annotation tools take from the stored pixels, so COCO images are decoded
ignoring EXIF; a declared size that only matches the rotated frame is reported as a size mismatch.
"""

from __future__ import annotations

import json
import math
import os
import posixpath
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import PurePosixPath, PureWindowsPath

import yaml

from neoray import storage
from neoray.config import brief

# Problem reasons: fixed strings, so that reports can be grouped and tests can look for them.
UNSAFE_FILE_NAME = "unsafe file name"
FILE_NAME_NOT_UTF8 = "file name not valid UTF-8"
DUPLICATE_IMAGE_ID = "duplicate image id"
ID_OUT_OF_RANGE = "id does not fit in int64"
IMAGE_MISSING = "image file missing"
IMAGE_NOT_REGULAR = "not a regular file"
IMAGE_TOO_LARGE = "image file too large"
IMAGE_TOO_MANY_PIXELS = "image has too many pixels"
IMAGE_UNREADABLE = "image unreadable"
IMAGE_TRUNCATED = "image truncated"
IMAGE_SIZE_MISMATCH = "image size differs from annotation"
IMAGE_SIZE_INVALID = "declared image size invalid"
UNSUPPORTED_FILE = "unsupported file type"
LABEL_FILE_UNREADABLE = "label file unreadable"
LABEL_WITHOUT_IMAGE = "label file without image"
NO_LABEL_FILES = "no label files"
IMAGE_SKIPPED = "image skipped"  # an annotation of an image that was skipped for its own reason
UNKNOWN_IMAGE_ID = "unknown image id"
UNKNOWN_CATEGORY = "unknown category id"
DUPLICATE_ANNOTATION_ID = "duplicate annotation id"
DUPLICATE_CATEGORY_NAME = "duplicate category name"
DUPLICATE_FILE_NAME = "file under several image ids"
BBOX_MALFORMED = "bbox malformed"
BBOX_NOT_FINITE = "bbox not finite"
BBOX_NON_POSITIVE = "bbox non-positive size"
BBOX_OUTSIDE = "bbox outside image"
BBOX_CLIPPED = "bbox partly outside image"
BBOX_SUBPIXEL = "box thinner than a pixel after letterboxing"
AREA_INVALID = "area not a positive number"
ISCROWD_INVALID = "iscrowd not 0 or 1"
LABEL_FIELD_COUNT = "label line wrong field count"
LABEL_NON_NUMERIC = "label line non-numeric"
CLASS_OUT_OF_RANGE = "class index out of range"

# Actions taken for a problem.
SKIP_IMAGE = "image skipped"
DROP_ANNOTATION = "annotation dropped"
SKIP_CATEGORY = "category skipped"
CLIP_BOX = "box clipped"
USE_REAL_SIZE = "used the real image size"
USE_BOX_AREA = "used the box area"
IGNORED = "ignored"
KEPT = "kept"  # a warning: the record is written as it is
SKIP_ACTIONS = (SKIP_IMAGE, DROP_ANNOTATION, SKIP_CATEGORY)  # every other action is a warning

IMAGE_EXTENSIONS = {".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff"}
INT64_MIN, INT64_MAX = -(1 << 63), (1 << 63) - 1  # Parquet's image_id and ann_ids columns
LABEL_MAX_BYTES = 16 << 20  # a YOLO label file is a few lines; more is not a label file
LABEL_READ_THREADS = 16  # label files are tiny: on object storage the round trips dominate


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
        """The report entry; text is made valid UTF-8 (a name that is not is shown escaped)."""
        file_name = None if self.file_name is None else storage.printable(self.file_name)
        out = {"file_name": file_name, "image_id": self.image_id, "annotation_id": self.annotation_id,
               "reason": self.reason, "action": self.action}
        if self.detail:
            out["detail"] = storage.printable(self.detail)
        return out


def is_warning(entry: dict) -> bool:
    """A report entry that kept its record (see the module docstring); the rest skipped something."""
    return entry["action"] not in SKIP_ACTIONS


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
    file_name: str  # relative to the image root, "/"-separated
    width: int | None  # as declared by the annotation file (None: not declared, as in YOLO)
    height: int | None
    annotations: list[Annotation] = field(default_factory=list)


@dataclass
class Source:
    """A validated source: records that passed the first stage, sorted by image id, and what did not."""

    kind: str  # "coco" | "yolo"
    description: dict  # where it came from, recorded in the manifest's options
    image_root: str  # absolute path or URI
    categories: list[dict]  # [{"id", "name", "label"}] sorted by id; label = position
    images: list[ImageRecord]
    images_in: int
    annotations_in: int
    problems: list[Problem] = field(default_factory=list)
    skipped_images: Counter = field(default_factory=Counter)
    skipped_annotations: Counter = field(default_factory=Counter)
    skipped_categories: Counter = field(default_factory=Counter)
    images_without_label_file: int = 0  # YOLO: background images (no label file, no objects)

    @property
    def apply_exif_orientation(self) -> bool:
        return self.kind == "yolo"  # see the module docstring

    def skip_image(self, reason: str, file_name=None, image_id=None, detail="") -> None:
        self.problems.append(Problem(reason, SKIP_IMAGE, file_name, image_id, None, detail))
        self.skipped_images[reason] += 1

    def drop_annotation(self, reason: str, ann_id, file_name=None, image_id=None, detail="") -> None:
        self.problems.append(Problem(reason, DROP_ANNOTATION, file_name, image_id, ann_id, detail))
        self.skipped_annotations[reason] += 1

    def skip_category(self, reason: str, detail: str) -> None:
        self.problems.append(Problem(reason, SKIP_CATEGORY, detail=detail))
        self.skipped_categories[reason] += 1

    def warn(self, reason: str, file_name=None, image_id=None, ann_id=None, detail="") -> None:
        self.problems.append(Problem(reason, KEPT, file_name, image_id, ann_id, detail))


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


def _warn_duplicate_names(source: Source, id_to_name: dict[int, str]) -> None:
    """Two ids with one name are two classes to the model but one to a reader of the results."""
    first: dict[str, int] = {}
    for cid in sorted(id_to_name):
        name = id_to_name[cid]
        if name in first:
            source.warn(DUPLICATE_CATEGORY_NAME, detail=f"categories {first[name]} and {cid} are both named "
                                                        f"{brief(name)}; kept as two classes"[:300])
        else:
            first[name] = cid


def _info(path: str) -> storage.FileInfo:
    try:
        return storage.info(path)
    except storage.StorageError as exc:
        raise SourceError(str(exc)) from None


def _require_image_root(image_root: str, what: str) -> None:
    """A missing image folder is a wrong argument, not N missing images: one line, exit 1."""
    kind = _info(image_root).kind
    if kind != "dir":
        found = "not found" if kind == "missing" else f"is {storage.describe(image_root)}, not a directory"
        raise SourceError(f"{image_root}: {what} {found}")


# ----------------------------------------------------------------------------------------------------
# COCO
# ----------------------------------------------------------------------------------------------------


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _fits_int64(value: int) -> bool:
    return INT64_MIN <= value <= INT64_MAX


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _require(path: str, where: str, record, key: str, check, expected: str, optional: bool = False):
    if not isinstance(record, dict):
        raise SourceError(f"{path}: {where}: expected an object, got {type(record).__name__}")
    if key not in record or (optional and record[key] is None):
        if optional:
            return None
        raise SourceError(f"{path}: {where}: missing required key '{key}'")
    value = record[key]
    if not check(value):
        raise SourceError(f"{path}: {where}: '{key}' must be {expected}, got {brief(value)}")
    return value


def _declared_size(img: dict, where: str) -> tuple[int | None, int | None, str]:
    """(width, height, "") as declared, or (None, None, why) when either is present but not a positive
    integer: the image is then read with its real size, like one whose annotation declares none."""
    width, height = img.get("width"), img.get("height")
    for key, value in (("width", width), ("height", height)):
        if value is not None and not (_is_int(value) and value > 0):
            return None, None, f"{where}: '{key}' {brief(value)} is not a positive integer"
    if (width is None) != (height is None):  # one side alone cannot be compared with the file
        return None, None, f"{where}: only one of 'width'/'height' is declared"
    return width, height, ""


def _load_coco_json(path: str) -> dict:
    kind = _info(path).kind
    if kind == "missing":
        raise SourceError(f"{path}: annotation file not found")
    if kind == "dir":
        raise SourceError(f"{path}: is a directory, expected a COCO annotation JSON file")
    try:
        data = json.loads(storage.read_bytes(path))
    except FileNotFoundError:
        raise SourceError(f"{path}: annotation file not found") from None
    except storage.StorageError as exc:
        raise SourceError(str(exc)) from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise SourceError(f"{path}: not valid JSON ({exc})") from None
    except RecursionError:  # Python's parser recurses once per level
        raise SourceError(f"{path}: not valid JSON (nested too deeply to parse)") from None
    if not isinstance(data, dict):
        raise SourceError(f"{path}: expected a JSON object with images/annotations/categories at the top level")
    for key in ("images", "annotations", "categories"):
        if key not in data:
            raise SourceError(f"{path}: missing required key '{key}'")
        if not isinstance(data[key], list):
            raise SourceError(f"{path}: '{key}' must be a list, got {type(data[key]).__name__}")
    return data


def _normalized_name(file_name: str) -> str:
    return posixpath.normpath(file_name.replace("\\", "/"))


class _CocoReader:
    """One pass over categories, images and annotations, filling ``source``."""

    def __init__(self, path: str, data: dict, source: Source):
        self.path, self.data, self.source = path, data, source
        self.id_to_name: dict[int, str] = {}
        self.by_id: dict[int, ImageRecord] = {}
        self.refused_ids: set[int] = set()  # images skipped here; their annotations count as "image skipped"
        self.seen_ann_ids: set[int] = set()

    def categories(self) -> None:
        for i, cat in enumerate(self.data["categories"]):
            where = f"categories[{i}]"
            cid = _require(self.path, where, cat, "id", _is_int, "an integer")
            name = _require(self.path, where, cat, "name", lambda v: isinstance(v, str) and storage.is_utf8(v),
                            "a string of valid Unicode text")
            if cid in self.id_to_name:
                raise SourceError(f"{self.path}: {where}: duplicate category id {cid}")
            if not _fits_int64(cid):
                self.source.skip_category(ID_OUT_OF_RANGE, f"{where}: 'id' {cid} does not fit in int64")
                continue
            self.id_to_name[cid] = name
        self.source.categories = make_categories(self.id_to_name)
        _warn_duplicate_names(self.source, self.id_to_name)

    def images(self) -> None:
        by_name: dict[str, int] = {}
        for i, img in enumerate(self.data["images"]):
            where = f"images[{i}]"
            image_id = _require(self.path, where, img, "id", _is_int, "an integer")
            file_name = _require(self.path, where, img, "file_name", lambda v: isinstance(v, str), "a string")
            if image_id in self.by_id or image_id in self.refused_ids:
                self.source.skip_image(DUPLICATE_IMAGE_ID, file_name, image_id, f"{where} repeats id {image_id}")
            elif not _fits_int64(image_id):
                self.source.skip_image(ID_OUT_OF_RANGE, file_name, image_id, f"{where}: 'id' does not fit in int64")
                self.refused_ids.add(image_id)
            elif is_unsafe_file_name(file_name):
                self.source.skip_image(UNSAFE_FILE_NAME, file_name, image_id,
                                       "absolute or outside the image root; not read")
                self.refused_ids.add(image_id)
            elif not storage.is_utf8(file_name):
                self.source.skip_image(FILE_NAME_NOT_UTF8, storage.printable(file_name, on_disk=False), image_id,
                                       f"{where}: 'file_name' holds a lone surrogate escape; not read")
                self.refused_ids.add(image_id)
            else:
                self._add_image(img, where, image_id, file_name, by_name)

    def _add_image(self, img: dict, where: str, image_id: int, file_name: str, by_name: dict[str, int]) -> None:
        width, height, bad_size = _declared_size(img, where)
        if bad_size:
            self.source.problems.append(Problem(IMAGE_SIZE_INVALID, USE_REAL_SIZE, file_name, image_id, None,
                                                bad_size))
        first = by_name.setdefault(_normalized_name(file_name), image_id)
        if first != image_id:  # two rows of one picture: a leak between splits or a merge gone wrong
            self.source.warn(DUPLICATE_FILE_NAME, file_name, image_id,
                             detail=f"{where}: the file of image id {first} too; both written")
        self.by_id[image_id] = ImageRecord(image_id, file_name, width, height)

    def annotations(self) -> None:
        for i, ann in enumerate(self.data["annotations"]):
            self._annotation(f"annotations[{i}]", ann)

    def _annotation(self, where: str, ann) -> None:
        source, path = self.source, self.path
        ann_id = _require(path, where, ann, "id", _is_int, "an integer")
        image_id = _require(path, where, ann, "image_id", _is_int, "an integer")
        category_id = _require(path, where, ann, "category_id", _is_int, "an integer")
        if "bbox" not in ann:
            raise SourceError(f"{path}: {where}: missing required key 'bbox'")
        record = self.by_id.get(image_id)
        file_name = record.file_name if record else None
        if ann_id in self.seen_ann_ids:
            return source.drop_annotation(DUPLICATE_ANNOTATION_ID, ann_id, file_name, image_id)
        self.seen_ann_ids.add(ann_id)
        if record is None and image_id in self.refused_ids:
            source.skipped_annotations[IMAGE_SKIPPED] += 1  # reported once, with the image
            return
        too_big = next((k for k, v in (("id", ann_id), ("image_id", image_id), ("category_id", category_id))
                        if not _fits_int64(v)), None)
        if too_big:
            return source.drop_annotation(ID_OUT_OF_RANGE, ann_id, file_name, image_id,
                                          f"{where}: '{too_big}' does not fit in int64")
        if record is None:
            return source.drop_annotation(UNKNOWN_IMAGE_ID, ann_id, None, image_id)
        if category_id not in self.id_to_name:
            return source.drop_annotation(UNKNOWN_CATEGORY, ann_id, file_name, image_id, f"category_id {category_id}")
        self._add_annotation(record, where, ann, ann_id, category_id)

    def _add_annotation(self, record: ImageRecord, where: str, ann: dict, ann_id: int, category_id: int) -> None:
        source, file_name, image_id = self.source, record.file_name, record.image_id
        reason = bbox_problem(ann["bbox"])
        if reason:
            return source.drop_annotation(reason, ann_id, file_name, image_id, f"bbox {brief(ann['bbox'])}")
        iscrowd = 0 if ann.get("iscrowd") is None else ann["iscrowd"]  # absent or null: not a crowd
        # 0/1 or false/true (== 0/1 in Python); anything else has no agreed meaning (see the docstring).
        if iscrowd not in (0, 1):
            return source.drop_annotation(ISCROWD_INVALID, ann_id, file_name, image_id, f"iscrowd {brief(iscrowd)}")
        area = ann.get("area")
        area_value = float(area) if _is_number(area) and math.isfinite(area) and area > 0 else None
        if area is not None and area_value is None:
            source.problems.append(Problem(AREA_INVALID, USE_BOX_AREA, file_name, image_id, ann_id,
                                           f"area {brief(area)}"))
        record.annotations.append(Annotation(ann_id, category_id, [float(v) for v in ann["bbox"]], False,
                                             area_value, bool(iscrowd)))


def read_coco(ann_json, image_dir) -> Source:
    """Read and validate a COCO detection annotation file whose ``file_name``s are relative to ``image_dir``."""
    path, image_root = storage.absolute(ann_json), storage.absolute(image_dir)
    _require_image_root(image_root, "image folder (--images)")
    data = _load_coco_json(path)
    source = Source("coco", {"annotations": path, "images": image_root}, image_root, [],
                    [], len(data["images"]), len(data["annotations"]))
    reader = _CocoReader(path, data, source)
    reader.categories()
    reader.images()
    reader.annotations()
    source.images = sorted(reader.by_id.values(), key=lambda r: r.image_id)
    return source


# ----------------------------------------------------------------------------------------------------
# YOLO (Ultralytics layout)
# ----------------------------------------------------------------------------------------------------


def _find_data_yaml(data_dir: str) -> str:
    kind = _info(data_dir).kind
    if kind == "file":
        return data_dir
    if kind == "other":
        raise SourceError(f"{data_dir}: {storage.describe(data_dir)}, not a YOLO dataset directory or data.yaml; "
                          "not read")
    if kind != "dir":
        raise SourceError(f"{data_dir}: YOLO dataset directory not found")
    default = storage.join(data_dir, "data.yaml")
    if _info(default).kind == "file":
        return default
    candidates = [e for e in storage.list_dir(data_dir) if e.kind == "file" and e.name.endswith((".yaml", ".yml"))]
    if len(candidates) != 1:
        found = ", ".join(e.name for e in candidates) or "none"
        raise SourceError(f"{data_dir}: expected data.yaml or exactly one .yaml file, found {found}")
    return candidates[0].path


def _load_data_yaml(yaml_path: str, split: str) -> dict:
    try:
        spec = yaml.safe_load(storage.read_text(yaml_path))
    except (yaml.YAMLError, UnicodeDecodeError) as exc:
        raise SourceError(f"{yaml_path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:  # PyYAML recurses once per level
        raise SourceError(f"{yaml_path}: not valid YAML (nested too deeply to parse)") from None
    except OSError as exc:
        raise SourceError(f"{yaml_path}: cannot read ({exc})") from None
    if not isinstance(spec, dict):
        raise SourceError(f"{yaml_path}: expected a mapping with 'names' and '{split}'")
    for key in ("names", split):
        if key not in spec:
            raise SourceError(f"{yaml_path}: missing required key '{key}'")
    return spec


def _yolo_names(yaml_path: str, names) -> dict[int, str]:
    def is_name(value) -> bool:
        return isinstance(value, str) and storage.is_utf8(value)

    if isinstance(names, list) and all(is_name(n) for n in names):
        return dict(enumerate(names))
    if isinstance(names, dict) and all(_is_int(k) and is_name(v) for k, v in names.items()):
        return dict(names)
    raise SourceError(f"{yaml_path}: 'names' must be a list of names or a mapping {{index: name}} of valid Unicode "
                      f"text, got {brief(names)}")


def _under(base: str, relative: str) -> str:
    """``relative`` resolved against ``base`` (local or URI); absolute paths and URIs as they are."""
    if storage.is_uri(relative) or os.path.isabs(relative):
        return storage.absolute(relative)
    if storage.is_uri(base):
        scheme, rest = base.split("://", 1)
        return f"{scheme}://{posixpath.normpath(posixpath.join(rest, relative))}"
    return os.path.normpath(os.path.join(base, relative))


def _yolo_image_root(yaml_path: str, spec: dict, split: str) -> str:
    base = storage.parent(yaml_path)
    if isinstance(spec.get("path"), str) and _info(_under(base, spec["path"])).kind == "dir":
        base = _under(base, spec["path"])  # relative `path:` resolved against the yaml's folder
    if not isinstance(spec[split], str):
        raise SourceError(f"{yaml_path}: '{split}' must be one image directory, got {brief(spec[split])}")
    image_root = _under(base, spec[split])
    if _info(image_root).kind != "dir":
        raise SourceError(f"{yaml_path}: '{split}': image directory {brief(spec[split])} not found under {base}")
    return image_root


def label_path_for(image_path: str) -> str:
    """Ultralytics' rule: the last ``/images/`` in the path becomes ``/labels/``, the suffix ``.txt``."""
    text = os.fspath(image_path)
    sep, split_ext = ("/", posixpath.splitext) if storage.is_uri(text) else (os.sep, os.path.splitext)
    images, labels = f"{sep}images{sep}", f"{sep}labels{sep}"
    if images in text:
        text = labels.join(text.rsplit(images, 1))
    return split_ext(text)[0] + ".txt"


def _relative(root: str, path: str) -> str:
    return path[len(root.rstrip("/" + os.sep)) + 1:].replace(os.sep, "/")


def _list_files(root: str) -> list[storage.FileInfo]:
    try:
        return storage.list_files(root)
    except storage.StorageError as exc:
        raise SourceError(str(exc)) from None


def _read_label_texts(paths: list[str]) -> list[bytes | Exception]:
    def read(path: str) -> bytes | Exception:
        try:
            return storage.read_bytes(path, max_bytes=LABEL_MAX_BYTES)
        except OSError as exc:
            return exc

    with ThreadPoolExecutor(max_workers=LABEL_READ_THREADS) as pool:
        return list(pool.map(read, paths))


def _label_lines(data: bytes) -> int:
    """The lines of a label file that ``_parse_label_text`` would count as annotations (the non-blank ones)."""
    return sum(1 for line in data.decode("utf-8", "replace").splitlines() if line.split())


def _local_label_bytes(path: str) -> bytes | None:
    """A local label file whose name is not UTF-8 (which storage cannot address), read through the OS to count
    its lines; None when it is not a regular file of at most LABEL_MAX_BYTES or cannot be read."""
    found = storage.info(path)  # through the OS for such a name
    if found.kind != "file" or (found.size or 0) > LABEL_MAX_BYTES or storage.local_path(path) is None:
        return None
    try:
        with open(storage.local_path(path), "rb") as handle:
            return handle.read(LABEL_MAX_BYTES + 1)
    except OSError:
        return None


def _skip_with_labels(source: Source, reason: str, file_name: str, image_id, detail: str, data: bytes | None) -> None:
    """Skip an image and count its label lines (when they could be read) as annotations in, skipped with it:
    images in = written + skipped, and the same for annotations."""
    lines = _label_lines(data) if data is not None else 0
    if data is None:
        detail += "; its label lines could not be counted"
    elif lines:
        detail += f"; its {lines} label line(s) skipped with it"
    source.skip_image(reason, file_name, image_id, detail)
    source.annotations_in += lines
    source.skipped_annotations[IMAGE_SKIPPED] += lines


def _parse_label_text(source: Source, record: ImageRecord, label_path: str, text: str, names: dict[int, str],
                      next_ann_id: int) -> int:
    """Append the valid lines of one label file to ``record``; returns the next annotation id."""
    for line_no, line in enumerate(text.splitlines(), 1):
        fields = line.split()
        if not fields:
            continue
        ann_id, next_ann_id = next_ann_id, next_ann_id + 1
        source.annotations_in += 1
        detail = f"{storage.basename(label_path)}:{line_no}: {line.strip()!r}"[:200]
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


@dataclass
class _YoloLayout:
    """What is on storage for one split: candidate image files, and the label files that exist."""

    image_root: str
    label_root: str
    entries: list[storage.FileInfo]  # under image_root, except label files, sorted as Ultralytics does
    labels: set[str]  # every .txt path under image_root and label_root
    orphans: list[str]  # label files under label_root that belong to no image


def _is_image(path: str) -> bool:
    return posixpath.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def _scan_yolo(image_root: str) -> _YoloLayout:
    listed = _list_files(image_root)
    label_root = storage.parent(label_path_for(storage.join(image_root, "x.jpg")))
    colocated = label_root == image_root  # no /images/ in the path: labels sit next to the images
    label_listing = [] if colocated else _list_files(label_root)
    labels = {e.path for e in listed + label_listing if e.path.endswith(".txt")}
    used = {label_path_for(e.path) for e in listed if _is_image(e.path)}
    # A .txt file in the image folder is a label (of an image, or an orphan when labels sit there), not
    # an image; elsewhere it is an unsupported file, like any other non-image.
    entries = [e for e in listed if e.path not in used and not (colocated and e.path.endswith(".txt"))]
    entries.sort(key=lambda e: _relative(image_root, e.path).split("/"))  # pathlib's order: by components
    label_files = listed if colocated else label_listing
    orphans = sorted({e.path for e in label_files if e.path.endswith(".txt")} - used)
    return _YoloLayout(image_root, label_root, entries, labels, orphans)


def _yolo_records(source: Source, layout: _YoloLayout) -> list[tuple[ImageRecord, str]]:
    """One record per image file, with its label path; other files are skipped as unsupported."""
    pairs = []
    for entry in layout.entries:
        file_name = _relative(layout.image_root, entry.path)
        if not storage.is_utf8(file_name):  # never read; its label lines are counted, skipped with it
            label = label_path_for(entry.path)
            data = _local_label_bytes(label) if label in layout.labels else b""
            _skip_with_labels(source, FILE_NAME_NOT_UTF8, file_name, None, "the name on disk is not UTF-8; not read",
                              data)
            continue
        if not _is_image(entry.path):
            extension = posixpath.splitext(entry.path)[1]
            source.skip_image(UNSUPPORTED_FILE, file_name, None, f"extension {extension!r} is not an image")
            continue
        pairs.append((ImageRecord(len(pairs), file_name, None, None), label_path_for(entry.path)))
    return pairs


def _read_yolo_labels(source: Source, pairs: list[tuple[ImageRecord, str]], layout: _YoloLayout,
                      names: dict[int, str]) -> None:
    with_labels = [(record, label) for record, label in pairs if label in layout.labels]
    to_read = sorted({label for _, label in with_labels})
    text_of = dict(zip(to_read, _read_label_texts(to_read)))
    next_ann_id = 1
    for record, label in pairs:
        data = text_of.get(label, b"")  # no label file: an image with no objects (Ultralytics' convention)
        if isinstance(data, Exception):
            source.skip_image(LABEL_FILE_UNREADABLE, record.file_name, record.image_id, str(data)[:200])
            continue
        try:
            text = data.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            _skip_with_labels(source, LABEL_FILE_UNREADABLE, record.file_name, record.image_id,
                              f"{storage.basename(label)}: not UTF-8 text ({exc.reason} at byte {exc.start})", data)
            continue
        next_ann_id = _parse_label_text(source, record, label, text, names, next_ann_id)
        source.images.append(record)
    source.images_without_label_file = len(pairs) - len(with_labels)
    if pairs and not with_labels:
        source.warn(NO_LABEL_FILES, detail=f"none of the {len(pairs)} images has a label file; expected them "
                                           f"under {layout.label_root} (Ultralytics: the last /images/ in an "
                                           f"image's path becomes /labels/, the suffix .txt); kept without boxes")


def read_yolo(data_dir, split: str = "train") -> Source:
    """Read an Ultralytics dataset: ``data.yaml`` with ``names`` and ``train``/``val`` image directories,
    ``images/<split>/*.jpg`` and ``labels/<split>/*.txt`` (``class cx cy w h`` normalised per line).

    Image ids are positions in the sorted list of image paths; annotation ids count label lines from 1
    in that same order, so both are stable across runs. A split without any image file is a
    ``SourceError``; a split with images but not one label file is a ``NO_LABEL_FILES`` warning.
    """
    if split not in ("train", "val"):
        raise SourceError(f"--split must be train or val, got {split!r}")
    yaml_path = _find_data_yaml(storage.absolute(data_dir))
    spec = _load_data_yaml(yaml_path, split)
    names = _yolo_names(yaml_path, spec["names"])
    layout = _scan_yolo(_yolo_image_root(yaml_path, spec, split))
    if not any(_is_image(e.path) for e in layout.entries):
        raise SourceError(f"{yaml_path}: '{split}': no image files in {layout.image_root} "
                          f"({', '.join(sorted(IMAGE_EXTENSIONS))})")
    source = Source("yolo", {"data": yaml_path, "split": split, "images": layout.image_root}, layout.image_root,
                    make_categories(names), [], len(layout.entries), 0)
    _warn_duplicate_names(source, names)
    _read_yolo_labels(source, _yolo_records(source, layout), layout, names)
    for orphan in layout.orphans:
        root = layout.image_root if layout.label_root == layout.image_root else layout.label_root
        source.problems.append(Problem(LABEL_WITHOUT_IMAGE, IGNORED, _relative(root, orphan)))
    return source


__all__ = [
    "Annotation", "ImageRecord", "Problem", "Source", "SourceError", "bbox_problem", "is_unsafe_file_name",
    "is_warning", "label_path_for", "make_categories", "read_coco", "read_yolo",
]
