"""The small plain-convolution ResNet for CPUs (backbone ``tiny_resnet``): strides and channels at 16:9
sizes, freezing, weights from a file of its own, a clear error for ImageNet weights, and the detector
training with it through the registry and the config's ``model.options``."""

import pytest
import torch
from torch import nn

from neoray.models import build_model, check_model
from neoray.models.backbone import backbone_names, make_backbone
from neoray.models.norm import FrozenBatchNorm2d
from neoray.models.tiny_resnet import TinyResNet


@pytest.mark.parametrize("width, height", [(320, 180), (640, 360), (64, 36)])
def test_returns_stride_8_16_32_maps_at_16_9(width, height):
    backbone = TinyResNet().eval()
    assert backbone.out_channels == [64, 128, 256]
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, height, width))
    assert [m.shape[1] for m in maps] == [64, 128, 256]
    # stride-2 3x3 convolutions with padding 1 round up: ceil(size / stride) at every level
    assert [(m.shape[-1], m.shape[-2]) for m in maps] == [(-(-width // s), -(-height // s)) for s in (8, 16, 32)]


def test_has_no_depthwise_or_grouped_convolution():
    # The reason it exists: dense 3x3 convolutions, which CPUs run at a far higher arithmetic rate.
    convs = [m for m in TinyResNet().modules() if isinstance(m, nn.Conv2d)]
    assert convs and all(c.groups == 1 for c in convs)


def test_is_listed_and_built_by_name():
    assert "tiny_resnet" in backbone_names()
    assert isinstance(make_backbone("tiny_resnet"), TinyResNet)
    with pytest.raises(ValueError, match="unknown backbone 'tiny_resnet_xl'"):
        TinyResNet("tiny_resnet_xl")


def test_imagenet_weights_are_refused_in_one_line():
    # at config time, before Ray starts (neoray train checks the model options with check_model) ...
    with pytest.raises(ValueError, match="rtdetr_cpu: tiny_resnet has no ImageNet weights"):
        check_model("rtdetr_cpu", {"backbone": "tiny_resnet", "backbone_weights": "imagenet"})
    # ... and when the model is built
    with pytest.raises(ValueError, match="tiny_resnet has no ImageNet weights") as error:
        build_model("rtdetr_cpu", 3, backbone="tiny_resnet", backbone_weights="imagenet")
    assert "\n" not in str(error.value)


def test_freeze_at_and_freeze_norm():
    stem_only = TinyResNet(freeze_at=0)
    assert not any(p.requires_grad for p in stem_only.stem.parameters())
    assert all(p.requires_grad for p in stem_only.stages.parameters())
    two = TinyResNet(freeze_at=2)
    assert not any(p.requires_grad for p in two.stages[1].parameters())
    assert all(p.requires_grad for p in two.stages[2].parameters())
    with pytest.raises(ValueError, match="freeze_at must be in"):
        TinyResNet(freeze_at=4)
    frozen = TinyResNet(freeze_norm=True)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in frozen.modules())
    assert any(isinstance(m, FrozenBatchNorm2d) for m in frozen.modules())


def test_weights_from_a_checkpoint_of_its_own(tmp_path):
    torch.manual_seed(5)
    donor = build_model("rtdetr_cpu", num_classes=2, backbone="tiny_resnet")
    path = tmp_path / "donor.pt"
    torch.save({"format": "neoray-checkpoint", "model": donor.state_dict(), "epoch": 3}, path)
    torch.manual_seed(6)
    model = build_model("rtdetr_cpu", num_classes=4, backbone="tiny_resnet", backbone_weights=str(path))
    fresh = build_model("rtdetr_cpu", num_classes=4, backbone="tiny_resnet")
    weight = "stages.2.blocks.1.branch2b.conv.weight"
    assert not torch.equal(fresh.backbone.state_dict()[weight], donor.backbone.state_dict()[weight])
    torch.testing.assert_close(model.backbone.state_dict()[weight], donor.backbone.state_dict()[weight])
    assert model.backbone.loaded_tensors == len(donor.backbone.state_dict())


def test_detector_trains_and_predicts_with_it():
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3, backbone="tiny_resnet", max_detections=10).train()
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (2, 3, 180, 320), dtype=torch.uint8, generator=generator)
    boxes = torch.tensor([[10.0, 20.0, 60.0, 70.0], [100.0, 40.0, 130.0, 90.0]])
    targets = [{"boxes": boxes, "labels": torch.tensor([0, 2])}, {"boxes": boxes[:1], "labels": torch.tensor([1])}]
    losses = model(images, targets)
    assert all(torch.isfinite(v) and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert model.backbone.stem.conv1.conv.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        predictions = model(images)
    assert len(predictions) == 2 and all(len(p["boxes"]) <= 10 for p in predictions)
