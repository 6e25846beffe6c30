"""build_model(name, num_classes, **options) and list_models(): the only way the engine makes a model.

Presets are read-only; options override them (unknown options are a one-line error listing the valid
ones). Common options: backbone_weights ("none" | "imagenet" | a file), max_detections,
score_threshold; RT-DETR also takes loss_weights={"vfl", "bbox", "giou"}, matcher_costs={"cost_class",
"cost_bbox", "cost_giou"}, num_queries, hidden_dim, num_decoder_layers, num_denoising, ...
"""

from __future__ import annotations

import difflib
import inspect
from types import MappingProxyType

from neoray.models.base import Detector
from neoray.models.rtdetr import RTDETR
from neoray.models.torchvision_detectors import TorchvisionDetector

# RT-DETR sizes follow the paper's ResNet variants (r18: 3 decoder layers, r34: 4, r50: 6).
# rtdetr_cpu is sized to learn on a 2-core CPU in minutes: MobileNetV3-small, width 64, 50 queries.
PRESETS = MappingProxyType(
    {
        "rtdetr_cpu": (RTDETR, dict(
            backbone="mobilenet_v3_small", hidden_dim=64, encoder_heads=4, encoder_ffn_dim=256, csp_blocks=1,
            csp_expansion=1.0, num_queries=50, num_decoder_layers=2, decoder_heads=4, decoder_ffn_dim=256,
            num_points=4, num_denoising=50,
        )),
        "rtdetr_r18": (RTDETR, dict(backbone="resnet18", num_decoder_layers=3, csp_expansion=0.5)),
        "rtdetr_r34": (RTDETR, dict(backbone="resnet34", num_decoder_layers=4, csp_expansion=0.5)),
        "rtdetr_r50": (RTDETR, dict(backbone="resnet50", num_decoder_layers=6, csp_expansion=1.0)),
        "fcos_r50": (TorchvisionDetector, dict(kind="fcos")),
        "retinanet_r50": (TorchvisionDetector, dict(kind="retinanet")),
    }
)


def list_models() -> list[str]:
    return sorted(PRESETS)


def build_model(name: str, num_classes: int, **options) -> Detector:
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid: {', '.join(list_models())}")
    cls, preset = PRESETS[name]
    accepted = set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes", "kind"}
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(f"{name}: unknown option(s) {unknown}; valid: {sorted(accepted)}")
    return cls(num_classes, **{**preset, **options})
