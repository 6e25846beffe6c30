"""The training function on a Ray Train worker: ``train_loop_per_worker`` (what ``TorchTrainer`` runs) and its
``RayTrainContext``; ``checkpoint_location`` turns a Ray ``Checkpoint`` into what neoray's checkpoint reader
reads (also for the sweep's single-worker trials)."""

from __future__ import annotations

import contextlib
import posixpath

import pyarrow.fs
import ray.train
import ray.train.torch

from neoray import ray_compat, storage
from neoray.config import Config, from_dict
from neoray.distributed import barrier
from neoray.engine.loop import run_training_loop
from neoray.engine.shard_batches import ShardBatches

PARTIAL_PREFIX = ".partial-"  # a checkpoint folder being copied into the run's Ray folder (see persist)


class RayTrainContext:
    """``TrainContext`` on a Ray Train worker (``ray.train``). ``unreadable``: checkpoint folder names the driver
    found unreadable before the run (``neoray.run.setup.resume_point``): Ray's record of the run may still name
    one as its latest, and the run then continues from the one the driver chose (``resume_from``) instead."""

    def __init__(self, cfg: Config, unreadable: tuple[str, ...] = ()):
        self.unreadable = set(unreadable)
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

    def persist(self, checkpoint_dir: str) -> ray.train.Checkpoint:
        """Copy the checkpoint into the run's Ray folder, whole or not at all: locally to a temporary name renamed
        into place, on object storage object by object with whatever was written removed on failure. Refuses
        (StorageError) a run folder that was deleted while the run went on: copying would recreate it."""
        fs, run_folder, name = ray_compat.train_run_storage()
        if fs.get_file_info(run_folder).type != pyarrow.fs.FileType.Directory:
            raise storage.StorageError(f"{run_folder}: the run's output folder was deleted while the run went on; "
                                       "nothing more is written there")
        final = posixpath.join(run_folder, name)
        local = isinstance(fs, pyarrow.fs.LocalFileSystem)
        target = posixpath.join(run_folder, PARTIAL_PREFIX + name) if local else final
        try:
            fs.create_dir(target, recursive=True)
            pyarrow.fs.copy_files(checkpoint_dir, target, source_filesystem=pyarrow.fs.LocalFileSystem(),
                                  destination_filesystem=fs)
            if local:
                fs.move(target, final)  # a rename: the checkpoint appears whole
        except BaseException:
            with contextlib.suppress(OSError):
                fs.delete_dir(target)
            raise
        return ray.train.Checkpoint(final, filesystem=fs)

    def report(self, metrics: dict, checkpoint: ray.train.Checkpoint | None) -> None:
        ray.train.report(metrics, checkpoint=checkpoint,
                         checkpoint_upload_mode=ray.train.CheckpointUploadMode.NO_UPLOAD)
        # ray.train.report only queues this worker's result; the controller registers the epoch's
        # checkpoint once every rank's result is queued. Without this barrier a rank that reports
        # quickly (no checkpoint to write) could fail in the next epoch before rank 0 has queued its
        # checkpoint, and the restart would redo a finished epoch.
        barrier()

    def latest_checkpoint(self) -> str | None:
        location = checkpoint_location(ray.train.get_checkpoint())
        if location and posixpath.basename(location.rstrip("/")) in self.unreadable:
            return None  # the run goes on from resume_from, the checkpoint the driver chose
        return location


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
    "resume_from": str | None, "unreadable": [checkpoint folder names], "hooks": TrainHooks | None}."""
    ray_compat.quiet_sigterm_exit()
    cfg = from_dict(loop_config["config"])
    context = RayTrainContext(cfg, tuple(loop_config.get("unreadable") or ()))
    run_training_loop(cfg, context, hooks=loop_config.get("hooks"), resume_from=loop_config.get("resume_from"))


__all__ = ["PARTIAL_PREFIX", "RayTrainContext", "checkpoint_location", "train_loop_per_worker"]
