"""Experiment trackers (``--track mlflow`` / ``--track wandb``) and the sweep's live Optuna study.

MLflow writes to a local SQLite store read back through MLflow's own client; W&B runs offline (WANDB_MODE,
WANDB_DIR in the driver's environment, which neoray hands to W&B's processes) and is read back from its run
files: wandb 0.31 has no Python reader for them any more, so ``_wandb_runs`` reads the records (LevelDB log
framing) with W&B's own protobuf messages. The Optuna study is loaded with ``optuna.load_study``, during the
sweep (tests/fault_hooks.StudyProbe, from the second trial) and after it.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import yaml
from fault_hooks import StudyProbe
from test_sweep import _files

from neoray import storage
from neoray.cli import main as neoray_main
from neoray.config import ConfigError
from neoray.run import run_tracking
from neoray.tune import study
from neoray.tune.sweep import SweepOptions, run_sweep

# ---------------------------------------------------------------------------------------------------------
# Reading back
# ---------------------------------------------------------------------------------------------------------


def _wandb_records(path: Path) -> list:
    """The records of a ``.wandb`` file: a 7-byte W&B header, then LevelDB log records in 32 KiB blocks
    (7-byte record header: crc32c, length, type FULL=1 / FIRST=2 / MIDDLE=3 / LAST=4)."""
    from wandb.proto import wandb_internal_pb2 as pb

    data, block, pos, payload, records = path.read_bytes(), 32768, 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:  # the block's tail is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:  # zeros: the rest of the block is padding
            pos += left
            continue
        payload += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(payload)
            records.append(record)
            payload = b""
    return records


def _wandb_runs(root: Path) -> dict:
    """{run name: {"group", "job_type", "config", "history" (rows), "summary", "files" (artifact paths)}}
    of every offline run under ``root``."""
    runs = {}
    for path in sorted(root.rglob("offline-run-*/run-*.wandb")):
        run = {"config": {}, "history": [], "summary": {}, "files": []}
        for record in _wandb_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                run.update(name=record.run.display_name, group=record.run.run_group, job_type=record.run.job_type)
                run["config"].update({i.key: json.loads(i.value_json) for i in record.run.config.update})
            elif kind == "config":
                run["config"].update({i.key: json.loads(i.value_json) for i in record.config.update})
            elif kind == "history":
                run["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.history.item})
            elif kind == "summary":
                run["summary"].update({i.key or "/".join(i.nested_key): json.loads(i.value_json)
                                       for i in record.summary.update})
            elif kind == "artifact":
                run["files"] += [entry.path for entry in record.artifact.manifest.contents]
        _merge(runs.setdefault(run["name"], {"config": {}, "history": [], "summary": {}, "files": []}), run)
    return runs


def _merge(into: dict, run: dict) -> None:
    """A resumed W&B run writes a second offline folder with the same id: what ``wandb sync`` merges."""
    into.update({k: run[k] for k in ("name", "group", "job_type") if k in run})
    into["config"].update(run["config"])
    into["history"] += run["history"]
    into["summary"].update(run["summary"])
    into["files"] += run["files"]


def _config_value(value):
    """W&B keeps config values as {"value": ...}."""
    return value.get("value") if isinstance(value, dict) and "value" in value else value


def _mlflow(uri: str):
    import mlflow

    return mlflow.MlflowClient(uri)


def _steps(client, run_id: str, key: str) -> list[int]:
    return [m.step for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


# ---------------------------------------------------------------------------------------------------------
# --track: what is accepted, what is refused
# ---------------------------------------------------------------------------------------------------------


def test_track_values_are_parsed_and_checked(monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    specs = run_tracking.parse_track(["mlflow:sqlite:///runs/mlflow.db", "wandb"])
    assert specs == [run_tracking.TrackSpec("mlflow", "sqlite:///runs/mlflow.db"),
                     run_tracking.TrackSpec("wandb", None)]
    with pytest.raises(ConfigError, match="unknown tracker"):
        run_tracking.parse_track(["neptune"])
    with pytest.raises(ConfigError, match="given twice"):
        run_tracking.parse_track(["mlflow", "mlflow:http://localhost:5000"])
    monkeypatch.setattr(run_tracking, "installed", lambda package: package != "wandb")
    with pytest.raises(ConfigError) as err:
        run_tracking.parse_track(["wandb:proj"])
    assert str(err.value) == '--track wandb needs the wandb package: pip install "neoray[wandb]"'


def test_tracking_uris_and_study_urls_mean_the_same_from_any_directory(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert run_tracking.absolute_uri("sqlite:///mlflow.db") == f"sqlite:///{tmp_path}/mlflow.db"
    assert run_tracking.absolute_uri("mlruns") == str(tmp_path / "mlruns")
    assert run_tracking.absolute_uri("file:./mlruns") == f"file://{tmp_path}/mlruns"
    assert run_tracking.absolute_uri("http://mlflow:5000") == "http://mlflow:5000"
    assert study.redact("postgresql://neo:secret@db:5432/optuna") == "postgresql://neo:***@db:5432/optuna"
    assert study.staging_path("s3://b/sweeps/a") == study.staging_path("s3://b/sweeps/a") != study.staging_path(
        "s3://b/sweeps/b")


@pytest.mark.parametrize("command", ["sweep", "train"])
def test_a_tracker_that_is_not_installed_is_one_line_and_exit_1(command, monkeypatch, capsys):
    monkeypatch.setattr(run_tracking, "installed", lambda package: package != "mlflow")
    args = ["--config", "missing.yaml"] if command == "sweep" else ["missing.yaml"]
    assert neoray_main([command, *args, "--track", "mlflow"]) == 1
    prefix = "neoray sweep: error:" if command == "sweep" else "neoray train:"
    line = '--track mlflow needs the mlflow package: pip install "neoray[mlflow]"'
    assert capsys.readouterr().err == f"{prefix} {line}\n"


def test_the_result_that_ends_a_trial_is_in_the_study_too(tmp_path, recwarn):
    """Tune hands the last result of a trial (its last epoch, or ASHA's stop) to on_trial_complete only."""
    import optuna

    url = f"sqlite:///{tmp_path}/optuna.db"
    search = study.StudySearch(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
                               metric="score", mode="max", sampler=optuna.samplers.RandomSampler(seed=0),
                               storage=study.open_storage(url), study_name="s")
    search.suggest("a")
    search.on_trial_result("a", {"score": 0.1, "training_iteration": 1})
    search.on_trial_complete("a", {"score": 0.3, "training_iteration": 2})  # max_t: never an on_trial_result
    search.suggest("b")
    search.on_trial_result("b", {"score": 0.2, "training_iteration": 1})
    search.save(str(tmp_path / "searcher.pkl"))  # what Tune keeps for --resume
    restored = study.StudySearch(space={"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)},
                                 metric="score", mode="max", storage=study.open_storage(url), study_name="s")
    restored.restore(str(tmp_path / "searcher.pkl"))
    restored.on_trial_complete("b", {"score": 0.2, "training_iteration": 1})  # already reported: not again
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert [t.intermediate_values for t in trials] == [{1: 0.1, 2: 0.3}, {1: 0.2}]
    assert [t.value for t in trials] == [0.3, 0.2]
    assert not [w for w in recwarn if "already reported" in str(w.message)]


# ---------------------------------------------------------------------------------------------------------
# A sweep: MLflow, W&B and the Optuna study
# ---------------------------------------------------------------------------------------------------------


def _tracked_sweep(tmp_path, shards, monkeypatch, output: str, name: str, track: list[str]):
    """3 trials of 2 epochs, one at a time: trial_0001 (the config's lr) finishes, trial_0002 (lr=3) is stopped
    by ASHA at epoch 1, trial_0003 fails at once (errored); trial_0002 looks at the study as it starts."""
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb"))
    (tmp_path / "wandb").mkdir()
    config, space = _files(tmp_path, shards, epochs=2)
    probe = tmp_path / "study_during.json"
    study_file = storage.join(output, name, study.STUDY_FILE)
    hooks = StudyProbe({"trial_0003": -1}, str(tmp_path), study_file=study_file, study_name=name,
                       probe_trial="trial_0002", out=str(probe))
    result = run_sweep(SweepOptions(config=config, space=space, output=output, name=name, max_concurrent=1,
                                    max_failures=0, hooks=hooks, track=track))
    return result, json.loads(probe.read_text())


def _check_study_during_and_after(during: list[dict], study_url: str, name: str, second: str = "RUNNING") -> None:
    """``second``: trial_0002's state in the snapshot: RUNNING in the live file; WAITING (the space file's point,
    queued) in the copy a sweep on object storage made when trial_0001 ended, before trial_0002 was asked for."""
    import optuna

    # When trial_0002 started, trial_0001 had ended in the study with a value per epoch, and trial_0002 was there.
    assert [t["state"] for t in during] == ["COMPLETE", second]
    assert during[0]["params"]["lr"] == pytest.approx(1e-3) and sorted(during[0]["intermediate"]) == ["1", "2"]
    assert during[1]["params"] == ({"lr": 3.0} if second == "RUNNING" else {}) and during[1]["intermediate"] == {}
    trials = optuna.load_study(study_name=name, storage=study_url).trials
    assert [t.state.name for t in trials] == ["COMPLETE", "PRUNED", "FAIL"]  # finished, ASHA-stopped, errored
    assert [sorted(t.intermediate_values) for t in trials] == [[1, 2], [1], []]
    assert trials[0].params["lr"] == pytest.approx(1e-3) and trials[1].params["lr"] == 3.0
    assert trials[0].value == pytest.approx(trials[0].intermediate_values[2])


STATUSES = {"trial_0001": "finished", "trial_0002": "stopped early (ASHA)", "trial_0003": "errored"}


def _check_mlflow_sweep(uri: str, name: str, sweep_record: dict) -> None:
    client = _mlflow(uri)
    experiment = client.get_experiment_by_name("neoray")
    parent_id = sweep_record["tracking"]["mlflow"]["parent_run_id"]
    parent = client.get_run(parent_id)
    assert parent.info.run_name == name and parent.info.status == "FINISHED"
    db_dir = uri[len("sqlite:///"):].rsplit("/", 1)[0]
    assert parent.info.artifact_uri.startswith(f"file://{db_dir}/mlruns/")  # next to the store, not in the cwd
    assert parent.info.experiment_id == experiment.experiment_id
    assert {a.path for a in client.list_artifacts(parent_id)} >= {"best_config.yaml", "trials.md", "trials.csv",
                                                                    "sweep.json"}
    assert parent.data.tags["neoray.best_trial"] == "trial_0001" and "best_score" in parent.data.metrics
    children = client.search_runs([experiment.experiment_id], f"tags.`mlflow.parentRunId` = '{parent_id}'")
    runs = {r.info.run_name: r for r in children}
    assert {n: r.data.tags["neoray.status"] for n, r in runs.items()} == STATUSES
    assert float(runs["trial_0002"].data.params["lr"]) == 3.0
    first = runs["trial_0001"].info.run_id
    for key in ("loss", "lr", "score", "images_per_s"):
        assert _steps(client, first, key) == [1, 2], key
    assert _steps(client, first, "map") == _steps(client, first, "map50") == [2]  # eval_every=2
    assert _steps(client, runs["trial_0002"].info.run_id, "loss") == [1]
    assert runs["trial_0003"].info.status == "FAILED" and runs["trial_0001"].info.status == "FINISHED"


def _check_wandb_sweep(root: Path, name: str) -> None:
    runs = _wandb_runs(root)
    trials = {n: r for n, r in runs.items() if n.startswith("trial_")}
    assert {r["group"] for r in trials.values()} == {name}
    assert {n: _config_value(r["config"]["neoray_status"]) for n, r in trials.items()} == STATUSES
    assert _config_value(trials["trial_0002"]["config"]["lr"]) == 3.0
    epochs = [row for row in trials["trial_0001"]["history"] if "loss" in row]
    assert [row["epoch"] for row in epochs] == [1, 2]
    assert all({"loss", "lr", "score", "images_per_s"} <= set(row) for row in epochs)
    assert "map" in epochs[1] and "map50" in epochs[1]
    sweep = runs[name]
    assert sweep["job_type"] == "sweep" and sweep["group"] == name
    assert sweep["summary"]["best_trial"] == "trial_0001"
    assert {"best_config.yaml", "trials.md", "trials.csv"} <= set(sweep["files"])


@pytest.mark.slow
def test_sweep_tracked_in_mlflow_and_wandb_with_a_live_optuna_study(ray_session, synthetic_shards, tmp_path,
                                                                    monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    output = str(tmp_path / "sweeps")
    result, during = _tracked_sweep(tmp_path, synthetic_shards, monkeypatch, output, "tracked",
                                    [f"mlflow:{uri}", "wandb:neoray-test"])
    sweep_dir = Path(result.sweep_dir)
    assert result.best["trial"] == "trial_0001"
    record = json.loads((sweep_dir / "sweep.json").read_text())
    study_url = f"sqlite:///{sweep_dir / study.STUDY_FILE}"
    assert record["optuna"] == {"study_name": "tracked", "storage": study_url, "file": "optuna.db", "staged": False,
                                "dashboard": f"optuna-dashboard {study_url}"}
    _check_study_during_and_after(during, study_url, "tracked")
    _check_mlflow_sweep(uri, "tracked", record)
    _check_wandb_sweep(tmp_path / "wandb", "tracked")


@pytest.mark.slow
def test_sweep_on_s3_keeps_its_study_and_tracks_in_mlflow(ray_session, synthetic_shards, s3_bucket, tmp_path,
                                                          monkeypatch):
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    output = f"{s3_bucket}/sweeps"
    result, during = _tracked_sweep(tmp_path, synthetic_shards, monkeypatch, output, "s3tracked",
                                    [f"mlflow:{uri}"])
    sweep_dir = result.sweep_dir
    record = storage.read_json(f"{sweep_dir}/sweep.json")
    assert record["optuna"]["staged"] and record["optuna"]["file"] == "optuna.db"
    # `during` came from the copy in the bucket: uploaded when trial_0001 ended, before trial_0002 started.
    local = tmp_path / "optuna_from_s3.db"
    local.write_bytes(storage.read_bytes(f"{sweep_dir}/optuna.db"))
    _check_study_during_and_after(during, f"sqlite:///{local}", "s3tracked", second="WAITING")
    _check_mlflow_sweep(uri, "s3tracked", record)


# ---------------------------------------------------------------------------------------------------------
# neoray train
# ---------------------------------------------------------------------------------------------------------


def _train_config(tmp_path: Path, shards: dict) -> str:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "name": "tracked_run",
        "model": {"name": "rtdetr_cpu", "options": {"hidden_dim": 32, "num_queries": 20, "num_denoising": 10}},
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "size": "160x90", "shuffle_buffer": 8},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "ema_warmup_steps": 4, "seed": 1},
    }))
    return str(config)


@pytest.mark.slow
def test_train_run_tracked_in_mlflow_and_wandb_and_resumed_into_the_same_runs(ray_session, synthetic_shards,
                                                                              tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_EXPERIMENT_NAME", raising=False)
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    config, runs = _train_config(tmp_path, synthetic_shards), tmp_path / "runs"
    track = ["--track", f"mlflow:{uri}", "--track", "wandb:neoray-test"]
    assert neoray_main(["train", config, "--output", str(runs), *track]) == 0
    run_dir = runs / "tracked_run"
    record = json.loads((run_dir / run_tracking.RECORD_FILE).read_text())
    client, run_id = _mlflow(uri), record["mlflow"]["run_id"]
    run = client.get_run(run_id)
    assert run.info.run_name == "tracked_run" and run.info.status == "FINISHED"
    assert run.info.artifact_uri.startswith(f"file://{tmp_path}/mlruns/")
    assert run.data.params["train.lr"] == "0.001" and run.data.tags["neoray.stop_reason"] == "completed"
    for key in ("loss", "lr", "score", "map", "map50", "images_per_s"):
        assert _steps(client, run_id, key) == [1, 2], key
    assert {"summary/best_epoch", "summary/images_per_s", "summary/best_metrics/map"} <= set(run.data.metrics)
    assert {a.path for a in client.list_artifacts(run_id)} == {"summary.json", "summary.md", "config.yaml",
                                                             "metrics.csv"}

    wandb_run = _wandb_runs(tmp_path)["tracked_run"]
    assert wandb_run["job_type"] == "train" and _config_value(wandb_run["config"]["train"])["lr"] == 1e-3
    assert [row["epoch"] for row in wandb_run["history"] if "loss" in row] == [1, 2]
    assert wandb_run["summary"]["stop_reason"] == "completed" and "summary/best_epoch" in wandb_run["summary"]
    assert "summary.json" in wandb_run["files"]

    # --resume for a third epoch: the same MLflow run, RUNNING again, then FINISHED with epoch 3.
    assert neoray_main(["train", config, "train.epochs=3", "--resume", str(run_dir), *track]) == 0
    assert json.loads((run_dir / run_tracking.RECORD_FILE).read_text()) == record
    assert _steps(client, run_id, "loss") == [1, 2, 3] and client.get_run(run_id).info.status == "FINISHED"
