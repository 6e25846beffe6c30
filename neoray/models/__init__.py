"""Detectors behind one interface (see docs/ARCHITECTURE.md, "Models").

build_model(name, num_classes, **options) -> Detector; list_models(); check_model(name, options) (validates
without building); build_model_from_config(model_section, num_classes); check_targets(targets, num_classes,
(width, height)). Pretrained detectors (neoray, reference RT-DETR, Hugging Face RT-DETR; see
neoray.models.pretrained): load_pretrained(model, path, class_names), describe_pretrained(path),
build_pretrained(path, device), read_torch_file(path).
"""

from neoray.checkpoints.files import PretrainedError, read_torch_file
from neoray.models.base import Detector, check_targets
from neoray.models.from_config import build_model_from_config, model_options
from neoray.models.pretrained.build import build_pretrained
from neoray.models.pretrained.formats import PretrainedInfo, describe_pretrained
from neoray.models.pretrained.load import PretrainedLoad, load_pretrained
from neoray.models.registry import build_model, check_model, list_models

__all__ = [
    "Detector", "PretrainedError", "PretrainedInfo", "PretrainedLoad", "build_model", "build_model_from_config",
    "build_pretrained", "check_model", "check_targets", "describe_pretrained", "list_models", "load_pretrained",
    "model_options", "read_torch_file",
]
