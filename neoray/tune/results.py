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

from neoray import storage
from neoray.config import Config, save_config
from neoray.engine import ranking
from neoray.tune.space import PARAMS, params_to_overrides

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


def _status(trial, asha_stopped: dict) -> str:
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


def collect_rows(trials: list, sweep_dir: str, space_params) -> list[dict]:
    """One row per trial, from Tune's trial state and each trial's history in the sweep's storage."""
    asha_stopped = read_asha_stopped(sweep_dir)
    rows = []
    for trial in trials:
        name = str(trial)
        history = load_history(sweep_dir, name)
        last = history[-1] if history else {}
        row = {"trial": name, "status": _status(trial, asha_stopped)}
        for param in space_params:
            row[param] = trial.config.get(param)
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


def export_best_config(base: Config, row: dict, path: str, sweep_name: str) -> Config:
    """The best trial's parameters applied to the base config: ready for `neoray train BEST_CONFIG`."""
    overrides = params_to_overrides({k: row[k] for k in PARAMS if k in row and row[k] is not None})
    overrides["name"] = f"{sweep_name}_best"
    cfg = base.with_overrides(overrides)
    save_config(cfg, path)
    return cfg


__all__ = [
    "asha_rungs", "best_row", "collect_rows", "export_best_config", "format_value", "load_history", "read_asha_stopped",
    "read_asha_stopped_file", "rows_to_csv", "rows_to_markdown", "sweep_interrupted", "trial_ended",
]
