"""``load_pretrained``: a pretrained file's tensors into a built model, by the format's key map.

Every model tensor that is not loaded is reported with the reason, and so is every file tensor the model
has no place for. When the user's classes differ from the file's, the class-dependent tensors keep their
fresh rows except those of classes with the same name (case-insensitive), which are copied. The file's
conventions (input normalisation, position order) are set on the model, since the weights mean them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch

from neoray.checkpoints.files import PretrainedError
from neoray.models.pretrained.formats import PretrainedFile, PretrainedInfo, open_pretrained, placeholder_names
from neoray.models.pretrained.keymaps import huggingface_key_map, reference_key_map

# The tensors whose first dimension is one row per class (RT-DETR); the denoising embedding has one more
# row, the padding row (index num_classes), which stays zero.
_CLASS_TENSOR = re.compile(
    r"decoder\.(?:enc_score_head|score_heads\.\d+)\.(?:weight|bias)|decoder\.denoising_class_embed\.weight"
)
_PADDED = "decoder.denoising_class_embed.weight"
_KEEPS = " (keeps its initial value)"


@dataclass
class PretrainedLoad:
    info: PretrainedInfo
    loaded: list[str]
    skipped: list[tuple[str, str]]  # (key, reason): model keys not loaded, checkpoint keys with no place
    class_rows: dict[str, str]  # user class -> the checkpoint class whose rows were copied
    conventions: dict  # the conventions now in force on the model
    changed_conventions: dict = field(default_factory=dict)  # key -> (before, after)
    notes: list = field(default_factory=list)
    new_classes: list = field(default_factory=list)  # user classes that start from their fresh rows

    def lines(self) -> list[str]:
        """Human-readable lines for the run's log (the caller adds its own prefix, e.g. "init_from: ")."""
        out = [f"{self.info.format} checkpoint {self.info.path}: {len(self.loaded)} tensors loaded, "
               f"{len(self.skipped)} not loaded" + (f" ({'; '.join(self.notes)})" if self.notes else "")]
        for key, (before, after) in self.changed_conventions.items():
            out.append(f"set {key}={after} (the model was built with {before}): the checkpoint was trained so")
        counters = [k for k, _ in self.skipped if k.endswith("num_batches_tracked")]
        for key, reason in self.skipped:
            if not key.endswith("num_batches_tracked"):
                out.append(f"not loaded {key}: {reason}")
        if counters:
            out.append(f"not loaded {len(counters)} BatchNorm step counters (num_batches_tracked, e.g. {counters[0]}): "
                       f"not weights; they only count steps")
        if self.class_rows or self.new_classes:
            kept = ", ".join(f"{user} <- {ckpt}" if user != ckpt else user for user, ckpt in self.class_rows.items())
            total = len(self.class_rows) + len(self.new_classes)
            line = f"classes that kept pretrained rows: {kept or 'none'} ({len(self.class_rows)} of {total})"
            if self.new_classes:
                line += f"; starting from scratch: {', '.join(self.new_classes)}"
            out.append(line)
        return out


def _shape_reason(value: torch.Tensor, target: torch.Tensor) -> str:
    return f"shape {tuple(value.shape)} vs {tuple(target.shape)} (checkpoint vs model; keeps its initial value)"


def _same_names(a: list[str], b: list[str]) -> bool:
    return [x.lower() for x in a] == [x.lower() for x in b]


def _plan(model, checkpoint: PretrainedFile) -> dict[str, list[tuple[str, ...]] | None]:
    fmt = checkpoint.info.format
    if fmt == "neoray":
        return {key: [(key,)] for key in model.state_dict()}
    if fmt == "reference":
        return {key: ([(ref,)] if ref else None) for key, ref in reference_key_map(model).items()}
    return huggingface_key_map(model)


def _class_rows(user: list[str], checkpoint: list[str]) -> dict[int, int]:
    """user index -> checkpoint index of the class with the same name (case-insensitive)."""
    where = {}
    for i, name in enumerate(checkpoint):
        where.setdefault(name.lower(), i)
    return {u: where[name.lower()] for u, name in enumerate(user) if name.lower() in where}


def _names_known(info: PretrainedInfo) -> bool:
    return bool(info.class_names) and info.class_names != placeholder_names(len(info.class_names))


def kept_class_names(info: PretrainedInfo, class_names: list[str]) -> list[str]:
    """The user's classes that start from this checkpoint's rows, as ``load_pretrained`` copies them: all
    of them when the class lists are the same, those with a matching name otherwise, none by name when the
    checkpoint does not name its classes."""
    if not _names_known(info):
        return []
    if _same_names(class_names, info.class_names):
        return list(class_names)
    return [class_names[u] for u in _class_rows(class_names, info.class_names)]


def _apply_conventions(model, info: PretrainedInfo) -> dict:
    """Set the checkpoint's conventions on ``model`` (they are part of what the weights mean); returns
    {key: (before, after)} for the ones that changed."""
    if not hasattr(model, "conventions"):
        return {}
    current = model.conventions()
    wanted = {k: v for k, v in info.conventions.items() if k in current and current[k] != v}
    if wanted:
        model.set_conventions(**wanted)
    return {k: (current[k], v) for k, v in wanted.items()}


def _row_plan(info: PretrainedInfo, class_names: list[str] | None) -> dict[int, int] | None:
    """user class index -> checkpoint class index for the class tensors, or None to copy them whole (no
    user classes given, the same classes, or a checkpoint that does not name its classes)."""
    if class_names is None or not _names_known(info) or _same_names(class_names, info.class_names):
        return None
    return _class_rows(class_names, info.class_names)


def _match(key: str, target: torch.Tensor, alternatives, tensors: dict, rows, layout: str | None):
    """(the tensor to load into ``key``, None) or (None, why it is not loaded)."""
    if not alternatives:
        return None, f"no counterpart in {layout}'s layout{_KEEPS}"
    chosen = next((parts for parts in alternatives if all(p in tensors for p in parts)), None)
    if chosen is None:
        expected = " + ".join(alternatives[0])
        return None, f"not in the checkpoint{f': expected {expected}' if expected != key else ''}{_KEEPS}"
    value = torch.cat([tensors[p] for p in chosen]) if len(chosen) > 1 else tensors[chosen[0]]
    if rows is not None and _CLASS_TENSOR.fullmatch(key):
        if value.shape[1:] != target.shape[1:]:
            return None, _shape_reason(value, target)
        if not rows:
            return None, f"no class of the model has a name among the checkpoint's classes{_KEEPS}"
        merged = target.clone()  # the classes without a match keep their fresh rows
        merged[list(rows)] = value[list(rows.values())].to(merged.dtype)
        return merged, None
    if value.shape != target.shape:
        return None, _shape_reason(value, target)
    return value, None


def _zero_padding_row(model, loadable: dict) -> list[str]:
    """An older neoray checkpoint trained the denoising padding row; it must stay zero."""
    if _PADDED not in loadable or not hasattr(model, "num_classes"):
        return []
    embed = model.get_submodule("decoder.denoising_class_embed").weight
    with torch.no_grad():
        if embed[model.num_classes].abs().sum() == 0:
            return []
        embed[model.num_classes].zero_()
    return ["denoising padding row set to zero"]


def load_pretrained(model, path, class_names: list[str] | None = None) -> PretrainedLoad:
    """Load a neoray, reference or Hugging Face checkpoint into ``model`` (see the module docstring).

    class_names: the user's classes in label order; None means "the checkpoint's classes" (tensors of
    another class count are then skipped with their shapes).
    """
    checkpoint = open_pretrained(path)
    info, tensors = checkpoint.info, checkpoint.tensors
    if info.format != "neoray" and not hasattr(getattr(model, "decoder", None), "score_heads"):
        raise PretrainedError(f"{path}: a {info.format} RT-DETR checkpoint loads into an RT-DETR model, "
                              f"not {type(model).__name__}")
    changed = _apply_conventions(model, info)
    rows = _row_plan(info, class_names)
    plan = _plan(model, checkpoint)
    layout = {"reference": "the reference RT-DETR", "huggingface": "the Hugging Face RT-DETR"}.get(info.format)
    loadable, skipped = {}, []
    for key, target in model.state_dict().items():
        value, reason = _match(key, target, plan.get(key), tensors, rows, layout)
        if value is None:
            skipped.append((key, reason))
        else:
            loadable[key] = value
    used = {p for alternatives in plan.values() if alternatives for parts in alternatives for p in parts}
    skipped += [(key, "not in the model") for key in tensors if key not in used]
    model.load_state_dict(loadable, strict=False)
    notes = list(checkpoint.notes) + _zero_padding_row(model, loadable)

    class_rows, new_classes = {}, []
    loaded_classes = any(_CLASS_TENSOR.fullmatch(k) for k in loadable)
    if rows is not None:
        class_rows = {class_names[u]: info.class_names[c] for u, c in rows.items()}
        new_classes = [name for u, name in enumerate(class_names) if u not in rows]
    elif class_names is not None and _names_known(info) and loaded_classes:
        class_rows = dict(zip(class_names, info.class_names))  # the checkpoint's own classes, every row
    elif class_names is not None and loaded_classes:
        notes.append("the checkpoint does not name its classes: class rows copied by index")
    conventions = model.conventions() if hasattr(model, "conventions") else {}
    return PretrainedLoad(info, list(loadable), skipped, class_rows, conventions, changed, notes, new_classes)


__all__ = ["PretrainedLoad", "kept_class_names", "load_pretrained"]
