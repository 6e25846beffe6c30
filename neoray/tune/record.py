"""The sweep record: what a sweep ran with, written once to ``SWEEP_DIR/sweep.json`` when it starts and read
back by ``--resume``, ``--warm-start``, ``neoray report``, the rung-trust summary and the trackers.

``SweepRecord`` is the one form of it in memory; ``to_dict`` / ``from_dict`` are its only (de)serialisation,
and ``read_record`` checks a file in one line. The file carries ``"format": "neoray-sweep"`` and a
``"version"``; a record without them is the first version (written before the format was named), read by
the same fields; a file of another format or of a newer version is refused in one line naming it.
Nothing here imports Ray.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from neoray import storage
from neoray.cluster import TrialResources
from neoray.config import Config, ConfigError, from_dict
from neoray.engine import ranking
from neoray.tune.asha import AshaSettings

FORMAT = "neoray-sweep"
VERSION = 2
FILE_NAME = "sweep.json"


@dataclass(frozen=True)
class SearchSettings:
    sampler: str = "tpe"  # neoray.tune.space.SAMPLERS
    startup_trials: int = 10  # TPE's random start-up trials
    given: int = 1  # configurations run before the sampler's own: the config's values and the space's points
    # Epochs each trial trains of the base config's schedule, the best trial then continued to its end
    # (neoray.tune.continue_best); None: every trial trains the whole schedule.
    trial_epochs: int | None = None


@dataclass(frozen=True)
class WarmStart:
    source: str  # the previous sweep directory
    trials: tuple[dict, ...]  # {"trial", "params", "best_score"}, best first


@dataclass
class SweepRecord:
    name: str
    asha: AshaSettings  # resolved: grace period in epochs, max_t the run's epochs
    params: dict[str, dict]  # the searched parameters' validated specs (neoray.tune.space)
    num_samples: int
    seed: int = 0
    search: SearchSettings = field(default_factory=SearchSettings)
    lr_scaling: dict = field(default_factory=lambda: {"rule": "none", "reference_batch": None})
    resources: TrialResources | None = None  # None only in records that never ran (tests, foreign tools)
    base_config: Config | None = None
    track: list[str] = field(default_factory=list)  # the --track specs the sweep started with
    options: dict = field(default_factory=dict)  # the command's options as given, for the reader
    warm_start: WarmStart | None = None
    optuna: dict | None = None  # the study's record (neoray.tune.study)
    tracking: dict = field(default_factory=dict)  # each tracker's own record (neoray.tune.sweep_tracking)
    metric: str = ranking.SCORE
    mode: str = ranking.MODE

    @property
    def rungs(self) -> list[float]:
        return self.asha.rungs

    def to_dict(self) -> dict:
        return {
            "format": FORMAT, "version": VERSION, "name": self.name, "metric": self.metric, "mode": self.mode,
            "metric_doc": ranking.SCORE_DOC, "asha": self.asha.to_dict(), "rungs": self.rungs, "params": self.params,
            "seed": self.seed, "num_samples": self.num_samples, "search": asdict(self.search),
            "lr_scaling": self.lr_scaling, "resources": asdict(self.resources) if self.resources else None,
            "base_config": self.base_config.to_dict() if self.base_config else None, "track": list(self.track),
            "options": self.options,
            "warm_start": ({"from": self.warm_start.source, "trials": list(self.warm_start.trials)}
                           if self.warm_start else None),
            "optuna": self.optuna, "tracking": self.tracking,
        }


# Fields every version has, with their JSON types (bool is refused where a number is expected).
_REQUIRED = {"name": str, "metric": str, "mode": str, "asha": dict, "params": dict, "num_samples": int}


def parse_record(raw: Any, where: str) -> SweepRecord:
    """A record read from JSON (version 1 or this one); ``ConfigError`` naming ``where`` and the field."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: not a neoray sweep record (expected a mapping)")
    if raw.get("format", FORMAT) != FORMAT:
        raise ConfigError(f"{where}: not a neoray sweep record (format {str(raw.get('format'))[:40]!r})")
    version = raw.get("version", 1)
    if version not in (1, VERSION):
        raise ConfigError(f"{where}: sweep record version {str(version)[:20]} is newer than this neoray reads "
                          f"(up to {VERSION}); upgrade neoray")
    for key, kind in _REQUIRED.items():
        if not isinstance(raw.get(key), kind) or isinstance(raw.get(key), bool):
            raise ConfigError(f"{where}: not a neoray sweep record (field '{key}' is missing or not a {kind.__name__})")
    return SweepRecord(
        name=raw["name"], metric=raw["metric"], mode=raw["mode"], asha=_asha(raw["asha"], where),
        params=raw["params"], num_samples=raw["num_samples"], seed=int(raw.get("seed") or 0),
        search=_typed(SearchSettings, raw.get("search") or {}, where, "search"),
        lr_scaling=raw.get("lr_scaling") or {"rule": "none", "reference_batch": None},
        resources=_typed(TrialResources, raw["resources"], where, "resources") if raw.get("resources") else None,
        base_config=_config(raw.get("base_config"), where),
        # version 1 kept the --track specs among the command's options
        track=list(raw.get("track") or (raw.get("options") or {}).get("track") or []),
        options=raw.get("options") or {}, warm_start=_warm_start(raw.get("warm_start")),
        optuna=raw.get("optuna"), tracking=raw.get("tracking") or {},
    )


def _asha(raw: dict, where: str) -> AshaSettings:
    asha = _typed(AshaSettings, raw, where, "asha")
    numbers = (asha.grace_period, asha.reduction_factor, asha.max_t)
    if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in numbers):
        raise ConfigError(f"{where}: not a neoray sweep record (field 'asha' lacks grace_period, reduction_factor "
                          "or max_t)")
    return asha


def _typed(kind, raw: Any, where: str, key: str):
    try:
        return kind(**raw)
    except TypeError:
        raise ConfigError(f"{where}: not a neoray sweep record (field '{key}' does not describe "
                          f"{kind.__name__})") from None


def _config(raw: Any, where: str) -> Config | None:
    if raw is None:
        return None
    try:
        return from_dict(raw)
    except ConfigError as exc:
        raise ConfigError(f"{where}: field 'base_config': {exc}") from None


def _warm_start(raw: dict | None) -> WarmStart | None:
    return WarmStart(raw["from"], tuple(raw.get("trials") or ())) if raw else None


def record_path(sweep_dir: str) -> str:
    return storage.join(sweep_dir, FILE_NAME)


def read_record(sweep_dir: str) -> SweepRecord:
    """SWEEP_DIR/sweep.json, checked (``ConfigError``, one line, for a folder without one or a record that is
    not a neoray sweep's)."""
    path = record_path(sweep_dir)
    if not storage.is_file(path):
        other = storage.not_a_folder(sweep_dir)
        if other:
            raise ConfigError(f"{sweep_dir}: {other}, not a sweep directory")
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no {FILE_NAME})")
    try:
        raw = storage.read_json(path)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    return parse_record(raw, path)


def write_record(sweep_dir: str, record: SweepRecord) -> None:
    storage.write_json(record_path(sweep_dir), record.to_dict(), indent=2)


__all__ = ["FILE_NAME", "FORMAT", "VERSION", "SearchSettings", "SweepRecord", "WarmStart", "parse_record",
           "read_record", "record_path", "write_record"]
