"""Search-space YAML -> Optuna distributions, the starting point, and the ASHA settings.

A space file names the hyperparameters to search (only those listed in ``PARAMS``), how to sample
each, and the scheduler settings. Unknown keys are an error naming the key, so that a typo never
silently searches nothing. Example (experiments/configs/space_default.yaml)::

    params:
      lr: {distribution: log_uniform, low: 1.0e-5, high: 1.0e-3}    # or low: 0.5, high: 4, relative: true
      warmup_steps: {distribution: int_uniform, low: 0, high: 100, step: 10}
      batch: {per_worker: [2, 4, 8], effective: 8}     # or: pairs: ["4x1", "2x2"]
    asha: {time_attr: epoch, grace_period: 1, reduction_factor: 2}   # or asha: false (no early stopping)
    search: {seed: 0, num_samples: 8, trial_epochs: 0.25}   # trial_epochs: see SearchSpace
    points_to_evaluate: [{lr: 0.5}]                    # optional, after the config's own values

Batch size and gradient accumulation are searched as one categorical "BxA" parameter (``batch``),
because they only make sense as pairs: with ``effective`` every pair keeps the same effective batch
per worker (B * A == effective), so that a sweep compares schedules, not batch sizes by accident.
"""

from __future__ import annotations

import difflib
import math
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from neoray.config import Config, ConfigError, read_yaml_mapping
from neoray.tune.asha import TIME_ATTRS, AshaSettings

# Searchable parameter -> the config key(s) it sets. ``batch`` sets two keys from one "BxA" value.
PARAMS = {
    "lr": "train.lr",
    "warmup_steps": "train.warmup_steps",
    "weight_decay": "train.weight_decay",
    "backbone_lr_mult": "train.backbone_lr_mult",
    "batch": ("train.batch_size", "train.accumulate"),
}
DISTRIBUTIONS = ("log_uniform", "uniform", "int_uniform", "choice")
# How a searched learning rate given per reference batch becomes a trial's: unchanged, in proportion to the
# effective batch (linear: Goyal et al.), or to its square root (sqrt: the usual rule for Adam).
LR_RULES = ("none", "linear", "sqrt")
TOP_KEYS = ("params", "asha", "search", "lr_scaling", "points_to_evaluate")
SAMPLERS = ("tpe", "gp", "random")
MAX_SEED = 2**32 - 1  # Optuna's samplers take a NumPy seed


@dataclass
class LrScaling:
    """The searched ``lr`` is per ``reference_batch`` images per optimizer step (None: the base config's
    effective batch) and scaled to each trial's effective batch by ``rule`` (LR_RULES)."""

    rule: str = "none"
    reference_batch: int | None = None


@dataclass
class SearchSpace:
    params: dict[str, dict] = field(default_factory=dict)  # name -> validated spec
    asha: AshaSettings = field(default_factory=AshaSettings)
    seed: int = 0
    num_samples: int = 8
    sampler: str = "tpe"  # SAMPLERS: Optuna's TPE, or random search
    startup_trials: int = 10  # TPE samples at random for its first N trials (Optuna's default: 10)
    lr_scaling: LrScaling = field(default_factory=LrScaling)
    points_to_evaluate: list[dict] = field(default_factory=list)
    # Each trial trains only the first N epochs of the config's train.epochs schedule (an integer >= 1, or a
    # fraction in (0, 1) of train.epochs until resolved); the best trial then continues from its checkpoint to
    # the end of that schedule (neoray.tune.continue_best). None: every trial trains the whole schedule.
    trial_epochs: int | float | None = None


def _unknown(key: str, valid, where: str) -> ConfigError:
    close = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    hint = f"; did you mean '{close[0]}'?" if close else f"; valid keys: {', '.join(valid)}"
    return ConfigError(f"search space: unknown key '{where}{key}'{hint}")


def _check_keys(raw: dict, valid, where: str) -> None:
    if not isinstance(raw, dict):
        raise ConfigError(f"search space: '{where.rstrip('.') or 'top level'}' must be a mapping, got {raw!r}")
    for key in raw:
        if key not in valid:
            raise _unknown(str(key), valid, where)


def scaled_lr(lr: float, effective_batch: int, rule: str, reference_batch: int) -> float:
    """The learning rate of a trial whose effective batch (per step, over all workers) is
    ``effective_batch``, for ``lr`` given per ``reference_batch`` under ``rule`` (LR_RULES)."""
    if rule == "none":
        return lr
    ratio = effective_batch / reference_batch
    return lr * (ratio if rule == "linear" else math.sqrt(ratio))


def format_batch(batch_size: int, accumulate: int) -> str:
    return f"{int(batch_size)}x{int(accumulate)}"


def parse_batch(text: Any, where: str = "batch") -> tuple[int, int]:
    """``"4x2"`` or ``[4, 2]`` -> (batch_size per worker, accumulation steps)."""
    try:
        b, a = (int(v) for v in (str(text).lower().split("x") if isinstance(text, str) else text))
    except (ValueError, TypeError):
        raise ConfigError(
            f"search space: {where}: expected a pair like 4x2 (batch x accumulate), got {text!r}"
        ) from None
    if b < 1 or a < 1:
        raise ConfigError(f"search space: {where}: batch and accumulate must be >= 1, got {text!r}")
    return b, a


def _number(spec: dict, key: str, where: str, integer: bool = False) -> float:
    value = spec.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not float(value).is_integer()):
        kind = "an integer" if integer else "a number"
        raise ConfigError(f"search space: {where}.{key}: expected {kind}, got {value!r}")
    return int(value) if integer else float(value)


def _param_spec(name: str, spec: Any) -> dict:
    where = f"params.{name}"
    if name == "batch":
        _check_keys(spec, ("pairs", "per_worker", "effective"), where + ".")
        if "pairs" in spec:
            if "per_worker" in spec or "effective" in spec:
                raise ConfigError(f"search space: {where}: give either pairs or per_worker+effective, not both")
            pairs = [parse_batch(p, where + ".pairs") for p in (spec["pairs"] or [])]
        else:
            if "per_worker" not in spec or "effective" not in spec:
                raise ConfigError(f"search space: {where}: needs pairs, or per_worker and effective")
            effective = int(_number(spec, "effective", where, integer=True))
            sizes = spec["per_worker"]
            if not isinstance(sizes, list) or not sizes:
                raise ConfigError(f"search space: {where}.per_worker: expected a list of batch sizes, got {sizes!r}")
            bad = [b for b in sizes if not isinstance(b, int) or b < 1 or effective % b]
            if bad:
                raise ConfigError(f"search space: {where}.per_worker: {bad} do not divide effective={effective}")
            pairs = [(b, effective // b) for b in sizes]
        if not pairs:
            raise ConfigError(f"search space: {where}: no batch pairs given")
        return {"distribution": "choice", "values": [format_batch(b, a) for b, a in pairs]}

    _check_keys(spec, ("distribution", "low", "high", "step", "values", "relative"), where + ".")
    dist = spec.get("distribution")
    if dist not in DISTRIBUTIONS:
        raise ConfigError(f"search space: {where}.distribution must be one of {', '.join(DISTRIBUTIONS)}, got {dist!r}")
    relative = spec.get("relative", False)
    if relative is not False and (relative is not True or dist != "log_uniform" or "step" in spec):
        raise ConfigError(f"search space: {where}.relative: true (the only value) needs a log_uniform range "
                          f"without step, got relative={relative!r} with {dist}")
    if dist == "choice":
        values = spec.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"search space: {where}.values: expected a non-empty list, got {values!r}")
        return {"distribution": "choice", "values": values}
    integer = dist == "int_uniform"
    low, high = _number(spec, "low", where, integer), _number(spec, "high", where, integer)
    if not low < high:
        raise ConfigError(f"search space: {where}: low ({low}) must be below high ({high})")
    if dist == "log_uniform" and low <= 0:
        raise ConfigError(f"search space: {where}: log_uniform needs low > 0, got {low}")
    out = {"distribution": dist, "low": low, "high": high}
    if "step" in spec:
        out["step"] = _number(spec, "step", where, integer)
    if relative:
        out["relative"] = True
    return out


def parse_space(raw: Any) -> SearchSpace:
    """Validate a space mapping (as read from YAML) strictly."""
    raw = raw or {}
    _check_keys(raw, TOP_KEYS, "")
    params_raw = raw.get("params") or {}
    _check_keys(params_raw, tuple(PARAMS), "params.")
    if not params_raw:
        raise ConfigError("search space: 'params' is empty; name at least one of " + ", ".join(PARAMS))
    space = SearchSpace(params={name: _param_spec(name, spec) for name, spec in params_raw.items()})
    space.asha = AshaSettings(enabled=False) if raw.get("asha") is False else _parse_asha(raw.get("asha") or {})
    _parse_search(raw.get("search") or {}, space)
    space.lr_scaling = _parse_lr_scaling(raw.get("lr_scaling") or {}, space)
    space.points_to_evaluate = _parse_points(raw.get("points_to_evaluate") or [], space)
    return space


def _parse_asha(asha_raw: Any) -> AshaSettings:
    _check_keys(asha_raw, ("time_attr", "grace_period", "reduction_factor"), "asha.")
    asha = AshaSettings(**asha_raw)
    if asha.time_attr not in TIME_ATTRS:
        raise ConfigError(
            f"search space: asha.time_attr must be one of {', '.join(TIME_ATTRS)}, got {asha.time_attr!r}"
        )
    grace = asha.grace_period
    if isinstance(grace, bool) or not (isinstance(grace, int) and grace >= 1
                                       or isinstance(grace, float) and 0 < grace < 1):
        raise ConfigError(f"search space: asha.grace_period must be an integer >= 1 (epochs) or a fraction between "
                          f"0 and 1 of train.epochs, got {grace!r}")
    if isinstance(asha.reduction_factor, bool) or not isinstance(asha.reduction_factor, (int, float)) \
            or not 1 < asha.reduction_factor < 1e6:
        raise ConfigError(f"search space: asha.reduction_factor must be a number > 1, got {asha.reduction_factor!r}")
    return asha


def _parse_search(search_raw: Any, space: SearchSpace) -> None:
    _check_keys(search_raw, ("seed", "num_samples", "sampler", "startup_trials", "trial_epochs"), "search.")
    space.seed = int(_number({"seed": search_raw.get("seed", 0)}, "seed", "search", integer=True))
    if not 0 <= space.seed <= MAX_SEED:
        raise ConfigError(f"search space: search.seed must be between 0 and {MAX_SEED}, got {space.seed:.3g}")
    space.num_samples = int(_number({"num_samples": search_raw.get("num_samples", 8)}, "num_samples", "search",
                                    integer=True))
    if space.num_samples < 1:
        raise ConfigError("search space: search.num_samples must be >= 1")
    space.sampler = search_raw.get("sampler", "tpe")
    if space.sampler not in SAMPLERS:
        raise ConfigError(f"search space: search.sampler must be one of {', '.join(SAMPLERS)}, got {space.sampler!r}")
    space.startup_trials = int(_number({"startup_trials": search_raw.get("startup_trials", 10)}, "startup_trials",
                                       "search", integer=True))
    if space.startup_trials < 0:
        raise ConfigError("search space: search.startup_trials must be >= 0")
    space.trial_epochs = parse_trial_epochs(search_raw.get("trial_epochs"), "search space: search.trial_epochs")


def parse_trial_epochs(value: Any, where: str) -> int | float | None:
    """An epoch count >= 1, a fraction in (0, 1) of train.epochs, or None / 0 (every trial trains the whole run)."""
    if value is None or (not isinstance(value, bool) and value == 0):
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value >= 1 and value != int(value)):
        raise ConfigError(f"{where} must be an integer >= 1 (epochs), a fraction between 0 and 1 of train.epochs, "
                          f"or 0 (every trial trains the whole run), got {value!r}")
    return int(value) if value >= 1 else float(value)


def resolve_trial_epochs(trial_epochs: int | float | None, epochs: int) -> int | None:
    """The epochs each trial trains for a run of ``epochs``: a fraction becomes that share (rounded, at least 1);
    None when the trials would train the whole run anyway (nothing is left to continue)."""
    if trial_epochs is None:
        return None
    resolved = max(1, round(trial_epochs * epochs)) if isinstance(trial_epochs, float) else int(trial_epochs)
    return resolved if resolved < epochs else None


def _parse_lr_scaling(scaling_raw: Any, space: SearchSpace) -> LrScaling:
    _check_keys(scaling_raw, ("rule", "reference_batch"), "lr_scaling.")
    scaling = LrScaling(scaling_raw.get("rule", "none"), scaling_raw.get("reference_batch"))
    if scaling.rule not in LR_RULES:
        raise ConfigError(f"search space: lr_scaling.rule must be one of {', '.join(LR_RULES)}, got {scaling.rule!r}")
    if scaling.reference_batch is not None:
        scaling.reference_batch = int(_number(scaling_raw, "reference_batch", "lr_scaling", integer=True))
        if scaling.reference_batch < 1:
            raise ConfigError("search space: lr_scaling.reference_batch must be >= 1")
    if scaling.rule != "none" and "lr" not in space.params:
        raise ConfigError("search space: lr_scaling needs params.lr (the learning rate it scales)")
    return scaling


def _parse_points(points: Any, space: SearchSpace) -> list[dict]:
    if not isinstance(points, list):
        raise ConfigError(f"search space: points_to_evaluate must be a list of mappings, got {points!r}")
    for i, point in enumerate(points):
        _check_keys(point, tuple(space.params), f"points_to_evaluate[{i}].")
    return [dict(p) for p in points]


def load_space(path: str | Path) -> SearchSpace:
    """A search space file, local or on any storage (ConfigError, one line, for anything wrong with it)."""
    raw = read_yaml_mapping(path, "search space")
    try:
        return parse_space(raw)
    except ConfigError as exc:
        raise ConfigError(f"{path}: {exc}") from None


def _config_value(cfg: Config, name: str):
    """The config's own value of the searched parameter ``name`` (a ``train.*`` key; not ``batch``)."""
    return getattr(cfg.train, PARAMS[name].split(".", 1)[1])


def relative_to_config(space: SearchSpace, cfg: Config) -> SearchSpace:
    """The space with every value given relative to the config made absolute, so that one space file fits
    configs whose learning rates differ by 100x and whose runs last 12 or 72 epochs: a ``relative: true``
    range's low and high are multiples of the config's own value (``lr: {low: 0.5, high: 4, relative:
    true}`` searches 0.5x to 4x the config's lr), and a fractional ``asha.grace_period`` is that fraction
    of the epochs a trial trains (rounded, at least 1; ``AshaSettings.resolved``), and ``search.trial_epochs``
    an epoch count below ``train.epochs`` (or None: every trial trains the whole run)."""
    trial_epochs = resolve_trial_epochs(space.trial_epochs, cfg.train.epochs)
    asha = space.asha.resolved(trial_epochs or cfg.train.epochs)
    params = {}
    for name, spec in space.params.items():
        if not spec.get("relative"):
            params[name] = spec
            continue
        value = float(_config_value(cfg, name))
        if not value > 0:
            raise ConfigError(f"search space: params.{name} is relative to the config's {PARAMS[name]}, which is "
                              f"{value:g}; give it a positive value or an absolute range")
        params[name] = {"distribution": spec["distribution"], "low": spec["low"] * value,
                        "high": spec["high"] * value}
    return replace(space, params=params, asha=asha, trial_epochs=trial_epochs)


def optuna_distributions(space: SearchSpace) -> dict:
    """The space as Optuna distributions (OptunaSearch samples these with its seeded TPE sampler)."""
    out = {}
    for name, spec in space.params.items():
        if spec.get("relative"):
            raise ValueError(f"params.{name} is relative: resolve it with relative_to_config first")
        dist = spec["distribution"]
        if dist == "choice":
            out[name] = CategoricalDistribution(spec["values"])
        elif dist == "int_uniform":
            out[name] = IntDistribution(spec["low"], spec["high"], step=spec.get("step", 1))
        elif dist == "log_uniform":
            out[name] = FloatDistribution(spec["low"], spec["high"], log=True)
        else:
            out[name] = FloatDistribution(spec["low"], spec["high"], step=spec.get("step"))
    return out


def config_values(cfg: Config, space: SearchSpace) -> dict:
    """The config's own values of the searched parameters (evaluated first, as a known baseline); with LR
    scaling, its lr as the rule gives it per reference batch."""
    values = {}
    for name in space.params:
        if name == "batch":
            values[name] = format_batch(cfg.train.batch_size, cfg.train.accumulate)
        else:
            values[name] = _config_value(cfg, name)
    if "lr" in values:
        reference = space.lr_scaling.reference_batch or cfg.effective_batch
        values["lr"] = cfg.train.lr / scaled_lr(1.0, cfg.effective_batch, space.lr_scaling.rule, reference)
    return values


def points_to_evaluate(cfg: Config, space: SearchSpace) -> list[dict]:
    """The config's own values first, then the space file's points (missing keys from the config).

    A config value outside a categorical's choices cannot be enqueued; it is replaced by the first choice
    (and the caller's log says so through the returned point).
    """
    base = config_values(cfg, space)
    for name, spec in space.params.items():
        if spec["distribution"] == "choice" and base[name] not in spec["values"]:
            base[name] = spec["values"][0]
    points = [base]
    for point in space.points_to_evaluate:
        full = {**base, **point}
        if "batch" in point:
            full["batch"] = format_batch(*parse_batch(point["batch"], "points_to_evaluate.batch"))
            if full["batch"] not in space.params["batch"]["values"]:
                raise ConfigError(f"search space: points_to_evaluate batch {full['batch']} is not one of the pairs")
        points.append(full)
    return points


def check_space_against_config(space: SearchSpace, cfg: Config) -> None:
    """Every value the space can draw is one the training config accepts (``ConfigError``, one line, naming
    the parameter), and ASHA's grace period leaves it epochs to stop trials in."""
    for name, spec in space.params.items():
        if name == "batch":
            continue  # pairs are checked against the data (sweep._check_space_batches)
        values = spec["values"] if spec["distribution"] == "choice" else [spec["low"], spec["high"]]
        for value in values:
            try:
                cfg.with_overrides(params_to_overrides({name: value}))
            except ConfigError as exc:
                raise ConfigError(f"search space: params.{name}: {value!r} is not a value {PARAMS[name]} can take "
                                  f"({exc})") from None
    trial_length = space.trial_epochs or cfg.train.epochs
    if space.asha.enabled and space.asha.grace_period > trial_length:
        what = (f"search.trial_epochs {trial_length}" if space.trial_epochs else f"train.epochs {cfg.train.epochs}")
        raise ConfigError(f"search space: asha.grace_period {space.asha.grace_period} is longer than a trial "
                          f"({what}): ASHA would stop no trial; lower it (its rungs are at "
                          f"grace_period x reduction_factor^k epochs) or train longer")


def lr_scaling_record(space: SearchSpace, cfg: Config) -> dict:
    """``{"rule", "reference_batch"}`` with the reference resolved against the base config (what a sweep
    records and every trial applies)."""
    return {"rule": space.lr_scaling.rule, "reference_batch": space.lr_scaling.reference_batch or cfg.effective_batch}


def trial_config(base: Config, params: dict, lr_scaling: dict | None = None) -> Config:
    """The validated training config of one trial: ``base`` with its parameters; with an LR rule
    (``lr_scaling_record``), ``train.lr`` is the searched lr scaled to the trial's effective batch."""
    cfg = base.with_overrides(params_to_overrides(params))
    rule = (lr_scaling or {}).get("rule", "none")
    if rule != "none" and "lr" in params:
        lr = scaled_lr(float(params["lr"]), cfg.effective_batch, rule, int(lr_scaling["reference_batch"]))
        cfg = cfg.with_overrides({"train.lr": lr})
    return cfg


def params_to_overrides(params: dict) -> dict:
    """Sampled parameters -> dotted config overrides (``{"train.lr": 3e-4, ...}``)."""
    overrides = {}
    for name, value in params.items():
        if name not in PARAMS:
            continue  # a trial config's keys that are not searched parameters are not config
        if name == "batch":
            overrides["train.batch_size"], overrides["train.accumulate"] = parse_batch(value)
        else:
            overrides[PARAMS[name]] = value
    return overrides
