"""Hostile input a user can hand neoray: each is refused or skipped in one line, within a bounded time and a
bounded amount of memory, and never ends in a traceback."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
import yaml
from cli_output import one_line
from safetensors.torch import save_file
from test_eval_cli import save_checkpoint
from test_prepare import _png_bomb
from test_pretrained import huggingface_config

from neoray import cluster, storage
from neoray.cli import main
from neoray.config import MAX_SIZE, ConfigError, load_config, parse_size
from neoray.data import sources as src
from neoray.data.prepare import prepare_coco
from neoray.data.shards import ManifestError, read_manifest
from neoray.data.synth import write_synthetic_dataset
from neoray.evaluation.coco_eval import CocoEvaluator
from neoray.models import PretrainedError, describe_pretrained
from neoray.run import rundir
from neoray.run.setup import check_cluster, check_resume, prepare_config

SIZE = (160, 90)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()



def _synth(tmp_path: Path, n: int = 4) -> tuple[Path, Path]:
    out = write_synthetic_dataset(tmp_path / "src", train=n, val=0, size=SIZE, classes=3, seed=0)
    return out["train_annotations"], out["train_images"]


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]  # nothing listens there once the socket is closed


@contextlib.contextmanager
def _silent_server():
    """A TCP server on 127.0.0.1 that accepts every connection and never answers; yields its port."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held, stop = [], threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            with contextlib.suppress(OSError):
                held.append(server.accept()[0])

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    try:
        yield server.getsockname()[1]
    finally:
        stop.set()
        thread.join(5)
        for conn in held:
            conn.close()
        server.close()


# ----------------------------------------------------------------------------------------------------
# 1. Nothing waits forever on a store or a cluster that does not answer
# ----------------------------------------------------------------------------------------------------


def _check_silent_store(budget: str | None) -> float:
    """``neoray check`` of shards on a store that accepts connections and never answers; returns the seconds to
    its one line, which names the file and the endpoint."""
    with _silent_server() as port:
        env = {**os.environ, "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}"}
        env.pop("NEORAY_STORAGE_TIMEOUT_S", None)
        if budget:
            env["NEORAY_STORAGE_TIMEOUT_S"] = budget
        start = time.monotonic()
        proc = subprocess.run([sys.executable, "-m", "neoray.cli", "check", "s3://silent-bucket/shards"], env=env,
                              capture_output=True, text=True, timeout=120)
        elapsed = time.monotonic() - start
    line = one_line(proc.stderr)
    assert proc.returncode == 1 and "s3://silent-bucket/shards/_manifest.json" in line
    assert f"no answer from http://127.0.0.1:{port}" in line and "NEORAY_STORAGE_TIMEOUT_S" in line
    return elapsed


def test_a_silent_object_store_fails_in_one_line_naming_the_endpoint_within_the_budget_it_is_given():
    assert _check_silent_store("3") < 3 + 10  # the budget, and the command's own start


@pytest.mark.slow
def test_a_silent_object_store_fails_within_about_30_s_by_default():
    assert _check_silent_store(None) < 30 + 10  # it was over 90 s: three tries of a 30-s request timeout


def test_the_storage_budget_comes_from_the_environment_and_bad_values_areone_line(monkeypatch):
    monkeypatch.setenv("NEORAY_STORAGE_TIMEOUT_S", "12")
    options = storage.resolve(f"s3://b-{uuid.uuid4().hex[:8]}/key")[0].__reduce__()[1][0]
    # Three tries, each allowed a sixth of the budget to connect and a sixth for a byte: never more in all.
    assert (options["connect_timeout"], options["request_timeout"]) == (2.0, 2.0)
    assert options["endpoint_override"] == os.environ["AWS_ENDPOINT_URL"]  # AWS_* variables still apply
    monkeypatch.setenv("NEORAY_STORAGE_TIMEOUT_S", "soon")
    with pytest.raises(storage.StorageError, match="NEORAY_STORAGE_TIMEOUT_S: expected a positive number"):
        storage.resolve("s3://another-bucket/key")


def test_a_stale_ray_address_fails_in_one_line_naming_it_without_waiting(monkeypatch):
    import ray

    def never(**kwargs):
        raise AssertionError("ray.init must not wait on an address where nothing listens")

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", never)
    address = f"127.0.0.1:{_closed_port()}"
    start = time.monotonic()
    for given in (address, f"ray://{address}"):
        with pytest.raises(cluster.ClusterError, match=f"cannot connect to the Ray cluster at {given}: ") as err:
            cluster.connect(given, log=None)
        assert "\n" not in str(err.value)
    monkeypatch.setenv("RAY_ADDRESS", address)
    with pytest.raises(cluster.ClusterError, match=f"at {address} .*RAY_ADDRESS"):
        cluster.connect(None, log=None)
    assert time.monotonic() - start < 30


def test_prepare_train_and_sweep_refuse_a_stale_ray_address_inone_line(tmp_path, monkeypatch, synthetic_shards):
    import ray

    monkeypatch.setattr(ray, "is_initialized", lambda: False)
    monkeypatch.setattr(ray, "init", lambda **kwargs: (_ for _ in ()).throw(AssertionError("ray.init called")))
    address = f"127.0.0.1:{_closed_port()}"
    ann, images = _synth(tmp_path, n=2)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "runs")}))
    data = [f"data.train={synthetic_shards['train']}", f"data.val={synthetic_shards['val']}", "data.size=160x90"]
    start = time.monotonic()
    monkeypatch.setenv("RAY_ADDRESS", address)
    code, _, err = run_cli(["prepare", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "o"),
                            "--size", "160x90"])
    assert code == 1 and address in one_line(err) and "RAY_ADDRESS" in err
    monkeypatch.delenv("RAY_ADDRESS")
    code, _, err = run_cli(["train", str(config), *data, "--address", address])
    assert code == 1 and address in one_line(err)
    code, _, err = run_cli(["sweep", "--config", str(config), "--output", str(tmp_path / "sweeps"),
                            "--num-samples", "1", "--address", address, *data])
    assert code == 1 and address in one_line(err)
    assert time.monotonic() - start < 60
    assert not (tmp_path / "runs").exists()


# ----------------------------------------------------------------------------------------------------
# 2. One bad file name is one skip
# ----------------------------------------------------------------------------------------------------


def test_a_coco_file_name_that_is_not_utf8_is_one_reported_skip_and_every_other_image_is_written(tmp_path):
    ann, images = _synth(tmp_path)
    coco = json.loads(ann.read_text())
    coco["images"][0]["file_name"] = "bad\udcff.jpg"  # json.dumps writes it as the escape \udcff
    n_anns = sum(a["image_id"] == coco["images"][0]["id"] for a in coco["annotations"])
    ann.write_text(json.dumps(coco))
    result = prepare_coco(ann, images, tmp_path / "out", size=SIZE, workers=1)
    [entry] = result.report
    assert (entry["reason"], entry["action"]) == (src.FILE_NAME_NOT_UTF8, src.SKIP_IMAGE)
    assert entry["file_name"] == "bad\\udcff.jpg"  # printable, and valid UTF-8 in _report.json
    assert result.manifest["skipped"]["images"] == {src.FILE_NAME_NOT_UTF8: 1}
    assert result.manifest["skipped"]["annotations"] == {src.IMAGE_SKIPPED: n_anns}
    assert result.counts["images_written"] == len(coco["images"]) - 1
    json.loads((tmp_path / "out" / "_report.json").read_bytes().decode("utf-8"))


def test_a_yolo_image_whose_name_is_not_utf8_is_one_reported_skip(tmp_path):
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [thing]\ntrain: images/train\nval: images/train\n")
    jpeg = cv2.imencode(".jpg", np.full((36, 64, 3), 90, np.uint8))[1].tobytes()
    for name in (b"a", b"b", b"bad\xff", b"new\nline"):  # bytes paths: the name is not text
        (root / "images" / "train" / os.fsdecode(name + b".jpg")).write_bytes(jpeg)
        (root / "labels" / "train" / os.fsdecode(name + b".txt")).write_bytes(b"0 0.5 0.5 0.25 0.25\n")
    code, out, err = run_cli(["prepare", "--yolo", str(root), "--out", str(tmp_path / "out"), "--size", "64x36",
                              "--workers", "1"])
    assert code == 0, err
    report = json.loads((tmp_path / "out" / "_report.json").read_bytes().decode("utf-8"))
    assert [(e["file_name"], e["reason"]) for e in report] == [("bad\\xff.jpg", src.FILE_NAME_NOT_UTF8)]
    manifest = read_manifest(tmp_path / "out")
    assert manifest["skipped"]["images"] == {src.FILE_NAME_NOT_UTF8: 1}
    assert manifest["counts"]["images_written"] == 3 and manifest["num_boxes"] == 3  # "new\nline.jpg" too
    # Its label line is counted, skipped with the image: annotations in = written + skipped.
    assert manifest["skipped"]["annotations"] == {src.IMAGE_SKIPPED: 1}
    assert (manifest["counts"]["annotations_in"], manifest["counts"]["annotations_skipped"]) == (4, 1)


def test_a_yolo_label_file_that_is_not_text_skips_its_image_with_its_lines_counted(tmp_path):
    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("names: [thing]\ntrain: images/train\nval: images/train\n")
    jpeg = cv2.imencode(".jpg", np.full((36, 64, 3), 90, np.uint8))[1].tobytes()
    for name, label in (("a", b"0 0.5 0.5 0.25 0.25\n"), ("b", b"0 0.5 0.5 0.2 0.2\n\xff 0.1 0.1 0.1 0.1\n\n")):
        (root / "images" / "train" / f"{name}.jpg").write_bytes(jpeg)
        (root / "labels" / "train" / f"{name}.txt").write_bytes(label)
    code, _, err = run_cli(["prepare", "--yolo", str(root), "--out", str(tmp_path / "out"), "--size", "64x36",
                            "--workers", "1"])
    assert code == 0, err
    manifest = read_manifest(tmp_path / "out")
    assert manifest["skipped"]["images"] == {src.LABEL_FILE_UNREADABLE: 1}
    assert manifest["skipped"]["annotations"] == {src.IMAGE_SKIPPED: 2}
    assert (manifest["counts"]["annotations_in"], manifest["num_boxes"]) == (3, 1)


def test_a_category_name_that_is_not_utf8_is_one_line_naming_the_record(tmp_path, capsys):
    ann, images = _synth(tmp_path)
    coco = json.loads(ann.read_text())
    coco["categories"][1]["name"] = "\ud800"
    ann.write_text(json.dumps(coco))
    assert main(["prepare", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--size", "160x90"]) == 1
    line = one_line(capsys.readouterr().err)
    assert str(ann) in line and "categories[1]" in line and "'name'" in line


# ----------------------------------------------------------------------------------------------------
# 3. Exceptions that used to escape the one-line errors
# ----------------------------------------------------------------------------------------------------


def _deep_json(depth: int = 200_000) -> str:
    return '{"images": ' + "[" * depth + "]" * depth + "}"


def test_deeply_nested_json_is_one_line_naming_the_file(tmp_path, capsys):
    deep = tmp_path / "deep.json"
    deep.write_text(_deep_json())
    with pytest.raises(ValueError, match=f"{deep}: not valid JSON .*nested"):
        storage.read_json(deep)
    ann, images = _synth(tmp_path)
    ann.write_text(_deep_json())
    assert main(["prepare", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--size", "160x90"]) == 1
    assert str(ann) in one_line(capsys.readouterr().err)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "_manifest.json").write_text(_deep_json())
    with pytest.raises(ManifestError, match="_manifest.json: not valid JSON"):
        read_manifest(shards)
    evaluator = CocoEvaluator([{"id": 1, "name": "a", "label": 0}], gt_json=deep)  # neoray eval --gt-json
    with pytest.raises(ValueError, match=f"{deep}: not valid JSON"):
        evaluator._load_gt({})


def _huggingface_folder(folder: Path, config: dict | str, weights: bytes | None = None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(config if isinstance(config, str) else json.dumps(config))
    if weights is None:
        save_file({"x": torch.zeros(64)}, str(folder / "model.safetensors"))
    else:
        (folder / "model.safetensors").write_bytes(weights)
    return folder


def test_a_deeply_nested_huggingface_config_is_one_line_naming_it(tmp_path, synthetic_shards):
    folder = _huggingface_folder(tmp_path / "hf", _deep_json())
    with pytest.raises(PretrainedError, match=f"{folder / 'config.json'}: not valid JSON"):
        describe_pretrained(folder)
    with pytest.raises(ConfigError, match=r"model.init_from: .*config.json: not valid JSON") as err:
        prepare_config(load_config(None, [f"data.train={synthetic_shards['train']}", "data.size=160x90",
                                          f"model.init_from={folder}"]))
    assert "\n" not in str(err.value)
    code, _, err_text = run_cli(["predict", str(folder), str(tmp_path / "x.jpg"), "--out", str(tmp_path / "d"),
                                 "--size", "160x90"])
    assert code == 1 and "config.json" in one_line(err_text)


@pytest.mark.parametrize("config", ["[1, 2]", json.dumps(huggingface_config(d_model=[256])),
                                    json.dumps(huggingface_config(backbone_config=[1])),
                                    json.dumps(huggingface_config(encode_proj_layers=2))])
def test_a_huggingface_config_of_the_wrong_shape_isone_line(tmp_path, config):
    folder = _huggingface_folder(tmp_path / "hf", config)
    with pytest.raises(PretrainedError, match="config.json: ") as err:
        describe_pretrained(folder)
    assert "\n" not in str(err.value)


@pytest.fixture(scope="module")
def checkpoint(synthetic_shards, tmp_path_factory) -> Path:
    categories = read_manifest(synthetic_shards["val"])["categories"]
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "epoch_1", categories)


def test_predict_refuses_an_output_folder_it_cannot_write_before_predicting(checkpoint, tmp_path, monkeypatch):
    from neoray.commands import predict

    image = tmp_path / "a.png"
    cv2.imwrite(str(image), np.full((90, 160, 3), 80, np.uint8))
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    monkeypatch.setattr(predict, "predict_image", lambda *a, **k: pytest.fail("predicted into a folder it cannot "
                                                                              "write"))
    for out in (blocker, blocker / "drawn"):
        code, _, err = run_cli(["predict", str(checkpoint), str(image), "--out", str(out)])
        assert code == 1 and str(out) in one_line(err)


# ----------------------------------------------------------------------------------------------------
# 4. Memory bounded by what the input declares
# ----------------------------------------------------------------------------------------------------


def test_predict_refuses_a_decompression_bomb_and_still_draws_the_other_images(checkpoint, tmp_path, monkeypatch):
    from neoray.data import image_files

    bomb = tmp_path / "bomb.png"
    bomb.write_bytes(_png_bomb(10_000, 10_000))
    good = tmp_path / "good.png"
    cv2.imwrite(str(good), np.full((90, 160, 3), 80, np.uint8))
    real_imdecode, bomb_size = cv2.imdecode, bomb.stat().st_size

    def imdecode(buffer, flags):
        assert len(buffer) != bomb_size, "the bomb was decoded"
        return real_imdecode(buffer, flags)

    monkeypatch.setattr(image_files.cv2, "imdecode", imdecode)
    code, out, err = run_cli(["predict", str(checkpoint), str(bomb), str(good), "--out", str(tmp_path / "d")])
    assert code == 1
    line = one_line(err)
    assert str(bomb) in line and "10000x10000" in line
    assert "1 image(s)" in out and "1 unreadable" in out
    assert [p.name for p in (tmp_path / "d").iterdir()] == ["good.png"]


def test_sizes_above_8k_are_refused_in_one_line_wherever_they_come_in(tmp_path, capsys):
    assert MAX_SIZE == (8192, 4608) and parse_size("8192x4608") == (8192, 4608)
    with pytest.raises(ConfigError, match=r"--size: 100000x56250 is larger than 8192x4608"):
        parse_size("100000x56250", "--size")
    for override in ("data.size=100000x56250", "data.multiscale=[320x180,16384x9216]"):
        with pytest.raises(ConfigError, match="larger than 8192x4608"):
            load_config(None, [override])
    ann, images = _synth(tmp_path, n=2)
    assert main(["prepare", "--coco", str(ann), "--images", str(images), "--out", str(tmp_path / "o"),
                 "--size", "100000x56250"]) == 1
    assert "larger than 8192x4608" in one_line(capsys.readouterr().err)
    assert main(["synth", str(tmp_path / "s"), "--train", "1", "--val", "0", "--size", "40000x30000"]) == 1
    assert "larger than" in one_line(capsys.readouterr().err)
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "_manifest.json").write_text(json.dumps({
        "format": "neoray-shards", "version": 1, "size": [100000, 56250], "categories": [], "shards": [],
        "num_images": 0, "num_boxes": 0}))
    with pytest.raises(ManifestError, match="larger than 8192x4608"):
        read_manifest(shards)


@pytest.mark.parametrize("field, value", [("d_model", 10 ** 9), ("encoder_ffn_dim", 10 ** 8), ("num_queries", 10 ** 7),
                                          ("decoder_layers", 10 ** 5), ("num_labels", 10 ** 8),
                                          ("encoder_attention_heads", 0), ("d_model", "wide")])
def test_a_huggingface_config_declaring_absurd_sizes_is_refused_naming_the_field(tmp_path, field, value):
    config = huggingface_config()
    if field == "num_labels":
        config.pop("id2label")  # the class count then comes from num_labels
    config[field] = value
    folder = _huggingface_folder(tmp_path / "hf", config)
    with pytest.raises(PretrainedError, match=f"config.json: {field} ") as err:
        describe_pretrained(folder)
    assert "\n" not in str(err.value)


def test_a_config_error_prints_a_bounded_summary_of_a_yaml_alias_bomb(tmp_path):
    # Six levels of ten aliases: a million strings when printed whole, a few lines of YAML.
    levels = ["    - &l0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 6)]
    config = tmp_path / "bomb.yaml"
    config.write_text("train:\n  epochs:\n" + "\n".join(levels) + "\n")
    start = time.monotonic()
    with pytest.raises(ConfigError) as err:
        load_config(config)
    assert time.monotonic() - start < 5
    assert "train.epochs: expected an integer" in str(err.value) and len(str(err.value)) < 300


# ----------------------------------------------------------------------------------------------------
# 5. Checked before Ray
# ----------------------------------------------------------------------------------------------------


def _cfg(shards, *overrides):
    return load_config(None, [f"data.train={shards['train']}", f"data.val={shards['val']}", "data.size=160x90",
                              *overrides])


def _truncated_safetensors() -> bytes:
    from safetensors.torch import save

    return save({"x": torch.zeros(4096)})[:-1000]


def test_weight_files_that_cannot_be_read_are_refused_before_ray(synthetic_shards, tmp_path):
    truncated_hf = _huggingface_folder(tmp_path / "hf", huggingface_config(), _truncated_safetensors())
    broken_pth = tmp_path / "broken.pth"
    buffer = io.BytesIO()
    torch.save({"conv.weight": torch.zeros(64, 3, 3, 3)}, buffer)
    broken_pth.write_bytes(buffer.getvalue()[:-500])
    cases = [("model.backbone_weights=/dev/zero", "model.backbone_weights: /dev/zero: not a regular file"),
             (f"model.backbone_weights={broken_pth}", f"model.backbone_weights: {broken_pth}: cannot read it"),
             (f"model.backbone_weights={truncated_hf}", "model.backbone_weights: .*model.safetensors: truncated"),
             (f"model.init_from={truncated_hf}", "model.init_from: .*model.safetensors: truncated")]
    for override, fragment in cases:
        with pytest.raises(ConfigError, match=fragment) as err:
            prepare_config(_cfg(synthetic_shards, override))
        assert "\n" not in str(err.value)


def test_an_output_that_is_a_file_is_refused_before_ray(synthetic_shards, tmp_path, monkeypatch):
    from neoray.commands import train as train_command
    from neoray.tune import sweep as sweep_module

    blocker = tmp_path / "runs.txt"
    blocker.write_text("a file")
    for output in (blocker, blocker / "below"):
        with pytest.raises(ConfigError, match=f"--output: {output} .*file"):
            prepare_config(_cfg(synthetic_shards), output=str(output))
    monkeypatch.setattr(train_command, "connect", lambda *a, **k: pytest.fail("connected to Ray"))
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    data = [f"data.train={synthetic_shards['train']}", f"data.val={synthetic_shards['val']}", "data.size=160x90"]
    code, _, err = run_cli(["train", str(config), *data, "--output", str(blocker)])
    assert code == 1 and f"--output: {blocker}" in one_line(err)
    # The sweep's --output reaches the driver's checks with the sweep directory under it.
    info = cluster.ClusterInfo("local", "started", 1, 4.0, 0.0)
    with pytest.raises(ConfigError, match=f"--output: {blocker / 'sweep_lr'} .*file"):
        check_cluster(_cfg(synthetic_shards), info, str(blocker / "sweep_lr"))
    monkeypatch.setattr(sweep_module, "connect", lambda *a, **k: info)
    code, _, err = run_cli(["sweep", "--config", str(config), "--output", str(blocker), "--num-samples", "1", *data])
    assert code == 1 and str(blocker) in one_line(err) and "file" in err


def test_resume_does_not_need_backbone_weights_the_checkpoint_replaces(synthetic_shards, tmp_path, monkeypatch):
    from neoray.commands import train as train_command

    weights = tmp_path / "backbone.pth"
    torch.save({"conv.weight": torch.zeros(4, 3, 3, 3)}, weights)
    cfg = prepare_config(_cfg(synthetic_shards, f"model.backbone_weights={weights}", f"output={tmp_path / 'runs'}"))
    run_dir = tmp_path / "runs" / "r"
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    (run_dir / "checkpoints.json").write_text(json.dumps({"latest": {"path": "ray/c", "epoch": 1}}))
    save_checkpoint(run_dir / "ray" / "c", read_manifest(synthetic_shards["train"])["categories"])  # read before Ray
    weights.unlink()
    resumed = prepare_config(load_config(run_dir / "config.yaml"), resume=True)
    check_resume(resumed, str(run_dir))
    with pytest.raises(ConfigError, match="model.backbone_weights: .*not found"):
        prepare_config(load_config(run_dir / "config.yaml"))  # a new run reads them
    monkeypatch.setattr(train_command, "connect",
                        lambda *a, **k: (_ for _ in ()).throw(cluster.ClusterError("past the checks")))
    code, _, err = run_cli(["train", str(run_dir / "config.yaml"), "--resume", str(run_dir)])
    assert code == 1 and "past the checks" in one_line(err)


@pytest.mark.parametrize("where", ["local", "memory"])
def test_two_runs_started_at_once_get_two_run_directories(tmp_path, monkeypatch, where):
    output = str(tmp_path / "runs") if where == "local" else f"memory://runs-{uuid.uuid4().hex[:8]}"
    real_exists = storage.exists

    def slow_exists(path):  # both runs look before either creates: the race, every time
        found = real_exists(path)
        time.sleep(0.2)
        return found

    monkeypatch.setattr(rundir.storage, "exists", slow_exists)
    cfg = load_config(None, [f"output={output}"])
    for config in (cfg, cfg.with_overrides({"name": "exp"})):
        results, errors, barrier = [], [], threading.Barrier(2)

        def start():
            barrier.wait()
            try:
                results.append(rundir.new_run_dir(config, "experiments/configs/synthetic_cpu.yaml"))
            except rundir.RunDirError as exc:
                errors.append(str(exc))

        threads = [threading.Thread(target=start) for _ in range(2)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(30)
        assert len(set(results)) == len(results)  # never one directory for two runs
        if config.name:
            assert len(results) + len(errors) == 2 and all("already exists" in e for e in errors)
            assert len(results) == 1 or where == "memory"  # object storage may refuse both; never admit both
        else:
            assert len(results) == 2
            if where == "local":
                assert {storage.basename(r) for r in results} == {"synthetic_cpu", "synthetic_cpu-2"}


# ----------------------------------------------------------------------------------------------------
# 6. Bounded reads reserve what the file holds, not the bound; commands under an address-space limit
# ----------------------------------------------------------------------------------------------------

_READ_UNDER_A_LIMIT = """
import resource, sys
from neoray import storage
held = next(int(line.split()[1]) for line in open("/proc/self/status") if line.startswith("VmSize:")) * 1024
resource.setrlimit(resource.RLIMIT_AS, (held + (512 << 20), held + (512 << 20)))  # half a GiB more than now
print(len(storage.read_bytes(sys.argv[1], max_bytes=4 << 30)))
"""


def test_a_bounded_read_allocates_what_the_file_holds_not_its_bound(tmp_path):
    small = tmp_path / "weights.pth"
    small.write_bytes(b"x" * 1000)
    proc = subprocess.run([sys.executable, "-c", _READ_UNDER_A_LIMIT, str(small)], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip() == "1000", proc.stderr[-2000:]


def test_a_bounded_read_goes_on_in_chunks_and_stops_one_byte_past_the_bound(tmp_path):
    data = os.urandom(20 << 20)
    big = tmp_path / "big"
    big.write_bytes(data)
    assert storage.read_bytes(big, max_bytes=30 << 20) == data
    with pytest.raises(storage.TooLarge):
        storage.read_bytes(big, max_bytes=10 << 20)
    # A store that lists no size, or a file that grew after it was listed: chunks, never past bound + 1.
    assert storage._read_bounded(io.BytesIO(data), None, 30 << 20) == data
    assert storage._read_bounded(io.BytesIO(data), 1000, 30 << 20) == data
    assert len(storage._read_bounded(io.BytesIO(data), None, 10 << 20)) == (10 << 20) + 1


def _under_a_limit(gigabytes: float, argv: list[str]) -> subprocess.CompletedProcess:
    limit = int(gigabytes * (1 << 30))

    def limit_address_space():
        import resource

        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    env = {k: v for k, v in os.environ.items() if k not in ("RAY_ADDRESS", "OPENBLAS_NUM_THREADS")}
    return subprocess.run([sys.executable, "-m", "neoray.cli", *argv], preexec_fn=limit_address_space, env=env,
                          capture_output=True, text=True, timeout=300)


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("echo this ran",))


@pytest.mark.slow
def test_commands_under_an_address_space_limit_still_answer_inone_line(checkpoint, synthetic_shards, tmp_path):
    runs_code = tmp_path / "runs_code.pth"
    torch.save({"model": _RunsCode()}, runs_code)  # a pickle that would call os.system
    not_an_image = tmp_path / "notes.png"
    not_an_image.write_text("not an image")
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "runs")}))
    levels = ["    - &l0 [" + ", ".join(["lol"] * 10) + "]"]
    levels += [f"    - &l{i} [" + ", ".join([f"*l{i - 1}"] * 10) + "]" for i in range(1, 9)]
    bomb = tmp_path / "bomb.yaml"
    bomb.write_text("train:\n  lr:\n" + "\n".join(levels) + "\n")
    data = [f"data.train={synthetic_shards['train']}", f"data.val={synthetic_shards['val']}", "data.size=160x90"]
    cases = [
        (8, ["eval", str(runs_code), "--data", str(synthetic_shards["val"])], "unpickling it would run code"),
        (8, ["train", str(config), *data, f"model.init_from={runs_code}"], "unpickling it would run code"),
        (8, ["predict", str(checkpoint), str(not_an_image), "--out", str(tmp_path / "drawn")], str(not_an_image)),
        (8, ["predict", str(checkpoint), str(not_an_image), "--out", str(blocker / "d")], str(blocker)),
        # Expanded, the bomb is 10^9 references (8 GB); torch and Ray alone map about 4 GB when they load, so 6 GB
        # leaves the config loader room but not the expansion.
        (6, ["train", str(bomb)], "train.lr: expected a number"),
        # Below what the libraries map: one line naming the limit, not an ImportError from the dynamic loader.
        (2.5, ["train", str(config)], "out of memory under the address-space limit of 2.5 GiB"),
    ]
    for gigabytes, argv, fragment in cases:
        proc = _under_a_limit(gigabytes, argv)
        assert proc.returncode == 1 and fragment in one_line(proc.stderr), (argv, proc.stderr[-3000:])
    assert "this ran" not in proc.stdout


# ----------------------------------------------------------------------------------------------------
# 7. A path that is neither a regular file nor a directory is refused as what it is
# ----------------------------------------------------------------------------------------------------


def test_a_fifo_is_refused_as_what_it_is_wherever_a_path_is_taken(checkpoint, synthetic_shards, tmp_path, monkeypatch):
    from neoray.commands import train as train_command
    from neoray.tune import sweep as sweep_module

    monkeypatch.setattr(train_command, "connect", lambda *a, **k: pytest.fail("connected to Ray"))
    monkeypatch.setattr(sweep_module, "connect", lambda *a, **k: pytest.fail("connected to Ray"))
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)  # a reader would block on it forever
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    data = [f"data.train={synthetic_shards['train']}", f"data.val={synthetic_shards['val']}", "data.size=160x90"]
    ann = synthetic_shards["root"] / "annotations" / "instances_train.json"
    cases = [
        ["eval", str(fifo), "--data", str(synthetic_shards["val"])],
        ["eval", str(checkpoint), "--data", str(fifo)],
        ["predict", str(fifo), str(tmp_path / "x.png"), "--out", str(tmp_path / "drawn")],
        ["export", str(fifo), "--out", str(tmp_path / "m.onnx")],
        ["train", str(config), *data, f"model.init_from={fifo}"],
        ["train", str(config), *data[1:], f"data.train={fifo}"],
        ["train", str(config), *data, "--resume", str(fifo)],
        ["check", str(fifo)],
        ["prepare", "--coco", str(ann), "--images", str(fifo), "--out", str(tmp_path / "o"), "--size", "160x90"],
        ["prepare", "--yolo", str(fifo), "--out", str(tmp_path / "o"), "--size", "160x90"],
        ["report", str(fifo)],
        ["sweep", "--config", str(config), *data, "--warm-start", str(fifo), "--output", str(tmp_path / "s")],
    ]
    for argv in cases:
        code, _, err = run_cli(argv)
        line = one_line(err)
        assert code == 1 and str(fifo) in line and "a FIFO" in line, (argv, line)


# ----------------------------------------------------------------------------------------------------
# 8. An MLflow folder store, which MLflow 3 refuses, is refused before anything starts
# ----------------------------------------------------------------------------------------------------


def test_an_mlflow_folder_store_is_refused_in_one_line_before_anything_starts(synthetic_shards, tmp_path,
                                                                            monkeypatch):
    pytest.importorskip("mlflow")
    from neoray.commands import train as train_command
    from neoray.run.run_tracking import parse_track
    from neoray.tune import sweep as sweep_module

    monkeypatch.setattr(train_command, "connect", lambda *a, **k: pytest.fail("connected to Ray"))
    monkeypatch.setattr(sweep_module, "connect", lambda *a, **k: pytest.fail("connected to Ray"))
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"output": str(tmp_path / "runs")}))
    data = [f"data.train={synthetic_shards['train']}", f"data.val={synthetic_shards['val']}", "data.size=160x90"]
    store = tmp_path / "mlruns"
    database = f"sqlite:///{store / 'mlflow.db'}"
    for argv in (["train", str(config), *data, "--track", f"mlflow:file://{store}"],
                 ["sweep", "--config", str(config), *data, "--output", str(tmp_path / "s"), "--track",
                  f"mlflow:{store}"]):
        code, _, err = run_cli(argv)
        line = one_line(err)
        assert code == 1 and "no longer tracks to a folder" in line and database in line, line
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{store}")
    code, _, err = run_cli(["train", str(config), *data, "--track", "mlflow"])
    assert code == 1 and "MLFLOW_TRACKING_URI" in one_line(err)
    assert not (tmp_path / "runs").exists() and not store.exists()
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # the user's own choice: MLflow then writes it
    assert parse_track(["mlflow"])[0].kind == "mlflow"
