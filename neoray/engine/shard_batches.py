"""``ShardBatches``: a worker's ``BatchSource`` over the config's shard directories, streamed with Ray Data
(``neoray.data.stream`` decides which work runs where for ``data.decode``)."""

from __future__ import annotations

from typing import Iterable

import torch

from neoray.config import Config
from neoray.data.stream import (
    ShardSet,
    iter_eval_batches,
    iter_train_batches,
    quiet_ray_data,
    train_batches_per_epoch,
)
from neoray.engine.device import default_device


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
        return iter_train_batches(self.train_set, self.cfg.train.batch_size, self.cfg.data, seed=self.cfg.train.seed,
                                  epoch=epoch, rank=self.rank, world_size=self.world_size, device=self.device,
                                  workers_on_node=self.workers_on_node, epochs=self.cfg.train.epochs)

    def val(self) -> Iterable | None:
        if self.val_set is None:
            return None
        return iter_eval_batches(self.val_set, self.cfg.train.batch_size, self.cfg.data, rank=self.rank,
                                 world_size=self.world_size, device=self.device)

    def micro_batches_per_epoch(self) -> int:
        return max(1, train_batches_per_epoch(self.train_set, self.cfg.train.batch_size, self.world_size,
                                              self.cfg.data.max_train_images))


__all__ = ["ShardBatches"]
