"""``--warm-start SWEEP_DIR``: a previous sweep's best configurations, run first in a new sweep.

Read from the previous sweep's ``sweep.json`` and ``trials.csv`` (text): a value is mapped back to what the
new space draws, a trial whose categorical value is not one of the new choices is left out, and parameters the
new space does not search are dropped (the new base config's values stand in for the ones it adds). Nothing
here imports Ray.
"""

from __future__ import annotations

from neoray import storage
from neoray.config import ConfigError
from neoray.tune.record import WarmStart, read_record
from neoray.tune.results import finite_number, read_trial_rows


def warm_start_record(previous_dir: str, space_params: dict, limit: int) -> WarmStart:
    """The ``limit`` best trials of a previous sweep, best first, as points of the new space
    (``{"trial", "params", "best_score"}`` each)."""
    previous_dir = storage.absolute(previous_dir)
    read_record(previous_dir)
    scored = [r for r in read_trial_rows(previous_dir) if finite_number(r.get("best_score")) is not None]
    scored.sort(key=lambda r: (-finite_number(r["best_score"]), r["trial"]))
    trials = []
    for row in scored:
        params = _params_from_text(row, space_params)
        if params is not None:
            trials.append({"trial": row["trial"], "params": params, "best_score": finite_number(row["best_score"])})
    if not trials:
        raise ConfigError(f"--warm-start {previous_dir}: no trial of that sweep has a score in the new space")
    return WarmStart(previous_dir, tuple(trials[:max(1, limit)]))


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


__all__ = ["warm_start_record"]
