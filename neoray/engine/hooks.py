"""Named points in the training loop where a test (or a profiler) can step in; in production they do
nothing.

The loop calls every method below at the moment its name says, on every rank. A subclass may raise
from them (``torch.OutOfMemoryError`` to stand for a real one, ``RuntimeError`` for a failing worker)
or, from ``after_forward``, return a different loss. Instances travel to Ray Train workers inside the
TorchTrainer's ``train_loop_config``, so subclasses must be picklable.

Micro-steps count this process's micro-batches from 0; epochs count from 1.
"""

from __future__ import annotations

import torch


class TrainHooks:
    def epoch_start(self, epoch: int, rank: int) -> None:
        """Before the epoch's first batch."""

    def before_forward(self, micro_step: int, rank: int, batch) -> None:
        """Before the forward pass of a micro-batch (a ``neoray.data.stream.Batch`` on the device)."""

    def after_forward(self, micro_step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        """After the forward pass of a micro-batch; returns the loss the loop goes on with."""
        return loss

    def after_backward(self, micro_step: int, rank: int) -> None:
        """After a micro-batch's backward pass (its gradients are accumulated)."""

    def before_optimizer_step(self, micro_step: int, rank: int) -> None:
        """Before the optimizer steps at the end of an accumulation group ending at ``micro_step``."""

    def epoch_end(self, epoch: int, rank: int) -> None:
        """After the epoch's last batch."""


__all__ = ["TrainHooks"]
