"""Training hooks that inject faults and record what ran (neoray.engine.hooks.TrainHooks subclasses).

conftest.py registers this module to be pickled by value, so these classes reach Ray workers and Tune
trials, whose processes cannot import the tests folder.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass

import torch

from neoray.engine.device import node_id
from neoray.engine.hooks import TrainHooks


@dataclass
class Faults(TrainHooks):
    """Micro-step indices count this process's micro-batches from 0; epochs are 1-based."""

    nan_loss_at: tuple = ()  # micro-steps whose loss becomes NaN
    oom_at: tuple = ()  # micro-steps whose forward runs out of memory
    oom_backward_at: tuple = ()  # micro-steps whose backward runs out of memory (after accumulating)
    oom_step_at: tuple = ()  # micro-steps whose update (they must end a group) runs out of memory
    oom_rank: int = -1  # the rank the three OOM faults apply to (-1: every rank)
    raise_in_epoch: int = 0  # the worker of rank ``raise_rank`` raises in this epoch ...
    raise_rank: int = 0
    raise_marker: str = ""  # ... once: the file is created before raising and checked first
    record_dir: str = ""  # every rank appends {"epoch", "rank", "image_ids", "node"} to rank<r>.jsonl

    def _oom(self, at: tuple, micro_step: int, rank: int) -> bool:
        return micro_step in at and self.oom_rank in (-1, rank)

    def epoch_start(self, epoch: int, rank: int) -> None:
        if self.raise_in_epoch != epoch or self.raise_rank != rank:
            return
        if self.raise_marker:
            if os.path.exists(self.raise_marker):
                return
            with open(self.raise_marker, "w") as handle:
                handle.write("raised\n")
        raise RuntimeError(f"injected worker failure in epoch {epoch} on rank {rank}")

    def after_forward(self, micro_step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        if self._oom(self.oom_at, micro_step, rank):
            raise torch.OutOfMemoryError("injected out of memory in the forward")
        return loss * float("nan") if micro_step in self.nan_loss_at else loss

    def after_backward(self, micro_step: int, rank: int) -> None:
        if self._oom(self.oom_backward_at, micro_step, rank):
            raise torch.OutOfMemoryError("injected out of memory in the backward")

    def before_optimizer_step(self, micro_step: int, rank: int) -> None:
        if self._oom(self.oom_step_at, micro_step, rank):
            raise torch.OutOfMemoryError("injected out of memory in the optimizer step")

    def before_forward(self, micro_step: int, rank: int, batch) -> None:
        if self.record_dir:
            self._trained_ids = getattr(self, "_trained_ids", []) + [int(i) for i in batch.image_ids]

    def epoch_end(self, epoch: int, rank: int) -> None:
        if self.record_dir:
            image_ids, self._trained_ids = getattr(self, "_trained_ids", []), []
            with open(os.path.join(self.record_dir, f"rank{rank}.jsonl"), "a") as handle:
                handle.write(
                    json.dumps({"epoch": epoch, "rank": rank, "image_ids": image_ids, "node": node_id()}) + "\n"
                )


@dataclass
class TrialFailures(TrainHooks):
    """Fails the first ``times`` attempts of the named sweep trials (-1: every attempt); the attempts are
    counted in files under ``counter_dir``, which outlive Tune's retries."""

    trials: dict  # trial name -> times
    counter_dir: str

    def epoch_start(self, epoch: int, rank: int) -> None:
        from ray import tune

        name = tune.get_context().get_trial_name()
        if name not in self.trials or epoch != 1:
            return
        counter = os.path.join(self.counter_dir, name)
        done = int(open(counter).read()) if os.path.exists(counter) else 0
        times = self.trials[name]
        if times < 0 or done < times:
            with open(counter, "w") as handle:
                handle.write(str(done + 1))
            raise RuntimeError(f"injected failure {done + 1} of {name}")


@dataclass
class SlowTrial(TrainHooks):
    """Delays every epoch of one sweep trial by ``seconds``: a trial that a loaded machine slows down."""

    trial: str
    seconds: float

    def epoch_start(self, epoch: int, rank: int) -> None:
        from ray import tune

        if tune.get_context().get_trial_name() == self.trial:
            time.sleep(self.seconds)


@dataclass
class StudyProbe(TrialFailures):
    """``TrialFailures``, and a look at the sweep's Optuna study while the sweep runs: when ``probe_trial``
    starts its first epoch, the study as ``optuna.load_study`` reads it then (the live SQLite file, or the
    copy in the sweep's object storage) is written to ``out`` as JSON, one entry per Optuna trial."""

    study_file: str = ""  # a local path or a URI
    study_name: str = ""
    probe_trial: str = ""
    out: str = ""

    def epoch_start(self, epoch: int, rank: int) -> None:
        from ray import tune

        if epoch == 1 and tune.get_context().get_trial_name() == self.probe_trial and not os.path.exists(self.out):
            with open(self.out, "w") as handle:
                json.dump(self._snapshot(), handle)
        super().epoch_start(epoch, rank)

    def _snapshot(self) -> list[dict]:
        import tempfile

        import optuna

        from neoray import storage

        with tempfile.TemporaryDirectory() as tmp:
            path = storage.local_path(self.study_file)
            if path is None:
                path = os.path.join(tmp, "optuna.db")
                with open(path, "wb") as handle:
                    handle.write(storage.read_bytes(self.study_file))
            study = optuna.load_study(study_name=self.study_name, storage=f"sqlite:///{path}")
            return [{"number": t.number, "state": t.state.name, "params": t.params,
                     "intermediate": {str(k): v for k, v in t.intermediate_values.items()}} for t in study.trials]
