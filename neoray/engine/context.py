"""What the training loop needs from whoever runs it: a ``TrainContext``, and where its batches come from: a
``BatchSource``.

The loop runs unchanged under Ray Train's ``TorchTrainer`` (``neoray.engine.ray_context.RayTrainContext``),
inside a Tune trial (the sweep's ``TuneTrialContext``) and in a plain process (``LocalContext`` here: tests,
benchmarks, the GPU check). A context gives the rank, the device, the batches (``data``), a way to report
each epoch with its checkpoint, and the checkpoint to continue from after a restart.

Batches come from a ``BatchSource``: ``neoray.engine.shard_batches.ShardBatches`` streams shard directories
with Ray Data (every production runner), ``ReadyBatches`` here hands out ready ``Batch``es. This module
imports neither Ray nor the stream: a plain process trains with torch alone.
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable, Protocol

import torch


class BatchSource(Protocol):
    categories: list  # the training manifest's [{id, name, label}]

    def train(self, epoch: int) -> Iterable: ...

    def val(self) -> Iterable | None: ...  # None: no validation data

    def micro_batches_per_epoch(self) -> int: ...


class TrainContext(Protocol):
    """``report`` is called once per epoch on every rank; ``checkpoint`` (rank 0 only, None on the others) is
    what ``persist`` returned for the epoch's checkpoint. ``persist`` (rank 0, before the report) makes a local
    checkpoint directory durable where the runner keeps checkpoints, whole or not at all, and raises
    ``OSError`` when it cannot (a full disk, an output folder deleted while the run goes on): every rank then
    learns it before anyone reports. ``latest_checkpoint`` is the checkpoint (a directory, local or a URI) to
    continue from after a restart, or None."""

    world_rank: int
    world_size: int
    local_rank: int
    device: torch.device | None  # None: cuda:local_rank with train.use_gpu and CUDA, else cpu
    data: BatchSource

    def persist(self, checkpoint_dir: str) -> object: ...

    def report(self, metrics: dict, checkpoint: object | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...


class ReadyBatches:
    """The same ready batches every epoch (tests, benchmarks)."""

    def __init__(self, train: list, val: list | None = None, categories: list | None = None):
        self._train, self._val = list(train), val
        self.categories = categories or []

    def train(self, epoch: int) -> Iterable:
        return self._train

    def val(self) -> Iterable | None:
        return self._val

    def micro_batches_per_epoch(self) -> int:
        return max(1, len(self._train))


class LocalContext:
    """``TrainContext`` for a plain single process: keeps the reports in memory and copies each
    checkpoint to ``checkpoint_root/epoch_NNNN`` (when given)."""

    world_rank = 0
    world_size = 1
    local_rank = 0

    def __init__(self, data: BatchSource, checkpoint_root: str | os.PathLike | None = None,
                 resume_dir: str | None = None, device: torch.device | None = None):
        self.data = data
        self.device = device
        self._checkpoint_root = os.fspath(checkpoint_root) if checkpoint_root else None
        self._latest = resume_dir
        self.reports: list[dict] = []

    def persist(self, checkpoint_dir: str) -> str:
        return checkpoint_dir  # copied by report, which knows the epoch

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self._checkpoint_root is not None:
            target = os.path.join(self._checkpoint_root, f"epoch_{int(metrics['epoch']):04d}")
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self._latest = target

    def latest_checkpoint(self) -> str | None:
        return self._latest


__all__ = ["BatchSource", "LocalContext", "ReadyBatches", "TrainContext"]
