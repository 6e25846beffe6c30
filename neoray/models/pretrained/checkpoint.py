"""The neoray checkpoint format, defined once: what a checkpoint holds, writing it, reading it back, and
finding it from what a user names.

A checkpoint is a directory holding ``checkpoint.pt``, a ``torch.save``d dict of tensors and plain
containers (docs/ARCHITECTURE.md, "Checkpoints", lists its keys): ``{"format": "neoray-checkpoint",
"version": 1, "model", "ema", ...}``. It is written atomically to a local directory (Ray uploads it to
the run's storage) and read from any storage, weights-only: nothing in it can run code.

A run directory records its best and latest checkpoints in ``checkpoints.json`` (object storage has no
symlinks), with paths relative to the run directory; ``resolve_checkpoint`` follows it.
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

import torch

from neoray import storage
from neoray.models.pretrained.files import PretrainedError, read_torch_file

FORMAT = "neoray-checkpoint"
VERSION = 1
FILE_NAME = "checkpoint.pt"
POINTERS_NAME = "checkpoints.json"  # a run's best and latest checkpoints


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the path."""


def is_neoray_checkpoint(obj: object) -> bool:
    """Whether a loaded object is a neoray checkpoint (of any version)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


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
    the one ``RUN_DIR/checkpoints.json`` records. Anything else (a reference ``.pth``, a Hugging Face
    folder) is returned as it is."""
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
    except storage.JSONError as exc:  # names the file
        raise CheckpointError(str(exc)) from None
    except UnicodeDecodeError as exc:
        raise CheckpointError(f"{file}: not valid JSON ({exc})") from None
    return pointers if isinstance(pointers, dict) else {}


def write_pointers(run_dir: str, pointers: dict) -> None:
    storage.write_json(storage.join(run_dir, POINTERS_NAME), pointers)


def checkpoint_file(path: str | os.PathLike) -> str:
    """``checkpoint.pt`` of a checkpoint directory (or run directory), or the file itself."""
    path = resolve_checkpoint(path)
    file = path if storage.is_file(path) else storage.join(path, FILE_NAME)
    if not storage.is_file(file):
        raise CheckpointError(f"{path}: no {FILE_NAME} found (expected a checkpoint directory or file, or a "
                              f"run directory)")
    return file


def check_checkpoint(payload: object, file: str) -> dict:
    """``payload`` as read from ``file`` when it is a neoray checkpoint this version reads, else
    ``CheckpointError`` naming the file."""
    if not is_neoray_checkpoint(payload):
        found = f" (format={payload.get('format')!r})" if isinstance(payload, dict) else ""
        raise CheckpointError(f"{file}: not a neoray checkpoint{found}")
    if payload.get("version") != VERSION:
        raise CheckpointError(f"{file}: checkpoint version {payload.get('version')} is not supported "
                              f"(this neoray reads version {VERSION})")
    return payload


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check a checkpoint written by ``save_checkpoint`` (local or on any storage), on the CPU."""
    file = checkpoint_file(path)
    try:
        payload = read_torch_file(file)
    except PretrainedError as exc:
        raise CheckpointError(str(exc)) from None
    return check_checkpoint(payload, file)


__all__ = [
    "FILE_NAME", "FORMAT", "POINTERS_NAME", "VERSION", "CheckpointError", "check_checkpoint", "checkpoint_file",
    "is_neoray_checkpoint", "load_checkpoint", "read_pointers", "resolve_checkpoint", "save_checkpoint",
    "write_pointers",
]
