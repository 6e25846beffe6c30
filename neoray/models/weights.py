"""Loading weights: backbone weights (ImageNet or a local file) and shape-matching fine-tuning.

A local backbone file may be a plain state dict of the backbone (e.g. torchvision's resnet18 .pth) or
any full checkpoint (a dict with a "model" or "state_dict" entry) that contains a backbone with the same
architecture under some prefix ("backbone.body.", "module.backbone.", ...). The prefix is found by
matching key suffixes and shapes against our backbone, and the prefix matching the most tensors wins.
"""

from __future__ import annotations

import logging
from collections import Counter
from pathlib import Path

import torch
from torch import nn

log = logging.getLogger(__name__)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Tensors of a .pt/.pth file: a state dict, or the "model"/"state_dict" entry of a checkpoint."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"weights file not found: {path}")
    # weights_only=False: full training checkpoints also hold optimizer/RNG state; the file is the
    # user's own, named explicitly in their config.
    obj = torch.load(path, map_location="cpu", weights_only=False)
    return unwrap_state_dict(obj, str(path))


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
    """The tensors of `state` that are `reference`'s keys under one common prefix, renamed to them."""
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


def load_backbone_weights(trunk: nn.Module, source: str, imagenet_weights, arch: str) -> int:
    """Load "imagenet" (a torchvision weights enum) or a local file into `trunk`; returns tensors loaded."""
    if source in ("", "none", None):
        return 0
    if source == "imagenet":
        try:
            state = imagenet_weights.get_state_dict(progress=False)
        except Exception as error:  # no network, proxy, broken cache: all end the same way for the user
            reason = f"{type(error).__name__}: {error}".replace("\n", " ")[:200]
            raise RuntimeError(
                f"could not download ImageNet weights for {arch} ({reason}); "
                f"download {imagenet_weights.url} elsewhere and pass backbone_weights=/path/to/that/file"
            ) from None
        where = f"ImageNet {arch}"
    else:
        state = read_state_dict(source)
        where = str(source)
    reference = trunk.state_dict()
    found = extract_by_suffix(state, reference)
    if not found:
        raise ValueError(f"{where}: no tensor matches the {arch} backbone ({len(state)} tensors checked)")
    trunk.load_state_dict(found, strict=False)
    missing = len(reference) - len(found)
    if missing:
        log.warning("backbone %s: loaded %d tensors from %s, %d left at their initial values", arch, len(found), where, missing)
    else:
        log.info("backbone %s: loaded all %d tensors from %s", arch, len(found), where)
    return len(found)


def load_matching_state_dict(model: nn.Module, state_dict) -> tuple[list[str], list[tuple[str, str]]]:
    """Load every tensor whose name and shape match; report the rest.

    Returns (loaded_keys, skipped) with skipped = [(key, reason)], reason one of "missing" (model key
    absent from the checkpoint), "shape (a) vs (b)" (checkpoint vs model), "not in model".
    Accepts a state dict or a checkpoint dict with a "model"/"state_dict" entry.
    """
    state = unwrap_state_dict(state_dict)
    own = model.state_dict()
    loadable, skipped = {}, []
    for key, tensor in own.items():
        if key not in state:
            skipped.append((key, "missing"))
        elif state[key].shape != tensor.shape:
            skipped.append((key, f"shape {tuple(state[key].shape)} vs {tuple(tensor.shape)}"))
        else:
            loadable[key] = state[key]
    skipped += [(key, "not in model") for key in state if key not in own]
    model.load_state_dict(loadable, strict=False)
    if skipped:
        shown = "; ".join(f"{k}: {r}" for k, r in skipped[:10])
        # Debug only: the caller gets every skipped key back and reports it once (the training loop on rank 0).
        log.debug("loaded %d tensors, skipped %d: %s%s", len(loadable), len(skipped), shown, " ..." if len(skipped) > 10 else "")
    return list(loadable), skipped
