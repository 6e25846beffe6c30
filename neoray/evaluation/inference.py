"""A detector loaded for use (evaluation, prediction, export) and its predictions on a whole image.

``load_model`` takes a neoray checkpoint, named by its directory, its ``checkpoint.pt``, its run directory
(the best checkpoint) or ``RUN_DIR/checkpoints/best|latest``, or a pretrained detector in another format
(the reference RT-DETR's ``.pth``, a Hugging Face RT-DETR folder), local or on any storage. What a file
is comes from its contents, never from its name. A neoray checkpoint's model is rebuilt from the recorded
model name, class count and ``config.model`` options, and gets the EMA weights when the checkpoint has
them (they are what evaluation during training scored), the raw weights otherwise.

``predict_image`` is the contract every way of running a trained detector keeps (``neoray predict``, the
exported ONNX model): any image in, letterboxed to the model's 16:9 size, boxes back in the image's own
pixels with scores and labels.
"""

from __future__ import annotations

import cv2
import numpy as np
import torch

from neoray import storage
from neoray.checkpoints.files import is_huggingface, read_torch_file
from neoray.checkpoints.format import FILE_NAME, CheckpointError, check_checkpoint, is_neoray_checkpoint
from neoray.checkpoints.locate import resolve_checkpoint
from neoray.config import parse_size
from neoray.data.geometry import boxes_from_letterbox, clip_boxes, letterbox_image, letterbox_params
from neoray.models import PretrainedError, build_model_from_config, build_pretrained
from neoray.models.weights import unwrap_state_dict

# Keys load_model needs beyond what check_checkpoint checks (format and version).
REQUIRED_KEYS = ("model", "model_name", "num_classes", "categories", "config")


def load_model(path: str, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode on device, meta)``.

    meta: model_name, num_classes, categories ([{id, name, label}]), config (Config.to_dict() or {}),
    size ((W, H) the model trained at, None when unknown), epoch, step, metrics, weights ("ema",
    "model" or the pretrained format), file.
    """
    resolved = resolve_checkpoint(path)
    if not storage.exists(resolved):
        raise CheckpointError(f"{resolved}: no checkpoint found (expected a checkpoint directory or checkpoint.pt, a "
                              f"run directory, a reference RT-DETR .pth or a Hugging Face RT-DETR folder)")
    if is_huggingface(resolved):
        return _load_pretrained_detector(resolved, device)
    file = storage.join(resolved, FILE_NAME) if storage.is_dir(resolved) else resolved
    if not storage.is_file(file):
        raise CheckpointError(f"{resolved}: a directory without {FILE_NAME} (neoray) or model.safetensors + "
                              f"config.json (Hugging Face)")
    try:
        payload = read_torch_file(file)
    except PretrainedError as exc:
        raise CheckpointError(str(exc)) from None
    if not is_neoray_checkpoint(payload):
        return _load_pretrained_detector(resolved, device)
    return _load_neoray(check_checkpoint(payload, file), file, device)


def _load_neoray(ckpt: dict, file: str, device) -> tuple[torch.nn.Module, dict]:
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{file}: neoray checkpoint is missing {', '.join(missing)}")
    config = ckpt["config"] or {}
    try:
        model = build_model_from_config({**config.get("model", {}), "name": ckpt["model_name"]},
                                        int(ckpt["num_classes"]), with_weights=False)
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot rebuild model {ckpt['model_name']!r}: {exc}") from None
    weights = "ema" if ckpt.get("ema") else "model"
    result = model.load_state_dict(unwrap_state_dict(ckpt[weights], file), strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{file}: {weights} weights do not fit {ckpt['model_name']!r} ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. "
            f"{(result.missing_keys + result.unexpected_keys)[0]})")
    model.to(device).eval()
    return model, {
        "model_name": ckpt["model_name"], "num_classes": int(ckpt["num_classes"]),
        "categories": list(ckpt["categories"]), "config": config, "size": _trained_size(config),
        "epoch": ckpt.get("epoch"), "step": ckpt.get("step"), "metrics": ckpt.get("metrics"),
        "weights": weights, "file": file,
    }


def _trained_size(config: dict):
    size = config.get("data", {}).get("size")
    return parse_size(size, "config.data.size") if size else None


def _load_pretrained_detector(path: str, device) -> tuple[torch.nn.Module, dict]:
    try:
        model, info = build_pretrained(path, device=device)
    except (PretrainedError, ValueError) as exc:
        raise CheckpointError(str(exc)) from None
    categories = info.categories or [{"id": label, "name": name, "label": label}
                                     for label, name in enumerate(info.class_names)]
    return model, {
        "model_name": info.model_name, "num_classes": len(categories), "categories": categories,
        "config": {"model": {"name": info.model_name, "options": info.options}}, "size": None,
        "epoch": None, "step": None, "metrics": None, "weights": info.format, "file": path,
    }


def predict_image(model: torch.nn.Module, image_bgr: np.ndarray, size: tuple[int, int], device,
                  score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy in original pixels, scores, labels) of one BGR image, scores >= threshold."""
    height, width = image_bgr.shape[:2]
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)  # the shards (and so the model) are RGB
    canvas = letterbox_image(rgb, *size)
    scale, pad_x, pad_y = letterbox_params(width, height, *size)
    tensor = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None].to(device)
    with torch.no_grad():
        output = model(tensor)[0]
    scores = output["scores"].float().cpu().numpy()
    keep = scores >= score_threshold
    boxes = output["boxes"].float().cpu().numpy()[keep]
    boxes = clip_boxes(boxes_from_letterbox(boxes, scale, pad_x, pad_y), width, height)
    return boxes, scores[keep], output["labels"].cpu().numpy()[keep]


__all__ = ["CheckpointError", "load_model", "predict_image"]
