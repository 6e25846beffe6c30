"""pycocotools vs faster-coco-eval on the same detections, timed in one run.

    python benchmarks/bench_coco_eval.py [--images 1000] [--detections 100] [--seed 0]

Builds a synthetic COCO ground truth (16:9 images, a few boxes of every area range, 10 classes) and
``--detections`` detections per image (most near a GT box, jittered; the rest random), then times
loadRes + evaluate + accumulate + summarize with each library and prints both times, the ratio
(pycocotools / faster-coco-eval) and whether all 12 summary values are equal. A third line times
neoray's CocoEvaluator on the same detections fed as letterboxed 640x360 batches of 8 (update: mapping
back to original pixels; summarize: GT building, faster-coco-eval, per-class AP, precision/recall/f1).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import io
import time

import numpy as np


def synthetic_coco(num_images: int, detections_per_image: int, seed: int) -> tuple[dict, list[dict]]:
    rng = np.random.default_rng(seed)
    categories = [{"id": i + 1, "name": f"class{i}"} for i in range(10)]
    images, annotations, results = [], [], []
    for image_id in range(1, num_images + 1):
        width, height = 1920, 1080
        images.append({"id": image_id, "width": width, "height": height})
        boxes = []
        for _ in range(int(rng.integers(1, 12))):
            side = float(rng.choice([20.0, 60.0, 250.0]))
            w, h = side * rng.uniform(0.6, 1.4), side * rng.uniform(0.6, 1.4)
            x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
            category = int(rng.integers(1, 11))
            boxes.append((x, y, w, h, category))
            annotations.append({"id": len(annotations) + 1, "image_id": image_id, "category_id": category,
                                "bbox": [x, y, w, h], "area": w * h, "iscrowd": 0})
        for _ in range(detections_per_image):
            if rng.random() < 0.6:
                x, y, w, h, category = boxes[int(rng.integers(len(boxes)))]
                x, y = x + rng.normal(0, 0.15) * w, y + rng.normal(0, 0.15) * h
                w, h = w * rng.uniform(0.8, 1.25), h * rng.uniform(0.8, 1.25)
                if rng.random() < 0.2:
                    category = int(rng.integers(1, 11))
            else:
                w, h = rng.uniform(5, 300, 2)
                x, y = rng.uniform(0, width - w), rng.uniform(0, height - h)
                category = int(rng.integers(1, 11))
            # Inside the image, as a model's (clipped) output is: neoray clips, the raw libraries do not.
            x, y = min(max(x, 0.0), width - 1.0), min(max(y, 0.0), height - 1.0)
            w, h = min(w, width - x), min(h, height - y)
            results.append({"image_id": image_id, "category_id": category,
                            "bbox": [float(x), float(y), float(w), float(h)], "score": float(rng.random())})
    return {"images": images, "annotations": annotations, "categories": categories}, results


def run(coco_cls, eval_cls, gt: dict, results: list[dict]) -> tuple[float, np.ndarray]:
    """Seconds for loadRes + evaluate + accumulate + summarize (index building of the GT excluded)."""
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = coco_cls()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        dets = copy.deepcopy(results)
        start = time.perf_counter()
        coco_dt = coco_gt.loadRes(dets)
        coco_eval = eval_cls(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
        seconds = time.perf_counter() - start
    return seconds, np.asarray(coco_eval.stats)[:12]


def run_neoray(gt: dict, results: list[dict], batch_size: int = 8) -> tuple[float, np.ndarray]:
    """Seconds for CocoEvaluator.update over all batches + summarize (GT from the batches' targets)."""
    from types import SimpleNamespace

    import torch

    from neoray.evaluation.coco_eval import STAT_NAMES, CocoEvaluator

    categories = [{"id": c["id"], "name": c["name"], "label": i} for i, c in enumerate(gt["categories"])]
    label_of = {c["id"]: c["label"] for c in categories}
    scale = 640 / 1920  # 1920x1080 -> 640x360: a pure scale, no pad
    by_image: dict[int, tuple[list, list]] = {img["id"]: ([], []) for img in gt["images"]}
    for ann in gt["annotations"]:
        by_image[ann["image_id"]][0].append(ann)
    for det in results:
        by_image[det["image_id"]][1].append(det)

    def xyxy(items):
        boxes = np.array([r["bbox"] for r in items], dtype=np.float64).reshape(-1, 4)
        return torch.tensor(np.concatenate([boxes[:, :2], boxes[:, :2] + boxes[:, 2:]], 1) * scale, dtype=torch.float32)

    def labels(items):
        return torch.tensor([label_of[r["category_id"]] for r in items], dtype=torch.int64)

    batches = []  # built before timing: in training they come from the stream and the model
    ids = list(by_image)
    for start in range(0, len(ids), batch_size):
        chunk = ids[start:start + batch_size]
        targets = [{"boxes": xyxy(by_image[i][0]), "labels": labels(by_image[i][0]),
                    "iscrowd": torch.zeros(len(by_image[i][0]), dtype=torch.bool),
                    "areas": torch.tensor([a["area"] for a in by_image[i][0]], dtype=torch.float32)} for i in chunk]
        outputs = [{"boxes": xyxy(by_image[i][1]), "labels": labels(by_image[i][1]),
                    "scores": torch.tensor([d["score"] for d in by_image[i][1]])} for i in chunk]
        batch = SimpleNamespace(image_ids=torch.tensor(chunk), scale=torch.full((len(chunk),), scale),
                                pad=torch.zeros(len(chunk), 2), orig_sizes=torch.tensor([[1920, 1080]] * len(chunk)),
                                targets=targets)
        batches.append((batch, outputs))
    start = time.perf_counter()
    evaluator = CocoEvaluator(categories)
    for batch, outputs in batches:
        evaluator.update(batch, outputs)
    metrics = evaluator.summarize()
    seconds = time.perf_counter() - start
    return seconds, np.array([metrics[name] for name in STAT_NAMES])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--detections", type=int, default=100, help="detections per image")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=1, help="time each N times and keep the fastest (a shared "
                                                              "machine is noisy)")
    args = parser.parse_args()

    import faster_coco_eval
    import pycocotools.coco
    import pycocotools.cocoeval

    gt, results = synthetic_coco(args.images, args.detections, args.seed)
    print(f"{args.images} images, {len(gt['annotations'])} GT boxes, {len(results)} detections")
    def fastest(fn, *fn_args):
        runs = [fn(*fn_args) for _ in range(max(1, args.repeat))]
        return min(r[0] for r in runs), runs[0][1]

    slow_s, slow_stats = fastest(run, pycocotools.coco.COCO, pycocotools.cocoeval.COCOeval, gt, results)
    fast_s, fast_stats = fastest(run, faster_coco_eval.COCO, faster_coco_eval.COCOeval_faster, gt, results)
    neoray_s, neoray_stats = fastest(run_neoray, gt, results)
    equal = bool(np.array_equal(slow_stats, fast_stats))
    max_diff = float(np.max(np.abs(slow_stats - fast_stats)))
    print(f"pycocotools      {slow_s:8.2f} s")
    print(f"faster-coco-eval {fast_s:8.2f} s")
    print(f"ratio (pycocotools / faster-coco-eval): {slow_s / fast_s:.1f}x")
    print(f"neoray CocoEvaluator (update + summarize) {neoray_s:8.2f} s, "
          f"{slow_s / neoray_s:.1f}x faster than pycocotools; max abs stat difference "
          f"{float(np.max(np.abs(neoray_stats - slow_stats))):.3g} (vs pycocotools; float32 letterbox round trip)")
    print(f"all 12 stats equal: {equal} (max abs difference {max_diff:.3g}); AP = {fast_stats[0]:.4f}")
    return 0 if np.allclose(slow_stats, fast_stats, rtol=0, atol=1e-9) else 1


if __name__ == "__main__":
    raise SystemExit(main())
