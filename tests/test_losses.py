"""Losses: paired GIoU, varifocal behaviour, DDP box normalisation, target checks, empty batches."""

import pytest
import torch
import torch.distributed as dist
from torchvision.ops import box_iou, generalized_box_iou

from neoray.models import build_model, check_targets
from neoray.models.box_ops import paired_iou_and_giou
from neoray.models.criterion import RTDETRCriterion
from neoray.models.matcher import HungarianMatcher


def random_xyxy(n: int, generator) -> torch.Tensor:
    xy = torch.rand(n, 2, generator=generator) * 100
    wh = torch.rand(n, 2, generator=generator) * 50 + 1
    return torch.cat([xy, xy + wh], dim=1)


def test_paired_giou_and_iou_equal_torchvision_diagonal():
    generator = torch.Generator().manual_seed(0)
    a, b = random_xyxy(50, generator), random_xyxy(50, generator)
    b[:5] = a[:5]  # identical pairs: IoU = GIoU = 1
    b[5:10] = a[5:10] + 500  # far apart: IoU 0, GIoU negative
    iou, giou = paired_iou_and_giou(a, b)
    torch.testing.assert_close(giou, generalized_box_iou(a, b).diagonal())
    torch.testing.assert_close(iou, box_iou(a, b).diagonal())
    assert (giou[5:10] < 0).all() and torch.allclose(giou[:5], torch.ones(5))


def make_outputs(logits, boxes):
    return {"logits": logits[None], "boxes": boxes[None], "enc_logits": logits, "enc_boxes": boxes}


def test_perfect_predictions_cost_less_than_wrong_ones():
    criterion = RTDETRCriterion(2, HungarianMatcher())
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}
    boxes = torch.tensor([[[0.5, 0.5, 0.2, 0.3], [0.2, 0.2, 0.1, 0.1]]])
    good_logits = torch.tensor([[[-6.0, 6.0], [-6.0, -6.0]]])
    bad_logits = torch.tensor([[[6.0, -6.0], [6.0, 6.0]]])
    good = criterion(make_outputs(good_logits, boxes), [target])
    bad = criterion(make_outputs(bad_logits, boxes), [target])
    assert good["vfl"] < bad["vfl"]
    assert good["bbox"].item() == pytest.approx(0.0, abs=1e-6) and good["giou"].item() == pytest.approx(0.0, abs=1e-6)


def test_weights_scale_the_named_losses():
    target = {"labels": torch.tensor([0]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.3]])}
    logits, boxes = torch.randn(1, 3, 2), torch.rand(1, 3, 4) * 0.3 + 0.2
    base = RTDETRCriterion(2, HungarianMatcher(), {"vfl": 1, "bbox": 1, "giou": 1})(
        make_outputs(logits, boxes), [target]
    )
    weighted = RTDETRCriterion(2, HungarianMatcher(), {"vfl": 3, "bbox": 5, "giou": 0})(
        make_outputs(logits, boxes), [target]
    )
    assert weighted["vfl"].item() == pytest.approx(3 * base["vfl"].item(), rel=1e-5)
    assert weighted["bbox"].item() == pytest.approx(5 * base["bbox"].item(), rel=1e-5)
    assert weighted["giou"].item() == 0.0
    with pytest.raises(ValueError, match="unknown loss 'focal'"):
        RTDETRCriterion(2, HungarianMatcher(), {"focal": 1})


def test_no_objects_still_push_scores_down():
    criterion = RTDETRCriterion(2, HungarianMatcher())
    logits = torch.zeros(1, 4, 2, requires_grad=True)
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    losses = criterion(make_outputs(logits, torch.rand(1, 4, 4) * 0.2 + 0.4), [empty])
    assert all(torch.isfinite(v) for v in losses.values())
    assert losses["vfl"] > 0
    sum(losses.values()).backward()
    assert (logits.grad > 0).all()  # gradient descent lowers every score


def test_losses_are_normalised_by_the_box_count_the_caller_agreed_on():
    criterion = RTDETRCriterion(2, HungarianMatcher())
    torch.manual_seed(0)
    logits, boxes = torch.randn(1, 4, 2), torch.rand(1, 4, 4) * 0.2 + 0.4
    targets = [{"labels": torch.tensor([0, 1, 1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]] * 3)}]
    own = criterion(make_outputs(logits, boxes), targets)  # this batch's 3 boxes
    agreed = criterion(make_outputs(logits, boxes), targets, num_boxes=6.0)  # the mean over the ranks
    for name in own:
        torch.testing.assert_close(agreed[name], own[name] / 2)
    empty = [{"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}]
    assert all(torch.isfinite(v) for v in criterion(make_outputs(logits, boxes), empty).values())  # clamped to 1


def test_the_box_count_is_averaged_over_ddp_workers(monkeypatch):
    from neoray.distributed import mean_over_ranks

    assert mean_over_ranks(3.0) == 3.0

    # Pretend a second worker holds 9 boxes: the all-reduced mean is (3 + 9) / 2.
    def fake_all_reduce(tensor):
        tensor += 9.0

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert mean_over_ranks(3.0) == 6.0


def one_box(label):
    return {"boxes": torch.tensor([[10.0, 10.0, 40.0, 30.0]]), "labels": torch.tensor([label])}


def test_label_out_of_range_is_a_clear_error_before_the_model_runs():
    model = build_model("rtdetr_cpu", num_classes=3)
    images = torch.zeros(2, 3, 90, 160, dtype=torch.uint8)
    with pytest.raises(ValueError) as error:
        model(images, [one_box(1), one_box(7)])
    message = str(error.value)
    assert "targets[1]" in message and "label 7" in message and "num_classes=3" in message
    with pytest.raises(ValueError, match="label -1"):
        check_targets([one_box(-1)], 3, (160, 90))


@pytest.mark.parametrize(
    "boxes, match",
    [
        ([[10.0, 10.0, 5.0, 30.0]], "x2 <= x1"),
        ([[10.0, float("nan"), 20.0, 30.0]], "NaN"),
        ([[10.0, 10.0, 400.0, 30.0]], "outside the 160x90 image"),
    ],
)
def test_bad_boxes_are_rejected(boxes, match):
    with pytest.raises(ValueError, match=match):
        check_targets([{"boxes": torch.tensor(boxes), "labels": torch.tensor([0])}], 3, (160, 90))


def test_extra_target_keys_are_accepted():
    target = dict(one_box(0), iscrowd=torch.tensor([False]), areas=torch.tensor([600.0]), image_id=3)
    check_targets([target], 3, (160, 90))


@pytest.mark.parametrize("name", ["rtdetr_cpu", "rtdetr_r18"])
def test_batch_without_boxes_trains_and_every_parameter_gets_a_gradient(name):
    torch.manual_seed(0)
    model = build_model(name, num_classes=3).train()
    images = torch.randint(0, 256, (2, 3, 90, 160), dtype=torch.uint8)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    losses = model(images, [empty, empty])
    assert set(losses) == {"vfl", "bbox", "giou"}
    assert all(torch.isfinite(v) and v.ndim == 0 for v in losses.values())
    assert losses["vfl"] > 0
    sum(losses.values()).backward()
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, f"parameters without gradient: {missing[:5]}"


def test_mixed_batch_uses_denoising_and_every_parameter():
    torch.manual_seed(0)
    model = build_model("rtdetr_cpu", num_classes=3).train()
    images = torch.randint(0, 256, (2, 3, 90, 160), dtype=torch.uint8)
    empty = {"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64)}
    sum(model(images, [one_box(2), empty]).values()).backward()
    assert model.decoder.denoising_class_embed.weight.grad.abs().sum() > 0
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing
