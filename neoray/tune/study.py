"""The sweep's Optuna study, kept in a database while the sweep runs, so that ``optuna-dashboard`` shows it live
and after the sweep.

Ray Tune's ``OptunaSearch`` writes to it (``storage=``, ``study_name=`` = the sweep's name; ``StudySearch``
below): each trial's parameters when the searcher proposes it, one intermediate value per epoch (``score`` at
Tune's ``training_iteration``: ``trial.report`` on every result, the last one included) and its end: COMPLETE
with its last score when it ran to the end; PRUNED when ASHA stopped it (its intermediate values end at the
rung), which is what Optuna's samplers expect of a stopped trial: TPE then ranks it below the complete trials
by how far it got, instead of comparing a 4-epoch score with 12-epoch ones; FAIL when it errored; RUNNING
while it runs.

Where the study lives:

* default: an SQLite file, ``SWEEP_DIR/optuna.db``, when the sweep directory is local or a shared mount (the
  driver alone writes it). When the sweep is on object storage (``s3://``) the file is staged locally (a
  folder named after the sweep's URI under the temporary directory) and copied to ``SWEEP_DIR/optuna.db``
  whenever a trial ends and when the sweep ends (``UploadStudy``).
* ``--optuna-storage URL``: a database URL that Optuna's RDBStorage takes (``postgresql://...``,
  ``mysql+pymysql://...``, ``sqlite:///...``), for teams with one; a new sweep refuses a study name that
  the database already holds.

``sweep.json`` records it under ``"optuna"``: ``study_name``, ``storage`` (the URL, password masked),
``file`` (``optuna.db`` when the study is the sweep's own file), ``staged`` and the dashboard command.

``--resume`` continues the same study: Tune restores the searcher from its pickled state, and RDBStorage
pickles its URL and reconnects on unpickling; a staged file is copied back from the sweep's storage to the
same staging path (a function of the sweep's URI) before Tune restores the searcher. A trial a killed sweep
had asked the study for after Tune's last save is asked for again by the resumed sweep: the restored searcher
puts it back to WAITING, and Optuna hands it out again with its parameters (one study trial per sweep trial).
"""

from __future__ import annotations

import hashlib
import os
import re
import sqlite3
import tempfile
from contextlib import closing

import optuna
from optuna.exceptions import UpdateFinishedTrialError
from ray import tune
from ray.air.constants import TRAINING_ITERATION
from ray.tune.search.optuna import OptunaSearch

from neoray import ray_compat, storage
from neoray.config import ConfigError
from neoray.run.run_tracking import absolute_uri
from neoray.tune import asha

STUDY_FILE = "optuna.db"
SQLITE_TIMEOUT_S = 30  # how long a write waits for a reader (optuna-dashboard) to let go of the file


def redact(url: str | None) -> str | None:
    """A database URL without its password (``user:***@host``), for records and logs."""
    return re.sub(r"(://[^/:@]*:)[^@/]*@", r"\1***@", url) if url else url


def staging_path(sweep_dir: str) -> str:
    """Where a sweep on object storage keeps its study file while it runs: the same path for the same sweep
    URI, so the URL in Tune's saved searcher still names it after ``--resume``."""
    digest = hashlib.sha256(sweep_dir.encode("utf-8")).hexdigest()[:16]
    return os.path.join(tempfile.gettempdir(), "neoray-optuna", digest, STUDY_FILE)


def _local_file(sweep_dir: str) -> str:
    return staging_path(sweep_dir) if storage.is_uri(sweep_dir) else storage.join(sweep_dir, STUDY_FILE)


def storage_url(sweep_dir: str, url: str | None) -> str:
    """The study's database URL: the user's (a relative SQLite path made absolute: Tune keeps the URL for
    --resume, which may run from another directory), or the sweep's own file."""
    if url:
        return absolute_uri(url) if url.startswith("sqlite:///") else url
    return "sqlite:///" + os.path.abspath(_local_file(sweep_dir))


def open_storage(url: str) -> optuna.storages.RDBStorage:
    engine = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}} if url.startswith("sqlite:") else None
    try:
        return optuna.storages.RDBStorage(url, engine_kwargs=engine)
    except Exception as exc:  # a URL the database layer cannot use: one line, not a traceback
        raise ConfigError(f"--optuna-storage {redact(url)}: {type(exc).__name__}: "
                          f"{str(exc).strip().splitlines()[0] if str(exc).strip() else 'cannot open'}") from None


def dashboard_command(record: dict, sweep_dir: str) -> str:
    if record.get("staged"):
        return (f"copy {storage.join(sweep_dir, STUDY_FILE)} here, then: optuna-dashboard sqlite:///{STUDY_FILE}")
    return f"optuna-dashboard {record['storage']}"


def new_study(sweep_dir: str, name: str, url: str | None) -> dict:
    """Make the storage ready for a new sweep's study; returns its record (for sweep.json)."""
    if url is None:
        path = _local_file(sweep_dir)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        if os.path.exists(path):  # left by a start that never got as far as Tune's state (tuner.pkl)
            os.remove(path)
    real = storage_url(sweep_dir, url)
    if url is not None and name in optuna.get_all_study_names(open_storage(real)):
        raise ConfigError(f"--optuna-storage {redact(url)} already holds a study named '{name}'; pass another --name "
                          "(or --resume to continue that sweep)")
    record = {"study_name": name, "storage": redact(real), "file": None if url else STUDY_FILE,
              "staged": url is None and storage.is_uri(sweep_dir)}
    record["dashboard"] = dashboard_command(record, sweep_dir)
    return record


def searcher_arguments(sweep_dir: str, name: str, url: str | None) -> dict:
    """``OptunaSearch``'s ``storage`` and ``study_name`` for a new sweep."""
    return {"storage": open_storage(storage_url(sweep_dir, url)), "study_name": name}


def resume_study(record: dict | None, sweep_dir: str) -> None:
    """Before Tune restores the searcher of a resumed sweep: stage its study file back from object storage."""
    if not record or not record.get("staged"):
        return
    path = staging_path(sweep_dir)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    try:
        data = storage.read_bytes(storage.join(sweep_dir, STUDY_FILE))
    except FileNotFoundError:
        return  # the sweep stopped before its first copy; the searcher starts the file again
    with open(path, "wb") as handle:
        handle.write(data)


def upload_study(sweep_dir: str) -> None:
    """Copy the staged study file to ``SWEEP_DIR/optuna.db``: a consistent snapshot through SQLite's backup
    API (a plain copy could catch a write half done), written as one object."""
    src = staging_path(sweep_dir)
    if not os.path.exists(src):
        return
    with tempfile.TemporaryDirectory(prefix="neoray-optuna-") as tmp:
        snapshot = os.path.join(tmp, STUDY_FILE)
        source = sqlite3.connect(src, timeout=SQLITE_TIMEOUT_S)
        with closing(source), closing(sqlite3.connect(snapshot)) as target:
            source.backup(target)
        with open(snapshot, "rb") as handle:
            storage.write_bytes(storage.join(sweep_dir, STUDY_FILE), handle.read())


def finish_study(record: dict | None, sweep_dir: str, url: str | None, interrupted: bool) -> None:
    """At the end of a sweep: trials the study still has RUNNING when every Tune trial has ended are ones a
    killed sweep had asked for (after Tune last saved its state) and its ``--resume`` asked for again; they are
    marked FAIL, so the dashboard does not show them running forever. Then the last copy of a staged file."""
    if not record:
        return
    if not interrupted and (url is not None or record.get("file")):
        study = optuna.load_study(study_name=record["study_name"], storage=open_storage(storage_url(sweep_dir, url)))
        for trial in study.get_trials(deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            study.tell(trial.number, state=optuna.trial.TrialState.FAIL)
    if record.get("staged"):
        upload_study(sweep_dir)


class StudySearch(OptunaSearch):
    """Ray Tune's OptunaSearch, whose study also gets the result that ends a trial as an intermediate value
    (the last epoch, or the rung where ASHA stopped it): Tune passes that result to ``on_trial_complete`` only
    (see ray_compat.optuna_search_trials), so OptunaSearch alone leaves it out of the per-epoch values; and
    whose study is told PRUNED for a trial the scheduler stopped (SWEEP_DIR/asha_stopped.json names it by
    Tune's trial id), where OptunaSearch would tell COMPLETE with the rung score."""

    def __init__(self, *args, sweep_dir: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.sweep_dir = sweep_dir

    def on_trial_result(self, trial_id: str, result: dict):
        try:
            super().on_trial_result(trial_id, result)
        except UpdateFinishedTrialError:
            # Ended in the study after Tune last saved its state, and a killed sweep's --resume runs the trial on
            # from its checkpoint: the study keeps the end it has (OptunaSearch's own tell ignores it too).
            return
        self._reported_steps()[trial_id] = result.get(TRAINING_ITERATION)

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False):
        ot_trial = ray_compat.optuna_search_trials(self).get(trial_id)
        value, step = (result or {}).get(self.metric), (result or {}).get(TRAINING_ITERATION)
        completed = ray_compat.optuna_search_completed(self)
        if (ot_trial is not None and not error and isinstance(value, (int, float)) and isinstance(step, int)
                and step != self._reported_steps().get(trial_id) and trial_id not in completed):
            try:
                ot_trial.report(value, step)
            except UpdateFinishedTrialError:
                pass  # as in on_trial_result
        if ot_trial is not None and not error and self._stopped_by_scheduler(trial_id):
            self._tell_pruned(trial_id, ot_trial)
            return
        super().on_trial_complete(trial_id, result, error)

    def restore(self, checkpoint_path: str):
        super().restore(checkpoint_path)
        self._reopen_orphans()

    def _reopen_orphans(self) -> None:
        """After ``--resume`` restored this searcher as Tune last saved it: the study's RUNNING trials that it never
        handed to a Tune trial were asked for by a killed sweep after that save. They go back to WAITING, so the
        resumed sweep's next asks take them, with the parameters they were given, instead of opening new ones: the
        study keeps one trial per sweep trial, none left over to be marked FAIL at the end."""
        study = ray_compat.optuna_search_study(self)
        handed_out = {trial.number for trial in ray_compat.optuna_search_trials(self).values()}
        storage = study._storage if self._storage is None else self._storage  # noqa: SLF001 - the study's own
        study_id = storage.get_study_id_from_name(study.study_name)
        for trial in storage.get_all_trials(study_id, deepcopy=False, states=(optuna.trial.TrialState.RUNNING,)):
            if trial.number not in handed_out:
                trial_id = storage.get_trial_id_from_study_id_trial_number(study_id, trial.number)
                storage.set_trial_state_values(trial_id, optuna.trial.TrialState.WAITING)

    def _stopped_by_scheduler(self, trial_id: str) -> bool:
        if self.sweep_dir is None or trial_id in ray_compat.optuna_search_completed(self):
            return False
        return any(entry.get("trial_id") == trial_id for entry in asha.read_stopped(self.sweep_dir).values())

    def _tell_pruned(self, trial_id: str, ot_trial) -> None:
        try:
            ray_compat.optuna_search_study(self).tell(ot_trial, state=optuna.trial.TrialState.PRUNED)
        except UpdateFinishedTrialError:
            pass  # ended in the study before a killed sweep's --resume ran it on (as in on_trial_result)
        ray_compat.optuna_search_completed(self).add(trial_id)

    def _reported_steps(self) -> dict:
        # An attribute of this object, so Tune's saved searcher state (its __dict__) keeps it across --resume.
        if not hasattr(self, "_neoray_reported"):
            self._neoray_reported = {}
        return self._neoray_reported


class UploadStudy(tune.Callback):
    """Copies a staged study file to the sweep's object storage whenever a trial ends and when the sweep
    ends (Tune tells the searcher before its callbacks, so the copy holds the trial's end)."""

    def __init__(self, sweep_dir: str):
        self.sweep_dir = sweep_dir

    def on_trial_complete(self, iteration, trials, trial, **info):
        upload_study(self.sweep_dir)

    def on_trial_error(self, iteration, trials, trial, **info):
        upload_study(self.sweep_dir)

    def on_experiment_end(self, trials, **info):
        upload_study(self.sweep_dir)


def study_callbacks(record: dict | None, sweep_dir: str) -> list:
    return [UploadStudy(sweep_dir)] if record and record.get("staged") else []


def check_resume_storage(record: dict | None, url: str | None) -> None:
    """A resumed sweep continues the study it started with: another ``--optuna-storage`` is refused."""
    recorded = (record or {}).get("storage") if (record or {}).get("file") is None else None
    if url is not None and redact(url) != recorded:
        raise ConfigError("--resume continues the sweep's own Optuna study (sweep.json: optuna); drop --optuna-storage "
                          "or give the one the sweep started with")


__all__ = [
    "STUDY_FILE", "StudySearch", "UploadStudy", "check_resume_storage", "dashboard_command", "finish_study",
    "new_study", "open_storage", "redact", "resume_study", "searcher_arguments", "staging_path", "study_callbacks",
    "upload_study",
]
