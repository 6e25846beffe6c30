"""Every private Ray API and Ray-specific default in neoray.ray_compat still exists in the installed Ray.

These fail loudly on a Ray upgrade that moves or renames one of them (the sweep and training tests then
show whether neoray still works: they use each entry for real)."""

from __future__ import annotations

import dataclasses
import inspect

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from neoray import ray_compat


def test_ray_is_the_version_the_workarounds_were_checked_on():
    assert ray.__version__.startswith(ray_compat.CHECKED_RAY_VERSION + "."), (
        f"neoray.ray_compat was checked on Ray {ray_compat.CHECKED_RAY_VERSION}; re-check every entry for "
        f"Ray {ray.__version__} and update CHECKED_RAY_VERSION")


def test_environment_defaults_are_read_by_ray():
    from ray.train.v2._internal import constants

    assert constants.HEALTH_CHECK_INTERVAL_S_ENV_VAR in ray_compat.TRAIN_ENV_DEFAULTS
    import ray.tune.tune as tune_module

    assert "RAY_AIR_NEW_OUTPUT" in inspect.getsource(tune_module)


def test_worker_group_internals():
    from ray.train.v2._internal.execution.worker_group.state import WorkerGroupState
    from ray.train.v2._internal.execution.worker_group.worker_group import WorkerGroup

    base = ray_compat.worker_group_callback_base()
    assert hasattr(base, "after_worker_group_start")
    assert hasattr(WorkerGroup, "get_worker_group_state")
    assert "placement_group_handle" in {f.name for f in dataclasses.fields(WorkerGroupState)}
    from ray.train.v2._internal.execution.worker_group.placement_group_handle import PlacementGroupHandle

    assert "placement_group" in inspect.getsource(PlacementGroupHandle)


def test_tune_internals():
    from ray.tune import ResultGrid
    from ray.tune.experiment import Trial

    assert "self._experiment_analysis" in inspect.getsource(ResultGrid.__init__)
    assert "experiment_tag" in inspect.signature(Trial.__init__).parameters


def test_ray_sigterm_exit_inside_a_finaliser_is_not_reported_but_other_errors_are(monkeypatch, capsys):
    """Ray's SIGTERM handler raises SystemExit; inside a finaliser Python printed a traceback to the
    user's terminal at the end of a successful sweep."""
    import sys
    import weakref

    from ray._private import worker

    # A worker's main loop installs a SIGTERM handler that exits with SystemExit.
    assert "raise_sys_exit_with_custom_error_message" in inspect.getsource(worker.Worker.main_loop)
    monkeypatch.setattr(sys, "unraisablehook", sys.__unraisablehook__)
    ray_compat.quiet_sigterm_exit()
    installed = sys.unraisablehook
    ray_compat.quiet_sigterm_exit()  # a reused trial actor calls it once per trial: one hook, not a chain
    assert sys.unraisablehook is installed and installed is not sys.__unraisablehook__

    class Thing:
        pass

    def finaliser_raising(error):
        thing = Thing()
        weakref.finalize(thing, lambda: (_ for _ in ()).throw(error))
        del thing

    finaliser_raising(SystemExit(1))
    assert "SystemExit" not in capsys.readouterr().err
    finaliser_raising(ValueError("a real bug"))
    assert "ValueError: a real bug" in capsys.readouterr().err


def test_train_report_logger_and_logging_config():
    """The TrainingReport(...) dump comes from a logger named after its module's file (not "ray.train")."""
    from ray.train.v2._internal.execution import context

    source = inspect.getsource(context)
    assert "logging.getLogger(__file__)" in source and "Reporting training result" in source
    assert ray_compat.TRAIN_REPORT_LOGGER == context.__file__
    assert ray_compat.train_logging_config().log_level == "WARNING"


def test_tracker_and_searcher_internals():
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.search.optuna import OptunaSearch

    assert "self._trial_runs[trial]" in inspect.getsource(MLflowLoggerCallback.log_trial_start)
    assert "self._ot_trials[trial_id]" in inspect.getsource(OptunaSearch.on_trial_result)
    from ray.air.integrations.wandb import WandbLoggerCallback

    assert WandbLoggerCallback._logger_actor_cls is ray_compat.wandb_logging_actor_base()
    assert "self._logger_actor_cls" in inspect.getsource(WandbLoggerCallback._start_logging_actor)
    # Tune gives a trial's last result to the searcher's on_trial_complete only (StudySearch reports it).
    from ray.tune.execution.tune_controller import TuneController

    assert "Only updating search alg if the trial is not to be stopped" in inspect.getsource(
        TuneController._process_trial_result)


def test_a_node_preference_spills_to_another_node_when_its_node_is_busy():
    # Public soft affinity waits for a busy node forever; the private flag is what lets the task spill.
    assert "_spill_on_unavailable" in inspect.signature(NodeAffinitySchedulingStrategy.__init__).parameters
    strategy = ray_compat.prefer_node("ab" * 28)
    assert (strategy.node_id, strategy.soft, strategy._spill_on_unavailable) == ("ab" * 28, True, True)
