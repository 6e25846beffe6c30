"""``build_pretrained``: a detector rebuilt from a pretrained file alone (its preset, options and classes),
for ``neoray eval``, ``neoray predict`` and ``neoray export`` straight on a reference ``.pth`` or a
Hugging Face folder."""

from __future__ import annotations

from neoray.checkpoints.files import PretrainedError
from neoray.models.pretrained.formats import describe_pretrained
from neoray.models.pretrained.load import load_pretrained
from neoray.models.registry import build_model


def build_pretrained(path, device="cpu"):
    """(model in eval mode on ``device``, PretrainedInfo) for a reference, Hugging Face or neoray file,
    with the checkpoint's own classes: for ``neoray eval`` / ``neoray predict`` directly on such a file."""
    checkpoint_info = describe_pretrained(path)
    if not checkpoint_info.model_name:
        raise PretrainedError(f"{path}: the checkpoint does not name its model; cannot rebuild it")
    num_classes = checkpoint_info.num_classes or len(checkpoint_info.class_names)
    options = {**checkpoint_info.options, "backbone_weights": "none"}
    model = build_model(checkpoint_info.model_name, num_classes, **options)
    result = load_pretrained(model, path)
    missing = [(k, r) for k, r in result.skipped if not k.endswith("num_batches_tracked")]
    if missing:
        key, reason = missing[0]
        raise PretrainedError(
            f"{path}: {len(missing)} tensors do not fit {checkpoint_info.model_name}, e.g. {key}: {reason}"
        )
    return model.to(device).eval(), checkpoint_info


__all__ = ["build_pretrained"]
