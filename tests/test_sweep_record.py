"""The sweep record (neoray.tune.record): one typed form of sweep.json, written and read back whole; records of
the first version upgraded, foreign and newer ones refused in one line naming the file."""

from __future__ import annotations

import json

import pytest

from neoray.cluster import TrialResources
from neoray.config import ConfigError, load_config
from neoray.tune.asha import AshaSettings
from neoray.tune.record import VERSION, SearchSettings, SweepRecord, WarmStart, read_record, write_record

PARAMS = {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}}


def _record() -> SweepRecord:
    return SweepRecord(
        name="lr", asha=AshaSettings(grace_period=0.33, reduction_factor=2).resolved(12), params=PARAMS, num_samples=8,
        seed=3, search=SearchSettings("tpe", 4, 2), lr_scaling={"rule": "sqrt", "reference_batch": 4},
        resources=TrialResources({"cpu": 1}, 1.0, 0.0, 2, True), base_config=load_config(None, ["train.epochs=12"]),
        track=["mlflow"], warm_start=WarmStart("/old", ({"trial": "trial_0002", "params": {"lr": 2e-3},
                                                         "best_score": 0.3},)),
        optuna={"study_name": "lr"}, tracking={"mlflow": {"parent_run_id": "abc"}})


def test_a_record_is_written_and_read_back_whole(tmp_path):
    record = _record()
    write_record(str(tmp_path), record)
    raw = json.loads((tmp_path / "sweep.json").read_text())
    assert raw["format"] == "neoray-sweep" and raw["version"] == VERSION
    assert raw["asha"] == {"time_attr": "epoch", "grace_period": 4, "reduction_factor": 2, "max_t": 12, "enabled": True}
    assert raw["rungs"] == [4.0, 8.0]
    back = read_record(str(tmp_path))
    assert back == record
    assert back.rungs == [4.0, 8.0] and back.base_config.train.epochs == 12


def test_a_first_version_record_is_read_by_its_fields(tmp_path):
    # What sweeps wrote before the record had a format: no format or version, --track among the options.
    (tmp_path / "sweep.json").write_text(json.dumps({
        "name": "before", "metric": "score", "mode": "max", "rungs": [1], "num_samples": 3, "seed": 0,
        "asha": {"time_attr": "epoch", "grace_period": 1, "reduction_factor": 2, "max_t": 2},
        "params": PARAMS, "options": {"track": ["wandb"]},
        "search": {"sampler": "random", "startup_trials": 4, "given": 1}}))
    record = read_record(str(tmp_path))
    assert record.asha == AshaSettings("epoch", 1, 2, 2) and record.track == ["wandb"]
    assert record.search.sampler == "random" and record.resources is None


@pytest.mark.parametrize("raw, message", [
    ({"format": "something-else", "name": "x"}, "not a neoray sweep record (format 'something-else')"),
    ({"name": "odd", "resources": [1, 2]}, "field 'metric' is missing"),
    ({"format": "neoray-sweep", "version": 99, "name": "x"}, "version 99 is newer than this neoray reads"),
    ({"name": "x", "metric": "score", "mode": "max", "num_samples": 2, "params": {},
      "asha": {"grace_period": "soon", "reduction_factor": 2, "max_t": 4}}, "field 'asha' lacks"),
    ({"name": "x", "metric": "score", "mode": "max", "num_samples": 2, "params": {},
      "asha": {"grace_period": 1, "reduction_factor": 2, "max_t": 4, "colour": "red"}}, "field 'asha' does not"),
    ([1, 2, 3], "expected a mapping"),
])
def test_a_foreign_or_newer_record_is_refused_in_one_line_naming_the_file(tmp_path, raw, message):
    (tmp_path / "sweep.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError) as caught:
        read_record(str(tmp_path))
    text = str(caught.value)
    assert message in text and str(tmp_path / "sweep.json") in text and "\n" not in text


def test_asha_settings_resolve_a_fraction_of_the_run_and_take_command_line_overrides():
    space_file = AshaSettings(grace_period=0.33, reduction_factor=2)
    assert space_file.resolved(18).grace_period == 6 and space_file.resolved(18).rungs == [6.0, 12.0]
    assert space_file.with_overrides(grace_period=3).resolved(12).rungs == [3.0, 6.0]
    assert space_file.resolved(2).grace_period == 1  # at least one epoch
    with pytest.raises(ValueError, match="need max_t"):
        _ = space_file.rungs


def test_a_grace_period_on_the_command_line_turns_on_early_stopping_that_the_space_file_left_off():
    off = AshaSettings(enabled=False)
    assert off.resolved(12).rungs == [] and off.with_overrides().resolved(12).rungs == []
    assert off.with_overrides(grace_period=4).resolved(12).rungs == [4.0, 8.0]
