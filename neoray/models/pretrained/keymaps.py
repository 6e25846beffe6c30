"""Key maps: each neoray state-dict name -> the name(s) it has in the reference RT-DETR and in Hugging
Face's ``transformers`` RT-DETR, by explicit rules (nothing is matched by suffix or by shape).

The reference names follow lyuwenyu/RT-DETR ``rtdetr_pytorch``; the Hugging Face names follow the
renames of transformers' ``convert_rt_detr_original_pytorch_checkpoint_to_hf.py``, with each
``nn.MultiheadAttention.in_proj_*`` split into ``q_proj``/``k_proj``/``v_proj`` (rows in that order).
"""

from __future__ import annotations

import re
from typing import Callable

from neoray.models.presnet_names import huggingface_trunk_name

Rule = tuple[str, Callable[[re.Match], str]]
_PART = {"0": "conv", "1": "norm"}  # a ConvNormAct's children in neoray -> the reference's names


def _csp(prefix_neoray: str, prefix_reference: str) -> list[Rule]:
    """neoray's CSPRepLayer (main.0, main.1.. RepVGG, shortcut, out; ConvNormAct = Sequential(conv, bn))
    -> the reference's (conv1, bottlenecks.j with conv1 = 3x3 and conv2 = 1x1, conv2, conv3)."""
    part, n, r = _PART, re.escape(prefix_neoray), prefix_reference
    return [
        (rf"{n}\.(\d+)\.main\.0\.([01])\.(.+)", lambda m: f"{r}.{m[1]}.conv1.{part[m[2]]}.{m[3]}"),
        (rf"{n}\.(\d+)\.main\.(\d+)\.conv3\.([01])\.(.+)",
         lambda m: f"{r}.{m[1]}.bottlenecks.{int(m[2]) - 1}.conv1.{part[m[3]]}.{m[4]}"),
        (rf"{n}\.(\d+)\.main\.(\d+)\.conv1\.([01])\.(.+)",
         lambda m: f"{r}.{m[1]}.bottlenecks.{int(m[2]) - 1}.conv2.{part[m[3]]}.{m[4]}"),
        (rf"{n}\.(\d+)\.shortcut\.([01])\.(.+)", lambda m: f"{r}.{m[1]}.conv2.{part[m[2]]}.{m[3]}"),
        (rf"{n}\.(\d+)\.out\.([01])\.(.+)", lambda m: f"{r}.{m[1]}.conv3.{part[m[2]]}.{m[3]}"),
    ]


# neoray -> reference (lyuwenyu/RT-DETR rtdetr_pytorch module names).
REFERENCE_RULES: list[Rule] = [
    (r"backbone\.((?:conv1|res_layers)\..+)", lambda m: f"backbone.{m[1]}"),  # PResNet: the same names
    (r"encoder\.input_proj\.(\d+)\.([01])\.(.+)", lambda m: f"encoder.input_proj.{m[1]}.{m[2]}.{m[3]}"),
    (r"encoder\.aifi\.attn\.(in_proj_weight|in_proj_bias|out_proj\.weight|out_proj\.bias)",
     lambda m: f"encoder.encoder.0.layers.0.self_attn.{m[1]}"),
    (r"encoder\.aifi\.ffn\.0\.(weight|bias)", lambda m: f"encoder.encoder.0.layers.0.linear1.{m[1]}"),
    (r"encoder\.aifi\.ffn\.3\.(weight|bias)", lambda m: f"encoder.encoder.0.layers.0.linear2.{m[1]}"),
    (r"encoder\.aifi\.(norm1|norm2)\.(weight|bias)", lambda m: f"encoder.encoder.0.layers.0.{m[1]}.{m[2]}"),
    (r"encoder\.lateral\.(\d+)\.([01])\.(.+)", lambda m: f"encoder.lateral_convs.{m[1]}.{_PART[m[2]]}.{m[3]}"),
    (r"encoder\.downsample\.(\d+)\.([01])\.(.+)", lambda m: f"encoder.downsample_convs.{m[1]}.{_PART[m[2]]}.{m[3]}"),
    *_csp("encoder.top_down", "encoder.fpn_blocks"),
    *_csp("encoder.bottom_up", "encoder.pan_blocks"),
    (r"decoder\.input_proj\.(\d+)\.([01])\.(.+)", lambda m: f"decoder.input_proj.{m[1]}.{_PART[m[2]]}.{m[3]}"),
    (r"decoder\.((?:enc_output|enc_score_head|enc_bbox_head|denoising_class_embed|query_pos_head)\..+)",
     lambda m: f"decoder.{m[1]}"),
    (r"decoder\.layers\.(\d+)\.((?:self_attn|cross_attn|norm1|norm2|norm3)\..+)",
     lambda m: f"decoder.decoder.layers.{m[1]}.{m[2]}"),
    (r"decoder\.layers\.(\d+)\.ffn\.0\.(weight|bias)", lambda m: f"decoder.decoder.layers.{m[1]}.linear1.{m[2]}"),
    (r"decoder\.layers\.(\d+)\.ffn\.3\.(weight|bias)", lambda m: f"decoder.decoder.layers.{m[1]}.linear2.{m[2]}"),
    (r"decoder\.score_heads\.(\d+)\.(weight|bias)", lambda m: f"decoder.dec_score_head.{m[1]}.{m[2]}"),
    (r"decoder\.bbox_heads\.(\d+)\.layers\.(\d+)\.(weight|bias)",
     lambda m: f"decoder.dec_bbox_head.{m[1]}.layers.{m[2]}.{m[3]}"),
]

# reference -> Hugging Face, as transformers' convert_rt_detr_original_pytorch_checkpoint_to_hf.py renames
# (create_rename_keys). Each value is a list of alternatives (the first present in the file is read); the
# score and box heads are saved both under model.decoder.* and at the top level (tied modules). The backbone's
# names are the ResNet-vd trunk's (neoray.models.presnet_names, which backbone weights read too).
HF_RULES: list[tuple[str, Callable[[re.Match], list[str] | None]]] = [
    (r"backbone\.(.+)", lambda m: _trunk(m[1])),
    (r"encoder\.input_proj\.(\d+)\.([01])\.(weight|bias|running_mean|running_var)",
     lambda m: [f"model.encoder_input_proj.{m[1]}.{m[2]}.{m[3]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.self_attn\.out_proj\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.self_attn.out_proj.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.linear1\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.fc1.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.linear2\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.fc2.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.norm1\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.self_attn_layer_norm.{m[2]}"]),
    (r"encoder\.encoder\.(\d+)\.layers\.0\.norm2\.(weight|bias)",
     lambda m: [f"model.encoder.encoder.{m[1]}.layers.0.final_layer_norm.{m[2]}"]),
    (r"encoder\.((?:lateral_convs|downsample_convs|fpn_blocks|pan_blocks)\..+\.(?:weight|bias|running_mean|running_var))",
     lambda m: [f"model.encoder.{m[1]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)",
     lambda m: [f"model.decoder.layers.{m[1]}.self_attn.out_proj.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.cross_attn\.(sampling_offsets|attention_weights|value_proj|output_proj)\.(weight|bias)",
     lambda m: [f"model.decoder.layers.{m[1]}.encoder_attn.{m[2]}.{m[3]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.norm1\.(weight|bias)",
     lambda m: [f"model.decoder.layers.{m[1]}.self_attn_layer_norm.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.norm2\.(weight|bias)",
     lambda m: [f"model.decoder.layers.{m[1]}.encoder_attn_layer_norm.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.norm3\.(weight|bias)",
     lambda m: [f"model.decoder.layers.{m[1]}.final_layer_norm.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.linear1\.(weight|bias)", lambda m: [f"model.decoder.layers.{m[1]}.fc1.{m[2]}"]),
    (r"decoder\.decoder\.layers\.(\d+)\.linear2\.(weight|bias)", lambda m: [f"model.decoder.layers.{m[1]}.fc2.{m[2]}"]),
    (r"decoder\.dec_score_head\.(\d+)\.(weight|bias)",
     lambda m: [f"model.decoder.class_embed.{m[1]}.{m[2]}", f"class_embed.{m[1]}.{m[2]}"]),
    (r"decoder\.dec_bbox_head\.(\d+)\.layers\.(\d+)\.(weight|bias)",
     lambda m: [f"model.decoder.bbox_embed.{m[1]}.layers.{m[2]}.{m[3]}", f"bbox_embed.{m[1]}.layers.{m[2]}.{m[3]}"]),
    (r"decoder\.input_proj\.(\d+)\.conv\.weight", lambda m: [f"model.decoder_input_proj.{m[1]}.0.weight"]),
    (r"decoder\.input_proj\.(\d+)\.norm\.(weight|bias|running_mean|running_var)",
     lambda m: [f"model.decoder_input_proj.{m[1]}.1.{m[2]}"]),
    (r"decoder\.denoising_class_embed\.weight", lambda m: ["model.denoising_class_embed.weight"]),
    (r"decoder\.((?:query_pos_head)\..+)", lambda m: [f"model.decoder.{m[1]}"]),
    (r"decoder\.((?:enc_output|enc_score_head|enc_bbox_head)\..+)", lambda m: [f"model.{m[1]}"]),
]
# nn.MultiheadAttention's packed input projection -> the three Hugging Face projections (q, k, v rows).
_HF_IN_PROJ = [
    (r"encoder\.encoder\.(\d+)\.layers\.0\.self_attn\.in_proj_(weight|bias)",
     lambda m: f"model.encoder.encoder.{m[1]}.layers.0.self_attn.{{}}_proj.{m[2]}"),
    (r"decoder\.decoder\.layers\.(\d+)\.self_attn\.in_proj_(weight|bias)",
     lambda m: f"model.decoder.layers.{m[1]}.self_attn.{{}}_proj.{m[2]}"),
]


def _trunk(key: str) -> list[str] | None:
    name = huggingface_trunk_name(key)
    return [name] if name else None


def _apply(rules, key: str):
    for pattern, build in rules:
        match = re.fullmatch(pattern, key)
        if match:
            return build(match)
    return None


def reference_key_map(model) -> dict[str, str | None]:
    """neoray state-dict name -> the reference checkpoint's name (None: no counterpart)."""
    return {key: _apply(REFERENCE_RULES, key) for key in model.state_dict()}


def reference_to_huggingface(reference_key: str) -> list[tuple[str, ...]] | None:
    """The Hugging Face name(s) of a reference name: alternatives, each a tuple of parts concatenated on
    dimension 0 (three parts, q/k/v, for a packed attention projection). None: no counterpart (BatchNorm's
    num_batches_tracked, which the published files do not carry)."""
    packed = _apply(_HF_IN_PROJ, reference_key)
    if packed is not None:
        return [tuple(packed.format(p) for p in ("q", "k", "v"))]
    names = _apply(HF_RULES, reference_key)
    return [(name,) for name in names] if names else None


def huggingface_key_map(model) -> dict[str, list[tuple[str, ...]] | None]:
    """neoray state-dict name -> Hugging Face alternatives (see ``reference_to_huggingface``)."""
    out = {}
    for key, reference in reference_key_map(model).items():
        out[key] = reference_to_huggingface(reference) if reference else None
    return out


__all__ = [
    "HF_RULES", "REFERENCE_RULES", "huggingface_key_map", "reference_key_map", "reference_to_huggingface",
]
