"""Start from a pretrained detector: neoray checkpoints, the reference RT-DETR's ``.pth`` files and
Hugging Face ``transformers`` RT-DETR models.

``load_pretrained(model, path, class_names)`` is the one loader every caller uses (``train.init_from``,
``neoray eval`` / ``neoray predict`` through ``build_pretrained``). It accepts:

* **neoray**: a checkpoint directory holding ``checkpoint.pt``, or the file; a dict with ``"format":
  "neoray-checkpoint"``, ``"model"``, ``"ema"`` (used when present), ``"model_name"``, ``"num_classes"``,
  ``"categories"`` and ``"config"``. Tensors load by their exact names.
* **reference** (lyuwenyu/RT-DETR, ``rtdetr_pytorch``): a ``.pth`` holding ``{"model": state_dict}`` or
  ``{"ema": {"module": state_dict}}`` (the EMA weights are used when present, as the reference evaluates
  with them). Its PResNet backbone keys are neoray's ``rtdetr_r*vd`` backbone keys; the encoder and decoder
  follow the explicit table ``reference_key_map``.
* **huggingface**: a directory with ``model.safetensors`` and ``config.json`` (as published for
  ``PekingU/rtdetr_r50vd`` and siblings), or the ``.safetensors`` file with ``config.json`` beside it;
  read with the ``safetensors`` package. Names follow ``huggingface_key_map``: the reference names renamed
  as transformers' ``convert_rt_detr_original_pytorch_checkpoint_to_hf.py`` renames them, with each
  ``nn.MultiheadAttention.in_proj_*`` split into ``q_proj``/``k_proj``/``v_proj`` (rows in that order).

Nothing is matched by suffix or by shape: a tensor whose name is not in the table is reported. Every
model tensor that is not loaded is listed with the reason ("not in the checkpoint", "shape (a) vs (b)
(checkpoint vs model)", "no counterpart in the ... layout") and so is every checkpoint tensor the model
has no place for ("not in the model").

**Conventions travel with the format.** The reference and Hugging Face models were trained on pixels
scaled to [0, 1] without ImageNet mean/std (``input_normalization="unit"``), with the AIFI position
embedding's halves in the order rows-then-columns (``position_order="yx"``, see
neoray.models.position). ``describe_pretrained(path).options`` carries them, so the engine builds the
model with them (and the run's config records them); ``load_pretrained`` sets them on a model built
otherwise, and says so. A neoray checkpoint carries the options of its own config.

**Classes.** A checkpoint's classes are known by name: COCO's 80 for the reference format (label i is the
i-th COCO category sorted by id), ``id2label`` for Hugging Face, ``categories`` for neoray. When the
user's ``class_names`` differ, the class-dependent tensors (the score heads, the encoder's score head,
the denoising label embedding) keep their fresh initialisation except the rows of classes whose name
equals a checkpoint class name (case-insensitive), which are copied: those classes start trained.

Every file is read weights-only (``read_torch_file``): a pickle that would need to run code is refused.
"""

from __future__ import annotations

import io
import re
from dataclasses import dataclass, field
from typing import Callable

import torch

from neoray import storage

NEORAY_CHECKPOINT_FORMAT = "neoray-checkpoint"
FORMATS = ("neoray", "reference", "huggingface")
CONVENTION_KEYS = ("input_normalization", "position_order")
# What the reference and Hugging Face models were trained with (see the module docstring).
IMPORTED_CONVENTIONS = {"input_normalization": "unit", "position_order": "yx"}
NEORAY_DEFAULT_CONVENTIONS = {"input_normalization": "imagenet", "position_order": "xy"}

# COCO's 80 detection categories (id, name); the reference's label i is the i-th of these (sorted by id).
COCO_CATEGORIES = [
    (1, "person"), (2, "bicycle"), (3, "car"), (4, "motorcycle"), (5, "airplane"), (6, "bus"), (7, "train"),
    (8, "truck"), (9, "boat"), (10, "traffic light"), (11, "fire hydrant"), (13, "stop sign"),
    (14, "parking meter"), (15, "bench"), (16, "bird"), (17, "cat"), (18, "dog"), (19, "horse"), (20, "sheep"),
    (21, "cow"), (22, "elephant"), (23, "bear"), (24, "zebra"), (25, "giraffe"), (27, "backpack"),
    (28, "umbrella"), (31, "handbag"), (32, "tie"), (33, "suitcase"), (34, "frisbee"), (35, "skis"),
    (36, "snowboard"), (37, "sports ball"), (38, "kite"), (39, "baseball bat"), (40, "baseball glove"),
    (41, "skateboard"), (42, "surfboard"), (43, "tennis racket"), (44, "bottle"), (46, "wine glass"),
    (47, "cup"), (48, "fork"), (49, "knife"), (50, "spoon"), (51, "bowl"), (52, "banana"), (53, "apple"),
    (54, "sandwich"), (55, "orange"), (56, "broccoli"), (57, "carrot"), (58, "hot dog"), (59, "pizza"),
    (60, "donut"), (61, "cake"), (62, "chair"), (63, "couch"), (64, "potted plant"), (65, "bed"),
    (67, "dining table"), (70, "toilet"), (72, "tv"), (73, "laptop"), (74, "mouse"), (75, "remote"),
    (76, "keyboard"), (77, "cell phone"), (78, "microwave"), (79, "oven"), (80, "toaster"), (81, "sink"),
    (82, "refrigerator"), (84, "book"), (85, "clock"), (86, "vase"), (87, "scissors"), (88, "teddy bear"),
    (89, "hair drier"), (90, "toothbrush"),
]
COCO_CLASS_NAMES = [name for _, name in COCO_CATEGORIES]

def _placeholder_names(count: int) -> list[str]:
    """Names for classes a checkpoint does not name; never matched to the user's classes by name."""
    return [f"class_{i}" for i in range(count)]


# PResNet depth from (blocks per stage, bottleneck?) as the tensors show them.
_RESNET_VD = {((2, 2, 2, 2), False): 18, ((3, 4, 6, 3), False): 34, ((3, 4, 6, 3), True): 50,
              ((3, 4, 23, 3), True): 101}


class PretrainedError(ValueError):
    """A pretrained file neoray cannot use; the message is one line naming the file."""


# ----------------------------------------------------------------------------------------------------
# Reading files
# ----------------------------------------------------------------------------------------------------


def read_torch_file(path) -> object:
    """The object in a ``torch.save`` file (local path or URI), loaded weights-only on the CPU.

    A file that needs arbitrary code to unpickle (a class, a function: what ``weights_only=False`` would
    run) is refused with a one-line PretrainedError; so is a file torch cannot read at all.
    """
    data = storage.read_bytes(path)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the file
        message = str(exc)
        # weights_only refuses to import anything it does not know ("GLOBAL module.name"): what a pickle
        # imports it calls, so such a file would run code. Other refusals are bytes that are no pickle.
        found = re.search(r"[^\n]*GLOBAL [^\n]*|Unsupported global[^\n]*", message)
        if found:
            detail = found.group(0).strip().rstrip(".")
            raise PretrainedError(f"{path}: refused: unpickling it would run code ({detail}); "
                                  f"neoray loads weights only") from None
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise PretrainedError(f"{path}: cannot read it as a torch file ({type(exc).__name__}: {detail})") from None


def _huggingface_files(path: str) -> tuple[str, str] | None:
    """(model.safetensors, config.json) when ``path`` is a Hugging Face model, else None."""
    if path.endswith(".safetensors"):
        config = storage.join(storage.parent(path), "config.json")
        if not storage.is_file(config):
            raise PretrainedError(f"{path}: a .safetensors file needs the config.json of its model beside it")
        return path, config
    if storage.is_dir(path):
        weights, config = storage.join(path, "model.safetensors"), storage.join(path, "config.json")
        if storage.is_file(weights) and storage.is_file(config):
            return weights, config
    return None


def is_huggingface(path) -> bool:
    return _huggingface_files(str(path)) is not None


def _neoray_file(path: str) -> str:
    return storage.join(path, "checkpoint.pt") if storage.is_dir(path) else path


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
class _Checkpoint:
    info: PretrainedInfo
    tensors: dict  # name -> tensor, as the format names them
    notes: list = field(default_factory=list)


def _strip_module(state: dict) -> dict:
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if tensors and all(k.startswith("module.") for k in tensors):  # saved from a DDP-wrapped model
        return {k[len("module."):]: v for k, v in tensors.items()}
    return tensors


def _open(path, with_tensors: bool = True) -> _Checkpoint:
    """The checkpoint's info and tensors. ``with_tensors=False`` may skip reading the tensors where the
    format describes itself without them (Hugging Face: config.json)."""
    path = str(path)
    if not storage.exists(path):
        raise PretrainedError(f"{path}: not found")
    hf = _huggingface_files(path)
    if hf is not None:
        return _open_huggingface(path, *hf, with_tensors=with_tensors)
    if storage.is_dir(path) and not storage.is_file(_neoray_file(path)):
        raise PretrainedError(f"{path}: a directory without checkpoint.pt (neoray) or model.safetensors + "
                              f"config.json (Hugging Face)")
    obj = read_torch_file(_neoray_file(path))
    if isinstance(obj, dict) and obj.get("format") == NEORAY_CHECKPOINT_FORMAT:
        return _open_neoray(path, obj)
    if isinstance(obj, dict) and (isinstance(obj.get("model"), dict) or
                                  (isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("module"), dict))):
        return _open_reference(path, obj)
    keys = sorted(obj)[:6] if isinstance(obj, dict) else type(obj).__name__
    raise PretrainedError(f"{path}: not a neoray checkpoint, a reference RT-DETR .pth ({{'model': ...}} or "
                          f"{{'ema': {{'module': ...}}}}) or a Hugging Face RT-DETR (found {keys})")


def describe_pretrained(path) -> PretrainedInfo:
    """What a pretrained file holds: format, the preset and options to build for it, its classes."""
    return _open(path, with_tensors=False).info


# --- neoray -------------------------------------------------------------------------------------------


def _open_neoray(path: str, ckpt: dict) -> _Checkpoint:
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
    return _Checkpoint(info, _strip_module(state), notes)


def _accepted(model_name: str) -> set:
    from neoray.models.registry import PRESETS, _accepted_options

    return _accepted_options(PRESETS[model_name][0]) if model_name in PRESETS else set()


# --- reference ----------------------------------------------------------------------------------------


def _count(tensors: dict, pattern: str) -> int:
    """How many distinct values the first group of ``pattern`` takes over the names (indices 0..n-1)."""
    regex = re.compile(pattern)
    found = {int(m.group(1)) for k in tensors if (m := regex.fullmatch(k))}
    return max(found) + 1 if found else 0


def _preset_values(model_name: str) -> dict:
    import inspect

    from neoray.models.registry import PRESETS

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


def _open_reference(path: str, obj: dict) -> _Checkpoint:
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
    if _count(tensors, r"encoder\.encoder\.0\.layers\.(\d+)\..+") != 1 or _count(tensors, r"encoder\.encoder\.(\d+)\..+") != 1:
        raise PretrainedError(f"{path}: neoray's hybrid encoder has one AIFI layer on the coarsest map")
    if _count(tensors, r"decoder\.input_proj\.(\d+)\..+") != 3:
        raise PretrainedError(f"{path}: neoray's decoder reads 3 feature levels")
    num_classes = shape("decoder.dec_score_head.0.weight")[0]
    hidden = shape("decoder.enc_output.0.weight")[0]
    encoder_dim = shape("encoder.input_proj.0.0.weight")[0]
    heads = _preset_values(f"rtdetr_r{depth}vd")["decoder_heads"]
    per_query = shape("decoder.decoder.layers.0.cross_attn.attention_weights.weight")[0]
    if per_query % (heads * 3):
        raise PretrainedError(f"{path}: cross-attention of {per_query} weights per query does not fit {heads} heads x 3 levels")
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
        names = _placeholder_names(num_classes)
        categories = None
        notes.append(f"{num_classes} classes, not COCO's 80: their names are not in the file (class_0 ...)")
    return _Checkpoint(PretrainedInfo("reference", path, name, options, names, categories, num_classes), tensors, notes)


# --- Hugging Face -------------------------------------------------------------------------------------


def _open_huggingface(path: str, weights: str, config_path: str, with_tensors: bool = True) -> _Checkpoint:
    try:
        config = storage.read_json(config_path)
    except (ValueError, UnicodeDecodeError) as exc:
        raise PretrainedError(f"{config_path}: not valid JSON ({exc})") from None
    if config.get("model_type") != "rt_detr":
        raise PretrainedError(f"{config_path}: model_type {config.get('model_type')!r}; neoray imports 'rt_detr'")
    backbone = config.get("backbone_config") or {}
    if config.get("use_timm_backbone") or backbone.get("model_type") != "rt_detr_resnet":
        raise PretrainedError(f"{config_path}: backbone {backbone.get('model_type') or config.get('backbone')!r}; "
                              f"neoray imports the RT-DETR ResNet-vd backbone (rt_detr_resnet)")
    depth = _RESNET_VD.get((tuple(backbone.get("depths") or ()), backbone.get("layer_type") == "bottleneck"))
    if depth is None:
        raise PretrainedError(f"{config_path}: ResNet depths {backbone.get('depths')} ({backbone.get('layer_type')}) "
                              f"are not ResNet-vd 18/34/50/101")
    d_model = int(config.get("d_model", 256))
    encoder_dim = int(config.get("encoder_hidden_dim", d_model))
    unsupported = {
        "encoder_layers": (config.get("encoder_layers", 1), 1),
        "encode_proj_layers": (list(config.get("encode_proj_layers", [2])), [2]),
        "num_feature_levels": (config.get("num_feature_levels", 3), 3),
        "feat_strides": (list(config.get("feat_strides", [8, 16, 32])), [8, 16, 32]),
        "decoder_in_channels": (list(config.get("decoder_in_channels", [encoder_dim] * 3)), [encoder_dim] * 3),
        "learn_initial_query": (bool(config.get("learn_initial_query", config.get("learnt_init_query", False))), False),
        "normalize_before": (bool(config.get("normalize_before", False)), False),
        "with_box_refine": (bool(config.get("with_box_refine", True)), True),
        "activation_function": (config.get("activation_function", "silu"), "silu"),
        "encoder_activation_function": (config.get("encoder_activation_function", "gelu"), "gelu"),
        "decoder_activation_function": (config.get("decoder_activation_function", "relu"), "relu"),
        "positional_encoding_temperature": (config.get("positional_encoding_temperature", config.get("pe_temperature", 10000)), 10000),
    }
    for key, (value, expected) in unsupported.items():
        if value != expected:
            raise PretrainedError(f"{config_path}: {key}={value!r}; neoray's RT-DETR has {expected!r}")
    id2label = config.get("id2label") or {}
    try:
        names = [str(id2label[k]) for k in sorted(id2label, key=int)]
    except ValueError:
        raise PretrainedError(f"{config_path}: id2label keys must be class indices") from None
    if not names:  # no id2label: only a count
        names = _placeholder_names(int(config.get("num_labels", 0)))
    if not names:
        raise PretrainedError(f"{config_path}: neither id2label nor num_labels: how many classes?")
    num_classes = len(names)
    values = {
        "hidden_dim": d_model,
        "encoder_dim": encoder_dim,
        "encoder_heads": int(config.get("encoder_attention_heads", 8)),
        "encoder_ffn_dim": int(config.get("encoder_ffn_dim", 1024)),
        "csp_expansion": float(config.get("hidden_expansion", 1.0)),
        "num_queries": int(config.get("num_queries", 300)),
        "num_decoder_layers": int(config.get("decoder_layers", 6)),
        "decoder_heads": int(config.get("decoder_attention_heads", 8)),
        "decoder_ffn_dim": int(config.get("decoder_ffn_dim", 1024)),
        "num_points": int(config.get("decoder_n_points", 4)),
        "num_denoising": int(config.get("num_denoising", 100)),
        "label_noise_ratio": float(config.get("label_noise_ratio", 0.5)),
        "box_noise_scale": float(config.get("box_noise_scale", 1.0)),
    }
    name = f"rtdetr_r{depth}vd"
    options = {**_differing(name, values), **IMPORTED_CONVENTIONS, **_huggingface_normalization(weights, config_path)}
    categories = None
    if [n.lower() for n in names] == [n.lower() for n in COCO_CLASS_NAMES]:
        categories = [{"id": cid, "name": n, "label": i} for i, (cid, n) in enumerate(COCO_CATEGORIES)]
    info = PretrainedInfo("huggingface", path, name, options, names, categories, num_classes)
    return _Checkpoint(info, _read_safetensors(weights) if with_tensors else {}, [])


def _read_safetensors(weights: str) -> dict:
    try:
        from safetensors.torch import load as load_safetensors
    except ImportError:  # a dependency of neoray; only a broken install lacks it
        raise PretrainedError(f"{weights}: reading Hugging Face weights needs the safetensors package") from None
    try:  # safetensors holds tensors and a JSON header only: nothing in it can run code
        return load_safetensors(storage.read_bytes(weights))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise PretrainedError(f"{weights}: cannot read it as safetensors ({type(exc).__name__}: {exc})") from None


def _huggingface_normalization(weights: str, config_path: str) -> dict:
    """The input normalisation of the model's image processor (preprocessor_config.json when present;
    RT-DETR's processor rescales to [0, 1] and does not normalise by default)."""
    processor = storage.join(storage.parent(config_path), "preprocessor_config.json")
    if not storage.is_file(processor):
        return {}
    settings = storage.read_json(processor)
    if settings.get("do_rescale", True) is False:
        raise PretrainedError(f"{processor}: do_rescale is false; neoray feeds pixels scaled to [0, 1] or normalised")
    if not settings.get("do_normalize", False):
        return {}
    mean = [round(float(v), 3) for v in settings.get("image_mean", [])]
    std = [round(float(v), 3) for v in settings.get("image_std", [])]
    if mean == [0.485, 0.456, 0.406] and std == [0.229, 0.224, 0.225]:
        return {"input_normalization": "imagenet"}
    raise PretrainedError(f"{processor}: normalises with mean {mean} and std {std}; neoray has ImageNet's or none")


# ----------------------------------------------------------------------------------------------------
# Key maps: neoray name -> the format's name(s)
# ----------------------------------------------------------------------------------------------------

Rule = tuple[str, Callable[[re.Match], str]]
_PART = {"0": "conv", "1": "norm"}  # a ConvNormAct's children in neoray -> the reference's names


def _csp(prefix_neoray: str, prefix_reference: str) -> list[Rule]:
    """neoray's CSPRepLayer (main.0, main.1.. RepVGG, shortcut, out; ConvNormAct = Sequential(conv, bn))
    -> the reference's (conv1, bottlenecks.j with conv1 = 3x3 and conv2 = 1x1, conv2, conv3)."""
    part, n, r = _PART, re.escape(prefix_neoray), prefix_reference
    return [
        (rf"{n}\.(\d+)\.main\.0\.([01])\.(.+)", lambda m: f"{r}.{m[1]}.conv1.{part[m[2]]}.{m[3]}"),
        (rf"{n}\.(\d+)\.main\.(\d+)\.conv3\.([01])\.(.+)",
         lambda m: f"{r}.{m[1]}.bottlenecks.{int(m[2]) - 1}.conv1.{part[m[3]]}.{m[4]}"),
        (rf"{n}\.(\d+)\.main\.(\d+)\.conv1\.([01])\.(.+)",
         lambda m: f"{r}.{m[1]}.bottlenecks.{int(m[2]) - 1}.conv2.{part[m[3]]}.{m[4]}"),
        (rf"{n}\.(\d+)\.shortcut\.([01])\.(.+)", lambda m: f"{r}.{m[1]}.conv2.{part[m[2]]}.{m[3]}"),
        (rf"{n}\.(\d+)\.out\.([01])\.(.+)", lambda m: f"{r}.{m[1]}.conv3.{part[m[2]]}.{m[3]}"),
    ]


# neoray -> reference (lyuwenyu/RT-DETR rtdetr_pytorch module names).
REFERENCE_RULES: list[Rule] = [
    (r"backbone\.((?:conv1|res_layers)\..+)", lambda m: f"backbone.{m[1]}"),  # PResNet: the same names
    (r"encoder\.input_proj\.(\d+)\.([01])\.(.+)", lambda m: f"encoder.input_proj.{m[1]}.{m[2]}.{m[3]}"),
    (r"encoder\.aifi\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     lambda m: f"encoder.encoder.0.layers.0.self_attn.{m[1]}"),
    (r"encoder\.aifi\.ffn\.0\.(weight|bias)", lambda m: f"encoder.encoder.0.layers.0.linear1.{m[1]}"),
    (r"encoder\.aifi\.ffn\.3\.(weight|bias)", lambda m: f"encoder.encoder.0.layers.0.linear2.{m[1]}"),
    (r"encoder\.aifi\.(norm1|norm2)\.(weight|bias)", lambda m: f"encoder.encoder.0.layers.0.{m[1]}.{m[2]}"),
    (r"encoder\.lateral\.(\d+)\.([01])\.(.+)", lambda m: f"encoder.lateral_convs.{m[1]}.{_PART[m[2]]}.{m[3]}"),
    (r"encoder\.downsample\.(\d+)\.([01])\.(.+)", lambda m: f"encoder.downsample_convs.{m[1]}.{_PART[m[2]]}.{m[3]}"),
    *_csp("encoder.top_down", "encoder.fpn_blocks"),
    *_csp("encoder.bottom_up", "encoder.pan_blocks"),
    (r"decoder\.input_proj\.(\d+)\.([01])\.(.+)", lambda m: f"decoder.input_proj.{m[1]}.{_PART[m[2]]}.{m[3]}"),
    (r"decoder\.((?:enc_output|enc_score_head|enc_bbox_head|denoising_class_embed|query_pos_head)\..+)",
     lambda m: f"decoder.{m[1]}"),
    (r"decoder\.layers\.(\d+)\.((?:self_attn|cross_attn|norm1|norm2|norm3)\..+)",
     lambda m: f"decoder.decoder.layers.{m[1]}.{m[2]}"),
    (r"decoder\.layers\.(\d+)\.ffn\.0\.(weight|bias)", lambda m: f"decoder.decoder.layers.{m[1]}.linear1.{m[2]}"),
    (r"decoder\.layers\.(\d+)\.ffn\.3\.(weight|bias)", lambda m: f"decoder.decoder.layers.{m[1]}.linear2.{m[2]}"),
    (r"decoder\.score_heads\.(\d+)\.(weight|bias)", lambda m: f"decoder.dec_score_head.{m[1]}.{m[2]}"),
    (r"decoder\.bbox_heads\.(\d+)\.layers\.(\d+)\.(weight|bias)",
     lambda m: f"decoder.dec_bbox_head.{m[1]}.layers.{m[2]}.{m[3]}"),
]

_STAGE_BRANCH = {"a": 0, "b": 1, "c": 2}
_HF_BACKBONE = "model.backbone.model"
# reference -> Hugging Face, as transformers' convert_rt_detr_original_pytorch_checkpoint_to_hf.py renames
# (create_rename_keys). Each value is a list of alternatives (the first present in the file is read); the
# score and box heads are saved both under model.decoder.* and at the top level (tied modules).
HF_RULES: list[tuple[str, Callable[[re.Match], list[str]]]] = [
    (r"backbone\.conv1\.conv1_([123])\.conv\.weight",
     lambda m: [f"{_HF_BACKBONE}.embedder.embedder.{int(m[1]) - 1}.convolution.weight"]),
    (r"backbone\.conv1\.conv1_([123])\.norm\.(weight|bias|running_mean|running_var)",
     lambda m: [f"{_HF_BACKBONE}.embedder.embedder.{int(m[1]) - 1}.normalization.{m[2]}"]),
    (r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.conv\.weight",
     lambda m: [f"{_HF_BACKBONE}.encoder.stages.{m[1]}.layers.{m[2]}.layer.{_STAGE_BRANCH[m[3]]}.convolution.weight"]),
    (r"backbone\.res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.norm\.(weight|bias|running_mean|running_var)",
     lambda m: [f"{_HF_BACKBONE}.encoder.stages.{m[1]}.layers.{m[2]}.layer.{_STAGE_BRANCH[m[3]]}.normalization.{m[4]}"]),
    (r"backbone\.res_layers\.(\d+)\.blocks\.0\.short\.conv\.weight",
     lambda m: [f"{_HF_BACKBONE}.encoder.stages.{m[1]}.layers.0.shortcut.convolution.weight"]),
    (r"backbone\.res_layers\.(\d+)\.blocks\.0\.short\.norm\.(weight|bias|running_mean|running_var)",
     lambda m: [f"{_HF_BACKBONE}.encoder.stages.{m[1]}.layers.0.shortcut.normalization.{m[2]}"]),
    (r"backbone\.res_layers\.(\d+)\.blocks\.0\.short\.conv\.conv\.weight",
     lambda m: [f"{_HF_BACKBONE}.encoder.stages.{m[1]}.layers.0.shortcut.1.convolution.weight"]),
    (r"backbone\.res_layers\.(\d+)\.blocks\.0\.short\.conv\.norm\.(weight|bias|running_mean|running_var)",
     lambda m: [f"{_HF_BACKBONE}.encoder.stages.{m[1]}.layers.0.shortcut.1.normalization.{m[2]}"]),
    (r"encoder\.input_proj\.(\d+)\.([01])\.(weight|bias|running_mean|running_var)",
     lambda m: [f"model.encoder_input_proj.{m[1]}.{m[2]}.{m[3]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.self_attn\.out_proj\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.self_attn.out_proj.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.linear1\.(weight|bias)", lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.fc1.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.linear2\.(weight|bias)", lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.fc2.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.norm1\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.self_attn_layer_norm.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.norm2\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.final_layer_norm.{m[2]}"]),
    (r"encoder\.((?:lateral_convs|downsample_convs|fpn_blocks|pan_blocks)\..+\.(?:weight|bias|running_mean|running_var))",
     lambda m: [f"model.encoder.{m[1]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     lambda m: [f"model.decoder.layers.{m[1]}.self_attn.out_proj.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.cross_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     lambda m: [f"model.decoder.layers.{m[1]}.encoder_attn.{m[2]}.{m[3]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)", lambda m: [f"model.decoder.layers.{m[1]}.self_attn_layer_norm.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)", lambda m: [f"model.decoder.layers.{m[1]}.encoder_attn_layer_norm.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)", lambda m: [f"model.decoder.layers.{m[1]}.final_layer_norm.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.linear1\.(weight|bias)", lambda m: [f"model.decoder.layers.{m[1]}.fc1.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.linear2\.(weight|bias)", lambda m: [f"model.decoder.layers.{m[1]}.fc2.{m[2]}"]),
    (r"decoder\.dec_score_head\.(\d+)\.(weight|bias)",
     lambda m: [f"model.decoder.class_embed.{m[1]}.{m[2]}", f"class_embed.{m[1]}.{m[2]}"]),
    (r"decoder\.dec_bbox_head\.(\d+)\.layers\.(\d+)\.(weight|bias)",
     lambda m: [f"model.decoder.bbox_embed.{m[1]}.layers.{m[2]}.{m[3]}", f"bbox_embed.{m[1]}.layers.{m[2]}.{m[3]}"]),
    (r"decoder\.input_proj\.(\d+)\.conv\.weight", lambda m: [f"model.decoder_input_proj.{m[1]}.0.weight"]),
    (r"decoder\.input_proj\.(\d+)\.norm\.(weight|bias|running_mean|running_var)",
     lambda m: [f"model.decoder_input_proj.{m[1]}.1.{m[2]}"]),
    (r"decoder\.denoising_class_embed\.weight", lambda m: ["model.denoising_class_embed.weight"]),
    (r"decoder\.((?:query_pos_head)\..+)", lambda m: [f"model.decoder.{m[1]}"]),
    (r"decoder\.((?:enc_output|enc_score_head|enc_bbox_head)\..+)", lambda m: [f"model.{m[1]}"]),
]
# nn.MultiheadAttention's packed input projection -> the three Hugging Face projections (q, k, v rows).
_HF_IN_PROJ = [
    (r"encoder\.encoder\.(\d+)\.layers\.0\.self_attn\.in_proj_(weight|bias)",
     lambda m: f"model.encoder.encoder.{m[1]}.layers.0.self_attn.{{}}_proj.{m[2]}"),
    (r"decoder\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
     lambda m: f"model.decoder.layers.{m[1]}.self_attn.{{}}_proj.{m[2]}"),
]


def _apply(rules, key: str):
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return build(match)
    return None


def reference_key_map(model) -> dict[str, str | None]:
    """neoray state-dict name -> the reference checkpoint's name (None: no counterpart)."""
    return {key: _apply(REFERENCE_RULES, key) for key in model.state_dict()}


def reference_to_huggingface(reference_key: str) -> list[tuple[str, ...]] | None:
    """The Hugging Face name(s) of a reference name: alternatives, each a tuple of parts concatenated on
    dimension 0 (three parts, q/k/v, for a packed attention projection). None: no counterpart (BatchNorm's
    num_batches_tracked, which the published files do not carry)."""
    packed = _apply(_HF_IN_PROJ, reference_key)
    if packed is not None:
        return [tuple(packed.format(p) for p in ("q", "k", "v"))]
    names = _apply(HF_RULES, reference_key)
    return [(name,) for name in names] if names else None


def huggingface_key_map(model) -> dict[str, list[tuple[str, ...]] | None]:
    """neoray state-dict name -> Hugging Face alternatives (see ``reference_to_huggingface``)."""
    out = {}
    for key, reference in reference_key_map(model).items():
        out[key] = reference_to_huggingface(reference) if reference else None
    return out


def huggingface_backbone_tensors(path, reference: dict) -> dict:
    """For ``backbone_weights``: the tensors of a PResNet trunk (``reference`` = its state dict, names without
    the detector's ``backbone.`` prefix) read from a Hugging Face RT-DETR."""
    checkpoint = _open(path)
    out = {}
    for key in reference:
        sources = reference_to_huggingface(f"backbone.{key}") or []
        for parts in sources:
            if all(p in checkpoint.tensors for p in parts):
                out[key] = torch.cat([checkpoint.tensors[p] for p in parts]) if len(parts) > 1 else checkpoint.tensors[parts[0]]
                break
    return out


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------

# The tensors whose first dimension is one row per class (RT-DETR); the denoising embedding has one more
# row, the padding row (index num_classes), which stays zero.
_CLASS_TENSOR = re.compile(r"decoder\.(?:enc_score_head|score_heads\.\d+)\.(?:weight|bias)|decoder\.denoising_class_embed\.weight")
_PADDED = "decoder.denoising_class_embed.weight"
_KEEPS = " (keeps its initial value)"


@dataclass
class PretrainedLoad:
    info: PretrainedInfo
    loaded: list[str]
    skipped: list[tuple[str, str]]  # (key, reason): model keys not loaded, checkpoint keys with no place
    class_rows: dict[str, str]  # user class -> the checkpoint class whose rows were copied
    conventions: dict  # the conventions now in force on the model
    changed_conventions: dict = field(default_factory=dict)  # key -> (before, after)
    notes: list = field(default_factory=list)
    new_classes: list = field(default_factory=list)  # user classes that start from their fresh rows

    def lines(self) -> list[str]:
        """Human-readable lines for the run's log (the caller adds its own prefix, e.g. "init_from: ")."""
        out = [f"{self.info.format} checkpoint {self.info.path}: {len(self.loaded)} tensors loaded, "
               f"{len(self.skipped)} not loaded" + (f" ({'; '.join(self.notes)})" if self.notes else "")]
        for key, (before, after) in self.changed_conventions.items():
            out.append(f"set {key}={after} (the model was built with {before}): the checkpoint was trained so")
        counters = [k for k, _ in self.skipped if k.endswith("num_batches_tracked")]
        for key, reason in self.skipped:
            if not key.endswith("num_batches_tracked"):
                out.append(f"not loaded {key}: {reason}")
        if counters:
            out.append(f"not loaded {len(counters)} BatchNorm step counters (num_batches_tracked, e.g. {counters[0]}): "
                       f"not weights; they only count steps")
        if self.class_rows or self.new_classes:
            kept = ", ".join(f"{user} <- {ckpt}" if user != ckpt else user for user, ckpt in self.class_rows.items())
            total = len(self.class_rows) + len(self.new_classes)
            line = f"classes that kept pretrained rows: {kept or 'none'} ({len(self.class_rows)} of {total})"
            if self.new_classes:
                line += f"; starting from scratch: {', '.join(self.new_classes)}"
            out.append(line)
        return out


def _shape_reason(value: torch.Tensor, target: torch.Tensor) -> str:
    return f"shape {tuple(value.shape)} vs {tuple(target.shape)} (checkpoint vs model; keeps its initial value)"


def _same_names(a: list[str], b: list[str]) -> bool:
    return [x.lower() for x in a] == [x.lower() for x in b]


def _plan(model, checkpoint: _Checkpoint) -> dict[str, list[tuple[str, ...]] | None]:
    fmt = checkpoint.info.format
    if fmt == "neoray":
        return {key: [(key,)] for key in model.state_dict()}
    if fmt == "reference":
        return {key: ([(ref,)] if ref else None) for key, ref in reference_key_map(model).items()}
    return huggingface_key_map(model)


def _class_rows(user: list[str], checkpoint: list[str]) -> dict[int, int]:
    """user index -> checkpoint index of the class with the same name (case-insensitive)."""
    where = {}
    for i, name in enumerate(checkpoint):
        where.setdefault(name.lower(), i)
    return {u: where[name.lower()] for u, name in enumerate(user) if name.lower() in where}


def _names_known(info: PretrainedInfo) -> bool:
    return bool(info.class_names) and info.class_names != _placeholder_names(len(info.class_names))


def kept_class_names(info: PretrainedInfo, class_names: list[str]) -> list[str]:
    """The user's classes that start from this checkpoint's rows, as ``load_pretrained`` copies them: all
    of them when the class lists are the same, those with a matching name otherwise, none by name when the
    checkpoint does not name its classes."""
    if not _names_known(info):
        return []
    if _same_names(class_names, info.class_names):
        return list(class_names)
    return [class_names[u] for u in _class_rows(class_names, info.class_names)]


def _apply_conventions(model, info: PretrainedInfo) -> dict:
    """Set the checkpoint's conventions on ``model`` (they are part of what the weights mean); returns
    {key: (before, after)} for the ones that changed."""
    if not hasattr(model, "conventions"):
        return {}
    current = model.conventions()
    wanted = {k: v for k, v in info.conventions.items() if k in current and current[k] != v}
    if wanted:
        model.set_conventions(**wanted)
    return {k: (current[k], v) for k, v in wanted.items()}


def _row_plan(info: PretrainedInfo, class_names: list[str] | None) -> dict[int, int] | None:
    """user class index -> checkpoint class index for the class tensors, or None to copy them whole (no
    user classes given, the same classes, or a checkpoint that does not name its classes)."""
    if class_names is None or not _names_known(info) or _same_names(class_names, info.class_names):
        return None
    return _class_rows(class_names, info.class_names)


def _match(key: str, target: torch.Tensor, alternatives, tensors: dict, rows, layout: str | None):
    """(the tensor to load into ``key``, None) or (None, why it is not loaded)."""
    if not alternatives:
        return None, f"no counterpart in {layout}'s layout{_KEEPS}"
    chosen = next((parts for parts in alternatives if all(p in tensors for p in parts)), None)
    if chosen is None:
        expected = " + ".join(alternatives[0])
        return None, f"not in the checkpoint{f': expected {expected}' if expected != key else ''}{_KEEPS}"
    value = torch.cat([tensors[p] for p in chosen]) if len(chosen) > 1 else tensors[chosen[0]]
    if rows is not None and _CLASS_TENSOR.fullmatch(key):
        if value.shape[1:] != target.shape[1:]:
            return None, _shape_reason(value, target)
        if not rows:
            return None, f"no class of the model has a name among the checkpoint's classes{_KEEPS}"
        merged = target.clone()  # the classes without a match keep their fresh rows
        merged[list(rows)] = value[list(rows.values())].to(merged.dtype)
        return merged, None
    if value.shape != target.shape:
        return None, _shape_reason(value, target)
    return value, None


def _zero_padding_row(model, loadable: dict) -> list[str]:
    """An older neoray checkpoint trained the denoising padding row; it must stay zero."""
    if _PADDED not in loadable or not hasattr(model, "num_classes"):
        return []
    embed = model.get_submodule("decoder.denoising_class_embed").weight
    with torch.no_grad():
        if embed[model.num_classes].abs().sum() == 0:
            return []
        embed[model.num_classes].zero_()
    return ["denoising padding row set to zero"]


def load_pretrained(model, path, class_names: list[str] | None = None) -> PretrainedLoad:
    """Load a neoray, reference or Hugging Face checkpoint into ``model`` (see the module docstring).

    class_names: the user's classes in label order; None means "the checkpoint's classes" (tensors of
    another class count are then skipped with their shapes).
    """
    checkpoint = _open(path)
    info, tensors = checkpoint.info, checkpoint.tensors
    if info.format != "neoray" and not hasattr(getattr(model, "decoder", None), "score_heads"):
        raise PretrainedError(f"{path}: a {info.format} RT-DETR checkpoint loads into an RT-DETR model, "
                              f"not {type(model).__name__}")
    changed = _apply_conventions(model, info)
    rows = _row_plan(info, class_names)
    plan = _plan(model, checkpoint)
    layout = {"reference": "the reference RT-DETR", "huggingface": "the Hugging Face RT-DETR"}.get(info.format)
    loadable, skipped = {}, []
    for key, target in model.state_dict().items():
        value, reason = _match(key, target, plan.get(key), tensors, rows, layout)
        if value is None:
            skipped.append((key, reason))
        else:
            loadable[key] = value
    used = {p for alternatives in plan.values() if alternatives for parts in alternatives for p in parts}
    skipped += [(key, "not in the model") for key in tensors if key not in used]
    model.load_state_dict(loadable, strict=False)
    notes = list(checkpoint.notes) + _zero_padding_row(model, loadable)

    class_rows, new_classes = {}, []
    loaded_classes = any(_CLASS_TENSOR.fullmatch(k) for k in loadable)
    if rows is not None:
        class_rows = {class_names[u]: info.class_names[c] for u, c in rows.items()}
        new_classes = [name for u, name in enumerate(class_names) if u not in rows]
    elif class_names is not None and _names_known(info) and loaded_classes:
        class_rows = dict(zip(class_names, info.class_names))  # the checkpoint's own classes, every row
    elif class_names is not None and loaded_classes:
        notes.append("the checkpoint does not name its classes: class rows copied by index")
    conventions = model.conventions() if hasattr(model, "conventions") else {}
    return PretrainedLoad(info, list(loadable), skipped, class_rows, conventions, changed, notes, new_classes)


def build_pretrained(path, device="cpu"):
    """(model in eval mode on ``device``, PretrainedInfo) for a reference, Hugging Face or neoray file,
    with the checkpoint's own classes: for ``neoray eval`` / ``neoray predict`` directly on such a file."""
    from neoray.models.registry import build_model

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
        raise PretrainedError(f"{path}: {len(missing)} tensors do not fit {checkpoint_info.model_name}, e.g. {key}: {reason}")
    return model.to(device).eval(), checkpoint_info


__all__ = [
    "COCO_CATEGORIES", "COCO_CLASS_NAMES", "FORMATS", "NEORAY_CHECKPOINT_FORMAT", "PretrainedError",
    "PretrainedInfo", "PretrainedLoad", "build_pretrained", "describe_pretrained",
    "huggingface_key_map", "is_huggingface", "kept_class_names", "load_pretrained", "read_torch_file",
    "reference_key_map",
]
