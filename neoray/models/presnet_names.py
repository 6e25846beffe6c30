"""The reference ResNet-vd trunk's tensor names (neoray's ``PResNet`` keeps them) as Hugging Face
``transformers`` names them in its ``RTDetrResNet`` backbone, by explicit rules.

Both sides need this table: ``neoray.models.weights`` reads a backbone's tensors out of a Hugging Face
RT-DETR (``backbone_weights``), below the model registry, and ``neoray.models.pretrained.keymaps`` maps a
whole detector, above it. The renames follow transformers' ``convert_rt_detr_original_pytorch_checkpoint_to_hf.py``.
"""

from __future__ import annotations

import re

HF_TRUNK = "model.backbone.model"  # where the trunk sits in a Hugging Face RT-DETR
_STAGE_BRANCH = {"a": 0, "b": 1, "c": 2}
_NORM = r"(weight|bias|running_mean|running_var)"

# PResNet name -> Hugging Face name (without HF_TRUNK).
TRUNK_RULES = [
    (r"conv1\.conv1_([123])\.conv\.weight", lambda m: f"embedder.embedder.{int(m[1]) - 1}.convolution.weight"),
    (rf"conv1\.conv1_([123])\.norm\.{_NORM}", lambda m: f"embedder.embedder.{int(m[1]) - 1}.normalization.{m[2]}"),
    (r"res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.conv\.weight",
     lambda m: f"encoder.stages.{m[1]}.layers.{m[2]}.layer.{_STAGE_BRANCH[m[3]]}.convolution.weight"),
    (rf"res_layers\.(\d+)\.blocks\.(\d+)\.branch2([abc])\.norm\.{_NORM}",
     lambda m: f"encoder.stages.{m[1]}.layers.{m[2]}.layer.{_STAGE_BRANCH[m[3]]}.normalization.{m[4]}"),
    (r"res_layers\.(\d+)\.blocks\.0\.short\.conv\.weight",
     lambda m: f"encoder.stages.{m[1]}.layers.0.shortcut.convolution.weight"),
    (rf"res_layers\.(\d+)\.blocks\.0\.short\.norm\.{_NORM}",
     lambda m: f"encoder.stages.{m[1]}.layers.0.shortcut.normalization.{m[2]}"),
    (r"res_layers\.(\d+)\.blocks\.0\.short\.conv\.conv\.weight",
     lambda m: f"encoder.stages.{m[1]}.layers.0.shortcut.1.convolution.weight"),
    (rf"res_layers\.(\d+)\.blocks\.0\.short\.conv\.norm\.{_NORM}",
     lambda m: f"encoder.stages.{m[1]}.layers.0.shortcut.1.normalization.{m[2]}"),
]


def huggingface_trunk_name(key: str) -> str | None:
    """The Hugging Face name of a PResNet state-dict name (``conv1.conv1_1.conv.weight``); None when the
    published files have no counterpart (BatchNorm's ``num_batches_tracked``)."""
    for pattern, build in TRUNK_RULES:
        match = re.fullmatch(pattern, key)
        if match:
            return f"{HF_TRUNK}.{build(match)}"
    return None


__all__ = ["HF_TRUNK", "TRUNK_RULES", "huggingface_trunk_name"]
