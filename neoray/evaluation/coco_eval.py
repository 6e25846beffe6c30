"""COCO box evaluation of a detector on a stream of letterboxed batches, single-process or distributed.

Every prediction is mapped back through the letterbox (``orig = (pixel - pad) / scale``, with the
Batch's own scale/pad, so multi-scale tensors are handled), clipped to the original image and scored in
original pixels with the original COCO category ids. The numbers are therefore the ones the official
COCO evaluation gives on the source annotation file.

Ground truth is either rebuilt from the stream's targets (mapped back the same way, with the stored
source ``areas`` and ``iscrowd``; every streamed image counts, also those without boxes), or read from
the source annotation file (``gt_json=``). With ``gt_json`` only the images that went through the stream
are scored (``params.imgIds``), so a shard set that skipped unreadable images is not charged for them;
a streamed image missing from the file is an error.

The engine is faster-coco-eval (C++ matching/accumulation, about 10x faster than pycocotools with the
same 12 numbers; see benchmarks/bench_coco_eval.py). pycocotools stays the reference in the tests.

Conventions of the returned metrics:

- ``map`` ... ``mar_large``: the 12 COCO summary values, unchanged, so -1.0 still means "no ground
  truth in that area range" exactly as in COCO's own output.
- ``per_class_ap``: category name -> AP@[.5:.95]; ``nan`` when the category has no ground truth in the
  evaluated images (written as ``null`` in JSON, shown as "no GT" in tables). Every manifest category
  has an entry. A category with GT but no predictions has AP 0.0.
- ``precision``, ``recall``, ``f1``: at ``score_threshold`` (default 0.5, a usual deployment
  threshold for DETR-style models) and IoU 0.5, micro-averaged over all classes, computed by our own
  greedy COCO-style matching (per image and class, detections in descending score order, each takes the
  unmatched non-crowd GT of highest IoU >= 0.5; a detection that only overlaps a crowd region, by COCO's
  crowd IoU = intersection / detection area, is ignored). Recall counts non-crowd GT. No per-image
  detection cap is applied here. ``precision`` is 0.0 when no detection passes the threshold and
  ``recall`` is 0.0 when there is no non-crowd GT.

Distributed use (gloo or nccl, e.g. inside Ray Train workers): every rank calls ``update`` on its part
of the stream, then ``summarize()`` (or ``gather()`` then ``summarize()``) on *every* rank: both are
collective. Parts are gathered with ``neoray.distributed.gather``; an image that arrives more than once (same
image id on two ranks, or twice on one) is counted once - the first occurrence by rank order wins - and
the number of dropped copies is reported as ``duplicate_images``. Rank 0 computes the metrics and
broadcasts the dict, so every rank returns the same metrics.
"""

from __future__ import annotations

import contextlib
import gc
import io
import math
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import torch
from faster_coco_eval import COCO, COCOeval_faster

from neoray import storage
from neoray.distributed import from_rank0, gather, is_distributed

STAT_NAMES = (
    "map", "map50", "map75", "map_small", "map_medium", "map_large",
    "mar1", "mar10", "mar100", "mar_small", "mar_medium", "mar_large",
)
MATCH_IOU = 0.5  # IoU of the precision/recall/f1 matching

# Column layout of the per-rank arrays (kept as plain numpy so that they pickle small and fast).
#   images: int64 (n, 3)   image_id, orig_width, orig_height
#   dets:   float64 (m, 7) occurrence, category_id, x, y, w, h, score        (occurrence = row in images)
#   gts:    float64 (k, 8) occurrence, category_id, x, y, w, h, area, iscrowd


def _to_numpy(value: Any, dtype) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        value = value.detach().to("cpu")
        if value.dtype in (torch.bfloat16, torch.float16):
            value = value.float()
        value = value.numpy()
    return np.asarray(value, dtype=dtype)


def _cat_rows(items: list, dtype, columns: int | None = None) -> np.ndarray:
    """Concatenate per-image tensors/arrays into one numpy array, (n, columns) or (n,) when columns is None.

    Tensors are joined on their device first: one device->host copy per batch instead of one per image.
    """
    shape = (-1, columns) if columns else (-1,)
    if all(isinstance(t, torch.Tensor) for t in items):
        return _to_numpy(torch.cat([t.detach().reshape(shape) for t in items]), dtype).reshape(shape)
    return np.concatenate([np.asarray(t, dtype=dtype).reshape(shape) for t in items])


def _letterbox_to_orig(boxes: np.ndarray, image_index: np.ndarray, scale: np.ndarray, pad: np.ndarray,
                       orig_sizes: np.ndarray) -> np.ndarray:
    """xyxy in tensor pixels -> COCO xywh in original pixels, clipped to the original image."""
    pad4 = np.tile(pad[image_index], 2)  # (pad_x, pad_y, pad_x, pad_y)
    xyxy = (boxes - pad4) / scale[image_index, None]
    limits = np.tile(orig_sizes[image_index], 2).astype(np.float64)
    xyxy = np.clip(xyxy, 0.0, limits)
    return np.concatenate([xyxy[:, :2], xyxy[:, 2:] - xyxy[:, :2]], axis=1)


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: COCO evaluation allocates millions of long-lived dicts and lists
    (no cycles among them), which the collector would rescan again and again (a third of the run time at
    1000 images x 100 detections; see benchmarks/bench_coco_eval.py)."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def json_safe(value: Any) -> Any:
    """NaN/inf -> None (JSON has no NaN; null reads as "no value" everywhere), numpy scalars -> Python."""
    if isinstance(value, dict):
        return {str(k): json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    if isinstance(value, (np.floating, float)):
        return float(value) if math.isfinite(value) else None
    if isinstance(value, np.integer):
        return int(value)
    return value


class CocoEvaluator:
    """Collects predictions (and GT) batch by batch, gathers across ranks, computes COCO metrics.

    ``categories``: the manifest's ``[{"id", "name", "label"}]`` (contiguous label -> original id).
    """

    def __init__(self, categories: list[dict], *, score_threshold: float = 0.5, gt_json: str | Path | None = None):
        self.categories = _check_categories(categories)
        self.score_threshold = float(score_threshold)
        self.gt_json = storage.absolute(gt_json) if gt_json else None
        if self.gt_json is not None and not storage.is_file(self.gt_json):
            raise FileNotFoundError(f"{self.gt_json}: ground-truth annotation file not found")
        labels = [c["label"] for c in self.categories]
        self._label_to_id = np.zeros(len(labels), dtype=np.int64)
        self._label_to_id[labels] = [c["id"] for c in self.categories]
        self._images: list[np.ndarray] = []
        self._dets: list[np.ndarray] = []
        self._gts: list[np.ndarray] = []
        self._num_images = 0
        self._merged: dict | None = None
        self.duplicate_images = 0

    # ------------------------------------------------------------------ collecting

    def update(self, batch: Any, outputs: list[dict]) -> None:
        """Add one batch: ``outputs[i]`` holds image i's ``boxes`` (xyxy, tensor pixels), ``scores``, ``labels``."""
        image_ids = _to_numpy(batch.image_ids, np.int64).reshape(-1)
        n = len(image_ids)
        if len(outputs) != n:
            raise ValueError(f"CocoEvaluator.update: {len(outputs)} outputs for a batch of {n} images")
        scale = _to_numpy(batch.scale, np.float64).reshape(n)
        pad = _to_numpy(batch.pad, np.float64).reshape(n, 2)
        orig = _to_numpy(batch.orig_sizes, np.int64).reshape(n, 2)
        if np.any(scale <= 0):
            bad = int(image_ids[np.argmax(scale <= 0)])
            raise ValueError(f"CocoEvaluator.update: image {bad}: letterbox scale must be > 0")
        occurrence = self._num_images + np.arange(n)
        self._images.append(np.stack([image_ids, orig[:, 0], orig[:, 1]], axis=1))
        self._num_images += n

        rows = self._flat_rows(outputs, "scores", image_ids, scale, pad, orig, "prediction")
        if rows is not None:
            index, category, xywh = rows
            scores = _cat_rows([o["scores"] for o in outputs], np.float64)
            self._dets.append(np.column_stack([occurrence[index], category, xywh, scores]))

        if self.gt_json is None:  # GT comes from the stream; with gt_json the file is the truth
            targets = batch.targets
            rows = self._flat_rows(targets, "labels", image_ids, scale, pad, orig, "target")
            if rows is not None:
                index, category, xywh = rows
                areas = _cat_rows([t["areas"] for t in targets], np.float64)
                crowd = _cat_rows([t["iscrowd"] for t in targets], np.float64)
                self._gts.append(np.column_stack([occurrence[index], category, xywh, areas, crowd]))
        self._merged = None

    def _flat_rows(self, per_image: list[dict], count_key: str, image_ids, scale, pad, orig, what: str):
        """Per-image boxes and labels (predictions or targets) flattened into one row each: (image index,
        category id, xywh in original pixels); None when the batch has none."""
        counts = np.array([len(item[count_key]) for item in per_image], dtype=np.int64)
        if not counts.sum():
            return None
        index = np.repeat(np.arange(len(per_image)), counts)
        boxes = _cat_rows([item["boxes"] for item in per_image], np.float64, 4)
        labels = _cat_rows([item["labels"] for item in per_image], np.int64)
        category = self._category_ids(labels, image_ids[index], what)
        return index, category, _letterbox_to_orig(boxes, index, scale, pad, orig)

    def _category_ids(self, labels: np.ndarray, image_ids: np.ndarray, what: str) -> np.ndarray:
        bad = (labels < 0) | (labels >= len(self._label_to_id))
        if bad.any():
            i = int(np.argmax(bad))
            raise ValueError(f"CocoEvaluator: image {int(image_ids[i])}: {what} label {int(labels[i])} is outside "
                             f"[0, {len(self._label_to_id)})")
        return self._label_to_id[labels]

    def _local_part(self) -> dict:
        return {
            "images": np.concatenate(self._images) if self._images else np.zeros((0, 3), np.int64),
            "dets": np.concatenate(self._dets) if self._dets else np.zeros((0, 7)),
            "gts": np.concatenate(self._gts) if self._gts else np.zeros((0, 8)),
        }

    # ------------------------------------------------------------------ gathering

    def gather(self) -> None:
        """Collect every rank's part (collective when distributed) and drop repeated images."""
        self._merged, self.duplicate_images = merge_parts(gather(self._local_part()))

    @property
    def detections(self) -> list[dict]:
        """The detections as a COCO results list (all ranks' after ``gather``, this rank's before)."""
        merged = self._merged if self._merged is not None else merge_parts([self._local_part()])[0]
        return _results_list(merged)

    def write_detections(self, path: str) -> str:
        """Write ``detections`` as a standard COCO results JSON, atomically, to any storage."""
        return storage.write_json(path, self.detections, indent=None, allow_nan=False)

    # ------------------------------------------------------------------ metrics

    def summarize(self) -> dict:
        """Metrics dict (see module docstring); collective when distributed, same dict on every rank."""
        if self._merged is None:
            self.gather()
        if not is_distributed():
            return self._compute()
        # Rank 0 computes; an error there is broadcast too, so that the other ranks fail instead of hanging.
        payload = None
        if torch.distributed.get_rank() == 0:
            try:
                payload = ("ok", self._compute())
            except Exception as exc:  # noqa: BLE001 - re-raised on every rank below
                payload = ("error", f"{type(exc).__name__}: {exc}")
        status, value = from_rank0(payload)
        if status == "error":
            raise RuntimeError(f"COCO evaluation failed on rank 0: {value}")
        return value

    def _compute(self) -> dict:
        with _gc_paused():
            return self._compute_metrics()

    def _compute_metrics(self) -> dict:
        merged = self._merged
        image_ids = merged["images"][:, 0]
        if len(image_ids) == 0:
            raise ValueError("COCO evaluation: no images were evaluated (empty evaluation stream)")
        coco_gt = self._load_gt(merged)
        coco_eval = run_cocoeval(coco_gt, _results_list(merged), image_ids.tolist())
        metrics = {name: float(v) for name, v in zip(STAT_NAMES, coco_eval.stats)}
        metrics["per_class_ap"] = self._per_class_ap(coco_eval)
        gt_rows = _gt_rows(coco_gt, set(image_ids.tolist()))
        # (image_id, category_id, x, y, w, h, score): occurrence numbers replaced by image ids.
        det_rows = merged["dets"].copy()
        det_rows[:, 0] = image_ids[merged["dets"][:, 0].astype(np.int64)]
        precision, recall, f1 = precision_recall_f1(det_rows, gt_rows, self.score_threshold)
        metrics.update(precision=precision, recall=recall, f1=f1, score_threshold=self.score_threshold,
                       num_images=int(len(image_ids)), num_detections=int(len(merged["dets"])),
                       num_gt=int((gt_rows[:, 6] == 0).sum()), duplicate_images=int(self.duplicate_images))
        return metrics

    def _load_gt(self, merged: dict):
        if self.gt_json is None:
            return COCO(build_gt_dataset(merged, self.categories))
        try:
            gt = storage.read_json(self.gt_json)
        except storage.JSONError as exc:  # names the file
            raise ValueError(str(exc)) from None
        except UnicodeDecodeError as exc:
            raise ValueError(f"{self.gt_json}: not a COCO annotation file ({exc})") from None
        if not isinstance(gt, dict):
            raise ValueError(f"{self.gt_json}: not a COCO annotation file (a JSON {type(gt).__name__}, not an object)")
        try:
            coco_gt = COCO(gt)
        except (ValueError, KeyError, TypeError, AssertionError) as exc:
            raise ValueError(f"{self.gt_json}: not a COCO annotation file ({type(exc).__name__}: "
                             f"{str(exc).strip().splitlines()[0] if str(exc).strip() else ''})") from None
        missing = sorted(set(merged["images"][:, 0].tolist()) - set(coco_gt.getImgIds()))
        if missing:
            raise ValueError(f"{self.gt_json}: {len(missing)} evaluated image ids are not in the annotation file "
                             f"(first: {missing[:5]}); is it the file the shards were prepared from?")
        return coco_gt

    def _per_class_ap(self, coco_eval) -> dict[str, float]:
        """name -> AP@[.5:.95] over all areas at 100 detections; NaN when the category has no GT."""
        precision = coco_eval.eval["precision"]  # [T, R, K, A, M]
        column = {int(cat_id): k for k, cat_id in enumerate(coco_eval.params.catIds)}
        names = [c["name"] for c in self.categories]
        out = {}
        for cat in self.categories:
            key = cat["name"] if names.count(cat["name"]) == 1 else f"{cat['name']} (id {cat['id']})"
            ap = float("nan")
            if cat["id"] in column:
                values = precision[:, :, column[cat["id"]], 0, -1]
                values = values[values > -1]
                if values.size:
                    ap = float(values.mean())
            out[key] = ap
        return out


def _check_categories(categories: list[dict]) -> list[dict]:
    if not categories:
        raise ValueError("CocoEvaluator: categories is empty (expected the manifest's [{id, name, label}])")
    checked = []
    for i, cat in enumerate(categories):
        try:
            checked.append({"id": int(cat["id"]), "name": str(cat["name"]), "label": int(cat["label"])})
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"CocoEvaluator: categories[{i}] = {cat!r}: expected {{id, name, label}}") from None
    labels = sorted(c["label"] for c in checked)
    if labels != list(range(len(checked))):
        raise ValueError(f"CocoEvaluator: category labels must be 0..{len(checked) - 1} once each, got {labels}")
    return sorted(checked, key=lambda c: c["label"])


def merge_parts(parts: list[dict]) -> tuple[dict, int]:
    """Concatenate per-rank parts; keep each image id's first occurrence only. Returns (merged, duplicates)."""
    images, dets, gts, offset = [], [], [], 0
    for part in parts:
        images.append(part["images"])
        # Occurrence numbers are local to a part; shift them to index the concatenated image table.
        part_dets, part_gts = part["dets"].copy(), part["gts"].copy()
        part_dets[:, 0] += offset
        part_gts[:, 0] += offset
        dets.append(part_dets)
        gts.append(part_gts)
        offset += len(part["images"])
    images_all = np.concatenate(images).reshape(-1, 3)
    dets_all = np.concatenate(dets).reshape(-1, 7)
    gts_all = np.concatenate(gts).reshape(-1, 8)
    _, first = np.unique(images_all[:, 0], return_index=True)
    keep = np.zeros(len(images_all), dtype=bool)
    keep[first] = True
    duplicates = int(len(images_all) - len(first))
    # Renumber occurrences to rows of the kept table.
    new_row = np.cumsum(keep) - 1
    dets_occ = dets_all[:, 0].astype(np.int64)
    gts_occ = gts_all[:, 0].astype(np.int64)
    dets_kept = dets_all[keep[dets_occ]]
    gts_kept = gts_all[keep[gts_occ]]
    dets_kept[:, 0] = new_row[dets_occ[keep[dets_occ]]]
    gts_kept[:, 0] = new_row[gts_occ[keep[gts_occ]]]
    return {"images": images_all[keep], "dets": dets_kept, "gts": gts_kept}, duplicates


def _results_list(merged: dict) -> list[dict]:
    image_ids = merged["images"][:, 0]
    dets = merged["dets"]
    ids = image_ids[dets[:, 0].astype(np.int64)].tolist()
    cats = dets[:, 1].astype(np.int64).tolist()
    boxes = dets[:, 2:6].tolist()
    scores = dets[:, 6].tolist()
    return [{"image_id": i, "category_id": c, "bbox": b, "score": s} for i, c, b, s in zip(ids, cats, boxes, scores)]


def build_gt_dataset(merged: dict, categories: list[dict]) -> dict:
    """A COCO ground-truth dict from gathered stream targets (original pixels, stored areas/iscrowd)."""
    images = [{"id": i, "width": w, "height": h} for i, w, h in merged["images"].tolist()]
    gts = merged["gts"]
    image_ids = merged["images"][gts[:, 0].astype(np.int64), 0].tolist()
    # Annotation ids start at 1: COCO's matcher uses id 0 as "unmatched".
    annotations = [
        {"id": k + 1, "image_id": i, "category_id": int(c), "bbox": [x, y, w, h], "area": a, "iscrowd": int(crowd)}
        for k, (i, (_, c, x, y, w, h, a, crowd)) in enumerate(zip(image_ids, gts.tolist()))
    ]
    cats = [{"id": c["id"], "name": c["name"]} for c in categories]
    return {"images": images, "annotations": annotations, "categories": cats}


def run_cocoeval(coco_gt, results: list[dict], image_ids: Iterable[int] | None = None):
    """faster-coco-eval bbox evaluation, quiet; ``results`` is not modified. Returns the COCOeval object."""
    # loadRes adds fields (id, area, segmentation) to the dicts it gets: hand it copies.
    coco_dt = coco_gt.loadRes([dict(r) for r in results])
    coco_eval = COCOeval_faster(coco_gt, coco_dt, "bbox", print_function=lambda *args, **kwargs: None)
    if image_ids is not None:
        coco_eval.params.imgIds = sorted(set(int(i) for i in image_ids))
    with contextlib.redirect_stdout(io.StringIO()):
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return coco_eval


def _gt_rows(coco_gt, image_ids: set) -> np.ndarray:
    """float64 (k, 7): image_id, category_id, x, y, w, h, iscrowd for the GT of ``image_ids``."""
    anns = [a for a in coco_gt.dataset.get("annotations", []) if a["image_id"] in image_ids]
    if not anns:
        return np.zeros((0, 7))
    return np.array([[a["image_id"], a["category_id"], *a["bbox"], int(a.get("iscrowd", 0))] for a in anns],
                    dtype=np.float64)


def _pair_iou(dets_xywh: np.ndarray, gts_xywh: np.ndarray, crowd: np.ndarray) -> np.ndarray:
    """COCO box IoU of row-aligned pairs; for crowd GT the denominator is the detection's area (as pycocotools)."""
    top_left = np.maximum(dets_xywh[:, :2], gts_xywh[:, :2])
    bottom_right = np.minimum(dets_xywh[:, :2] + dets_xywh[:, 2:], gts_xywh[:, :2] + gts_xywh[:, 2:])
    wh = np.clip(bottom_right - top_left, 0, None)
    inter = wh[:, 0] * wh[:, 1]
    det_area = dets_xywh[:, 2] * dets_xywh[:, 3]
    union = np.where(crowd, det_area, det_area + gts_xywh[:, 2] * gts_xywh[:, 3] - inter)
    return np.divide(inter, union, out=np.zeros_like(inter), where=union > 0)


def _same_group_pairs(det_keys: np.ndarray, gt_keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Every (detection, GT) index pair with the same (image_id, category_id), without a Python loop."""
    codes = np.unique(np.concatenate([det_keys, gt_keys]), axis=0, return_inverse=True)[1].reshape(-1)
    det_code, gt_code = codes[: len(det_keys)], codes[len(det_keys):]
    gt_order = np.argsort(gt_code, kind="stable")
    sorted_codes = gt_code[gt_order]
    start = np.searchsorted(sorted_codes, det_code, side="left")
    counts = np.searchsorted(sorted_codes, det_code, side="right") - start
    det_index = np.repeat(np.arange(len(det_keys)), counts)
    within = np.arange(counts.sum()) - np.repeat(np.cumsum(counts) - counts, counts)
    return det_index, gt_order[np.repeat(start, counts) + within]


def precision_recall_f1(dets: np.ndarray, gts: np.ndarray, score_threshold: float,
                        iou_threshold: float = MATCH_IOU) -> tuple[float, float, float]:
    """Micro precision/recall/F1 of detections with score >= threshold, greedy COCO-style matching.

    ``dets``: (m, 7) image_id, category_id, x, y, w, h, score. ``gts``: (k, 7) image_id, category_id,
    x, y, w, h, iscrowd. See the module docstring for the rules. IoUs are computed vectorised for the
    pairs of the same image and class; only the pairs above the IoU threshold go through the greedy loop.
    """
    dets = dets[dets[:, 6] >= score_threshold]
    crowd = gts[:, 6] != 0
    num_gt = int((~crowd).sum())
    tp = ignored = 0
    if len(dets) and len(gts):
        det_index, gt_index = _same_group_pairs(dets[:, :2], gts[:, :2])
        iou = _pair_iou(dets[det_index, 2:6], gts[gt_index, 2:6], crowd[gt_index])
        good = iou >= iou_threshold
        det_index, gt_index, iou = det_index[good], gt_index[good], iou[good]
        pair_crowd = crowd[gt_index]
        # COCO's greedy order: detections by descending score (ties: input order); for each detection its
        # non-crowd candidates by descending IoU, then crowd regions.
        order = np.lexsort((-iou, pair_crowd, det_index, -dets[det_index, 6]))
        taken_gt: set[int] = set()
        decided: set[int] = set()
        for d, g, is_crowd in zip(det_index[order].tolist(), gt_index[order].tolist(), pair_crowd[order].tolist()):
            if d in decided:
                continue
            if is_crowd:  # no free non-crowd GT left for it, but it lies in a crowd region: ignored
                ignored += 1
                decided.add(d)
            elif g not in taken_gt:
                taken_gt.add(g)
                tp += 1
                decided.add(d)
    fp = len(dets) - tp - ignored
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / num_gt if num_gt else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return float(precision), float(recall), float(f1)


def format_metrics_table(metrics: dict) -> str:
    """The overall metrics and the per-class AP as a plain-text table."""
    lines = [f"{'metric':<14} {'value':>8}"]
    for name in (*STAT_NAMES, "precision", "recall", "f1"):
        if name in metrics:
            # COCO writes -1 for an area range without ground truth; say so instead of printing -1.0000.
            value = "no GT" if name in STAT_NAMES and metrics[name] == -1 else f"{metrics[name]:.4f}"
            lines.append(f"{name:<14} {value:>8}")
    if "score_threshold" in metrics:
        lines.append(f"(precision/recall/f1 at score >= {metrics['score_threshold']:g}, IoU {MATCH_IOU})")
    per_class = metrics.get("per_class_ap", {})
    if per_class:
        width = max(14, max(len(k) for k in per_class))
        lines += ["", f"{'class':<{width}} {'AP':>8}"]
        for name, ap in per_class.items():
            value = "no GT" if ap is None or (isinstance(ap, float) and math.isnan(ap)) else f"{ap:.4f}"
            lines.append(f"{name:<{width}} {value:>8}")
    return "\n".join(lines)


def _unwrap(model: torch.nn.Module) -> torch.nn.Module:
    # A DDP forward broadcasts buffers (a collective): with uneven eval parts it would hang, so evaluate
    # the wrapped module directly.
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model


def run_evaluator(model: torch.nn.Module, batches: Iterable, evaluator: CocoEvaluator, device,
                  amp_dtype: torch.dtype | None = None) -> CocoEvaluator:
    """Run ``model`` in eval mode under no_grad on ``device`` over ``batches``, feeding ``evaluator``."""
    net = _unwrap(model)
    device = torch.device(device)
    was_training = net.training
    net.eval()
    try:
        with torch.no_grad():
            for batch in batches:
                images = batch.images.to(device, non_blocking=True)
                autocast = torch.autocast(device.type, dtype=amp_dtype) if amp_dtype else contextlib.nullcontext()
                with autocast:
                    outputs = net(images)
                evaluator.update(batch, outputs)
    finally:
        net.train(was_training)
    return evaluator


def evaluate(model: torch.nn.Module, batches: Iterable, categories: list[dict], device, *,
             score_threshold: float = 0.5, gt_json: str | Path | None = None,
             amp_dtype: torch.dtype | None = None) -> dict:
    """Evaluate ``model`` on ``batches`` (this rank's part): run, gather, summarize. Collective when distributed."""
    evaluator = CocoEvaluator(categories, score_threshold=score_threshold, gt_json=gt_json)
    run_evaluator(model, batches, evaluator, device, amp_dtype)
    evaluator.gather()
    return evaluator.summarize()


__all__ = [
    "STAT_NAMES", "CocoEvaluator", "build_gt_dataset", "evaluate", "format_metrics_table", "json_safe",
    "merge_parts", "precision_recall_f1", "run_cocoeval", "run_evaluator",
]
