"""Synthetic COCO dataset: determinism, real COCO structure, learnable content, aspect mix, CLI; the photo
layout's boxes, occlusion, counts and validation site."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from neoray.cli import main
from neoray.data import synth_photo
from neoray.data.demo import ensure_default_data
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


# ---- the photo layout (neoray.data.synth_photo) ----


def _photo_scenes(split: str, count: int, size=(640, 360), classes: int = 3, seed: int = 0):
    """The scenes the writer draws for ``split`` (the same generator seeds), with their ownership maps."""
    split_index = {"train": 0, "val": 1}[split]
    return [synth_photo.render(np.random.default_rng([seed, split_index, i]), *size, synth_photo.SITES[split],
                               classes, empty=(i % 16 == 7)) for i in range(count)]


def test_photo_same_seed_same_bytes_different_seed_differs(tmp_path):
    kwargs = dict(train=6, val=3, size=(320, 180), layout="photo")
    write_synthetic_dataset(tmp_path / "a", seed=1, **kwargs)
    write_synthetic_dataset(tmp_path / "b", seed=1, **kwargs)
    write_synthetic_dataset(tmp_path / "c", seed=2, **kwargs)
    a, b, c = (_files(tmp_path / name) for name in "abc")
    assert len(a) == 6 + 3 + 2 and a == b
    assert sum(a[name] != c[name] for name in a) >= 9


def test_photo_annotations_are_the_scenes_labelled_objects_with_boxes_inside_the_image(tmp_path):
    out = write_synthetic_dataset(tmp_path, train=10, val=0, size=(640, 360), layout="photo", classes=2, seed=0)
    coco = json.loads(out["train_annotations"].read_text())
    assert [(c["id"], c["name"]) for c in coco["categories"]] == [(2, "car"), (5, "truck")]
    written = {}
    for ann in coco["annotations"]:
        x, y, w, h = ann["bbox"]
        assert 0 <= x and 0 <= y and x + w <= 640 and y + h <= 360 and ann["area"] == w * h
        written.setdefault(ann["image_id"], []).append((ann["category_id"], (x, y, x + w, y + h)))
    for i, scene in enumerate(_photo_scenes("train", 10, classes=2)):
        assert written.get(i + 1, []) == [(cat, tuple(float(v) for v in box)) for cat, box in scene.labelled()]
        decoded = cv2.imread(str(out["train_images"] / f"{i + 1:06d}.jpg"))
        assert decoded.shape == (360, 640, 3)


def test_photo_boxes_are_tight_on_unoccluded_objects_and_sized_8_to_64_px():
    sides, unoccluded = [], 0
    for scene in _photo_scenes("train", 12):
        for index, (_cat, (x1, y1, x2, y2), full, _labelled) in enumerate(scene.objects):
            seen = scene.owner == index
            sides.append(max(x2 - x1, y2 - y1))
            if seen.sum() < full:
                continue  # partly hidden: its box is the whole object's, checked by the visible-share test
            ys, xs = np.nonzero(seen)
            assert (xs.min(), ys.min(), xs.max() + 1, ys.max() + 1) == (x1, y1, x2, y2)  # touches all four sides
            unoccluded += 1
    assert unoccluded >= 100
    assert 8 <= min(sides) < 16 and 40 < max(sides) <= 64


def test_photo_objects_are_occluded_but_every_object_keeps_half_its_pixels():
    shares = []
    for scene in _photo_scenes("train", 8) + _photo_scenes("val", 4):
        shares += [(scene.owner == index).sum() / full for index, (*_rest, full, _lab) in enumerate(scene.objects)]
    shares = np.array(shares)
    assert synth_photo.MIN_VISIBLE == 0.5 and shares.min() >= 0.5
    assert (shares < 0.95).mean() > 0.05  # occlusion is common, not an exception


def test_photo_counts_are_heavy_tailed_with_empty_images_and_unlabelled_kinds_as_negatives(tmp_path):
    out = write_synthetic_dataset(tmp_path, train=32, val=0, size=(320, 180), layout="photo", seed=0)
    coco = json.loads(out["train_annotations"].read_text())
    per_image = np.bincount([a["image_id"] for a in coco["annotations"]], minlength=33)[1:]
    assert per_image[7] == per_image[23] == 0  # index 7 mod 16 is empty
    assert {a["category_id"] for a in coco["annotations"]} == {2}  # the default: cars only
    nonzero = np.sort(per_image[per_image > 0])
    assert nonzero[0] <= 6 and nonzero[-1] >= 40 and nonzero[-1] >= 3 * np.median(nonzero)
    scene = _photo_scenes("train", 1, size=(320, 180), classes=1)[0]
    kinds = {cat for cat, _box, _full, labelled in scene.objects if not labelled}
    assert kinds and 2 not in kinds  # trucks and tanks drawn, not labelled


def test_photo_validation_comes_from_another_site():
    def mean_colours(split):
        return np.array([s.image.reshape(-1, 3).mean(0) for s in _photo_scenes(split, 12, size=(320, 180))])

    train, val = mean_colours("train"), mean_colours("val")
    between = np.abs(train.mean(0) - val.mean(0)).max()
    within = np.abs(train[:6].mean(0) - train[6:].mean(0)).max()
    assert between > 25 and between > 2.5 * within


def test_photo_cli_defaults_to_one_kind_and_refuses_more_kinds_than_it_has(tmp_path, capsys):
    assert main(["synth", str(tmp_path / "ds"), "--layout", "photo", "--train", "2", "--val", "1", "--size",
                 "320x180"]) == 0
    assert "2=car)" in capsys.readouterr().out
    assert main(["synth", str(tmp_path / "ds2"), "--layout", "photo", "--classes", "4"]) == 1
    assert "between 1 and 3 for layout photo" in capsys.readouterr().err


def test_the_demo_cache_makes_photo_shards_under_its_own_name(tmp_path):
    out = ensure_default_data(size=(320, 180), train=3, val=2, layout="photo", root=tmp_path)
    assert out["train"].parent.parent.name == "synthetic_320x180_t3_v2_c1_photo"
    manifest = json.loads((out["val"] / "_manifest.json").read_text())
    assert manifest["num_images"] == 2 and [c["name"] for c in manifest["categories"]] == ["car"]
