"""Search on a prefix of the schedule, then continue the best trial (neoray.tune.continue_best): which checkpoint
a trial's reports lead to on either trial path, the final run's config, and the whole thing end to end."""

import csv
import json
from pathlib import Path

import pytest
import yaml
from test_tracking import _mlflow, _steps, _wandb_runs

from neoray.config import ConfigError, from_dict, load_config
from neoray.tune.asha import AshaSettings
from neoray.tune.continue_best import ContinuationError, final_config, trial_checkpoint
from neoray.tune.record import SearchSettings, SweepRecord
from neoray.tune.sweep import SweepOptions, run_sweep


def _history(sweep_dir: Path, trial: str, rows: list[dict]) -> None:
    (sweep_dir / trial).mkdir(parents=True, exist_ok=True)
    (sweep_dir / trial / "result.json").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _checkpoint(folder: Path) -> Path:
    folder.mkdir(parents=True)
    (folder / "checkpoint.pt").write_bytes(b"x")
    return folder


def test_a_one_worker_trials_checkpoint_is_tunes_folder_of_its_last_report(tmp_path):
    _checkpoint(tmp_path / "trial_0001" / "checkpoint_000001")
    _history(tmp_path, "trial_0001", [{"epoch": 1, "checkpoint_dir_name": "checkpoint_000000"},
                                      {"epoch": 2, "checkpoint_dir_name": "checkpoint_000001"}])
    assert trial_checkpoint(str(tmp_path), "trial_0001") == str(tmp_path / "trial_0001" / "checkpoint_000001")


def test_a_multi_worker_trials_checkpoint_is_found_under_the_sweeps_own_trials_folder(tmp_path):
    """Its reports carry the TorchTrainer's checkpoint path in that filesystem's own form (on S3 "bucket/...",
    no scheme): the part from trials/TRIAL on is joined to the sweep directory as the user named it."""
    found = _checkpoint(tmp_path / "trials" / "trial_0002" / "checkpoint_2026-12-07_05-00-00.000000")
    _history(tmp_path, "trial_0002", [
        {"epoch": 1, "checkpoint_path": "bucket/sweeps/s/trials/trial_0002/checkpoint_2026-12-07_04-59-00.000000"},
        {"epoch": 2, "checkpoint_path": f"bucket/sweeps/s/trials/trial_0002/{found.name}"}])
    assert trial_checkpoint(str(tmp_path), "trial_0002") == str(found)


def test_a_trial_without_a_checkpoint_to_continue_is_one_line(tmp_path):
    _history(tmp_path, "trial_0001", [{"epoch": 1, "checkpoint_dir_name": "checkpoint_000000"}])
    with pytest.raises(ContinuationError, match="the checkpoint of trial_0001's last epoch is gone"):
        trial_checkpoint(str(tmp_path), "trial_0001")
    _history(tmp_path, "trial_0003", [{"epoch": 1}])
    with pytest.raises(ContinuationError, match="trial_0003 reported no checkpoint to continue from"):
        trial_checkpoint(str(tmp_path), "trial_0003")
    assert issubclass(ContinuationError, ConfigError)  # the sweep command prints it in one line


def test_the_final_run_is_the_trials_config_on_the_whole_schedule_with_the_sweeps_cores(monkeypatch):
    from neoray.tune import continue_best

    base = from_dict({"train": {"epochs": 28, "lr": 2e-3, "cpus_per_worker": 0.5, "stop_after_epoch": 4}})
    record = SweepRecord(name="s", asha=AshaSettings(enabled=False), params={"lr": {}, "batch": {}}, num_samples=4,
                         base_config=base, search=SearchSettings(trial_epochs=4))
    monkeypatch.setattr(continue_best, "alive_nodes", lambda: [{"CPU": 2.0}])
    cfg = final_config(record, {"lr": 5e-3, "batch": "4x2"})
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.accumulate) == (5e-3, 4, 2)
    assert (cfg.train.epochs, cfg.train.stop_after_epoch, cfg.name) == (28, 0, "final")
    # one CPU reserved (the other is Ray Data's), torch on both cores: how a one-run neoray train uses the machine
    assert (cfg.train.cpus_per_worker, cfg.train.torch_threads) == (1, 2)
    monkeypatch.setattr(continue_best, "alive_nodes", lambda: [{"CPU": 16.0}, {"CPU": 16.0}])
    cfg = final_config(record, {"lr": 5e-3, "batch": "4x1"})
    assert (cfg.train.cpus_per_worker, cfg.train.torch_threads) == (16, 0)  # a node's worth; Ray's threads
    gpu = SweepRecord(name="s", asha=AshaSettings(enabled=False), params={"lr": {}}, num_samples=4,
                      base_config=base.with_overrides({"train.use_gpu": True}), search=SearchSettings(trial_epochs=4))
    cfg = final_config(gpu, {"lr": 5e-3})
    assert (cfg.train.cpus_per_worker, cfg.train.torch_threads) == (0.5, 0)  # a GPU trial keeps its resources


def _metrics(run_dir: Path) -> list[dict]:
    with open(run_dir / "metrics.csv", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.mark.slow
def test_a_sweep_on_a_prefix_continues_its_best_trial_to_the_end_and_resumes_that(ray_session, synthetic_shards,
                                                                                  tmp_path, capfd, monkeypatch):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu"},
        "data": {"train": str(synthetic_shards["train"]), "val": str(synthetic_shards["val"]), "size": "160x90",
                 "shuffle_buffer": 16},
        "train": {"epochs": 3, "batch_size": 4, "lr": 1e-3, "ema": False, "eval_every": 2, "cpus_per_worker": 0.5},
    }))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
                                     "asha": False, "search": {"seed": 0, "num_samples": 2, "trial_epochs": 1}}))
    tracking_uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    result = run_sweep(SweepOptions(config=str(config), space=str(space), output=str(tmp_path / "sweeps"), name="p",
                                    track=[f"mlflow:{tracking_uri}", "wandb:neoray-test"]))
    sweep_dir = Path(result.sweep_dir)
    with open(sweep_dir / "trials.csv", newline="") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    # every trial trained epoch 1 of the 3-epoch schedule, evaluated there, and ended as finished
    assert {r["status"] for r in rows.values()} == {"finished"} and {r["epochs"] for r in rows.values()} == {"1"}
    assert all(r["best_map"] != "" for r in rows.values())
    best = result.best["trial"]
    trial_history = [json.loads(line) for line in (sweep_dir / best / "result.json").read_text().splitlines()]

    final = sweep_dir / "final"
    assert result.final["stop_reason"] == "completed"
    continued = _metrics(final)
    assert [int(r["epoch"]) for r in continued] == [2, 3]  # from the trial's checkpoint on, not from scratch
    steps_per_epoch = trial_history[-1]["step"]
    assert [int(r["step"]) for r in continued] == [2 * steps_per_epoch, 3 * steps_per_epoch]
    run_cfg = load_config(final / "config.yaml")
    assert run_cfg.train.lr == pytest.approx(float(rows[best]["lr"]))
    assert (run_cfg.train.epochs, run_cfg.train.stop_after_epoch) == (3, 0)
    assert json.loads((final / "checkpoints.json").read_text())["latest"]["epoch"] == 3
    best_config = load_config(result.best_config_path)  # ready for a full run: no stop in it
    assert (best_config.train.epochs, best_config.train.stop_after_epoch) == (3, 0)
    from neoray.tune.report import write_report

    report = Path(write_report(result.sweep_dir)).read_text()
    assert f"trials train epochs 1-1 of the 3-epoch schedule; the best continues to its end in `{final}`" in report
    out = capfd.readouterr().out
    assert f"resumed from {sweep_dir / best}/checkpoint_" in out and ": 1 epochs and" in out
    assert f"[neoray] final model: {best} continued to epoch 3, completed; best mAP" in out
    assert (sweep_dir / "trials.md").read_text().rstrip().endswith(f"run directory {final}**")
    # --track: the final run is a run of the sweep's MLflow experiment, nested under the sweep's run beside
    # the trials, with the epochs it trained and its summary
    client = _mlflow(tracking_uri)
    parent = json.loads((sweep_dir / "sweep.json").read_text())["tracking"]["mlflow"]["parent_run_id"]
    experiment = client.get_run(parent).info.experiment_id
    children = {r.info.run_name: r for r in
                client.search_runs([experiment], f"tags.`mlflow.parentRunId` = '{parent}'")}
    assert set(children) == {"trial_0001", "trial_0002", "final"}
    final_run = children["final"]
    assert final_run.info.status == "FINISHED" and _steps(client, final_run.info.run_id, "loss") == [2, 3]
    assert float(final_run.data.params["train.lr"]) == pytest.approx(float(rows[best]["lr"]))
    assert final_run.data.tags["neoray.stop_reason"] == "completed"
    assert "summary/best_metrics/map" in final_run.data.metrics
    wandb_final = _wandb_runs(tmp_path / "wandb")["final"]  # and a W&B run in the sweep's group
    assert (wandb_final["group"], wandb_final["job_type"]) == ("p", "train")
    assert [row["epoch"] for row in wandb_final["history"] if "loss" in row] == [2, 3]
    assert wandb_final["summary"]["stop_reason"] == "completed"

    # A sweep stopped during the continuation, before the final run wrote a checkpoint: --resume continues the
    # best trial again, from its own checkpoint, in the same run directory.
    for entry in final.iterdir():
        if entry.name != "config.yaml":
            entry.unlink() if entry.is_file() else __import__("shutil").rmtree(entry)
    again = run_sweep(SweepOptions(config=str(config), space=str(space), output=str(tmp_path / "sweeps"), name="p",
                                   resume=True))
    assert again.final["stop_reason"] == "completed" and again.best["trial"] == best
    assert [int(r["epoch"]) for r in _metrics(final)] == [2, 3]
    assert f"continuing the final run {final} from {best} again" in capfd.readouterr().out
