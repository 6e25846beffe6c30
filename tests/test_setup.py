"""What the driver checks and resolves before anything runs on a worker (neoray.run.setup, neoray.cluster):
absolute paths, the model and its files, the shard manifests, and a run that fits the cluster."""

from __future__ import annotations

import json
import os
import shutil

import pytest
import yaml
from cli_output import one_line

from neoray.cli import main as neoray_main
from neoray.cluster import ClusterError, connect, plan, requested_address
from neoray.config import ConfigError, load_config
from neoray.run.setup import prepare_config


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
        prepare_config(load_config(None, ["train.batch_size=2", f"data.train={train}", f"data.val={empty_val}"]))
    with pytest.raises(ConfigError, match="data.val: .*other categories .* than data.train"):
        prepare_config(load_config(None, ["train.batch_size=2", f"data.train={train}", f"data.val={other_val}"]))
    assert prepare_config(load_config(None, ["train.batch_size=2", f"data.train={train}", "data.val="])).data.val == ""


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
        assert fragment in one_line(err)
    assert not (tmp_path / "runs").exists()


def test_connection_policy_never_joins_an_instance_it_was_not_told_about(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert requested_address(None) == "local"
    assert requested_address("auto") == "auto"
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # inside `ray job submit`
    assert requested_address(None) == "10.0.0.1:6379" and requested_address("local") == "local"


def test_an_unreachable_cluster_is_one_line(monkeypatch):
    import ray

    from neoray import cluster

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(cluster, "_check_reachable", lambda target, from_env: None)  # what ray.init then says
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


def test_too_few_training_images_for_one_batch_per_worker_is_refused(synthetic_shards):
    """24 training images: 4 workers x batch 8 would give every epoch no step at all."""
    with pytest.raises(ConfigError, match=r"data.train: 24 training images give each of the 4 workers 6, fewer "
                                          r"than train.batch_size=8"):
        prepare_config(_cfg(synthetic_shards, "train.workers=4", "train.batch_size=8"))
    with pytest.raises(ConfigError, match=r"10 training images \(data.max_train_images=10\) .* 2 workers 5"):
        prepare_config(_cfg(synthetic_shards, "train.workers=2", "train.batch_size=6", "data.max_train_images=10"))
    assert prepare_config(_cfg(synthetic_shards, "train.workers=4", "train.batch_size=6")).train.batch_size == 6


def test_resume_refuses_a_config_that_would_continue_another_experiment(synthetic_shards, tmp_path):
    from neoray.config import save_config
    from neoray.run.setup import check_resume

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    save_config(prepare_config(_cfg(synthetic_shards, "train.lr=1e-3")), run_dir / "config.yaml")
    allowed = []
    check_resume(prepare_config(_cfg(synthetic_shards, "train.lr=1e-3", "train.epochs=20", "train.workers=2")),
                 str(run_dir), log=allowed.append)
    assert "train.epochs=20 (was 10)" in allowed[0] and "train.workers=2 (was 1)" in allowed[0]
    for override, key in (("train.lr=3e-3", "train.lr"), ("model.name=fcos_r50", "model.name"),
                          ("data.hflip=0.0", "data.hflip"), ("model.options={hidden_dim: 64}", "model.options")):
        with pytest.raises(ConfigError, match=rf"--resume: the config differs from .*config.yaml in {key} ") as err:
            check_resume(prepare_config(_cfg(synthetic_shards, "train.lr=1e-3", override)), str(run_dir))
        assert "\n" not in str(err.value)
    with pytest.raises(ConfigError, match="not a neoray run directory"):
        check_resume(prepare_config(_cfg(synthetic_shards)), str(tmp_path / "nowhere"))


def test_autoscale_lets_neoray_train_wait_for_nodes(capsys):
    cfg = load_config(None, ["train.workers=4", "train.cpus_per_worker=2", "train.use_gpu=true"])
    with pytest.raises(ConfigError, match="the run needs 4 GPUs .* pass --autoscale to wait for new nodes"):
        plan(cfg, None, 1, {"CPU": 16, "GPU": 2}, nodes=[{"CPU": 16, "GPU": 2}], sweep=False)
    assert (
        plan(cfg, None, 1, {"CPU": 16, "GPU": 2}, nodes=[{"CPU": 16, "GPU": 2}], sweep=False, autoscale=True).gpus == 4
    )
    assert "workers that do not fit today's cluster" in capsys.readouterr().out


def test_an_interrupted_run_still_writes_its_summary(synthetic_shards, tmp_path, monkeypatch):
    import json

    from neoray.run import trainer

    class Interrupted:
        def fit(self):
            raise KeyboardInterrupt

    monkeypatch.setattr(trainer, "build_trainer", lambda *args, **kwargs: Interrupted())
    cfg = prepare_config(_cfg(synthetic_shards), output=str(tmp_path / "runs"))
    with pytest.raises(KeyboardInterrupt):
        trainer.train(cfg, verbose=False)
    (run_dir,) = (tmp_path / "runs").iterdir()
    assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "interrupted"


def test_the_visibility_check_removes_only_the_folders_it_made(ray_session, tmp_path):
    from neoray.cluster import check_visible_on_all_nodes

    (tmp_path / "shared" / "empty").mkdir(parents=True)  # the user's own empty folders stay
    output = tmp_path / "shared" / "empty" / "runs" / "today"
    check_visible_on_all_nodes({"--output": str(output)})
    assert (tmp_path / "shared" / "empty").is_dir() and not (tmp_path / "shared" / "empty" / "runs").exists()
    output.mkdir(parents=True)
    check_visible_on_all_nodes({"--output": str(output)})
    assert output.is_dir() and not list(output.iterdir())  # an existing output keeps no marker


def test_the_umask_is_read_without_changing_it(monkeypatch):
    """Setting the umask to read it back would give files that other threads create meanwhile mode 0666."""
    from neoray import storage

    previous = os.umask(0o027)
    try:
        monkeypatch.setattr(os, "umask", lambda mask: pytest.fail("umask changed"))
        assert storage.umask_mode() == 0o640
    finally:
        monkeypatch.undo()
        os.umask(previous)
