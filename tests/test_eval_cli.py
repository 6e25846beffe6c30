"""Checkpoint loading, `neoray eval` and `neoray predict` end to end on tiny synthetic data."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from cli_output import one_line

from neoray.cli import main
from neoray.evaluation.inference import CheckpointError, load_model
from neoray.models.from_config import model_options

SIZE = "160x90"  # the size of the conftest shards


def save_checkpoint(directory: Path, categories: list[dict], *, ema: bool = True, ddp_prefix: bool = False,
                    size: str = SIZE) -> Path:
    """A checkpoint in the documented format for an untrained rtdetr_cpu (EMA = weights + 0.01)."""
    from neoray.config import load_config
    from neoray.models import build_model

    cfg = load_config(overrides={"data.size": size, "model.name": "rtdetr_cpu"})
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", len(categories), **model_options(cfg.model, with_weights=False))
    state = model.state_dict()
    ema_state = {k: v + 0.01 if v.is_floating_point() else v.clone() for k, v in state.items()} if ema else None
    if ddp_prefix:
        state = {f"module.{k}": v for k, v in state.items()}
    directory.mkdir(parents=True, exist_ok=True)
    torch.save({
        "format": "neoray-checkpoint", "version": 1, "model": state, "ema": ema_state, "optimizer": {},
        "scheduler": {}, "scaler": None, "epoch": 3, "step": 30, "rng": {}, "config": cfg.to_dict(),
        "model_name": "rtdetr_cpu", "num_classes": len(categories), "categories": categories,
        "metrics": {"map": 0.0},
    }, directory / "checkpoint.pt")
    return directory


@pytest.fixture(scope="module")
def categories(synthetic_shards) -> list[dict]:
    from neoray.data.shards import read_manifest

    return read_manifest(synthetic_shards["val"])["categories"]


@pytest.fixture(scope="module")
def checkpoint(categories, tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "epoch_3", categories)


# ----------------------------------------------------------------------------------------------------
# load_model
# ----------------------------------------------------------------------------------------------------


def test_load_model_prefers_ema_weights_and_returns_meta(checkpoint, categories):
    model, meta = load_model(checkpoint)  # the directory
    raw = torch.load(checkpoint / "checkpoint.pt", weights_only=False)
    name, tensor = next((k, v) for k, v in raw["ema"].items() if v.is_floating_point())
    assert torch.equal(model.state_dict()[name], tensor)
    assert not torch.equal(model.state_dict()[name], raw["model"][name])
    assert not model.training
    assert meta["weights"] == "ema" and meta["size"] == (160, 90) and meta["categories"] == categories
    assert meta["model_name"] == "rtdetr_cpu" and meta["num_classes"] == len(categories) and meta["epoch"] == 3
    _, meta_from_file = load_model(checkpoint / "checkpoint.pt")  # the file
    assert meta_from_file["file"] == meta["file"]


def test_load_model_without_ema_uses_model_weights_also_from_ddp(categories, tmp_path):
    directory = save_checkpoint(tmp_path / "plain", categories, ema=False, ddp_prefix=True)
    model, meta = load_model(directory)
    raw = torch.load(directory / "checkpoint.pt", weights_only=False)
    name = next(k for k in model.state_dict() if model.state_dict()[k].is_floating_point())
    assert meta["weights"] == "model"
    assert torch.equal(model.state_dict()[name], raw["model"][f"module.{name}"])


def test_load_model_errors_name_the_file(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere: no checkpoint found"):
        load_model(tmp_path / "nowhere")
    text = tmp_path / "notes.pt"
    text.write_text("hello")
    with pytest.raises(CheckpointError, match="notes.pt: cannot read it as a torch file"):
        load_model(text)
    other = tmp_path / "other.pt"
    torch.save({"state_dict": {}}, other)
    with pytest.raises(CheckpointError, match="other.pt: not a neoray checkpoint"):
        load_model(other)
    partial = tmp_path / "partial.pt"
    torch.save({"format": "neoray-checkpoint", "version": 1, "model": {}}, partial)
    with pytest.raises(CheckpointError, match="partial.pt: neoray checkpoint is missing model_name"):
        load_model(partial)
    broken = tmp_path / "broken"
    torch.save({"format": "neoray-checkpoint", "version": 1, "model": {"nope": torch.zeros(1)},
                "model_name": "rtdetr_cpu", "num_classes": 2, "categories": [], "config": {}},
               save_dir(broken) / "checkpoint.pt")
    with pytest.raises(CheckpointError, match=r"checkpoint.pt: model weights do not fit 'rtdetr_cpu' \(\d+ missing"):
        load_model(broken)


def save_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ----------------------------------------------------------------------------------------------------
# neoray eval
# ----------------------------------------------------------------------------------------------------


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.mark.slow
def test_eval_cli_writes_metrics_and_detections(ray_session, checkpoint, synthetic_shards, categories, tmp_path,
                                               capfd):
    from pycocotools.coco import COCO

    from neoray.data.shards import read_manifest

    source = synthetic_shards["root"] / "annotations" / "instances_val.json"
    out = tmp_path / "metrics.json"
    capfd.readouterr()
    code, stdout, stderr = run_cli(["eval", str(checkpoint), "--data", str(synthetic_shards["val"]),
                                    "--batch-size", "3", "--out", str(out)])
    assert code == 0, stderr
    logged = "".join(capfd.readouterr()) + stdout + stderr
    assert "streaming_executor" not in logged and "Execution plan" not in logged  # no Ray Data INFO lines
    metrics = json.loads(out.read_text())
    for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar1", "mar10", "mar100",
                "precision", "recall", "f1"):
        assert isinstance(metrics[key], float), key
    assert metrics["num_images"] == read_manifest(synthetic_shards["val"])["num_images"]
    assert metrics["duplicate_images"] == 0
    assert set(metrics["per_class_ap"]) == {c["name"] for c in categories}
    for name in metrics["per_class_ap"]:
        assert name in stdout
    assert "map50" in stdout and str(out) in stdout
    detections = out.with_name("metrics.detections.json")
    results = json.loads(detections.read_text())
    assert len(results) == metrics["num_detections"] > 0  # untrained, but max_detections per image
    with contextlib.redirect_stdout(io.StringIO()):
        loaded = COCO(str(source)).loadRes(str(detections))
    assert len(loaded.getAnnIds()) == len(results)

    # The source annotation file as ground truth gives the same numbers as the GT stored in the shards.
    out_gt = tmp_path / "metrics_gt.json"
    code, _, stderr = run_cli(["eval", str(checkpoint), "--data", str(synthetic_shards["val"]), "--gt-json",
                               str(source), "--out", str(out_gt)])
    assert code == 0, stderr
    with_file = json.loads(out_gt.read_text())
    for key in ("map", "map50", "mar100", "precision", "recall"):
        assert with_file[key] == pytest.approx(metrics[key], abs=1e-6), key


@pytest.mark.slow
def test_eval_cli_default_output_next_to_checkpoint_and_errors(ray_session, categories, synthetic_shards, tmp_path):
    # Trained at 320x180, evaluated on 160x90 shards: the stream resizes to the training size.
    directory = save_checkpoint(tmp_path / "ckpt", categories, ema=False, size="320x180")
    code, _, stderr = run_cli(["eval", str(directory), "--data", str(synthetic_shards["val"])])
    assert code == 0, stderr
    assert (directory / "eval_metrics.json").is_file() and (directory / "eval_metrics.detections.json").is_file()
    record = json.loads((directory / "eval_metrics.json").read_text())
    assert record["eval_size"] == "320x180" and record["weights"] == "model"
    detections = json.loads((directory / "eval_metrics.detections.json").read_text())
    # (The letterbox mapping back to source pixels is checked by the AP = 1 tests on letterboxed sources.)
    val_ids = {img["id"] for img in
               json.loads((synthetic_shards["root"] / "annotations" / "instances_val.json").read_text())["images"]}
    assert detections and {d["image_id"] for d in detections} <= val_ids
    code, _, stderr = run_cli(["eval", str(tmp_path / "missing"), "--data", str(synthetic_shards["val"])])
    assert code == 1 and "missing: no checkpoint found" in one_line(stderr)
    code, _, stderr = run_cli(["eval", str(directory), "--data", str(tmp_path)])
    assert code == 1 and "manifest not found" in stderr


@pytest.mark.slow
def test_stream_targets_fed_back_score_ap_one_on_letterboxed_shards(ray_session, tmp_path):
    """Real shards of 16:9, 4:3 and portrait sources: GT from the stream, fed back, is perfect on the source file."""
    from neoray.data.prepare import prepare_coco
    from neoray.data.shards import read_manifest
    from neoray.data.stream import ShardSet, iter_eval_batches
    from neoray.data.synth import write_synthetic_dataset
    from neoray.evaluation.coco_eval import CocoEvaluator

    data = write_synthetic_dataset(tmp_path / "src", train=0, val=10, size=(192, 108), classes=3, seed=1,
                                   aspect_mix=True)
    prepare_coco(data["val_annotations"], data["val_images"], tmp_path / "shards", size=(160, 90), workers=1)
    manifest = read_manifest(tmp_path / "shards")
    from_file = CocoEvaluator(manifest["categories"], gt_json=data["val_annotations"])
    from_stream = CocoEvaluator(manifest["categories"])
    letterboxed = 0
    for batch in iter_eval_batches(ShardSet.open(str(tmp_path / "shards")), 4):
        letterboxed += int((batch.pad.abs().sum(1) > 0).sum())
        outputs = [{"boxes": t["boxes"][~t["iscrowd"]], "scores": torch.ones(int((~t["iscrowd"]).sum())),
                    "labels": t["labels"][~t["iscrowd"]]} for t in batch.targets]
        from_file.update(batch, outputs)
        from_stream.update(batch, outputs)
    assert letterboxed >= 2  # 4:3 and portrait sources were padded
    a, b = from_file.summarize(), from_stream.summarize()
    assert a["num_images"] == b["num_images"] == 10
    assert a["map"] == pytest.approx(1.0) and b["map"] == pytest.approx(1.0)
    assert a["map75"] == b["map75"] == pytest.approx(1.0)
    for key in ("map", "map50", "map75", "map_small", "map_medium", "map_large", "mar10", "mar100"):
        assert a[key] == pytest.approx(b[key], abs=1e-9), key


# ----------------------------------------------------------------------------------------------------
# neoray predict
# ----------------------------------------------------------------------------------------------------


def test_draw_detections_draws_boxes_with_the_class_colour():
    from neoray.evaluation.visualize import PALETTE, draw_detections

    image = np.full((120, 200, 3), 50, np.uint8)
    drawn = draw_detections(image, [[40, 60, 160, 110]], [1], [0.9], ["a", "b"])
    assert np.array_equal(image, np.full((120, 200, 3), 50, np.uint8))  # input untouched
    assert tuple(int(v) for v in drawn[85, 40]) == PALETTE[1]  # left edge, away from the label
    assert np.array_equal(drawn[85, 100], image[85, 100])  # interior untouched


def test_predict_cli_draws_pngs_and_reports_unreadable(checkpoint, synthetic_dataset, tmp_path):
    from neoray.commands.predict import predict_image
    from neoray.evaluation.visualize import draw_detections

    wide = sorted((synthetic_dataset / "val").glob("*.jpg"))[0]
    portrait = tmp_path / "portrait.png"
    rng = np.random.default_rng(0)
    cv2.imwrite(str(portrait), rng.integers(0, 255, (200, 120, 3), dtype=np.uint8))
    broken = tmp_path / "broken.jpg"
    broken.write_bytes(b"not an image")
    out_dir = tmp_path / "drawn"
    code, stdout, stderr = run_cli(["predict", str(checkpoint), str(wide), str(broken), str(portrait),
                                    "--out", str(out_dir), "--score-threshold", "0"])
    assert code == 1  # one unreadable image
    assert "broken.jpg: cannot read image" in stderr
    assert "2 image(s)" in stdout and "1 unreadable" in stdout
    assert sorted(p.name for p in out_dir.iterdir()) == [f"{wide.stem}.png", "portrait.png"]
    model, meta = load_model(checkpoint)
    for source in (wide, portrait):
        assert f"{source}: 100 detections" in stdout  # untrained rtdetr_cpu keeps max_detections at threshold 0
        original = cv2.imread(str(source))
        drawn = cv2.imread(str(out_dir / f"{source.stem}.png"))
        assert drawn.shape == original.shape
        assert np.any(drawn != original)
        # Exactly the model's boxes, mapped back to the original image, are drawn (PNG is lossless).
        boxes, scores, labels = predict_image(model, original, meta["size"], "cpu", 0.0)
        names = [c["name"] for c in sorted(meta["categories"], key=lambda c: c["label"])]
        assert np.array_equal(drawn, draw_detections(original, boxes, labels, scores, names))
        assert (boxes[:, [0, 2]] <= original.shape[1]).all() and (boxes[:, [1, 3]] <= original.shape[0]).all()


def test_predict_image_maps_boxes_back_through_the_letterbox():
    from neoray.commands.predict import predict_image
    from neoray.data.geometry import letterbox_params

    scale, pad_x, pad_y = letterbox_params(300, 400, 160, 90)  # portrait: padded left and right
    seen = []

    def fake_model(images):
        seen.append((images.dtype, tuple(images.shape)))
        box = [pad_x + 10 * scale, 20 * scale, pad_x + 110 * scale, 220 * scale]
        return [{"boxes": torch.tensor([box, [0.0, 0.0, 5.0, 5.0]]), "scores": torch.tensor([0.8, 0.1]),
                 "labels": torch.tensor([2, 0])}]

    boxes, scores, labels = predict_image(fake_model, np.zeros((400, 300, 3), np.uint8), (160, 90), "cpu", 0.3)
    assert seen == [(torch.uint8, (1, 3, 90, 160))]
    np.testing.assert_allclose(boxes, [[10, 20, 110, 220]], atol=1e-4)
    assert scores.tolist() == pytest.approx([0.8]) and labels.tolist() == [2]
