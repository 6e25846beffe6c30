"""The few collective operations neoray uses across DDP ranks, in one place.

Every function works unchanged in a single process (no process group, or a group of one): it then
returns the local value. Decisions that must be the same on every rank (skip this update, stop this
epoch, stop the run) go through ``any_flags`` or ``from_rank0``; if one rank decided alone, the
replicas would silently diverge or deadlock in the next all-reduce.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def any_flags(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Element-wise OR of boolean flags over all ranks: one small MAX all-reduce."""
    if not is_distributed():
        return [bool(f) for f in flags]
    value = torch.tensor([1.0 if f else 0.0 for f in flags], device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return [bool(v > 0) for v in value.tolist()]


def gather(obj: Any) -> list:
    """Every rank's ``obj`` on every rank, in rank order (``[obj]`` in a single process)."""
    if not is_distributed():
        return [obj]
    out: list = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def from_rank0(obj: Any) -> Any:
    """Rank 0's ``obj`` on every rank (the same decision everywhere, in rank 0's words)."""
    if not is_distributed():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def mean_over_ranks(value: float, device: torch.device | str = "cpu") -> float:
    """The mean of a number over all ranks (e.g. boxes per worker for loss normalisation)."""
    if not is_distributed():
        return float(value)
    tensor = torch.tensor(float(value), device=device)
    dist.all_reduce(tensor)
    return float(tensor.item()) / dist.get_world_size()


def broadcast_module(module: torch.nn.Module) -> None:
    """Rank 0's parameters and buffers copied into ``module`` on every rank, in place (what DDP's constructor
    does), so that everything derived from the weights before DDP wraps them starts equal on every rank."""
    if not is_distributed():
        return
    with torch.no_grad():
        for tensor in [*module.parameters(), *module.buffers()]:
            dist.broadcast(tensor.data, src=0)


def barrier() -> None:
    if is_distributed():
        dist.barrier()


__all__ = ["any_flags", "barrier", "broadcast_module", "from_rank0", "gather", "is_distributed", "mean_over_ranks"]
