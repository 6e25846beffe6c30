"""build_model(name, num_classes, **options) and list_models(): the only way the engine makes a model.

Presets are read-only; options override them (unknown options are a one-line error listing the valid
ones). Common options: backbone_weights ("none" | "imagenet" | a file), max_detections,
score_threshold; RT-DETR also takes loss_weights={"vfl", "bbox", "giou"}, matcher_costs={"cost_class",
"cost_bbox", "cost_giou"}, num_queries, hidden_dim, encoder_dim, num_decoder_layers, num_denoising,
freeze_norm, freeze_at, look_forward_twice, input_normalization, position_order, ...
``check_model(name, options)`` validates a name and options without building anything.
"""

from __future__ import annotations

import difflib
import inspect
from types import MappingProxyType

from neoray import storage
from neoray.models.backbone import backbone_names
from neoray.models.base import INPUT_NORMALIZATIONS, Detector
from neoray.models.criterion import CLS_LOSSES
from neoray.models.position import POSITION_ORDERS
from neoray.models.rtdetr import RTDETR
from neoray.models.tiny_resnet import ARCHITECTURES as TINY_ARCHITECTURES
from neoray.models.torchvision_detectors import TorchvisionDetector

# RT-DETR sizes follow the paper's ResNet variants (r18: 3 decoder layers, r34: 4, r50: 6).
# rtdetr_cpu is sized to learn on a 2-core CPU in minutes: MobileNetV3-small, width 64, 50 queries. It keeps
# PyTorch's initialisation of enc_output and query_pos_head (reference_init=False): on the default synthetic
# data, 10 epochs, seeds 0-2, it reached mAP 0.23-0.31 so, 0.12-0.26 with the reference's xavier init.
PRESETS = MappingProxyType(
    {
        "rtdetr_cpu": (RTDETR, dict(
            backbone="mobilenet_v3_small", hidden_dim=64, encoder_heads=4, encoder_ffn_dim=256, csp_blocks=1,
            csp_expansion=1.0, num_queries=50, num_decoder_layers=2, decoder_heads=4, decoder_ffn_dim=256,
            num_points=4, num_denoising=50, reference_init=False,
        )),
        "rtdetr_r18": (RTDETR, dict(backbone="resnet18", num_decoder_layers=3, csp_expansion=0.5)),
        "rtdetr_r34": (RTDETR, dict(backbone="resnet34", num_decoder_layers=4, csp_expansion=0.5)),
        "rtdetr_r50": (RTDETR, dict(backbone="resnet50", num_decoder_layers=6, csp_expansion=1.0)),
        # The reference RT-DETR (lyuwenyu/RT-DETR rtdetr_pytorch/configs/rtdetr): ResNet-vd backbones whose
        # weights load by name; 300 queries, 100 denoising queries, hidden size 256 (the r101vd encoder
        # 384 wide with a 2048 FFN); r50vd/r101vd freeze every backbone norm and the stem, r18vd/r34vd
        # train them.
        "rtdetr_r18vd": (RTDETR, dict(backbone="presnet18vd", num_decoder_layers=3, csp_expansion=0.5)),
        "rtdetr_r34vd": (RTDETR, dict(backbone="presnet34vd", num_decoder_layers=4, csp_expansion=0.5)),
        "rtdetr_r50vd": (RTDETR, dict(backbone="presnet50vd", num_decoder_layers=6, csp_expansion=1.0,
                                      freeze_norm=True, freeze_at=0)),
        "rtdetr_r101vd": (RTDETR, dict(backbone="presnet101vd", num_decoder_layers=6, csp_expansion=1.0,
                                       encoder_dim=384, encoder_ffn_dim=2048, freeze_norm=True, freeze_at=0)),
        "fcos_r50": (TorchvisionDetector, dict(kind="fcos")),
        "retinanet_r50": (TorchvisionDetector, dict(kind="retinanet")),
    }
)


def list_models() -> list[str]:
    return sorted(PRESETS)


def accepted_options(cls) -> set[str]:
    return set(inspect.signature(cls.__init__).parameters) - {"self", "num_classes", "kind"}


# Options with a fixed set of values, checked before anything is built.
_CHOICES = {
    "input_normalization": INPUT_NORMALIZATIONS,
    "position_order": POSITION_ORDERS,
    "cls_loss": CLS_LOSSES,
}


def check_model(name: str, options: dict | None = None) -> None:
    """Raise a one-line ValueError for an unknown model name (naming the closest), unknown options, option
    values outside their choices, or a ``backbone_weights`` file that does not exist. Builds nothing:
    the config is checked with this before Ray starts."""
    options = dict(options or {})
    if name not in PRESETS:
        close = difflib.get_close_matches(name, PRESETS, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown model {name!r}{hint}; valid: {', '.join(list_models())}")
    cls, preset = PRESETS[name]
    accepted = accepted_options(cls)
    unknown = sorted(set(options) - accepted)
    if unknown:
        close = difflib.get_close_matches(unknown[0], accepted, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"{name}: unknown option(s) {unknown}{hint}; valid: {sorted(accepted)}")
    for key, choices in _CHOICES.items():
        if key in options and options[key] not in choices:
            raise ValueError(f"{name}: {key} must be one of {list(choices)}, got {options[key]!r}")
    if "backbone" in options and options["backbone"] not in backbone_names():
        raise ValueError(f"{name}: unknown backbone {options['backbone']!r}; valid: {backbone_names()}")
    for key, valid in (
        ("loss_weights", ("bbox", "giou", "vfl")),
        ("matcher_costs", ("cost_bbox", "cost_class", "cost_giou")),
    ):
        if key in options and options[key] is not None:
            if not isinstance(options[key], dict):
                raise ValueError(f"{name}: {key} must be a mapping, got {options[key]!r}")
            wrong = sorted(set(options[key]) - set(valid))
            if wrong:
                raise ValueError(f"{name}: {key}: unknown key(s) {wrong}; valid: {list(valid)}")
    if "dense_o2m" in options and (not isinstance(options["dense_o2m"], int) or options["dense_o2m"] < 0):
        raise ValueError(f"{name}: dense_o2m must be an integer >= 0 (positives per object), "
                         f"got {options['dense_o2m']!r}")
    if "freeze_at" in options and (not isinstance(options["freeze_at"], int) or options["freeze_at"] < -1):
        raise ValueError(f"{name}: freeze_at must be an integer >= -1, got {options['freeze_at']!r}")
    weights = options.get("backbone_weights", "none")
    if weights == "imagenet" and options.get("backbone", preset.get("backbone")) in TINY_ARCHITECTURES:
        raise ValueError(f"{name}: {options.get('backbone', preset.get('backbone'))} has no ImageNet weights: "
                         f"train it from scratch (backbone_weights: none) or give a file of its own")
    if weights not in ("", "none", "imagenet", None):
        if not isinstance(weights, str):
            raise ValueError(f"{name}: backbone_weights must be 'none', 'imagenet' or a file, got {weights!r}")
        if not storage.exists(weights):
            raise ValueError(f"{name}: backbone_weights file not found: {weights}")


def build_model(name: str, num_classes: int, **options) -> Detector:
    # A missing backbone_weights file is reported by the backbone when it reads it (FileNotFoundError).
    check_model(name, {k: v for k, v in options.items() if k != "backbone_weights"})
    cls, preset = PRESETS[name]
    return cls(num_classes, **{**preset, **options})
