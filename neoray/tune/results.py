"""A sweep's results, read and written without Ray: the trial table, the best trial and its config, each
trial's per-epoch history, and ASHA's recorded decisions.

``neoray report`` and the end of ``run_sweep`` both use it. The trial objects it reads are Tune's
``Trial`` (``status``, ``config``, ``last_result``, ``num_failures``, ``local_path``), used by attribute
only, so nothing here imports Ray.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os

from neoray import storage
from neoray.config import Config, ConfigError, from_dict, save_config
from neoray.engine import ranking
from neoray.tune.space import PARAMS, trial_config
from neoray.tune.trust import RungTrust, advice, rung_trust, trust_record

SCORE = ranking.SCORE


def asha_rungs(grace_period: int, reduction_factor: float, max_t: int) -> list[float]:
    """The milestones at which ASHA compares trials: grace_period * rf^k below max_t."""
    rungs, t = [], float(grace_period)
    while t < max_t:
        rungs.append(t)
        t *= reduction_factor
    return rungs




def load_history(sweep_dir: str, trial: str) -> list[dict]:
    """Per-epoch results of one trial from Tune's result.json (one JSON object per report)."""
    try:
        text = storage.read_text(storage.join(sweep_dir, trial, "result.json"))
    except FileNotFoundError:
        return []
    rows = []
    for line in text.splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a line cut short by a kill
    return rows


def trial_ended(trial, asha_stopped: dict) -> bool:
    """Whether a trial ended on its own terms: errored, stopped by ASHA, or its training function returned
    (Tune then sets ``done`` in its last result, also when a stop criterion ended it). After Ctrl-C, Tune
    marks the trials it stops TERMINATED as well, but their last result is not ``done``."""
    return trial.status == "ERROR" or str(trial) in asha_stopped or bool((trial.last_result or {}).get("done"))


def trial_status(trial, asha_stopped: dict) -> str:
    """How a trial ended, as the results table and the trackers name it."""
    if trial.status == "ERROR":
        return "errored"
    if not trial_ended(trial, asha_stopped):
        return "interrupted"  # pending, running or stopped by Ctrl-C when fit() returned
    return "stopped early (ASHA)" if str(trial) in asha_stopped else "finished"


def read_asha_stopped_file(path: str) -> dict:
    try:
        return storage.read_json(path)
    except FileNotFoundError:
        return {}


def read_asha_stopped(sweep_dir: str) -> dict:
    return read_asha_stopped_file(storage.join(sweep_dir, "asha_stopped.json"))


def sweep_interrupted(trials: list, asha_stopped: dict, num_samples: int) -> bool:
    """True when fit() returned before the sweep's end: a trial that has not ended on its own terms, or
    trials the searcher never created (Ctrl-C between two trials)."""
    return len(trials) < num_samples or not all(trial_ended(t, asha_stopped) for t in trials)


def _best_metric(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if h.get("evaluated") and isinstance(h.get(key), (int, float))
              and math.isfinite(h[key])]
    return max(values) if values else None


def collect_rows(trials: list, sweep_dir: str, space_params, meta: dict | None = None) -> list[dict]:
    """One row per trial, from Tune's trial state and each trial's history in the sweep's storage. With
    the sweep's record (``meta``): the learning rate each trial trained with when the space scales it
    (``lr_trial``), and which trials the warm start chose (``warm_start``)."""
    meta = meta or {}
    asha_stopped = read_asha_stopped(sweep_dir)
    warm = {f"trial_{i:04d}": w["trial"] for i, w in enumerate(meta.get("warm_start", {}).get("trials", []), 1)}
    rows = []
    for trial in trials:
        name = str(trial)
        history = load_history(sweep_dir, name)
        last = history[-1] if history else {}
        row = {"trial": name, "status": trial_status(trial, asha_stopped)}
        for param in space_params:
            row[param] = trial.config.get(param)
        if (meta.get("lr_scaling") or {}).get("rule", "none") != "none":
            row["lr_trial"] = trial_config(from_dict(meta["base_config"]), trial.config, meta["lr_scaling"]).train.lr
        if warm:
            row["warm_start"] = warm.get(name, "")
        row.update({
            "best_map": _best_metric(history, "map"),
            "best_map50": _best_metric(history, "map50"),
            "best_score": ranking.best_score(history),
            "epochs": last.get("epoch", last.get("training_iteration", 0)),
            "failures": trial.num_failures,
            "time_s": round(float(last.get("time_total_s", 0.0)), 1),
            "error": _short_error(trial),
        })
        rows.append(row)
    rows.sort(key=lambda r: r["trial"])
    return rows


def _short_error(trial) -> str:
    if trial.status != "ERROR":
        return ""
    text = "failed"
    if trial.local_path:
        try:
            text = storage.read_text(storage.join(trial.local_path, "error.txt"))
        except OSError:
            pass
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1][:160] if lines else "failed"


def best_row(rows: list[dict]) -> dict | None:
    """The trial with the highest best score (ranking.best over the trials' best epochs); on a tie the
    earlier trial (ranking.best keeps the later of its input, so the trials go in reversed)."""
    scored = [{**row, SCORE: row["best_score"]} for row in sorted(rows, key=lambda r: r["trial"], reverse=True)]
    chosen = ranking.best(scored)
    return next(row for row in rows if row["trial"] == chosen["trial"]) if chosen else None


def format_value(value) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def rows_to_csv(rows: list[dict]) -> str:
    if not rows:
        return ""
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=list(rows[0]), lineterminator="\n")
    writer.writeheader()
    writer.writerows({k: ("" if v is None else v) for k, v in row.items()} for row in rows)
    return out.getvalue()


def rows_to_markdown(rows: list[dict]) -> str:
    if not rows:
        return "(no trials)\n"
    keys = [k for k in rows[0] if k != "error"]
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(format_value(r[k]) for k in keys) + " |" for r in rows]
    errors = [f"- {r['trial']}: {r['error']}" for r in rows if r.get("error")]
    if errors:
        lines += ["", "Errors:"] + errors
    return "\n".join(lines) + "\n"


def export_best_config(base: Config, row: dict, path: str, sweep_name: str, lr_scaling: dict | None = None,
                       cwd: str | None = None) -> Config:
    """The best trial's config (its parameters on the base config, its lr as it trained): ready for
    `neoray train BEST_CONFIG`. Local paths under ``cwd`` (the sweep's working directory) are written
    relative to it, as configs name them, so the file works in a teammate's checkout too."""
    params = {k: row[k] for k in PARAMS if k in row and row[k] not in (None, "")}
    cfg = trial_config(base, params, lr_scaling).with_overrides({"name": f"{sweep_name}_best"})
    cfg = cfg.with_overrides(_relative_paths(cfg, cwd or os.getcwd()))
    save_config(cfg, path)
    return cfg


PATH_KEYS = ("data.train", "data.val", "output", "model.init_from", "model.backbone_weights")


def _relative_paths(cfg: Config, cwd: str) -> dict:
    flat = {"data.train": cfg.data.train, "data.val": cfg.data.val, "output": cfg.output,
            "model.init_from": cfg.model.init_from, "model.backbone_weights": cfg.model.backbone_weights}
    out = {}
    for key in PATH_KEYS:
        path = flat[key]
        if path and not storage.is_uri(path) and os.path.isabs(path) and os.path.commonpath([path, cwd]) == cwd:
            out[key] = os.path.relpath(path, cwd)
    return out



TRUST_FILE = "rung_trust.json"


def measure_trust(sweep_dir: str, meta: dict, rows: list[dict]) -> tuple[list[RungTrust], str | None]:
    """How far the sweep's ASHA rungs can be trusted (neoray.tune.trust), from every trial's history;
    written to SWEEP_DIR/rung_trust.json. Returns the rungs and the one-line advice (None: all held)."""
    asha = meta["asha"]
    histories = {row["trial"]: load_history(sweep_dir, row["trial"]) for row in rows}
    trust = rung_trust(histories, meta["rungs"], float(asha["reduction_factor"]), int(asha["max_t"]),
                       asha.get("time_attr", "epoch"))
    line = advice(trust, int(asha["grace_period"]), float(asha["reduction_factor"]), int(asha["max_t"]))
    storage.write_json(storage.join(sweep_dir, TRUST_FILE), {"rungs": trust_record(trust), "advice": line}, indent=2)
    return trust, line


# What neoray reads back from a sweep.json (anything else may be missing from older or foreign records).
RECORD_FIELDS = {"name": str, "metric": str, "mode": str, "asha": dict, "rungs": list, "params": dict,
                 "num_samples": int}


def read_sweep_record(sweep_dir: str) -> dict:
    """SWEEP_DIR/sweep.json, checked (``ConfigError``, one line, for a folder without one or a record that
    is not a neoray sweep's)."""
    path = storage.join(sweep_dir, "sweep.json")
    if not storage.is_file(path):
        raise ConfigError(f"{sweep_dir}: not a sweep directory (no sweep.json)")
    try:
        record = storage.read_json(path)
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise ConfigError(f"{path}: not valid JSON ({type(exc).__name__})") from None
    if not isinstance(record, dict):
        raise ConfigError(f"{path}: not a neoray sweep record (expected a mapping)")
    for key, kind in RECORD_FIELDS.items():
        if not isinstance(record.get(key), kind) or isinstance(record.get(key), bool):
            raise ConfigError(f"{path}: not a neoray sweep record (field '{key}' is missing or not a {kind.__name__})")
    asha = record["asha"]
    if not all(isinstance(asha.get(k), (int, float)) for k in ("grace_period", "reduction_factor", "max_t")):
        raise ConfigError(f"{path}: not a neoray sweep record (field 'asha' lacks grace_period, reduction_factor "
                          "or max_t)")
    return record


def read_trial_rows(sweep_dir: str) -> list[dict]:
    """SWEEP_DIR/trials.csv (the table every sweep writes when it ends or is interrupted)."""
    path = storage.join(sweep_dir, "trials.csv")
    if not storage.is_file(path):
        raise ConfigError(f"{sweep_dir}: no trials.csv; the sweep has not finished (continue it with --resume)")
    return list(csv.DictReader(io.StringIO(storage.read_text(path))))


def warm_start_record(previous_dir: str, space_params: dict, limit: int) -> dict:
    """The ``limit`` best trials of a previous sweep, best first, as points of the new space:
    ``{"from": dir, "trials": [{"trial", "params", "best_score"}]}``. A trial whose value of a categorical
    parameter is not one of the new choices is left out; parameters the new space does not search are
    dropped (the new base config's values stand in for the ones it adds)."""
    previous_dir = storage.absolute(previous_dir)
    read_sweep_record(previous_dir)
    scored = [r for r in read_trial_rows(previous_dir) if finite_number(r.get("best_score")) is not None]
    scored.sort(key=lambda r: (-finite_number(r["best_score"]), r["trial"]))
    trials = []
    for row in scored:
        params = _params_from_text(row, space_params)
        if params is not None:
            trials.append({"trial": row["trial"], "params": params, "best_score": finite_number(row["best_score"])})
    if not trials:
        raise ConfigError(f"--warm-start {previous_dir}: no trial of that sweep has a score in the new space")
    return {"from": previous_dir, "trials": trials[:max(1, limit)]}


def finite_number(text) -> float | None:
    """A number read back from text (trials.csv), None when it is empty, not a number or not finite."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


def _same_choice(value, text: str) -> bool:
    """A categorical value read back from CSV text: the same string, or the same number (0.01 vs 1e-2)."""
    number = finite_number(text)
    return str(value) == text or (number is not None and finite_number(value) == number)


def _params_from_text(row: dict, space_params: dict) -> dict | None:
    """A trials.csv row's parameters (text) as the values ``space_params`` draws; None when one cannot be."""
    params = {}
    for name, spec in space_params.items():
        text = row.get(name)
        if text in (None, ""):
            continue
        if spec["distribution"] == "choice":
            matches = [v for v in spec["values"] if _same_choice(v, text)]
            if not matches:
                return None
            params[name] = matches[0]
        elif spec["distribution"] == "int_uniform":
            params[name] = int(float(text))
        else:
            params[name] = float(text)
    return params

__all__ = [
    "TRUST_FILE", "asha_rungs", "best_row", "collect_rows", "export_best_config", "finite_number", "format_value",
    "load_history", "measure_trust", "read_asha_stopped", "read_asha_stopped_file", "read_sweep_record",
    "read_trial_rows", "rows_to_csv", "rows_to_markdown", "sweep_interrupted", "trial_ended", "trial_status",
    "warm_start_record",
]
