"""Backbone weights (``backbone_weights``: "none", "imagenet" or a file).

Every file is read weights-only (``neoray.checkpoints.files.read_torch_file``): a pickle that would run
code is refused. Where the backbone's tensors come from in a file, by what the file is:

* a detector checkpoint: a neoray checkpoint (``"format": "neoray-checkpoint"``; its EMA weights when
  present), a reference RT-DETR checkpoint (``{"model": ...}`` or ``{"ema": {"module": ...}}`` whose keys
  start with ``backbone.``) or a Hugging Face RT-DETR (``model.safetensors`` + ``config.json``): the
  backbone's tensors are taken by exact name under the detector's backbone prefix ("backbone.body." for
  a torchvision backbone, "backbone." for PResNet; Hugging Face names through the explicit mapping of
  ``neoray.models.pretrained``). Nothing is guessed: a tensor that is not there is reported missing.
* a plain backbone state dict (e.g. torchvision's ``resnet18-*.pth``, the reference's
  ``ResNet50_vd_*.pth``; also inside a ``"model"``/``"state_dict"`` entry): the backbone's own names,
  possibly under one common prefix (``features.`` for torchvision's MobileNetV3); the prefix is found by
  matching names and shapes, the prefix matching the most tensors wins. This search is only for plain
  backbone files, never for detector checkpoints.
"""

from __future__ import annotations

import logging
import os
import re
from collections import Counter
from urllib.parse import urlparse

import torch
from torch import nn
from torch.hub import download_url_to_file, get_dir

from neoray import storage
from neoray.checkpoints.files import huggingface_files, is_huggingface, read_safetensors, read_torch_file
from neoray.checkpoints.format import is_neoray_checkpoint
from neoray.models.presnet_names import huggingface_trunk_name

log = logging.getLogger(__name__)


def unwrap_state_dict(obj, source: str = "checkpoint") -> dict[str, torch.Tensor]:
    if isinstance(obj, dict):
        for key in ("model", "state_dict"):
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise ValueError(f"{source}: expected a state dict or a checkpoint dict, got {type(obj).__name__}")
    tensors = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise ValueError(f"{source}: holds no tensors (keys: {sorted(obj)[:5]})")
    # Checkpoints saved from a DDP-wrapped model prefix every key with "module.".
    return {k.removeprefix("module."): v for k, v in tensors.items()}


def extract_by_suffix(state: dict[str, torch.Tensor], reference: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The tensors of a *plain backbone* state dict that are `reference`'s keys under one common prefix,
    renamed to them (the prefix search of the module docstring; never used for detector checkpoints)."""
    votes: Counter = Counter()
    for key, tensor in state.items():
        starts = [0] + [i + 1 for i, ch in enumerate(key) if ch == "."]
        for start in starts:
            suffix = key[start:]
            if suffix in reference and reference[suffix].shape == tensor.shape:
                votes[key[:start]] += 1
    if not votes:
        return {}
    prefix = max(votes, key=lambda p: (votes[p], -len(p)))  # most tensors; shortest prefix on ties
    return {
        key[len(prefix) :]: tensor
        for key, tensor in state.items()
        if key.startswith(prefix)
        and key[len(prefix) :] in reference
        and reference[key[len(prefix) :]].shape == tensor.shape
    }


def huggingface_backbone_tensors(path, reference: dict) -> dict:
    """The tensors of a PResNet trunk (``reference`` = its state dict) read from a Hugging Face RT-DETR."""
    weights, _config = huggingface_files(str(path))
    tensors = read_safetensors(weights)
    names = {key: huggingface_trunk_name(key) for key in reference}
    return {key: tensors[name] for key, name in names.items() if name in tensors}


def _detector_state(obj) -> dict[str, torch.Tensor] | None:
    """The model tensors of a neoray or reference detector checkpoint (EMA first), None for anything else."""
    if not isinstance(obj, dict):
        return None
    if is_neoray_checkpoint(obj):
        state = obj.get("ema") or obj.get("model")
    elif isinstance(obj.get("ema"), dict) and isinstance(obj["ema"].get("module"), dict):
        state = obj["ema"]["module"]
    elif isinstance(obj.get("model"), dict):
        state = obj["model"]
    else:
        return None
    if not isinstance(state, dict):
        return None
    state = {k.removeprefix("module."): v for k, v in state.items() if isinstance(v, torch.Tensor)}
    if not is_neoray_checkpoint(obj) and not any(k.startswith("backbone.") for k in state):
        return None  # e.g. {"model": <a classification state dict>}: a plain backbone file
    return state


def _tensors_for(trunk: nn.Module, source: str, prefix: str, arch: str) -> tuple[dict, str]:
    """(tensors named as ``trunk``'s state dict, how they were found) from a backbone_weights file."""
    if not storage.exists(source):
        raise FileNotFoundError(f"weights file not found: {source}")
    reference = trunk.state_dict()
    if is_huggingface(source):
        tensors = huggingface_backbone_tensors(source, reference)
        return tensors, "Hugging Face RT-DETR backbone"
    obj = read_torch_file(source)
    state = _detector_state(obj)
    if state is not None:
        found = {key: state[prefix + key] for key in reference if prefix + key in state}
        wrong = [k for k, v in found.items() if v.shape != reference[k].shape]
        if wrong:
            raise ValueError(f"{source}: {prefix}{wrong[0]} has shape {tuple(found[wrong[0]].shape)}, the {arch} "
                             f"backbone {tuple(reference[wrong[0]].shape)}: another architecture")
        return found, f"detector checkpoint, tensors under {prefix!r}"
    state = unwrap_state_dict(obj, source)
    exact = {k: v for k, v in state.items() if k in reference and reference[k].shape == v.shape}
    if len(exact) == len(reference):
        return exact, "backbone state dict"
    return extract_by_suffix(state, reference), "backbone state dict (common prefix)"


def download_weights(url: str) -> str:
    """The local copy of ``url`` in torch's hub cache (``$TORCH_HOME/hub/checkpoints``, where torchvision
    keeps its own downloads), downloaded once; a sha256 prefix in the file name (``resnet18-f37072fd.pth``)
    is checked as torch.hub checks it."""
    name = os.path.basename(urlparse(url).path)
    target = os.path.join(get_dir(), "checkpoints", name)
    if not os.path.isfile(target):
        os.makedirs(os.path.dirname(target), exist_ok=True)
        digest = re.search(r"-([a-f0-9]+)\.", name)
        download_url_to_file(url, target, hash_prefix=digest.group(1) if digest else None, progress=False)
    return target


def load_backbone_weights(
    trunk: nn.Module, source: str, imagenet_url: str, arch: str, prefix: str = "backbone.body."
) -> int:
    """Load "imagenet" (the weights at ``imagenet_url``, e.g. a torchvision weights enum's ``.url``) or a
    file into ``trunk`` (see the module docstring); ``prefix`` is where the trunk sits in a detector's
    state dict. Returns the number of tensors loaded. Every file is read weights-only."""
    if source in ("", "none", None):
        return 0
    if source == "imagenet":
        try:
            local = download_weights(imagenet_url)
        except Exception as error:  # no network, proxy, broken cache: all end the same way for the user
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")[:200]
            raise RuntimeError(
                f"could not download ImageNet weights for {arch} ({reason}); "
                f"download {imagenet_url} elsewhere and pass backbone_weights=/path/to/that/file"
            ) from None
        state = unwrap_state_dict(read_torch_file(local), local)
        reference = trunk.state_dict()
        found, how = extract_by_suffix(state, reference), "ImageNet"
        where = f"ImageNet {arch}"
    else:
        found, how = _tensors_for(trunk, str(source), prefix, arch)
        where = str(source)
        reference = trunk.state_dict()
    if not found:
        raise ValueError(f"{where}: no tensor matches the {arch} backbone ({how})")
    trunk.load_state_dict(found, strict=False)
    missing = [k for k in reference if k not in found and not k.endswith("num_batches_tracked")]
    if missing:
        log.warning("backbone %s: loaded %d tensors from %s (%s), %d left at their initial values (e.g. %s)",
                    arch, len(found), where, how, len(missing), missing[0])
    else:
        log.info("backbone %s: loaded all %d tensors from %s (%s)", arch, len(found), where, how)
    return len(found)

