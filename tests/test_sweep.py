"""End-to-end sweeps on tiny synthetic data: ASHA stops a bad trial, failures are retried or reported,
the best config loads back, the TorchTrainer path releases its workers for the next trial."""

import csv
import json

import pytest
import yaml

from neoray.config import load_config
from neoray.tune.sweep import SweepOptions, run_sweep

SPACE = {
    "params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
    # Rung at epoch 1, where no evaluation ran (eval_every=2): trials compare -loss there, and lr=3
    # (points_to_evaluate) has a loss orders of magnitude above the baseline's, so ASHA stops it.
    "asha": {"time_attr": "epoch", "grace_period": 1, "reduction_factor": 2},
    "search": {"seed": 0, "num_samples": 3},
    "points_to_evaluate": [{"lr": 3.0}],
}


def _files(tmp_path, shards, epochs=3):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu"},
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "size": "160x90", "shuffle_buffer": 16},
        "train": {"epochs": epochs, "batch_size": 4, "lr": 1e-3, "ema": False, "eval_every": 2},
    }))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump(SPACE))
    return str(config), str(space)


def _rows(sweep_dir):
    with open(sweep_dir / "trials.csv", newline="") as handle:
        return {row["trial"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_sweep_asha_retry_errors_best_config_and_report(ray_session, synthetic_shards, tmp_path):
    config, space = _files(tmp_path, synthetic_shards)
    result = run_sweep(SweepOptions(
        config=config, space=space, output=str(tmp_path / "sweeps"), name="s", max_concurrent=1, max_failures=1,
        # trial_0001 fails once and is retried; trial_0003 always fails and ends errored.
        fail=[{"trial": "trial_0001", "times": 1}, {"trial": "trial_0003", "times": -1}],
    ))
    rows = _rows(result.sweep_dir)
    assert set(rows) == {"trial_0001", "trial_0002", "trial_0003"}
    assert rows["trial_0001"]["status"] == "finished" and rows["trial_0001"]["failures"] == "1"
    assert rows["trial_0001"]["epochs"] == "3" and float(rows["trial_0001"]["lr"]) == pytest.approx(1e-3)
    assert rows["trial_0002"]["status"] == "stopped early (ASHA)" and rows["trial_0002"]["epochs"] == "1"
    assert float(rows["trial_0002"]["lr"]) == 3.0
    assert rows["trial_0003"]["status"] == "errored" and "injected failure" in rows["trial_0003"]["error"]
    stopped = json.loads((result.sweep_dir / "asha_stopped.json").read_text())  # ASHA's own decision
    assert list(stopped) == ["trial_0002"]
    assert "stopped early (ASHA)" in (result.sweep_dir / "trials.md").read_text()

    assert result.best["trial"] == "trial_0001"
    best = load_config(result.best_config_path)
    assert best.train.lr == pytest.approx(1e-3) and best.data.train == str(synthetic_shards["train"])
    # Per-epoch history and TensorBoard events stay on disk for `neoray report` / tensorboard.
    assert len((result.sweep_dir / "trial_0001" / "result.json").read_text().splitlines()) == 3
    assert list((result.sweep_dir / "trial_0001").glob("events.out.tfevents.*"))

    from neoray.tune.report import write_report

    report = write_report(result.sweep_dir)
    text = report.read_text()
    assert "learning_curves.png" in text and "map_vs_lr.png" in text
    assert (result.sweep_dir / "learning_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_two_worker_trials_release_their_workers(ray_session, synthetic_shards, tmp_path):
    """TorchTrainer path: the trial after a finished/stopped one still gets its workers (no hang), and no
    Train placement group is left behind."""
    import ray

    config, space = _files(tmp_path, synthetic_shards, epochs=2)
    result = run_sweep(SweepOptions(
        config=config, space=space, output=str(tmp_path / "sweeps"), name="w2", num_samples=2,
        workers_per_trial=2, max_concurrent=1, overrides=["train.cpus_per_worker=1"],
    ))
    rows = _rows(result.sweep_dir)
    assert {r["status"] for r in rows.values()} <= {"finished", "stopped early (ASHA)"} and len(rows) == 2
    assert all(int(r["epochs"]) >= 1 for r in rows.values())
    assert (result.sweep_dir / "trials" / "trial_0002").is_dir()  # the TorchTrainer run named after the trial
    alive = [pg for pg in ray.util.placement_group_table().values()
             if pg["state"] != "REMOVED" and len(pg["bundles"]) == 2]
    assert alive == []
