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
     "options": {...}, "skipped": {"images": {reason: n}, "annotations": {reason: n}},
     "counts": {"images_in", "images_written", "images_skipped", "annotations_in",
                "annotations_written", "annotations_skipped", "annotations_clipped"}}

A shard's ``fingerprint`` hashes its inputs (records, file sizes and mtimes, options, library versions);
``prepare`` reuses a shard whose fingerprint is unchanged and whose file still has the recorded sha256.
Every file here is written to a temporary name in the same directory and renamed into place.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from neoray.io import write_json_atomic  # re-exported: prepare and check write through it

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


class ManifestError(ValueError):
    """A shard directory whose manifest is missing or unusable; one line naming the file and key."""


# Every shard file name matches SHARD_GLOB; files in progress match TEMP_GLOBS (write_shard's temporary
# name below, and neoray.io's for the manifest and report). `prepare` deletes what matches and is not its
# own, so these must stay in step with shard_name and _temp_path.
SHARD_GLOB = "shard-*.parquet"
TEMP_GLOBS = (".shard-*.parquet.tmp*", f".{MANIFEST_NAME}.*.tmp", f".{REPORT_NAME}.*.tmp")


def shard_name(index: int) -> str:
    return f"shard-{index:05d}.parquet"


def _temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _replace_atomically(tmp: Path, path: Path) -> None:
    with open(tmp, "rb") as handle:  # flush to disk before the rename makes the file visible
        os.fsync(handle.fileno())
    os.replace(tmp, path)


def write_shard(rows: list[dict], path) -> None:
    """Write rows (dicts with the SCHEMA columns) to ``path`` atomically."""
    path = Path(path)
    table = pa.Table.from_pylist(rows, schema=SCHEMA)
    tmp = _temp_path(path)
    try:
        pq.write_table(table, tmp, row_group_size=ROW_GROUP_SIZE,
                       compression={name: ("none" if name == "image" else "snappy") for name in SCHEMA.names})
        _replace_atomically(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def file_sha256(path) -> str:
    with open(path, "rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def read_manifest(shard_dir) -> dict:
    """The manifest of a shard directory; ``ManifestError`` (one line) when missing or broken."""
    path = Path(shard_dir) / MANIFEST_NAME
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: manifest not found; is {shard_dir} a directory written by `neoray prepare` "
                            f"(an interrupted run leaves none)?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ManifestError(f"{path}: not a neoray shard manifest ('format' must be {FORMAT!r})")
    if manifest.get("version") != VERSION:
        raise ManifestError(f"{path}: 'version' {manifest.get('version')!r} is not supported (expected {VERSION})")
    expected = {"size": list, "categories": list, "shards": list, "num_images": int, "num_boxes": int}
    for key, kind in expected.items():
        if not isinstance(manifest.get(key), kind):
            raise ManifestError(f"{path}: '{key}' missing or not a {kind.__name__}")
    for i, shard in enumerate(manifest["shards"]):
        if not (isinstance(shard, dict) and isinstance(shard.get("file"), str) and isinstance(shard.get("rows"), int)
                and isinstance(shard.get("sha256"), str)):
            raise ManifestError(f"{path}: shards[{i}]: expected {{'file', 'rows', 'sha256'}}")
        if Path(shard["file"]).name != shard["file"]:
            raise ManifestError(f"{path}: shards[{i}]: 'file' must be a plain file name, got {shard['file']!r}")
    return manifest


def shard_files(shard_dir) -> list[Path]:
    """The shard files listed in the manifest, in order (sorted by image id)."""
    return [Path(shard_dir) / shard["file"] for shard in read_manifest(shard_dir)["shards"]]


def num_classes(manifest: dict) -> int:
    return len(manifest["categories"])


__all__ = [
    "FORMAT", "LIST_COLUMNS", "MANIFEST_NAME", "ManifestError", "REPORT_NAME", "SCHEMA", "SHARD_GLOB", "TEMP_GLOBS",
    "VERSION",
    "file_sha256", "num_classes", "read_manifest", "shard_files", "shard_name", "write_json_atomic", "write_shard",
]
