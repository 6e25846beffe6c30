"""Synthetic COCO dataset: determinism, real COCO structure, learnable content, aspect mix, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from neoray.cli import main
from neoray.data.synth import SHAPES, write_synthetic_dataset


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_same_seed_same_bytes_different_seed_differs(tmp_path):
    kwargs = dict(train=10, val=3, size=(160, 90), classes=4)
    write_synthetic_dataset(tmp_path / "a", seed=3, **kwargs)
    write_synthetic_dataset(tmp_path / "b", seed=3, **kwargs)
    write_synthetic_dataset(tmp_path / "c", seed=4, **kwargs)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 10 + 3 + 2
    assert a == b
    assert a.keys() == c.keys()
    differing = [name for name in a if a[name] != c[name]]
    assert len(differing) >= 10  # every image with content differs, and the annotations


def test_real_coco_with_non_contiguous_categories(tmp_path):
    out = write_synthetic_dataset(tmp_path, train=20, val=4, size=(320, 180), classes=6, seed=0)
    coco = json.loads(out["train_annotations"].read_text())
    ids = [c["id"] for c in coco["categories"]]
    assert ids == [cid for cid, _ in SHAPES[:6]]
    assert ids != list(range(len(ids))) and ids != list(range(1, len(ids) + 1))  # not contiguous
    assert [c["name"] for c in coco["categories"]][:3] == ["rectangle", "outlined_rectangle", "ellipse"]
    assert all(c["supercategory"] == "shape" for c in coco["categories"])

    images = {img["id"]: img for img in coco["images"]}
    assert len(images) == 20
    for img in coco["images"]:
        decoded = cv2.imread(str(out["train_images"] / img["file_name"]))
        assert decoded.shape[:2] == (img["height"], img["width"]) == (180, 320)
    per_image = {i: 0 for i in images}
    ann_ids = set()
    for ann in coco["annotations"]:
        assert set(ann) >= {"id", "image_id", "category_id", "bbox", "area", "iscrowd"}
        assert ann["id"] not in ann_ids and ann["category_id"] in ids and ann["iscrowd"] == 0
        ann_ids.add(ann["id"])
        x, y, w, h = ann["bbox"]
        img = images[ann["image_id"]]
        assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= img["width"] and y + h <= img["height"]
        assert ann["area"] == pytest.approx(w * h)
        per_image[ann["image_id"]] += 1
    counts = list(per_image.values())
    assert 0 in counts  # empty frames exist
    assert max(counts) <= 6 and sum(c > 0 for c in counts) >= 16
    areas = np.array([a["area"] for a in coco["annotations"]])
    assert (areas < 32 ** 2).any() and ((areas >= 32 ** 2) & (areas < 96 ** 2)).any()  # small and medium


def test_objects_stand_out_from_the_background(tmp_path):
    """Learnable, not noise: pixels inside a filled rectangle are uniform and differ from the image mean."""
    out = write_synthetic_dataset(tmp_path, train=16, val=0, size=(320, 180), classes=1, seed=1)
    coco = json.loads(out["train_annotations"].read_text())
    names = {img["id"]: img["file_name"] for img in coco["images"]}
    checked = 0
    for ann in coco["annotations"]:
        x, y, w, h = (int(v) for v in ann["bbox"])
        if w < 12 or h < 12:
            continue
        img = cv2.imread(str(out["train_images"] / names[ann["image_id"]])).astype(np.float64)
        inner = img[y + 3:y + h - 3, x + 3:x + w - 3].reshape(-1, 3)
        if inner.size == 0:
            continue
        # Overlaps may hide part of a rectangle; the median pixel is still the shape's colour.
        colour = np.median(inner, axis=0)
        share_uniform = (np.abs(inner - colour).max(axis=1) < 25).mean()
        assert share_uniform > 0.5
        checked += 1
    assert checked >= 10


def test_aspect_mix_makes_4_3_and_portrait_images(tmp_path):
    out = write_synthetic_dataset(tmp_path, train=10, val=0, size=(320, 180), seed=0, aspect_mix=True)
    coco = json.loads(out["train_annotations"].read_text())
    sizes = {(img["width"], img["height"]) for img in coco["images"]}
    assert sizes == {(320, 180), (240, 180), (180, 320)}
    for img in coco["images"]:
        decoded = cv2.imread(str(out["train_images"] / img["file_name"]))
        assert decoded.shape[:2] == (img["height"], img["width"])


def test_pycocotools_loads_it(tmp_path):
    from pycocotools.coco import COCO

    out = write_synthetic_dataset(tmp_path, train=5, val=2, size=(160, 90), classes=3, seed=0)
    coco = COCO(str(out["val_annotations"]))
    assert sorted(coco.getCatIds()) == [1, 3, 7] and len(coco.getImgIds()) == 2


def test_cli(tmp_path, capsys):
    code = main(["synth", str(tmp_path / "ds"), "--train", "4", "--val", "2", "--size", "160x90",
                 "--classes", "3", "--seed", "5", "--aspect-mix"])
    assert code == 0
    assert len(list((tmp_path / "ds" / "train").glob("*.jpg"))) == 4
    assert len(list((tmp_path / "ds" / "val").glob("*.jpg"))) == 2
    assert "1=rectangle" in capsys.readouterr().out


def test_cli_rejects_bad_arguments(tmp_path, capsys):
    assert main(["synth", str(tmp_path), "--classes", "99"]) == 1
    assert "classes" in capsys.readouterr().err
    assert main(["synth", str(tmp_path), "--size", "big"]) == 1
    assert "size" in capsys.readouterr().err


def test_writes_to_object_storage(tmp_path, s3_bucket):
    from neoray import storage

    kwargs = dict(train=3, val=1, size=(160, 90), classes=3, seed=2)
    local = write_synthetic_dataset(tmp_path / "ds", **kwargs)
    remote = write_synthetic_dataset(f"{s3_bucket}/ds", **kwargs)
    assert remote["train_annotations"] == f"{s3_bucket}/ds/annotations/instances_train.json"
    assert isinstance(local["train_images"], Path)  # local callers keep getting paths
    found = {e.path[len(s3_bucket) + 4:]: storage.read_bytes(e.path) for e in storage.list_files(f"{s3_bucket}/ds")}
    assert found == _files(tmp_path / "ds")
