"""OrderedASHA (neoray.tune.scheduler): ASHA's decisions made from the trials' results in trial order, whatever
order their results arrive in; driven here by hand with a stand-in for Tune's controller."""

from __future__ import annotations

import itertools
import json

import pytest
from ray.tune.experiment import Trial
from ray.tune.schedulers import TrialScheduler

from neoray.tune.asha import AshaSettings
from neoray.tune.scheduler import OrderedASHA


class FakeTrial:
    """What the scheduler reads of a Tune Trial: its id, experiment tag (the trial index) and status."""

    def __init__(self, index: int):
        self.trial_id, self.experiment_tag, self.status = f"id{index}", f"{index}_lr=0.1", Trial.RUNNING

    def __str__(self):
        return f"trial_{int(self.experiment_tag.split('_')[0]):04d}"


class FakeController:
    """Tune's controller as the scheduler uses it: stopping a paused trial tells the scheduler it is removed."""

    def __init__(self, trials, scheduler):
        self.trials, self.scheduler = trials, scheduler

    def get_trials(self):
        return self.trials

    def stop_trial(self, trial):
        was_paused = trial.status == Trial.PAUSED
        trial.status = Trial.TERMINATED
        if was_paused:
            self.scheduler.on_trial_remove(self, trial)


# Scores at epochs 1..4 of five trials; rungs at 1 and 2 (grace 1, rf 2, max_t 4).
CURVES = {1: [0.30, 0.40, 0.50, 0.60], 2: [0.10, 0.20, 0.30, 0.40], 3: [0.35, 0.45, 0.55, 0.65],
          4: [0.05, 0.50, 0.60, 0.70], 5: [0.32, 0.15, 0.20, 0.25]}


def _run(tmp_path, arrival: list[tuple[int, int]]):
    """Feed (trial, epoch) results in ``arrival`` order, as a concurrent sweep might, pausing and resuming as
    the scheduler says; returns the trials it stopped and the pauses it asked for."""
    sweep_dir = tmp_path / f"sweep{len(list(tmp_path.iterdir()))}"
    sweep_dir.mkdir()
    scheduler = OrderedASHA(str(sweep_dir), AshaSettings(grace_period=1, reduction_factor=2, max_t=4), log=lambda _: 0)
    trials = {i: FakeTrial(i) for i in CURVES}
    controller = FakeController(list(trials.values()), scheduler)
    for trial in trials.values():
        scheduler.on_trial_add(controller, trial)
    pauses, deferred = 0, []
    queue = list(arrival)
    while queue or deferred:
        index, epoch = queue.pop(0) if queue else deferred.pop(0)
        trial = trials[index]
        if trial.status == Trial.TERMINATED:
            continue
        if trial.status == Trial.PAUSED:  # not resumed yet: this result comes later
            deferred.append((index, epoch))
            if not queue and all(trials[i].status == Trial.PAUSED for i, _ in deferred):
                chosen = scheduler.choose_trial_to_run(controller)
                assert chosen is not None, "every remaining trial is paused and none may resume: a deadlock"
                chosen.status = Trial.RUNNING
            continue
        action = scheduler.on_trial_result(controller, trial, {"epoch": epoch, "score": CURVES[index][epoch - 1]})
        if action == TrialScheduler.STOP:
            trial.status = Trial.TERMINATED
            scheduler.on_trial_complete(controller, trial, {})
        elif action == TrialScheduler.PAUSE:
            pauses += 1
            trial.status = Trial.PAUSED
        elif epoch == 4:
            trial.status = Trial.TERMINATED
            scheduler.on_trial_complete(controller, trial, {})
        chosen = scheduler.choose_trial_to_run(controller)  # Tune asks after every event
        if chosen is not None and chosen.status == Trial.PAUSED:
            chosen.status = Trial.RUNNING
    stopped = json.loads((sweep_dir / "asha_stopped.json").read_text()) if (sweep_dir / "asha_stopped.json").exists() \
        else {}
    return {name: entry["epoch"] for name, entry in stopped.items()}, pauses


def _in_order():
    return [(i, e) for i in CURVES for e in range(1, 5)]


def test_in_trial_order_it_stops_what_asha_stops(tmp_path):
    stopped, pauses = _run(tmp_path, _in_order())
    # Rung 1: trial 2 (0.10) is below trial 1 (0.30); trial 4 (0.05) below the median of 0.30/0.10/0.35.
    # Rung 2: trial 5 (0.15) is below the median of trials 1 and 3 there (0.40, 0.45).
    assert stopped == {"trial_0002": 1, "trial_0004": 1, "trial_0005": 2} and pauses == 0


@pytest.mark.parametrize("seed", range(6))
def test_any_arrival_order_gives_the_same_stops(tmp_path, seed):
    import random

    reference, _ = _run(tmp_path, _in_order())
    rng = random.Random(seed)
    # Interleave the trials' epochs at random, each trial's own epochs in order (what concurrency does).
    streams = {i: [(i, e) for e in range(1, 5)] for i in CURVES}
    arrival = []
    while any(streams.values()):
        i = rng.choice([k for k, v in streams.items() if v])
        arrival.append(streams[i].pop(0))
    stopped, _ = _run(tmp_path, arrival)
    assert stopped == reference


def test_a_trial_ahead_of_an_earlier_one_waits_for_it_at_the_rung(tmp_path):
    # Trial 2 reaches every epoch before trial 1 has reported anything (trial 1 was delayed).
    arrival = [(2, e) for e in range(1, 5)] + [(1, e) for e in range(1, 5)] + \
              list(itertools.chain.from_iterable([(i, e) for e in range(1, 5)] for i in (3, 4, 5)))
    stopped, pauses = _run(tmp_path, arrival)
    assert pauses >= 1  # trial 2 was paused at rung 1 until trial 1 got there
    assert stopped == {"trial_0002": 1, "trial_0004": 1, "trial_0005": 2}


def test_a_restored_sweep_reads_the_scores_back_from_the_trials_histories(tmp_path):
    sweep_dir = tmp_path / "sweep"
    for index in (1, 3):
        (sweep_dir / f"trial_{index:04d}").mkdir(parents=True)
        (sweep_dir / f"trial_{index:04d}" / "result.json").write_text("".join(
            json.dumps({"epoch": e, "score": s}) + "\n" for e, s in enumerate(CURVES[index], 1)))
    scheduler = OrderedASHA(str(sweep_dir), AshaSettings(grace_period=1, reduction_factor=2, max_t=4), log=lambda _: 0)
    trials = {i: FakeTrial(i) for i in (1, 3, 4)}
    trials[1].status = trials[3].status = Trial.TERMINATED
    controller = FakeController(list(trials.values()), scheduler)
    for trial in trials.values():
        scheduler.on_trial_add(controller, trial)
    # Trial 4 at rung 1 (0.05) is judged against trials 1 and 3 as read back: below their median, stopped.
    assert scheduler.on_trial_result(controller, trials[4], {"epoch": 1, "score": 0.05}) == TrialScheduler.STOP
