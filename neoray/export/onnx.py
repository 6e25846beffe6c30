"""A trained RT-DETR as an ONNX model whose contract is neoray's ``predict``, checked against PyTorch.

The exported model (one ``.onnx`` file):

* input ``images``: uint8 (B, 3, H, W), RGB, at the fixed 16:9 export size (the frame ``predict`` feeds the
  model: an image letterboxed to W x H with grey 114). Normalisation and padding to a multiple of 32
  happen inside, exactly as in PyTorch. B is fixed (``batch=N``) or a dynamic axis (``batch=None``).
* outputs ``boxes`` float32 (B, K, 4) xyxy in input pixels, clipped to the W x H image; ``scores``
  float32 (B, K), sigmoid class scores in descending order; ``labels`` int64 (B, K), the contiguous class
  index. K = min(max_detections, queries x classes): the model's own top-k over every (query, class)
  pair, with nothing dropped, so a fixed shape; keep ``scores > threshold`` as ``predict`` does and map
  boxes back through the letterbox (``neoray.data.geometry.boxes_from_letterbox``) for original pixels.
* ``metadata_props``: ``class_names`` (JSON list, index = label), ``categories`` (JSON, the dataset's
  ``{id, name, label}``), ``input_size`` ("WxH"), ``model_name``, ``batch`` ("N" or "dynamic"),
  ``max_detections``, ``score_threshold`` and the input/output layout in words.

Exporter: ``torch.onnx.export(..., dynamo=False)``, the TorchScript tracer, at opset 17 (the deformable
attention's ``grid_sample`` needs 16 or later). The dynamo exporter needs onnxscript, which the
``neoray[export]`` extra does not install; the traced graph is fixed to the export size, which the
contract fixes anyway.

Verification on export: PyTorch and onnxruntime (CPUExecutionProvider) run on the same seeded sample
images (blocky random colour fields at the export size). Scores agree when, rank by rank, they differ by
at most ``SCORE_TOLERANCE`` (1e-4); boxes when each onnxruntime detection has a PyTorch candidate (any
(query, class) pair, not only the top K) of the same label, a score within ``SCORE_TOLERANCE`` and every
coordinate within ``BOX_TOLERANCE_PX`` (0.05 input pixels). Candidates instead of rank-by-rank boxes,
because two detections whose scores tie to float precision (common in a barely trained model) may come
out in either order from either runtime. A difference beyond the tolerance is an ``ExportError`` and
nothing is written.

onnx and onnxruntime are optional (``pip install "neoray[export]"``); they are imported only when an
export runs, so that the main install does without them.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from neoray import storage
from neoray.config import ConfigError, format_size, parse_size
from neoray.models.box_ops import cxcywh_to_xyxy
from neoray.models.rtdetr import RTDETR

OPSET = 17  # grid_sample (deformable attention) needs 16; 17 adds LayerNormalization, which TensorRT fuses
MAX_SIZE = (8192, 4608)  # 8K frames; beyond that an export is a typo, not a model anyone can run
MIN_SIZE = (64, 36)  # a stride-32 backbone needs a few cells on its coarsest map
SCORE_TOLERANCE = 1e-4  # absolute, on sigmoid scores in [0, 1]
BOX_TOLERANCE_PX = 0.05  # absolute, in input pixels
LATENCY_RUNS = 10  # onnxruntime runs timed after one warm-up (the median is reported) ...
LATENCY_BUDGET_S = 10.0  # ... or fewer, at least 3, when a full-size model makes them slow
INSTALL_HINT = 'pip install "neoray[export]"'


class ExportError(ValueError):
    """An export that cannot be done or did not verify; the message is one line."""


@dataclass
class ExportReport:
    out: str
    model_name: str
    size: tuple[int, int]
    batch: int | None  # None: dynamic
    opset: int
    num_bytes: int
    images: int  # sample images compared
    max_box_diff: float  # input pixels
    max_score_diff: float
    latency_ms: float  # median onnxruntime CPU latency of one batch
    latency_batch: int
    latency_runs: int


def check_size(value) -> tuple[int, int]:
    """The export size: 16:9 (``parse_size``), between MIN_SIZE and MAX_SIZE; ConfigError otherwise."""
    width, height = parse_size(value, "--size")
    if width > MAX_SIZE[0] or height > MAX_SIZE[1]:
        raise ConfigError(f"--size: {width}x{height} is larger than {format_size(MAX_SIZE)}")
    if width < MIN_SIZE[0] or height < MIN_SIZE[1]:
        raise ConfigError(f"--size: {width}x{height} is smaller than {format_size(MIN_SIZE)}")
    return width, height


def parse_batch(value) -> int | None:
    """``"dynamic"`` -> None (a dynamic batch axis); a positive integer -> that fixed batch size."""
    if str(value).strip().lower() == "dynamic":
        return None
    try:
        batch = int(value)
    except (TypeError, ValueError):
        raise ConfigError(f"--batch: expected a positive integer or 'dynamic', got {value!r}") from None
    if not 1 <= batch <= 256:
        raise ConfigError(f"--batch: expected 1 to 256 images or 'dynamic', got {batch}")
    return batch


def import_runtime():
    """(onnx, onnxruntime), or an ExportError that says how to install them."""
    try:
        import onnx  # noqa: PLC0415 - optional dependency (neoray[export])
        import onnxruntime  # noqa: PLC0415 - optional dependency (neoray[export])
    except ImportError as exc:
        raise ExportError(f"ONNX export needs onnx and onnxruntime ({exc.name} is missing): "
                          f"{INSTALL_HINT}") from None
    return onnx, onnxruntime


class DetectionsAsTensors(nn.Module):
    """An RT-DETR's eval forward with fixed-shape tensors out: (boxes (B, K, 4), scores (B, K), labels (B, K)).

    The same computation as ``RTDETR.predict`` (last decoder layer, boxes clipped to the input, top-k
    over every (query, class) pair) without the per-image score filter, whose output size varies.
    ``top_k=None`` keeps every pair (the candidates the verification matches against)."""

    def __init__(self, model: RTDETR, size: tuple[int, int], top_k: int | None):
        super().__init__()
        self.model, self.size, self.top_k = model, size, top_k
        # Eval mode from the start: torch.onnx.export restores the wrapper's mode after tracing, and a new
        # module's mode is training, which would switch the detector's BatchNorm to batch statistics.
        self.eval()

    def forward(self, images: torch.Tensor):
        x = self.model.normalize(images)
        outputs = self.model._run(x, self.size)
        logits, boxes = outputs["logits"][-1], outputs["boxes"][-1]
        queries, classes = logits.shape[1:]
        pixels = cxcywh_to_xyxy(boxes.float()) * self.model._padded_scale(x)
        width, height = self.size
        # Clipped out of place (predict clips in place): the traced graph stays a plain chain of ops.
        x1, y1, x2, y2 = pixels.unbind(-1)
        pixels = torch.stack([x1.clamp(0, width), y1.clamp(0, height), x2.clamp(0, width), y2.clamp(0, height)], -1)
        k = queries * classes if self.top_k is None else min(self.top_k, queries * classes)
        scores, flat = logits.float().sigmoid().flatten(1).topk(k, dim=1)
        query, labels = flat // classes, flat % classes
        return pixels.gather(1, query[..., None].expand(-1, -1, 4)), scores, labels


def exportable(model: nn.Module, model_name: str) -> RTDETR:
    if not isinstance(model, RTDETR):
        raise ExportError(f"{model_name}: ONNX export supports the RT-DETR models (rtdetr_cpu, rtdetr_r*), "
                          f"not {type(model).__name__}")
    return model


def sample_images(size: tuple[int, int], count: int, seed: int = 0) -> torch.Tensor:
    """Seeded uint8 (count, 3, H, W) images: random colour blocks (18x32 of them), so that the detector sees
    edges and flat regions, not only pixel noise."""
    width, height = size
    generator = torch.Generator().manual_seed(seed)
    blocks = torch.randint(0, 256, (count, 3, 18, 32), generator=generator, dtype=torch.uint8)
    return F.interpolate(blocks.float(), size=(height, width), mode="nearest").to(torch.uint8)


def trace_to_onnx(wrapper: DetectionsAsTensors, size: tuple[int, int], batch: int | None, opset: int) -> bytes:
    """The wrapper traced to ONNX bytes (TorchScript exporter; see the module docstring)."""
    example = sample_images(size, batch or 1)
    dynamic = {name: {0: "batch"} for name in ("images", "boxes", "scores", "labels")} if batch is None else None
    with tempfile.TemporaryDirectory(prefix="neoray-export-") as folder, warnings.catch_warnings():
        # The tracer warns at every Python-level shape decision; the export size fixes all of them.
        warnings.simplefilter("ignore", torch.jit.TracerWarning)
        warnings.simplefilter("ignore", DeprecationWarning)  # the TorchScript exporter is chosen on purpose
        path = os.path.join(folder, "model.onnx")
        torch.onnx.export(
            wrapper, (example,), path, dynamo=False, opset_version=opset, do_constant_folding=True,
            input_names=["images"], output_names=["boxes", "scores", "labels"], dynamic_axes=dynamic,
        )
        with open(path, "rb") as handle:
            return handle.read()


def with_metadata(onnx, data: bytes, meta: dict, size: tuple[int, int], batch: int | None, model: RTDETR) -> bytes:
    """The ONNX bytes with neoray's metadata_props added, after onnx's checker has accepted the model."""
    proto = onnx.load_from_string(data)
    categories = sorted(meta["categories"], key=lambda c: int(c["label"]))
    props = {
        "class_names": json.dumps([c["name"] for c in categories]),
        "categories": json.dumps(categories),
        "input_size": format_size(size),
        "model_name": str(meta["model_name"]),
        "batch": "dynamic" if batch is None else str(batch),
        "max_detections": str(model.max_detections),
        "score_threshold": str(model.score_threshold),
        "input": f"images: uint8 (B, 3, {size[1]}, {size[0]}) RGB, letterboxed to {format_size(size)}",
        "outputs": "boxes: float32 (B, K, 4) xyxy input pixels; scores: float32 (B, K) descending; "
                   "labels: int64 (B, K) index into class_names",
        "producer": "neoray export",
    }
    onnx.helper.set_model_props(proto, props)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def open_session(onnxruntime, data: bytes):
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3  # errors only: its warnings about unused initialisers are noise here
    return onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])


def run_session(session, images: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    boxes, scores, labels = session.run(["boxes", "scores", "labels"], {"images": images.numpy()})
    return boxes, scores, labels


def compare(onnx_out, candidates, top_k: int) -> tuple[float, float]:
    """(max box difference in pixels, max score difference) of onnxruntime's detections against PyTorch's.

    candidates: PyTorch's (boxes, scores, labels) over every (query, class) pair, best first. Scores are
    compared rank by rank; each onnxruntime box against the closest candidate of its label whose score
    is within SCORE_TOLERANCE (inf when there is none)."""
    boxes, scores, labels = onnx_out
    ref_boxes, ref_scores, ref_labels = (t.numpy() for t in candidates)
    score_diff = float(np.abs(scores - ref_scores[:, :top_k]).max(initial=0.0))
    box_diff = 0.0
    for i in range(len(boxes)):
        for box, score, label in zip(boxes[i], scores[i], labels[i]):
            near = (ref_labels[i] == label) & (np.abs(ref_scores[i] - score) <= SCORE_TOLERANCE)
            best = np.abs(ref_boxes[i][near] - box).max(-1).min(initial=np.inf)
            box_diff = max(box_diff, float(best))
    return box_diff, score_diff


def median_latency_ms(session, images: torch.Tensor) -> tuple[float, int]:
    """(median milliseconds of one onnxruntime run on ``images``, runs timed), after one warm-up run."""
    run_session(session, images)
    times: list[float] = []
    deadline = time.perf_counter() + LATENCY_BUDGET_S
    while len(times) < LATENCY_RUNS and (len(times) < 3 or time.perf_counter() < deadline):
        start = time.perf_counter()
        run_session(session, images)
        times.append(time.perf_counter() - start)
    return float(np.median(times)) * 1000.0, len(times)


def verify(session, model: RTDETR, size: tuple[int, int], batch: int | None) -> tuple[int, float, float]:
    """(images compared, max box difference, max score difference); ExportError beyond the tolerance.

    A fixed batch N is checked on N images; a dynamic batch on one image and on two at once."""
    images = sample_images(size, batch or 2, seed=1)
    with torch.no_grad():
        candidates = DetectionsAsTensors(model, size, top_k=None)(images)
    box_diff = score_diff = 0.0
    for count in ([batch] if batch else [1, 2]):
        out = run_session(session, images[:count])
        boxes, scores = compare(out, [t[:count] for t in candidates], out[1].shape[1])
        box_diff, score_diff = max(box_diff, boxes), max(score_diff, scores)
    if box_diff > BOX_TOLERANCE_PX or score_diff > SCORE_TOLERANCE:
        raise ExportError(f"onnxruntime differs from PyTorch beyond the tolerance: boxes {box_diff:.3g} px "
                          f"(tolerance {BOX_TOLERANCE_PX:g}), scores {score_diff:.3g} "
                          f"(tolerance {SCORE_TOLERANCE:g}); nothing written")
    return len(images), box_diff, score_diff


def export_detector(model: nn.Module, meta: dict, out: str, size: tuple[int, int], batch: int | None,
                    opset: int = OPSET) -> ExportReport:
    """Export ``model`` (from ``load_model``; on the CPU, in eval mode) to ``out`` and verify it first.

    Writes through neoray.storage (atomic locally, one whole object on object storage) only after the
    verification passed. Raises ExportError (one line) for what cannot be exported or did not verify."""
    onnx, onnxruntime = import_runtime()
    model = exportable(model, meta["model_name"]).cpu().eval()
    wrapper = DetectionsAsTensors(model, size, top_k=model.max_detections)
    data = with_metadata(onnx, trace_to_onnx(wrapper, size, batch, opset), meta, size, batch, model)
    session = open_session(onnxruntime, data)
    images, box_diff, score_diff = verify(session, model, size, batch)
    latency_ms, runs = median_latency_ms(session, sample_images(size, batch or 1, seed=2))
    storage.write_bytes(out, data)
    return ExportReport(out, meta["model_name"], size, batch, opset, len(data), images, box_diff, score_diff,
                        latency_ms, batch or 1, runs)


__all__ = [
    "BOX_TOLERANCE_PX", "INSTALL_HINT", "MAX_SIZE", "OPSET", "SCORE_TOLERANCE", "DetectionsAsTensors", "ExportError",
    "ExportReport", "check_size", "export_detector", "import_runtime", "parse_batch", "sample_images",
]
