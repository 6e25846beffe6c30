"""Fine-tuning from a COCO-pretrained RT-DETR end to end: a test-made checkpoint in the reference
repository's format (there are no real weights here), `neoray train` with `model.init_from` on synthetic
data whose classes partly carry COCO names, then `neoray eval` of the run and `neoray predict` straight
from the reference file."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from neoray.cli import main as neoray_main

SMALL = {"hidden_dim": 32, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64, "num_decoder_layers": 2,
         "num_queries": 10, "num_denoising": 10}
OUR_CLASSES = ["car", "person", "blob", "widget"]  # two COCO names, two new classes


@pytest.fixture(scope="module")
def named_shards(tmp_path_factory):
    from neoray.data.prepare import prepare_coco
    from neoray.data.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("finetune")
    data = write_synthetic_dataset(root / "src", train=16, val=8, size=(160, 90), classes=4, seed=2)
    shards = {}
    for split in ("train", "val"):
        ann = data[f"{split}_annotations"]
        coco = json.loads(ann.read_text())
        for category, name in zip(sorted(coco["categories"], key=lambda c: c["id"]), OUR_CLASSES):
            category["name"] = name
        ann.write_text(json.dumps(coco))
        shards[split] = prepare_coco(ann, data[f"{split}_images"], root / "shards" / split, size=(160, 90),
                                     workers=1).out_dir
    return shards


@pytest.fixture(scope="module")
def coco_checkpoint(tmp_path_factory):
    """An "official" COCO RT-DETR-R18vd checkpoint as the reference repository saves it (EMA weights)."""
    from neoray.models import build_model
    from neoray.models.pretrained.keymaps import reference_key_map

    torch.manual_seed(0)
    coco = build_model("rtdetr_r18vd", 80, **SMALL, input_normalization="unit", position_order="yx")
    path = tmp_path_factory.mktemp("weights") / "rtdetr_r18vd_coco.pth"
    names = reference_key_map(coco)
    torch.save({"ema": {"module": {names[k]: v for k, v in coco.state_dict().items()}}}, path)
    return path


@pytest.mark.slow
def test_fine_tune_from_a_reference_coco_checkpoint(ray_session, named_shards, coco_checkpoint, tmp_path, capfd):
    config = tmp_path / "finetune.yaml"
    config.write_text(yaml.safe_dump({
        "name": "ft", "output": str(tmp_path / "runs"),
        "model": {"name": "rtdetr_r18vd", "options": SMALL, "init_from": str(coco_checkpoint)},
        "data": {"train": named_shards["train"], "val": named_shards["val"], "size": "160x90", "shuffle_buffer": 8},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-4, "warmup_steps": 2, "ema_warmup_steps": 4},
    }))
    assert neoray_main(["train", str(config)]) == 0
    out = capfd.readouterr().out
    assert (
        "init_from: classes that kept pretrained rows: car, person (2 of 4); starting from scratch: blob, widget" in out
    )

    run_dir = tmp_path / "runs" / "ft"
    recorded = yaml.safe_load((run_dir / "config.yaml").read_text())["model"]
    # The conventions came with the reference format and are part of the run's record.
    assert recorded["options"]["input_normalization"] == "unit" and recorded["options"]["position_order"] == "yx"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["pretrained_class_rows"] == ["car", "person"] and summary["stop_reason"] == "completed"
    assert "classes that kept pretrained rows: car, person" in (run_dir / "summary.md").read_text()

    # The fine-tuned run evaluates from its directory, rebuilt with the recorded conventions.
    assert neoray_main(["eval", str(run_dir), "--data", named_shards["val"], "--out", str(tmp_path / "m.json")]) == 0
    assert json.loads((tmp_path / "m.json").read_text())["num_images"] == 8
    # The reference file itself predicts directly (its 80 COCO classes, its own conventions).
    from neoray.data.synth import write_synthetic_dataset

    picture = write_synthetic_dataset(tmp_path / "pic", train=1, val=0, size=(160, 90), classes=2, seed=5)
    image = sorted(picture["train_images"].glob("*.jpg"))[0]
    assert neoray_main(["predict", str(coco_checkpoint), str(image), "--out", str(tmp_path / "drawn"),
                        "--size", "160x90"]) == 0
    assert (tmp_path / "drawn" / f"{image.stem}.png").is_file()
