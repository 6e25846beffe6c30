"""A sweep's trial table, read and written without Ray: one row per trial from Tune's trial state and each
trial's per-epoch history, the best trial, and the table as CSV and Markdown (``trials.csv``, ``trials.md``).

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
from neoray.config import ConfigError
from neoray.engine import ranking
from neoray.tune import asha
from neoray.tune.record import SweepRecord
from neoray.tune.space import trial_config

TABLE_CSV, TABLE_MARKDOWN = "trials.csv", "trials.md"


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


def trial_ended(trial, asha_stopped: dict, max_t: int | None = None) -> bool:
    """Whether a trial ended on its own terms: errored, stopped by ASHA, or its training function returned
    (Tune then sets ``done`` in its last result, also when a stop criterion ended it). After Ctrl-C, Tune
    marks the trials it stops TERMINATED as well, but their last result is not ``done``. Tune's saved state does
    not keep ``done`` (Ray 2.60: a trial that had finished comes back from ``--resume`` TERMINATED without it),
    so a TERMINATED trial whose last result reached ``max_t`` epochs, or that stopped itself (a ``stop_reason``:
    early stopping, a guard), ended too."""
    result = trial.last_result or {}
    if trial.status == "ERROR" or str(trial) in asha_stopped or result.get("done"):
        return True
    return trial.status == "TERMINATED" and bool(
        result.get("stop_reason") or (max_t is not None and (result.get("epoch") or 0) >= max_t))


def trial_status(trial, asha_stopped: dict, max_t: int | None = None) -> str:
    """How a trial ended, as the results table and the trackers name it."""
    if trial.status == "ERROR":
        return "errored"
    if not trial_ended(trial, asha_stopped, max_t):
        return "interrupted"  # pending, running or stopped by Ctrl-C when fit() returned
    return "stopped early (ASHA)" if str(trial) in asha_stopped else "finished"


def sweep_interrupted(trials: list, asha_stopped: dict, num_samples: int, max_t: int | None = None) -> bool:
    """True when fit() returned before the sweep's end: a trial that has not ended on its own terms, or
    trials the searcher never created (Ctrl-C between two trials)."""
    return len(trials) < num_samples or not all(trial_ended(t, asha_stopped, max_t) for t in trials)


def _best_metric(history: list[dict], key: str) -> float | None:
    values = [h[key] for h in history if h.get("evaluated") and isinstance(h.get(key), (int, float))
              and math.isfinite(h[key])]
    return max(values) if values else None


def collect_rows(trials: list, sweep_dir: str, record: SweepRecord) -> list[dict]:
    """One row per trial, from Tune's trial state and each trial's history in the sweep's storage: its searched
    parameters, the learning rate it trained with when the space scales it (``lr_trial``), which trials the
    warm start chose (``warm_start``), its best metrics, epochs, failures and time."""
    asha_stopped = asha.read_stopped(sweep_dir)
    warm_trials = record.warm_start.trials if record.warm_start else ()
    warm = {f"trial_{i:04d}": w["trial"] for i, w in enumerate(warm_trials, 1)}
    rows = []
    for trial in trials:
        name = str(trial)
        history = load_history(sweep_dir, name)
        last = history[-1] if history else {}
        row = {"trial": name, "status": trial_status(trial, asha_stopped, record.asha.max_t)}
        for param in record.params:
            row[param] = trial.config.get(param)
        if record.lr_scaling.get("rule", "none") != "none":
            row["lr_trial"] = trial_config(record.base_config, trial.config, record.lr_scaling).train.lr
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
    scored = [{**row, ranking.SCORE: row["best_score"]} for row in sorted(rows, key=lambda r: r["trial"], reverse=True)]
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


def read_trial_rows(sweep_dir: str) -> list[dict]:
    """SWEEP_DIR/trials.csv (the table every sweep writes when it ends or is interrupted)."""
    path = storage.join(sweep_dir, TABLE_CSV)
    if not storage.is_file(path):
        raise ConfigError(f"{sweep_dir}: no trials.csv; the sweep has not finished (continue it with --resume)")
    return list(csv.DictReader(io.StringIO(storage.read_text(path))))


def finite_number(text) -> float | None:
    """A number read back from text (trials.csv), None when it is empty, not a number or not finite."""
    try:
        value = float(text)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


__all__ = [
    "TABLE_CSV", "TABLE_MARKDOWN", "best_row", "collect_rows", "finite_number", "format_value", "load_history",
    "read_trial_rows", "rows_to_csv", "rows_to_markdown", "sweep_interrupted", "trial_ended", "trial_status",
]
