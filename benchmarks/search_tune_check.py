"""The simulator checked against the real thing: a policy replayed through Ray Tune with neoray's own sweep
components (neoray.tune.scheduler.OrderedASHA, neoray.tune.study.StudySearch telling stopped trials PRUNED, the
same Optuna sampler and the config's own values first), one trial at a time, on the same table. Its trials, their
configurations and where each ended must be what ``search_sim.simulate`` gives with ``workers=1``.

Kept out of search_sim.py so that the simulator needs no Ray; used by tests/test_search_sim.py.
"""

from __future__ import annotations

import sys
import tempfile

import optuna
import ray.cloudpickle
from ray import tune
from ray.tune.schedulers import FIFOScheduler
from search_sim import Policy, Table, make_sampler, sweep_training_seed

from neoray.engine import ranking
from neoray.tune.asha import AshaSettings
from neoray.tune.scheduler import OrderedASHA
from neoray.tune.study import StudySearch


def replay_trainable(params: dict, table: Table) -> None:
    """Report, every epoch, the curve of the design configuration nearest to ``params`` at the sweep's training
    seed."""
    config = table.nearest(params["lr"], params["warmup_steps"], params["batch"])
    search_seed = int(tune.get_context().get_trial_name().split("_")[1])
    for epoch, score in enumerate(table.curve(config, sweep_training_seed(table, search_seed)), 1):
        tune.report({"epoch": epoch, ranking.SCORE: score, "design_point": config.key})


class Budget(tune.Stopper):
    """Ends the run once ``max_epochs`` epochs were reported over all trials; keeps every report in order."""

    def __init__(self, max_epochs: int):
        self.max_epochs, self.rows = max_epochs, []

    def __call__(self, trial_id, result) -> bool:
        if not self.rows or self.rows[-1][:2] != (str(trial_id), result["epoch"]):
            self.rows.append((str(trial_id), result["epoch"], result[ranking.SCORE], result["design_point"]))
        return False

    def stop_all(self) -> bool:
        return len(self.rows) >= self.max_epochs


def run_through_tune(table: Table, policy: Policy, seed: int, max_epochs: int) -> list[tuple]:
    """(Tune trial id, epoch, score, configuration) of every report, in order."""
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.cloudpickle.register_pickle_by_value(sys.modules["search_sim"])
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    budget = Budget(max_epochs)
    with tempfile.TemporaryDirectory(prefix="neoray-tune-check-") as sweep_dir:
        settings = AshaSettings(grace_period=policy.grace, reduction_factor=policy.rf).resolved(table.epochs)
        scheduler = OrderedASHA(sweep_dir, settings, log=lambda _: None) if policy.scheduler == "asha" \
            else FIFOScheduler()
        searcher = StudySearch(space=table.distributions(), metric=ranking.SCORE, mode=ranking.MODE,
                               points_to_evaluate=[dict(table.own)], sampler=make_sampler(policy, seed),
                               sweep_dir=sweep_dir)
        tuner = tune.Tuner(
            tune.with_parameters(replay_trainable, table=table),
            tune_config=tune.TuneConfig(
                metric=ranking.SCORE, mode=ranking.MODE, search_alg=searcher, scheduler=scheduler,
                num_samples=max_epochs, max_concurrent_trials=1,
                trial_name_creator=lambda t: f"seed_{seed}_{int(str(t.experiment_tag).split('_')[0])}",
                trial_dirname_creator=lambda t: f"seed_{seed}_{int(str(t.experiment_tag).split('_')[0])}"),
            run_config=tune.RunConfig(storage_path=sweep_dir, name="check", stop=budget, verbose=0),
        )
        tuner.fit()
    return budget.rows


__all__ = ["run_through_tune"]
