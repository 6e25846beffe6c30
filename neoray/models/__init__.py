"""Detectors behind one interface (see docs/ARCHITECTURE.md, "Models").

build_model(name, num_classes, **options) -> Detector; list_models(); check_model(name, options) (validates
without building); load_matching_state_dict(model, state_dict) -> (loaded_keys, skipped);
check_targets(targets, num_classes, (width, height)). Pretrained detectors (neoray, reference RT-DETR,
Hugging Face RT-DETR; see neoray.models.pretrained): load_pretrained(model, path, class_names),
describe_pretrained(path), build_pretrained(path, device), read_torch_file(path).
"""

from neoray.models.base import Detector, check_targets
from neoray.models.pretrained import (
    NEORAY_CHECKPOINT_FORMAT,
    PretrainedError,
    PretrainedInfo,
    PretrainedLoad,
    build_pretrained,
    describe_pretrained,
    load_pretrained,
    read_torch_file,
)
from neoray.models.registry import build_model, check_model, list_models
from neoray.models.weights import load_matching_state_dict

__all__ = [
    "NEORAY_CHECKPOINT_FORMAT", "Detector", "PretrainedError", "PretrainedInfo", "PretrainedLoad", "build_model",
    "build_pretrained", "check_model", "check_targets", "describe_pretrained", "list_models", "load_matching_state_dict",
    "load_pretrained", "read_torch_file",
]
