"""Typed run configuration: one YAML file plus ``key=value`` overrides, validated strictly.

Every key is declared in a dataclass below. Unknown or misspelled keys are an error that names the key
and the closest valid one (a misspelled ``lr_warmup_epochs`` must not train with no warmup). Values are coerced to the
declared type (every float finite) and checked here; what needs more than the config itself (the model
name and options, the files it names, the shard manifests) is checked by ``neoray.run.setup`` before
Ray starts, so that a bad config never reaches a GPU worker.
"""

from __future__ import annotations

import difflib
import math
import reprlib
import typing
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from neoray import storage


class ConfigError(ValueError):
    """A config that cannot be used; the message is one line naming the key."""


# What a message shows of a value it rejects: a few levels and items, never the whole value (a YAML alias
# bomb is a few lines of text but billions of items once printed, and a JSON file can nest arbitrarily).
_BRIEF = reprlib.Repr()
_BRIEF.maxlevel, _BRIEF.maxstring, _BRIEF.maxlong, _BRIEF.maxother = 3, 400, 40, 60
_BRIEF.maxtuple = _BRIEF.maxlist = _BRIEF.maxarray = _BRIEF.maxdict = _BRIEF.maxset = _BRIEF.maxfrozenset = 4
_BRIEF.maxdeque = 4
BRIEF_CHARS = 80


def brief(value: Any, limit: int = BRIEF_CHARS) -> str:
    """A bounded repr of ``value`` for one-line messages: at most ``limit`` characters."""
    text = _BRIEF.repr(value)
    return text if len(text) <= limit else text[:limit - 3] + "..."


# ----------------------------------------------------------------------------------------------------
# 16:9 sizes
# ----------------------------------------------------------------------------------------------------


# The largest size neoray takes: 8K at 16:9. One such image is 113 MB decoded; a typo such as 100000x56250
# would ask for 17 GB per image before anything could say it is too big.
MAX_SIZE = (8192, 4608)


def is_16_9(width: int, height: int) -> bool:
    return width > 0 and height > 0 and width * 9 == height * 16


def nearest_16_9(width: int, height: int, count: int = 2) -> list[tuple[int, int]]:
    """The 16:9 sizes (multiples of 16x9) closest to ``width x height``: keeping the width, or the height."""
    ks = {max(1, width // 16), max(1, -(-width // 16)), max(1, height // 9), max(1, -(-height // 9))}
    ranked = sorted(ks, key=lambda k: (abs(16 * k - width) + abs(9 * k - height), k))
    return [(16 * k, 9 * k) for k in ranked[:count]]


def parse_size(value: Any, key: str = "size", require_16_9: bool = True, bounded: bool | None = None
               ) -> tuple[int, int]:
    """Parse ``"1920x1080"``, ``[1920, 1080]`` or ``(1920, 1080)`` into ``(width, height)``.

    ``bounded`` (default: as ``require_16_9``): refuse a size with more pixels than ``MAX_SIZE`` or a side
    longer than its width; image sizes are bounded, pixel limits (``--max-image-pixels``) are not."""
    try:
        if isinstance(value, str):
            w_text, h_text = value.lower().replace(" ", "").split("x")
            width, height = int(w_text), int(h_text)
        else:
            width, height = (int(v) for v in value)
    except (ValueError, TypeError):
        raise ConfigError(f"{key}: expected a size like 1920x1080, got {brief(value)}") from None
    if width <= 0 or height <= 0:
        raise ConfigError(f"{key}: size must be positive, got {width}x{height}"[:200])
    if (require_16_9 if bounded is None else bounded) and (
            max(width, height) > MAX_SIZE[0] or width * height > MAX_SIZE[0] * MAX_SIZE[1]):
        raise ConfigError(f"{key}: {width}x{height} is larger than {MAX_SIZE[0]}x{MAX_SIZE[1]} (8K at 16:9), the "
                          f"largest size neoray takes"[:300])
    if require_16_9 and not is_16_9(width, height):
        near = " or ".join(f"{w}x{h}" for w, h in nearest_16_9(width, height))
        raise ConfigError(f"{key}: {width}x{height} is not 16:9 (W*9 must equal H*16); nearest 16:9 sizes: {near}")
    return width, height


def format_size(size: tuple[int, int]) -> str:
    return f"{size[0]}x{size[1]}"


# ----------------------------------------------------------------------------------------------------
# The schema
# ----------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    name: str = "rtdetr_cpu"
    # "none", "imagenet" (torchvision weights, needs internet or a warm torch hub cache) or a file path/URI.
    backbone_weights: str = "none"
    # Start from a pretrained detector: a neoray checkpoint or run directory, the reference RT-DETR's .pth,
    # or a Hugging Face RT-DETR folder (neoray.models.load_pretrained); every tensor not loaded is reported.
    init_from: str = ""
    max_detections: int = 100
    score_threshold: float = 0.0
    # Extra keyword options passed to build_model (e.g. num_queries, hidden_dim, num_decoder_layers).
    options: dict = field(default_factory=dict)


@dataclass
class DataConfig:
    train: str = ""  # shard directory written by `neoray prepare`
    val: str = ""  # shard directory; empty means no evaluation
    size: tuple = (320, 180)  # training and evaluation size, 16:9
    multiscale: list = field(default_factory=list)  # 16:9 sizes drawn per batch at train time
    hflip: float = 0.5
    color_jitter: float = 0.4  # strength; 0 turns it off
    shuffle_buffer: int = 256
    max_train_images: int = 0  # 0 = all; handy for smoke runs
    # Where the JPEGs are decoded and augmented: "cpu" in Ray tasks (cv2 + albumentations), "gpu" on the
    # training worker's own device (torchvision's decode_jpeg, nvJPEG on CUDA, + tensor ops; the same
    # batches up to rounding). neoray.data.stream says which work runs where.
    decode: str = "cpu"
    # Strong augmentations, per output image (neoray.data.draws says how; all off by default):
    mosaic: float = 0.0  # probability: four images of the batch around a random centre, at their own scale
    mixup: float = 0.0  # probability: blended with a second image of the batch, the boxes of both kept
    zoom: list = field(default_factory=list)  # [min, max] scale: < 1 shrinks onto grey, > 1 crops in; [] = off
    # Mosaic, mixup and zoom only in epochs < N: an epoch number >= 1, or a fraction in (0, 1) of
    # train.epochs (rounded); 0 = in every epoch.
    strong_aug_until: float = 0.0


# A pretrained backbone learns at a tenth of the head's LR (DETR practice: it keeps what it learned). A backbone
# trained from scratch learns at the full LR: with a tenth, rtdetr_cpu from scratch reached mAP50 0.45 instead
# of 0.61 on the dense benchmark task in the same 414 s (benchmarks/bench_quality.py, README).
PRETRAINED_BACKBONE_LR_MULT = 0.1
FROM_SCRATCH_BACKBONE_LR_MULT = 1.0


def backbone_is_pretrained(model: ModelConfig) -> bool:
    """Whether the backbone starts from trained weights: its own (backbone_weights) or a whole detector's."""
    return model.backbone_weights.strip().lower() not in ("", "none") or bool(model.init_from.strip())


@dataclass
class TrainConfig:
    epochs: int = 10
    # Stop after this epoch of the train.epochs schedule (0: train to the end); a later run continues the
    # checkpoint on the same schedule. A sweep's trials train such a prefix (search.trial_epochs).
    stop_after_epoch: int = 0
    batch_size: int = 4  # per worker
    accumulate: int = 1
    lr: float = 1e-4
    # The backbone's share of the LR. auto (None): PRETRAINED_BACKBONE_LR_MULT when the backbone starts from
    # pretrained weights (model.backbone_weights or model.init_from), 1.0 from scratch (_validate decides).
    backbone_lr_mult: float | None = None
    weight_decay: float = 1e-4
    optimizer: str = "adamw"  # adamw | sgd
    momentum: float = 0.9  # sgd only
    schedule: str = "cosine"  # cosine | flat_cosine | multistep | onecycle | constant
    flat_fraction: float = 0.5  # flat_cosine: share of the run at the full LR (after warmup) before the cosine
    milestones: list = field(default_factory=list)  # multistep: fractions of total steps or step numbers
    gamma: float = 0.1
    min_lr_ratio: float = 0.01
    warmup_steps: int = 0  # optimizer steps
    clip_grad_norm: float = 0.1  # 0 turns clipping off
    amp: str = "auto"  # auto | bf16 | fp16 | off  (auto: bf16 on GPUs that have it, fp16 otherwise, off on CPU)
    ema: bool = True
    ema_decay: float = 0.9999
    ema_warmup_steps: int = 200
    freeze_backbone_until_epoch: int = 0  # backbone frozen for epochs < N (0 = never frozen)
    seed: int = 0
    workers: int = 1
    use_gpu: bool = False
    gpus_per_worker: float = 1.0  # with use_gpu; a fraction lets several workers or trials share a GPU
    cpus_per_worker: float = 1.0
    # torch's CPU threads per worker (0: Ray's default, the worker's whole CPUs). More than the worker reserves
    # lets a run use the cores it leaves to Ray Data's decode tasks, which are idle most of a step.
    torch_threads: int = 0
    placement: str = "pack"  # pack: workers on as few nodes as possible | spread: on as many as possible
    eval_every: int = 1  # evaluate every N epochs (and always after the last)
    eval_score_threshold: float = 0.5  # score at which precision, recall and F1 are reported
    early_stop_patience: int = 0  # evaluations without mAP improvement before stopping (0 = off)
    max_skipped_fraction: float = 0.25  # of an epoch's updates skipped for non-finite loss/grad
    max_oom_per_epoch: int = 3
    max_failures: int = 2  # worker failures Ray Train recovers from
    log_every: int = 0  # steps between progress lines on rank 0 (0 = epoch lines only)


@dataclass
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    output: str = "runs"
    name: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["data"]["size"] = format_size(self.data.size)
        out["data"]["multiscale"] = [format_size(s) for s in self.data.multiscale]
        return out

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    @property
    def effective_batch(self) -> int:
        return self.train.batch_size * self.train.accumulate * self.train.workers

    def with_overrides(self, overrides: dict | list[str]) -> "Config":
        """A validated copy with dotted overrides applied: ``{"train.lr": 1e-3}`` or ``["train.lr=1e-3"]``
        (the one way to change a config; ``ConfigError`` names the key of a bad value)."""
        return from_dict(apply_overrides(self.to_dict(), overrides))


SECTIONS = {"model": ModelConfig, "data": DataConfig, "train": TrainConfig}
SCHEDULES = ("cosine", "flat_cosine", "multistep", "onecycle", "constant")


# ----------------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------------


def _suggest(key: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if not close:
        # Also compare the last word, so that lr_warmup_epochs suggests warmup_steps.
        close = difflib.get_close_matches(key.split("_")[-1], valid, n=1, cutoff=0.5)
        close = close or [k for k in valid if any(part in k for part in key.split("_") if len(part) > 2)][:1]
    return f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(sorted(valid))}"


def _coerce(value: Any, annotation: Any, key: str) -> Any:
    if isinstance(annotation, str) and annotation.endswith(" | None"):  # None or `auto`: decided by _validate
        if value is None or (isinstance(value, str) and value.strip().lower() == "auto"):
            return None
        try:
            return _coerce(value, annotation.removesuffix(" | None"), key)
        except ConfigError as exc:
            raise ConfigError(f"{exc} (or auto)") from None
    origin = typing.get_origin(annotation) or annotation
    if annotation in ("bool", bool):
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "yes", "1", "on", "false", "no", "0", "off"):
            return value.lower() in ("true", "yes", "1", "on")
        if isinstance(value, int) and value in (0, 1):
            return bool(value)
        raise ConfigError(f"{key}: expected true or false, got {brief(value)}")
    if annotation in ("int", int):
        if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
            raise ConfigError(f"{key}: expected an integer, got {brief(value)}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected an integer, got {brief(value)}") from None
    if annotation in ("float", float):
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a number, got {brief(value)}")
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"{key}: expected a number, got {brief(value)}") from None
        if not math.isfinite(number):
            raise ConfigError(f"{key}: expected a finite number, got {brief(value)}")
        return number
    if annotation in ("str", str):
        if isinstance(value, (dict, list)):
            raise ConfigError(f"{key}: expected a string, got {brief(value)}")
        return "" if value is None else str(value)
    if annotation in ("dict", dict) or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {brief(value)}")
        return dict(value)
    if annotation in ("list", list) or origin is list:
        if isinstance(value, str):
            value = [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {brief(value)}")
        return list(value)
    return value


def _build_section(cls: type, raw: Any, prefix: str) -> Any:
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{prefix}: expected a mapping of keys, got {brief(raw)}")
    valid = {f.name: f for f in fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        if key not in valid:
            raise ConfigError(f"unknown config key '{prefix}.{key}'{_suggest(key, list(valid))}")
        kwargs[key] = _coerce(value, valid[key].type, f"{prefix}.{key}")
    return cls(**kwargs)


def _milestones(values: list) -> list:
    """train.milestones as numbers: a value in (0, 1) is a fraction of the run's optimizer steps, a
    value >= 1 an optimizer step number (an integer). Command-line lists arrive as strings."""
    out = []
    for value in values:
        try:
            number = float(value)
        except (TypeError, ValueError):
            number = float("nan")
        if isinstance(value, bool) or not number > 0 or (number >= 1 and not number.is_integer()):
            raise ConfigError(f"train.milestones: {brief(value)} is neither a fraction of the run in (0, 1) nor an "
                              f"optimizer step number >= 1 (e.g. train.milestones=0.5,0.75 or [3000, 4000])")
        out.append(number if number < 1 else int(number))
    return out


MAX_ZOOM = 4.0  # the largest data.zoom: an image enlarged 4x is already 16x the pixels of the batch's size


def _zoom(values: list) -> list:
    """data.zoom as [min, max] floats with 0 < min <= max <= MAX_ZOOM, or [] (off). Command-line lists
    arrive as strings."""
    if not values:
        return []
    try:
        low, high = (float(v) for v in values)
    except (TypeError, ValueError):
        low = high = float("nan")
    if any(isinstance(v, bool) for v in values) or not 0 < low <= high <= MAX_ZOOM:
        raise ConfigError(f"data.zoom: expected [min, max] scale factors with 0 < min <= max <= {MAX_ZOOM:g} "
                          f"(e.g. [0.5, 1.5]; [] turns it off), got {brief(values)}")
    return [low, high]


def _strong_aug_until(value: float) -> float:
    """data.strong_aug_until: 0, a fraction of the run in (0, 1), or an epoch number >= 1 (an integer)."""
    if value < 0 or (value >= 1 and not value.is_integer()):
        raise ConfigError(f"data.strong_aug_until: {brief(value)} is neither 0 (every epoch), a fraction of "
                          "train.epochs in (0, 1) nor an epoch number >= 1")
    return value


def _validate(cfg: Config) -> None:
    d, t, m = cfg.data, cfg.train, cfg.model
    if t.backbone_lr_mult is None:
        t.backbone_lr_mult = PRETRAINED_BACKBONE_LR_MULT if backbone_is_pretrained(m) else FROM_SCRATCH_BACKBONE_LR_MULT
    d.size = parse_size(d.size, "data.size")
    d.multiscale = [parse_size(s, "data.multiscale") for s in d.multiscale]
    d.zoom = _zoom(d.zoom)
    d.strong_aug_until = _strong_aug_until(d.strong_aug_until)
    t.milestones = _milestones(t.milestones)
    checks = [
        (t.epochs >= 1, "train.epochs must be >= 1"),
        (t.stop_after_epoch >= 0, "train.stop_after_epoch must be >= 0 (0: train to the end)"),
        (t.batch_size >= 1, "train.batch_size must be >= 1"),
        (t.accumulate >= 1, "train.accumulate must be >= 1"),
        (t.lr > 0, "train.lr must be > 0"),
        (t.backbone_lr_mult >= 0, "train.backbone_lr_mult must be >= 0"),
        (t.weight_decay >= 0, "train.weight_decay must be >= 0"),
        (t.gamma > 0, "train.gamma must be > 0"),
        (0.0 <= t.min_lr_ratio <= 1.0, "train.min_lr_ratio must be in [0, 1]"),
        (t.clip_grad_norm >= 0, "train.clip_grad_norm must be >= 0 (0 turns clipping off)"),
        (t.ema_warmup_steps >= 0, "train.ema_warmup_steps must be >= 0"),
        (t.freeze_backbone_until_epoch >= 0, "train.freeze_backbone_until_epoch must be >= 0"),
        (t.cpus_per_worker > 0, "train.cpus_per_worker must be > 0"),
        (t.torch_threads >= 0, "train.torch_threads must be >= 0 (0: Ray's default, the worker's CPUs)"),
        (t.gpus_per_worker > 0, "train.gpus_per_worker must be > 0 (train.use_gpu=false for none)"),
        (t.early_stop_patience >= 0, "train.early_stop_patience must be >= 0 (0 turns it off)"),
        (t.max_oom_per_epoch >= 0, "train.max_oom_per_epoch must be >= 0"),
        (t.log_every >= 0, "train.log_every must be >= 0"),
        (t.warmup_steps >= 0, "train.warmup_steps must be >= 0"),
        (t.workers >= 1, "train.workers must be >= 1"),
        (t.placement in ("pack", "spread"), f"train.placement must be pack or spread, got {brief(t.placement)}"),
        (t.optimizer in ("adamw", "sgd"), f"train.optimizer must be adamw or sgd, got {brief(t.optimizer)}"),
        (t.schedule in SCHEDULES, f"train.schedule must be one of {', '.join(SCHEDULES)}, got {brief(t.schedule)}"),
        (0.0 <= t.flat_fraction < 1.0, "train.flat_fraction must be in [0, 1)"),
        (t.amp in ("auto", "bf16", "fp16", "off"), f"train.amp must be auto, bf16, fp16 or off, got {brief(t.amp)}"),
        (0.0 <= t.max_skipped_fraction <= 1.0, "train.max_skipped_fraction must be in [0, 1]"),
        (0.0 < t.ema_decay < 1.0, "train.ema_decay must be in (0, 1)"),
        (t.eval_every >= 1, "train.eval_every must be >= 1"),
        (0.0 <= d.hflip <= 1.0, "data.hflip must be in [0, 1]"),
        (d.color_jitter >= 0.0, "data.color_jitter must be >= 0"),
        (d.decode in ("cpu", "gpu"), f"data.decode must be cpu or gpu, got {brief(d.decode)}"),
        (0.0 <= d.mosaic <= 1.0, "data.mosaic must be in [0, 1] (a probability per image)"),
        (0.0 <= d.mixup <= 1.0, "data.mixup must be in [0, 1] (a probability per image)"),
        (m.max_detections >= 1, "model.max_detections must be >= 1"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)


def parse_override(text: str) -> tuple[str, Any]:
    """``train.lr=3e-4`` -> ("train.lr", 0.0003); values are parsed as YAML scalars/lists."""
    if "=" not in text:
        raise ConfigError(f"override {brief(text)}: expected key=value, e.g. train.epochs=2")
    key, value = text.split("=", 1)
    try:
        parsed = yaml.safe_load(value) if value != "" else ""
    except yaml.YAMLError:
        parsed = value
    except RecursionError:  # PyYAML recurses once per level
        raise ConfigError(f"override {key.strip()}: the value is nested too deeply to parse") from None
    return key.strip(), parsed


def apply_overrides(raw: dict, overrides: list[str] | dict) -> dict:
    """Apply dotted overrides to a raw (not yet validated) config mapping."""
    items = overrides.items() if isinstance(overrides, dict) else (parse_override(o) for o in overrides)
    for key, value in items:
        parts = key.split(".")
        node = raw
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"override {key}: {part} is not a section")
        node[parts[-1]] = value
    return raw


def from_dict(raw: dict) -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"config: expected a mapping at the top level, got {type(raw).__name__}")
    top_valid = list(SECTIONS) + ["output", "name"]
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        if key in SECTIONS:
            kwargs[key] = _build_section(SECTIONS[key], value, key)
        elif key in ("output", "name"):
            kwargs[key] = _coerce(value, str, key)
        else:
            raise ConfigError(f"unknown config key '{key}'{_suggest(key, top_valid)}")
    cfg = Config(**kwargs)
    _validate(cfg)
    return cfg


def read_yaml_mapping(path: str | Path, what: str) -> dict:
    """A YAML file (local or on any storage) whose top level is a mapping; ``ConfigError`` (one line) for a
    missing file, a directory, text that is not UTF-8, or YAML that does not parse."""
    try:
        text = storage.read_text(path)
    except FileNotFoundError:
        raise ConfigError(f"{path}: {what} file not found") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(
            f"{path}: not UTF-8 text (byte {exc.start}: {exc.reason}); save the {what} as UTF-8"
        ) from None
    except OSError as exc:
        detail = "is a directory" if storage.is_dir(path) else str(exc)
        raise ConfigError(f"{path}: cannot read the {what} file ({detail})") from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML ({str(exc).splitlines()[0]})") from None
    except RecursionError:  # PyYAML recurses once per level
        raise ConfigError(f"{path}: not valid YAML (nested too deeply to parse)") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    return raw


def load_config(path: str | Path | None = None, overrides: list[str] | dict | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None), apply overrides, validate."""
    raw = read_yaml_mapping(path, "config") if path is not None else {}
    raw = apply_overrides(raw, overrides or [])
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}" if path is not None else str(exc)) from None


def save_config(cfg: Config, path: str | Path) -> None:
    """Write the resolved config atomically (it is the record of what ran), to any storage."""
    storage.write_text(path, cfg.to_yaml())


__all__ = [
    "Config", "ConfigError", "DataConfig", "FROM_SCRATCH_BACKBONE_LR_MULT", "PRETRAINED_BACKBONE_LR_MULT",
    "MAX_SIZE", "MAX_ZOOM", "ModelConfig", "TrainConfig", "apply_overrides",
    "backbone_is_pretrained", "brief", "format_size",
    "from_dict", "is_16_9", "load_config", "nearest_16_9", "parse_override", "parse_size", "read_yaml_mapping",
    "save_config",
]
