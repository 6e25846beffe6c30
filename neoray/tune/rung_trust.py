"""Can a sweep's early stopping be trusted? Measured from the sweep's own trials, after the fact.

ASHA stops a trial at a rung (an epoch) when its ``score`` there falls below the cut: the ``1 - 1/rf``
quantile of the scores recorded at that rung (rf: the reduction factor). That is only as good as the
rung's ranking is a forecast of the final one. Two numbers per rung say how good it was here:

* **rank correlation**: among the trials that ran to the end, Spearman's correlation between their score
  at the rung and their final standing (each trial's best score, as the sweep ranks trials). 1 means the
  rung ordered them exactly as the end did; near 0, the rung was a coin toss. Needs 3 or more trials
  that reached the end.
* **margin of the eventual best**: the best trial's score at the rung minus the cut, computed over every
  trial recorded at that rung. Negative: a trial that good, arriving later, would have been stopped.

A rung is flagged when its correlation is below ``MIN_CORRELATION`` or the eventual best's margin is
negative; the flag suggests a later grace period or a gentler cut. ``verdict`` says in one line what held,
what did not and what could not be measured; ``measure_trust`` writes it all to ``SWEEP_DIR/rung_trust.json``.
Nothing here imports Ray.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import numpy as np
from scipy.stats import spearmanr

from neoray import storage
from neoray.engine import ranking
from neoray.tune.asha import AshaSettings
from neoray.tune.record import SweepRecord
from neoray.tune.results import load_history

MIN_CORRELATION = 0.5  # below this a rung's ranking is a weak forecast of the final one
MIN_FINISHED = 3  # fewer trials at the end than this: no correlation is computed
TRUST_FILE = "rung_trust.json"


@dataclass
class RungTrust:
    rung: float  # the epoch of the rung
    trials_at_rung: int
    finished: int  # trials that ran to the end, whose ranks are compared
    correlation: float | None  # Spearman; None with fewer than MIN_FINISHED finished trials
    best_trial: str | None  # the eventual best trial
    best_rank: int | None  # its rank at the rung (1 = first), among trials_at_rung
    best_margin: float | None  # its score at the rung minus the cut
    trusted: bool

    @property
    def measured(self) -> bool:
        """Whether anything was measured at this rung: the ranking, or where the eventual best stood."""
        return self.correlation is not None or self.best_margin is not None

    def line(self, reduction_factor: float) -> str:
        corr = (f"rank correlation with the final standing {self.correlation:.2f} over {self.finished} trials that "
                f"reached the end" if self.correlation is not None
                else f"only {self.finished} trial(s) reached the end: too few to measure its ranking")
        best = ""
        if self.best_rank is not None:
            keep = max(1, int(self.trials_at_rung / reduction_factor))
            side = "above" if self.best_margin >= 0 else "BELOW"
            best = (f"; the eventual best ({self.best_trial}) ranked {self.best_rank} of {self.trials_at_rung} there "
                    f"(about the top {keep} continue), {abs(self.best_margin):.4f} {side} the cut")
        return f"rung at epoch {self.rung:g}: {corr}{best}"


def score_at(history: list[dict], epoch: float, time_attr: str = "epoch") -> float | None:
    """A trial's score at ``epoch`` (its report with that time attribute), None when it stopped before."""
    for row in history:
        if row.get(time_attr) == epoch:
            return ranking.score_of(row)
    return None


def rung_trust(histories: dict[str, list[dict]], rungs: list[float], reduction_factor: float, max_t: int,
               time_attr: str = "epoch") -> list[RungTrust]:
    """One ``RungTrust`` per rung, from every trial's per-epoch history (``{trial: [result, ...]}``)."""
    best_scores = {t: ranking.best_score(h) for t, h in histories.items()}
    best_scores = {t: s for t, s in best_scores.items() if s is not None}
    finished = [t for t, h in histories.items() if t in best_scores and any(r.get(time_attr) == max_t for r in h)]
    best_trial = max(best_scores, key=lambda t: (best_scores[t], t), default=None)
    out = []
    for rung in rungs:
        at_rung = {t: s for t, h in histories.items() if (s := score_at(h, rung, time_attr)) is not None}
        corr = None
        pairs = [(at_rung[t], best_scores[t]) for t in finished if t in at_rung]
        if len(pairs) >= MIN_FINISHED:
            value = spearmanr(*zip(*pairs)).statistic
            corr = None if math.isnan(value) else float(value)
        rank = margin = None
        if best_trial in at_rung:
            cut = float(np.percentile(list(at_rung.values()), (1 - 1 / reduction_factor) * 100))
            margin = at_rung[best_trial] - cut
            rank = 1 + sum(1 for s in at_rung.values() if s > at_rung[best_trial])
        trusted = (corr is None or corr >= MIN_CORRELATION) and (margin is None or margin >= 0)
        out.append(RungTrust(rung, len(at_rung), len(pairs), corr, best_trial if rank else None, rank, margin,
                             trusted))
    return out


def verdict(trust: list[RungTrust], asha: AshaSettings) -> str:
    """One line on every rung: the first to distrust and the fix; else, rung by rung, what was measured and
    held and what could not be measured."""
    weak = [t for t in trust if not t.trusted]
    if weak:
        return _advice(weak[0], asha)
    return " ".join(_held(t) for t in trust)


def _held(t: RungTrust) -> str:
    ranking_part = (f"its ranking agreed with the final one (rank correlation {t.correlation:.2f})"
                    if t.correlation is not None else
                    f"its ranking was not measured ({t.finished} trial(s) reached the end; {MIN_FINISHED} needed)")
    best_part = ("the eventual best stood above the cut" if t.best_margin is not None
                 else "where the eventual best stood was not measured (it never reached the rung)")
    return f"Rung at epoch {t.rung:g}: {ranking_part}; {best_part}."


def _advice(first: RungTrust, asha: AshaSettings) -> str:
    later = min(asha.max_t - 1, max(int(asha.grace_period) * 2, int(first.rung) + 1))
    gentler = " or a gentler cut (--reduction-factor 2 keeps half)" if asha.reduction_factor > 2 else ""
    why = []
    if first.correlation is not None and first.correlation < MIN_CORRELATION:
        why.append(f"its ranking predicted the final one poorly (rank correlation {first.correlation:.2f})")
    if first.best_margin is not None and first.best_margin < 0:
        why.append(f"the eventual best, {first.best_trial}, stood below the cut there")
    return (f"ASHA's rung at epoch {first.rung:g} is not to be trusted here: {' and '.join(why)}. Sweep again with a "
            f"later grace period (--grace-period {later}){gentler}, or more epochs per trial.")


def measure_trust(sweep_dir: str, record: SweepRecord, rows: list[dict]) -> tuple[list[RungTrust], str]:
    """How far the sweep's ASHA rungs can be trusted, from every trial's history; written to
    SWEEP_DIR/rung_trust.json. Returns the rungs and the verdict line."""
    asha = record.asha
    histories = {row["trial"]: load_history(sweep_dir, row["trial"]) for row in rows}
    trust = rung_trust(histories, asha.rungs, float(asha.reduction_factor), int(asha.max_t), asha.time_attr)
    line = verdict(trust, asha)
    storage.write_json(storage.join(sweep_dir, TRUST_FILE), {"rungs": trust_record(trust), "verdict": line},
                       indent=2)
    return trust, line


def trust_record(trust: list[RungTrust]) -> list[dict]:
    return [asdict(t) for t in trust]


EXPLANATION = (
    "For each ASHA rung: the rank correlation (Spearman) between the trials' scores at the rung and their final "
    "standing, over the trials that ran to the end (1: the rung ordered them as the end did; near 0: a coin toss), "
    "and where the eventual best trial stood at the rung: its rank and its margin over the cut (the score ASHA "
    "requires to continue, the top 1/reduction-factor of the trials recorded there). A negative margin means a "
    "trial as good as the eventual best, arriving later, would have been stopped."
)


__all__ = ["EXPLANATION", "MIN_CORRELATION", "TRUST_FILE", "RungTrust", "measure_trust", "rung_trust", "score_at",
           "trust_record", "verdict"]
