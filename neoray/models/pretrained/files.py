"""Reading pretrained files into Python objects, safely: nothing read here can run code.

``read_torch_file`` loads a ``torch.save`` file weights-only (a pickle that would import and call
anything is refused in one line); ``read_safetensors`` reads tensors and a JSON header only. A Hugging
Face model is a folder with ``model.safetensors`` and ``config.json`` (or the ``.safetensors`` file with
its ``config.json`` beside it).
"""

from __future__ import annotations

import io
import re

import torch
from safetensors.torch import load as load_safetensors

from neoray import storage


class PretrainedError(ValueError):
    """A pretrained file neoray cannot use; the message is one line naming the file."""


def read_torch_file(path) -> object:
    """The object in a ``torch.save`` file (local path or URI), loaded weights-only on the CPU.

    A file that needs arbitrary code to unpickle (a class, a function: what ``weights_only=False`` would
    run) is refused with a one-line PretrainedError; so is a file torch cannot read at all.
    """
    data = storage.read_bytes(path)
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
    try:  # safetensors holds tensors and a JSON header only: nothing in it can run code
        return load_safetensors(storage.read_bytes(weights))
    except Exception as exc:  # noqa: BLE001 - a truncated or foreign file
        raise PretrainedError(f"{weights}: cannot read it as safetensors ({type(exc).__name__}: {exc})") from None


__all__ = ["PretrainedError", "huggingface_files", "is_huggingface", "read_safetensors", "read_torch_file"]
