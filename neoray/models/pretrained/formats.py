"""Each pretrained format read into what it is (``PretrainedInfo``: the preset it fits, the build options
it needs, its classes) and its tensors under the format's own names (``PretrainedFile``).

``open_pretrained(path)`` tells the format from the file itself, never from its name: a Hugging Face
folder (``model.safetensors`` + ``config.json``), a neoray checkpoint (``"format": "neoray-checkpoint"``)
or a reference RT-DETR ``.pth`` (``{"model": ...}`` or ``{"ema": {"module": ...}}``). The preset and its
options are inferred from the tensors' names and shapes (reference) or ``config.json`` (Hugging Face),
whose every size is checked against ``HF_LIMITS`` before anything is built from it.
"""

from __future__ import annotations

import inspect
import re
from dataclasses import dataclass, field

import torch

from neoray import storage
from neoray.checkpoints.files import (
    PretrainedError,
    check_safetensors,
    huggingface_files,
    read_safetensors,
    read_torch_file,
)
from neoray.checkpoints.format import FILE_NAME, is_neoray_checkpoint
from neoray.config import brief
from neoray.models.pretrained.coco import COCO_CATEGORIES, COCO_CLASS_NAMES
from neoray.models.registry import PRESETS, accepted_options

FORMATS = ("neoray", "reference", "huggingface")
CONVENTION_KEYS = ("input_normalization", "position_order")
# What the reference and Hugging Face models were trained with (see the module docstring).
IMPORTED_CONVENTIONS = {"input_normalization": "unit", "position_order": "yx"}
NEORAY_DEFAULT_CONVENTIONS = {"input_normalization": "imagenet", "position_order": "xy"}


def placeholder_names(count: int) -> list[str]:
    """Names for classes a checkpoint does not name; never matched to the user's classes by name."""
    return [f"class_{i}" for i in range(count)]


# The (least, largest) value config.json may declare for each size. The published RT-DETRs use d_model 256,
# feed-forward widths of 1024-2048, 300 queries, 3-6 decoder layers, 8 heads, 4 points, 100 denoising
# queries and 80 classes; the bounds leave ample room and still refuse what would allocate gigabytes when
# the model is built (d_model 10^9 asks for 512 GB).
HF_LIMITS = {
    "d_model": (1, 4096), "encoder_hidden_dim": (1, 4096), "encoder_attention_heads": (1, 64),
    "encoder_ffn_dim": (1, 16384), "num_queries": (1, 10000), "decoder_layers": (1, 64),
    "decoder_attention_heads": (1, 64), "decoder_ffn_dim": (1, 16384), "decoder_n_points": (1, 64),
    "num_denoising": (0, 10000), "num_labels": (1, 100000),
}
HF_FLOAT_LIMITS = {"hidden_expansion": (1e-3, 16.0), "label_noise_ratio": (0.0, 1.0), "box_noise_scale": (0.0, 100.0)}

# PResNet depth from (blocks per stage, bottleneck?) as the tensors show them.
_RESNET_VD = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
              ((3, 4, 23, 3), True): 101}


@dataclass
class PretrainedInfo:
    format: str  # "neoray" | "reference" | "huggingface"
    path: str
    model_name: str | None  # the preset the weights fit (inferred from the tensors for reference/HF)
    options: dict  # build_model options the weights need: conventions + values that differ from the preset
    class_names: list[str]  # in label order
    categories: list[dict] | None = None  # [{id, name, label}] when known
    num_classes: int | None = None

    @property
    def conventions(self) -> dict:
        return {key: self.options[key] for key in CONVENTION_KEYS if key in self.options}


@dataclass
class PretrainedFile:
    info: PretrainedInfo
    tensors: dict  # name -> tensor, as the format names them
    notes: list = field(default_factory=list)


def _strip_module(state: dict) -> dict:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from a DDP-wrapped model
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def open_pretrained(path, with_tensors: bool = True) -> PretrainedFile:
    """The checkpoint's info and tensors. ``with_tensors=False`` may skip reading the tensors where the
    format describes itself without them (Hugging Face: config.json)."""
    path = str(path)
    kind = storage.info(path).kind
    if kind == "missing":
        raise PretrainedError(f"{path}: not found")
    if kind == "other":
        raise PretrainedError(f"{path}: {storage.describe(path)}, not a checkpoint file or directory; not read")
    hf = huggingface_files(path)
    if hf is not None:
        return _open_huggingface(path, *hf, with_tensors=with_tensors)
    if storage.is_dir(path) and not storage.is_file(storage.join(path, FILE_NAME)):
        raise PretrainedError(f"{path}: a directory without checkpoint.pt (neoray) or model.safetensors + "
                              f"config.json (Hugging Face)")
    obj = read_torch_file(storage.join(path, FILE_NAME) if storage.is_dir(path) else path)
    if is_neoray_checkpoint(obj):
        return _open_neoray(path, obj)
    if isinstance(obj, dict) and (isinstance(obj.get("model"), dict) or
                                  (isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("module"), dict))):
        return _open_reference(path, obj)
    keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise PretrainedError(f"{path}: not a neoray checkpoint, a reference RT-DETR .pth ({{'model': ...}} or "
                          f"{{'ema': {{'module': ...}}}}) or a Hugging Face RT-DETR (found {keys})")


def describe_pretrained(path) -> PretrainedInfo:
    """What a pretrained file holds: format, the preset and options to build for it, its classes."""
    return open_pretrained(path, with_tensors=False).info


# --- neoray -------------------------------------------------------------------------------------------


def _open_neoray(path: str, ckpt: dict) -> PretrainedFile:
    state = ckpt.get("ema") or ckpt.get("model")
    if not isinstance(state, dict):
        raise PretrainedError(f"{path}: neoray checkpoint without model weights")
    categories = sorted(ckpt.get("categories") or [], key=lambda c: c.get("label", 0))
    config = ckpt.get("config") or {}
    options = dict(((config.get("model") or {}).get("options")) or {})
    options.pop("backbone_weights", None)  # every weight comes from the checkpoint
    name = ckpt.get("model_name")
    if name:
        for key, default in NEORAY_DEFAULT_CONVENTIONS.items():
            if key in _accepted(name):
                options.setdefault(key, default)
    num_classes = ckpt.get("num_classes")
    info = PretrainedInfo("neoray", path, name, options, [str(c.get("name")) for c in categories],
                          [dict(c) for c in categories] or None, int(num_classes) if num_classes is not None else None)
    notes = ["using its EMA weights" if ckpt.get("ema") else "using its model weights (no EMA in it)"]
    return PretrainedFile(info, _strip_module(state), notes)


def _accepted(model_name: str) -> set:
    return accepted_options(PRESETS[model_name][0]) if model_name in PRESETS else set()


# --- reference ----------------------------------------------------------------------------------------


def _count(tensors: dict, pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over the names (indices 0..n-1)."""
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in tensors if (m := regex.fullmatch(k))}
    return max(found) + 1 if found else 0


def _preset_values(model_name: str) -> dict:
    cls, preset = PRESETS[model_name]
    defaults = {k: p.default for k, p in inspect.signature(cls.__init__).parameters.items()
                if p.default is not inspect.Parameter.empty}
    return {**defaults, **preset}


def _differing(model_name: str, values: dict) -> dict:
    preset = _preset_values(model_name)
    out = {}
    for key, value in values.items():
        current = preset.get(key)
        if key == "encoder_dim" and current is None:  # None: as wide as the decoder
            current = values.get("hidden_dim", preset["hidden_dim"])
        if value != current:
            out[key] = value
    return out


def _open_reference(path: str, obj: dict) -> PretrainedFile:
    use_ema = isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("module"), dict)
    tensors = _strip_module(obj["ema"]["module"] if use_ema else obj["model"])
    notes = ["using its EMA weights (ema.module)" if use_ema else "using its model weights (no EMA in it)"]

    depths = tuple(_count(tensors, rf"backbone\.res_layers\.{s}\.blocks\.(\d+)\..+") for s in range(4))
    bottleneck = any(".branch2c." in k for k in tensors if k.startswith("backbone."))
    depth = _RESNET_VD.get((depths, bottleneck))
    if depth is None:
        raise PretrainedError(f"{path}: reference RT-DETR with a backbone neoray does not have (PResNet blocks per "
                              f"stage {list(depths)}, bottleneck={bottleneck}); neoray has ResNet-vd 18/34/50/101")

    def shape(key: str) -> tuple:
        if key not in tensors:
            raise PretrainedError(f"{path}: reference RT-DETR checkpoint without {key}")
        return tuple(tensors[key].shape)

    if "decoder.tgt_embed.weight" in tensors:
        raise PretrainedError(f"{path}: learnt initial queries (decoder.tgt_embed) are not supported")
    if (
        _count(tensors, r"encoder\.encoder\.0\.layers\.(\d+)\..+") != 1
        or _count(tensors, r"encoder\.encoder\.(\d+)\..+") != 1
    ):
        raise PretrainedError(f"{path}: neoray's hybrid encoder has one AIFI layer on the coarsest map")
    if _count(tensors, r"decoder\.input_proj\.(\d+)\..+") != 3:
        raise PretrainedError(f"{path}: neoray's decoder reads 3 feature levels")
    num_classes = shape("decoder.dec_score_head.0.weight")[0]
    hidden = shape("decoder.enc_output.0.weight")[0]
    encoder_dim = shape("encoder.input_proj.0.0.weight")[0]
    heads = _preset_values(f"rtdetr_r{depth}vd")["decoder_heads"]
    per_query = shape("decoder.decoder.layers.0.cross_attn.attention_weights.weight")[0]
    if per_query % (heads * 3):
        raise PretrainedError(
            f"{path}: cross-attention of {per_query} weights per query does not fit {heads} heads x 3 levels"
        )
    values = {
        "hidden_dim": hidden,
        "encoder_dim": encoder_dim,
        "encoder_ffn_dim": shape("encoder.encoder.0.layers.0.linear1.weight")[0],
        "csp_blocks": _count(tensors, r"encoder\.fpn_blocks\.0\.bottlenecks\.(\d+)\..+"),
        "csp_expansion": shape("encoder.fpn_blocks.0.conv1.conv.weight")[0] / encoder_dim,
        "num_decoder_layers": _count(tensors, r"decoder\.dec_score_head\.(\d+)\.weight"),
        "decoder_ffn_dim": shape("decoder.decoder.layers.0.linear1.weight")[0],
        "num_points": per_query // (heads * 3),
    }
    if "decoder.denoising_class_embed.weight" not in tensors:
        values["num_denoising"] = 0
    name = f"rtdetr_r{depth}vd"
    options = {**_differing(name, values), **IMPORTED_CONVENTIONS}
    if num_classes == len(COCO_CATEGORIES):
        names = list(COCO_CLASS_NAMES)
        categories = [{"id": cid, "name": n, "label": i} for i, (cid, n) in enumerate(COCO_CATEGORIES)]
    else:  # a reference model trained on another dataset: the .pth does not name its classes
        names = placeholder_names(num_classes)
        categories = None
        notes.append(f"{num_classes} classes, not COCO's 80: their names are not in the file (class_0 ...)")
    return PretrainedFile(
        PretrainedInfo("reference", path, name, options, names, categories, num_classes), tensors, notes
    )


# --- Hugging Face -------------------------------------------------------------------------------------


def _hf_int(config_path: str, config: dict, key: str, default: int) -> int:
    value = config.get(key, default)
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise PretrainedError(f"{config_path}: {key} must be an integer, got {brief(value)}")
    low, high = HF_LIMITS[key]
    if not low <= value <= high:
        raise PretrainedError(f"{config_path}: {key} {value} is outside [{low}, {high}], what neoray builds")
    return value


def _hf_float(config_path: str, config: dict, key: str, default: float) -> float:
    value = config.get(key, default)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise PretrainedError(f"{config_path}: {key} must be a number, got {brief(value)}")
    low, high = HF_FLOAT_LIMITS[key]
    if not low <= value <= high:  # NaN included
        raise PretrainedError(f"{config_path}: {key} {value} is outside [{low}, {high}], what neoray builds")
    return float(value)


def _hf_object(config_path: str, value, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise PretrainedError(f"{config_path}: {key} must be an object, got {brief(value)}")
    return value


def _read_hf_config(config_path: str) -> dict:
    try:
        config = storage.read_json(config_path)
    except storage.JSONError as exc:  # names the file
        raise PretrainedError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise PretrainedError(f"{config_path}: not valid JSON ({exc})") from None
    return _hf_object(config_path, config, "the top level")


def _hf_depth(config_path: str, backbone: dict) -> int:
    depths = backbone.get("depths")
    if not (isinstance(depths, list) and all(isinstance(d, int) and not isinstance(d, bool) for d in depths)):
        depths = None
    depth = _RESNET_VD.get((tuple(depths or ()), backbone.get("layer_type") == "bottleneck"))
    if depth is None:
        raise PretrainedError(f"{config_path}: ResNet depths {brief(backbone.get('depths'))} "
                              f"({brief(backbone.get('layer_type'))}) are not ResNet-vd 18/34/50/101")
    return depth


def _hf_class_names(config_path: str, config: dict) -> list[str]:
    id2label = _hf_object(config_path, config.get("id2label"), "id2label")
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:
        raise PretrainedError(f"{config_path}: id2label keys must be class indices") from None
    if not names:  # no id2label: only a count
        names = placeholder_names(_hf_int(config_path, config, "num_labels", 0)) if "num_labels" in config else []
    if not names:
        raise PretrainedError(f"{config_path}: neither id2label nor num_labels: how many classes?")
    if len(names) > HF_LIMITS["num_labels"][1]:
        raise PretrainedError(f"{config_path}: id2label holds {len(names)} classes, over {HF_LIMITS['num_labels'][1]}")
    return names


def _open_huggingface(path: str, weights: str, config_path: str, with_tensors: bool = True) -> PretrainedFile:
    config = _read_hf_config(config_path)
    if config.get("model_type") != "rt_detr":
        raise PretrainedError(f"{config_path}: model_type {brief(config.get('model_type'))}; neoray imports 'rt_detr'")
    backbone = _hf_object(config_path, config.get("backbone_config"), "backbone_config")
    if config.get("use_timm_backbone") or backbone.get("model_type") != "rt_detr_resnet":
        raise PretrainedError(f"{config_path}: backbone {brief(backbone.get('model_type') or config.get('backbone'))}; "
                              f"neoray imports the RT-DETR ResNet-vd backbone (rt_detr_resnet)")
    depth = _hf_depth(config_path, backbone)
    d_model = _hf_int(config_path, config, "d_model", 256)
    encoder_dim = _hf_int(config_path, config, "encoder_hidden_dim", d_model)
    unsupported = {
        "encoder_layers": (config.get("encoder_layers", 1), 1),
        "encode_proj_layers": (config.get("encode_proj_layers", [2]), [2]),
        "num_feature_levels": (config.get("num_feature_levels", 3), 3),
        "feat_strides": (config.get("feat_strides", [8, 16, 32]), [8, 16, 32]),
        "decoder_in_channels": (config.get("decoder_in_channels", [encoder_dim] * 3), [encoder_dim] * 3),
        "learn_initial_query": (bool(config.get("learn_initial_query", config.get("learnt_init_query", False))), False),
        "normalize_before": (bool(config.get("normalize_before", False)), False),
        "with_box_refine": (bool(config.get("with_box_refine", True)), True),
        "activation_function": (config.get("activation_function", "silu"), "silu"),
        "encoder_activation_function": (config.get("encoder_activation_function", "gelu"), "gelu"),
        "decoder_activation_function": (config.get("decoder_activation_function", "relu"), "relu"),
        "positional_encoding_temperature": (
            config.get("positional_encoding_temperature", config.get("pe_temperature", 10000)),
            10000,
        ),
    }
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise PretrainedError(f"{config_path}: {key}={brief(value)}; neoray's RT-DETR has {expected!r}")
    names = _hf_class_names(config_path, config)
    num_classes = len(names)
    values = {
        "hidden_dim": d_model,
        "encoder_dim": encoder_dim,
        "encoder_heads": _hf_int(config_path, config, "encoder_attention_heads", 8),
        "encoder_ffn_dim": _hf_int(config_path, config, "encoder_ffn_dim", 1024),
        "csp_expansion": _hf_float(config_path, config, "hidden_expansion", 1.0),
        "num_queries": _hf_int(config_path, config, "num_queries", 300),
        "num_decoder_layers": _hf_int(config_path, config, "decoder_layers", 6),
        "decoder_heads": _hf_int(config_path, config, "decoder_attention_heads", 8),
        "decoder_ffn_dim": _hf_int(config_path, config, "decoder_ffn_dim", 1024),
        "num_points": _hf_int(config_path, config, "decoder_n_points", 4),
        "num_denoising": _hf_int(config_path, config, "num_denoising", 100),
        "label_noise_ratio": _hf_float(config_path, config, "label_noise_ratio", 0.5),
        "box_noise_scale": _hf_float(config_path, config, "box_noise_scale", 1.0),
    }
    name = f"rtdetr_r{depth}vd"
    options = {**_differing(name, values), **IMPORTED_CONVENTIONS, **_huggingface_normalization(weights, config_path)}
    categories = None
    if [n.lower() for n in names] == [n.lower() for n in COCO_CLASS_NAMES]:
        categories = [{"id": cid, "name": n, "label": i} for i, (cid, n) in enumerate(COCO_CATEGORIES)]
    info = PretrainedInfo("huggingface", path, name, options, names, categories, num_classes)
    if not with_tensors:
        check_safetensors(weights)  # described without its tensors, but never a file that cannot be read
    return PretrainedFile(info, read_safetensors(weights) if with_tensors else {}, [])


def _huggingface_normalization(weights: str, config_path: str) -> dict:
    """The input normalisation of the model's image processor (preprocessor_config.json when present;
    RT-DETR's processor rescales to [0, 1] and does not normalise by default)."""
    processor = storage.join(storage.parent(config_path), "preprocessor_config.json")
    if not storage.is_file(processor):
        return {}
    try:
        settings = _hf_object(processor, storage.read_json(processor), "the top level")
    except storage.JSONError as exc:
        raise PretrainedError(str(exc)) from None
    if settings.get("do_rescale", True) is False:
        raise PretrainedError(f"{processor}: do_rescale is false; neoray feeds pixels scaled to [0, 1] or normalised")
    if not settings.get("do_normalize", False):
        return {}
    try:
        mean = [round(float(v), 3) for v in settings.get("image_mean", [])]
        std = [round(float(v), 3) for v in settings.get("image_std", [])]
    except (TypeError, ValueError):
        raise PretrainedError(f"{processor}: image_mean and image_std must be lists of numbers") from None
    if mean == [0.485, 0.456, 0.406] and std == [0.229, 0.224, 0.225]:
        return {"input_normalization": "imagenet"}
    raise PretrainedError(f"{processor}: normalises with mean {mean} and std {std}; neoray has ImageNet's or none")


__all__ = [
    "CONVENTION_KEYS", "FORMATS", "HF_FLOAT_LIMITS", "HF_LIMITS", "IMPORTED_CONVENTIONS", "NEORAY_DEFAULT_CONVENTIONS",
    "PretrainedFile", "PretrainedInfo", "describe_pretrained", "open_pretrained", "placeholder_names",
]
