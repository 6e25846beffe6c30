"""Checkpoints in the documented format (docs/ARCHITECTURE.md), written atomically, plus RNG state.

A checkpoint is a directory holding ``checkpoint.pt`` (its keys: docs/ARCHITECTURE.md, "Checkpoints";
the training part comes from ``TrainState.state_dict``). It is written to a local temporary directory
and uploaded by Ray to the run's storage; it is read from any storage. Files are loaded with
``weights_only=True``: RNG states are stored as tensors and lists, so nothing needs unpickling of
arbitrary objects, and a file that would run code is refused.
"""

from __future__ import annotations

import os
import random
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from neoray import storage

FORMAT = "neoray-checkpoint"
VERSION = 1
FILE_NAME = "checkpoint.pt"
POINTERS_NAME = "checkpoints.json"  # a run's best and latest checkpoints


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


def _is_checkpoint_dir(path: str) -> bool:
    return storage.is_file(storage.join(path, FILE_NAME))


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint a user names, as a directory or file that ``load_checkpoint`` (or
    ``neoray.models.load_pretrained``) reads: a checkpoint directory or its ``checkpoint.pt`` as given; a
    run directory: its best checkpoint, else its latest; ``RUN_DIR/checkpoints/best`` or ``.../latest``:
    the one ``RUN_DIR/checkpoints.json`` records (object storage has no symlinks, so runs record them
    there). Anything else (a reference ``.pth``, a Hugging Face folder) is returned as it is."""
    path = storage.absolute(path)
    if storage.is_file(path) or _is_checkpoint_dir(path):
        return path
    name, parent = storage.basename(path), storage.parent(path)
    if name in ("best", "latest") and storage.basename(parent) == "checkpoints":
        return _pointed(storage.parent(parent), name, path)
    if storage.is_file(storage.join(path, POINTERS_NAME)):
        pointers = read_pointers(path)
        return _pointed(path, "best" if pointers.get("best") else "latest", path)
    return path


def _pointed(run_dir: str, which: str, asked: str) -> str:
    entry = read_pointers(run_dir).get(which)
    if not entry:
        raise CheckpointError(f"{asked}: the run {run_dir} has no {which} checkpoint yet")
    return storage.join(run_dir, entry["path"])


def read_pointers(run_dir: str) -> dict:
    """``RUN_DIR/checkpoints.json``: {"latest": {"path", "epoch"}, "best": {"path", "epoch", "score"}}
    with paths relative to the run directory; {} when the run has no checkpoint yet."""
    file = storage.join(run_dir, POINTERS_NAME)
    try:
        pointers = storage.read_json(file)
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    return pointers if isinstance(pointers, dict) else {}


def write_pointers(run_dir: str, pointers: dict) -> None:
    storage.write_json(storage.join(run_dir, POINTERS_NAME), pointers)


def checkpoint_file(path: str | os.PathLike) -> str:
    """``checkpoint.pt`` of a checkpoint directory, or the file itself."""
    path = resolve_checkpoint(path)
    file = path if storage.is_file(path) else storage.join(path, FILE_NAME)
    if not storage.is_file(file):
        raise CheckpointError(f"{path}: no {FILE_NAME} found (expected a checkpoint directory or file, or a "
                              f"run directory)")
    return file


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a checkpoint written by ``save_checkpoint`` (local or on any storage), on the CPU;
    nothing in it can run code (``weights_only``)."""
    from neoray.models import PretrainedError, read_torch_file

    file = checkpoint_file(path)
    try:
        payload = read_torch_file(file)
    except PretrainedError as exc:
        raise CheckpointError(str(exc)) from None
    if not isinstance(payload, dict) or payload.get("format") != FORMAT:
        raise CheckpointError(f"{file}: not a neoray checkpoint (format={payload.get('format')!r})"
                              if isinstance(payload, dict) else f"{file}: not a neoray checkpoint")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint version {payload.get('version')} is not supported "
                              f"(this neoray reads version {VERSION})")
    return payload


__all__ = [
    "CheckpointError", "FILE_NAME", "POINTERS_NAME", "capture_rng_state", "checkpoint_file", "load_checkpoint",
    "read_pointers", "resolve_checkpoint", "restore_rng_state", "save_checkpoint", "seed_everything",
    "write_pointers",
]
