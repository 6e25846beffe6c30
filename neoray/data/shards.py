"""Parquet shards and their manifest: the contract between ``neoray prepare`` and everything downstream.

A shard directory holds ``shard-00000.parquet``, ``shard-00001.parquet`` ..., ``_manifest.json`` and
``_report.json``. Each shard has one row per image, with this schema (``SCHEMA``; no nulls)::

    image_id      int64                  source image id (COCO id; YOLO: index in sorted file order)
    file_name     string                 path relative to the source image root
    image         binary                 JPEG bytes of the letterboxed image, exactly width x height
    width         int32                  target width  (16:9 with height)
    height        int32                  target height
    orig_width    int32                  width of the source image as decoded from the file
    orig_height   int32                  height of the source image as decoded from the file
    scale         float32                letterbox scale (same for both axes)
    pad_x, pad_y  float32                letterbox padding left/top, may be fractional:
                                         orig = (target - pad) / scale   (neoray.data.geometry)
    boxes         list<fixed_size_list<float32>[4]>   [x1, y1, x2, y2] in target pixels, x2 > x1, y2 > y1,
                                         inside [0, width] x [0, height]
    labels        list<int32>            contiguous class: index of the category in the categories sorted
                                         by id (the manifest's ``categories[i].label``)
    iscrowd       list<bool>             COCO iscrowd
    areas         list<float32>          source annotation ``area`` in ORIGINAL pixels (w*h of the kept box
                                         when the source has none), for COCO small/medium/large
    ann_ids       list<int64>            source annotation ids (YOLO: label line number, from 1, in order)

The five list columns have one entry per box, in the same order. Rows within a shard, and shards within
the manifest, are sorted by image id.

``_manifest.json``::

    {"format": "neoray-shards", "version": 1, "size": [W, H],
     "categories": [{"id", "name", "label"}], "num_images", "num_boxes",
     "shards": [{"file", "rows", "sha256", "boxes", "fingerprint", "counts", "skipped", "problems"}],
     "options": {...},
     "skipped": {"images": {reason: n}, "annotations": {reason: n}, "categories": {reason: n}},
     "warnings": {reason: n},
     "counts": {"images_in", "images_written", "images_skipped", "images_without_boxes",
                "images_without_label_file", "annotations_in", "annotations_written",
                "annotations_skipped", "annotations_clipped"}}

A shard's ``fingerprint`` hashes its inputs (records, file sizes and mtimes, options, library versions);
``prepare`` reuses a shard whose fingerprint is unchanged and whose file still has the recorded sha256.

A shard directory may be local, on a shared mount or a URI (``s3://bucket/prefix``): every file goes
through ``neoray.storage``. Each file is written whole in one operation (a rename of a temporary file
locally, one object upload on object storage), so a reader never sees half a shard; the manifest is
written last and is the commit point: a directory without one is not a finished dataset.
"""

from __future__ import annotations

import hashlib

import pyarrow as pa
import pyarrow.parquet as pq

from neoray import storage
from neoray.config import ConfigError, brief, parse_size

MANIFEST_NAME = "_manifest.json"
REPORT_NAME = "_report.json"
FORMAT = "neoray-shards"
VERSION = 1

SCHEMA = pa.schema([
    pa.field("image_id", pa.int64(), nullable=False),
    pa.field("file_name", pa.string(), nullable=False),
    pa.field("image", pa.binary(), nullable=False),
    pa.field("width", pa.int32(), nullable=False),
    pa.field("height", pa.int32(), nullable=False),
    pa.field("orig_width", pa.int32(), nullable=False),
    pa.field("orig_height", pa.int32(), nullable=False),
    pa.field("scale", pa.float32(), nullable=False),
    pa.field("pad_x", pa.float32(), nullable=False),
    pa.field("pad_y", pa.float32(), nullable=False),
    pa.field("boxes", pa.list_(pa.list_(pa.float32(), 4)), nullable=False),
    pa.field("labels", pa.list_(pa.int32()), nullable=False),
    pa.field("iscrowd", pa.list_(pa.bool_()), nullable=False),
    pa.field("areas", pa.list_(pa.float32()), nullable=False),
    pa.field("ann_ids", pa.list_(pa.int64()), nullable=False),
])
LIST_COLUMNS = ("boxes", "labels", "iscrowd", "areas", "ann_ids")

# Small row groups let a reader fetch part of a shard; JPEG bytes do not compress, so they are stored raw.
ROW_GROUP_SIZE = 64
_COMPRESSION = {name: ("none" if name == "image" else "snappy") for name in SCHEMA.names}


class ManifestError(ValueError):
    """A shard directory whose manifest is missing or unusable; one line naming the file and key."""


# Every shard file name matches SHARD_GLOB; files in progress match TEMP_GLOBS (neoray.storage's
# temporary names, and the ".shard-*.parquet.tmp<pid>" of earlier versions). `prepare` deletes what
# matches and is not its own, so these must stay in step with shard_name and storage's writer.
SHARD_GLOB = "shard-*.parquet"
TEMP_GLOBS = (".shard-*.parquet.*.tmp", ".shard-*.parquet.tmp*", f".{MANIFEST_NAME}.*.tmp", f".{REPORT_NAME}.*.tmp")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def shard_bytes(rows: list[dict]) -> bytes:
    """The Parquet file for rows (dicts with the SCHEMA columns), in memory: written as one object."""
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=ROW_GROUP_SIZE, compression=_COMPRESSION)
    return sink.getvalue().to_pybytes()


def write_shard(rows: list[dict], path) -> str:
    """Write rows to ``path`` (any storage) atomically; returns the file's sha256 (hex)."""
    data = shard_bytes(rows)
    storage.write_bytes(path, data)
    return hashlib.sha256(data).hexdigest()


def _is_int(value, minimum: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= minimum


def _check_size(path: str, size) -> None:
    if not (isinstance(size, list) and len(size) == 2 and all(_is_int(v, 1) for v in size)):
        raise ManifestError(f"{path}: 'size' must be [width, height] as two positive integers, got {brief(size)}")
    try:
        parse_size(size, "'size'", require_16_9=False, bounded=True)  # what every reader allocates per image
    except ConfigError as exc:
        raise ManifestError(f"{path}: {exc}") from None


def _check_categories(path: str, categories: list) -> None:
    for i, cat in enumerate(categories):
        if not (isinstance(cat, dict) and _is_int(cat.get("id"), -(1 << 63)) and isinstance(cat.get("name"), str)
                and _is_int(cat.get("label"))):
            raise ManifestError(f"{path}: categories[{i}]: expected {{'id': int, 'name': str, 'label': int}}, "
                                f"got {brief(cat)}")
    labels = sorted(cat["label"] for cat in categories)
    if labels != list(range(len(labels))):
        raise ManifestError(f"{path}: category labels {labels} are not 0..{len(labels) - 1}"[:300])


def _check_shards(path: str, entries: list) -> None:
    for i, shard in enumerate(entries):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and _is_int(shard.get("rows"))
                and isinstance(shard.get("sha256"), str)):
            raise ManifestError(f"{path}: shards[{i}]: expected {{'file': str, 'rows': int >= 0, 'sha256': str}}")
        name = shard["file"]
        if not name or "/" in name or "\\" in name or name in (".", ".."):
            raise ManifestError(f"{path}: shards[{i}]: 'file' must be a plain file name, got {brief(name)}")


def _validate(path: str, manifest) -> None:
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a neoray shard manifest ('format' must be {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ManifestError(f"{path}: 'version' {brief(manifest.get('version'))} is not supported (expected {VERSION})")
    expected = {"size": list, "categories": list, "shards": list, "num_images": int, "num_boxes": int}
    for key, kind in expected.items():
        value = manifest.get(key)
        if not isinstance(value, kind) or isinstance(value, bool) or (kind is int and value < 0):
            raise ManifestError(f"{path}: '{key}' missing or not a {'non-negative int' if kind is int else 'list'}")
    for key in ("options", "skipped", "warnings", "counts"):
        if not isinstance(manifest.get(key, {}), dict):
            raise ManifestError(f"{path}: '{key}' must be an object")
    _check_size(path, manifest["size"])
    _check_categories(path, manifest["categories"])
    _check_shards(path, manifest["shards"])


def read_manifest(shard_dir) -> dict:
    """The manifest of a shard directory (any storage); ``ManifestError`` (one line) when missing or broken."""
    path = storage.join(shard_dir, MANIFEST_NAME)
    try:
        manifest = storage.read_json(path)
    except FileNotFoundError:
        other = storage.not_a_folder(shard_dir)
        if other:
            raise ManifestError(f"{shard_dir}: {other}, not a shard directory (written by `neoray prepare`)") from None
        raise ManifestError(f"{path}: manifest not found; is {shard_dir} a directory written by `neoray prepare` "
                            f"(an interrupted run leaves none)?") from None
    except (storage.StorageError, storage.JSONError) as exc:  # both name the file
        raise ManifestError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    _validate(path, manifest)
    return manifest


def shard_files(shard_dir) -> list[str]:
    """The shard files listed in the manifest, in order (sorted by image id), as paths or URIs."""
    return [storage.join(shard_dir, shard["file"]) for shard in read_manifest(shard_dir)["shards"]]


def num_classes(manifest: dict) -> int:
    return len(manifest["categories"])


__all__ = [
    "FORMAT", "LIST_COLUMNS", "MANIFEST_NAME", "ManifestError", "REPORT_NAME", "SCHEMA", "SHARD_GLOB", "TEMP_GLOBS",
    "VERSION", "num_classes", "read_manifest", "shard_bytes", "shard_files", "shard_name", "write_shard",
]
