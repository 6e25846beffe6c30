"""rtdetr_cpu learns from scratch: it overfits 8 synthetic 16:9 images to AP50 >= 0.9 on a CPU."""

import contextlib
import io
import time

import cv2
import numpy as np
import pytest
import torch

from neoray.models import build_model

WIDTH, HEIGHT = 160, 90
CLASSES = 3  # 0 red rectangle, 1 green disc, 2 blue triangle
COLOURS = [(220, 40, 40), (40, 200, 60), (50, 80, 230)]


def draw_image(rng: np.random.Generator) -> tuple[np.ndarray, list[list[float]], list[int]]:
    """A textured grey background with 1-3 non-overlapping coloured shapes; boxes xyxy in pixels."""
    noise = rng.integers(60, 180, size=(HEIGHT // 6 + 1, WIDTH // 6 + 1, 3), dtype=np.uint8)
    image = cv2.resize(noise, (WIDTH, HEIGHT), interpolation=cv2.INTER_LINEAR)
    for _ in range(4):  # distracting stripes
        p1 = tuple(int(v) for v in rng.integers(0, [WIDTH, HEIGHT]))
        p2 = tuple(int(v) for v in rng.integers(0, [WIDTH, HEIGHT]))
        cv2.line(image, p1, p2, tuple(int(c) for c in rng.integers(80, 160, 3)), 1)
    boxes, labels = [], []
    while len(boxes) < rng.integers(1, 4):
        size = int(rng.integers(22, 40))
        x1, y1 = int(rng.integers(0, WIDTH - size)), int(rng.integers(0, HEIGHT - size))
        box = [x1, y1, x1 + size, y1 + size]
        if any(box[0] < b[2] and b[0] < box[2] and box[1] < b[3] and b[1] < box[3] for b in boxes):
            continue
        label = int(rng.integers(0, CLASSES))
        colour = COLOURS[label]
        if label == 0:
            cv2.rectangle(image, (x1, y1), (x1 + size - 1, y1 + size - 1), colour, -1)
        elif label == 1:
            cv2.circle(image, (x1 + size // 2, y1 + size // 2), size // 2, colour, -1)
        else:
            points = np.array([[x1 + size // 2, y1], [x1, y1 + size - 1], [x1 + size - 1, y1 + size - 1]], np.int32)
            cv2.fillPoly(image, [points], colour)
        boxes.append([float(v) for v in box])
        labels.append(label)
    return image, boxes, labels


def coco_ap50(targets: list[dict], predictions: list[dict]) -> float:
    from faster_coco_eval import COCO, COCOeval_faster

    images, annotations, detections = [], [], []
    for image_id, (target, prediction) in enumerate(zip(targets, predictions)):
        images.append({"id": image_id, "width": WIDTH, "height": HEIGHT})
        for box, label in zip(target["boxes"].tolist(), target["labels"].tolist()):
            x1, y1, x2, y2 = box
            annotations.append(
                {
                    "id": len(annotations) + 1,
                    "image_id": image_id,
                    "category_id": label,
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "area": (x2 - x1) * (y2 - y1),
                    "iscrowd": 0,
                }
            )
        for box, score, label in zip(
            prediction["boxes"].tolist(), prediction["scores"].tolist(), prediction["labels"].tolist()
        ):
            x1, y1, x2, y2 = box
            detections.append(
                {"image_id": image_id, "category_id": label, "bbox": [x1, y1, x2 - x1, y2 - y1], "score": score}
            )
    ground_truth = COCO()
    ground_truth.dataset = {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": c, "name": str(c)} for c in range(CLASSES)],
    }
    ground_truth.createIndex()
    with contextlib.redirect_stdout(io.StringIO()):
        evaluator = COCOeval_faster(ground_truth, ground_truth.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return float(evaluator.stats[1])  # AP at IoU 0.5


def synthetic_batch(count: int, seed: int):
    rng = np.random.default_rng(seed)
    images, targets = [], []
    for _ in range(count):
        image, boxes, labels = draw_image(rng)
        images.append(torch.from_numpy(image).permute(2, 0, 1))
        targets.append({"boxes": torch.tensor(boxes), "labels": torch.tensor(labels, dtype=torch.int64)})
    return torch.stack(images), targets


@pytest.mark.slow
def test_rtdetr_cpu_overfits_eight_synthetic_images():
    torch.manual_seed(0)
    images, targets = synthetic_batch(8, seed=0)
    model = build_model("rtdetr_cpu", num_classes=CLASSES)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, weight_decay=1e-4)
    steps = 200
    start = time.perf_counter()
    model.train()
    for step in range(steps):
        losses = model(images, targets)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        if step % 50 == 0:
            print(f"step {step}: loss {loss.item():.3f} " + " ".join(f"{k} {v.item():.3f}" for k, v in losses.items()))
    model.eval()
    ap50 = coco_ap50(targets, model(images))
    seconds = time.perf_counter() - start
    print(f"rtdetr_cpu: {steps} steps of 8 images at {WIDTH}x{HEIGHT} in {seconds:.0f} s -> AP50 {ap50:.3f}")
    assert ap50 >= 0.9
