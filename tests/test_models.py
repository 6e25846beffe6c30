"""The detector interface: registry, sizes (1920x1080 included), token order, weights, torchvision baseline."""

import time

import pytest
import torch

from neoray.models import build_model, list_models
from neoray.models.denoising import make_denoising_queries
from neoray.models.position import make_anchors, sine_position_embedding


def random_images(batch, width, height, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)


def targets_for(width, height):
    return [
        {
            "boxes": torch.tensor(
                [
                    [0.1 * width, 0.2 * height, 0.5 * width, 0.9 * height],
                    [0.6 * width, 0.1 * height, width, 0.4 * height],
                ]
            ),
            "labels": torch.tensor([0, 2]),
            "iscrowd": torch.tensor([False, False]),
            "areas": torch.tensor([1.0, 2.0]),
        },
        {"boxes": torch.tensor([[3.0, 4.0, 0.3 * width, 0.3 * height]]), "labels": torch.tensor([1])},
    ]


def first_conv_weight(model):
    return next(p for p in model.backbone.parameters() if p.ndim == 4)


def assert_valid_predictions(predictions, batch, width, height, max_detections):
    assert len(predictions) == batch
    for p in predictions:
        assert set(p) == {"boxes", "scores", "labels"}
        n = len(p["scores"])
        assert 0 < n <= max_detections and p["boxes"].shape == (n, 4) and p["labels"].shape == (n,)
        boxes = p["boxes"]
        assert torch.isfinite(boxes).all()
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 1] >= 0).all()
        assert (boxes[:, 2] <= width).all() and (boxes[:, 3] <= height).all()
        assert (boxes[:, 2] >= boxes[:, 0]).all() and (boxes[:, 3] >= boxes[:, 1]).all()
        assert ((p["labels"] >= 0) & (p["labels"] < 3)).all()


def test_registry_lists_models_and_rejects_unknown_names_and_options():
    assert {"rtdetr_cpu", "rtdetr_r18", "rtdetr_r34", "rtdetr_r50", "fcos_r50", "retinanet_r50"} <= set(list_models())
    with pytest.raises(ValueError, match="did you mean 'rtdetr_r18'"):
        build_model("rtdetr_r81", 3)
    with pytest.raises(ValueError, match=r"unknown option\(s\) \['num_querys'\]"):
        build_model("rtdetr_cpu", 3, num_querys=10)


@pytest.mark.parametrize(
    "name, size",
    [
        ("rtdetr_cpu", (320, 180)),
        ("rtdetr_cpu", (640, 360)),
        ("rtdetr_r18", (320, 180)),
        pytest.param("rtdetr_r18", (640, 360), marks=pytest.mark.slow),
    ],
)
def test_train_step_reaches_the_backbone_and_eval_boxes_stay_in_the_image(name, size):
    torch.manual_seed(0)
    width, height = size
    model = build_model(name, num_classes=3, num_queries=30, max_detections=20).train()
    assert model.num_classes == 3
    losses = model(random_images(2, width, height), targets_for(width, height))
    assert set(losses) == {"vfl", "bbox", "giou"}
    assert all(torch.isfinite(v) and v.ndim == 0 and v > 0 for v in losses.values())
    sum(losses.values()).backward()
    assert first_conv_weight(model).grad.abs().sum() > 0

    model.eval()
    predictions = model(random_images(2, width, height, seed=1))
    assert_valid_predictions(predictions, 2, width, height, 20)


def test_rtdetr_cpu_full_hd_eval_pads_internally_and_clips_to_the_real_image():
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3).eval()
    with torch.no_grad():
        predictions = model(random_images(1, 1920, 1080))  # 1080 is not a multiple of 32
    assert_valid_predictions(predictions, 1, 1920, 1080, 100)


@pytest.mark.slow  # about 20 s on 2 shared cores
def test_rtdetr_r18_full_hd_eval():
    torch.manual_seed(0)
    model = build_model("rtdetr_r18", num_classes=3, max_detections=50).eval()
    start = time.perf_counter()
    with torch.no_grad():
        predictions = model(random_images(1, 1920, 1080))
    assert_valid_predictions(predictions, 1, 1920, 1080, 50)
    print(f"rtdetr_r18 1920x1080 eval: {time.perf_counter() - start:.1f} s")


def test_predicted_boxes_are_scaled_by_the_padded_size_at_full_hd():
    """1920x1080 is padded to 1920x1088; normalised boxes refer to the padded input, so the centre of the
    padded frame is y = 544, not 540. Scaling by the unpadded height would shift every box."""
    model = build_model("rtdetr_cpu", num_classes=3, max_detections=5).eval()
    queries = 4
    boxes = torch.tensor([0.5, 0.5, 0.1, 0.1]).expand(1, 1, queries, 4)  # (layers, B, Q, cxcywh)
    logits = torch.zeros(1, 1, queries, 3)
    model._run = lambda x, size, denoising=None: {"logits": logits, "boxes": boxes}
    with torch.no_grad():
        prediction = model(random_images(1, 1920, 1080))[0]
    centres = (prediction["boxes"][:, :2] + prediction["boxes"][:, 2:]) / 2
    assert torch.allclose(centres, torch.tensor([960.0, 544.0]).expand_as(centres))
    assert torch.allclose(prediction["boxes"][0, 2:] - prediction["boxes"][0, :2], torch.tensor([192.0, 108.8]))


def test_bad_labels_are_rejected_before_the_images_reach_the_device():
    model = build_model("rtdetr_cpu", num_classes=3).train()

    def device_work(images):
        raise AssertionError("normalize ran before the targets were checked")

    model.normalize = device_work
    with pytest.raises(ValueError, match=r"label 7 is outside \[0, 3\)"):
        model(random_images(1, 160, 90), [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([7])}])


def test_score_threshold_and_max_detections_options():
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3, max_detections=7, score_threshold=0.0).eval()
    images = random_images(1, 160, 90)
    assert len(model(images)[0]["scores"]) == 7
    model.score_threshold = 0.999
    assert len(model(images)[0]["scores"]) == 0


def test_images_must_be_uint8():
    model = build_model("rtdetr_cpu", num_classes=3).eval()
    with pytest.raises(ValueError, match="uint8"):
        model(torch.zeros(1, 3, 90, 160))


def test_position_embedding_follows_flatten_order_on_non_square_maps():
    height, width, dim = 3, 5, 16
    embedding = sine_position_embedding(height, width, dim)
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4) / (dim // 4))
    feature = torch.arange(height * width, dtype=torch.float32).view(1, 1, height, width)
    for token in range(height * width):
        h, w = divmod(token, width)
        assert feature.flatten(2)[0, 0, token] == feature[0, 0, h, w]  # flatten is row-major
        expected = torch.cat([(w * omega).sin(), (w * omega).cos(), (h * omega).sin(), (h * omega).cos()])
        torch.testing.assert_close(embedding[token], expected)


def test_anchors_follow_flatten_order_and_skip_padding():
    shapes = [(4, 6), (2, 3)]
    logits, valid = make_anchors(shapes)
    anchors = logits.sigmoid()[0]
    start = 0
    for level, (height, width) in enumerate(shapes):
        for token in range(height * width):
            h, w = divmod(token, width)
            cx, cy, bw, bh = anchors[start + token].tolist()
            assert cx == pytest.approx((w + 0.5) / width, abs=1e-5) and cy == pytest.approx(
                (h + 0.5) / height, abs=1e-5
            )
            assert bw == pytest.approx(0.05 * 2**level, abs=1e-5)
        start += height * width
    # Real image = the top 70% of the padded height: anchors centred below it are invalid.
    _, valid = make_anchors(shapes, valid_fraction=(1.0, 0.7))
    centres_y = anchors[:, 1]
    assert not valid[0, centres_y >= 0.7, 0].any() and valid[0, centres_y < 0.7, 0].any()


def test_denoising_mask_separates_groups_and_hides_them_from_matching_queries():
    torch.manual_seed(0)
    embed = torch.nn.Embedding(4, 8)
    targets = [
        {"labels": torch.tensor([0, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2], [0.3, 0.3, 0.1, 0.2]])},
        {"labels": torch.tensor([2]), "boxes": torch.tensor([[0.6, 0.4, 0.3, 0.3]])},
    ]
    dn = make_denoising_queries(targets, num_queries=5, label_embed=embed, num_denoising=4)  # 4 copies per object
    per_group = 4  # 2 positives + 2 negatives (the most objects in one image is 2)
    assert dn.groups == 2 and dn.count == 8 and dn.content.shape == (2, 8, 8) and dn.attn_mask.shape == (13, 13)
    mask = dn.attn_mask
    assert mask[8:, :8].all() and not mask[8:, 8:].any()  # matching queries never see denoising ones
    assert not mask[:4, :4].any() and mask[:4, 4:8].all() and mask[4:8, :4].all()  # groups apart
    assert not mask[:8, 8:].any()  # denoising queries may look at matching queries
    query_idx, target_idx = dn.matches[0]
    assert query_idx.tolist() == [0, 1, per_group, per_group + 1] and target_idx.tolist() == [0, 1, 0, 1]
    # Positives stay within half a box of the object; negatives are pushed further away.
    positive = dn.reference_logits.sigmoid()[0, :2]
    assert (positive[:, :2] - targets[0]["boxes"][:, :2]).abs().max() <= 0.2
    assert (
        make_denoising_queries([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}], 5, embed)
        is None
    )


def test_backbone_weights_from_a_local_state_dict_file(tmp_path):
    import torchvision

    torch.manual_seed(1)
    reference = torchvision.models.resnet18()  # a torchvision classification state dict, fc included
    path = tmp_path / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    model = build_model("rtdetr_r18", num_classes=3, backbone_weights=str(path))
    torch.testing.assert_close(model.backbone.body.layer3[1].conv2.weight, reference.layer3[1].conv2.weight)
    torch.testing.assert_close(model.backbone.body.bn1.running_var, reference.bn1.running_var)


def test_backbone_weights_from_a_full_checkpoint_of_another_model(tmp_path):
    torch.manual_seed(2)
    donor = build_model("rtdetr_cpu", num_classes=7)  # other class count: only the backbone is taken
    path = tmp_path / "checkpoint.pt"
    torch.save(
        {"format": "neoray-checkpoint", "model": {f"module.{k}": v for k, v in donor.state_dict().items()}, "epoch": 1},
        path,
    )
    torch.manual_seed(3)
    model = build_model("rtdetr_cpu", num_classes=3, backbone_weights=str(path))
    donor_conv = donor.backbone.body["0"][0].weight
    assert not torch.equal(build_model("rtdetr_cpu", 3).backbone.body["0"][0].weight, donor_conv)
    torch.testing.assert_close(model.backbone.body["0"][0].weight, donor_conv)
    torch.testing.assert_close(
        model.backbone.body["11"].block[0][0].weight, donor.backbone.body["11"].block[0][0].weight
    )


def test_backbone_weights_errors(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="weights file not found"):
        build_model("rtdetr_cpu", 3, backbone_weights=str(tmp_path / "nope.pth"))
    path = tmp_path / "unrelated.pt"
    torch.save({"head.weight": torch.zeros(2, 2)}, path)
    with pytest.raises(ValueError, match="no tensor matches the mobilenet_v3_small backbone"):
        build_model("rtdetr_cpu", 3, backbone_weights=str(path))
    # No network here (and an empty cache): "imagenet" must fail with one clear line.
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    monkeypatch.setattr("urllib.request.urlopen", _no_network)
    with pytest.raises(RuntimeError, match="could not download ImageNet weights for mobilenet_v3_small") as error:
        build_model("rtdetr_cpu", 3, backbone_weights="imagenet")
    assert "\n" not in str(error.value) and "backbone_weights=" in str(error.value)


def _no_network(*args, **kwargs):
    raise OSError("network is unreachable (test)")


@pytest.mark.slow  # ResNet-50 FPN forward+backward: about 30 s on 2 shared cores
def test_fcos_baseline_interface():
    torch.manual_seed(0)
    width, height = 160, 90  # not a multiple of 32: padded by the transform, never resized
    model = build_model("fcos_r50", num_classes=3, max_detections=10).train()
    assert model.num_classes == 3 and isinstance(model.backbone, torch.nn.Module)
    assert sum(1 for k in model.state_dict() if k.startswith("backbone.")) == 0  # one copy, under detector.
    batch, _ = model.detector.transform(list(model.normalize(random_images(2, width, height))))
    assert batch.image_sizes == [(height, width)] * 2 and batch.tensors.shape[-2:] == (96, 160)
    targets = targets_for(width, height)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(random_images(2, width, height), [targets[0], empty])
    assert set(losses) == {"classification", "bbox_regression", "bbox_ctrness"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert first_conv_weight(model).grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
    with pytest.raises(ValueError, match="label 3"):
        model(
            random_images(1, width, height),
            [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([3])}],
        )
    model.eval()
    assert_valid_predictions(model(random_images(2, width, height)), 2, width, height, 10)
    model.max_detections = 3  # limits changed after build apply, as for RT-DETR
    assert all(len(p["scores"]) <= 3 for p in model(random_images(2, width, height)))
    model.score_threshold = 1.0
    assert all(len(p["scores"]) == 0 for p in model(random_images(2, width, height)))


def test_bf16_autocast_trains_and_predicts_in_float32():
    """The AMP path (bf16 on GPUs; checkable on CPU): finite losses, gradients, float32 outputs."""
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3).train()
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    with torch.autocast("cpu", dtype=torch.bfloat16):
        losses = model(random_images(2, 320, 180), [targets_for(320, 180)[0], empty])
    assert all(torch.isfinite(v) and v.dtype == torch.float32 for v in losses.values())
    sum(losses.values()).backward()
    assert first_conv_weight(model).grad.abs().sum() > 0
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(random_images(2, 320, 180))
    assert outputs[0]["boxes"].dtype == torch.float32 and outputs[0]["scores"].dtype == torch.float32
    assert_valid_predictions(outputs, 2, 320, 180, 100)


# --- faithful training: what the reference RT-DETR (lyuwenyu/RT-DETR rtdetr_pytorch) does -------------


def _train_step(look_forward_twice: bool):
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3, look_forward_twice=look_forward_twice).train()
    torch.manual_seed(1)  # the same denoising noise in both runs
    losses = model(random_images(2, 320, 180), targets_for(320, 180))
    sum(losses.values()).backward()
    return losses, {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_look_forward_twice_changes_the_gradients_not_the_forward():
    with_lft, grads = _train_step(True)
    without, plain = _train_step(False)
    for name in with_lft:  # the same boxes, so the same matches and the same losses, bit for bit
        assert torch.equal(with_lft[name], without[name]), name
    # Layer 0's box head now also learns from layer 1's box loss; the last head's own gradient is the same.
    assert not torch.allclose(
        grads["decoder.bbox_heads.0.layers.2.weight"], plain["decoder.bbox_heads.0.layers.2.weight"]
    )
    torch.testing.assert_close(
        grads["decoder.bbox_heads.1.layers.2.weight"], plain["decoder.bbox_heads.1.layers.2.weight"]
    )
    torch.testing.assert_close(grads["decoder.score_heads.1.weight"], plain["decoder.score_heads.1.weight"])


def test_decoder_initialisation_follows_the_reference():
    torch.manual_seed(0)
    decoder = build_model("rtdetr_r18", num_classes=3).decoder
    for layer in (decoder.query_pos_head.layers[0], decoder.query_pos_head.layers[1], decoder.enc_output[0]):
        fan_out, fan_in = layer.weight.shape
        bound = (6.0 / (fan_in + fan_out)) ** 0.5  # xavier-uniform
        assert layer.weight.abs().max() <= bound
        assert layer.weight.std().item() == pytest.approx(bound / 3**0.5, rel=0.1)
    # query_pos_head.layers.0 reads 4 box coordinates: PyTorch's default would be 4.6x wider here.
    assert decoder.query_pos_head.layers[0].weight.std() < 0.07
    prior = -torch.log(torch.tensor(99.0))
    for head in (decoder.enc_score_head, *decoder.score_heads):
        torch.testing.assert_close(head.bias, prior.expand_as(head.bias))
    assert all(head.layers[-1].weight.abs().sum() == 0 for head in (decoder.enc_bbox_head, *decoder.bbox_heads))


def test_cpu_preset_keeps_pytorch_initialisation_of_the_query_heads():
    # Measured on the synthetic data (see registry.py): the small CPU model trains faster without the
    # reference's xavier init; reference_init=True gives it back.
    torch.manual_seed(0)
    cpu = build_model("rtdetr_cpu", num_classes=3).decoder.query_pos_head.layers[0]
    fan_out, fan_in = cpu.weight.shape
    assert cpu.weight.abs().max() > (6.0 / (fan_in + fan_out)) ** 0.5  # beyond xavier's bound: PyTorch's default
    faithful = build_model("rtdetr_cpu", num_classes=3, reference_init=True).decoder.query_pos_head.layers[0]
    assert faithful.weight.abs().max() <= (6.0 / (fan_in + fan_out)) ** 0.5


def test_denoising_padding_row_is_zero_and_never_trained():
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3).train()
    embed = model.decoder.denoising_class_embed
    assert embed.padding_idx == 3 and embed.weight[3].abs().sum() == 0
    # Image 1 has fewer objects than image 0, so its denoising slots are padded with row 3.
    sum(model(random_images(2, 320, 180), targets_for(320, 180)).values()).backward()
    assert embed.weight.grad[3].abs().sum() == 0 and embed.weight.grad[:3].abs().sum() > 0


def test_decoder_layer_clamps_to_the_float16_range_before_its_last_norm():
    from neoray.models.decoder import DecoderLayer

    layer = DecoderLayer(dim=16, heads=2, ffn_dim=32, levels=1, points=2).eval()
    with torch.no_grad():
        layer.ffn[3].bias.fill_(1e6)  # an FFN output far outside float16
    seen = []
    layer.norm3.register_forward_pre_hook(lambda module, args: seen.append(args[0].abs().max().item()))
    memory = torch.randn(1, 16, 16)
    out = layer(torch.randn(1, 3, 16), torch.zeros(1, 3, 16), torch.full((1, 3, 4), 0.5), memory, [(4, 4)])
    assert seen == [65504.0] and torch.isfinite(out).all()


def test_yx_position_order_is_the_reference_embedding_on_square_grids():
    # The reference (and Hugging Face) build their grid as (W, H) with "ij" indexing and flatten it: on an
    # n x n map, token t gets the pair (t // n, t % n), and puts the first of the pair in the first half
    # of the channels. Since the map flattens row by row, t // n is the row: rows first, columns second.
    n, dim = 4, 16
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 4) / (dim // 4))
    reference = []
    for token in range(n * n):
        first, second = token // n, token % n
        reference.append(
            torch.cat([(first * omega).sin(), (first * omega).cos(), (second * omega).sin(), (second * omega).cos()])
        )
    torch.testing.assert_close(sine_position_embedding(n, n, dim, order="yx"), torch.stack(reference))
    assert not torch.allclose(sine_position_embedding(n, n, dim, order="xy"), torch.stack(reference))
    # On a 16:9-like map "yx" is the same convention kept consistent: row halves first, column halves second.
    wide_xy, wide_yx = sine_position_embedding(3, 5, dim), sine_position_embedding(3, 5, dim, order="yx")
    torch.testing.assert_close(wide_yx, torch.cat([wide_xy[:, dim // 2:], wide_xy[:, :dim // 2]], dim=1))
    model = build_model("rtdetr_cpu", 3, position_order="yx")
    assert model.encoder.position_order == "yx" and model.conventions()["position_order"] == "yx"


def test_unit_normalisation_scales_to_0_1_and_pads_with_the_mean_colour():
    images = random_images(1, 100, 60)  # padded to 128x64
    unit = build_model("rtdetr_cpu", 3, input_normalization="unit")
    imagenet = build_model("rtdetr_cpu", 3)
    x = unit.normalize(images)
    assert torch.equal(x, images.float() / 255)  # exactly what ToTensor() gives the reference
    padded = unit.pad(x)
    assert padded.shape[-2:] == (64, 128) and torch.equal(padded[..., :60, :100], x)
    torch.testing.assert_close(padded[0, :, 63, 127], torch.tensor([0.485, 0.456, 0.406]))
    assert imagenet.pad(imagenet.normalize(images))[..., 60:, :].abs().max() == 0  # the mean colour there
    with pytest.raises(ValueError, match="input_normalization must be one of"):
        build_model("rtdetr_cpu", 3, input_normalization="zero_one")
    with torch.no_grad():
        assert len(unit.eval()(images)[0]["scores"]) > 0
