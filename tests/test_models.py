"""The detector interface: registry, sizes (1920x1080 included), token order, weights, torchvision baseline."""

import time

import pytest
import torch

from neoray.models import build_model, list_models, load_matching_state_dict
from neoray.models.denoising import make_denoising_queries
from neoray.models.position import make_anchors, sine_position_embedding


def random_images(batch, width, height, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator)


def targets_for(width, height):
    return [
        {
            "boxes": torch.tensor([[0.1 * width, 0.2 * height, 0.5 * width, 0.9 * height], [0.6 * width, 0.1 * height, width, 0.4 * height]]),
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
            assert cx == pytest.approx((w + 0.5) / width, abs=1e-5) and cy == pytest.approx((h + 0.5) / height, abs=1e-5)
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
    assert make_denoising_queries([{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}], 5, embed) is None


def test_load_matching_state_dict_skips_the_class_heads_of_another_class_count():
    torch.manual_seed(0)
    source = build_model("rtdetr_cpu", num_classes=5)
    target = build_model("rtdetr_cpu", num_classes=3)
    checkpoint = {"model": source.state_dict(), "epoch": 3}
    loaded, skipped = load_matching_state_dict(target, checkpoint)
    reasons = dict(skipped)
    assert reasons["decoder.enc_score_head.weight"] == "shape (5, 64) vs (3, 64)"
    assert reasons["decoder.score_heads.0.bias"] == "shape (5,) vs (3,)"
    assert "decoder.denoising_class_embed.weight" in reasons
    assert all("score_head" in k or "denoising" in k for k in reasons)
    assert "backbone.body.0.0.weight" in loaded and "encoder.aifi.attn.in_proj_weight" in loaded
    state = target.state_dict()
    torch.testing.assert_close(state["encoder.aifi.attn.in_proj_weight"], source.state_dict()["encoder.aifi.attn.in_proj_weight"])
    torch.testing.assert_close(state["backbone.body.0.0.weight"], source.state_dict()["backbone.body.0.0.weight"])

    missing_checkpoint = {k: v for k, v in source.state_dict().items() if not k.startswith("encoder.aifi")}
    _, skipped = load_matching_state_dict(target, missing_checkpoint)
    assert ("encoder.aifi.norm1.weight", "missing") in skipped


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
    torch.save({"format": "neoray-checkpoint", "model": {f"module.{k}": v for k, v in donor.state_dict().items()}, "epoch": 1}, path)
    torch.manual_seed(3)
    model = build_model("rtdetr_cpu", num_classes=3, backbone_weights=str(path))
    donor_conv = donor.backbone.body["0"][0].weight
    assert not torch.equal(build_model("rtdetr_cpu", 3).backbone.body["0"][0].weight, donor_conv)
    torch.testing.assert_close(model.backbone.body["0"][0].weight, donor_conv)
    torch.testing.assert_close(model.backbone.body["11"].block[0][0].weight, donor.backbone.body["11"].block[0][0].weight)


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
        model(random_images(1, width, height), [{"boxes": torch.tensor([[1.0, 1.0, 9.0, 9.0]]), "labels": torch.tensor([3])}])
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
