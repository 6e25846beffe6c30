"""Reading pretrained files into Python objects, safely: nothing read here can run code.

``read_torch_file`` loads a ``torch.save`` file weights-only (a pickle that would import and call
anything is refused in one line); ``read_safetensors`` reads tensors and a JSON header only. A Hugging
Face model is a folder with ``model.safetensors`` and ``config.json`` (or the ``.safetensors`` file with
its ``config.json`` beside it). ``check_safetensors`` finds a truncated ``.safetensors`` from its header
alone. Every file is read whole, so its size is bounded (``MAX_WEIGHTS_BYTES``).
"""

from __future__ import annotations

import io
import json
import re

import torch
from safetensors.torch import load as load_safetensors

from neoray import storage

# A detector's weights, EMA and optimizer state together stay far below this (RT-DETR r101vd: about 1.2 GB);
# a bigger file would only be read into memory to be refused.
MAX_WEIGHTS_BYTES = 4 << 30
SAFETENSORS_MAX_HEADER = 100 << 20  # the safetensors library's own limit


class PretrainedError(ValueError):
    """A pretrained file neoray cannot use; the message is one line naming the file."""


def read_torch_file(path) -> object:
    """The object in a ``torch.save`` file (local path or URI), loaded weights-only on the CPU.

    A file that needs arbitrary code to unpickle (a class, a function: what ``weights_only=False`` would
    run) is refused with a one-line PretrainedError; so is a file torch cannot read at all.
    """
    data = storage.read_bytes(path, max_bytes=MAX_WEIGHTS_BYTES)
    try:
        return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - every failure becomes one line naming the file
        message = str(exc)
        # weights_only refuses to import anything it does not know ("GLOBAL module.name"): what a pickle
        # imports it calls, so such a file would run code. Other refusals are bytes that are no pickle.
        found = re.search(r"[^\n]*GLOBAL [^\n]*|Unsupported global[^\n]*", message)
        if found:
            detail = found.group(0).strip().rstrip(".")
            raise PretrainedError(f"{path}: refused: unpickling it would run code ({detail}); "
                                  f"neoray loads weights only") from None
        lines = [line.strip() for line in message.splitlines() if line.strip()]
        detail = next((line for line in lines if line.startswith("Unsupported")), lines[0] if lines else "")
        raise PretrainedError(f"{path}: cannot read it as a torch file ({type(exc).__name__}: {detail})") from None


def huggingface_files(path: str) -> tuple[str, str] | None:
    """(model.safetensors, config.json) when ``path`` is a Hugging Face model, else None."""
    if path.endswith(".safetensors"):
        config = storage.join(storage.parent(path), "config.json")
        if not storage.is_file(config):
            raise PretrainedError(f"{path}: a .safetensors file needs the config.json of its model beside it")
        return path, config
    if storage.is_dir(path):
        weights, config = storage.join(path, "model.safetensors"), storage.join(path, "config.json")
        if storage.is_file(weights) and storage.is_file(config):
            return weights, config
    return None


def is_huggingface(path) -> bool:
    return huggingface_files(str(path)) is not None


def read_safetensors(weights: str) -> dict:
    data = storage.read_bytes(weights, max_bytes=MAX_WEIGHTS_BYTES)
    try:  # safetensors holds tensors and a JSON header only: nothing in it can run code
        return load_safetensors(data)
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise PretrainedError(f"{weights}: cannot read it as safetensors ({type(exc).__name__}: {exc})") from None


def check_safetensors(weights: str) -> None:
    """Refuse (PretrainedError, one line) a ``.safetensors`` file that is not a regular file of bounded
    size, whose header does not parse, or that ends before the tensors its header describes; reads the
    header only (on object storage, two ranged requests)."""
    found = storage.info(weights)
    if found.kind != "file":
        raise PretrainedError(f"{weights}: not a regular file ({found.kind}); not read")
    size = found.size or 0
    if size > MAX_WEIGHTS_BYTES:
        raise PretrainedError(f"{weights}: {size} bytes, over the limit of {MAX_WEIGHTS_BYTES}")
    head = storage.read_range(weights, 0, 8)
    length = int.from_bytes(head, "little") if len(head) == 8 else -1
    if not 0 < length <= min(SAFETENSORS_MAX_HEADER, size - 8):
        raise PretrainedError(f"{weights}: truncated or not safetensors (a {size}-byte file, header length "
                              f"{length})")
    try:
        header = json.loads(storage.read_range(weights, 8, length))
        end = max((int(entry["data_offsets"][1]) for name, entry in header.items() if name != "__metadata__"),
                  default=0)
    except (ValueError, TypeError, KeyError, IndexError, AttributeError, RecursionError) as exc:
        raise PretrainedError(f"{weights}: not safetensors (its header: {type(exc).__name__})") from None
    if 8 + length + end > size:
        raise PretrainedError(f"{weights}: truncated: its header describes {8 + length + end} bytes, the file has "
                              f"{size}")


__all__ = ["MAX_WEIGHTS_BYTES", "PretrainedError", "check_safetensors", "huggingface_files", "is_huggingface",
           "read_safetensors", "read_torch_file"]
