"""``neoray prepare``: a COCO or YOLO dataset -> validated, letterboxed 16:9 Parquet shards.

Steps: read and validate the source (``neoray.data.sources``), sort the images by id and cut them into
shards of ``rows_per_shard`` (fewer when that leaves a worker idle), then in a process pool open every
image, check its boxes against its real size, letterbox it (``neoray.data.geometry``), JPEG-encode it
and write the shard atomically (``neoray.data.shards``). Then shard and temporary files that are not
part of this run are deleted, and finally ``_report.json`` (one entry per problem) and ``_manifest.json``
are written.

A shard whose inputs are unchanged (same fingerprint) and whose file still has the recorded sha256 is
reused as is on a re-run. Bad records are skipped, counted and reported; ``--strict`` then exits 2.
"""

from __future__ import annotations

import hashlib
import json
import math
import multiprocessing
import os
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field
from pathlib import Path

import cv2
import numpy as np
import pyarrow

from neoray.config import ConfigError, format_size, parse_size
from neoray.data import geometry, shards
from neoray.data import sources as src

# Boxes overshooting the image by at most this many pixels are float noise (YOLO's normalised text,
# tools that write x + w = width + 1e-6): clipped without a report entry.
CLIP_TOLERANCE_PX = 0.01


@dataclass
class PrepareResult:
    out_dir: Path
    manifest: dict
    report: list[dict]  # the entries of _report.json
    strict: bool = False
    shards_written: int = 0
    shards_reused: int = 0

    @property
    def problems(self) -> int:
        return len(self.report)

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    @property
    def manifest_path(self) -> Path:
        return self.out_dir / shards.MANIFEST_NAME

    @property
    def report_path(self) -> Path:
        return self.out_dir / shards.REPORT_NAME

    def exit_code(self, strict: bool | None = None) -> int:
        """0, or 2 when running strict and any problem was found."""
        strict = self.strict if strict is None else strict
        return 2 if strict and self.problems else 0

    def summary(self) -> str:
        c = self.counts
        return (f"prepared {c['images_written']} images ({c['images_skipped']} skipped), "
                f"{c['annotations_written']} boxes ({c['annotations_skipped']} annotations skipped, "
                f"{c['annotations_clipped']} clipped), {self.problems} problems; "
                f"{self.shards_written + self.shards_reused} shards ({self.shards_reused} reused) in {self.out_dir}; "
                f"report: {self.report_path}")


# ----------------------------------------------------------------------------------------------------
# Worker side: one shard per task
# ----------------------------------------------------------------------------------------------------


@dataclass
class _ShardTask:
    index: int
    records: list[src.ImageRecord]
    image_root: str
    out_dir: str
    size: tuple[int, int]
    quality: int
    label_of: dict[int, int]  # source category id -> contiguous label
    fingerprint: str


@dataclass
class _Tally:
    """What happened to one shard's images and annotations (summed over shards for the manifest)."""

    images_in: int = 0
    images_written: int = 0
    annotations_in: int = 0
    annotations_written: int = 0
    annotations_clipped: int = 0
    skipped_images: Counter = field(default_factory=Counter)
    skipped_annotations: Counter = field(default_factory=Counter)
    problems: list[dict] = field(default_factory=list)

    def problem(self, reason, action, record, ann_id=None, detail=""):
        self.problems.append(src.Problem(reason, action, record.file_name, record.image_id, ann_id, detail).to_dict())


def _jpeg_complete(data: bytes) -> bool | None:
    """Whether the JPEG in ``data`` reaches its end-of-image marker (FFD9): True, False (the file ends
    first: truncated), or None (the marker structure is not one we understand; the decoder decides).

    libjpeg decodes a cut-off JPEG with only a warning (grey bottom rows), so the end must be checked
    here. It is found by walking the marker segments from the start, not by looking at the last bytes:
    cameras and phones append data after FFD9 (maker trailers, the video of a motion photo, a second
    preview JPEG), and that data may itself contain FFDA/FFD9 byte pairs.
    """
    n, i = len(data), 2  # after SOI (FFD8)
    while True:
        if i >= n:
            return False
        if data[i] != 0xFF:
            return None  # a marker must start here
        while i < n and data[i] == 0xFF:  # any number of FF fill bytes may precede a marker
            i += 1
        if i >= n:
            return False
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn and TEM stand alone, no length
            continue
        if i + 2 > n:
            return False
        length = int.from_bytes(data[i:i + 2], "big")  # includes its own two bytes
        if length < 2:
            return None
        i += length
        if marker == 0xDA:  # SOS: entropy-coded data up to the next FF that is neither FF00 nor RSTn
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    return False
                following = data[i + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    i += 2
                    continue
                break


def _decode(path: Path) -> tuple[np.ndarray | None, str | None, str]:
    """(BGR image, None, "") or (None, reason, detail)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return None, src.IMAGE_MISSING, ""
    except OSError as exc:
        return None, src.IMAGE_UNREADABLE, str(exc)[:200]
    if data[:2] == b"\xff\xd8" and _jpeg_complete(data) is False:
        return None, src.IMAGE_TRUNCATED, "JPEG ends before its end-of-image marker"
    # Orientation ignored: annotation tools label the stored pixels; rotating would move every box.
    flags = cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags) if data else None
    except cv2.error as exc:
        return None, src.IMAGE_UNREADABLE, str(exc).strip().splitlines()[-1][:200]
    if img is None:
        return None, src.IMAGE_UNREADABLE, f"not a decodable image ({len(data)} bytes)"
    return img, None, ""


def _source_boxes_xyxy(ann: src.Annotation, width: int, height: int) -> np.ndarray:
    if ann.normalized:
        return geometry.cxcywh_to_xyxy(np.array(ann.bbox) * [width, height, width, height])[0]
    return geometry.xywh_to_xyxy(ann.bbox)[0]


def _image_row(record: src.ImageRecord, task: _ShardTask, tally: _Tally) -> dict | None:
    tally.images_in += 1
    tally.annotations_in += len(record.annotations)
    img, reason, detail = _decode(Path(task.image_root) / record.file_name)
    if img is None:
        tally.problem(reason, src.SKIP_IMAGE, record, detail=detail)
        tally.skipped_images[reason] += 1
        tally.skipped_annotations[src.IMAGE_SKIPPED] += len(record.annotations)
        return None
    orig_h, orig_w = img.shape[:2]
    if record.width is not None and (record.width, record.height) != (orig_w, orig_h):
        tally.problem(src.IMAGE_SIZE_MISMATCH, src.USE_REAL_SIZE, record,
                      detail=f"declared {record.width}x{record.height}, file is {orig_w}x{orig_h}")

    target_w, target_h = task.size
    scale, pad_x, pad_y = geometry.letterbox_params(orig_w, orig_h, target_w, target_h)
    boxes, labels, iscrowd, areas, ann_ids = [], [], [], [], []
    for ann in record.annotations:
        box = _source_boxes_xyxy(ann, orig_w, orig_h)
        clipped = geometry.clip_boxes(box, orig_w, orig_h)[0]
        if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
            tally.problem(src.BBOX_OUTSIDE, src.DROP_ANNOTATION, record, ann.ann_id,
                          f"xyxy {np.round(box, 2).tolist()} vs image {orig_w}x{orig_h}")
            tally.skipped_annotations[src.BBOX_OUTSIDE] += 1
            continue
        target = geometry.boxes_to_letterbox(clipped, scale, pad_x, pad_y)[0]
        # Float noise can push an edge a hair past the canvas; clip (no information is lost).
        target = geometry.clip_boxes(target, target_w, target_h)[0].astype(np.float32)
        if not (target[2] > target[0] and target[3] > target[1]):
            tally.problem(src.BBOX_NON_POSITIVE, src.DROP_ANNOTATION, record, ann.ann_id,
                          f"xyxy {box.tolist()} is empty at the target size")
            tally.skipped_annotations[src.BBOX_NON_POSITIVE] += 1
            continue
        if np.abs(clipped - box).max() > CLIP_TOLERANCE_PX:
            tally.problem(src.BBOX_CLIPPED, src.CLIP_BOX, record, ann.ann_id,
                          f"xyxy {np.round(box, 2).tolist()} vs image {orig_w}x{orig_h}")
            tally.annotations_clipped += 1
        boxes.append(target.tolist())
        labels.append(task.label_of[ann.category_id])
        iscrowd.append(ann.iscrowd)
        areas.append(ann.area if ann.area is not None else float(geometry.box_areas(clipped)[0]))
        ann_ids.append(ann.ann_id)
    tally.annotations_written += len(boxes)

    canvas = geometry.letterbox_image(img, target_w, target_h)
    ok, jpeg = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, task.quality])
    if not ok:  # pragma: no cover - a uint8 BGR canvas always encodes
        raise RuntimeError(f"cv2 could not encode {record.file_name}")
    tally.images_written += 1
    return {
        "image_id": record.image_id, "file_name": record.file_name, "image": jpeg.tobytes(),
        "width": target_w, "height": target_h, "orig_width": orig_w, "orig_height": orig_h,
        "scale": scale, "pad_x": pad_x, "pad_y": pad_y,
        "boxes": boxes, "labels": labels, "iscrowd": iscrowd, "areas": areas, "ann_ids": ann_ids,
    }


def _build_shard(task: _ShardTask) -> dict:
    """Process one shard's images and write the shard; returns its manifest entry."""
    tally = _Tally()
    rows = [row for row in (_image_row(r, task, tally) for r in task.records) if row is not None]
    path = Path(task.out_dir) / shards.shard_name(task.index)
    shards.write_shard(rows, path)
    return {
        "file": path.name, "rows": len(rows), "sha256": shards.file_sha256(path),
        "boxes": sum(len(r["boxes"]) for r in rows), "fingerprint": task.fingerprint,
        "counts": {"images_in": tally.images_in, "images_written": tally.images_written,
                   "annotations_in": tally.annotations_in, "annotations_written": tally.annotations_written,
                   "annotations_clipped": tally.annotations_clipped},
        "skipped": {"images": dict(tally.skipped_images), "annotations": dict(tally.skipped_annotations)},
        "problems": tally.problems,
    }


# ----------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------


def _fingerprint(records: list[src.ImageRecord], image_root: Path, encode_options: dict) -> str:
    """Hash of everything a shard's bytes depend on: records, each file's size and mtime, options."""
    digest = hashlib.sha256(json.dumps(encode_options, sort_keys=True).encode())
    for record in records:
        try:
            stat = (image_root / record.file_name).stat()
            file_state = [stat.st_size, stat.st_mtime_ns]
        except OSError:
            file_state = None
        digest.update(json.dumps([asdict(record), file_state], sort_keys=True).encode())
    return digest.hexdigest()


def _previous_manifest(out_dir: Path) -> dict | None:
    try:
        return shards.read_manifest(out_dir)
    except shards.ManifestError:
        return None  # nothing to reuse; the run writes every shard


def _reusable(entry: dict | None, fingerprint: str, out_dir: Path) -> bool:
    if not entry or entry.get("fingerprint") != fingerprint:
        return False
    path = out_dir / entry["file"]
    return path.is_file() and shards.file_sha256(path) == entry["sha256"]


def _default_workers() -> int:
    """The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _remove_leftovers(out_dir: Path, keep: set[str]) -> None:
    """Delete shard files that are not in this run's plan and temporary files of interrupted writes.

    Shards of a previous, larger run, or written by a run killed before its manifest, would otherwise
    sit next to the new ones, and every reader of the whole directory (``pq.read_table(dir)``, a DuckDB
    glob) would count their rows. Only names our writers produce are touched (``shards.SHARD_GLOB`` and
    ``shards.TEMP_GLOBS``); other files in the folder are left alone.
    """
    for pattern in (shards.SHARD_GLOB, *shards.TEMP_GLOBS):
        for path in sorted(out_dir.glob(pattern)):
            if path.name not in keep and path.is_file():
                path.unlink(missing_ok=True)


def _init_worker() -> None:
    # The pool already uses every core; cv2's own threads on top would only oversubscribe them.
    cv2.setNumThreads(1)


def _run_tasks(tasks: list[_ShardTask], workers: int) -> dict[int, dict]:
    from tqdm import tqdm

    total = sum(len(t.records) for t in tasks)
    bar = tqdm(total=total, unit="img", desc="prepare", file=sys.stderr, disable=not sys.stderr.isatty())
    entries: dict[int, dict] = {}
    try:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                entries[task.index] = _build_shard(task)
                bar.update(len(task.records))
        else:
            # spawn, not fork: the caller may hold Ray or torch threads, which fork does not copy safely.
            context = multiprocessing.get_context("spawn")
            with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                                     initializer=_init_worker) as pool:
                futures = {pool.submit(_build_shard, task): task for task in tasks}
                for future in as_completed(futures):
                    task = futures[future]
                    entries[task.index] = future.result()
                    bar.update(len(task.records))
    finally:
        bar.close()
    return entries


def _sum_counters(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def prepare_source(source: src.Source, out_dir, size, *, strict: bool = False, workers: int | None = None,
                   quality: int = 90, rows_per_shard: int = 256) -> PrepareResult:
    """Write the shards, report and manifest for an already-read source (see ``prepare_coco``)."""
    size = parse_size(size, "--size")
    if not 1 <= quality <= 100:
        raise ConfigError(f"--quality must be between 1 and 100, got {quality}")
    if rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    workers = workers or _default_workers()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    previous = _previous_manifest(out_dir)
    # No manifest while shards change: an interrupted run is then visible, never half-valid.
    (out_dir / shards.MANIFEST_NAME).unlink(missing_ok=True)
    old_entries = {entry["file"]: entry for entry in (previous or {}).get("shards", [])}

    label_of = {c["id"]: c["label"] for c in source.categories}
    encode_options = {"size": list(size), "quality": quality, "labels": sorted(label_of.items()),
                      "format": [shards.FORMAT, shards.VERSION], "cv2": cv2.__version__,
                      "pyarrow": pyarrow.__version__, "clip_tolerance": CLIP_TOLERANCE_PX}
    # One pool task per shard, so a dataset of fewer than `workers` full shards gets smaller shards, one
    # per worker: 256 images at 256 rows per shard would otherwise run on one core. The layout is still a
    # function of the inputs and options (`workers` included), so a re-run with the same ones reuses
    # every shard; with a different `workers` a small dataset is re-cut and rewritten.
    shard_rows = min(rows_per_shard, max(1, math.ceil(len(source.images) / workers)))
    entries: dict[int, dict] = {}
    tasks: list[_ShardTask] = []
    for index, start in enumerate(range(0, len(source.images), shard_rows)):
        records = source.images[start:start + shard_rows]
        fingerprint = _fingerprint(records, source.image_root, encode_options)
        old = old_entries.get(shards.shard_name(index))
        if _reusable(old, fingerprint, out_dir):
            entries[index] = old
        else:
            tasks.append(_ShardTask(index, records, str(source.image_root), str(out_dir), size, quality,
                                    label_of, fingerprint))
    reused = len(entries)
    entries.update(_run_tasks(tasks, workers))
    ordered = [entries[i] for i in sorted(entries)]
    _remove_leftovers(out_dir, {entry["file"] for entry in ordered})

    report = [p.to_dict() for p in source.problems] + [p for e in ordered for p in e["problems"]]
    skipped_images = _sum_counters([source.skipped_images] + [e["skipped"]["images"] for e in ordered])
    skipped_annotations = _sum_counters([source.skipped_annotations] + [e["skipped"]["annotations"] for e in ordered])
    written_images = sum(e["counts"]["images_written"] for e in ordered)
    written_annotations = sum(e["counts"]["annotations_written"] for e in ordered)
    counts = {
        "images_in": source.images_in, "images_written": written_images,
        "images_skipped": sum(skipped_images.values()),
        "annotations_in": source.annotations_in, "annotations_written": written_annotations,
        "annotations_skipped": sum(skipped_annotations.values()),
        "annotations_clipped": sum(e["counts"]["annotations_clipped"] for e in ordered),
    }
    # Every input is accounted for, or this is a bug in the bookkeeping above; fail loudly.
    assert counts["images_in"] == counts["images_written"] + counts["images_skipped"], counts
    assert counts["annotations_in"] == counts["annotations_written"] + counts["annotations_skipped"], counts

    options = {"source": source.kind, **source.description, "size": format_size(size), "quality": quality,
               "rows_per_shard": rows_per_shard, "shard_rows": shard_rows, "workers": workers, "strict": strict}
    manifest = {
        "format": shards.FORMAT, "version": shards.VERSION, "size": list(size),
        "categories": source.categories, "num_images": written_images, "num_boxes": written_annotations,
        "shards": ordered, "options": options,
        "skipped": {"images": skipped_images, "annotations": skipped_annotations}, "counts": counts,
    }
    shards.write_json_atomic(out_dir / shards.REPORT_NAME, report)
    shards.write_json_atomic(out_dir / shards.MANIFEST_NAME, manifest)
    return PrepareResult(out_dir, manifest, report, strict, len(tasks), reused)


def prepare_coco(ann_json, image_dir, out_dir, size=(320, 180), *, strict: bool = False, workers: int | None = None,
                 quality: int = 90, rows_per_shard: int = 256) -> PrepareResult:
    """COCO annotation file + image directory -> shards in ``out_dir`` at ``size`` (16:9).

    Raises ``ConfigError`` for a size that is not 16:9 and ``SourceError`` for a broken annotation file
    (both one line). Bad records never raise: they are skipped and listed in ``_report.json``.
    """
    parse_size(size, "--size")  # refuse a bad size before reading anything
    return prepare_source(src.read_coco(ann_json, image_dir), out_dir, size, strict=strict, workers=workers,
                          quality=quality, rows_per_shard=rows_per_shard)


def prepare_yolo(data_dir, out_dir, size=(320, 180), *, split: str = "train", strict: bool = False,
                 workers: int | None = None, quality: int = 90, rows_per_shard: int = 256) -> PrepareResult:
    """Ultralytics YOLO dataset (``data.yaml``, images/<split>, labels/<split>) -> shards; see ``prepare_coco``."""
    parse_size(size, "--size")
    return prepare_source(src.read_yolo(data_dir, split), out_dir, size, strict=strict, workers=workers,
                          quality=quality, rows_per_shard=rows_per_shard)


# ----------------------------------------------------------------------------------------------------
# `neoray prepare`
# ----------------------------------------------------------------------------------------------------


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco", metavar="ANN.json", help="COCO annotation file (with --images)")
    source.add_argument("--yolo", metavar="DATA_DIR", help="Ultralytics dataset folder holding data.yaml")
    parser.add_argument("--images", metavar="IMG_DIR", help="COCO: folder the file_names are relative to")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="YOLO: which split (train)")
    parser.add_argument("--out", required=True, metavar="SHARD_DIR", help="output shard directory")
    parser.add_argument("--size", required=True, metavar="WxH", help="target size, exactly 16:9 (e.g. 1920x1080)")
    parser.add_argument("--strict", action="store_true", help="exit 2 if any problem was found (report still written)")
    parser.add_argument("--workers", type=int, default=None, help="worker processes (default: all CPUs)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--rows-per-shard", type=int, default=256, help="images per shard file, at most (default 256; fewer when there are "
                        "fewer images than workers x this, so that every worker gets a shard)")


def run(args) -> int:
    try:
        size = parse_size(args.size, "--size")
        options = dict(strict=args.strict, workers=args.workers, quality=args.quality,
                       rows_per_shard=args.rows_per_shard)
        if args.coco:
            if not args.images:
                raise ConfigError("--coco needs --images IMG_DIR (the folder its file_names are relative to)")
            result = prepare_coco(args.coco, args.images, args.out, size, **options)
        else:
            result = prepare_yolo(args.yolo, args.out, size, split=args.split, **options)
    except (ConfigError, src.SourceError) as exc:
        print(f"neoray prepare: error: {exc}", file=sys.stderr)
        return 1
    except OSError as exc:  # e.g. the output folder cannot be created
        print(f"neoray prepare: error: {exc.filename or ''}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    print(result.summary())
    code = result.exit_code()
    if code:
        print(f"neoray prepare: --strict: {result.problems} problems (see {result.report_path})", file=sys.stderr)
    return code


__all__ = ["PrepareResult", "prepare_coco", "prepare_source", "prepare_yolo"]
