"""Starting from pretrained detectors: the reference RT-DETR's .pth, Hugging Face RT-DETR folders and
neoray checkpoints, made here in those layouts (no internet, no real weights); weights-only reading; the
config check that runs before Ray starts."""

from __future__ import annotations

import json
import os

import pytest
import torch
from safetensors.torch import save_file

from neoray.models import (
    PretrainedError,
    build_model,
    build_pretrained,
    check_model,
    describe_pretrained,
    load_pretrained,
    read_torch_file,
)
from neoray.models.pretrained.coco import COCO_CLASS_NAMES
from neoray.models.pretrained.keymaps import huggingface_key_map, reference_key_map

# A small rtdetr_r18vd (the ResNet-18-vd backbone is real; the transformer is narrow) whose sizes can all
# be read back from its tensors. Decoder heads stay 8 (a head count is not visible in the tensors).
SMALL = dict(hidden_dim=64, encoder_ffn_dim=128, decoder_ffn_dim=128, num_decoder_layers=2)
SMALL_INFERRED = {"hidden_dim": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128, "num_decoder_layers": 2}
IMPORTED = {"input_normalization": "unit", "position_order": "yx"}


def randomised(model) -> dict:
    """The model's state dict with every float tensor replaced by random positive values (the padding row
    of the denoising embedding stays zero, as in every reference and Hugging Face checkpoint)."""
    generator = torch.Generator().manual_seed(7)
    state = {k: (torch.rand(v.shape, generator=generator) + 0.5 if v.is_floating_point() else v.clone())
             for k, v in model.state_dict().items()}
    state["decoder.denoising_class_embed.weight"][-1] = 0.0
    return state


def as_reference(model, state: dict) -> dict:
    mapping = reference_key_map(model)
    return {mapping[k]: v for k, v in state.items()}


def as_huggingface(model, state: dict, heads_at_top: bool = False) -> dict:
    out, mapping = {}, huggingface_key_map(model)
    for key, value in state.items():
        alternatives = mapping[key]
        if alternatives is None:
            continue  # num_batches_tracked: the published files carry none
        parts = alternatives[-1] if heads_at_top else alternatives[0]
        for name, chunk in zip(parts, value.chunk(3) if len(parts) == 3 else [value]):
            out[name] = chunk.contiguous()
    return out


def huggingface_config(num_labels: int = 80, **extra) -> dict:
    config = {
        "model_type": "rt_detr",
        "backbone_config": {"model_type": "rt_detr_resnet", "depths": [2, 2, 2, 2], "layer_type": "basic",
                            "hidden_sizes": [64, 128, 256, 512], "embedding_size": 64},
        "d_model": 64, "encoder_hidden_dim": 64, "encoder_ffn_dim": 128, "decoder_ffn_dim": 128,
        "hidden_expansion": 0.5, "decoder_layers": 2, "num_queries": 300, "decoder_n_points": 4,
        "encoder_attention_heads": 8, "decoder_attention_heads": 8, "encoder_in_channels": [128, 256, 512],
        "decoder_in_channels": [64, 64, 64], "num_feature_levels": 3, "encoder_layers": 1,
        "encode_proj_layers": [2], "feat_strides": [8, 16, 32], "activation_function": "silu",
        "encoder_activation_function": "gelu", "decoder_activation_function": "relu",
        "positional_encoding_temperature": 10000, "num_denoising": 100,
        "id2label": {str(i): name for i, name in enumerate(COCO_CLASS_NAMES[:num_labels])},
    }
    config.update(extra)
    return config


@pytest.fixture(scope="module")
def source():
    """(a built small r18vd with 80 classes, its randomised state): what the test checkpoints hold."""
    torch.manual_seed(0)
    model = build_model("rtdetr_r18vd", 80, **SMALL)
    return model, randomised(model)


def write_reference(path, model, state, ema=True) -> str:
    reference = as_reference(model, state)
    payload = {"ema": {"module": reference, "updates": 5}, "last_epoch": 3} if ema else {"model": reference}
    torch.save(payload, path)
    return str(path)


def write_huggingface(folder, model, state, heads_at_top=False, **config) -> str:
    os.makedirs(folder, exist_ok=True)
    save_file(as_huggingface(model, state, heads_at_top), os.path.join(folder, "model.safetensors"))
    with open(os.path.join(folder, "config.json"), "w") as handle:
        json.dump(huggingface_config(**config), handle)
    return str(folder)


def assert_all_loaded(model, state, result):
    assert result.skipped == []
    assert sorted(result.loaded) == sorted(state)
    own = model.state_dict()
    for key, value in state.items():
        assert torch.equal(own[key], value), key


# ------------------------------------------------------------------------------------------ names


def test_reference_names_are_the_ones_the_reference_code_uses(source):
    # Literal names of lyuwenyu/RT-DETR rtdetr_pytorch (hybrid_encoder.py, rtdetr_decoder.py, presnet.py)
    # with the shapes this small model has: a wrong name in the table fails here, not only a round trip.
    model, state = source
    reference = as_reference(model, state)
    expected = {
        "backbone.conv1.conv1_1.conv.weight": (32, 3, 3, 3),
        "backbone.res_layers.1.blocks.0.short.conv.conv.weight": (128, 64, 1, 1),
        "encoder.input_proj.2.0.weight": (64, 512, 1, 1),
        "encoder.input_proj.2.1.running_var": (64,),
        "encoder.encoder.0.layers.0.self_attn.in_proj_weight": (192, 64),
        "encoder.encoder.0.layers.0.self_attn.out_proj.bias": (64,),
        "encoder.encoder.0.layers.0.linear1.weight": (128, 64),
        "encoder.encoder.0.layers.0.norm2.weight": (64,),
        "encoder.lateral_convs.0.conv.weight": (64, 64, 1, 1),
        "encoder.fpn_blocks.0.conv1.conv.weight": (32, 128, 1, 1),
        "encoder.fpn_blocks.0.conv2.norm.bias": (32,),
        "encoder.fpn_blocks.1.bottlenecks.2.conv1.conv.weight": (32, 32, 3, 3),  # RepVGG: conv1 is the 3x3
        "encoder.fpn_blocks.1.bottlenecks.2.conv2.conv.weight": (32, 32, 1, 1),  # and conv2 the 1x1
        "encoder.pan_blocks.0.conv3.conv.weight": (64, 32, 1, 1),
        "encoder.downsample_convs.1.norm.running_mean": (64,),
        "decoder.input_proj.0.conv.weight": (64, 64, 1, 1),
        "decoder.input_proj.2.norm.weight": (64,),
        "decoder.enc_output.0.weight": (64, 64),
        "decoder.enc_output.1.bias": (64,),
        "decoder.enc_score_head.weight": (80, 64),
        "decoder.enc_bbox_head.layers.2.weight": (4, 64),
        "decoder.denoising_class_embed.weight": (81, 64),
        "decoder.query_pos_head.layers.0.weight": (128, 4),
        "decoder.decoder.layers.1.self_attn.in_proj_weight": (192, 64),
        "decoder.decoder.layers.1.cross_attn.sampling_offsets.weight": (192, 64),
        "decoder.decoder.layers.0.cross_attn.attention_weights.bias": (96,),
        "decoder.decoder.layers.0.linear2.weight": (64, 128),
        "decoder.decoder.layers.1.norm3.bias": (64,),
        "decoder.dec_score_head.1.weight": (80, 64),
        "decoder.dec_bbox_head.0.layers.1.bias": (64,),
    }
    for key, shape in expected.items():
        assert key in reference, key
        assert tuple(reference[key].shape) == shape, key
    assert len(reference) == len(state)  # one to one


def test_huggingface_names_are_the_ones_transformers_uses(source):
    # Literal names of transformers' RT-DETR (convert_rt_detr_original_pytorch_checkpoint_to_hf.py,
    # modeling_rt_detr.py, modeling_rt_detr_resnet.py).
    model, state = source
    hf = as_huggingface(model, state)
    expected = {
        "model.backbone.model.embedder.embedder.0.convolution.weight": (32, 3, 3, 3),
        "model.backbone.model.embedder.embedder.2.normalization.running_mean": (64,),
        "model.backbone.model.encoder.stages.0.layers.0.shortcut.convolution.weight": (64, 64, 1, 1),
        "model.backbone.model.encoder.stages.1.layers.0.shortcut.1.convolution.weight": (128, 64, 1, 1),
        "model.backbone.model.encoder.stages.3.layers.1.layer.1.normalization.weight": (512,),
        "model.encoder_input_proj.1.0.weight": (64, 256, 1, 1),
        "model.encoder.encoder.0.layers.0.self_attn.q_proj.weight": (64, 64),
        "model.encoder.encoder.0.layers.0.self_attn.v_proj.bias": (64,),
        "model.encoder.encoder.0.layers.0.fc1.weight": (128, 64),
        "model.encoder.encoder.0.layers.0.self_attn_layer_norm.weight": (64,),
        "model.encoder.encoder.0.layers.0.final_layer_norm.bias": (64,),
        "model.encoder.fpn_blocks.0.bottlenecks.0.conv1.conv.weight": (32, 32, 3, 3),
        "model.encoder.lateral_convs.1.norm.running_var": (64,),
        "model.decoder_input_proj.0.0.weight": (64, 64, 1, 1),
        "model.decoder_input_proj.0.1.running_var": (64,),
        "model.decoder.layers.0.self_attn.k_proj.weight": (64, 64),
        "model.decoder.layers.1.encoder_attn.sampling_offsets.weight": (192, 64),
        "model.decoder.layers.1.encoder_attn.value_proj.bias": (64,),
        "model.decoder.layers.0.encoder_attn_layer_norm.weight": (64,),
        "model.decoder.layers.0.fc2.weight": (64, 128),
        "model.decoder.query_pos_head.layers.1.weight": (64, 128),
        "model.decoder.class_embed.1.bias": (80,),
        "model.decoder.bbox_embed.0.layers.2.weight": (4, 64),
        "model.enc_output.0.weight": (64, 64),
        "model.enc_score_head.weight": (80, 64),
        "model.enc_bbox_head.layers.0.weight": (64, 64),
        "model.denoising_class_embed.weight": (81, 64),
    }
    for key, shape in expected.items():
        assert key in hf, key
        assert tuple(hf[key].shape) == shape, key
    assert not any(k.endswith("num_batches_tracked") for k in hf)


# ------------------------------------------------------------------------------------------ reference


@pytest.mark.parametrize("ema", [True, False])
def test_reference_checkpoint_loads_every_tensor_and_brings_its_conventions(source, tmp_path, ema):
    model, state = source
    path = write_reference(tmp_path / "rtdetr_r18vd.pth", model, state, ema=ema)
    info = describe_pretrained(path)
    assert info.format == "reference" and info.model_name == "rtdetr_r18vd"
    assert info.options == {**SMALL_INFERRED, **IMPORTED}
    assert info.class_names == COCO_CLASS_NAMES and info.num_classes == 80
    assert info.categories[2] == {"id": 3, "name": "car", "label": 2}
    assert info.categories[79] == {"id": 90, "name": "toothbrush", "label": 79}
    target = build_model("rtdetr_r18vd", 80, **SMALL)  # built with neoray's own conventions
    assert target.conventions() == {"input_normalization": "imagenet", "position_order": "xy"}
    result = load_pretrained(target, path)
    assert_all_loaded(target, state, result)
    assert target.conventions() == IMPORTED and result.conventions == IMPORTED
    assert result.changed_conventions == {"input_normalization": ("imagenet", "unit"), "position_order": ("xy", "yx")}
    lines = result.lines()
    assert lines[0].startswith(f"reference checkpoint {path}: {len(state)} tensors loaded, 0 not loaded")
    assert ("using its EMA weights" in lines[0]) == ema
    assert any(line.startswith("set input_normalization=unit") for line in lines)


def test_reference_wrong_shape_missing_and_unknown_tensors_are_named(source, tmp_path):
    model, state = source
    reference = as_reference(model, state)
    reference["decoder.enc_output.0.weight"] = torch.zeros(64, 32)  # wrong shape
    del reference["decoder.decoder.layers.1.norm3.bias"]  # missing
    reference["decoder.tgt_embed_extra.weight"] = torch.zeros(3)  # unknown
    torch.save({"model": reference}, tmp_path / "broken.pth")
    target = build_model("rtdetr_r18vd", 80, **SMALL)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    result = load_pretrained(target, tmp_path / "broken.pth")
    reasons = dict(result.skipped)
    assert reasons == {
        "decoder.enc_output.0.weight": "shape (64, 32) vs (64, 64) (checkpoint vs model; keeps its initial value)",
        "decoder.layers.1.norm3.bias":
            "not in the checkpoint: expected decoder.decoder.layers.1.norm3.bias (keeps its initial value)",
        "decoder.tgt_embed_extra.weight": "not in the model",
    }
    assert torch.equal(target.state_dict()["decoder.enc_output.0.weight"], fresh["decoder.enc_output.0.weight"])
    assert len(result.loaded) == len(state) - 2
    lines = result.lines()
    assert "not loaded decoder.enc_output.0.weight: shape (64, 32) vs (64, 64) (checkpoint vs model; keeps its " \
           "initial value)" in lines
    assert "not loaded decoder.tgt_embed_extra.weight: not in the model" in lines


def test_user_classes_keep_the_coco_rows_of_the_same_name(source, tmp_path):
    model, state = source
    path = write_reference(tmp_path / "coco.pth", model, state)
    target = build_model("rtdetr_r18vd", 3, **SMALL)
    fresh = {k: v.clone() for k, v in target.state_dict().items()}
    result = load_pretrained(target, path, class_names=["car", "dog-toy", "Person"])
    assert result.class_rows == {"car": "car", "Person": "person"} and result.new_classes == ["dog-toy"]
    own = target.state_dict()
    coco = {"car": 2, "person": 0}
    for key in ("decoder.enc_score_head.weight", "decoder.enc_score_head.bias", "decoder.score_heads.0.weight",
                "decoder.score_heads.1.bias", "decoder.denoising_class_embed.weight"):
        assert key in result.loaded and key not in dict(result.skipped)
        assert torch.equal(own[key][0], state[key][coco["car"]]), key
        assert torch.equal(own[key][2], state[key][coco["person"]]), key
        assert torch.equal(own[key][1], fresh[key][1]), key  # dog-toy: its fresh initialisation
    assert own["decoder.denoising_class_embed.weight"][3].abs().sum() == 0  # the padding row stays zero
    assert "classes that kept pretrained rows: car, Person <- person (2 of 3); starting from scratch: dog-toy" \
        in result.lines()
    # The rest of the model loaded as usual.
    assert torch.equal(own["encoder.aifi.attn.in_proj_weight"], state["encoder.aifi.attn.in_proj_weight"])

    # A reference model of another dataset does not name its classes: nothing is matched by name.
    other = build_model("rtdetr_r18vd", 2, **SMALL)
    other_path = write_reference(tmp_path / "other.pth", other, randomised(other))
    assert describe_pretrained(other_path).class_names == ["class_0", "class_1"]
    result = load_pretrained(build_model("rtdetr_r18vd", 2, **SMALL), other_path, class_names=["class_1", "x"])
    assert result.class_rows == {} and result.skipped == []
    assert "the checkpoint does not name its classes: class rows copied by index" in result.lines()[0]

    unrelated = build_model("rtdetr_r18vd", 2, **SMALL)
    result = load_pretrained(unrelated, path, class_names=["pallet", "forklift"])
    assert dict(result.skipped)["decoder.score_heads.0.weight"].startswith("no class of the model has a name")
    assert result.class_rows == {} and result.new_classes == ["pallet", "forklift"]


def test_a_reference_checkpoint_of_another_depth_and_width_is_recognised(tmp_path):
    # Only the names and shapes matter for recognising a checkpoint: empty tensors of the right shapes.
    def t(*shape):
        return torch.zeros(*shape)

    state = {}
    for stage, blocks in enumerate((3, 4, 23, 3)):
        for block in range(blocks):
            state[f"backbone.res_layers.{stage}.blocks.{block}.branch2c.conv.weight"] = t(1)
    state.update({
        "decoder.dec_score_head.0.weight": t(80, 256), "decoder.enc_output.0.weight": t(256, 256),
        "encoder.input_proj.0.0.weight": t(384, 512, 1, 1), "encoder.encoder.0.layers.0.linear1.weight": t(2048, 384),
        "encoder.fpn_blocks.0.conv1.conv.weight": t(384, 768, 1, 1),
        "decoder.decoder.layers.0.cross_attn.attention_weights.weight": t(96, 256),
        "decoder.decoder.layers.0.linear1.weight": t(1024, 256), "decoder.denoising_class_embed.weight": t(81, 256),
        **{f"encoder.fpn_blocks.0.bottlenecks.{j}.conv1.conv.weight": t(1) for j in range(3)},
        **{f"decoder.dec_score_head.{i}.weight": t(80, 256) for i in range(6)},
        **{f"decoder.input_proj.{i}.conv.weight": t(1) for i in range(3)},
    })
    torch.save({"ema": {"module": state}}, tmp_path / "r101.pth")
    info = describe_pretrained(tmp_path / "r101.pth")
    assert info.model_name == "rtdetr_r101vd" and info.options == IMPORTED  # the preset's sizes exactly
    state["encoder.fpn_blocks.0.conv1.conv.weight"] = t(192, 768, 1, 1)  # an "_m" variant: expansion 0.5
    torch.save({"model": state}, tmp_path / "r101_m.pth")
    assert describe_pretrained(tmp_path / "r101_m.pth").options == {"csp_expansion": 0.5, **IMPORTED}
    for block in range(3, 23):  # a ResNet with 3 blocks in its third stage: no such ResNet-vd
        state.pop(f"backbone.res_layers.2.blocks.{block}.branch2c.conv.weight")
    torch.save({"model": state}, tmp_path / "odd.pth")
    with pytest.raises(PretrainedError, match="backbone neoray does not have"):
        describe_pretrained(tmp_path / "odd.pth")


# ------------------------------------------------------------------------------------------ Hugging Face


@pytest.mark.parametrize("heads_at_top", [False, True])
def test_huggingface_folder_loads_every_tensor(source, tmp_path, heads_at_top):
    model, state = source
    folder = write_huggingface(tmp_path / "rtdetr_r18vd", model, state, heads_at_top=heads_at_top)
    info = describe_pretrained(folder)
    assert info.format == "huggingface" and info.model_name == "rtdetr_r18vd"
    assert info.options == {**SMALL_INFERRED, **IMPORTED} and info.class_names == COCO_CLASS_NAMES
    assert info.categories[0] == {"id": 1, "name": "person", "label": 0}
    target = build_model("rtdetr_r18vd", 80, **SMALL)
    result = load_pretrained(target, folder)
    counters = [k for k, _ in result.skipped if k.endswith("num_batches_tracked")]
    assert counters and len(counters) == len(result.skipped)  # only BatchNorm step counters are not in the file
    own = target.state_dict()
    for key, value in state.items():
        if not key.endswith("num_batches_tracked"):
            assert torch.equal(own[key], value), key
    assert target.conventions() == IMPORTED
    assert any(line.startswith(f"not loaded {len(counters)} BatchNorm step counters") for line in result.lines())
    # The .safetensors file itself, with config.json beside it, is the same model.
    assert describe_pretrained(os.path.join(folder, "model.safetensors")).model_name == "rtdetr_r18vd"


def test_huggingface_attention_projections_are_stacked_q_k_v(source, tmp_path):
    model, state = source
    tensors = as_huggingface(model, state)
    generator = torch.Generator().manual_seed(3)
    prefix = "model.decoder.layers.0.self_attn."
    q, k, v = (torch.randn(64, 64, generator=generator) for _ in range(3))
    tensors.update({prefix + "q_proj.weight": q, prefix + "k_proj.weight": k, prefix + "v_proj.weight": v})
    tensors["model.extra_head.weight"] = torch.zeros(2)  # unknown to neoray
    tensors["model.enc_score_head.bias"] = torch.zeros(81)  # wrong shape
    os.makedirs(tmp_path / "hf")
    save_file(tensors, tmp_path / "hf" / "model.safetensors")
    (tmp_path / "hf" / "config.json").write_text(json.dumps(huggingface_config()))
    target = build_model("rtdetr_r18vd", 80, **SMALL)
    result = load_pretrained(target, tmp_path / "hf")
    in_proj = target.decoder.layers[0].self_attn.in_proj_weight
    assert torch.equal(in_proj[:64], q) and torch.equal(in_proj[64:128], k) and torch.equal(in_proj[128:], v)
    reasons = dict(result.skipped)
    assert reasons["model.extra_head.weight"] == "not in the model"
    assert (
        reasons["decoder.enc_score_head.bias"] == "shape (81,) vs (80,) (checkpoint vs model; keeps its initial value)"
    )


def test_huggingface_classes_and_normalisation_come_from_its_files(source, tmp_path):
    model, state = source
    small = build_model("rtdetr_r18vd", 2, **SMALL)
    folder = write_huggingface(tmp_path / "custom", small, randomised(small), id2label={"0": "pallet", "1": "box"})
    info = describe_pretrained(folder)
    assert info.class_names == ["pallet", "box"] and info.categories is None and info.num_classes == 2
    (tmp_path / "custom" / "preprocessor_config.json").write_text(
        json.dumps(
            {
                "do_rescale": True,
                "do_normalize": True,
                "image_mean": [0.485, 0.456, 0.406],
                "image_std": [0.229, 0.224, 0.225],
            }
        )
    )
    assert describe_pretrained(folder).options["input_normalization"] == "imagenet"
    (tmp_path / "custom" / "preprocessor_config.json").write_text(json.dumps(
        {"do_normalize": True, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5]}))
    with pytest.raises(PretrainedError, match="normalises with mean"):
        describe_pretrained(folder)
    (tmp_path / "custom" / "config.json").write_text(json.dumps(huggingface_config(learn_initial_query=True)))
    with pytest.raises(PretrainedError, match="learn_initial_query=True"):
        describe_pretrained(folder)


def test_build_pretrained_evaluates_a_file_directly(source, tmp_path):
    model, state = source
    path = write_reference(tmp_path / "ref.pth", model, state)
    built, info = build_pretrained(path)
    assert not built.training and built.num_classes == 80 and built.conventions() == IMPORTED
    assert len(built.decoder.layers) == 2 and info.model_name == "rtdetr_r18vd"
    with torch.no_grad():
        predictions = built(torch.randint(0, 256, (1, 3, 90, 160), dtype=torch.uint8))
    assert predictions[0]["boxes"].shape[1] == 4


# ------------------------------------------------------------------------------------------ neoray


def test_neoray_checkpoint_loads_by_exact_name_and_prefers_the_ema(tmp_path):
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", 3)
    weights = randomised(model)
    ema = {k: v + 1 if v.is_floating_point() else v for k, v in weights.items()}
    categories = [{"id": 7, "name": "car", "label": 0}, {"id": 9, "name": "person", "label": 1},
                  {"id": 11, "name": "bus", "label": 2}]
    checkpoint = {"format": "neoray-checkpoint", "version": 1, "model": weights, "ema": ema,
                  "model_name": "rtdetr_cpu", "num_classes": 3, "categories": categories,
                  "config": {"model": {"options": {"num_queries": 20, "backbone_weights": "/somewhere.pth"}}}}
    os.makedirs(tmp_path / "best")
    torch.save(checkpoint, tmp_path / "best" / "checkpoint.pt")
    info = describe_pretrained(tmp_path / "best")
    assert info.format == "neoray" and info.model_name == "rtdetr_cpu" and info.class_names == ["car", "person", "bus"]
    assert info.options == {"num_queries": 20, "input_normalization": "imagenet", "position_order": "xy"}
    target = build_model("rtdetr_cpu", 3, num_queries=20)
    result = load_pretrained(target, tmp_path / "best" / "checkpoint.pt")
    ema["decoder.denoising_class_embed.weight"][3] = 0  # an old checkpoint's padding row is zeroed on load
    assert_all_loaded(target, ema, result)
    assert "denoising padding row set to zero" in result.lines()[0]
    result = load_pretrained(build_model("rtdetr_cpu", 3, num_queries=20), tmp_path / "best", ["car", "person", "bus"])
    assert result.class_rows == {"car": "car", "person": "person", "bus": "bus"}  # every row: its own classes
    assert "classes that kept pretrained rows: car, person, bus (3 of 3)" in result.lines()
    # Another order of the same classes: rows follow the names.
    target = build_model("rtdetr_cpu", 2, num_queries=20)
    result = load_pretrained(target, tmp_path / "best", class_names=["person", "car"])
    assert result.class_rows == {"person": "person", "car": "car"}
    bias = target.decoder.score_heads[1].bias
    assert torch.equal(bias, ema["decoder.score_heads.1.bias"][[1, 0]])


# ------------------------------------------------------------------------------------------ safety


class _RunsCode:
    """Unpickling this calls os.makedirs(marker): what a malicious .pth would do with os.system."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.makedirs, (self.marker,)


def test_a_file_that_would_run_code_is_refused(tmp_path):
    marker = str(tmp_path / "code_ran")
    path = tmp_path / "evil.pth"
    torch.save({"model": {"backbone.conv1.conv1_1.conv.weight": torch.zeros(1)}, "extra": _RunsCode(marker)}, path)
    for load in (read_torch_file, describe_pretrained,
                 lambda p: build_model("rtdetr_cpu", 3, backbone_weights=str(p))):
        with pytest.raises(PretrainedError) as error:
            load(path)
        message = str(error.value)
        assert message.startswith(f"{path}: refused: unpickling it would run code (") and "\n" not in message
        assert message.endswith("neoray loads weights only") and "makedirs" in message
    assert not os.path.exists(marker)
    (tmp_path / "garbage.pth").write_bytes(b"not a torch file")
    with pytest.raises(PretrainedError, match="cannot read it as a torch file"):
        read_torch_file(tmp_path / "garbage.pth")
    torch.save({"weights": [1, 2]}, tmp_path / "other.pth")
    with pytest.raises(PretrainedError, match="not a neoray checkpoint, a reference RT-DETR"):
        describe_pretrained(tmp_path / "other.pth")


# ------------------------------------------------------------------------------------------ backbone files


def test_backbone_weights_from_detector_checkpoints_and_plain_files(source, tmp_path):
    model, state = source
    backbone = {k[len("backbone."):]: v for k, v in state.items() if k.startswith("backbone.")}
    reference = write_reference(tmp_path / "ref.pth", model, state)
    folder = write_huggingface(tmp_path / "hf", model, state)
    torch.save(backbone, tmp_path / "ResNet18_vd_pretrained.pth")  # the reference's ImageNet file layout
    for path in (reference, folder, str(tmp_path / "ResNet18_vd_pretrained.pth")):
        built = build_model("rtdetr_r18vd", 3, **SMALL, backbone_weights=path)
        own = built.backbone.state_dict()
        for key, value in backbone.items():
            if not (path == folder and key.endswith("num_batches_tracked")):
                assert torch.equal(own[key], value), (path, key)
    with pytest.raises(ValueError, match="no tensor matches the resnet18 backbone"):
        build_model("rtdetr_r18", 3, backbone_weights=reference)  # a PResNet checkpoint for a torchvision ResNet


# ------------------------------------------------------------------------------------------ config check


def test_check_model_validates_without_building(monkeypatch, tmp_path):
    def no_build(*args, **kwargs):
        raise AssertionError("check_model built a model")

    monkeypatch.setattr("neoray.models.rtdetr.make_backbone", no_build)
    monkeypatch.setattr("neoray.models.base.Detector.__init__", no_build)
    check_model("rtdetr_r50vd", {"position_order": "yx", "input_normalization": "unit", "max_detections": 10})
    with pytest.raises(ValueError, match=r"unknown model 'rtdetr_tiny' \(did you mean 'rtdetr_"):
        check_model("rtdetr_tiny", {})
    with pytest.raises(ValueError, match=r"rtdetr_r18: unknown option\(s\) \['foo'\]"):
        check_model("rtdetr_r18", {"foo": 1})
    with pytest.raises(ValueError, match="position_order must be one of"):
        check_model("rtdetr_r18", {"position_order": "xz"})
    with pytest.raises(ValueError, match="backbone_weights file not found"):
        check_model("rtdetr_r18", {"backbone_weights": str(tmp_path / "missing.pth")})
    with pytest.raises(ValueError, match=r"loss_weights: unknown key\(s\) \['focal'\]"):
        check_model("rtdetr_r18", {"loss_weights": {"focal": 1.0}})
    with pytest.raises(ValueError, match="unknown backbone 'resnet19'"):
        check_model("rtdetr_r18", {"backbone": "resnet19"})
    torch.save({}, tmp_path / "present.pth")
    check_model("rtdetr_r18", {"backbone_weights": str(tmp_path / "present.pth")})


def test_imagenet_weights_are_read_weights_only_from_the_hub_cache(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr("urllib.request.urlopen", lambda *a, **k: (_ for _ in ()).throw(OSError("no network (test)")))
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    name = os.path.basename(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url)
    torch.manual_seed(4)
    reference = torchvision.models.resnet18()
    torch.save(reference.state_dict(), cache / name)  # what an earlier download left there
    model = build_model("rtdetr_r18", 3, backbone_weights="imagenet")
    torch.testing.assert_close(model.backbone.body.layer2[0].conv1.weight, reference.layer2[0].conv1.weight)
    torch.save({"conv1.weight": torch.zeros(1), "x": _RunsCode(str(tmp_path / "ran"))}, cache / name)
    with pytest.raises(PretrainedError, match="refused: unpickling it would run code"):
        build_model("rtdetr_r18", 3, backbone_weights="imagenet")
    assert not (tmp_path / "ran").exists()
