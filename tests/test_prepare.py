"""`neoray prepare`: bad input is reported and counted, letterbox round trip, YOLO == COCO, re-runs reuse."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import signal
import stat
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml

from neoray import storage
from neoray.cli import main
from neoray.commands import prepare as prepare_command
from neoray.data import image_files
from neoray.data import prepare as prepare_module
from neoray.data import sources as src
from neoray.data.geometry import boxes_from_letterbox, xywh_to_xyxy
from neoray.data.prepare import prepare_coco, prepare_yolo
from neoray.data.shards import SCHEMA, ManifestError, read_manifest, shard_files
from neoray.data.synth import write_synthetic_dataset

SIZE = (160, 90)


def _synth(tmp_path: Path, n: int = 8, aspect_mix: bool = False) -> tuple[Path, Path]:
    out = write_synthetic_dataset(tmp_path / "src", train=n, val=0, size=SIZE, classes=3, seed=0,
                                  aspect_mix=aspect_mix)
    return out["train_annotations"], out["train_images"]


def _rows(shard_dir) -> list[dict]:
    """Every row of a shard directory (local or a URI), in manifest order."""
    return [row for path in shard_files(shard_dir)
            for row in pq.read_table(pa.BufferReader(storage.read_bytes(path))).to_pylist()]


def _assert_consistent(result) -> None:
    """Counts add up, the files on disk say what the result says, every row is accounted for."""
    manifest, counts, skipped = result.manifest, result.manifest["counts"], result.manifest["skipped"]
    assert counts["images_in"] == counts["images_written"] + counts["images_skipped"]
    assert counts["annotations_in"] == counts["annotations_written"] + counts["annotations_skipped"]
    assert sum(skipped["images"].values()) == counts["images_skipped"]
    assert sum(skipped["annotations"].values()) == counts["annotations_skipped"]
    rows = _rows(result.out_dir)
    assert len(rows) == counts["images_written"] == manifest["num_images"]
    assert sum(len(r["boxes"]) for r in rows) == counts["annotations_written"] == manifest["num_boxes"]
    assert storage.read_json(result.report_path) == result.report
    assert read_manifest(result.out_dir) == json.loads(json.dumps(manifest))
    assert not [e for e in storage.list_dir(result.out_dir) if ".tmp" in e.name]  # atomic writes leave none
    assert sum(manifest["warnings"].values()) == len([e for e in result.report if src.is_warning(e)])


def _entries(result, reason: str) -> list[dict]:
    return [entry for entry in result.report if entry["reason"] == reason]


# ----------------------------------------------------------------------------------------------------
# Bad input, one case at a time
# ----------------------------------------------------------------------------------------------------


def _first_image(coco):
    """The first image that has annotations, and its first annotation."""
    for img in coco["images"]:
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        if anns:
            return img, anns[0], len(anns)
    raise AssertionError("synthetic set without annotations")


def _write_outside_image(tmp_path: Path) -> Path:
    outside = tmp_path / "src" / "outside.jpg"  # a valid image next to (not under) the image root
    cv2.imwrite(str(outside), np.full((90, 160, 3), 200, np.uint8))
    return outside


# Each case mutates (coco, image_dir) and names the reason and action expected in the report, and
# whether the whole image is skipped.
def _missing(coco, image_dir, img, ann, tmp_path):
    (image_dir / img["file_name"]).unlink()


def _not_an_image(coco, image_dir, img, ann, tmp_path):
    (image_dir / img["file_name"]).write_bytes(b"this is not an image\n")


def _empty_file(coco, image_dir, img, ann, tmp_path):
    (image_dir / img["file_name"]).write_bytes(b"")


def _truncated(coco, image_dir, img, ann, tmp_path):
    path = image_dir / img["file_name"]
    path.write_bytes(path.read_bytes()[:600])


def _size_mismatch(coco, image_dir, img, ann, tmp_path):
    img["width"], img["height"] = 320, 180


def _unknown_category(coco, image_dir, img, ann, tmp_path):
    ann["category_id"] = 999


def _zero_width(coco, image_dir, img, ann, tmp_path):
    ann["bbox"][2] = 0


def _negative_height(coco, image_dir, img, ann, tmp_path):
    ann["bbox"][3] = -4.0


def _nan(coco, image_dir, img, ann, tmp_path):
    ann["bbox"][0] = float("nan")


def _malformed(coco, image_dir, img, ann, tmp_path):
    ann["bbox"] = [1, 2, "3", 4]


def _fully_outside(coco, image_dir, img, ann, tmp_path):
    ann["bbox"] = [170.0, 10.0, 20.0, 20.0]


def _partly_outside(coco, image_dir, img, ann, tmp_path):
    ann["bbox"] = [150.0, -5.0, 30.0, 20.0]


def _duplicate_image_id(coco, image_dir, img, ann, tmp_path):
    other = next(i for i in coco["images"] if i["id"] != img["id"])
    coco["images"].append({**other, "id": img["id"]})


def _absolute_name(coco, image_dir, img, ann, tmp_path):
    img["file_name"] = str(_write_outside_image(tmp_path).resolve())


def _escaping_name(coco, image_dir, img, ann, tmp_path):
    _write_outside_image(tmp_path)
    img["file_name"] = "../outside.jpg"


def _bad_area(coco, image_dir, img, ann, tmp_path):
    ann["area"] = -1


def _unknown_image_id(coco, image_dir, img, ann, tmp_path):
    ann["image_id"] = 123456


def _duplicate_annotation_id(coco, image_dir, img, ann, tmp_path):
    other = next(a for a in coco["annotations"] if a["id"] != ann["id"])
    other["id"] = ann["id"]


def _zero_declared_width(coco, image_dir, img, ann, tmp_path):
    img["width"] = 0


def _string_area(coco, image_dir, img, ann, tmp_path):
    ann["area"] = "big"


def _iscrowd_2(coco, image_dir, img, ann, tmp_path):
    ann["iscrowd"] = 2


BAD_INPUT = [
    (_missing, src.IMAGE_MISSING, src.SKIP_IMAGE, True),
    (_not_an_image, src.IMAGE_UNREADABLE, src.SKIP_IMAGE, True),
    (_empty_file, src.IMAGE_UNREADABLE, src.SKIP_IMAGE, True),
    (_truncated, src.IMAGE_TRUNCATED, src.SKIP_IMAGE, True),
    (_size_mismatch, src.IMAGE_SIZE_MISMATCH, src.USE_REAL_SIZE, False),
    (_unknown_category, src.UNKNOWN_CATEGORY, src.DROP_ANNOTATION, False),
    (_zero_width, src.BBOX_NON_POSITIVE, src.DROP_ANNOTATION, False),
    (_negative_height, src.BBOX_NON_POSITIVE, src.DROP_ANNOTATION, False),
    (_nan, src.BBOX_NOT_FINITE, src.DROP_ANNOTATION, False),
    (_malformed, src.BBOX_MALFORMED, src.DROP_ANNOTATION, False),
    (_fully_outside, src.BBOX_OUTSIDE, src.DROP_ANNOTATION, False),
    (_partly_outside, src.BBOX_CLIPPED, src.CLIP_BOX, False),
    (_duplicate_image_id, src.DUPLICATE_IMAGE_ID, src.SKIP_IMAGE, True),
    (_absolute_name, src.UNSAFE_FILE_NAME, src.SKIP_IMAGE, True),
    (_escaping_name, src.UNSAFE_FILE_NAME, src.SKIP_IMAGE, True),
    (_bad_area, src.AREA_INVALID, src.USE_BOX_AREA, False),
    (_unknown_image_id, src.UNKNOWN_IMAGE_ID, src.DROP_ANNOTATION, False),
    (_duplicate_annotation_id, src.DUPLICATE_ANNOTATION_ID, src.DROP_ANNOTATION, False),
    (_zero_declared_width, src.IMAGE_SIZE_INVALID, src.USE_REAL_SIZE, False),
    (_string_area, src.AREA_INVALID, src.USE_BOX_AREA, False),
    (_iscrowd_2, src.ISCROWD_INVALID, src.DROP_ANNOTATION, False),
]


@pytest.mark.parametrize("mutate, reason, action, image_skipped", BAD_INPUT, ids=[c[0].__name__[1:] for c in BAD_INPUT])
def test_bad_input_is_reported_and_counted(tmp_path, monkeypatch, mutate, reason, action, image_skipped):
    ann_path, image_dir = _synth(tmp_path)
    coco = json.loads(ann_path.read_text())
    img, ann, n_anns = _first_image(coco)
    mutate(coco, image_dir, img, ann, tmp_path)
    ann_path.write_text(json.dumps(coco))  # NaN is written as the (non-standard, accepted) NaN literal

    opened = []
    real_read = image_files._read_file
    monkeypatch.setattr(image_files, "_read_file",
                        lambda path, max_bytes: opened.append(Path(path)) or real_read(path, max_bytes))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)

    _assert_consistent(result)
    entries = _entries(result, reason)
    assert len(entries) == 1, result.report
    assert entries[0]["action"] == action
    assert result.problems == len(result.report) >= 1
    counts, skipped = result.counts, result.manifest["skipped"]
    assert counts["images_in"] == len(coco["images"])
    assert counts["annotations_in"] == len(coco["annotations"])
    if image_skipped:
        assert skipped["images"] == {reason: 1}
        assert counts["images_written"] == len(coco["images"]) - 1
        if reason != src.DUPLICATE_IMAGE_ID:  # a duplicate's annotations belong to the first image
            assert skipped["annotations"] == {src.IMAGE_SKIPPED: n_anns}
    elif action == src.DROP_ANNOTATION:
        assert skipped["annotations"] == {reason: 1} and skipped["images"] == {}
        assert entries[0]["annotation_id"] == ann["id"]
        assert ann["id"] not in [i for row in _rows(result.out_dir) for i in row["ann_ids"]] or \
            reason == src.DUPLICATE_ANNOTATION_ID  # the first of two equal ids is kept
    else:  # reported, nothing dropped
        assert counts["images_skipped"] == counts["annotations_skipped"] == 0
    # Unsafe names are refused before anything is opened: no path outside the image root was read.
    assert opened and all(path.resolve().is_relative_to(image_dir.resolve()) for path in opened)


def test_clipped_box_is_written_clipped(tmp_path):
    ann_path, image_dir = _synth(tmp_path)
    coco = json.loads(ann_path.read_text())
    img, ann, _ = _first_image(coco)
    ann["bbox"] = [150.0, -5.0, 30.0, 20.0]  # x 150..180 in a 160-wide image, y -5..15
    ann_path.write_text(json.dumps(coco))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    assert result.counts["annotations_clipped"] == 1
    row = next(r for r in _rows(result.out_dir) if r["image_id"] == img["id"])
    box = row["boxes"][row["ann_ids"].index(ann["id"])]
    np.testing.assert_allclose(box, [150, 0, 160, 15], atol=1e-4)
    assert row["areas"][row["ann_ids"].index(ann["id"])] == pytest.approx(ann["area"])  # the source's area


def test_size_mismatch_uses_the_real_size(tmp_path):
    ann_path, image_dir = _synth(tmp_path)
    coco = json.loads(ann_path.read_text())
    img, _, _ = _first_image(coco)
    img["width"], img["height"] = 320, 180
    ann_path.write_text(json.dumps(coco))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=(320, 180), workers=1)
    row = next(r for r in _rows(result.out_dir) if r["image_id"] == img["id"])
    assert (row["orig_width"], row["orig_height"], row["scale"]) == (160, 90, 2.0)
    assert "declared 320x180, file is 160x90" in _entries(result, src.IMAGE_SIZE_MISMATCH)[0]["detail"]


@pytest.mark.parametrize("width, height, detail", [
    (0, 90, "'width' 0 is not"), (-160, 90, "'width' -160 is not"), (160.0, 90, "'width' 160.0 is not"),
    ("160", 90, "'width' '160' is not"), (True, 90, "'width' True is not"), (160, [90], "'height' [90] is not"),
    (160, None, "only one of 'width'/'height'"),  # None: no height key at all
])
def test_bad_declared_size_uses_the_real_size_and_is_reported(tmp_path, capsys, width, height, detail):
    ann_path, image_dir = _synth(tmp_path, n=4)
    coco = json.loads(ann_path.read_text())
    img = coco["images"][1]
    img["width"] = width
    img.pop("height") if height is None else img.update(height=height)
    ann_path.write_text(json.dumps(coco))
    code = main(["prepare", "--coco", str(ann_path), "--images", str(image_dir), "--out", str(tmp_path / "out"),
                 "--size", "160x90", "--workers", "1"])
    assert code == 0 and "prepared 4 images (0 skipped," in capsys.readouterr().out  # the run goes on
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    assert [(e["reason"], e["action"], e["image_id"], e["file_name"]) for e in report] == [
        (src.IMAGE_SIZE_INVALID, src.USE_REAL_SIZE, img["id"], img["file_name"])]
    assert report[0]["detail"].startswith("images[1]: ") and detail in report[0]["detail"]
    row = next(r for r in _rows(tmp_path / "out") if r["image_id"] == img["id"])
    assert (row["orig_width"], row["orig_height"], row["scale"]) == (160, 90, 1.0)
    assert row["ann_ids"] == [a["id"] for a in coco["annotations"] if a["image_id"] == img["id"]]


def test_bad_area_and_iscrowd_are_handled_per_annotation(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=8)
    coco = json.loads(ann_path.read_text())
    anns = coco["annotations"][:6]
    for ann, area, iscrowd in zip(anns, ["12", None, True, float("nan"), 50.0, 30.0],
                                  [0, None, True, 1.0, "1", 2]):
        ann["area"], ann["iscrowd"] = area, iscrowd
    ann_path.write_text(json.dumps(coco))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    _assert_consistent(result)
    rows = {i: (row, k) for row in _rows(result.out_dir) for k, i in enumerate(row["ann_ids"])}

    def written(ann):
        row, k = rows[ann["id"]]
        return row["areas"][k], row["iscrowd"][k]

    box_area = lambda ann: pytest.approx(ann["bbox"][2] * ann["bbox"][3], rel=1e-5)  # noqa: E731
    assert written(anns[0]) == (box_area(anns[0]), False)  # a string area: the box's, reported
    assert written(anns[1]) == (box_area(anns[1]), False)  # null area and iscrowd: as if absent
    assert written(anns[2]) == (box_area(anns[2]), True)  # JSON true is iscrowd 1; a bool area is not a number
    assert written(anns[3]) == (box_area(anns[3]), True)  # NaN area; iscrowd 1.0 == 1
    assert anns[4]["id"] not in rows and anns[5]["id"] not in rows  # iscrowd "1" and 2: dropped
    assert {(e["annotation_id"], e["reason"], e["action"]) for e in result.report} == {
        (anns[0]["id"], src.AREA_INVALID, src.USE_BOX_AREA), (anns[2]["id"], src.AREA_INVALID, src.USE_BOX_AREA),
        (anns[3]["id"], src.AREA_INVALID, src.USE_BOX_AREA),
        (anns[4]["id"], src.ISCROWD_INVALID, src.DROP_ANNOTATION),
        (anns[5]["id"], src.ISCROWD_INVALID, src.DROP_ANNOTATION)}
    assert result.manifest["skipped"]["annotations"] == {src.ISCROWD_INVALID: 2}


def _jpeg_with_trailer(data: bytes) -> bytes:
    # A motion photo / maker trailer: binary data after FFD9, with an FFDA pair and no FFD9 after it.
    return data + b"MotionPhoto_Data\xff\xda\x00\x0c" + bytes(range(256)) * 4


@pytest.mark.parametrize("edit, truncated", [
    (_jpeg_with_trailer, False),
    (lambda data: data + b"\x00" * 16, False),  # zero padding after FFD9
    (lambda data: data[:-2], True),  # only the end marker missing
    (lambda data: data[:len(data) * 2 // 3], True),  # cut inside the compressed data
    (lambda data: data[:600], True),  # cut inside the headers
], ids=["trailer", "zero-padding", "no-eoi", "cut-in-scan", "cut-in-header"])
def test_jpeg_truncation_is_found_from_the_markers_not_the_last_bytes(tmp_path, edit, truncated):
    ann_path, image_dir = _synth(tmp_path, n=4)
    path = image_dir / "000001.jpg"
    original = cv2.imread(str(path))
    path.write_bytes(edit(path.read_bytes()))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    _assert_consistent(result)
    rows = {r["file_name"]: r for r in _rows(result.out_dir)}
    if truncated:
        assert [(e["file_name"], e["reason"]) for e in result.report] == [("000001.jpg", src.IMAGE_TRUNCATED)]
        assert "000001.jpg" not in rows
    else:
        assert result.report == []
        shard_image = cv2.imdecode(np.frombuffer(rows["000001.jpg"]["image"], np.uint8), cv2.IMREAD_COLOR)
        assert np.abs(shard_image.astype(int) - original).mean() < 3  # the picture itself, re-encoded


def test_missing_image_folder_exits_1_with_one_line(tmp_path, capsys):
    ann_path, image_dir = _synth(tmp_path, n=2)
    for images in (tmp_path / "no_such_folder", ann_path):  # missing, and a file instead of a folder
        code = main(["prepare", "--coco", str(ann_path), "--images", str(images), "--out", str(tmp_path / "out"),
                     "--size", "160x90"])
        err = capsys.readouterr().err
        assert code == 1 and str(images) in err and "--images" in err
        assert err.count("\n") == 1 and "Traceback" not in err
        assert not (tmp_path / "out").exists()  # nothing written, not even an empty shard

    yolo_root = _write_yolo_copy(ann_path, image_dir, tmp_path / "yolo")
    shutil.rmtree(yolo_root / "images" / "train")
    code = main(["prepare", "--yolo", str(yolo_root), "--out", str(tmp_path / "out"), "--size", "160x90"])
    err = capsys.readouterr().err
    assert code == 1 and "'images/train'" in err and "not found" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("content, expected", [
    ("{not json", "not valid JSON"),
    ("[]", "top level"),
    ('{"images": [], "annotations": []}', "missing required key 'categories'"),
    ('{"images": {}, "annotations": [], "categories": []}', "'images' must be a list"),
    ('{"images": [{"id": 1}], "annotations": [], "categories": []}', "images[0]: missing required key 'file_name'"),
    ('{"images": [{"id": 1, "file_name": "a.jpg"}], "categories": [{"id": 1, "name": "a"}],'
     ' "annotations": [{"id": 1, "image_id": "1", "category_id": 1, "bbox": [0, 0, 1, 1]}]}',
     "annotations[0]: 'image_id' must be an integer"),
    ('{"images": [], "annotations": [], "categories": [{"id": 1, "name": "a"}, {"id": 1, "name": "b"}]}',
     "duplicate category id 1"),
])
def test_broken_annotation_file_exits_1_with_one_line(tmp_path, capsys, content, expected):
    ann_path = tmp_path / "instances.json"
    ann_path.write_text(content)
    (tmp_path / "images").mkdir()
    code = main(["prepare", "--coco", str(ann_path), "--images", str(tmp_path / "images"),
                 "--out", str(tmp_path / "out"), "--size", "160x90"])
    err = capsys.readouterr().err
    assert code == 1
    assert expected in err and str(ann_path) in err
    assert err.count("\n") == 1 and "Traceback" not in err


def test_missing_annotation_file_exits_1(tmp_path, capsys):
    code = main(["prepare", "--coco", str(tmp_path / "nope.json"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "out"), "--size", "160x90"])
    assert code == 1 and "not found" in capsys.readouterr().err


def test_size_must_be_16_9(tmp_path, capsys):
    ann_path, image_dir = _synth(tmp_path, n=2)
    code = main(["prepare", "--coco", str(ann_path), "--images", str(image_dir), "--out", str(tmp_path / "out"),
                 "--size", "640x480"])
    err = capsys.readouterr().err
    assert code == 1
    assert "640x480 is not 16:9" in err and "640x360" in err and "848x477" in err
    assert not (tmp_path / "out").exists()  # refused before anything was read or written


def test_strict_exits_2_after_writing_the_report(tmp_path, capsys):
    ann_path, image_dir = _synth(tmp_path)
    args = ["prepare", "--coco", str(ann_path), "--images", str(image_dir), "--size", "160x90", "--workers", "1"]
    assert main(args + ["--out", str(tmp_path / "clean"), "--strict"]) == 0

    coco = json.loads(ann_path.read_text())
    coco["annotations"][0]["bbox"][2] = 0
    ann_path.write_text(json.dumps(coco))
    assert main(args + ["--out", str(tmp_path / "lenient")]) == 0
    assert main(args + ["--out", str(tmp_path / "strict"), "--strict"]) == 1
    out = capsys.readouterr().out
    assert "1 problems" in out and "_report.json" in out
    report = json.loads((tmp_path / "strict" / "_report.json").read_text())
    assert [e["reason"] for e in report] == [src.BBOX_NON_POSITIVE]
    assert read_manifest(tmp_path / "strict")["counts"]["annotations_skipped"] == 1


# ----------------------------------------------------------------------------------------------------
# Geometry end to end, manifest, YOLO
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(320, 180), (128, 72)])
def test_letterbox_round_trip_through_the_shards(tmp_path, target):
    """Boxes read back from the parquet and mapped to original pixels equal the source boxes."""
    ann_path, image_dir = _synth(tmp_path, n=10, aspect_mix=True)
    coco = json.loads(ann_path.read_text())
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=target, workers=1, rows_per_shard=4)
    _assert_consistent(result)
    assert result.problems == 0
    source = {a["id"]: a for a in coco["annotations"]}
    label_of = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
    rows = _rows(result.out_dir)
    assert {(r["orig_width"], r["orig_height"]) for r in rows} == {(160, 90), (120, 90), (90, 160)}
    seen = []
    for row in rows:
        image = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
        assert image.shape == (target[1], target[0], 3) and (row["width"], row["height"]) == target
        if row["ann_ids"]:
            back = boxes_from_letterbox(row["boxes"], row["scale"], row["pad_x"], row["pad_y"])
            expected = xywh_to_xyxy([source[i]["bbox"] for i in row["ann_ids"]])
            np.testing.assert_allclose(back, expected, atol=0.5)
            assert np.abs(back - expected).max() < 0.01  # in fact exact up to float32
        assert row["labels"] == [label_of[source[i]["category_id"]] for i in row["ann_ids"]]
        assert row["areas"] == [source[i]["area"] for i in row["ann_ids"]]
        seen += row["ann_ids"]
    assert sorted(seen) == sorted(source)
    assert [r["image_id"] for r in rows] == sorted(img["id"] for img in coco["images"])


def test_manifest_contents(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=7)
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1, quality=80, rows_per_shard=3)
    manifest = read_manifest(tmp_path / "out")
    assert manifest["format"] == "neoray-shards" and manifest["version"] == 1 and manifest["size"] == [160, 90]
    assert manifest["categories"] == [{"id": 1, "name": "rectangle", "label": 0},
                                      {"id": 3, "name": "outlined_rectangle", "label": 1},
                                      {"id": 7, "name": "ellipse", "label": 2}]
    assert [s["rows"] for s in manifest["shards"]] == [3, 3, 1]
    assert shard_files(tmp_path / "out") == [str(tmp_path / "out" / f"shard-0000{i}.parquet") for i in range(3)]
    assert manifest["options"]["quality"] == 80 and manifest["options"]["source"] == "coco"
    assert set(manifest["counts"]) == {"images_in", "images_written", "images_skipped", "images_without_boxes",
                                       "images_without_label_file", "annotations_in", "annotations_written",
                                       "annotations_skipped", "annotations_clipped"}
    assert manifest["counts"]["images_without_boxes"] == 0 and manifest["warnings"] == {}
    assert manifest["skipped"] == {"images": {}, "annotations": {}, "categories": {}}
    for path in shard_files(tmp_path / "out"):
        assert pq.read_schema(path).equals(SCHEMA)
    assert result.problems == 0


def test_read_manifest_errors_are_one_line(tmp_path):
    with pytest.raises(ManifestError, match="manifest not found") as err:
        read_manifest(tmp_path)
    assert "\n" not in str(err.value)
    (tmp_path / "_manifest.json").write_text("{")
    with pytest.raises(ManifestError, match="not valid JSON"):
        read_manifest(tmp_path)
    (tmp_path / "_manifest.json").write_text('{"format": "neoray-shards", "version": 1, "size": [1, 1]}')
    with pytest.raises(ManifestError, match="'categories'"):
        read_manifest(tmp_path)


def _write_yolo_copy(coco_path: Path, image_dir: Path, root: Path, names_as_dict: bool = False) -> Path:
    """The same images and boxes in Ultralytics layout (class = rank of the COCO category id)."""
    coco = json.loads(coco_path.read_text())
    cats = sorted(coco["categories"], key=lambda c: c["id"])
    cls_of = {c["id"]: i for i, c in enumerate(cats)}
    names = {i: c["name"] for i, c in enumerate(cats)} if names_as_dict else [c["name"] for c in cats]
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text(yaml.safe_dump({"path": ".", "train": "images/train", "val": "images/val",
                                                    "names": names}))
    for img in coco["images"]:
        shutil.copy(image_dir / img["file_name"], root / "images" / "train" / img["file_name"])
        lines = []
        for ann in (a for a in coco["annotations"] if a["image_id"] == img["id"]):
            x, y, w, h = ann["bbox"]
            W, H = img["width"], img["height"]
            lines.append(f"{cls_of[ann['category_id']]} {(x + w / 2) / W:.8f} {(y + h / 2) / H:.8f} "
                         f"{w / W:.8f} {h / H:.8f}")
        if lines:  # empty images get no label file at all (Ultralytics' convention)
            (root / "labels" / "train" / Path(img["file_name"]).with_suffix(".txt")).write_text("\n".join(lines) + "\n")
    return root


def test_yolo_and_coco_give_the_same_shards(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=10, aspect_mix=True)
    yolo_root = _write_yolo_copy(ann_path, image_dir, tmp_path / "yolo")
    coco_result = prepare_coco(ann_path, image_dir, tmp_path / "coco_out", size=(320, 180), workers=1)
    code = main(["prepare", "--yolo", str(yolo_root), "--split", "train", "--out", str(tmp_path / "yolo_out"),
                 "--size", "320x180", "--workers", "1"])
    assert code == 0
    yolo_manifest = read_manifest(tmp_path / "yolo_out")
    assert coco_result.problems == 0 and json.loads((tmp_path / "yolo_out" / "_report.json").read_text()) == []
    assert [c["name"] for c in yolo_manifest["categories"]] == [c["name"] for c in coco_result.manifest["categories"]]
    assert yolo_manifest["counts"]["annotations_written"] == coco_result.counts["annotations_written"] > 0

    coco_rows = sorted(_rows(tmp_path / "coco_out"), key=lambda r: r["file_name"])
    yolo_rows = sorted(_rows(tmp_path / "yolo_out"), key=lambda r: r["file_name"])
    assert [r["file_name"] for r in coco_rows] == [r["file_name"] for r in yolo_rows]
    assert [r["image_id"] for r in yolo_rows] == list(range(10))  # YOLO ids: index in sorted file order
    for c, y in zip(coco_rows, yolo_rows):
        assert c["image"] == y["image"]
        assert c["labels"] == y["labels"]
        for key in ("orig_width", "orig_height", "scale", "pad_x", "pad_y"):
            assert c[key] == y[key]
        np.testing.assert_allclose(np.array(y["boxes"]).reshape(-1, 4), np.array(c["boxes"]).reshape(-1, 4),
                                   atol=1e-3)
        np.testing.assert_allclose(y["areas"], c["areas"], rtol=1e-4)


def test_yolo_bad_labels_are_reported(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=4)
    root = _write_yolo_copy(ann_path, image_dir, tmp_path / "yolo", names_as_dict=True)
    label = root / "labels" / "train" / "000001.txt"
    good_lines = label.read_text().splitlines()
    label.write_text("\n".join(good_lines + [
        "0 0.5 0.5 0.2",  # four fields
        "0 0.5 0.5 0.2 0.2 0.9",  # six fields (a polygon, not a box)
        "3 0.5 0.5 0.2 0.2",  # class 3 with 3 classes
        "-1 0.5 0.5 0.2 0.2",
        "1.5 0.5 0.5 0.2 0.2",
        "zero 0.5 0.5 0.2 0.2",
        "0 0.5 0.5 0.0 0.2",
        "0 0.5 nan 0.2 0.2",
        "0 1.5 1.5 0.2 0.2",  # fully outside the image
        "",
    ]) + "\n")
    (root / "images" / "train" / "notes.txt").write_text("not an image")
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    result = prepare_yolo(root, tmp_path / "out", size=SIZE, split="train", workers=1)
    _assert_consistent(result)
    reasons = [e["reason"] for e in result.report]
    assert reasons.count(src.LABEL_FIELD_COUNT) == 2
    assert reasons.count(src.CLASS_OUT_OF_RANGE) == 3
    assert reasons.count(src.LABEL_NON_NUMERIC) == 1
    assert reasons.count(src.BBOX_NON_POSITIVE) == 1 and reasons.count(src.BBOX_NOT_FINITE) == 1
    assert reasons.count(src.BBOX_OUTSIDE) == 1
    assert reasons.count(src.UNSUPPORTED_FILE) == 1 and reasons.count(src.LABEL_WITHOUT_IMAGE) == 1
    assert result.counts["annotations_in"] == result.counts["annotations_written"] + 9
    assert result.counts["annotations_written"] == len(json.loads(ann_path.read_text())["annotations"])
    assert result.counts["images_in"] == 5 and result.counts["images_written"] == 4
    detail = next(e for e in result.report if e["reason"] == src.LABEL_NON_NUMERIC)["detail"]
    assert "000001.txt" in detail and "zero" in detail


def test_yolo_broken_data_yaml(tmp_path, capsys):
    (tmp_path / "data.yaml").write_text("names: [a, b]\n")
    code = main(["prepare", "--yolo", str(tmp_path), "--out", str(tmp_path / "out"), "--size", "160x90"])
    err = capsys.readouterr().err
    assert code == 1 and "missing required key 'train'" in err and err.count("\n") == 1


# ----------------------------------------------------------------------------------------------------
# Re-runs
# ----------------------------------------------------------------------------------------------------


def _state(out_dir: Path) -> dict:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(out_dir.glob("shard-*.parquet"))}


def test_rerun_reuses_unchanged_shards(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=8)
    run = lambda **kw: prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1,  # noqa: E731
                                    rows_per_shard=3, **kw)
    first = run()
    assert (first.shards_written, first.shards_reused) == (3, 0)
    before = _state(tmp_path / "out")

    second = run()
    assert (second.shards_written, second.shards_reused) == (0, 3)
    assert _state(tmp_path / "out") == before  # not even rewritten
    assert second.manifest == first.manifest
    assert "3 shards (3 reused)" in second.summary()

    # One changed image (ids 4..6 live in shard 1) re-encodes only its shard.
    img = cv2.imread(str(image_dir / "000005.jpg"))
    cv2.imwrite(str(image_dir / "000005.jpg"), 255 - img)
    third = run()
    assert (third.shards_written, third.shards_reused) == (1, 2)
    after = _state(tmp_path / "out")
    assert [after[n] == before[n] for n in sorted(before)] == [True, False, True]

    # A damaged shard is rebuilt, not trusted.
    shard = tmp_path / "out" / "shard-00002.parquet"
    shard.write_bytes(shard.read_bytes()[:-10] + b"0123456789")
    fourth = run()
    assert (fourth.shards_written, fourth.shards_reused) == (1, 2)
    assert _state(tmp_path / "out")["shard-00002.parquet"][0] == before["shard-00002.parquet"][0]

    # Different options re-encode everything; problems of reused shards are still reported.
    assert run(quality=60).shards_written == 3


def test_rerun_keeps_problems_of_reused_shards_and_removes_stale_shards(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=8)
    (image_dir / "000002.jpg").write_bytes(b"broken")
    first = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1, rows_per_shard=2)
    second = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1, rows_per_shard=2)
    assert second.shards_reused == 4 and second.report == first.report and second.counts == first.counts
    assert [e["reason"] for e in second.report] == [src.IMAGE_UNREADABLE]
    third = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1, rows_per_shard=8)
    assert sorted(p.name for p in (tmp_path / "out").glob("shard-*")) == ["shard-00000.parquet"]
    _assert_consistent(third)


def test_rerun_after_an_interrupted_run_leaves_only_its_own_shards(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=8)
    out = tmp_path / "out"
    prepare_coco(ann_path, image_dir, out, size=SIZE, workers=1, rows_per_shard=2)  # 4 shards
    # A run killed half way: manifest already gone, shards of the old layout and temporary files left.
    (out / "_manifest.json").unlink()
    for leftover in (".shard-00005.parquet.tmp4242", "._manifest.json.x1y2z3.tmp", "._report.json.q9.tmp"):
        (out / leftover).write_bytes(b"partial")
    (out / "notes.txt").write_text("the user's own file")

    result = prepare_coco(ann_path, image_dir, out, size=SIZE, workers=1, rows_per_shard=8)  # 1 shard
    assert sorted(p.name for p in out.iterdir()) == ["_manifest.json", "_report.json", "notes.txt",
                                                      "shard-00000.parquet"]
    (out / "notes.txt").unlink()
    assert pq.read_table(out).num_rows == result.counts["images_written"] == 8  # the directory as a whole
    _assert_consistent(result)


def test_small_dataset_is_cut_into_one_shard_per_worker(tmp_path, monkeypatch):
    """256 images at the default 256 rows per shard would be one task on one core."""
    ann_path, image_dir = _synth(tmp_path, n=9)
    planned = []
    real_run_tasks = prepare_module._run_tasks

    def run_tasks(tasks, workers):
        planned.append((workers, [len(t.records) for t in tasks]))
        return real_run_tasks(tasks, 1)  # the cut is under test here; the pool has its own test below

    monkeypatch.setattr(prepare_module, "_run_tasks", run_tasks)
    first = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=2)
    assert planned == [(2, [5, 4])]
    assert [s["rows"] for s in first.manifest["shards"]] == [5, 4]
    assert first.manifest["options"]["shard_rows"] == 5 and first.manifest["options"]["rows_per_shard"] == 256
    _assert_consistent(first)

    again = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=2)
    assert (again.shards_written, again.shards_reused) == (0, 2) and planned[-1] == (2, [])
    one = prepare_coco(ann_path, image_dir, tmp_path / "one", size=SIZE, workers=1)
    assert [s["rows"] for s in one.manifest["shards"]] == [9]
    assert _rows(tmp_path / "one") == _rows(tmp_path / "out")  # same rows, cut differently
    assert prepare_coco(ann_path, image_dir, tmp_path / "big", size=SIZE, workers=2,
                        rows_per_shard=3).manifest["options"]["shard_rows"] == 3  # never more than asked


@pytest.mark.slow
def test_process_pool_writes_the_same_shards(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=8)
    one = prepare_coco(ann_path, image_dir, tmp_path / "one", size=SIZE, workers=1, rows_per_shard=3)
    two = prepare_coco(ann_path, image_dir, tmp_path / "two", size=SIZE, workers=2, rows_per_shard=3)
    assert [s["sha256"] for s in two.manifest["shards"]] == [s["sha256"] for s in one.manifest["shards"]]
    _assert_consistent(two)


# ----------------------------------------------------------------------------------------------------
# Reading the image files: only regular files, with a size cap and a pixel limit
# ----------------------------------------------------------------------------------------------------


class _Hung(BaseException):
    """Not an OSError (as TimeoutError is): no ``except OSError`` in the code under test may swallow it."""


@contextlib.contextmanager
def _deadline(seconds: float):
    """Fail instead of hanging (a FIFO opened for reading blocks until someone writes to it)."""
    def fail(*_):
        raise _Hung(f"still running after {seconds} s")

    previous = signal.signal(signal.SIGALRM, fail)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _replace_with_fifo(path: Path) -> None:
    path.unlink()
    os.mkfifo(path)


def _replace_with_link_to_device(path: Path) -> None:
    path.unlink()
    os.symlink("/dev/zero", path)


@pytest.mark.parametrize("replace", [_replace_with_fifo, _replace_with_link_to_device], ids=["fifo", "dev-zero"])
def test_special_files_are_skipped_not_read(tmp_path, replace):
    ann_path, image_dir = _synth(tmp_path, n=4)
    replace(image_dir / "000002.jpg")
    with _deadline(30):
        result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    _assert_consistent(result)
    assert [(e["file_name"], e["reason"], e["action"]) for e in result.report] == [
        ("000002.jpg", src.IMAGE_NOT_REGULAR, src.SKIP_IMAGE)]
    assert result.counts["images_written"] == 3 and result.manifest["skipped"]["images"] == {src.IMAGE_NOT_REGULAR: 1}


def test_yolo_counts_special_files_as_skipped_images(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=3)
    root = _write_yolo_copy(ann_path, image_dir, tmp_path / "yolo")
    os.mkfifo(root / "images" / "train" / "fifo.jpg")
    os.symlink("/dev/zero", root / "images" / "train" / "zero.jpg")
    with _deadline(30):
        result = prepare_yolo(root, tmp_path / "out", size=SIZE, workers=1)
    _assert_consistent(result)
    assert result.counts["images_in"] == 5 and result.manifest["skipped"]["images"] == {src.IMAGE_NOT_REGULAR: 2}


def _png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit greyscale PNG of width x height zeros: kilobytes on disk, 3 bytes a pixel decoded."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\x00" * (1 + (width + 7) // 8)  # filter byte, then the packed bits
    packer, parts = zlib.compressobj(9), []
    for start in range(0, height, 1000):
        parts.append(packer.compress(row * min(1000, height - start)))
    parts.append(packer.flush())
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", b"".join(parts)) + chunk(b"IEND", b"")


def test_decompression_bomb_is_refused_before_decoding(tmp_path, monkeypatch):
    ann_path, image_dir = _synth(tmp_path, n=3)
    bomb = _png_bomb(30000, 30000)
    assert len(bomb) < 200_000  # small on disk, 2.7 GB as a decoded BGR image
    (image_dir / "000002.jpg").write_bytes(bomb)
    decoded = []
    real_imdecode = prepare_module.cv2.imdecode
    monkeypatch.setattr(prepare_module.cv2, "imdecode", lambda buf, flags: decoded.append(len(buf)) or
                        real_imdecode(buf, flags))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    _assert_consistent(result)
    [entry] = result.report
    assert (entry["file_name"], entry["reason"]) == ("000002.jpg", src.IMAGE_TOO_MANY_PIXELS)
    assert entry["detail"] == f"30000x30000 = 900000000 pixels, over --max-image-pixels {8192 * 8192}"
    assert len(bomb) not in decoded and len(decoded) == 2  # the other two images only


def test_pixel_limit_and_file_size_cap_are_options(tmp_path, capsys):
    ann_path, image_dir = _synth(tmp_path, n=4)
    assert prepare_module.DEFAULT_MAX_IMAGE_PIXELS >= 7680 * 4320  # a real 8K frame fits
    big = image_dir / "000003.jpg"
    cv2.imwrite(str(big), cv2.resize(cv2.imread(str(big)), (320, 180)))  # 57600 pixels, the others 14400
    base = ["prepare", "--coco", str(ann_path), "--images", str(image_dir), "--size", "160x90", "--workers", "1"]
    assert main(base + ["--out", str(tmp_path / "a"), "--max-image-pixels", "200x100"]) == 0
    report = json.loads((tmp_path / "a" / "_report.json").read_text())
    assert [(e["file_name"], e["reason"]) for e in report if e["action"] == src.SKIP_IMAGE] == [
        ("000003.jpg", src.IMAGE_TOO_MANY_PIXELS)]

    size = big.stat().st_size
    assert main(base + ["--out", str(tmp_path / "b"), "--max-image-bytes", str(size - 1)]) == 0
    report = json.loads((tmp_path / "b" / "_report.json").read_text())
    skipped = [(e["file_name"], e["reason"], e["detail"]) for e in report if e["action"] == src.SKIP_IMAGE]
    assert skipped == [("000003.jpg", src.IMAGE_TOO_LARGE,
                        f"{size} bytes, over the limit of {size - 1} (--max-image-bytes)")]
    manifest = read_manifest(tmp_path / "b")
    assert manifest["options"]["max_image_bytes"] == size - 1 and manifest["counts"]["images_written"] == 3
    capsys.readouterr()

    for flag, value in (("--max-image-bytes", "lots"), ("--max-image-pixels", "0"), ("--max-image-pixels", "8kx8k")):
        assert main(base + ["--out", str(tmp_path / "c"), flag, value]) == 1
        err = capsys.readouterr().err
        assert flag in err and err.count("\n") == 1
    assert prepare_command.parse_bytes("256M") == 256 << 20 and prepare_command.parse_bytes("1GiB") == 1 << 30
    assert prepare_command.parse_pixels("8192x8192") == prepare_module.DEFAULT_MAX_IMAGE_PIXELS


# ----------------------------------------------------------------------------------------------------
# The source is wrong, and something says so
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("misplace", ["no labels folder", "labels not where the layout looks"])
def test_yolo_without_any_label_file_is_a_problem(tmp_path, capsys, misplace):
    ann_path, image_dir = _synth(tmp_path, n=3)
    root = _write_yolo_copy(ann_path, image_dir, tmp_path / "yolo")
    if misplace == "no labels folder":
        shutil.rmtree(root / "labels")
    else:  # flat in labels/, while the layout reads labels/train/
        for label in (root / "labels" / "train").iterdir():
            label.rename(root / "labels" / label.name)
    args = ["prepare", "--yolo", str(root), "--size", "160x90", "--workers", "1"]
    assert main(args + ["--out", str(tmp_path / "lenient")]) == 0
    out = capsys.readouterr().out
    assert "3 without a label file" in out and "1 problems (1 warnings)" in out
    [entry] = json.loads((tmp_path / "lenient" / "_report.json").read_text())
    assert (entry["reason"], entry["action"]) == (src.NO_LABEL_FILES, src.KEPT)
    assert str(root / "labels" / "train") in entry["detail"]
    manifest = read_manifest(tmp_path / "lenient")
    assert manifest["warnings"] == {src.NO_LABEL_FILES: 1} and manifest["counts"]["images_written"] == 3
    assert main(args + ["--out", str(tmp_path / "strict"), "--strict"]) == 1


def test_yolo_background_images_are_counted_not_reported(tmp_path, capsys):
    ann_path, image_dir = _synth(tmp_path, n=10)  # image 8 (index 7) is empty: no label file
    root = _write_yolo_copy(ann_path, image_dir, tmp_path / "yolo")
    (root / "labels" / "train" / "000001.txt").unlink()
    code = main(["prepare", "--yolo", str(root), "--out", str(tmp_path / "out"), "--size", "160x90",
                 "--workers", "1", "--strict"])
    assert code == 0
    assert "(0 skipped, 2 without boxes, 2 without a label file)" in capsys.readouterr().out
    counts = read_manifest(tmp_path / "out")["counts"]
    assert counts["images_without_label_file"] == 2 and counts["images_without_boxes"] == 2


def test_empty_yolo_split_is_an_error(tmp_path, capsys):
    ann_path, image_dir = _synth(tmp_path, n=2)
    root = _write_yolo_copy(ann_path, image_dir, tmp_path / "yolo")
    (root / "images" / "val").mkdir()
    (root / "images" / "val" / "notes.txt").write_text("nothing here yet")
    code = main(["prepare", "--yolo", str(root), "--split", "val", "--out", str(tmp_path / "out"),
                 "--size", "160x90"])
    err = capsys.readouterr().err
    assert code == 1 and "'val': no image files" in err and err.count("\n") == 1
    assert not (tmp_path / "out").exists()


def _exif_jpeg(displayed: np.ndarray, orientation: int) -> bytes:
    """A JPEG whose stored pixels show ``displayed`` once its EXIF orientation (6: turn 90 degrees
    clockwise) is applied, as a phone writes a portrait photo."""
    from PIL import Image

    assert orientation == 6
    stored = np.ascontiguousarray(np.rot90(displayed, 1))  # counter-clockwise; the viewer turns it back
    exif = Image.Exif()
    exif[0x0112] = orientation  # the EXIF Orientation tag
    buffer = io.BytesIO()
    Image.fromarray(stored[..., ::-1]).save(buffer, "JPEG", quality=95, exif=exif)
    return buffer.getvalue()


def test_yolo_boxes_are_in_the_exif_rotated_frame(tmp_path):
    displayed = np.full((160, 90, 3), 40, np.uint8)  # a portrait photo, 90 wide
    displayed[100:150, 10:40] = 255  # the object, where a YOLO label (displayed frame) puts it
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [thing]\n")
    (root / "images" / "train" / "photo.jpg").write_bytes(_exif_jpeg(displayed, 6))
    (root / "labels" / "train" / "photo.txt").write_text(f"0 {25 / 90} {125 / 160} {30 / 90} {50 / 160}\n")
    result = prepare_yolo(root, tmp_path / "out", size=SIZE, workers=1)
    assert result.report == []
    [row] = _rows(tmp_path / "out")
    assert (row["orig_width"], row["orig_height"]) == (90, 160)
    image = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR)
    x1, y1, x2, y2 = (round(v) for v in row["boxes"][0])
    inside = image[y1 + 2:y2 - 2, x1 + 2:x2 - 2]
    assert inside.size and inside.min() > 200  # the box is on the object, not on the background


def test_coco_keeps_the_stored_frame_and_says_so(tmp_path):
    displayed = np.full((160, 90, 3), 40, np.uint8)
    ann_path, image_dir = _synth(tmp_path, n=2)
    (image_dir / "000001.jpg").write_bytes(_exif_jpeg(displayed, 6))  # stored 160x90, displayed 90x160
    coco = json.loads(ann_path.read_text())
    coco["images"][0]["width"], coco["images"][0]["height"] = 90, 160
    ann_path.write_text(json.dumps(coco))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    [entry] = _entries(result, src.IMAGE_SIZE_MISMATCH)
    assert "file is 160x90 (90x160 once its EXIF orientation 6 is applied" in entry["detail"]
    row = next(r for r in _rows(tmp_path / "out") if r["file_name"] == "000001.jpg")
    assert (row["orig_width"], row["orig_height"]) == (160, 90)


def test_ids_beyond_int64_are_skipped_records(tmp_path, capsys):
    ann_path, image_dir = _synth(tmp_path, n=4)
    coco = json.loads(ann_path.read_text())
    img, ann, n_anns = _first_image(coco)
    old_id, img["id"] = img["id"], 2 ** 63  # one past int64
    for a in coco["annotations"]:
        if a["image_id"] == old_id:
            a["image_id"] = img["id"]
    other = next(a for a in coco["annotations"] if a["image_id"] != img["id"])
    other["id"] = -(2 ** 63) - 1
    coco["categories"].append({"id": 2 ** 70, "name": "huge"})
    ann_path.write_text(json.dumps(coco))
    code = main(["prepare", "--coco", str(ann_path), "--images", str(image_dir), "--out", str(tmp_path / "out"),
                 "--size", "160x90", "--workers", "1"])
    captured = capsys.readouterr()
    assert code == 0 and "Traceback" not in captured.err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["skipped"]["images"] == {src.ID_OUT_OF_RANGE: 1}
    assert manifest["skipped"]["annotations"] == {src.IMAGE_SKIPPED: n_anns, src.ID_OUT_OF_RANGE: 1}
    assert manifest["skipped"]["categories"] == {src.ID_OUT_OF_RANGE: 1}
    assert [c["name"] for c in manifest["categories"]] == ["rectangle", "outlined_rectangle", "ellipse"]
    assert manifest["counts"]["images_written"] == 3
    report = json.loads((tmp_path / "out" / "_report.json").read_text())
    details = {e["action"]: e["detail"] for e in report}
    assert details[src.SKIP_IMAGE] == "images[0]: 'id' does not fit in int64"
    assert details[src.DROP_ANNOTATION].endswith("'id' does not fit in int64")
    assert details[src.SKIP_CATEGORY] == f"categories[3]: 'id' {2 ** 70} does not fit in int64"


def test_duplicate_names_and_files_are_warnings(tmp_path):
    ann_path, image_dir = _synth(tmp_path, n=4)
    coco = json.loads(ann_path.read_text())
    coco["categories"][2]["name"] = coco["categories"][0]["name"]  # ids 1 and 7 both "rectangle"
    twin = {**coco["images"][1], "id": 99, "file_name": "./" + coco["images"][1]["file_name"]}
    coco["images"].append(twin)
    ann_path.write_text(json.dumps(coco))
    result = prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    _assert_consistent(result)
    assert [(e["reason"], e["action"], e["image_id"]) for e in result.report] == [
        (src.DUPLICATE_CATEGORY_NAME, src.KEPT, None), (src.DUPLICATE_FILE_NAME, src.KEPT, 99)]
    assert "categories 1 and 7 are both named 'rectangle'" in result.report[0]["detail"]
    assert f"the file of image id {coco['images'][1]['id']} too" in result.report[1]["detail"]
    assert result.manifest["warnings"] == {src.DUPLICATE_CATEGORY_NAME: 1, src.DUPLICATE_FILE_NAME: 1}
    assert result.counts["images_written"] == 5 and result.counts["images_skipped"] == 0  # nothing skipped
    assert len(result.manifest["categories"]) == 3

    yolo = tmp_path / "yolo"
    _write_yolo_copy(ann_path, image_dir, yolo)
    (yolo / "data.yaml").write_text("train: images/train\nval: images/val\nnames: [car, person, car]\n")
    result = prepare_yolo(yolo, tmp_path / "yolo_out", size=SIZE, workers=1)
    assert [(e["reason"], e["detail"]) for e in result.report] == [
        (src.DUPLICATE_CATEGORY_NAME, "categories 0 and 2 are both named 'car'; kept as two classes")]


def test_box_thinner_than_a_pixel_after_letterboxing_is_a_warning(tmp_path):
    strip = np.full((20, 20000, 3), 90, np.uint8)
    cv2.imwrite(str(tmp_path / "strip.png"), strip)
    coco = {"images": [{"id": 1, "file_name": "strip.png", "width": 20000, "height": 20}],
            "annotations": [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [100, 2, 4000, 16]},
                            {"id": 2, "image_id": 1, "category_id": 1, "bbox": [5000, 0, 15000, 20]}],
            "categories": [{"id": 1, "name": "rail"}]}
    (tmp_path / "ann.json").write_text(json.dumps(coco))
    result = prepare_coco(tmp_path / "ann.json", tmp_path, tmp_path / "out", size=SIZE, workers=1)
    _assert_consistent(result)
    assert [(e["reason"], e["action"], e["annotation_id"]) for e in result.report] == [
        (src.BBOX_SUBPIXEL, src.KEPT, 1), (src.BBOX_SUBPIXEL, src.KEPT, 2)]
    assert result.report[0]["detail"] == "32x0.128 pixels at 160x90 (image 20000x20)"
    assert result.counts["annotations_written"] == 2 and result.manifest["warnings"] == {src.BBOX_SUBPIXEL: 2}


# ----------------------------------------------------------------------------------------------------
# Files others read: the umask's permissions
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("umask, mode", [(0o022, 0o644), (0o027, 0o640)])
def test_every_written_file_has_the_umask_permissions(tmp_path, umask, mode):
    previous = os.umask(umask)
    try:
        ann_path, image_dir = _synth(tmp_path, n=3)
        prepare_coco(ann_path, image_dir, tmp_path / "out", size=SIZE, workers=1)
    finally:
        os.umask(previous)
    written = sorted((tmp_path / "out").iterdir()) + [ann_path, image_dir / "000001.jpg"]
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in written} == {p.name: mode for p in written}
