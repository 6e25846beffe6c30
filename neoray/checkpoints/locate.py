"""Finding a checkpoint from what a user names, and a run directory's pointers to its best and latest.

A run directory records its best and latest checkpoints in ``checkpoints.json`` (object storage has no
symlinks), with paths relative to the run directory; ``resolve_checkpoint`` follows it, and
``load_checkpoint`` reads whatever a user names: a checkpoint directory or file, a run directory,
``RUN_DIR/checkpoints/best`` or ``RUN_DIR/checkpoints/latest``.
"""

from __future__ import annotations

import os

from neoray import storage
from neoray.checkpoints.format import FILE_NAME, CheckpointError, read_checkpoint_file

POINTERS_NAME = "checkpoints.json"  # a run's best and latest checkpoints


def _is_checkpoint_dir(path: str) -> bool:
    return storage.is_file(storage.join(path, FILE_NAME))


def resolve_checkpoint(path: str | os.PathLike) -> str:
    """The checkpoint a user names, as a directory or file that ``load_checkpoint`` (or
    ``neoray.models.load_pretrained``) reads: a checkpoint directory or its ``checkpoint.pt`` as given; a
    run directory: its best checkpoint, else its latest; ``RUN_DIR/checkpoints/best`` or ``.../latest``:
    the one ``RUN_DIR/checkpoints.json`` records. Anything else (a reference ``.pth``, a Hugging Face
    folder) is returned as it is; a path that is neither a file nor a directory (a FIFO, a device) is refused
    as what it is (``CheckpointError``)."""
    path = storage.absolute(path)
    found = storage.info(path)
    if found.kind == "file" or _is_checkpoint_dir(path):
        return path
    if found.kind == "other":  # a FIFO would block a reader forever, a device never end
        raise CheckpointError(f"{path}: {storage.describe(path)}, not a checkpoint file or directory; not read")
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


def load_checkpoint(path: str | os.PathLike) -> dict:
    """Read and check the checkpoint a user names (``resolve_checkpoint``), on the CPU."""
    return read_checkpoint_file(checkpoint_file(path))


__all__ = ["POINTERS_NAME", "checkpoint_file", "load_checkpoint", "read_pointers", "resolve_checkpoint",
           "write_pointers"]
