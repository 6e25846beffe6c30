"""COCO evaluation through the letterbox: data built here directly (COCO dicts + letterbox parameters)."""

from __future__ import annotations

import contextlib
import copy
import io
import json
import math
import os
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from neoray.data.geometry import boxes_to_letterbox, letterbox_params, xywh_to_xyxy
from neoray.evaluation.coco_eval import (
    STAT_NAMES,
    CocoEvaluator,
    format_metrics_table,
    precision_recall_f1,
    run_cocoeval,
)

# Non-contiguous original ids on purpose: the evaluator must map label -> id through the manifest.
CATEGORIES = [
    {"id": 3, "name": "car", "label": 0},
    {"id": 7, "name": "person", "label": 1},
    {"id": 11, "name": "ghost", "label": 2},  # never annotated: "no GT"
]


def make_coco(seed: int = 0, images_per_shape: int = 2) -> dict:
    """Images of 16:9, 4:3 and portrait shapes (plus one without boxes), boxes of all COCO area ranges."""
    rng = np.random.default_rng(seed)
    shapes = [(1920, 1080), (640, 480), (480, 640)]
    images, annotations = [], []
    image_id, ann_id = 100, 1
    for w, h in shapes:
        for _ in range(images_per_shape):
            images.append({"id": image_id, "width": w, "height": h, "file_name": f"{image_id}.jpg"})
            for _ in range(int(rng.integers(2, 6))):
                side = float(rng.choice([20, 60, 200]))  # small / medium / large
                bw, bh = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
                x, y = rng.uniform(0, w - bw), rng.uniform(0, h - bh)
                annotations.append({
                    "id": ann_id, "image_id": image_id, "category_id": int(rng.choice([3, 7])),
                    "bbox": [x, y, bw, bh], "area": bw * bh * 0.8,  # a polygon area, not the box area
                    "iscrowd": 0,
                })
                ann_id += 1
            image_id += 1
    # One crowd region, and one image without any annotation.
    annotations.append({"id": ann_id, "image_id": 100, "category_id": 7, "bbox": [10.0, 10.0, 300.0, 200.0],
                        "area": 50000.0, "iscrowd": 1})
    images.append({"id": image_id, "width": 800, "height": 600, "file_name": f"{image_id}.jpg"})
    cats = [{"id": c["id"], "name": c["name"]} for c in CATEGORIES]
    return {"images": images, "annotations": annotations, "categories": cats}


def make_batch(coco: dict, image_ids: list[int], size=(320, 180)) -> SimpleNamespace:
    """What the stream yields for these images: GT in letterboxed pixels of a ``size`` tensor, float32."""
    label_of = {c["id"]: c["label"] for c in CATEGORIES}
    by_id = {img["id"]: img for img in coco["images"]}
    targets, scales, pads, origs = [], [], [], []
    for image_id in image_ids:
        img = by_id[image_id]
        scale, pad_x, pad_y = letterbox_params(img["width"], img["height"], *size)
        anns = [a for a in coco["annotations"] if a["image_id"] == image_id]
        boxes = boxes_to_letterbox(xywh_to_xyxy([a["bbox"] for a in anns]), scale, pad_x, pad_y)
        targets.append({
            "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([label_of[a["category_id"]] for a in anns], dtype=torch.int64),
            "iscrowd": torch.tensor([bool(a["iscrowd"]) for a in anns], dtype=torch.bool),
            "areas": torch.tensor([a["area"] for a in anns], dtype=torch.float32),
        })
        scales.append(scale)
        pads.append((pad_x, pad_y))
        origs.append((img["width"], img["height"]))
    return SimpleNamespace(
        images=torch.zeros((len(image_ids), 3, size[1], size[0]), dtype=torch.uint8),
        targets=targets,
        image_ids=torch.tensor(image_ids, dtype=torch.int64),
        scale=torch.tensor(scales, dtype=torch.float32),
        pad=torch.tensor(pads, dtype=torch.float32),
        orig_sizes=torch.tensor(origs, dtype=torch.int64),
    )


def batches_of(coco: dict, size=(320, 180), batch_size: int = 3) -> list[SimpleNamespace]:
    ids = [img["id"] for img in coco["images"]]
    return [make_batch(coco, ids[i:i + batch_size], size) for i in range(0, len(ids), batch_size)]


def gt_as_predictions(batch, shift: float = 0.0) -> list[dict]:
    """The non-crowd GT of each image as score-1 predictions, optionally shifted right by ``shift`` x width."""
    outputs = []
    for target in batch.targets:
        keep = ~target["iscrowd"]
        boxes = target["boxes"][keep].clone()
        widths = boxes[:, 2] - boxes[:, 0]
        boxes[:, [0, 2]] += (shift * widths)[:, None]
        outputs.append({"boxes": boxes, "scores": torch.ones(len(boxes)), "labels": target["labels"][keep]})
    return outputs


def pycocotools_stats(gt_path, results: list[dict]) -> np.ndarray:
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO(str(gt_path))
        coco_dt = coco_gt.loadRes(copy.deepcopy(results))
        coco_eval = COCOeval(coco_gt, coco_dt, "bbox")
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return np.asarray(coco_eval.stats)


@pytest.fixture()
def source(tmp_path):
    coco = make_coco()
    path = tmp_path / "instances_val.json"
    path.write_text(json.dumps(coco))
    return coco, path


def evaluate_batches(batches, output_fn, **kwargs) -> CocoEvaluator:
    evaluator = CocoEvaluator(CATEGORIES, **kwargs)
    for batch in batches:
        evaluator.update(batch, output_fn(batch))
    return evaluator


def stats_of(metrics: dict) -> np.ndarray:
    return np.array([metrics[name] for name in STAT_NAMES])


@pytest.mark.parametrize("size", [(320, 180), (640, 360)])
def test_gt_fed_back_scores_ap_one_and_matches_pycocotools_on_source(source, size):
    coco, path = source
    evaluator = evaluate_batches(batches_of(coco, size), gt_as_predictions, gt_json=path)
    metrics = evaluator.summarize()
    assert metrics["map"] == pytest.approx(1.0, abs=1e-12)
    for name in set(STAT_NAMES) - {"mar1"}:  # every range has GT here, so no -1; mar1 keeps 1 box per class
        assert metrics[name] == pytest.approx(1.0, abs=1e-12), name
    assert metrics["precision"] == metrics["recall"] == metrics["f1"] == 1.0
    assert metrics["num_images"] == len(coco["images"])
    # The official evaluation of the same detection file on the source file gives the same 12 numbers.
    np.testing.assert_allclose(stats_of(metrics), pycocotools_stats(path, evaluator.detections), rtol=0, atol=1e-9)
    # Detections are in original pixels and original ids: they reproduce the source boxes.
    source_anns = [a for a in coco["annotations"] if not a["iscrowd"]]
    for det in evaluator.detections:
        candidates = [a["bbox"] for a in source_anns
                      if (a["image_id"], a["category_id"]) == (det["image_id"], det["category_id"])]
        assert any(np.allclose(det["bbox"], b, atol=1e-2) for b in candidates), det
    assert {d["category_id"] for d in evaluator.detections} <= {3, 7}


def test_stream_gt_gives_the_same_numbers_as_the_source_file(source):
    coco, path = source
    rng = np.random.default_rng(1)

    def noisy(batch):
        outputs = gt_as_predictions(batch, shift=0.15)
        for out in outputs:
            out["scores"] = torch.tensor(rng.uniform(0.05, 1.0, len(out["scores"])), dtype=torch.float32)
        return outputs

    batches = batches_of(coco)
    torch.manual_seed(0)
    outputs = [noisy(b) for b in batches]
    from_stream = CocoEvaluator(CATEGORIES)
    from_file = CocoEvaluator(CATEGORIES, gt_json=path)
    for batch, out in zip(batches, outputs):
        from_stream.update(batch, out)
        from_file.update(batch, out)
    a, b = from_stream.summarize(), from_file.summarize()
    np.testing.assert_allclose(stats_of(a), stats_of(b), rtol=0, atol=1e-6)
    assert 0.0 < a["map"] < 1.0
    assert a["num_gt"] == b["num_gt"] == sum(1 for x in coco["annotations"] if not x["iscrowd"])
    assert (a["precision"], a["recall"]) == pytest.approx((b["precision"], b["recall"]))


def test_shifted_boxes_score_lower(source):
    coco, path = source
    exact = evaluate_batches(batches_of(coco), gt_as_predictions, gt_json=path).summarize()
    shifted_eval = evaluate_batches(batches_of(coco), lambda b: gt_as_predictions(b, shift=0.2), gt_json=path)
    shifted = shifted_eval.summarize()
    assert shifted["map"] < exact["map"]
    assert shifted["map75"] < 0.5 < shifted["map50"]  # 20% shift: IoU 0.67, passes 0.5 but not 0.75
    np.testing.assert_allclose(stats_of(shifted), pycocotools_stats(path, shifted_eval.detections), atol=1e-9)


def test_per_class_table_has_every_category(source):
    coco, path = source

    def only_cars(batch):  # no "person" predictions at all
        outputs = gt_as_predictions(batch)
        return [{k: v[o["labels"] == 0] for k, v in o.items()} for o in outputs]

    metrics = evaluate_batches(batches_of(coco), only_cars, gt_json=path).summarize()
    per_class = metrics["per_class_ap"]
    assert list(per_class) == ["car", "person", "ghost"]
    assert per_class["car"] == pytest.approx(1.0)
    assert per_class["person"] == 0.0  # has GT, never predicted
    assert math.isnan(per_class["ghost"])  # no GT anywhere
    table = format_metrics_table(metrics)
    assert "ghost" in table and "person" in table
    assert [line.split() for line in table.splitlines() if line.startswith(("ghost", "person", "map50 "))] == [
        ["map50", "0.5000"], ["person", "0.0000"], ["ghost", "no", "GT"]]
    assert "no GT" in format_metrics_table({**metrics, "map_large": -1.0}).splitlines()[6]


def test_faster_coco_eval_equals_pycocotools_on_random_detections(tmp_path):
    coco = make_coco(seed=3, images_per_shape=4)
    path = tmp_path / "gt.json"
    path.write_text(json.dumps(coco))
    rng = np.random.default_rng(7)
    results = []
    for img in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        for _ in range(30):
            if anns and rng.random() < 0.7:  # near a GT box
                x, y, w, h = anns[int(rng.integers(len(anns)))]["bbox"]
                x, y = x + rng.normal(0, 0.1) * w, y + rng.normal(0, 0.1) * h
                w, h = w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)
            else:
                w, h = rng.uniform(5, 300, 2)
                x, y = rng.uniform(0, img["width"] - 5), rng.uniform(0, img["height"] - 5)
            results.append({"image_id": img["id"], "category_id": int(rng.choice([3, 7, 11])),
                            "bbox": [float(x), float(y), float(w), float(h)], "score": float(rng.random())})
    from faster_coco_eval import COCO

    fast = run_cocoeval(COCO(str(path)), results).stats
    reference = pycocotools_stats(path, results)
    assert 0.05 < reference[0] < 0.95  # a non-trivial case
    np.testing.assert_allclose(np.asarray(fast)[:12], reference, rtol=0, atol=1e-9)


def test_results_json_is_written_atomically_and_loads_with_pycocotools(source, tmp_path):
    from pycocotools.coco import COCO

    coco, path = source
    evaluator = evaluate_batches(batches_of(coco), lambda b: gt_as_predictions(b, shift=0.1), gt_json=path)
    out = Path(evaluator.write_detections(tmp_path / "out" / "detections.json"))
    assert [p.name for p in out.parent.iterdir()] == ["detections.json"]  # no temp file left behind
    loaded = json.loads(out.read_text())
    assert len(loaded) == sum(1 for a in coco["annotations"] if not a["iscrowd"])
    assert set(loaded[0]) == {"image_id", "category_id", "bbox", "score"}
    with contextlib.redirect_stdout(io.StringIO()):
        coco_dt = COCO(str(path)).loadRes(str(out))
    assert len(coco_dt.getAnnIds()) == len(loaded)


def test_predictions_are_clipped_to_the_original_image(source):
    coco, _ = source
    batch = make_batch(coco, [100])  # 1920x1080 into 320x180: scale 1/6, no pad
    outputs = [{"boxes": torch.tensor([[-10.0, -10.0, 400.0, 50.0]]), "scores": torch.tensor([0.9]),
                "labels": torch.tensor([1])}]
    evaluator = CocoEvaluator(CATEGORIES)
    evaluator.update(batch, outputs)
    (det,) = evaluator.detections
    assert det["category_id"] == 7
    np.testing.assert_allclose(det["bbox"], [0.0, 0.0, 1920.0, 300.0], atol=1e-3)


def test_portrait_padding_is_removed(source):
    coco, _ = source
    image_id = next(img["id"] for img in coco["images"] if img["width"] == 480 and img["height"] == 640)
    batch = make_batch(coco, [image_id])
    scale, pad_x, pad_y = letterbox_params(480, 640, 320, 180)
    assert pad_x > 0 and pad_y == 0
    box = torch.tensor([[pad_x + 10 * scale, 20 * scale, pad_x + 110 * scale, 220 * scale]])
    evaluator = CocoEvaluator(CATEGORIES)
    evaluator.update(batch, [{"boxes": box, "scores": torch.tensor([0.5]), "labels": torch.tensor([0])}])
    np.testing.assert_allclose(evaluator.detections[0]["bbox"], [10, 20, 100, 200], atol=1e-3)


def test_precision_recall_f1_at_threshold():
    # image 1, category 3: two GT; detections: exact hit (0.9), miss (0.8), another hit below threshold (0.3).
    gts = np.array([[1, 3, 0, 0, 10, 10, 0], [1, 3, 50, 50, 10, 10, 0], [1, 3, 100, 100, 40, 40, 1]], float)
    dets = np.array([[1, 3, 0, 0, 10, 10, 0.9], [1, 3, 200, 200, 10, 10, 0.8], [1, 3, 50, 50, 10, 10, 0.3],
                     [1, 3, 105, 105, 10, 10, 0.7],  # inside the crowd region: ignored
                     [1, 7, 0, 0, 10, 10, 0.95]], float)  # right place, wrong class: FP
    p, r, f1 = precision_recall_f1(dets, gts, 0.5)
    assert (p, r) == pytest.approx((1 / 3, 1 / 2))
    assert f1 == pytest.approx(2 * (1 / 3) * (1 / 2) / (1 / 3 + 1 / 2))
    p, r, _ = precision_recall_f1(dets, gts, 0.0)
    assert (p, r) == pytest.approx((2 / 4, 1.0))
    assert precision_recall_f1(dets, gts, 0.99) == (0.0, 0.0, 0.0)


def reference_precision_recall(dets: np.ndarray, gts: np.ndarray, threshold: float) -> tuple[float, float]:
    """Plain per-detection transcription of pycocotools' evaluateImg matching at IoU 0.5 (slow, obvious)."""
    from pycocotools import mask as mask_utils

    dets = dets[dets[:, 6] >= threshold]
    tp = fp = 0
    for key in {tuple(k) for k in dets[:, :2].tolist()}:
        d = dets[(dets[:, 0] == key[0]) & (dets[:, 1] == key[1])]
        d = d[np.argsort(-d[:, 6], kind="mergesort")]
        g = gts[(gts[:, 0] == key[0]) & (gts[:, 1] == key[1])]
        g = g[np.argsort(g[:, 6], kind="mergesort")]  # non-crowd first, as pycocotools sorts them
        if not len(g):
            fp += len(d)
            continue
        ious = mask_utils.iou(d[:, 2:6].tolist(), g[:, 2:6].tolist(), g[:, 6].astype(int).tolist())
        taken = np.zeros(len(g), bool)
        for row in ious:
            best, m = 0.5, -1
            for j in range(len(g)):
                if taken[j] and not g[j, 6]:
                    continue
                if m > -1 and not g[m, 6] and g[j, 6]:
                    break
                if row[j] < best:
                    continue
                best, m = row[j], j
            if m == -1:
                fp += 1
            elif not g[m, 6]:
                taken[m] = True
                tp += 1
    num_gt = int((gts[:, 6] == 0).sum())
    return (tp / (tp + fp) if tp + fp else 0.0), tp / num_gt


def test_precision_recall_matches_a_plain_transcription_of_coco_matching():
    rng = np.random.default_rng(5)
    gts, dets = [], []
    for image_id in range(40):
        for _ in range(int(rng.integers(0, 8))):
            x, y, w, h = rng.uniform(0, 200), rng.uniform(0, 200), rng.uniform(5, 60), rng.uniform(5, 60)
            gts.append([image_id, int(rng.integers(1, 4)), x, y, w, h, float(rng.random() < 0.15)])
            for _ in range(int(rng.integers(0, 4))):  # several detections compete for one GT
                dets.append([image_id, gts[-1][1], x + rng.normal(0, 0.15) * w, y + rng.normal(0, 0.15) * h,
                             w * rng.uniform(0.7, 1.3), h * rng.uniform(0.7, 1.3), rng.random()])
        for _ in range(int(rng.integers(0, 5))):
            dets.append([image_id, int(rng.integers(1, 4)), *rng.uniform(0, 200, 2), *rng.uniform(5, 60, 2),
                         rng.random()])
    gts, dets = np.array(gts), np.array(dets)
    for threshold in (0.0, 0.3, 0.5, 0.8):
        p, r, _ = precision_recall_f1(dets, gts, threshold)
        assert (p, r) == pytest.approx(reference_precision_recall(dets, gts, threshold), abs=1e-12), threshold
    assert 0.1 < p < 0.9 and 0.05 < r < 0.9  # a non-trivial case


def test_duplicate_images_in_one_process_are_counted_once(source):
    coco, path = source
    batches = batches_of(coco)
    evaluator = evaluate_batches(batches + batches[:1], lambda b: gt_as_predictions(b, shift=0.1))
    metrics = evaluator.summarize()
    reference = evaluate_batches(batches, lambda b: gt_as_predictions(b, shift=0.1)).summarize()
    assert metrics["duplicate_images"] == len(batches[0].image_ids)
    assert metrics["num_images"] == reference["num_images"] == len(coco["images"])
    assert metrics["map"] == reference["map"] and metrics["num_detections"] == reference["num_detections"]


def test_bad_input_gives_clear_errors(source, tmp_path):
    coco, path = source
    batch = make_batch(coco, [100])
    evaluator = CocoEvaluator(CATEGORIES)
    with pytest.raises(ValueError, match=r"image 100: prediction label 5 is outside \[0, 3\)"):
        evaluator.update(batch, [{"boxes": torch.zeros(1, 4), "scores": torch.ones(1), "labels": torch.tensor([5])}])
    with pytest.raises(ValueError, match="1 outputs for a batch of 2"):
        evaluator.update(make_batch(coco, [100, 101]), gt_as_predictions(batch))
    with pytest.raises(ValueError, match="labels must be 0..1"):
        CocoEvaluator([{"id": 1, "name": "a", "label": 0}, {"id": 2, "name": "b", "label": 2}])
    with pytest.raises(FileNotFoundError, match="missing.json"):
        CocoEvaluator(CATEGORIES, gt_json=tmp_path / "missing.json")
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"images": [], "annotations": [], "categories": coco["categories"]}))
    wrong_file = CocoEvaluator(CATEGORIES, gt_json=other)
    wrong_file.update(batch, gt_as_predictions(batch))
    with pytest.raises(ValueError, match="other.json: 1 evaluated image ids are not in the annotation file"):
        wrong_file.summarize()
    with pytest.raises(ValueError, match="no images were evaluated"):
        CocoEvaluator(CATEGORIES).summarize()


class ReplayModel(torch.nn.Module):
    """Returns prepared outputs in call order and records how it was called (mode, grad, autocast)."""

    def __init__(self, outputs: list):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.outputs = list(outputs)
        self.calls = []

    def forward(self, images):
        self.calls.append((self.training, torch.is_grad_enabled(), torch.is_autocast_enabled("cpu"), images.dtype))
        return self.outputs.pop(0)


@pytest.mark.parametrize("amp_dtype", [None, torch.bfloat16])
def test_evaluate_runs_the_model_in_eval_mode_without_grad(source, amp_dtype):
    from neoray.evaluation.coco_eval import evaluate

    coco, path = source
    batches = batches_of(coco)
    model = ReplayModel([gt_as_predictions(b) for b in batches])
    model.train()
    metrics = evaluate(model, batches, CATEGORIES, "cpu", gt_json=path, amp_dtype=amp_dtype)
    assert metrics["map"] == pytest.approx(1.0) and metrics["num_images"] == len(coco["images"])
    assert model.calls == [(False, False, amp_dtype is not None, torch.uint8)] * len(batches)
    assert model.training  # the caller's mode is restored


# ----------------------------------------------------------------------------------------------------
# Distributed gather: 2 gloo processes, no Ray
# ----------------------------------------------------------------------------------------------------


def _gather_worker(rank: int, world_size: int, store_file: str, gt_path: str, id_sets: list, out_dir: str):
    torch.distributed.init_process_group("gloo", init_method=f"file://{store_file}", rank=rank,
                                         world_size=world_size)
    try:
        coco = json.loads(open(gt_path).read())
        evaluator = CocoEvaluator(CATEGORIES)
        ids = id_sets[rank]
        for i in range(0, len(ids), 2):
            batch = make_batch(coco, ids[i:i + 2])
            evaluator.update(batch, gt_as_predictions(batch, shift=0.1))
        metrics = evaluator.summarize()
        with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as handle:
            json.dump({"metrics": metrics, "detections": len(evaluator.detections)}, handle)
    finally:
        torch.distributed.destroy_process_group()


def _run_two_ranks(tmp_path, gt_path, id_sets) -> list[dict]:
    import torch.multiprocessing as mp

    mp.spawn(_gather_worker, args=(2, str(tmp_path / "store"), str(gt_path), id_sets, str(tmp_path)),
             nprocs=2, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.mark.slow
@pytest.mark.parametrize("overlap", [False, True])
def test_distributed_gather_counts_each_image_once(source, tmp_path, overlap):
    coco, path = source
    ids = [img["id"] for img in coco["images"]]
    half = len(ids) // 2
    if overlap:  # both ranks see the middle images
        id_sets = [ids[: half + 2], ids[half - 1:]]
    else:
        id_sets = [ids[:half], ids[half:]]
    results = _run_two_ranks(tmp_path, path, id_sets)
    single = evaluate_batches(batches_of(coco), lambda b: gt_as_predictions(b, shift=0.1)).summarize()
    expected_duplicates = len(set(id_sets[0]) & set(id_sets[1]))
    assert expected_duplicates == (3 if overlap else 0)
    for result in results:  # every rank gets the broadcast metrics
        metrics = result["metrics"]
        assert metrics["num_images"] == len(ids)
        assert metrics["duplicate_images"] == expected_duplicates
        assert metrics["num_detections"] == single["num_detections"]
        assert result["detections"] == single["num_detections"]
        np.testing.assert_allclose(stats_of(metrics), stats_of(single), rtol=0, atol=1e-12)
