"""`neoray check`: a clean shard directory passes with a summary; corruption and bad rows are caught."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neoray import storage
from neoray.cli import main
from neoray.data.check import check_shards
from neoray.data.prepare import prepare_coco
from neoray.data.shards import SCHEMA, read_manifest, write_shard
from neoray.data.synth import write_synthetic_dataset


@pytest.fixture(scope="module")
def clean_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("check")
    out = write_synthetic_dataset(root / "src", train=9, val=0, size=(160, 90), classes=3, seed=2, aspect_mix=True)
    prepare_coco(out["train_annotations"], out["train_images"], root / "shards", size=(160, 90), workers=1,
                 rows_per_shard=4)
    return root / "shards"


@pytest.fixture
def shard_copy(clean_shards, tmp_path) -> Path:
    return Path(shutil.copytree(clean_shards, tmp_path / "shards"))


def _rewrite_shard(shard_dir: Path, index: int, edit, update_manifest: bool) -> None:
    """Apply ``edit`` to the rows of one shard; optionally make the manifest agree (sha256, rows)."""
    manifest = read_manifest(shard_dir)
    entry = manifest["shards"][index]
    path = shard_dir / entry["file"]
    rows = edit(pq.read_table(path).to_pylist())
    write_shard(rows, path)
    if update_manifest:
        entry["sha256"], entry["rows"] = storage.sha256(path), len(rows)
        storage.write_json(shard_dir / "_manifest.json", manifest)


def test_clean_shards_pass_with_a_summary(clean_shards, capsys):
    result = check_shards(clean_shards)
    assert result.ok, result.problems
    manifest = read_manifest(clean_shards)
    summary = result.summary
    assert summary["images"] == manifest["num_images"] == 9 and summary["boxes"] == manifest["num_boxes"]
    assert list(summary["boxes_per_class"]) == ["rectangle", "outlined_rectangle", "ellipse"]
    assert sum(summary["boxes_per_class"].values()) == summary["boxes"] == sum(summary["box_sizes"].values())
    assert summary["empty_images"] == 1  # image index 7 of the synthetic set

    assert main(["check", str(clean_shards)]) == 0
    out = capsys.readouterr().out
    assert "9 images" in out and "rectangle" in out and "small" in out and out.strip().endswith("OK")


def test_flipped_bytes_are_caught(shard_copy, capsys):
    path = shard_copy / "shard-00001.parquet"
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    path.write_bytes(bytes(data))
    result = check_shards(shard_copy)
    assert not result.ok
    assert any("shard-00001.parquet: sha256" in p for p in result.problems)
    assert main(["check", str(shard_copy)]) == 1
    assert "shard-00001.parquet: sha256" in capsys.readouterr().err


def test_dropped_row_is_caught(shard_copy):
    _rewrite_shard(shard_copy, 0, lambda rows: rows[:-1], update_manifest=False)
    problems = check_shards(shard_copy).problems
    assert any("shard-00000.parquet: sha256" in p for p in problems)
    assert any("shard-00000.parquet: 3 rows, manifest says 4" in p for p in problems)
    assert any("num_images 9, shards hold 8" in p for p in problems)


def _set_first_label(value):
    def edit(rows):
        row = next(r for r in rows if r["labels"])
        row["labels"][0] = value
        return rows
    return edit


def test_bad_label_is_caught_even_with_a_consistent_manifest(shard_copy):
    _rewrite_shard(shard_copy, 1, _set_first_label(3), update_manifest=True)  # 3 classes: labels 0..2
    problems = check_shards(shard_copy).problems
    assert len(problems) == 1 and "label 3 outside [0, 3)" in problems[0] and "shard-00001" in problems[0]


def test_box_outside_the_image_is_caught(shard_copy):
    def edit(rows):
        first = next(i for i, r in enumerate(rows) if r["boxes"])
        rows[first]["boxes"][0] = [10.0, 10.0, 170.0, 20.0]  # x2 beyond width 160
        other = rows[(first + 1) % len(rows)]
        other["boxes"] = other["boxes"] + [[5.0, 5.0, 5.0, 8.0]]  # one box too many for the other lists
        return rows
    _rewrite_shard(shard_copy, 1, edit, update_manifest=True)
    problems = check_shards(shard_copy).problems
    assert any("170.0" in p and "not inside" in p for p in problems)
    assert any("list columns differ in length" in p for p in problems)


def test_image_of_the_wrong_size_is_caught(shard_copy):
    import cv2
    import numpy as np

    def edit(rows):
        rows[0]["image"] = cv2.imencode(".jpg", np.zeros((90, 100, 3), np.uint8))[1].tobytes()
        return rows
    _rewrite_shard(shard_copy, 0, edit, update_manifest=True)
    problems = check_shards(shard_copy).problems
    assert len(problems) == 1 and "decodes to 100x90" in problems[0]


def test_missing_shard_wrong_schema_and_missing_manifest(shard_copy, tmp_path, capsys):
    (shard_copy / "shard-00002.parquet").unlink()
    problems = check_shards(shard_copy).problems
    assert "shard-00002.parquet: file missing" in problems

    other_schema = pa.table({"image_id": pa.array([1], pa.int64())})
    pq.write_table(other_schema, shard_copy / "shard-00001.parquet")
    problems = check_shards(shard_copy).problems
    assert any("shard-00001.parquet: schema differs" in p for p in problems)

    assert main(["check", str(tmp_path / "nowhere")]) == 1
    err = capsys.readouterr().err
    assert "manifest not found" in err


def test_parquet_file_not_in_the_manifest_is_caught(shard_copy, capsys):
    # E.g. a shard of an earlier, larger run that an interrupted `prepare` left behind.
    shutil.copy(shard_copy / "shard-00000.parquet", shard_copy / "shard-00007.parquet")
    (shard_copy / "extra").mkdir()
    shutil.copy(shard_copy / "shard-00001.parquet", shard_copy / "extra" / "part.parquet")
    shutil.copy(shard_copy / "shard-00001.parquet", shard_copy / ".shard-00001.parquet")  # hidden: no reader sees it
    assert pq.read_table(shard_copy).num_rows > read_manifest(shard_copy)["num_images"]  # what a reader would get
    problems = check_shards(shard_copy).problems
    assert problems == [
        "extra/part.parquet: Parquet file not listed in the manifest; readers of the directory would include "
        "its rows (re-run `neoray prepare` or delete it)",
        "shard-00007.parquet: Parquet file not listed in the manifest; readers of the directory would include "
        "its rows (re-run `neoray prepare` or delete it)",
    ]
    assert main(["check", str(shard_copy)]) == 1
    assert "shard-00007.parquet: Parquet file not listed" in capsys.readouterr().err


def test_schema_constant_matches_architecture():
    assert SCHEMA.names == ["image_id", "file_name", "image", "width", "height", "orig_width", "orig_height",
                            "scale", "pad_x", "pad_y", "boxes", "labels", "iscrowd", "areas", "ann_ids"]
    assert SCHEMA.field("boxes").type == pa.list_(pa.list_(pa.float32(), 4))
    assert json.dumps(str(SCHEMA.field("labels").type)) == '"list<item: int32>"'


def _drop_label(manifest):
    del manifest["categories"][1]["label"]


@pytest.mark.parametrize("edit, expected", [
    (lambda m: m.update(size=["160", "90"]), "'size' must be [width, height] as two positive integers"),
    (lambda m: m.update(size=[160, 90, 3]), "'size' must be [width, height]"),
    (lambda m: m.update(size=[160, True]), "'size' must be [width, height]"),
    (_drop_label, "categories[1]: expected {'id': int, 'name': str, 'label': int}"),
    (lambda m: m["categories"][0].update(label=5), "category labels [1, 2, 5] are not 0..2"),
    (lambda m: m["categories"][0].update(name=None), "categories[0]: expected"),
    (lambda m: m["shards"][0].update(rows="4"), "shards[0]: expected"),
    (lambda m: m["shards"][0].update(file="../shard-00000.parquet"), "'file' must be a plain file name"),
    (lambda m: m.update(num_boxes=-1), "'num_boxes' missing or not a non-negative int"),
    (lambda m: m.update(skipped=["images"]), "'skipped' must be an object"),
], ids=["size-strings", "size-three", "size-bool", "no-label", "labels-gap", "name-null", "rows-string",
        "file-path", "num-boxes", "skipped-list"])
def test_hand_edited_manifest_is_a_problem_not_a_traceback(shard_copy, capsys, edit, expected):
    path = shard_copy / "_manifest.json"
    manifest = json.loads(path.read_text())
    edit(manifest)
    path.write_text(json.dumps(manifest))
    problems = check_shards(shard_copy).problems
    assert len(problems) == 1 and expected in problems[0] and "\n" not in problems[0]
    assert str(path) in problems[0]
    assert main(["check", str(shard_copy)]) == 1
    err = capsys.readouterr().err
    assert expected in err and "Traceback" not in err


def test_manifest_that_is_not_a_regular_file_is_a_problem(shard_copy):
    import os

    (shard_copy / "_manifest.json").unlink()
    os.mkfifo(shard_copy / "_manifest.json")  # never opened: it would block
    problems = check_shards(shard_copy).problems
    assert len(problems) == 1 and "not a regular file" in problems[0]
