"""``neoray prepare``: a COCO or YOLO dataset -> validated, letterboxed 16:9 Parquet shards.

Steps: read and validate the source (``neoray.data.sources``), sort the images by id and cut them into
shards of ``rows_per_shard`` (fewer when that leaves a worker idle), then, one task per shard, open
every image, check its boxes against its real size, letterbox it (``neoray.data.geometry``),
JPEG-encode it and write the shard as one object (``neoray.data.shards``). Then shard and temporary
files that are not part of this run are deleted, and finally ``_report.json`` (one entry per problem)
and ``_manifest.json`` are written. The manifest is removed first and written last: it is the commit
point, so an interrupted run leaves a directory that no reader takes for a finished one.

Sources and output go through ``neoray.storage`` (local, shared mount, ``s3://``, ...). The shard tasks
run in a local process pool, or as Ray tasks on every node of a cluster (``--ray``, ``--address`` or
``RAY_ADDRESS``); both write the same bytes for the same input and options.

Reading an image is bounded (``neoray.data.image_files``): regular files only, a size cap, and a pixel
limit checked in the header before decoding.

A shard whose inputs are unchanged (same fingerprint) and whose file still has the recorded sha256 is
reused as is on a re-run. Bad records are skipped, counted and reported; ``--strict`` then exits 1.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import math
import multiprocessing
import os
import socket
import sys
from collections import Counter
from concurrent.futures import ProcessPoolExecutor, as_completed
from dataclasses import asdict, dataclass, field

import cv2
import numpy as np
import pyarrow
import ray
from tqdm import tqdm

from neoray import cluster, storage
from neoray.config import ConfigError, format_size, parse_size
from neoray.data import geometry, shards
from neoray.data import sources as src
from neoray.data.image_files import DEFAULT_MAX_IMAGE_BYTES, DEFAULT_MAX_IMAGE_PIXELS, Refused, read_image

# Boxes overshooting the image by at most this many pixels are float noise (YOLO's normalised text,
# tools that write x + w = width + 1e-6): clipped without a report entry.
CLIP_TOLERANCE_PX = 0.01
# A box narrower or lower than this at the target size is kept but reported: a model cannot see it.
MIN_BOX_SIDE_PX = 1.0


@dataclass
class PrepareResult:
    out_dir: str  # absolute path or URI
    manifest: dict
    report: list[dict]  # the entries of _report.json
    strict: bool = False
    shards_written: int = 0
    shards_reused: int = 0

    @property
    def problems(self) -> int:
        return len(self.report)

    @property
    def warnings(self) -> int:
        return sum(self.manifest["warnings"].values())

    @property
    def counts(self) -> dict:
        return self.manifest["counts"]

    @property
    def manifest_path(self) -> str:
        return storage.join(self.out_dir, shards.MANIFEST_NAME)

    @property
    def report_path(self) -> str:
        return storage.join(self.out_dir, shards.REPORT_NAME)

    def summary(self) -> str:
        c = self.counts
        images = (f"{c['images_written']} images ({c['images_skipped']} skipped, "
                  f"{c['images_without_boxes']} without boxes")
        if self.manifest["options"]["source"] == "yolo":
            images += f", {c['images_without_label_file']} without a label file"
        return (f"prepared {images}), {c['annotations_written']} boxes ({c['annotations_skipped']} annotations "
                f"skipped, {c['annotations_clipped']} clipped), {self.problems} problems ({self.warnings} warnings); "
                f"{self.shards_written + self.shards_reused} shards ({self.shards_reused} reused) in {self.out_dir}; "
                f"report: {self.report_path}")


# ----------------------------------------------------------------------------------------------------
# Worker side: one shard per task
# ----------------------------------------------------------------------------------------------------


@dataclass
class _ShardTask:
    index: int
    records: list[src.ImageRecord]
    image_root: str  # absolute path or URI: tasks may run on another node
    out_dir: str
    size: tuple[int, int]
    quality: int
    label_of: dict[int, int]  # source category id -> contiguous label
    fingerprint: str
    max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS
    max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES
    exif_orientation: bool = False  # decode in the displayed (EXIF-rotated) frame: YOLO


@dataclass
class _Tally:
    """What happened to one shard's images and annotations (summed over shards for the manifest)."""

    images_in: int = 0
    images_written: int = 0
    images_without_boxes: int = 0
    annotations_in: int = 0
    annotations_written: int = 0
    annotations_clipped: int = 0
    skipped_images: Counter = field(default_factory=Counter)
    skipped_annotations: Counter = field(default_factory=Counter)
    problems: list[dict] = field(default_factory=list)

    def problem(self, reason, action, record, ann_id=None, detail=""):
        self.problems.append(src.Problem(reason, action, record.file_name, record.image_id, ann_id, detail).to_dict())


def _source_boxes_xyxy(ann: src.Annotation, width: int, height: int) -> np.ndarray:
    if ann.normalized:
        return geometry.cxcywh_to_xyxy(np.array(ann.bbox) * [width, height, width, height])[0]
    return geometry.xywh_to_xyxy(ann.bbox)[0]


def _check_declared_size(record: src.ImageRecord, orig_w: int, orig_h: int, orientation: int, tally: _Tally):
    if record.width is None or (record.width, record.height) == (orig_w, orig_h):
        return
    detail = f"declared {record.width}x{record.height}, file is {orig_w}x{orig_h}"
    if orientation in (5, 6, 7, 8) and (record.width, record.height) == (orig_h, orig_w):
        detail += (f" ({orig_h}x{orig_w} once its EXIF orientation {orientation} is applied; COCO boxes are "
                   f"taken in the stored frame)")
    tally.problem(src.IMAGE_SIZE_MISMATCH, src.USE_REAL_SIZE, record, detail=detail)


@dataclass
class _Boxes:
    boxes: list = field(default_factory=list)
    labels: list = field(default_factory=list)
    iscrowd: list = field(default_factory=list)
    areas: list = field(default_factory=list)
    ann_ids: list = field(default_factory=list)


def _target_box(ann, record, orig_w, orig_h, letterbox, task, tally) -> tuple[np.ndarray, np.ndarray] | None:
    """(clipped source box, box at the target size), or None when the annotation is dropped."""
    box = _source_boxes_xyxy(ann, orig_w, orig_h)
    clipped = geometry.clip_boxes(box, orig_w, orig_h)[0]
    if clipped[2] - clipped[0] <= 0 or clipped[3] - clipped[1] <= 0:
        tally.problem(src.BBOX_OUTSIDE, src.DROP_ANNOTATION, record, ann.ann_id,
                      f"xyxy {np.round(box, 2).tolist()} vs image {orig_w}x{orig_h}")
        tally.skipped_annotations[src.BBOX_OUTSIDE] += 1
        return None
    target_w, target_h = task.size
    target = geometry.boxes_to_letterbox(clipped, *letterbox)[0]
    # Float noise can push an edge a hair past the canvas; clip (no information is lost).
    target = geometry.clip_boxes(target, target_w, target_h)[0].astype(np.float32)
    if not (target[2] > target[0] and target[3] > target[1]):
        tally.problem(src.BBOX_NON_POSITIVE, src.DROP_ANNOTATION, record, ann.ann_id,
                      f"xyxy {box.tolist()} is empty at the target size")
        tally.skipped_annotations[src.BBOX_NON_POSITIVE] += 1
        return None
    if np.abs(clipped - box).max() > CLIP_TOLERANCE_PX:
        tally.problem(src.BBOX_CLIPPED, src.CLIP_BOX, record, ann.ann_id,
                      f"xyxy {np.round(box, 2).tolist()} vs image {orig_w}x{orig_h}")
        tally.annotations_clipped += 1
    side_w, side_h = float(target[2] - target[0]), float(target[3] - target[1])
    if min(side_w, side_h) < MIN_BOX_SIDE_PX:
        tally.problem(src.BBOX_SUBPIXEL, src.KEPT, record, ann.ann_id,
                      f"{side_w:.3g}x{side_h:.3g} pixels at {target_w}x{target_h} (image {orig_w}x{orig_h})")
    return clipped, target


def _boxes(record: src.ImageRecord, orig_w: int, orig_h: int, letterbox, task: _ShardTask, tally: _Tally) -> _Boxes:
    out = _Boxes()
    for ann in record.annotations:
        kept = _target_box(ann, record, orig_w, orig_h, letterbox, task, tally)
        if kept is None:
            continue
        clipped, target = kept
        out.boxes.append(target.tolist())
        out.labels.append(task.label_of[ann.category_id])
        out.iscrowd.append(ann.iscrowd)
        out.areas.append(ann.area if ann.area is not None else float(geometry.box_areas(clipped)[0]))
        out.ann_ids.append(ann.ann_id)
    return out


def _image_row(record: src.ImageRecord, task: _ShardTask, tally: _Tally) -> dict | None:
    tally.images_in += 1
    tally.annotations_in += len(record.annotations)
    loaded = read_image(storage.join(task.image_root, record.file_name), max_bytes=task.max_image_bytes,
                        max_pixels=task.max_image_pixels, exif_orientation=task.exif_orientation)
    if isinstance(loaded, Refused):
        tally.problem(loaded.reason, src.SKIP_IMAGE, record, detail=loaded.detail)
        tally.skipped_images[loaded.reason] += 1
        tally.skipped_annotations[src.IMAGE_SKIPPED] += len(record.annotations)
        return None
    img, orientation = loaded
    orig_h, orig_w = img.shape[:2]
    _check_declared_size(record, orig_w, orig_h, orientation, tally)
    target_w, target_h = task.size
    scale, pad_x, pad_y = geometry.letterbox_params(orig_w, orig_h, target_w, target_h)
    boxes = _boxes(record, orig_w, orig_h, (scale, pad_x, pad_y), task, tally)
    tally.annotations_written += len(boxes.boxes)
    tally.images_without_boxes += not boxes.boxes

    canvas = geometry.letterbox_image(img, target_w, target_h)
    ok, jpeg = cv2.imencode(".jpg", canvas, [cv2.IMWRITE_JPEG_QUALITY, task.quality])
    if not ok:  # pragma: no cover - a uint8 BGR canvas always encodes
        raise RuntimeError(f"cv2 could not encode {record.file_name}")
    tally.images_written += 1
    return {
        "image_id": record.image_id, "file_name": record.file_name, "image": jpeg.tobytes(),
        "width": target_w, "height": target_h, "orig_width": orig_w, "orig_height": orig_h,
        "scale": scale, "pad_x": pad_x, "pad_y": pad_y, **asdict(boxes),
    }


def _build_shard(task: _ShardTask) -> dict:
    """Process one shard's images and write the shard as one object; returns its manifest entry."""
    tally = _Tally()
    rows = [row for row in (_image_row(r, task, tally) for r in task.records) if row is not None]
    name = shards.shard_name(task.index)
    digest = shards.write_shard(rows, storage.join(task.out_dir, name))
    return {
        "file": name, "rows": len(rows), "sha256": digest,
        "boxes": sum(len(r["boxes"]) for r in rows), "fingerprint": task.fingerprint,
        "counts": {"images_in": tally.images_in, "images_written": tally.images_written,
                   "images_without_boxes": tally.images_without_boxes,
                   "annotations_in": tally.annotations_in, "annotations_written": tally.annotations_written,
                   "annotations_clipped": tally.annotations_clipped},
        "skipped": {"images": dict(tally.skipped_images), "annotations": dict(tally.skipped_annotations)},
        "problems": tally.problems,
    }


def _require_visible(task: _ShardTask) -> None:
    """On another node a local path is only there when it is a shared mount: say so, instead of
    reporting every image missing and writing shards onto that node's own disk."""
    for path, what in ((task.image_root, "image root"), (task.out_dir, "output folder")):
        if storage.local_path(path) is not None and not storage.is_dir(path):
            raise storage.StorageError(f"{path}: {what} not found on node {socket.gethostname()}; on a "
                                       f"multi-node cluster use a shared mount or an object store URI (s3://...)")


def _build_shard_on_node(task: _ShardTask) -> dict:
    """A Ray task: one CPU, so cv2's own threads would only oversubscribe it."""
    cv2.setNumThreads(1)
    _require_visible(task)
    return _build_shard(task)


# ----------------------------------------------------------------------------------------------------
# Driver side
# ----------------------------------------------------------------------------------------------------


def _file_states(source: src.Source) -> dict[str, list | None]:
    """[size, mtime] of every record's file (None when it is not a regular file). On object storage one
    listing of the image root, not one request per image."""
    root = source.image_root
    if storage.is_uri(root):
        prefix = len(root.rstrip("/")) + 1
        listed = {e.path[prefix:]: [e.size, e.mtime_ns] for e in storage.list_files(root) if e.kind == "file"}
        return {r.file_name: listed.get(r.file_name) for r in source.images}
    states = {}
    for record in source.images:
        try:
            found = storage.info(storage.join(root, record.file_name))
        except storage.StorageError:
            found = None
        states[record.file_name] = [found.size, found.mtime_ns] if found and found.kind == "file" else None
    return states


def _fingerprint(records: list[src.ImageRecord], states: dict, encode_options: dict) -> str:
    """Hash of everything a shard's bytes depend on: records, each file's size and mtime, options."""
    digest = hashlib.sha256(json.dumps(encode_options, sort_keys=True).encode())
    for record in records:
        digest.update(json.dumps([asdict(record), states.get(record.file_name)], sort_keys=True).encode())
    return digest.hexdigest()


def _previous_manifest(out_dir: str) -> dict | None:
    try:
        return shards.read_manifest(out_dir)
    except shards.ManifestError:
        return None  # nothing to reuse; the run writes every shard


def _reusable(entry: dict | None, fingerprint: str, out_dir: str) -> bool:
    if not entry or entry.get("fingerprint") != fingerprint:
        return False
    try:
        return storage.sha256(storage.join(out_dir, entry["file"])) == entry["sha256"]
    except OSError:  # gone or unreadable: written again
        return False


def _default_workers() -> int:
    """The CPUs this process may run on (a container or taskset may allow fewer than the machine has)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def _remove_leftovers(out_dir: str, keep: set[str]) -> None:
    """Delete shard files that are not in this run's plan and temporary files of interrupted writes.

    Shards of a previous, larger run, or written by a run killed before its manifest, would otherwise
    sit next to the new ones, and every reader of the whole directory (``pq.read_table(dir)``, a DuckDB
    glob) would count their rows. Only names our writers produce are touched (``shards.SHARD_GLOB`` and
    ``shards.TEMP_GLOBS``); other files in the folder are left alone.
    """
    patterns = (shards.SHARD_GLOB, *shards.TEMP_GLOBS)
    for entry in storage.list_dir(out_dir):
        ours = any(fnmatch.fnmatchcase(entry.name, pattern) for pattern in patterns)
        if ours and entry.kind == "file" and entry.name not in keep:
            storage.remove(entry.path)


def _init_worker() -> None:
    # The pool already uses every core; cv2's own threads on top would only oversubscribe them.
    cv2.setNumThreads(1)


def _progress(tasks: list[_ShardTask]):
    return tqdm(total=sum(len(t.records) for t in tasks), unit="img", desc="prepare", file=sys.stderr,
                disable=not sys.stderr.isatty())


def _run_tasks(tasks: list[_ShardTask], workers: int) -> dict[int, dict]:
    """The local executor: this process, or a pool of ``workers`` processes."""
    entries: dict[int, dict] = {}
    with _progress(tasks) as bar:
        if workers <= 1 or len(tasks) <= 1:
            for task in tasks:
                entries[task.index] = _build_shard(task)
                bar.update(len(task.records))
            return entries
        # spawn, not fork: the caller may hold Ray or torch threads, which fork does not copy safely.
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(max_workers=min(workers, len(tasks)), mp_context=context,
                                 initializer=_init_worker) as pool:
            futures = {pool.submit(_build_shard, task): task for task in tasks}
            try:
                for future in as_completed(futures):
                    task = futures[future]
                    entries[task.index] = future.result()
                    bar.update(len(task.records))
            except BaseException:
                pool.shutdown(cancel_futures=True)  # one failure ends the run; queued shards never start
                raise
    return entries


def _ray_result(ref) -> dict:
    try:
        return ray.get(ref)
    except ray.exceptions.RayTaskError as exc:
        # The task's own exception (one line, e.g. a StorageError), not Ray's wrapper with its traceback.
        cause = getattr(exc, "cause", None)
        if isinstance(cause, Exception):
            raise cause from None
        raise


def _run_ray_tasks(tasks: list[_ShardTask]) -> dict[int, dict]:
    """The cluster executor: one Ray task (one CPU) per shard, on any node; results as they finish."""
    # A shard task that failed on storage (an object store's transient error) is tried again.
    remote = ray.remote(num_cpus=1, max_retries=3, retry_exceptions=[storage.StorageError])(_build_shard_on_node)
    pending = {remote.remote(task): task for task in tasks}
    entries: dict[int, dict] = {}
    with _progress(tasks) as bar:
        try:
            while pending:
                done, _ = ray.wait(list(pending), num_returns=1)
                for ref in done:
                    task = pending.pop(ref)
                    entries[task.index] = _ray_result(ref)
                    bar.update(len(task.records))
        except BaseException:
            for ref in pending:
                ray.cancel(ref)
            raise
    return entries


def _connect_ray(address: str | None) -> int:
    """Connect (``neoray.cluster``'s policy); returns the cluster's CPUs."""
    info = cluster.connect(address)
    if info.cpus < 1:
        raise cluster.ClusterError(f"the Ray cluster at {info.address} has no CPUs to run prepare tasks on")
    return int(info.cpus)


def _sum_counters(dicts) -> dict:
    total: Counter = Counter()
    for d in dicts:
        total.update(d)
    return dict(sorted(total.items()))


def _check_options(quality: int, rows_per_shard: int, workers: int | None, max_image_pixels: int,
                   max_image_bytes: int) -> None:
    if not 1 <= quality <= 100:
        raise ConfigError(f"--quality must be between 1 and 100, got {quality}")
    if rows_per_shard < 1:
        raise ConfigError(f"--rows-per-shard must be >= 1, got {rows_per_shard}")
    if workers is not None and workers < 1:
        raise ConfigError(f"--workers must be >= 1, got {workers}")
    if max_image_pixels < 1:
        raise ConfigError(f"--max-image-pixels must be >= 1, got {max_image_pixels}")
    if max_image_bytes < 1:
        raise ConfigError(f"--max-image-bytes must be >= 1, got {max_image_bytes}")


def _plan(source: src.Source, out_dir: str, template: _ShardTask, shard_rows: int, encode_options: dict,
          previous: dict | None) -> tuple[list[_ShardTask], dict[int, dict]]:
    """Tasks for the shards to write, and the manifest entries of the shards reused as they are."""
    old_entries = {entry["file"]: entry for entry in (previous or {}).get("shards", [])}
    states = _file_states(source)
    tasks, reused = [], {}
    for index, start in enumerate(range(0, len(source.images), shard_rows)):
        records = source.images[start:start + shard_rows]
        fingerprint = _fingerprint(records, states, encode_options)
        old = old_entries.get(shards.shard_name(index))
        if _reusable(old, fingerprint, out_dir):
            reused[index] = old
        else:
            tasks.append(_ShardTask(**{**template.__dict__, "index": index, "records": records,
                                       "fingerprint": fingerprint}))
    return tasks, reused


def _manifest(source: src.Source, ordered: list[dict], size, options: dict) -> tuple[dict, list[dict]]:
    report = [p.to_dict() for p in source.problems] + [p for e in ordered for p in e["problems"]]
    skipped_images = _sum_counters([source.skipped_images] + [e["skipped"]["images"] for e in ordered])
    skipped_annotations = _sum_counters([source.skipped_annotations] + [e["skipped"]["annotations"] for e in ordered])
    total = lambda key: sum(e["counts"][key] for e in ordered)  # noqa: E731
    counts = {
        "images_in": source.images_in, "images_written": total("images_written"),
        "images_skipped": sum(skipped_images.values()), "images_without_boxes": total("images_without_boxes"),
        "images_without_label_file": source.images_without_label_file,
        "annotations_in": source.annotations_in, "annotations_written": total("annotations_written"),
        "annotations_skipped": sum(skipped_annotations.values()), "annotations_clipped": total("annotations_clipped"),
    }
    # Every input is accounted for, or this is a bug in the bookkeeping above; fail loudly.
    assert counts["images_in"] == counts["images_written"] + counts["images_skipped"], counts
    assert counts["annotations_in"] == counts["annotations_written"] + counts["annotations_skipped"], counts
    manifest = {
        "format": shards.FORMAT, "version": shards.VERSION, "size": list(size),
        "categories": source.categories, "num_images": counts["images_written"],
        "num_boxes": counts["annotations_written"], "shards": ordered, "options": options,
        "skipped": {"images": skipped_images, "annotations": skipped_annotations,
                    "categories": dict(sorted(source.skipped_categories.items()))},
        "warnings": dict(sorted(Counter(e["reason"] for e in report if src.is_warning(e)).items())),
        "counts": counts,
    }
    return manifest, report


def prepare_source(source: src.Source, out_dir, size, *, strict: bool = False, workers: int | None = None,
                   quality: int = 90, rows_per_shard: int = 256, max_image_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
                   max_image_bytes: int = DEFAULT_MAX_IMAGE_BYTES, ray: bool = False,
                   address: str | None = None) -> PrepareResult:
    """Write the shards, report and manifest for an already-read source (see ``prepare_coco``)."""
    size = parse_size(size, "--size")
    _check_options(quality, rows_per_shard, workers, max_image_pixels, max_image_bytes)
    out_dir = storage.absolute(out_dir)
    storage.probe_writable(out_dir)  # a read-only output is one line before any image is decoded
    use_ray = ray or address is not None
    cluster_cpus = _connect_ray(address) if use_ray else 0
    workers = workers or cluster_cpus or _default_workers()
    storage.makedirs(out_dir)
    previous = _previous_manifest(out_dir)
    # No manifest while shards change: an interrupted run is then visible, never half-valid.
    storage.remove(storage.join(out_dir, shards.MANIFEST_NAME))

    label_of = {c["id"]: c["label"] for c in source.categories}
    limits = {"max_image_pixels": max_image_pixels, "max_image_bytes": max_image_bytes,
              "exif_orientation": source.apply_exif_orientation}
    encode_options = {"size": list(size), "quality": quality, "labels": sorted(label_of.items()),
                      "format": [shards.FORMAT, shards.VERSION], "cv2": cv2.__version__,
                      "pyarrow": pyarrow.__version__, "clip_tolerance": CLIP_TOLERANCE_PX,
                      "min_box_side": MIN_BOX_SIDE_PX, **limits}
    # One task per shard, so a dataset of fewer than `workers` full shards gets smaller shards, one per
    # worker: 256 images at 256 rows per shard would otherwise run on one core. The layout is still a
    # function of the inputs and options (`workers` included), so a re-run with the same ones reuses
    # every shard; with a different `workers` a small dataset is re-cut and rewritten.
    shard_rows = min(rows_per_shard, max(1, math.ceil(len(source.images) / workers)))
    template = _ShardTask(0, [], source.image_root, out_dir, size, quality, label_of, "", **limits)
    tasks, entries = _plan(source, out_dir, template, shard_rows, encode_options, previous)
    reused = len(entries)
    entries.update(_run_ray_tasks(tasks) if use_ray else _run_tasks(tasks, workers))
    ordered = [entries[i] for i in sorted(entries)]
    _remove_leftovers(out_dir, {entry["file"] for entry in ordered})

    options = {"source": source.kind, **source.description, "size": format_size(size), "quality": quality,
               "rows_per_shard": rows_per_shard, "shard_rows": shard_rows, "workers": workers, "strict": strict,
               **limits}
    manifest, report = _manifest(source, ordered, size, options)
    storage.write_json(storage.join(out_dir, shards.REPORT_NAME), report)
    storage.write_json(storage.join(out_dir, shards.MANIFEST_NAME), manifest)  # the commit point: last
    return PrepareResult(out_dir, manifest, report, strict, len(tasks), reused)


def prepare_coco(ann_json, image_dir, out_dir, size=(320, 180), *, strict: bool = False, workers: int | None = None,
                 quality: int = 90, rows_per_shard: int = 256, **options) -> PrepareResult:
    """COCO annotation file + image directory -> shards in ``out_dir`` at ``size`` (16:9).

    Any of the paths may be local or a URI. ``options``: ``max_image_pixels``, ``max_image_bytes``,
    ``ray`` and ``address`` (see ``prepare_source``). Raises ``ConfigError`` for a size that is not 16:9
    and ``SourceError`` for a broken annotation file (both one line). Bad records never raise: they are
    skipped and listed in ``_report.json``.
    """
    parse_size(size, "--size")  # refuse a bad size or an output that cannot be written before reading anything
    storage.probe_writable(storage.absolute(out_dir))
    return prepare_source(src.read_coco(ann_json, image_dir), out_dir, size, strict=strict, workers=workers,
                          quality=quality, rows_per_shard=rows_per_shard, **options)


def prepare_yolo(data_dir, out_dir, size=(320, 180), *, split: str = "train", strict: bool = False,
                 workers: int | None = None, quality: int = 90, rows_per_shard: int = 256,
                 **options) -> PrepareResult:
    """Ultralytics YOLO dataset (``data.yaml``, images/<split>, labels/<split>) -> shards; see ``prepare_coco``."""
    parse_size(size, "--size")
    storage.probe_writable(storage.absolute(out_dir))
    return prepare_source(src.read_yolo(data_dir, split), out_dir, size, strict=strict, workers=workers,
                          quality=quality, rows_per_shard=rows_per_shard, **options)


__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS", "PrepareResult",
           "prepare_coco", "prepare_source", "prepare_yolo"]
