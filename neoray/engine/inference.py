"""Load a trained detector from a neoray checkpoint for evaluation or prediction.

A checkpoint is a directory holding ``checkpoint.pt`` (see docs/ARCHITECTURE.md, "Checkpoints"); either
the directory or the file is accepted. The model is rebuilt from the recorded model name, class count
and ``config.model`` options, and gets the EMA weights when the checkpoint has them (they are what
evaluation during training scored), the raw weights otherwise.
"""

from __future__ import annotations

from pathlib import Path

import torch

from neoray.engine.checkpoint import CheckpointError, checkpoint_file, load_checkpoint

# Keys load_model needs beyond what load_checkpoint checks (format and version).
REQUIRED_KEYS = ("model", "model_name", "num_classes", "categories", "config")


def read_checkpoint(path: str | Path) -> tuple[dict, Path]:
    """Load (on the CPU, weights_only) and validate the checkpoint dict. Returns (checkpoint, file)."""
    file = checkpoint_file(path)
    ckpt = load_checkpoint(file, map_location="cpu")
    missing = [key for key in REQUIRED_KEYS if key not in ckpt]
    if missing:
        raise CheckpointError(f"{file}: neoray checkpoint is missing {', '.join(missing)}")
    return ckpt, file


def _strip_module_prefix(state: dict) -> dict:
    # A state dict saved from a DDP-wrapped model has every key prefixed with "module.".
    if state and all(key.startswith("module.") for key in state):
        return {key[len("module."):]: value for key, value in state.items()}
    return state


def model_options(config: dict) -> dict:
    """The build_model keyword options recorded in a checkpoint's config."""
    model_cfg = config.get("model", {}) or {}
    options = dict(model_cfg.get("options", {}) or {})
    for key in ("max_detections", "score_threshold"):
        if key in model_cfg:
            options.setdefault(key, model_cfg[key])
    # Every weight comes from the checkpoint: never fetch or read pretrained backbone weights again.
    options.pop("backbone_weights", None)
    return options


def load_model(path: str | Path, device: str | torch.device = "cpu") -> tuple[torch.nn.Module, dict]:
    """``(model in eval mode on device, meta)`` from a checkpoint directory or ``checkpoint.pt``.

    meta: model_name, num_classes, categories (manifest categories), config (Config.to_dict()), size
    ((W, H) the model trained at), epoch, step, metrics, weights ("ema" or "model"), file.
    """
    from neoray.config import parse_size
    from neoray.models import build_model

    ckpt, file = read_checkpoint(path)
    config = ckpt["config"] or {}
    try:
        model = build_model(ckpt["model_name"], int(ckpt["num_classes"]), **model_options(config))
    except (KeyError, TypeError, ValueError) as exc:
        raise CheckpointError(f"{file}: cannot rebuild model {ckpt['model_name']!r}: {exc}") from None
    weights = "ema" if ckpt.get("ema") else "model"
    state = _strip_module_prefix(dict(ckpt[weights]))
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise CheckpointError(
            f"{file}: {weights} weights do not fit {ckpt['model_name']!r} ({len(result.missing_keys)} missing, "
            f"{len(result.unexpected_keys)} unexpected keys, e.g. "
            f"{(result.missing_keys + result.unexpected_keys)[0]})")
    model.to(device).eval()
    size = config.get("data", {}).get("size")
    meta = {
        "model_name": ckpt["model_name"],
        "num_classes": int(ckpt["num_classes"]),
        "categories": list(ckpt["categories"]),
        "config": config,
        "size": parse_size(size, "config.data.size") if size else None,
        "epoch": ckpt.get("epoch"),
        "step": ckpt.get("step"),
        "metrics": ckpt.get("metrics"),
        "weights": weights,
        "file": str(file),
    }
    return model, meta


__all__ = ["CheckpointError", "checkpoint_file", "load_model", "model_options", "read_checkpoint"]
