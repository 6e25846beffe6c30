"""What the training loop needs from whoever runs it: a ``TrainContext``.

The loop runs unchanged under Ray Train's ``TorchTrainer`` (``RayTrainContext``), inside a Tune trial
(the sweep's ``TuneTrialContext``) and in a plain process (``LocalContext``: tests, benchmarks). A
context gives the rank, the device, the batches (``data``), a way to report each epoch with its
checkpoint, and the checkpoint to continue from after a restart.

Batches come from a ``BatchSource``: ``ShardBatches`` streams shard directories with Ray Data (every
production runner), ``ReadyBatches`` hands out ready ``Batch``es (tests, benchmarks).
"""

from __future__ import annotations

import os
import shutil
from typing import Iterable, Protocol

import pyarrow.fs
import ray.train
import ray.train.torch
import torch

from neoray import ray_compat
from neoray.config import Config
from neoray.data.stream import (
    ShardSet,
    decode_parallelism,
    iter_eval_batches,
    iter_train_batches,
    quiet_ray_data,
    train_batches_per_epoch,
)
from neoray.distributed import barrier
from neoray.engine.device import default_device


class BatchSource(Protocol):
    categories: list  # the training manifest's [{id, name, label}]

    def train(self, epoch: int) -> Iterable: ...

    def val(self) -> Iterable | None: ...  # None: no validation data

    def micro_batches_per_epoch(self) -> int: ...


class TrainContext(Protocol):
    """``report`` is called once per epoch on every rank; ``checkpoint_dir`` (rank 0 only, None on the
    others) is a local directory the runner must copy or upload before returning. ``latest_checkpoint``
    is the checkpoint (a directory, local or a URI) to continue from after a restart, or None."""

    world_rank: int
    world_size: int
    local_rank: int
    device: torch.device | None  # None: cuda:local_rank with train.use_gpu and CUDA, else cpu
    data: BatchSource

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None: ...

    def latest_checkpoint(self) -> str | None: ...


class ShardBatches:
    """This rank's batches from the config's shard directories (``neoray.data.stream``). The process
    then runs Ray Data, whose progress output is kept out of its log (epochs, not data progress).

    ``device``: where ``data.decode: gpu`` decodes and augments (default: the device the loop trains on,
    ``default_device``); ``workers_on_node``: the training workers sharing this node's CPUs for
    ``data.decode: cpu``'s batch tasks."""

    def __init__(self, cfg: Config, rank: int = 0, world_size: int = 1, *, device: torch.device | None = None,
                 workers_on_node: int = 1):
        quiet_ray_data()
        self.cfg, self.rank, self.world_size = cfg, rank, world_size
        self.device = device or default_device(cfg, 0)
        self.workers_on_node = workers_on_node
        self.train_set = ShardSet.open(cfg.data.train)
        self.val_set = ShardSet.open(cfg.data.val) if cfg.data.val else None
        self.categories = self.train_set.categories

    def train(self, epoch: int) -> Iterable:
        gpu = self.cfg.data.decode == "gpu"
        return iter_train_batches(self.train_set, self.cfg.train.batch_size, self.cfg.data, seed=self.cfg.train.seed,
                                  epoch=epoch, rank=self.rank, world_size=self.world_size, device=self.device,
                                  decode_tasks=None if gpu else decode_parallelism(self.workers_on_node))

    def val(self) -> Iterable | None:
        if self.val_set is None:
            return None
        return iter_eval_batches(self.val_set, self.cfg.train.batch_size, rank=self.rank,
                                 world_size=self.world_size, size=self.cfg.data.size, decode=self.cfg.data.decode,
                                 device=self.device)

    def micro_batches_per_epoch(self) -> int:
        return max(1, train_batches_per_epoch(self.train_set, self.cfg.train.batch_size, self.world_size,
                                              self.cfg.data.max_train_images))


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


class RayTrainContext:
    """``TrainContext`` on a Ray Train worker (``ray.train``)."""

    def __init__(self, cfg: Config):
        # Ray Train logs INFO lines and a TrainingReport(...) dump of every metric per report from each worker;
        # the run's log is one line per epoch (the controller's RunRecorder), warnings still pass.
        ray_compat.quiet_train_worker_logs()
        context = ray.train.get_context()
        self.world_rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.local_rank = context.get_local_rank()
        self.device = ray.train.torch.get_device()
        self.data = ShardBatches(cfg, self.world_rank, self.world_size, device=self.device,
                                 workers_on_node=context.get_local_world_size())

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        checkpoint = ray.train.Checkpoint.from_directory(checkpoint_dir) if checkpoint_dir else None
        ray.train.report(metrics, checkpoint=checkpoint)
        # ray.train.report only queues this worker's result; the controller registers the epoch's
        # checkpoint once every rank's result is queued. Without this barrier a rank that reports
        # quickly (no checkpoint to write) could fail in the next epoch before rank 0 has queued its
        # checkpoint, and the restart would redo a finished epoch.
        barrier()

    def latest_checkpoint(self) -> str | None:
        return checkpoint_location(ray.train.get_checkpoint())


# pyarrow filesystem type -> the URI scheme neoray.storage reads it with (the endpoint and credentials
# come from the same AWS_* / Google variables that gave Ray its filesystem).
_URI_SCHEMES = {"s3": "s3", "gcs": "gs"}


def checkpoint_location(checkpoint) -> str | None:
    """A Ray ``Checkpoint`` as something ``neoray.models.pretrained.checkpoint.load_checkpoint`` reads: its path
    on a local or shared filesystem, its URI on object storage (read in place, nothing downloaded), else
    (a custom fsspec filesystem) a local download."""
    if checkpoint is None:
        return None
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        return checkpoint.path
    scheme = _URI_SCHEMES.get(checkpoint.filesystem.type_name)
    if scheme:
        return f"{scheme}://{checkpoint.path}"
    return checkpoint.to_directory()


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

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        self.reports.append(dict(metrics))
        if checkpoint_dir and self._checkpoint_root is not None:
            target = os.path.join(self._checkpoint_root, f"epoch_{int(metrics['epoch']):04d}")
            shutil.copytree(checkpoint_dir, target, dirs_exist_ok=True)
            self._latest = target

    def latest_checkpoint(self) -> str | None:
        return self._latest


__all__ = [
    "BatchSource", "LocalContext", "RayTrainContext", "ReadyBatches", "ShardBatches", "TrainContext",
    "checkpoint_location",
]
