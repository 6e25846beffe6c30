"""ResNet-vd backbones (the reference RT-DETR's PResNet): names, shapes and strides at 16:9 sizes,
frozen BatchNorm and frozen stem, and the rtdetr_r*vd presets."""

import pytest
import torch

from neoray.models import build_model, list_models
from neoray.models.norm import FrozenBatchNorm2d
from neoray.models.presnet import PResNet


def images(width, height, batch=1, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)


def test_state_dict_keys_are_the_reference_presnet_names():
    # Literal names as lyuwenyu/RT-DETR's presnet.py builds them (3-conv stem conv1.conv1_1..3, stages
    # res_layers.i.blocks.j with branch2a/2b(/2c), and a projection "short" in the first block of a stage:
    # a plain ConvNormLayer in the first stage, an average pool + ConvNormLayer in the later ones).
    keys = PResNet("presnet18vd").state_dict()
    expected_shapes = {
        "conv1.conv1_1.conv.weight": (32, 3, 3, 3),
        "conv1.conv1_2.conv.weight": (32, 32, 3, 3),
        "conv1.conv1_3.norm.running_var": (64,),
        "res_layers.0.blocks.0.short.conv.weight": (64, 64, 1, 1),  # ResNet-18: projected although 64 -> 64
        "res_layers.1.blocks.0.short.conv.conv.weight": (128, 64, 1, 1),  # after the 2x2 average pool
        "res_layers.1.blocks.0.branch2a.conv.weight": (128, 64, 3, 3),
        "res_layers.3.blocks.1.branch2b.norm.weight": (512,),
    }
    for key, shape in expected_shapes.items():
        assert tuple(keys[key].shape) == shape, key
    assert not any("branch2c" in k for k in keys)
    assert "res_layers.1.blocks.1.short.conv.weight" not in keys  # only first blocks project
    r50 = PResNet("presnet50vd").state_dict()
    assert tuple(r50["res_layers.0.blocks.0.short.conv.weight"].shape) == (256, 64, 1, 1)
    assert tuple(r50["res_layers.2.blocks.5.branch2c.conv.weight"].shape) == (1024, 256, 1, 1)
    assert tuple(r50["res_layers.2.blocks.0.branch2b.conv.weight"].shape) == (256, 256, 3, 3)  # stride here


@pytest.mark.parametrize("arch, size, channels", [
    ("presnet18vd", (960, 544), [128, 256, 512]),  # 960x540 padded by the detector (1920x1080: below)
    ("presnet34vd", (640, 352), [128, 256, 512]),
    ("presnet50vd", (640, 352), [512, 1024, 2048]),
    ("presnet101vd", (320, 192), [512, 1024, 2048]),
])
def test_vd_backbones_return_stride_8_16_32_maps_at_16_9(arch, size, channels):
    width, height = size
    backbone = PResNet(arch).eval()
    assert backbone.out_channels == channels
    with torch.no_grad():
        maps = backbone(torch.randn(1, 3, height, width))
    assert [m.shape[1] for m in maps] == channels
    assert [(m.shape[-1], m.shape[-2]) for m in maps] == [(width // s, height // s) for s in (8, 16, 32)]


def test_rtdetr_r18vd_predicts_at_full_hd():
    torch.manual_seed(0)
    model = build_model("rtdetr_r18vd", num_classes=3, max_detections=20).eval()
    with torch.no_grad():
        features = model.backbone(model.pad(model.normalize(images(1920, 1080))))
        predictions = model(images(1920, 1080))
    assert [(f.shape[-1], f.shape[-2]) for f in features] == [(240, 136), (120, 68), (60, 34)]
    boxes = predictions[0]["boxes"]
    assert len(boxes) == 20 and torch.isfinite(boxes).all()
    assert (boxes[:, 2] <= 1920).all() and (boxes[:, 3] <= 1080).all() and (boxes[:, :2] >= 0).all()


def test_presets_follow_the_reference_configs():
    assert {"rtdetr_r18vd", "rtdetr_r34vd", "rtdetr_r50vd", "rtdetr_r101vd"} <= set(list_models())
    r18 = build_model("rtdetr_r18vd", 80)
    assert len(r18.decoder.layers) == 3 and r18.decoder.num_queries == 300
    assert r18.encoder.top_down[0].shortcut[0].out_channels == 128  # expansion 0.5 of 256
    assert not any(isinstance(m, FrozenBatchNorm2d) for m in r18.backbone.modules())  # r18/r34 train their norms
    assert all(p.requires_grad for p in r18.backbone.parameters())
    r50 = build_model("rtdetr_r50vd", 80)
    assert len(r50.decoder.layers) == 6 and r50.encoder.top_down[0].shortcut[0].out_channels == 256
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in r50.backbone.modules())  # all frozen
    assert not any(p.requires_grad for p in r50.backbone.conv1.parameters())  # freeze_at=0: the stem
    assert all(p.requires_grad for p in r50.backbone.res_layers.parameters())
    # r101vd: a 384-wide encoder with a 2048 FFN feeding a 256-wide decoder (checked on the classes, no build)
    from neoray.models.registry import PRESETS

    assert PRESETS["rtdetr_r101vd"][1]["encoder_dim"] == 384 and PRESETS["rtdetr_r101vd"][1]["encoder_ffn_dim"] == 2048


def test_frozen_norm_and_stem_do_not_train():
    torch.manual_seed(0)
    backbone = PResNet("presnet18vd", freeze_norm=True, freeze_at=1)
    norms = [m for m in backbone.modules() if isinstance(m, FrozenBatchNorm2d)]
    assert norms and not any(isinstance(m, torch.nn.BatchNorm2d) for m in backbone.modules())
    with torch.no_grad():  # non-trivial statistics, so that "uses the running statistics" means something
        for norm in norms:
            norm.running_mean.normal_(0, 0.5)
            norm.running_var.uniform_(0.5, 2.0)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    x = torch.randn(2, 3, 64, 96)
    backbone.train()
    out_train = backbone(x)
    sum(o.sum() for o in out_train).backward()
    backbone.eval()
    with torch.no_grad():
        out_eval = backbone(x)
    for a, b in zip(out_train, out_eval):  # train mode normalises with the stored statistics too
        torch.testing.assert_close(a.detach(), b)
    for key, value in backbone.state_dict().items():  # nothing moved, statistics included
        assert torch.equal(value, before[key]), key
    assert all(p.grad is None and not p.requires_grad for p in backbone.conv1.parameters())
    assert all(p.grad is None for p in backbone.res_layers[0].parameters())  # freeze_at=1: stem + stage 1
    assert all(p.grad is not None for p in backbone.res_layers[1].parameters())
    assert not any(k.endswith("num_batches_tracked") for k in backbone.state_dict())
    # A BatchNorm state dict (with its step counters) loads into the frozen layers.
    plain = PResNet("presnet18vd").state_dict()
    result = PResNet("presnet18vd", freeze_norm=True).load_state_dict(plain, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_torchvision_backbones_take_the_same_options():
    model = build_model("rtdetr_r18", 3, freeze_norm=True, freeze_at=0)
    body = model.backbone.body
    assert isinstance(body.bn1, FrozenBatchNorm2d) and isinstance(body.layer1[0].bn1, FrozenBatchNorm2d)
    assert not body.conv1.weight.requires_grad and body.layer1[0].conv1.weight.requires_grad
    with pytest.raises(ValueError, match="freeze_at"):
        build_model("rtdetr_cpu", 3, freeze_at=2)  # MobileNetV3 has a stem but no stages to count
