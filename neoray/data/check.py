"""``neoray check SHARD_DIR``: verify shards against their manifest and summarise the dataset.

Checks, per shard: the file exists, its sha256 and row count match the manifest, its schema is
``shards.SCHEMA``; per row: the target size is the manifest's, the list columns have one entry per box,
every box is finite, inside [0, W] x [0, H] with x2 > x1 and y2 > y1, every label is in
[0, num_classes), the letterbox scale is positive, image ids are unique, and the JPEG decodes to
width x height (all of them, or every ``decode_every``-th). Totals must match ``num_images`` and
``num_boxes``. A Parquet file in the directory that the manifest does not list is an error too: readers of
the whole directory (``pq.read_table(dir)``, pandas, DuckDB) would count its rows. The summary counts boxes
per class and COCO size ranges from ``areas``.

The directory may be local or a URI (``s3://...``): each shard is read once, through ``neoray.storage``,
and both its checksum and its rows come from those bytes. A missing or broken manifest (not JSON, a
hand edit that left ``size`` as strings or a category without ``label``) is a problem like a broken shard.
"""

from __future__ import annotations

import hashlib
import os
from collections import Counter
from dataclasses import dataclass, field

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from neoray import storage
from neoray.data import shards

# COCO's area ranges (original pixels): small < 32^2 <= medium < 96^2 <= large.
SMALL_MAX_AREA = 32 ** 2
MEDIUM_MAX_AREA = 96 ** 2
MAX_PROBLEMS_PER_SHARD = 20  # a corrupt shard would otherwise print one line per row
BOX_TOLERANCE_PX = 1e-3


@dataclass
class CheckResult:
    shard_dir: str
    problems: list[str] = field(default_factory=list)
    summary: dict = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return not self.problems

    def summary_text(self) -> str:
        s = self.summary
        if not s:
            return f"{self.shard_dir}: no summary (manifest unreadable)"
        lines = [f"{self.shard_dir}: {s['images']} images ({s['empty_images']} without boxes), {s['boxes']} boxes, "
                 f"size {s['size'][0]}x{s['size'][1]}, {s['shards']} shards"]
        lines.append("  boxes per class: " + ", ".join(f"{name} {n}" for name, n in s["boxes_per_class"].items()))
        sizes = s["box_sizes"]
        lines.append(f"  box sizes (COCO area): small {sizes['small']}, medium {sizes['medium']}, "
                     f"large {sizes['large']}")
        skipped = s.get("skipped", {})
        if any(skipped.get(kind) for kind in ("images", "annotations")):
            lines.append(f"  skipped at prepare: images {skipped.get('images', {})}, "
                         f"annotations {skipped.get('annotations', {})}")
        if s.get("warnings"):
            lines.append(f"  warnings at prepare (kept): {s['warnings']}")
        return "\n".join(lines)


class _ShardChecker:
    def __init__(self, manifest: dict, decode_every: int):
        self.size = tuple(manifest["size"])
        self.names = [c["name"] for c in sorted(manifest["categories"], key=lambda c: c["label"])]
        self.decode_every = decode_every
        self.seen_ids: set[int] = set()
        self.per_class: Counter = Counter()
        self.box_sizes: Counter = Counter({"small": 0, "medium": 0, "large": 0})
        self.images = self.boxes = self.empty = 0

    def check_rows(self, name: str, table) -> list[str]:
        problems: list[str] = []
        width, height = self.size
        for i, row in enumerate(table.to_pylist()):
            where = f"{name}: row {i} (image_id {row['image_id']})"
            self.images += 1
            if row["image_id"] in self.seen_ids:
                problems.append(f"{where}: duplicate image_id")
            self.seen_ids.add(row["image_id"])
            if (row["width"], row["height"]) != (width, height):
                problems.append(f"{where}: size {row['width']}x{row['height']}, manifest says {width}x{height}")
            if not (row["scale"] > 0 and np.isfinite([row["scale"], row["pad_x"], row["pad_y"]]).all()):
                problems.append(f"{where}: bad letterbox scale/pad {row['scale']}, {row['pad_x']}, {row['pad_y']}")
            n = len(row["boxes"])
            lengths = {col: len(row[col]) for col in shards.LIST_COLUMNS}
            if set(lengths.values()) != {n}:
                problems.append(f"{where}: list columns differ in length {lengths}")
                continue
            self.boxes += n
            self.empty += n == 0
            for j, (box, label, area) in enumerate(zip(row["boxes"], row["labels"], row["areas"])):
                x1, y1, x2, y2 = box
                tol = BOX_TOLERANCE_PX
                if not (np.isfinite(box).all() and -tol <= x1 < x2 <= width + tol and -tol <= y1 < y2 <= height + tol):
                    problems.append(f"{where}: box {j} {box} is not inside 0..{width} x 0..{height} with x2>x1, y2>y1")
                if not 0 <= label < len(self.names):
                    problems.append(f"{where}: box {j} label {label} outside [0, {len(self.names)})")
                else:
                    self.per_class[self.names[label]] += 1
                size = "small" if area < SMALL_MAX_AREA else "medium" if area < MEDIUM_MAX_AREA else "large"
                self.box_sizes[size] += 1
            if i % self.decode_every == 0:
                img = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
                if img is None:
                    problems.append(f"{where}: image bytes do not decode")
                elif (img.shape[1], img.shape[0]) != (row["width"], row["height"]):
                    problems.append(f"{where}: image decodes to {img.shape[1]}x{img.shape[0]}, "
                                    f"row says {row['width']}x{row['height']}")
        return problems


def check_shards(shard_dir, decode_every: int = 1) -> CheckResult:
    """Verify a shard directory; never raises for bad data (every problem is a line in ``problems``)."""
    shard_dir = os.fspath(shard_dir)
    result = CheckResult(shard_dir)
    try:
        manifest = shards.read_manifest(shard_dir)
    except shards.ManifestError as exc:
        result.problems.append(str(exc))
        return result
    checker = _ShardChecker(manifest, max(1, decode_every))
    for entry in manifest["shards"]:
        result.problems.extend(_check_one(shard_dir, entry, checker))
    result.problems.extend(_unlisted_parquet_files(shard_dir, {entry["file"] for entry in manifest["shards"]}))
    if checker.images != manifest["num_images"]:
        result.problems.append(f"manifest num_images {manifest['num_images']}, shards hold {checker.images}")
    if checker.boxes != manifest["num_boxes"]:
        result.problems.append(f"manifest num_boxes {manifest['num_boxes']}, shards hold {checker.boxes}")
    result.summary = {
        "size": manifest["size"], "shards": len(manifest["shards"]), "images": checker.images,
        "boxes": checker.boxes, "empty_images": checker.empty,
        "boxes_per_class": {name: checker.per_class[name] for name in checker.names},
        "box_sizes": dict(checker.box_sizes), "skipped": manifest.get("skipped", {}),
        "warnings": manifest.get("warnings", {}),
    }
    return result


def _unlisted_parquet_files(shard_dir: str, listed: set[str]) -> list[str]:
    """One problem per Parquet file under ``shard_dir`` that the manifest does not list (e.g. a shard left
    by an interrupted or larger earlier run). Names starting with "." or "_" are skipped, as pyarrow's
    directory reader skips them (our temporary files start with ".")."""
    try:
        found = storage.list_dir(shard_dir, recursive=True)
    except storage.StorageError as exc:
        return [str(exc)]
    problems = []
    prefix = len(shard_dir.rstrip("/")) + 1
    for entry in found:
        relative = entry.path[prefix:].replace("\\", "/")
        parts = relative.split("/")
        if entry.kind != "file" or not relative.endswith(".parquet") or relative in listed \
                or any(part.startswith((".", "_")) for part in parts):
            continue
        problems.append(f"{relative}: Parquet file not listed in the manifest; readers of the "
                        f"directory would include its rows (re-run `neoray prepare` or delete it)")
    return problems


def _read_shard(path: str, name: str) -> bytes | str:
    """The shard's bytes, or the problem line."""
    try:
        return storage.read_bytes(path)
    except FileNotFoundError:
        return f"{name}: file missing"
    except storage.StorageError as exc:
        return f"{name}: cannot be read ({str(exc).rsplit(': ', 1)[-1][:200]})"


def _check_one(shard_dir: str, entry: dict, checker: _ShardChecker) -> list[str]:
    name = entry["file"]
    data = _read_shard(storage.join(shard_dir, name), name)
    if isinstance(data, str):
        return [data]
    problems = []
    digest = hashlib.sha256(data).hexdigest()
    if digest != entry["sha256"]:
        problems.append(f"{name}: sha256 {digest[:12]}... does not match the manifest's {entry['sha256'][:12]}...")
    try:
        table = pq.read_table(pa.BufferReader(data))
    except Exception as exc:  # pyarrow raises several types for a corrupt file; all mean "unreadable"
        return problems + [f"{name}: not a readable Parquet file ({str(exc).splitlines()[0][:200]})"]
    if table.num_rows != entry["rows"]:
        problems.append(f"{name}: {table.num_rows} rows, manifest says {entry['rows']}")
    if not table.schema.equals(shards.SCHEMA, check_metadata=False):
        return problems + [f"{name}: schema differs from neoray.data.shards.SCHEMA: {table.schema.to_string()!r}"[:400]]
    row_problems = checker.check_rows(name, table)
    if len(row_problems) > MAX_PROBLEMS_PER_SHARD:
        extra = len(row_problems) - MAX_PROBLEMS_PER_SHARD
        row_problems = row_problems[:MAX_PROBLEMS_PER_SHARD] + [f"{name}: ... and {extra} more problems"]
    return problems + row_problems


__all__ = ["CheckResult", "check_shards"]
