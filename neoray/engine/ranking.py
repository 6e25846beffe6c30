"""What "better" means, for every consumer: checkpoints, a run's best epoch, a sweep's trials and ASHA.

One number per epoch, ``score`` (higher is better):

* on an epoch that evaluated: its mAP (in [0, 1]);
* on any other epoch: minus its mean training loss (every neoray loss is >= 0, so this is <= 0 and an
  evaluated epoch always outranks an unevaluated one); ``WORST`` when the loss is not finite.

The best of a list of epochs is the one with the highest score, the later one on ties: exactly the order
in which Ray's ``CheckpointConfig(checkpoint_score_attribute="score", checkpoint_score_order="max")``
keeps checkpoints, so the checkpoint neoray records as best is one Ray keeps. A run's best epoch is the
same one. A sweep ranks trials by their best score (a trial that evaluated outranks one that did not),
and ASHA compares the trials' scores at a rung, where they all stand at the same epoch of the same
schedule: mAP against mAP, or training loss against training loss.

``map`` and the other COCO metrics appear in an epoch's metrics only when that epoch evaluated
(``evaluated`` is 1 then, 0 otherwise).
"""

from __future__ import annotations

import math
from typing import Iterable

SCORE = "score"
MODE = "max"
WORST = -1e9  # a finite "worst" (Tune's ASHA takes percentiles of scores; -inf would make them NaN)
SCORE_DOC = ("score = mAP on evaluation epochs, minus the training loss on the others (an evaluated epoch "
             "always ranks higher); higher is better")


def _finite(value) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        return None
    return float(value)


def epoch_score(metrics: dict) -> float:
    """The score of one epoch's metrics (see the module docstring)."""
    if metrics.get("evaluated"):
        value = _finite(metrics.get("map"))
    else:
        loss = _finite(metrics.get("loss"))
        value = -loss if loss is not None else None
    return value if value is not None else WORST


def score_of(row: dict) -> float | None:
    """A reported row's score, None when it has none."""
    return _finite(row.get(SCORE))


def best(rows: Iterable[dict]) -> dict | None:
    """The row with the highest score; the later one on ties (rows in report order)."""
    chosen, chosen_score = None, None
    for row in rows:
        value = score_of(row)
        if value is not None and (chosen_score is None or value >= chosen_score):
            chosen, chosen_score = row, value
    return chosen


def best_score(rows: Iterable[dict]) -> float | None:
    row = best(rows)
    return score_of(row) if row is not None else None


__all__ = ["MODE", "SCORE", "SCORE_DOC", "WORST", "best", "best_score", "epoch_score", "score_of"]
