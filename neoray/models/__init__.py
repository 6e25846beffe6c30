"""Detectors behind one interface (see docs/ARCHITECTURE.md, "Models").

build_model(name, num_classes, **options) -> Detector; list_models(); load_matching_state_dict(model,
state_dict) -> (loaded_keys, skipped); check_targets(targets, num_classes, (width, height)).
"""

from neoray.models.base import Detector, check_targets
from neoray.models.registry import build_model, list_models
from neoray.models.weights import load_matching_state_dict

__all__ = ["Detector", "build_model", "check_targets", "list_models", "load_matching_state_dict"]
