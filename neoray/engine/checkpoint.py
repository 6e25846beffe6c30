"""Checkpoints in the documented format (docs/ARCHITECTURE.md), written atomically, plus RNG state.

A checkpoint is a directory holding ``checkpoint.pt``. Besides the documented keys this module adds
``ema_updates`` (so the EMA warmup continues after a restore) and ``progress`` (early-stopping state:
best mAP so far and evaluations since). Files are loaded with ``weights_only=True``: RNG states are
stored as tensors and lists, so nothing needs unpickling of arbitrary objects.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT = "neoray-checkpoint"
VERSION = 1
FILE_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the path."""


def capture_rng_state() -> dict:
    """Python, NumPy and torch (CPU and every CUDA device) RNG states, in a weights_only-safe form."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "python": [version, list(internal), gauss_next],
        "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss, cached],
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
    }


def restore_rng_state(state: dict) -> None:
    version, internal, gauss_next = state["python"]
    random.setstate((version, tuple(internal), gauss_next))
    kind, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((kind, keys.numpy().astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and torch; callers add the rank so workers draw different augmentations."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def save_checkpoint(directory: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (the documented keys) to ``directory/checkpoint.pt`` via temp file + rename."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    os.close(fd)
    try:
        torch.save(payload, tmp)
        os.replace(tmp, directory / FILE_NAME)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return directory / FILE_NAME


def checkpoint_file(path: str | os.PathLike) -> Path:
    """Accept a checkpoint directory or the ``checkpoint.pt`` file itself."""
    path = Path(path)
    file = path / FILE_NAME if path.is_dir() else path
    if not file.is_file():
        raise CheckpointError(f"{path}: no {FILE_NAME} found (expected a checkpoint directory or file)")
    return file


def load_checkpoint(path: str | os.PathLike, map_location: str | torch.device = "cpu") -> dict:
    """Read and check a checkpoint written by ``save_checkpoint``."""
    file = checkpoint_file(path)
    try:
        payload = torch.load(file, map_location=map_location, weights_only=True)
    except Exception as exc:  # corrupt file, truncated copy, foreign pickle ...
        raise CheckpointError(f"{file}: cannot read checkpoint ({type(exc).__name__}: {exc})") from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a neoray checkpoint (format={payload.get('format')!r})"
                              if isinstance(payload, dict) else f"{file}: not a neoray checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint version {payload.get('version')} is not supported "
                              f"(this neoray reads version {VERSION})")
    return payload


__all__ = [
    "CheckpointError", "FILE_NAME", "capture_rng_state", "checkpoint_file", "load_checkpoint",
    "restore_rng_state", "save_checkpoint", "seed_everything",
]
