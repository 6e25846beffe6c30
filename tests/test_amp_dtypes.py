"""Under bf16 autocast the decoder keeps its geometry in float32, as the reference RT-DETR does: anchors,
proposals, reference boxes and deformable attention's sampling grid (bf16 is off by up to about 4 px at
1920 wide). CPU autocast stands in for CUDA's here: both leave a float32 + bf16 sum in float32."""

from __future__ import annotations

import pytest
import torch

from neoray.models import build_model
from neoray.models import deformable_attention as attention_module


def _batch(width: int, height: int, count: int = 2):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)
    targets = []
    for _ in range(count):
        xy = torch.rand(3, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
        boxes = torch.cat([xy, xy + torch.tensor([width * 0.2, height * 0.2])], dim=1)
        targets.append({"boxes": boxes, "labels": torch.tensor([0, 1, 2])})
    return images, targets


@pytest.fixture
def sampled_grids(monkeypatch):
    """The dtype of every sampling grid (locations) and value map that deformable attention reads."""
    seen = []
    original = attention_module.deformable_sampling

    def recording(value, shapes, locations, weights):
        seen.append((locations.dtype, value.dtype))
        return original(value, shapes, locations, weights)

    monkeypatch.setattr(attention_module, "deformable_sampling", recording)
    return seen


@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_sampling_grids_and_boxes_stay_float32_under_bf16_autocast(sampled_grids, training):
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3, num_queries=20, max_detections=10).train(training)
    images, targets = _batch(320, 180)
    decoder_outputs = []
    model.decoder.register_forward_hook(lambda module, args, out: decoder_outputs.append(out))
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.set_grad_enabled(training):
        model(images, targets) if training else model(images)
    layers = len(model.decoder.layers)
    assert len(sampled_grids) == layers, "one deformable cross-attention per decoder layer"
    assert all(grid == torch.float32 for grid, _ in sampled_grids), sampled_grids
    assert any(value == torch.bfloat16 for _, value in sampled_grids), "autocast did not run the value projection"
    out = decoder_outputs[0]
    # The proposals are anchors + a head's offset; every layer's boxes refine float32 references.
    assert out["enc_boxes"].dtype == torch.float32 and out["boxes"].dtype == torch.float32
    if training:
        assert out["dn_boxes"].dtype == torch.float32
    assert out["logits"].dtype == torch.bfloat16  # the heads themselves still run in bf16

