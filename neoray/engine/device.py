"""The device a worker trains on, its mixed precision, and what it reports about itself (without Ray: the
Ray-free core, e.g. benchmarks/gpu_check.py on a machine without Ray, imports this module)."""

from __future__ import annotations

import resource
import sys

import torch

from neoray.config import Config


def resolve_amp(mode: str, device: torch.device) -> tuple[torch.dtype | None, bool]:
    """(autocast dtype or None, use a GradScaler). auto: bf16 on CUDA GPUs that support it, fp16 with
    a GradScaler on other CUDA GPUs, off on CPU. On CPU only an explicit bf16 is honoured."""
    if mode == "off":
        return None, False
    if device.type != "cuda":
        return (torch.bfloat16, False) if mode == "bf16" else (None, False)
    if mode == "bf16" or (mode == "auto" and torch.cuda.is_bf16_supported()):
        return torch.bfloat16, False
    return torch.float16, True


def default_device(cfg: Config, local_rank: int) -> torch.device:
    if cfg.train.use_gpu and torch.cuda.is_available():
        return torch.device("cuda", local_rank % torch.cuda.device_count())
    return torch.device("cpu")


def peak_memory_mb(device: torch.device) -> float:
    """Peak CUDA memory allocated this epoch, or the process's peak resident memory on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kib / 2**20 if sys.platform == "darwin" else kib / 1024  # macOS reports bytes


def device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def node_id() -> str:
    """The Ray node this process runs on ("" outside Ray): which machine each worker used.

    Ray is looked up, not imported: a process that runs under Ray has imported it already, and the rest of
    this module (the engine's device and AMP choice) must work where Ray is not installed."""
    ray = sys.modules.get("ray")
    try:
        return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else ""
    except Exception:  # noqa: BLE001 - a diagnostic only; never fail a run for it
        return ""


__all__ = ["default_device", "device_name", "node_id", "peak_memory_mb", "resolve_amp"]
