"""The neoray checkpoint format, defined once: what a checkpoint holds, writing it atomically, reading a
checkpoint file back and checking it.

A checkpoint is a directory holding ``checkpoint.pt``, a ``torch.save``d dict of tensors and plain
containers (docs/ARCHITECTURE.md, "Checkpoints", lists its keys): ``{"format": "neoray-checkpoint",
"version": 1, "model", "ema", ...}``. It is written to a temporary name in the directory and renamed over
``checkpoint.pt`` (a reader never sees half a file; a failed write, a full disk included, leaves nothing
behind: not the temporary file, nor the directory when it made it), to a local
directory that the runner then uploads, and read from any storage, weights-only: nothing in it can run code.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from neoray.checkpoints.files import PretrainedError, read_torch_file

FORMAT = "neoray-checkpoint"
VERSION = 1
FILE_NAME = "checkpoint.pt"


class CheckpointError(ValueError):
    """A checkpoint that cannot be read; the message names the path."""


def is_neoray_checkpoint(obj: object) -> bool:
    """Whether a loaded object is a neoray checkpoint (of any version)."""
    return isinstance(obj, dict) and obj.get("format") == FORMAT


def save_checkpoint(directory: str | os.PathLike, payload: dict[str, Any]) -> Path:
    """Write ``payload`` (the documented keys) to ``directory/checkpoint.pt`` via temp file + rename."""
    directory = Path(directory)
    created = not directory.exists()
    directory.mkdir(parents=True, exist_ok=True)
    payload = {"format": FORMAT, "version": VERSION, **payload}
    fd, tmp = tempfile.mkstemp(prefix=".checkpoint-", suffix=".tmp", dir=directory)
    try:
        # Through a Python file: a full disk is OSError(ENOSPC) (a path makes torch raise a RuntimeError that
        # does not say why), which the training loop turns into its stop reason.
        with os.fdopen(fd, "wb") as handle:
            torch.save(payload, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, directory / FILE_NAME)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        if created:
            shutil.rmtree(directory, ignore_errors=True)
        raise
    return directory / FILE_NAME


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


def read_checkpoint_file(file: str) -> dict:
    """Read and check one ``checkpoint.pt`` (local or on any storage), on the CPU, weights-only."""
    try:
        payload = read_torch_file(file)
    except PretrainedError as exc:
        raise CheckpointError(str(exc)) from None
    return check_checkpoint(payload, file)


__all__ = ["FILE_NAME", "FORMAT", "VERSION", "CheckpointError", "check_checkpoint", "is_neoray_checkpoint",
           "read_checkpoint_file", "save_checkpoint"]
