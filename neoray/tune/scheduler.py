"""ASHA whose decisions follow from the trials' results and their order in the sweep, never from which trial
reaches a rung first: the same command gives the same sweep on a loaded machine as on an idle one.

Ray's ``AsyncHyperBandScheduler`` compares a trial at a rung with the trials that happened to record there
before it: under load another trial may get there first and the cut moves. Here a trial's decision at a rung
uses exactly the trials before it in trial order (trial_0001, trial_0002, ...; the searcher's counter): as
if the trials had run one after another. When a trial reaches a rung before a trial ahead of it in that
order has reached it (or ended short of it), it is paused (Tune keeps its checkpoint of that epoch) until
the decision can be made, then resumed or stopped. The decision itself is ASHA's: stop when the score is
below the ``1 - 1/reduction_factor`` quantile of the earlier trials' scores at that rung (no earlier score:
continue); every score counts at its rung, stopped trials' included.

What stays nondeterministic: a trial that errors and is retried reports again from its last checkpoint (its
scores are the same, the timing is not); a trial that fails for good ends where it failed, which depends on
when the fault struck. Both only change decisions that wait on that trial.

The trials this scheduler stops before ``max_t`` are written to ``SWEEP_DIR/asha_stopped.json`` as each
decision is made (neoray.tune.asha), with Tune's trial id, which the searcher reads to tell Optuna that a
trial was pruned (neoray.tune.study).
"""

from __future__ import annotations

import numpy as np
from ray.tune.experiment import Trial
from ray.tune.schedulers import FIFOScheduler, TrialScheduler

from neoray import ray_compat
from neoray.engine import ranking
from neoray.tune import asha as asha_record
from neoray.tune.asha import AshaSettings
from neoray.tune.results import load_history


class OrderedASHA(FIFOScheduler):
    def __init__(self, sweep_dir: str, settings: AshaSettings, log=print):
        super().__init__()
        self.sweep_dir, self.settings, self.log = sweep_dir, settings, log
        self.rungs = list(settings.rungs)
        self.trials: dict[int, Trial] = {}  # by trial index
        self.scores: dict[float, dict[int, float]] = {rung: {} for rung in self.rungs}
        self.last_time: dict[int, float] = {}  # the last time attribute each trial reported
        self.ended: set[int] = set()  # finished, stopped or failed for good
        self.waiting: dict[int, float] = {}  # paused at a rung until its decision can be made
        self.resumable: set[int] = set()  # decided while paused: to continue
        self.to_stop: set[int] = set()  # decided while paused (or pausing): to stop

    # ------------------------------------------------------------------ Tune's scheduler interface

    def on_trial_add(self, tune_controller, trial: Trial) -> None:
        """A new trial, or one Tune restored with ``--resume``: its recorded history is read back, so that the
        decisions after a resume are the ones an uninterrupted sweep makes."""
        index = ray_compat.trial_index(trial)
        self.trials[index] = trial
        for row in load_history(self.sweep_dir, str(trial)):
            t = row.get(self.settings.time_attr)
            if t is not None:
                self.last_time[index] = t
                if t in self.scores:
                    self.scores[t][index] = ranking.score_of(row)
        if trial.status in (Trial.TERMINATED, Trial.ERROR):
            self.ended.add(index)

    def on_trial_result(self, tune_controller, trial: Trial, result: dict) -> str:
        index, t = ray_compat.trial_index(trial), result.get(self.settings.time_attr)
        if t is None:
            return TrialScheduler.CONTINUE
        self.last_time[index] = t
        rung = self._rung_reached(index, t)
        action = TrialScheduler.CONTINUE
        if rung is not None:
            self.scores[rung][index] = ranking.score_of(result)
            if not self._ready(index, rung):
                self.waiting[index] = rung
                action = TrialScheduler.PAUSE
            elif self._below_cut(index, rung):
                self._record_stop(trial, index, rung)
                action = TrialScheduler.STOP
        self._settle_waiting(tune_controller)
        return action

    def on_trial_complete(self, tune_controller, trial: Trial, result: dict) -> None:
        self._ended(tune_controller, trial)

    def on_trial_error(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    def on_trial_remove(self, tune_controller, trial: Trial) -> None:
        self._ended(tune_controller, trial)

    def choose_trial_to_run(self, tune_controller):
        """Paused trials decided meanwhile are stopped first; then new trials run, in trial order, then paused
        trials whose decision was to continue."""
        for index in sorted(self.to_stop):
            trial = self.trials[index]
            if trial.status == Trial.PAUSED:
                self.to_stop.discard(index)
                tune_controller.stop_trial(trial)
        for trial in tune_controller.get_trials():
            if trial.status == Trial.PENDING:
                return trial
        for index in sorted(self.resumable):
            trial = self.trials[index]
            if trial.status == Trial.PAUSED:
                return trial
        return None

    def debug_string(self) -> str:
        waiting = ", ".join(f"trial_{i:04d} at {r:g}" for i, r in sorted(self.waiting.items())) or "none"
        return f"OrderedASHA: rungs {self.rungs}; paused for the trials before them: {waiting}"

    # ------------------------------------------------------------------ decisions

    def _rung_reached(self, index: int, t: float) -> float | None:
        """The highest rung at or below ``t`` this trial has not recorded yet (a report per epoch hits each rung;
        a trial resumed past one records it at its next report, as Ray's ASHA does)."""
        for rung in reversed(self.rungs):
            if t >= rung:
                return rung if index not in self.scores[rung] else None
        return None

    def _ready(self, index: int, rung: float) -> bool:
        """Every trial before this one has recorded at the rung, or ended short of it."""
        return all(j in self.scores[rung] or (j in self.ended and self.last_time.get(j, 0) < rung)
                   for j in self.trials if j < index)

    def _below_cut(self, index: int, rung: float) -> bool:
        earlier = [score for j, score in self.scores[rung].items() if j < index]
        if not earlier:
            return False
        cut = float(np.nanpercentile(earlier, (1 - 1 / self.settings.reduction_factor) * 100))
        return self.scores[rung][index] < cut

    def _record_stop(self, trial: Trial, index: int, rung: float) -> None:
        score = self.scores[rung][index]
        asha_record.record_stopped(self.sweep_dir, str(trial), {self.settings.time_attr: rung,
                                                                 ranking.SCORE: score, "trial_id": trial.trial_id})
        self.log(f"[neoray] ASHA stopped {trial} at {self.settings.time_attr} {rung:g} ({ranking.SCORE} {score:.4g})")

    def _ended(self, tune_controller, trial: Trial) -> None:
        index = ray_compat.trial_index(trial)
        self.ended.add(index)
        self.waiting.pop(index, None)
        self.resumable.discard(index)
        self.to_stop.discard(index)
        self._settle_waiting(tune_controller)

    def _settle_waiting(self, tune_controller) -> None:
        """Decide, in trial order, every paused trial whose predecessors have now all been heard from. A stop
        is carried out once the trial is paused (``choose_trial_to_run``), so that a pause still being saved
        is never cut short."""
        for index in sorted(self.waiting):
            rung = self.waiting[index]
            if not self._ready(index, rung):
                continue
            del self.waiting[index]
            if self._below_cut(index, rung):
                self._record_stop(self.trials[index], index, rung)
                self.to_stop.add(index)
            else:
                self.resumable.add(index)


__all__ = ["OrderedASHA"]
