"""The whole path on object storage (moto's S3 server on 127.0.0.1, see conftest.py): prepare -> check ->
a 2-worker train -> resume -> a 2-trial sweep -> report -> eval, every path an s3:// URI."""

from __future__ import annotations

import json

import pytest
import yaml

from neoray import storage
from neoray.cli import main as neoray_main

TINY_MODEL = {"hidden_dim": 32, "num_queries": 20, "num_denoising": 10}


@pytest.mark.slow
def test_prepare_train_resume_sweep_report_and_eval_on_s3(ray_session, synthetic_dataset, s3_bucket, tmp_path):
    shards = f"{s3_bucket}/data/shards"
    for split in ("train", "val"):
        assert neoray_main(["prepare", "--coco", str(synthetic_dataset / "annotations" / f"instances_{split}.json"),
                            "--images", str(synthetic_dataset / split), "--out", f"{shards}/{split}",
                            "--size", "160x90", "--workers", "1"]) == 0
        assert neoray_main(["check", f"{shards}/{split}"]) == 0

    config = f"{s3_bucket}/configs/tiny.yaml"  # the config itself may live there too
    storage.write_text(config, yaml.safe_dump({
        "name": "tiny", "model": {"name": "rtdetr_cpu", "options": TINY_MODEL},
        "data": {"train": f"{shards}/train", "val": f"{shards}/val", "size": "160x90", "shuffle_buffer": 8},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "workers": 2, "cpus_per_worker": 1,
                  "ema_warmup_steps": 4, "seed": 1},
    }))
    runs = f"{s3_bucket}/runs"
    assert neoray_main(["train", config, "--output", runs]) == 0
    run_dir = f"{runs}/tiny"
    history = storage.read_json(f"{run_dir}/metrics.json")
    assert [row["epoch"] for row in history] == [1, 2] and "per_class_ap" in history[-1]
    pointers = storage.read_json(f"{run_dir}/checkpoints.json")
    assert pointers["latest"]["epoch"] == 2 and pointers["latest"]["path"].startswith("ray/")
    assert storage.is_file(f"{run_dir}/{pointers['best']['path']}/checkpoint.pt")
    assert storage.read_json(f"{run_dir}/summary.json")["stop_reason"] == "completed"
    assert storage.glob(f"{run_dir}/tensorboard", "events.out.tfevents.*")

    # --resume from the URI, two more epochs: nothing redone.
    assert neoray_main(["train", config, "train.epochs=3", "--resume", run_dir]) == 0
    assert [row["epoch"] for row in storage.read_json(f"{run_dir}/metrics.json")] == [1, 2, 3]

    # neoray eval straight from the run directory on S3 (its best checkpoint); metrics land next to it.
    assert neoray_main(["eval", run_dir, "--data", f"{shards}/val", "--batch-size", "4"]) == 0
    best = storage.read_json(f"{run_dir}/checkpoints.json")["best"]["path"]
    assert storage.read_json(f"{run_dir}/{best}/eval_metrics.json")["num_images"] == 8

    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
                                     "asha": {"grace_period": 2}, "search": {"seed": 0, "num_samples": 2}}))
    sweeps = f"{s3_bucket}/sweeps"
    assert neoray_main(["sweep", "--config", config, "--space", str(space), "--output", sweeps, "--name", "s3",
                        "--workers-per-trial", "1", "--max-concurrent", "1", "train.epochs=2"]) == 0
    sweep_dir = f"{sweeps}/s3"
    assert storage.read_text(f"{sweep_dir}/trials.csv").count("trial_000") == 2
    assert storage.is_file(f"{sweep_dir}/best_config.yaml") and storage.is_file(f"{sweep_dir}/trial_0001/result.json")
    assert neoray_main(["report", sweep_dir]) == 0
    assert "learning_curves.png" in storage.read_text(f"{sweep_dir}/report.md")
    assert storage.info(f"{sweep_dir}/learning_curves.png").size > 1000
    best_config = yaml.safe_load(storage.read_text(f"{sweep_dir}/best_config.yaml"))
    assert best_config["data"]["train"] == f"{shards}/train"
    assert json.loads(json.dumps(best_config))["train"]["workers"] == 1
