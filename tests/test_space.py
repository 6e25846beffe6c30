"""Search-space YAML: strict validation, Optuna distributions, the config's values evaluated first."""

import pytest
import yaml

from neoray.config import ConfigError, load_config
from neoray.tune.space import (
    load_space, optuna_distributions, params_to_overrides, parse_space, points_to_evaluate,
)
from neoray.tune.sweep import DEFAULT_SPACE, asha_rungs, plan_resources


def test_default_space_file_is_valid():
    space = load_space(DEFAULT_SPACE)
    assert {"lr", "warmup_steps", "batch"} <= set(space.params)
    raw = yaml.safe_load(DEFAULT_SPACE.read_text())["params"]["batch"]
    # Every per-worker batch becomes one "BxA" pair keeping the file's effective batch.
    pairs = space.params["batch"]["values"]
    assert [int(p.split("x")[0]) for p in pairs] == raw["per_worker"]
    assert all(int(b) * int(a) == raw["effective"] for b, a in (p.split("x") for p in pairs))


@pytest.mark.parametrize("raw, message", [
    ({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}}, "asha": {"grace": 1}},
     "asha.grace"),
    ({"params": {"learning_rate": {"distribution": "uniform", "low": 0, "high": 1}}}, "params.learning_rate"),
    ({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "hi": 1e-2}}}, "params.lr.hi"),
    ({"paramz": {}}, "'paramz'"),
])
def test_unknown_keys_are_named(raw, message):
    with pytest.raises(ConfigError, match=message):
        parse_space(raw)


@pytest.mark.parametrize("spec, message", [
    ({"lr": {"distribution": "log_uniform", "low": 0, "high": 1}}, "low > 0"),
    ({"lr": {"distribution": "uniform", "low": 2, "high": 1}}, "below high"),
    ({"lr": {"distribution": "gauss", "low": 1, "high": 2}}, "distribution must be"),
    ({"batch": {"per_worker": [3, 4], "effective": 8}}, "do not divide"),
    ({"batch": {"pairs": ["4y2"]}}, "pair like 4x2"),
])
def test_bad_values_are_refused(spec, message):
    with pytest.raises(ConfigError, match=message):
        parse_space({"params": spec})


def test_distributions_points_and_overrides(tmp_path):
    space = parse_space({
        "params": {"lr": {"distribution": "log_uniform", "low": 1e-5, "high": 1e-2},
                   "warmup_steps": {"distribution": "int_uniform", "low": 0, "high": 100, "step": 10},
                   "batch": {"pairs": ["4x1", "2x2"]}},
        "points_to_evaluate": [{"lr": 0.5}],
    })
    dists = optuna_distributions(space)
    assert dists["lr"].log and dists["warmup_steps"].step == 10 and dists["batch"].choices == ("4x1", "2x2")
    cfg = load_config(None, ["train.lr=3e-4", "train.warmup_steps=20", "train.batch_size=2", "train.accumulate=2"])
    first, second = points_to_evaluate(cfg, space)
    assert first == {"lr": 3e-4, "warmup_steps": 20, "batch": "2x2"}  # the config's own values come first
    assert second == {"lr": 0.5, "warmup_steps": 20, "batch": "2x2"}
    assert params_to_overrides({"batch": "4x1", "lr": 0.1, "other": 1}) == {
        "train.batch_size": 4, "train.accumulate": 1, "train.lr": 0.1}


def test_asha_rungs():
    assert asha_rungs(1, 2, 8) == [1, 2, 4]
    assert asha_rungs(2, 3, 20) == [2, 6, 18]


def test_resources_fail_fast_and_cap_concurrency():
    cfg = load_config(None, ["train.workers=2", "train.cpus_per_worker=1"])
    with pytest.raises(ConfigError, match="one trial needs 2.01 CPUs"):
        plan_resources(cfg, None, None, {"CPU": 2})
    plan = plan_resources(cfg, None, 8, {"CPU": 8})
    assert not plan.direct and plan.tune_request == {"cpu": 0.01} and plan.max_concurrent == 3
    single = plan_resources(load_config(None), None, None, {"CPU": 4})
    assert single.direct and single.tune_request == {"cpu": 1.0, "gpu": 0.0} and single.max_concurrent == 3
    with pytest.raises(ConfigError, match="GPUs"):
        plan_resources(load_config(None), 1, None, {"CPU": 4})
