"""The training function on a Ray Train worker: ``train_loop_per_worker`` (what ``TorchTrainer`` runs) and its
``RayTrainContext``; ``checkpoint_location`` turns a Ray ``Checkpoint`` into what neoray's checkpoint reader
reads (also for the sweep's single-worker trials)."""

from __future__ import annotations

import pyarrow.fs
import ray.train
import ray.train.torch

from neoray import ray_compat
from neoray.config import Config, from_dict
from neoray.distributed import barrier
from neoray.engine.loop import run_training_loop
from neoray.engine.shard_batches import ShardBatches


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
    """A Ray ``Checkpoint`` as something ``neoray.checkpoints.load_checkpoint`` reads: its path
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


def train_loop_per_worker(loop_config: dict) -> None:
    """What ``TorchTrainer`` runs on each worker. ``loop_config``: {"config": Config.to_dict(),
    "resume_from": str | None, "hooks": TrainHooks | None}."""
    ray_compat.quiet_sigterm_exit()
    cfg = from_dict(loop_config["config"])
    run_training_loop(cfg, RayTrainContext(cfg), hooks=loop_config.get("hooks"),
                      resume_from=loop_config.get("resume_from"))


__all__ = ["RayTrainContext", "checkpoint_location", "train_loop_per_worker"]
