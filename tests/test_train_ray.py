"""End to end on Ray Train: two gloo workers, a worker failure recovered, the run directory, --resume,
and the `neoray train` command's config errors. One tiny rtdetr_cpu on the 160x90 synthetic shards."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from cli_output import one_line
from fault_hooks import Faults

from neoray.checkpoints import load_checkpoint, read_pointers
from neoray.cli import main as neoray_main
from neoray.config import from_dict
from neoray.engine.optim import lr_at

TINY_MODEL = {"hidden_dim": 32, "num_queries": 20, "num_denoising": 10}


def tiny_run_config(shards, output, **train) -> dict:
    base = {"epochs": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 3, "workers": 2, "ema_warmup_steps": 5,
            "max_failures": 1, "seed": 1, "cpus_per_worker": 1}
    base.update(train)
    return {"name": "two_workers", "output": str(output),
            "model": {"name": "rtdetr_cpu", "options": TINY_MODEL},
            "data": {"train": str(shards["train"]), "val": str(shards["val"]), "size": "160x90",
                     "shuffle_buffer": 0, "color_jitter": 0.0},
            "train": base}


@pytest.fixture(scope="module")
def recovered_run(ray_session, synthetic_shards, tmp_path_factory):
    """3 epochs on 2 workers; rank 1 raises once at the start of epoch 2 and Ray Train recovers it."""
    from neoray.run.setup import prepare_config
    from neoray.run.trainer import train

    root = tmp_path_factory.mktemp("train_ray")
    records = root / "records"
    records.mkdir()
    cfg = from_dict(tiny_run_config(synthetic_shards, root / "runs"))
    fault = Faults(raise_in_epoch=2, raise_rank=1, raise_marker=str(root / "raised.marker"), record_dir=str(records))
    summary = train(prepare_config(cfg), hooks=fault, verbose=False)
    return {"cfg": cfg, "summary": summary, "run_dir": Path(summary["run_dir"]), "records": records,
            "marker": root / "raised.marker"}


def _records(records: Path) -> list[dict]:
    return [json.loads(line) for path in sorted(records.glob("rank*.jsonl")) for line in path.read_text().splitlines()]


@pytest.mark.slow
def test_two_workers_recover_from_a_failure_and_write_the_run(recovered_run):
    run_dir, cfg = recovered_run["run_dir"], recovered_run["cfg"]
    assert recovered_run["marker"].exists(), "the injected failure did not happen"
    history = json.loads((run_dir / "metrics.json").read_text())
    # Every epoch reported exactly once: the failure in epoch 2 did not redo epoch 1.
    assert [row["epoch"] for row in history] == [1, 2, 3]
    trained = _records(recovered_run["records"])
    assert sorted((r["epoch"], r["rank"]) for r in trained) == [(e, r) for e in (1, 2, 3) for r in (0, 1)]
    # The workers saw different images (24 train images: 6 batches of 2 per worker per epoch).
    for epoch in (1, 2, 3):
        ids = {r["rank"]: set(r["image_ids"]) for r in trained if r["epoch"] == epoch}
        assert len(ids[0]) == len(ids[1]) == 12 and not ids[0] & ids[1]
    # The step counter and the LR schedule continued across the restart.
    steps_per_epoch = 6
    assert [row["step"] for row in history] == [6, 12, 18]
    total = cfg.train.epochs * steps_per_epoch
    for row in history:
        assert row["lr"] == pytest.approx(lr_at(cfg.train, total, row["step"]), rel=1e-6)
    # It learned: the loss falls and the metrics of docs/ARCHITECTURE.md are there.
    assert history[-1]["loss"] < history[0]["loss"]
    for key in ("images_per_s", "step_time_s", "peak_mem_mb", "skipped_steps", "oom_skipped", "map", "map50"):
        assert key in history[-1], key
    header = (run_dir / "metrics.csv").read_text().splitlines()[0].split(",")
    assert {"epoch", "loss", "map"} <= set(header)
    # Run directory: resolved config, checkpoints, summary.
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["train"]["workers"] == 2
    latest = load_checkpoint(run_dir / "checkpoints" / "latest")  # the name checkpoints.json records
    assert latest["epoch"] == 3 and latest["step"] == 18 and latest["ema"] is not None
    assert latest["model_name"] == "rtdetr_cpu" and latest["num_classes"] == 4
    pointers = read_pointers(str(run_dir))
    assert (run_dir / pointers["best"]["path"] / "checkpoint.pt").exists()
    assert pointers["best"]["epoch"] == max(history, key=lambda r: (r["score"], r["epoch"]))["epoch"]
    assert load_checkpoint(run_dir)["epoch"] == pointers["best"]["epoch"]  # a run directory means its best
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["epochs_run"] == 3 and summary["stop_reason"] == "completed"
    assert summary["hardware"]["workers"] == 2 and summary["best_epoch"] in (1, 2, 3)
    assert "Training report" in (run_dir / "summary.md").read_text()


@pytest.mark.slow
def test_resume_continues_a_finished_run_with_more_epochs(recovered_run, tmp_path):
    run_dir = recovered_run["run_dir"]
    raw = tiny_run_config({"train": recovered_run["cfg"].data.train, "val": recovered_run["cfg"].data.val},
                          run_dir.parent, epochs=4)
    config_file = tmp_path / "two_workers.yaml"
    config_file.write_text(yaml.safe_dump(raw))
    assert neoray_main(["train", str(config_file), "--resume", str(run_dir)]) == 0
    history = json.loads((run_dir / "metrics.json").read_text())
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]
    assert history[-1]["step"] == 24
    assert load_checkpoint(run_dir / "checkpoints" / "latest")["epoch"] == 4


def test_train_command_rejects_a_misspelled_key_with_a_suggestion(tmp_path, capsys):
    config_file = tmp_path / "bad.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"lr_warmup_steps": 10}}))
    assert neoray_main(["train", str(config_file)]) == 1
    err = capsys.readouterr().err.strip()
    one_line(err)
    assert "lr_warmup_steps" in err and "warmup_steps" in err.split("did you mean")[1]


def test_train_command_rejects_a_bad_override(tmp_path, capsys):
    config_file = tmp_path / "ok.yaml"
    config_file.write_text(yaml.safe_dump({"train": {"epochs": 1}}))
    assert neoray_main(["train", str(config_file), "train.epochs=zero"]) == 1
    assert "train.epochs" in capsys.readouterr().err
