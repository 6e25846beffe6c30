"""What the driver checks and resolves before anything runs on a worker (neoray.engine.setup, neoray.cluster):
absolute paths, the model and its files, the shard manifests, and a run that fits the cluster."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml

from neoray.cli import main as neoray_main
from neoray.cluster import ClusterError, connect, plan, requested_address
from neoray.config import ConfigError, load_config
from neoray.engine.setup import prepare_config


def _cfg(shards, *overrides):
    return load_config(None, [f"data.train={shards['train']}", f"data.val={shards['val']}", "data.size=160x90",
                              *overrides])


def test_relative_paths_become_absolute_against_the_callers_directory(synthetic_shards, tmp_path, monkeypatch):
    work = tmp_path / "work"
    shutil.copytree(synthetic_shards["train"], work / "shards" / "train")
    shutil.copytree(synthetic_shards["val"], work / "shards" / "val")
    monkeypatch.chdir(work)
    cfg = prepare_config(load_config(None, ["data.train=shards/train", "data.val=./shards/val", "output=runs"]))
    assert cfg.data.train == str(work / "shards" / "train") and cfg.data.val == str(work / "shards" / "val")
    assert cfg.output == str(work / "runs")
    assert prepare_config(cfg, output="elsewhere").output == str(work / "elsewhere")


@pytest.mark.parametrize("override, fragment", [
    ("model.name=rtdetr_tiny", "unknown model 'rtdetr_tiny'"),
    ("model.options={foo: 1}", "unknown option"),
    ("model.backbone_weights=missing.pth", "model.backbone_weights: .*missing.pth not found"),
    ("model.init_from=nowhere/checkpoint.pt", "model.init_from: .*nowhere/checkpoint.pt not found"),
])
def test_model_and_weight_files_are_checked_before_ray(synthetic_shards, override, fragment):
    with pytest.raises(ConfigError, match=fragment) as err:
        prepare_config(_cfg(synthetic_shards, override))
    assert "\n" not in str(err.value)


def _prepare(tmp_path, name, categories, annotations, images=2):
    import cv2
    import numpy as np

    from neoray.data.prepare import prepare_coco

    root = tmp_path / name
    (root / "images").mkdir(parents=True)
    image_list = []
    for i in range(1, images + 1):
        cv2.imwrite(str(root / "images" / f"{i}.jpg"), np.full((36, 64, 3), 100, np.uint8))
        image_list.append({"id": i, "file_name": f"{i}.jpg", "width": 64, "height": 36})
    (root / "ann.json").write_text(json.dumps({"images": image_list, "annotations": annotations,
                                               "categories": categories}))
    prepare_coco(root / "ann.json", root / "images", root / "shards", size=(64, 36), workers=1)
    return root / "shards"


def test_validation_shards_without_boxes_or_with_other_categories_are_refused(tmp_path):
    cats = [{"id": 1, "name": "car"}, {"id": 2, "name": "person"}]
    box = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [2, 2, 20, 10]}]
    train = _prepare(tmp_path, "train", cats, box)
    empty_val = _prepare(tmp_path, "empty_val", cats, [])
    other_val = _prepare(tmp_path, "other_val", [{"id": 1, "name": "car"}, {"id": 3, "name": "dog"}], box)
    with pytest.raises(ConfigError, match=r"data.val: .*empty_val/shards holds no boxes.*data.val= to train without"):
        prepare_config(load_config(None, [f"data.train={train}", f"data.val={empty_val}"]))
    with pytest.raises(ConfigError, match="data.val: .*other categories .* than data.train"):
        prepare_config(load_config(None, [f"data.train={train}", f"data.val={other_val}"]))
    assert prepare_config(load_config(None, [f"data.train={train}", "data.val="])).data.val == ""


def test_a_run_that_leaves_ray_data_no_cpu_is_refused():
    cfg = load_config(None, ["train.workers=2", "train.cpus_per_worker=2"])
    with pytest.raises(ConfigError, match=r"the run needs 4 CPUs .* plus 1 for Ray Data, but the cluster has 4"):
        plan(cfg, None, 1, {"CPU": 4}, nodes=[{"CPU": 4}], sweep=False)
    assert plan(cfg, None, 1, {"CPU": 5}, nodes=[{"CPU": 5}], sweep=False).cpus == 4


def test_train_command_refuses_what_cannot_run_with_one_line_and_no_run_directory(
        ray_session, synthetic_shards, tmp_path, capsys):
    """The session's Ray has 4 CPUs: 2 workers x 2 CPUs would leave Ray Data none and wait forever."""
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "runs")}))
    base = [f"data.train={synthetic_shards['train']}", f"data.val={synthetic_shards['val']}", "data.size=160x90"]
    for extra, fragment in ((["train.workers=2", "train.cpus_per_worker=2"], "plus 1 for Ray Data"),
                            (["model.name=rtdetr_tiny"], "unknown model 'rtdetr_tiny'")):
        assert neoray_main(["train", str(config), *base, *extra]) == 1
        err = capsys.readouterr().err.strip()
        assert fragment in err and len(err.splitlines()) == 1
    assert not (tmp_path / "runs").exists()


def test_connection_policy_never_joins_an_instance_it_was_not_told_about(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert requested_address(None) == "local"
    assert requested_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # inside `ray job submit`
    assert requested_address(None) == "10.0.0.1:6379" and requested_address("local") == "local"


def test_an_unreachable_cluster_is_one_line(monkeypatch):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(ConnectionError("no cluster there")))
    with pytest.raises(ClusterError, match="--address auto: no Ray instance runs on this machine"):
        connect("auto", log=None)
    with pytest.raises(ClusterError, match="cannot connect to the Ray cluster at 10.9.9.9:1: no cluster there"):
        connect("10.9.9.9:1", log=None)


def test_written_run_files_have_the_umask_mode(tmp_path):
    from neoray import storage
    from neoray.config import save_config

    previous = os.umask(0o022)
    try:
        save_config(load_config(None), tmp_path / "config.yaml")
        storage.write_json(tmp_path / "metrics.json", [])
    finally:
        os.umask(previous)
    for name in ("config.yaml", "metrics.json"):
        assert (tmp_path / name).stat().st_mode & 0o777 == 0o644, name
