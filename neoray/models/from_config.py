"""The one way a config's ``model`` section becomes a model: for training, evaluation, prediction and export."""

from __future__ import annotations

from dataclasses import asdict

from torch import nn

from neoray.config import ModelConfig
from neoray.models.registry import build_model


def model_options(model_cfg: ModelConfig | dict, *, with_weights: bool = True) -> dict:
    """``build_model`` keyword options of a ``model`` section (a ModelConfig, or the dict a checkpoint
    recorded). ``with_weights=False`` leaves out ``backbone_weights``: a checkpoint brings every weight,
    so inference never downloads or reads backbone weights again."""
    section = asdict(model_cfg) if isinstance(model_cfg, ModelConfig) else dict(model_cfg or {})
    options = dict(section.get("options") or {})
    for key in ("max_detections", "score_threshold"):
        if key in section:
            options.setdefault(key, section[key])
    if with_weights:
        options.setdefault("backbone_weights", section.get("backbone_weights", "none"))
    else:
        options.pop("backbone_weights", None)
    return options


def build_model_from_config(model_cfg: ModelConfig | dict, num_classes: int, *, with_weights: bool = True) -> nn.Module:
    """The model a ``model`` section describes (the name plus ``model_options``)."""
    section = asdict(model_cfg) if isinstance(model_cfg, ModelConfig) else dict(model_cfg or {})
    return build_model(section["name"], num_classes, **model_options(section, with_weights=with_weights))


__all__ = ["build_model_from_config", "model_options"]
