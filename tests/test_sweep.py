"""Sweeps: end to end on tiny synthetic data (ASHA stops a bad trial, failures are retried or reported,
the best config loads back, the trial after a stopped TorchTrainer trial still gets its workers), and
the pieces that decide what a sweep reports (score, interrupted or ended, exit code)."""

import argparse
import csv
import json
import re
from pathlib import Path

import pytest
import yaml
from cli_output import one_line
from fault_hooks import SlowTrial, TrialFailures

from neoray.commands import sweep as sweep_cmd
from neoray.config import load_config
from neoray.tune.asha import AshaSettings
from neoray.tune.record import SearchSettings, SweepRecord, WarmStart
from neoray.tune.results import collect_rows, sweep_interrupted
from neoray.tune.sweep import SweepOptions, SweepResult, run_sweep

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


class _FakeTrial:
    """What collect_rows and sweep_interrupted read of a Tune Trial after fit()."""

    def __init__(self, name, status="TERMINATED", done=True):
        self.name, self.status, self.config, self.num_failures, self.local_path = name, status, {"lr": 0.1}, 0, ""
        self.last_result = {"done": done}

    def __str__(self):
        return self.name


def test_interrupted_sweep_is_told_from_each_trials_own_end():
    # After Ctrl-C Tune marks the trials it stops TERMINATED, like finished ones, but their last result is
    # not done (checked against Ray 2.60: SIGINT to a running Tuner.fit()).
    finished = _FakeTrial("trial_0001")
    stopped_by_ctrl_c = _FakeTrial("trial_0002", done=False)
    pending = _FakeTrial("trial_0003", status="PENDING", done=False)
    asha = {"trial_0004": {"epoch": 1}}
    asha_stopped = _FakeTrial("trial_0004", done=False)  # stopped by the scheduler: ended on our terms
    errored = _FakeTrial("trial_0005", status="ERROR", done=False)
    assert not sweep_interrupted([finished, asha_stopped, errored], asha, 3)
    assert sweep_interrupted([finished, stopped_by_ctrl_c, errored], asha, 3)
    assert sweep_interrupted([finished, asha_stopped, pending], asha, 3)
    assert sweep_interrupted([finished], asha, 3)  # Ctrl-C before the searcher made trial 2


def test_collect_rows_names_how_each_trial_ended(tmp_path):
    (tmp_path / "asha_stopped.json").write_text(json.dumps({"trial_0001": {"epoch": 1}}))
    trials = [_FakeTrial("trial_0001", done=False), _FakeTrial("trial_0002", done=False),
              _FakeTrial("trial_0003", status="PENDING", done=False), _FakeTrial("trial_0004"),
              _FakeTrial("trial_0005", status="ERROR", done=False)]
    record = SweepRecord(name="s", asha=AshaSettings(max_t=2), num_samples=5,
                         params={"lr": {"distribution": "log_uniform", "low": 0.01, "high": 1.0}})
    rows = collect_rows(trials, str(tmp_path), record)
    assert [r["status"] for r in rows] == ["stopped early (ASHA)", "interrupted", "interrupted", "finished", "errored"]


def test_interrupted_sweep_exits_130_with_the_resume_command(monkeypatch, capsys, tmp_path):
    parser = argparse.ArgumentParser()
    sweep_cmd.add_arguments(parser)
    argv = ["experiments/sweep_lr.py", "--name", "my sweep", "train.epochs=3"]
    monkeypatch.setattr("sys.argv", argv)
    outcome = {}
    monkeypatch.setattr("neoray.commands.sweep.run_sweep", lambda opts: outcome["result"])
    outcome["result"] = SweepResult(tmp_path, [], {"trial": "trial_0001"}, None, interrupted=True)
    assert sweep_cmd.run(parser.parse_args(argv[1:])) == 130
    assert ("sweep interrupted; continue with: python experiments/sweep_lr.py --name 'my sweep' train.epochs=3 "
            "--resume") in capsys.readouterr().err
    outcome["result"] = SweepResult(tmp_path, [], {"trial": "trial_0001"}, tmp_path / "best_config.yaml")
    assert sweep_cmd.run(parser.parse_args(argv[1:])) == 0
    assert sweep_cmd.resume_command(["/venv/bin/neoray", "sweep", "--resume"]) == "neoray sweep --resume"


@pytest.mark.slow
def test_sweep_asha_retry_errors_best_config_and_report(ray_session, synthetic_shards, tmp_path, monkeypatch):
    # the sweep reads Tune's result files; a user's environment that turns Tune's automatic loggers off
    # must not leave it without them
    monkeypatch.setenv("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    config, space = _files(tmp_path, synthetic_shards)
    result = run_sweep(SweepOptions(
        config=config, space=space, output=str(tmp_path / "sweeps"), name="s", max_concurrent=1, max_failures=1,
        # trial_0001 fails once and is retried; trial_0003 always fails and ends errored.
        hooks=TrialFailures({"trial_0001": 1, "trial_0003": -1}, str(tmp_path)),
    ))
    sweep_dir = Path(result.sweep_dir)
    rows = _rows(sweep_dir)
    assert set(rows) == {"trial_0001", "trial_0002", "trial_0003"}
    assert rows["trial_0001"]["status"] == "finished" and rows["trial_0001"]["failures"] == "1"
    assert rows["trial_0001"]["epochs"] == "3" and float(rows["trial_0001"]["lr"]) == pytest.approx(1e-3)
    assert rows["trial_0002"]["status"] == "stopped early (ASHA)" and rows["trial_0002"]["epochs"] == "1"
    assert float(rows["trial_0002"]["lr"]) == 3.0
    assert rows["trial_0003"]["status"] == "errored" and "injected failure" in rows["trial_0003"]["error"]
    stopped = json.loads((sweep_dir / "asha_stopped.json").read_text())  # ASHA's own decision
    assert list(stopped) == ["trial_0002"]
    assert "stopped early (ASHA)" in (sweep_dir / "trials.md").read_text()

    assert result.best["trial"] == "trial_0001"
    best = load_config(result.best_config_path)
    assert best.train.lr == pytest.approx(1e-3) and best.data.train == str(synthetic_shards["train"])
    # Per-epoch history and TensorBoard events stay on disk for `neoray report` / tensorboard.
    assert len((sweep_dir / "trial_0001" / "result.json").read_text().splitlines()) == 3
    assert list((sweep_dir / "trial_0001").glob("events.out.tfevents.*"))

    from neoray.tune.report import write_report

    text = Path(write_report(result.sweep_dir)).read_text()
    assert "learning_curves.png" in text and "map_vs_lr.png" in text
    assert (sweep_dir / "learning_curves.png").stat().st_size > 1000


@pytest.mark.slow
def test_two_worker_trial_after_an_asha_stopped_one_still_runs(ray_session, synthetic_shards, tmp_path, capfd):
    """TorchTrainer path: ASHA stops trial_0002 (lr=3 from points_to_evaluate) at the epoch-1 rung, and
    trial_0003 still gets its two workers and trains to the end (Ray has had a bug where a stopped Train
    V2 trial kept its placement group and the sweep hung); no Train placement group is left behind."""
    import ray

    config, space = _files(tmp_path, synthetic_shards, epochs=2)
    result = run_sweep(SweepOptions(
        config=config, space=space, output=str(tmp_path / "sweeps"), name="w2", num_samples=3,
        workers_per_trial=2, max_concurrent=1, overrides=["train.cpus_per_worker=1"],
    ))
    sweep_dir = Path(result.sweep_dir)
    rows = _rows(sweep_dir)
    assert not result.interrupted and set(rows) == {"trial_0001", "trial_0002", "trial_0003"}
    assert rows["trial_0002"]["status"] == "stopped early (ASHA)" and rows["trial_0002"]["epochs"] == "1"
    assert list(json.loads((sweep_dir / "asha_stopped.json").read_text())) == ["trial_0002"]
    assert rows["trial_0003"]["status"] == "finished" and rows["trial_0003"]["epochs"] == "2"
    assert rows["trial_0003"]["best_map"] != ""  # it reached its evaluation epoch
    assert (sweep_dir / "trials" / "trial_0003").is_dir()  # the TorchTrainer run named after the trial
    alive = [pg for pg in ray.util.placement_group_table().values()
             if pg["state"] != "REMOVED" and len(pg["bundles"]) == 2]
    assert alive == []

    out = capfd.readouterr().out
    # Tune's live trial table shows the searched parameter and the metrics that matter.
    header = [line for line in out.splitlines() if line.startswith("| Trial name")][-1]  # the final table
    assert [c.strip() for c in header.strip("|").split("|")] == [
        "Trial name", "status", "loc", "lr", "epoch", "loss", "score", "mAP", "mAP50", "lr now"]
    # Its best-trial line names trials as every neoray line does, never by Ray's trial id (e.g. 6e1cdf21).
    best_lines = [line for line in out.splitlines() if line.startswith("Current best trial:")]
    assert best_lines and all(re.match(r"Current best trial: trial_000\d with score=", line) for line in best_lines)
    assert "[neoray] ASHA stopped trial_0002 at epoch 1" in out
    assert out.index("[neoray] ASHA stopped trial_0002") < out.index("[neoray] trial_0003 started: lr=")


def _previous_sweep(root: Path) -> Path:
    """What `neoray report` and --warm-start read of a finished sweep: sweep.json and trials.csv."""
    root.mkdir(parents=True)
    (root / "sweep.json").write_text(json.dumps({
        "name": "before", "metric": "score", "mode": "max", "rungs": [1], "num_samples": 3, "seed": 0,
        "asha": {"time_attr": "epoch", "grace_period": 1, "reduction_factor": 2, "max_t": 2},
        "params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}}}))
    (root / "trials.csv").write_text("trial,status,lr,best_score\n"
                                     "trial_0001,finished,0.0005,0.10\n"
                                     "trial_0002,finished,0.002,0.30\n"
                                     "trial_0003,stopped early (ASHA),0.007,0.05\n"
                                     "trial_0004,errored,0.0001,\n")
    return root


@pytest.mark.slow
def test_warm_start_runs_the_previous_sweeps_best_configuration_first(ray_session, synthetic_shards, tmp_path):
    config, space = _files(tmp_path, synthetic_shards, epochs=2)
    previous = _previous_sweep(tmp_path / "sweeps" / "before")
    result = run_sweep(SweepOptions(config=config, space=space, output=str(tmp_path / "sweeps"), name="after",
                                    num_samples=2, max_concurrent=1, warm_start=str(previous)))
    rows = _rows(Path(result.sweep_dir))
    # Half of the new budget (one trial) goes to the previous sweep's best configuration, before the
    # config's own values; the table says where each warm trial came from.
    assert float(rows["trial_0001"]["lr"]) == pytest.approx(0.002) and rows["trial_0001"]["warm_start"] == "trial_0002"
    assert float(rows["trial_0002"]["lr"]) == pytest.approx(1e-3) and rows["trial_0002"]["warm_start"] == ""
    record = json.loads((Path(result.sweep_dir) / "sweep.json").read_text())
    assert record["warm_start"]["trials"][0]["best_score"] == 0.3


def test_a_foreign_sweep_record_is_refused_in_one_line(tmp_path, monkeypatch, capsys):
    from ray import tune

    sweep_dir = tmp_path / "sweeps" / "odd"
    sweep_dir.mkdir(parents=True)
    (sweep_dir / "sweep.json").write_text(json.dumps({"name": "odd", "resources": [1, 2]}))
    monkeypatch.setattr(tune.Tuner, "can_restore", staticmethod(lambda path: True))
    parser = argparse.ArgumentParser()
    sweep_cmd.add_arguments(parser)
    code = sweep_cmd.run(parser.parse_args(["--output", str(tmp_path / "sweeps"), "--name", "odd", "--resume"]))
    err = capsys.readouterr().err
    assert code == 1 and "not a neoray sweep record" in one_line(err)


def test_the_sweep_says_whether_tpe_will_model_any_trial():
    from neoray.tune.sweep import search_line

    def record(num_samples, search, warm_start=None):
        return SweepRecord(name="s", asha=AshaSettings(max_t=2), params={}, num_samples=num_samples, search=search,
                           warm_start=warm_start)

    short = record(4, SearchSettings("tpe", 10))
    assert "all 4 trials fall in its start-up" in search_line(short) and "random search" in search_line(short)
    long = record(16, SearchSettings("tpe", 4))
    assert search_line(long).endswith("then 12 trial(s) suggested from the results so far")
    # 5 previous configurations + the config's own: 6 given
    warm = record(16, SearchSettings("tpe", 4), WarmStart("before", ({},) * 5))
    assert "6 given configuration(s)" in search_line(warm) and "then 10 trial(s)" in search_line(warm)
    points = record(16, SearchSettings("tpe", 4, given=3))
    assert "3 given configuration(s)" in search_line(points) and "then 12 trial(s)" in search_line(points)
    assert search_line(record(3, SearchSettings("random", 4))).startswith("search: random")


def _stops_and_study(sweep_dir: Path) -> tuple[dict, dict]:
    import optuna

    stopped = json.loads((sweep_dir / "asha_stopped.json").read_text())
    study = optuna.load_study(study_name=sweep_dir.name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    return {name: entry["epoch"] for name, entry in stopped.items()}, {t.number: t for t in study.trials}


@pytest.mark.slow
def test_a_delayed_trial_changes_nothing_asha_decides_and_stopped_trials_are_pruned_in_the_study(
        ray_session, synthetic_shards, tmp_path):
    """Two trials at a time. Undelayed, trial_0001 (the config's lr) reaches the epoch-1 rung before trial_0002
    (lr=3) and ASHA stops trial_0002. With trial_0001 slowed down, trial_0002 gets to the rung first: Ray's own
    ASHA, comparing it with nobody, let it run on; neoray's waits for trial_0001 and stops the same trials."""
    config, space = _files(tmp_path, synthetic_shards, epochs=3)
    outcomes = {}
    for name, hooks in (("plain", None), ("delayed", SlowTrial("trial_0001", 6.0))):
        result = run_sweep(SweepOptions(config=config, space=space, output=str(tmp_path / "sweeps"), name=name,
                                        num_samples=4, max_concurrent=2, hooks=hooks))
        assert not result.interrupted
        outcomes[name] = _stops_and_study(Path(result.sweep_dir))
    (stopped, study), (delayed_stopped, _) = outcomes["plain"], outcomes["delayed"]
    assert "trial_0002" in stopped and delayed_stopped == stopped
    # Optuna is told the truth: a stopped trial is PRUNED with its scores up to the rung, not COMPLETE with
    # a 1-epoch score standing beside 3-epoch ones.
    pruned = study[1]  # Optuna numbers trials from 0: trial_0002
    assert pruned.state.name == "PRUNED" and max(pruned.intermediate_values) == 1
    assert study[0].state.name == "COMPLETE" and max(study[0].intermediate_values) == 3
