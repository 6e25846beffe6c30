"""Load a trained detector for evaluation or prediction: a neoray checkpoint, or a pretrained detector
in another format (the reference RT-DETR's ``.pth``, a Hugging Face RT-DETR folder).

A neoray checkpoint may be named by its directory, its ``checkpoint.pt``, its run directory (the best
checkpoint) or ``RUN_DIR/checkpoints/best|latest`` (neoray.engine.checkpoint.resolve_checkpoint), local or
on any storage. The model is rebuilt from the recorded model name, class count and ``config.model``
options, and gets the EMA weights when the checkpoint has them (they are what evaluation during
training scored), the raw weights otherwise.
"""

from __future__ import annotations

import torch

from neoray import storage
from neoray.engine.checkpoint import FILE_NAME, CheckpointError, load_checkpoint, resolve_checkpoint
from neoray.engine.model_config import build_model
from neoray.models.weights import unwrap_state_dict

# Keys load_model needs beyond what load_checkpoint checks (format and version).
REQUIRED_KEYS = ("model", "model_name", "num_classes", "categories", "config")


def _is_neoray_checkpoint(path: str) -> bool:
    if storage.is_file(storage.join(path, FILE_NAME)):
        return True
    return storage.is_file(path) and storage.basename(path).endswith(".pt") and not storage.basename(path).endswith(".pth")


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
    if not _is_neoray_checkpoint(resolved):
        return _load_pretrained_detector(resolved, device)
    ckpt = load_checkpoint(resolved)
    file = resolved if storage.is_file(resolved) else storage.join(resolved, FILE_NAME)
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{file}: neoray checkpoint is missing {', '.join(missing)}")
    config = ckpt["config"] or {}
    try:
        model = build_model({**config.get("model", {}), "name": ckpt["model_name"]}, int(ckpt["num_classes"]),
                            with_weights=False)
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
    from neoray.config import parse_size

    size = config.get("data", {}).get("size")
    return parse_size(size, "config.data.size") if size else None


def _load_pretrained_detector(path: str, device) -> tuple[torch.nn.Module, dict]:
    from neoray.models import PretrainedError, build_pretrained

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


__all__ = ["CheckpointError", "load_model"]
