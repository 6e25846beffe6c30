"""Config: strict keys with suggestions, overrides, type coercion, 16:9 validation, round trip."""

from __future__ import annotations

from pathlib import Path

import pytest

from neoray.config import ConfigError, is_16_9, load_config, nearest_16_9, parse_size, save_config


def test_defaults_validate_and_are_16_9():
    cfg = load_config()
    assert is_16_9(*cfg.data.size)
    assert cfg.effective_batch == cfg.train.batch_size * cfg.train.accumulate * cfg.train.workers


def test_misspelled_key_names_key_and_suggestion(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr_warmup_epochs: 3\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    message = str(err.value)
    assert "train.lr_warmup_epochs" in message and "warmup_steps" in message and str(path) in message
    assert "\n" not in message


def test_unknown_section_and_top_level_key():
    with pytest.raises(ConfigError, match="'trian'.*'train'"):
        load_config(None, {"trian.lr": 1.0})


def test_overrides_are_typed():
    cfg = load_config(None, ["train.lr=3e-4", "train.epochs=2", "train.use_gpu=true",
                             "data.size=640x360", "data.multiscale=[576x324, 704x396]"])
    assert cfg.train.lr == pytest.approx(3e-4) and cfg.train.epochs == 2 and cfg.train.use_gpu is True
    assert cfg.data.size == (640, 360)
    assert cfg.data.multiscale == [(576, 324), (704, 396)]


@pytest.mark.parametrize("override, fragment", [
    ("train.epochs=two", "train.epochs: expected an integer"),
    ("train.epochs=1.5", "train.epochs: expected an integer"),
    ("train.use_gpu=maybe", "train.use_gpu: expected true or false"),
    ("train.optimizer=lamb", "train.optimizer must be adamw or sgd"),
    ("data.multiscale=[640x480]", "data.multiscale: 640x480 is not 16:9"),
    ("train.accumulate=0", "train.accumulate must be >= 1"),
    ("train.milestones=0.5,abc", "train.milestones: 'abc' is neither a fraction"),
    ("train.milestones=[0.5, 1.5]", "train.milestones: 1.5 is neither"),
    ("train.milestones=[-0.25]", "train.milestones: -0.25 is neither"),
    ("train.backbone_lr_mult=-0.1", "train.backbone_lr_mult must be >= 0"),
    ("train.backbone_lr_mult=half", "train.backbone_lr_mult: expected a number, got 'half' .or auto"),
    ("train.cpus_per_worker=0", "train.cpus_per_worker must be > 0"),
    ("train.early_stop_patience=-1", "train.early_stop_patience must be >= 0"),
    ("train.max_oom_per_epoch=-1", "train.max_oom_per_epoch must be >= 0"),
    ("train.lr=.inf", "train.lr: expected a finite number"),
    ("train.weight_decay=.nan", "train.weight_decay: expected a finite number"),
    ("data.hflip=-.inf", "data.hflip: expected a finite number"),
    ("train.placement=scatter", "train.placement must be pack or spread"),
])
def test_bad_values_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")):
        load_config(None, [override])


@pytest.mark.parametrize("override, fragment", [
    ("data.mosaic=1.5", "data.mosaic must be in [0, 1]"),
    ("data.mixup=-0.1", "data.mixup must be in [0, 1]"),
    ("data.mixup=often", "data.mixup: expected a number"),
    ("data.zoom=[1.5, 0.5]", "data.zoom: expected [min, max] scale factors with 0 < min <= max <= 4"),
    ("data.zoom=[0, 1.5]", "data.zoom: expected [min, max]"),
    ("data.zoom=[0.5, 8]", "data.zoom: expected [min, max]"),
    ("data.zoom=[0.5]", "data.zoom: expected [min, max]"),
    ("data.zoom=0.5,big", "data.zoom: expected [min, max]"),
    ("data.zoom=[true, 1.5]", "data.zoom: expected [min, max]"),
    ("data.strong_aug_until=-1", "data.strong_aug_until: -1.0 is neither 0"),
    ("data.strong_aug_until=2.5", "data.strong_aug_until: 2.5 is neither 0"),
])
def test_bad_strong_augmentation_values_are_refused(override, fragment):
    with pytest.raises(ConfigError, match=fragment.replace("[", r"\[")) as err:
        load_config(None, [override])
    assert "\n" not in str(err.value)


def test_strong_augmentations_are_off_by_default_and_parse_from_the_command_line():
    data = load_config().data
    assert (data.mosaic, data.mixup, data.zoom, data.strong_aug_until) == (0.0, 0.0, [], 0.0)
    data = load_config(None, ["data.mosaic=0.5", "data.mixup=0.2", "data.zoom=0.5,1.5",
                              "data.strong_aug_until=0.9"]).data
    assert (data.mosaic, data.mixup, data.zoom, data.strong_aug_until) == (0.5, 0.2, [0.5, 1.5], 0.9)
    assert load_config(None, ["data.zoom=[0.75, 1.25]", "data.strong_aug_until=12"]).data.zoom == [0.75, 1.25]


def test_milestones_from_the_command_line_are_numbers():
    # `train.milestones=0.5,0.75` reaches the config as the string "0.5,0.75": the schedule needs numbers.
    cfg = load_config(None, ["train.schedule=multistep", "train.milestones=0.5,0.75"])
    assert cfg.train.milestones == [0.5, 0.75]
    assert load_config(None, ["train.milestones=3000,4000.0"]).train.milestones == [3000, 4000]
    from neoray.engine.optim import lr_at

    assert lr_at(cfg.train, 100, 60) == pytest.approx(cfg.train.lr * cfg.train.gamma)


@pytest.mark.parametrize("overrides, expected", [
    ([], 1.0),  # rtdetr_cpu from scratch: the backbone learns at the head's LR
    (["model.backbone_weights=imagenet"], 0.1),
    (["model.init_from=runs/coco/checkpoint.pt"], 0.1),  # a whole pretrained detector, its backbone included
    (["train.backbone_lr_mult=auto", "model.backbone_weights=weights/trunk.pth"], 0.1),
    (["train.backbone_lr_mult=0.3"], 0.3),  # a value the user writes is kept, pretrained or not
    (["train.backbone_lr_mult=0.3", "model.backbone_weights=imagenet"], 0.3),
])
def test_the_backbone_lr_share_follows_whether_the_backbone_is_pretrained(overrides, expected):
    assert load_config(overrides=overrides).train.backbone_lr_mult == pytest.approx(expected)


def test_the_shipped_from_scratch_configs_train_the_backbone_at_the_full_lr_and_the_pretrained_at_a_tenth():
    configs = Path(__file__).resolve().parents[1] / "neoray" / "configs"
    assert load_config(configs / "synthetic_cpu.yaml").train.backbone_lr_mult == 1.0
    for name in ("coco_r50_8gpu.yaml", "coco_finetune_r50vd_1920x1080.yaml"):
        assert load_config(configs / name).train.backbone_lr_mult == pytest.approx(0.1), name


def test_a_resolved_backbone_lr_share_survives_the_round_trip(tmp_path):
    save_config(load_config(), tmp_path / "run.yaml")
    assert load_config(tmp_path / "run.yaml", ["model.backbone_weights=imagenet"]).train.backbone_lr_mult == 1.0


def test_non_16_9_size_names_nearest_sizes():
    with pytest.raises(ConfigError) as err:
        parse_size("640x480", "data.size")
    assert "640x360" in str(err.value) and "848x477" in str(err.value)
    for w, h in nearest_16_9(1920, 1088):
        assert is_16_9(w, h)
    assert nearest_16_9(1920, 1088)[0] == (1920, 1080)


def test_save_and_reload_round_trip(tmp_path):
    cfg = load_config(None, ["train.lr=0.002", "data.multiscale=[288x162,320x180]", "model.options={hidden_dim: 64}"])
    save_config(cfg, tmp_path / "config.yaml")
    again = load_config(tmp_path / "config.yaml")
    assert again == cfg
    assert not list(tmp_path.glob("*.tmp"))


def test_with_overrides_returns_a_validated_copy():
    cfg = load_config()
    assert cfg.with_overrides({"train.lr": 0.5}).train.lr == 0.5 and cfg.train.lr != 0.5
    with pytest.raises(ConfigError):
        cfg.with_overrides(["train.batch_size=0"])


def test_broken_yaml_is_one_line(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("train: [unclosed\n")
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "\n" not in str(err.value)


@pytest.mark.parametrize("encoding", ["utf-16", "latin-1"])
def test_config_not_in_utf8_is_one_line(tmp_path, encoding):
    path = tmp_path / "config.yaml"
    path.write_bytes("name: caf\u00e9\ntrain: {epochs: 2}\n".encode(encoding))
    with pytest.raises(ConfigError) as err:
        load_config(path)
    assert str(path) in str(err.value) and "UTF-8" in str(err.value) and "\n" not in str(err.value)


def test_config_that_is_a_directory_or_missing_is_one_line(tmp_path):
    with pytest.raises(ConfigError, match="cannot read the config file \\(is a directory\\)"):
        load_config(tmp_path)
    with pytest.raises(ConfigError, match="config file not found"):
        load_config(tmp_path / "nope.yaml")


def test_config_is_read_from_object_storage(s3_bucket):
    from neoray import storage

    storage.write_text(f"{s3_bucket}/best_config.yaml", "train: {epochs: 7}\n")
    assert load_config(f"{s3_bucket}/best_config.yaml").train.epochs == 7
