"""Search-space YAML: strict validation, Optuna distributions, the config's values evaluated first."""

import re

import pytest

from neoray.cluster import plan as plan_resources
from neoray.config import ConfigError, load_config
from neoray.configs import DEFAULT_SPACE
from neoray.tune.asha import asha_rungs
from neoray.tune.space import (
    load_space,
    optuna_distributions,
    params_to_overrides,
    parse_space,
    points_to_evaluate,
    relative_to_config,
)


def test_default_space_file_is_valid():
    space = load_space(DEFAULT_SPACE)
    assert {"lr", "warmup_steps", "batch"} <= set(space.params)
    assert space.params["batch"]["values"] == ["4x1", "4x2", "8x1"]  # the benchmark's design
    assert space.params["lr"]["relative"] and (space.params["lr"]["low"], space.params["lr"]["high"]) == (0.5, 8.0)
    assert not space.asha.enabled  # the benchmark's slow starter: every early-stopping setting lost it
    # the benchmark's choice: never below random search on any table, ahead on both dense ones
    assert (space.sampler, space.startup_trials) == ("tpe", 4)
    # quality per hour (README "Quality against YOLO11n"): trials on the first 4 of the demo's epochs, then the
    # best continues to the end
    assert space.trial_epochs == 4
    demo = relative_to_config(space, load_config(None))
    assert (demo.trial_epochs, demo.asha.max_t) == (4, 4)


def test_per_worker_batches_become_pairs_keeping_the_effective_batch():
    space = parse_space({"params": {"batch": {"per_worker": [4, 2], "effective": 4}}})
    assert space.params["batch"]["values"] == ["4x1", "2x2"]


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
    # 7 CPUs besides Ray Data's; each trial holds 2 workers' CPUs and the sliver of its driver, which spoils a
    # whole CPU for Ray Data's 1-CPU tasks: 2 trials, not 3
    assert not plan.direct and plan.tune_request == {"cpu": 0.01} and plan.max_concurrent == 2
    single = plan_resources(load_config(None), None, None, {"CPU": 4})
    assert single.direct and single.tune_request == {"cpu": 1.0, "gpu": 0.0} and single.max_concurrent == 3
    with pytest.raises(ConfigError, match="GPUs"):
        plan_resources(load_config(None), 1, None, {"CPU": 4})


def test_trials_at_once_leave_ray_data_a_whole_cpu_on_some_node(capsys):
    """Two 3-CPU nodes, trials of 2 x 1-CPU workers: two at once would leave 0.99 CPUs free on each node (the
    trial drivers' slivers), where no 1-CPU task of Ray Data or of the batch stream can ever start."""
    cfg = load_config(None, ["train.workers=2", "train.cpus_per_worker=1"])
    nodes = [{"CPU": 0.0}, {"CPU": 3.0}, {"CPU": 3.0}]
    assert plan_resources(cfg, None, None, {"CPU": 6}, nodes=nodes).max_concurrent == 1
    assert plan_resources(cfg, None, 2, {"CPU": 6}, nodes=nodes).max_concurrent == 1
    assert "--max-concurrent 2 lowered to 1" in capsys.readouterr().out
    # a one-worker trial holds whole CPUs only: nothing is spoilt
    single = load_config(None, ["train.cpus_per_worker=1"])
    assert plan_resources(single, None, None, {"CPU": 6}, nodes=nodes).max_concurrent == 5


def test_gpus_per_worker_is_planned_and_requested_alike(synthetic_shards):
    """--gpus-per-worker reaches train.gpus_per_worker, which the TorchTrainer requests per worker, so a
    fraction is planned as it is placed (planning 0.5 while placing 1 would admit trials that never fit)."""
    from neoray.tune.sweep import SweepOptions, resolve_config

    shards = synthetic_shards

    gpu = load_config(None, ["train.workers=2", "train.use_gpu=true"])
    half = plan_resources(gpu, 0.5, None, {"CPU": 16, "GPU": 2})
    assert half.gpus == 1 and half.max_concurrent == 2
    whole = plan_resources(gpu, 1, None, {"CPU": 16, "GPU": 4})
    assert whole.gpus == 2 and whole.max_concurrent == 2
    resolved = resolve_config(SweepOptions(overrides=["train.workers=2", f"data.train={shards['train']}",
                                                      f"data.val={shards['val']}"], gpus_per_worker=0.5))
    assert resolved.train.use_gpu and resolved.train.gpus_per_worker == 0.5
    assert plan_resources(resolved, None, None, {"CPU": 16, "GPU": 2}).gpus == 1
    # One worker per trial: Tune itself reserves the fraction, so it is planned as asked.
    single = plan_resources(load_config(None, ["train.use_gpu=true"]), 0.5, None, {"CPU": 16, "GPU": 1})
    assert single.tune_request["gpu"] == 0.5 and single.max_concurrent == 2


def test_worker_that_fits_no_single_node_is_refused():
    cfg = load_config(None, ["train.workers=2", "train.cpus_per_worker=4"])
    small_nodes = [{"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 3.0}, {"CPU": 3.0}]  # 12 CPUs, but 3 per node
    with pytest.raises(ConfigError, match=r"one worker needs 4 CPUs and 0 GPUs on a single node.*largest: 3 CPUs"):
        plan_resources(cfg, None, None, {"CPU": 12}, nodes=small_nodes)
    # A GPU worker needs its CPUs and its GPU on the same node.
    gpu = load_config(None, ["train.workers=2", "train.cpus_per_worker=2", "train.use_gpu=true"])
    split = [{"CPU": 8.0}, {"CPU": 1.0, "GPU": 4.0}]
    with pytest.raises(ConfigError, match="on a single node"):
        plan_resources(gpu, 1, None, {"CPU": 9, "GPU": 4}, nodes=split)
    assert plan_resources(gpu, 1, None, {"CPU": 9, "GPU": 4}, nodes=[{"CPU": 9.0, "GPU": 4.0}]).gpus == 2


def test_autoscale_waits_for_nodes_instead_of_failing_fast(capsys):
    """README's COCO sweep on cluster.yaml: 8 workers x 1 GPU while only the min_workers GPU node is up."""
    coco = load_config(None, ["train.workers=8", "train.use_gpu=true"])
    today, nodes = {"CPU": 4, "GPU": 1}, [{"CPU": 0.0}, {"CPU": 4.0, "GPU": 1.0}]
    with pytest.raises(ConfigError, match="pass --autoscale"):  # a fixed cluster still fails fast
        plan_resources(coco, 1, None, today, nodes=nodes)
    plan = plan_resources(coco, 1, None, today, nodes=nodes, autoscale=True)
    assert plan.max_concurrent == 1 and plan.gpus == 8 and plan.tune_request == {"cpu": 0.01}
    assert "wait for the autoscaler" in capsys.readouterr().out
    # --max-concurrent is taken as given: the autoscaler adds the nodes (not lowered to today's fit).
    assert plan_resources(coco, 1, 4, today, nodes=nodes, autoscale=True).max_concurrent == 4


def test_a_space_file_that_cannot_be_read_is_one_line(tmp_path):
    """Like configs: a directory, UTF-16 text or a list at the top is a one-line ConfigError."""
    utf16 = tmp_path / "space16.yaml"
    utf16.write_text("params:\n  lr: {distribution: log_uniform, low: 1e-4, high: 1e-2}\n", encoding="utf-16")
    listed = tmp_path / "list.yaml"
    listed.write_text("- lr\n")
    for path, fragment in ((tmp_path, "is a directory"), (utf16, "not UTF-8"), (listed, "mapping at the top")):
        with pytest.raises(ConfigError, match=fragment) as err:
            load_space(path)
        assert "\n" not in str(err.value)


def test_a_space_batch_that_leaves_a_worker_without_a_step_is_refused(synthetic_shards):
    """24 training images over 2 workers: a drawn batch of 16 per worker would train no step at all."""
    from neoray.tune.space import parse_space
    from neoray.tune.sweep import _check_space_batches

    cfg = load_config(None, [f"data.train={synthetic_shards['train']}", "train.workers=2"])
    space = parse_space({"params": {"batch": {"pairs": ["4x4", "16x1"]}}})
    with pytest.raises(ConfigError, match=r"search space: params.batch 16x1: data.train: 24 training images give "
                                          r"each of the 2 workers 12, fewer than train.batch_size=16"):
        _check_space_batches(cfg, space)
    _check_space_batches(cfg, parse_space({"params": {"batch": {"pairs": ["4x4", "12x1"]}}}))


def test_lr_scaling_sets_each_trials_lr_from_its_effective_batch_and_the_table_shows_both(tmp_path):
    from neoray.config import load_config
    from neoray.tune.asha import AshaSettings
    from neoray.tune.best_config import export_best_config
    from neoray.tune.record import SweepRecord
    from neoray.tune.results import collect_rows
    from neoray.tune.space import lr_scaling_record, parse_space, trial_config

    space = parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2},
                                    "batch": {"pairs": ["4x1", "4x4", "8x2"]}},
                         "lr_scaling": {"rule": "sqrt", "reference_batch": 4}})
    base = load_config(None, {"train.batch_size": 4, "train.workers": 2})
    scaling = lr_scaling_record(space, base)
    assert scaling == {"rule": "sqrt", "reference_batch": 4}
    # 4x4 on 2 workers: 32 images per step, 8x the reference: sqrt -> lr x 2.83.
    assert trial_config(base, {"lr": 1e-3, "batch": "4x4"}, scaling).train.lr == pytest.approx(1e-3 * 8 ** 0.5)
    linear = {"rule": "linear", "reference_batch": 4}
    assert trial_config(base, {"lr": 1e-3, "batch": "8x2"}, linear).train.lr == pytest.approx(8e-3)
    assert trial_config(base, {"lr": 1e-3, "batch": "8x2"}, None).train.lr == pytest.approx(1e-3)
    # The reference batch defaults to the base config's effective batch (here 8): its own lr is unchanged.
    default_ref = parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
                               "lr_scaling": {"rule": "linear"}})
    assert lr_scaling_record(default_ref, base)["reference_batch"] == 8

    class Trial:
        status, num_failures, local_path, last_result = "TERMINATED", 0, "", {"done": True}
        config = {"lr": 1e-3, "batch": "4x4"}

        def __str__(self):
            return "trial_0001"

    record = SweepRecord(name="s", asha=AshaSettings(max_t=10), params=space.params, num_samples=1,
                         lr_scaling=scaling, base_config=base)
    [row] = collect_rows([Trial()], str(tmp_path), record)
    assert row["lr"] == 1e-3 and row["lr_trial"] == pytest.approx(1e-3 * 8 ** 0.5)
    best = export_best_config(base, row, str(tmp_path / "best.yaml"), "s", scaling)
    assert best.train.lr == pytest.approx(1e-3 * 8 ** 0.5) and best.train.accumulate == 4


def test_space_values_the_config_would_refuse_are_refused_before_the_sweep(synthetic_shards):
    from neoray.config import load_config
    from neoray.tune.space import check_space_against_config

    cfg = load_config(None, {"train.epochs": 6})
    bad = [
        ({"params": {"lr": {"distribution": "choice", "values": [1e-3, -0.1]}}}, "params.lr: -0.1"),
        ({"params": {"warmup_steps": {"distribution": "int_uniform", "low": -5, "high": 10}}}, "params.warmup_steps"),
        ({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
          "asha": {"grace_period": 7}}, "asha.grace_period 7 is longer than a trial (train.epochs 6)"),
    ]
    for raw, message in bad:
        with pytest.raises(ConfigError, match=re.escape(message)):
            check_space_against_config(parse_space(raw), cfg)
    with pytest.raises(ConfigError, match="search.seed must be between 0 and"):
        parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
                     "search": {"seed": 1e300}})
    with pytest.raises(ConfigError, match="search.sampler must be one of tpe, gp, random"):
        parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
                     "search": {"sampler": "grid"}})


def test_a_relative_lr_range_is_multiples_of_the_configs_lr():
    from neoray.config import from_dict
    from neoray.tune.space import relative_to_config

    space = parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 0.5, "high": 4, "relative": True},
                                    "warmup_steps": {"distribution": "int_uniform", "low": 0, "high": 100}}})
    with pytest.raises(ValueError, match="relative"):
        optuna_distributions(space)  # never sampled as the raw multiples
    for lr in (2e-3, 1e-4):
        resolved = relative_to_config(space, from_dict({"train": {"lr": lr}}))
        dist = optuna_distributions(resolved)["lr"]
        assert (dist.low, dist.high, dist.log) == (pytest.approx(0.5 * lr), pytest.approx(4 * lr), True)
        assert resolved.params["warmup_steps"] == space.params["warmup_steps"]
    decay = parse_space({"params": {"weight_decay": {"distribution": "log_uniform", "low": 0.1, "high": 10,
                                                     "relative": True}}})
    with pytest.raises(ConfigError, match="relative to the config's train.weight_decay, which is 0"):
        relative_to_config(decay, from_dict({"train": {"weight_decay": 0.0}}))


@pytest.mark.parametrize("spec", [
    {"distribution": "uniform", "low": 0.5, "high": 4, "relative": True},
    {"distribution": "log_uniform", "low": 0.5, "high": 4, "relative": "yes"},
    {"distribution": "choice", "values": [1e-3, 2e-3], "relative": True},
])
def test_relative_needs_a_log_uniform_range_and_true(spec):
    with pytest.raises(ConfigError, match=r"params\.lr\.relative"):
        parse_space({"params": {"lr": spec}})


def test_a_fractional_grace_period_is_that_share_of_the_run():
    from neoray.config import from_dict
    from neoray.tune.space import relative_to_config

    space = parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
                         "asha": {"grace_period": 0.33, "reduction_factor": 2}})
    for epochs, grace in ((12, 4), (20, 7), (72, 24), (2, 1)):
        assert relative_to_config(space, from_dict({"train": {"epochs": epochs}})).asha.grace_period == grace
    assert space.asha.grace_period == 0.33  # the space itself is left as read
    for bad in (1.5, 0.0, True, "1/3"):
        with pytest.raises(ConfigError, match="asha.grace_period must be an integer >= 1"):
            parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
                         "asha": {"grace_period": bad}})


def test_trial_epochs_are_a_prefix_of_the_schedule_and_asha_works_within_it():
    from neoray.config import from_dict
    from neoray.tune.space import relative_to_config

    raw = {"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
           "asha": {"grace_period": 0.5, "reduction_factor": 2}}
    for trial_epochs, epochs, resolved in ((0.15, 28, 4), (0.15, 72, 11), (0.15, 2, 1), (4, 28, 4),
                                           (0.5, 1, None), (12, 12, None), (30, 12, None), (0, 12, None)):
        space = relative_to_config(parse_space({**raw, "search": {"trial_epochs": trial_epochs}}),
                                   from_dict({"train": {"epochs": epochs}}))
        assert space.trial_epochs == resolved, (trial_epochs, epochs)
        # ASHA's rungs and max_t are within what a trial trains
        assert space.asha.max_t == (resolved or epochs)
        assert space.asha.grace_period == max(1, round(0.5 * (resolved or epochs)))
    for bad in (-1, 1.5, True, "4", float("nan")):
        with pytest.raises(ConfigError, match="search.trial_epochs must be an integer >= 1"):
            parse_space({**raw, "search": {"trial_epochs": bad}})


def test_a_grace_period_longer_than_a_trial_is_refused():
    from neoray.config import from_dict
    from neoray.tune.space import check_space_against_config, relative_to_config

    cfg = from_dict({"train": {"epochs": 20}})
    space = relative_to_config(parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4,
                                                                "high": 1e-2}},
                                            "asha": {"grace_period": 5}, "search": {"trial_epochs": 4}}), cfg)
    with pytest.raises(ConfigError, match=re.escape("asha.grace_period 5 is longer than a trial "
                                                    "(search.trial_epochs 4)")):
        check_space_against_config(space, cfg)


@pytest.mark.parametrize("space_file, config_file", [
    ("space_default.yaml", "synthetic_cpu.yaml"),
    ("space_coco.yaml", "coco_r50_8gpu.yaml"),
    ("space_finetune.yaml", "coco_finetune_r50vd_1920x1080.yaml"),
])
def test_each_shipped_space_fits_the_config_it_is_written_for(space_file, config_file):
    from neoray.configs import CONFIG_DIR
    from neoray.tune.space import check_space_against_config, relative_to_config

    cfg = load_config(CONFIG_DIR / config_file)
    space = relative_to_config(load_space(CONFIG_DIR / space_file), cfg)
    check_space_against_config(space, cfg)
    lr = optuna_distributions(space)["lr"]
    assert lr.low <= cfg.train.lr <= lr.high  # the config's own values are a point of the space
    assert 1 <= space.asha.grace_period < cfg.train.epochs
    assert space.trial_epochs is None or 1 <= space.trial_epochs < cfg.train.epochs


def test_a_space_without_early_stopping_has_no_rungs_and_a_gp_sampler_is_accepted(synthetic_shards):
    from neoray.config import load_config
    from neoray.tune.space import check_space_against_config, parse_space, relative_to_config

    cfg = load_config(None, [f"data.train={synthetic_shards['train']}", "train.epochs=2"])
    space = parse_space({"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}},
                         "asha": False, "search": {"sampler": "gp", "startup_trials": 3}})
    resolved = relative_to_config(space, cfg)
    assert not resolved.asha.enabled and resolved.asha.rungs == [] and resolved.sampler == "gp"
    check_space_against_config(resolved, cfg)  # no grace period to compare with the run
