"""`neoray export`: an RT-DETR checkpoint becomes an ONNX model whose outputs are PyTorch's (the predict
contract: uint8 16:9 frame in, top-k boxes in input pixels, scores and labels out, class names in the
metadata), checked on export; what cannot be exported is refused in one line."""

from __future__ import annotations

import contextlib
import io
import json
import sys

import numpy as np
import pytest
import torch

from neoray.checkpoints import save_checkpoint
from neoray.cli import main
from neoray.config import load_config
from neoray.evaluation.inference import load_model
from neoray.export import onnx as onnx_export
from neoray.models import build_model

onnx = pytest.importorskip("onnx")
onnxruntime = pytest.importorskip("onnxruntime")

SIZE = (160, 90)  # 16:9, padded to 160x96 inside: the padding path is exported too
CATEGORIES = [{"id": 3, "name": "square", "label": 0}, {"id": 7, "name": "disc", "label": 1},
              {"id": 9, "name": "triangle", "label": 2}]
# rtdetr_cpu as trained by default; a narrow rtdetr_r18vd (the real ResNet-18-vd backbone), as in
# test_pretrained.py, so that the ResNet-vd presets' graph is exported in seconds.
MODELS = {
    "rtdetr_cpu": {},
    "rtdetr_r18vd": dict(hidden_dim=64, encoder_ffn_dim=128, decoder_ffn_dim=128, num_decoder_layers=2,
                         num_queries=30),
}


def write_checkpoint(directory, name: str) -> str:
    """A neoray checkpoint of an untrained ``name`` (seeded) that trained at SIZE."""
    cfg = load_config(overrides={"data.size": f"{SIZE[0]}x{SIZE[1]}", "model.name": name}).to_dict()
    cfg["model"]["options"] = dict(MODELS[name])
    torch.manual_seed(0)
    model = build_model(name, len(CATEGORIES), **MODELS[name])
    save_checkpoint(directory, {"model": model.state_dict(), "ema": None, "model_name": name,
                                "num_classes": len(CATEGORIES), "categories": CATEGORIES, "config": cfg})
    return str(directory)


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


@pytest.fixture(autouse=True)
def fewer_latency_runs(monkeypatch):
    monkeypatch.setattr(onnx_export, "LATENCY_RUNS", 3)  # the timing is printed, not tested


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("export")
    return {name: write_checkpoint(root / name, name) for name in MODELS}


@pytest.fixture(scope="module")
def exported(checkpoints, tmp_path_factory) -> dict[str, tuple[str, str]]:
    """name -> (the .onnx path, the command's stdout): rtdetr_cpu with a dynamic batch, r18vd fixed at 1."""
    root = tmp_path_factory.mktemp("onnx")
    result = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(onnx_export, "LATENCY_RUNS", 3)
        for name, batch in (("rtdetr_cpu", "dynamic"), ("rtdetr_r18vd", "1")):
            out = root / f"{name}.onnx"
            code, stdout, stderr = run_cli(["export", checkpoints[name], "--out", str(out), "--batch", batch])
            assert code == 0, stderr
            result[name] = (str(out), stdout)
    return result


def sorted_close(ort_out, torch_out, score_gap: float = 1e-5) -> None:
    """onnxruntime's (boxes, scores, labels) against the PyTorch eval forward's list of dicts.

    Scores rank by rank; boxes and labels at the ranks whose score is clear of both neighbours (two
    scores tied to float precision may come out in either order from either runtime)."""
    boxes, scores, labels = ort_out
    for i, expected in enumerate(torch_out):
        ref_scores = expected["scores"].numpy()
        np.testing.assert_allclose(scores[i], ref_scores, rtol=0, atol=onnx_export.SCORE_TOLERANCE)
        gaps = np.abs(np.diff(ref_scores))
        clear = np.minimum(np.r_[np.inf, gaps], np.r_[gaps, np.inf]) > score_gap
        assert clear.sum() >= 5, "too few separated scores to compare boxes"
        np.testing.assert_array_equal(labels[i][clear], expected["labels"].numpy()[clear])
        np.testing.assert_allclose(boxes[i][clear], expected["boxes"].numpy()[clear], rtol=0,
                                   atol=onnx_export.BOX_TOLERANCE_PX)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_onnxruntime_gives_the_pytorch_detections_of_the_checkpoint(name, checkpoints, exported):
    path, stdout = exported[name]
    assert "max |boxes| difference" in stdout and "max |scores| difference" in stdout
    assert "onnxruntime CPU latency" in stdout and " ms " in stdout
    model, _ = load_model(checkpoints[name])
    images = onnx_export.sample_images(SIZE, 2, seed=5)
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    batches = [images] if name == "rtdetr_cpu" else [images[:1], images[1:]]  # dynamic / fixed batch of 1
    with torch.no_grad():
        for batch in batches:
            ort_out = session.run(["boxes", "scores", "labels"], {"images": batch.numpy()})
            torch_out = model(batch)
            assert ort_out[0].shape == (len(batch), model.max_detections if name == "rtdetr_cpu" else 90, 4)
            sorted_close(ort_out, torch_out)


def test_the_onnx_model_takes_uint8_frames_of_the_export_size_and_names_its_classes(exported):
    proto = onnx.load(exported["rtdetr_r18vd"][0])
    (image_input,) = proto.graph.input
    dims = [d.dim_value for d in image_input.type.tensor_type.shape.dim]
    assert image_input.name == "images" and dims == [1, 3, SIZE[1], SIZE[0]]
    assert image_input.type.tensor_type.elem_type == onnx.TensorProto.UINT8
    assert [o.name for o in proto.graph.output] == ["boxes", "scores", "labels"]
    assert proto.opset_import[0].version >= 16  # grid_sample
    props = {p.key: p.value for p in proto.metadata_props}
    assert json.loads(props["class_names"]) == ["square", "disc", "triangle"]
    assert json.loads(props["categories"]) == CATEGORIES
    assert props["input_size"] == "160x90" and props["model_name"] == "rtdetr_r18vd" and props["batch"] == "1"
    dynamic = onnx.load(exported["rtdetr_cpu"][0]).graph.input[0].type.tensor_type.shape.dim[0]
    assert dynamic.dim_param == "batch"


def test_the_export_wrapper_returns_what_predict_returns_as_fixed_shape_tensors(checkpoints):
    model, _ = load_model(checkpoints["rtdetr_cpu"])
    images = onnx_export.sample_images(SIZE, 2, seed=3)
    with torch.no_grad():
        boxes, scores, labels = onnx_export.DetectionsAsTensors(model, SIZE, model.max_detections)(images)
        expected = model(images)
    for i, detections in enumerate(expected):  # score_threshold 0: predict keeps every top-k detection
        assert torch.equal(boxes[i], detections["boxes"]) and torch.equal(scores[i], detections["scores"])
        assert torch.equal(labels[i], detections["labels"])


def assert_one_line_refusal(code: int, stderr: str, *fragments: str) -> None:
    assert code == 1
    assert stderr.count("\n") == 1 and stderr.startswith("neoray export: error: "), stderr
    for fragment in fragments:
        assert fragment in stderr, stderr


def test_a_file_that_is_no_checkpoint_is_refused_in_one_line(tmp_path):
    bad = tmp_path / "notes.pt"
    bad.write_text("not a checkpoint")
    code, _, stderr = run_cli(["export", str(bad), "--out", str(tmp_path / "m.onnx")])
    assert_one_line_refusal(code, stderr, "notes.pt")
    code, _, stderr = run_cli(["export", str(tmp_path / "missing"), "--out", str(tmp_path / "m.onnx")])
    assert_one_line_refusal(code, stderr, "no checkpoint found")
    assert not (tmp_path / "m.onnx").exists()


@pytest.mark.parametrize("size, fragment", [
    ("640x480", "not 16:9"), ("16000x9000", "larger than 8192x4608"), ("32x18", "smaller than"),
    ("big", "expected a size"),
])
def test_a_size_that_is_not_16_9_or_absurd_is_refused_in_one_line(size, fragment, checkpoints, tmp_path):
    code, _, stderr = run_cli(["export", checkpoints["rtdetr_cpu"], "--out", str(tmp_path / "m.onnx"),
                               "--size", size])
    assert_one_line_refusal(code, stderr, fragment)


def test_a_bad_batch_or_an_output_that_is_a_directory_is_refused_in_one_line(checkpoints, tmp_path):
    code, _, stderr = run_cli(["export", checkpoints["rtdetr_cpu"], "--out", str(tmp_path / "m.onnx"),
                               "--batch", "0"])
    assert_one_line_refusal(code, stderr, "--batch")
    code, _, stderr = run_cli(["export", checkpoints["rtdetr_cpu"], "--out", str(tmp_path)])
    assert_one_line_refusal(code, stderr, "is a directory")


def test_without_onnx_installed_the_command_says_how_to_install_it(checkpoints, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # import fails as if not installed
    code, _, stderr = run_cli(["export", checkpoints["rtdetr_cpu"], "--out", str(tmp_path / "m.onnx")])
    assert_one_line_refusal(code, stderr, 'pip install "neoray[export]"')


def test_an_export_that_differs_from_pytorch_is_refused_and_nothing_is_written(checkpoints, tmp_path,
                                                                               monkeypatch):
    monkeypatch.setattr(onnx_export, "BOX_TOLERANCE_PX", -1.0)  # every export now "differs"
    out = tmp_path / "m.onnx"
    code, _, stderr = run_cli(["export", checkpoints["rtdetr_cpu"], "--out", str(out)])
    assert_one_line_refusal(code, stderr, "differs from PyTorch", "nothing written")
    assert not out.exists()
