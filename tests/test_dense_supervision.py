"""The training levers for few images of many small objects: DEIM's matchability-aware classification loss
(``cls_loss="mal"``) and one-to-many supervision of the encoder's proposals (``dense_o2m``), on hand-made
predictions whose answers are known."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from neoray.models import build_model
from neoray.models.criterion import RTDETRCriterion
from neoray.models.dense_assign import assign_one_to_many
from neoray.models.matcher import HungarianMatcher


def _one_match(cls_loss: str):
    """One query matched to one object at IoU 0.25 (a box half the object's size), one background query."""
    criterion = RTDETRCriterion(2, HungarianMatcher(), cls_loss=cls_loss)
    target = {"labels": torch.tensor([1]), "boxes": torch.tensor([[0.5, 0.5, 0.2, 0.2]])}
    boxes = torch.tensor([[[0.5, 0.5, 0.1, 0.1], [0.1, 0.1, 0.05, 0.05]]])
    logits = torch.tensor([[[-2.0, 0.5], [-1.0, -3.0]]])
    matches = [(torch.tensor([0]), torch.tensor([0]))]
    return criterion, logits, boxes, target, matches


def _bce(logit: float, target: float, weight: float) -> float:
    p = 1 / (1 + math.exp(-logit))
    return -weight * (target * math.log(p) + (1 - target) * math.log(1 - p))


@pytest.mark.parametrize("cls_loss", ["vfl", "mal"])
def test_the_classification_loss_follows_its_formula(cls_loss):
    criterion, logits, boxes, target, matches = _one_match(cls_loss)
    loss = criterion.varifocal(logits, boxes, [target], matches, num_boxes=1.0)
    iou = 0.25
    positive = (_bce(0.5, iou, iou) if cls_loss == "vfl"
                else _bce(0.5, iou ** criterion.mal_gamma, 1.0))  # MAL: target IoU^gamma, weight 1
    power = criterion.gamma if cls_loss == "vfl" else criterion.mal_gamma
    negatives = sum(_bce(x, 0.0, criterion.alpha * (1 / (1 + math.exp(-x))) ** power) for x in (-2.0, -1.0, -3.0))
    assert float(loss) == pytest.approx(positive + negatives, rel=1e-5)


def test_mal_gives_a_poor_match_a_stronger_push_than_vfl():
    """VFL weights a positive by its IoU, so an early, badly placed match that scores low barely learns to
    score (here p = 0.05 against a target of 0.25 or 0.125): MAL's weight of 1 pushes it up harder."""
    grads = {}
    for cls_loss in ("vfl", "mal"):
        criterion, logits, boxes, target, matches = _one_match(cls_loss)
        logits = logits.clone()
        logits[0, 0, 1] = -3.0
        logits.requires_grad_(True)
        criterion.varifocal(logits, boxes, [target], matches, num_boxes=1.0).backward()
        grads[cls_loss] = float(logits.grad[0, 0, 1])
    assert grads["mal"] < grads["vfl"] < 0  # both raise the matched class's score; MAL by more


def _grid_tokens(width: int = 8, height: int = 4):
    """Tokens of one level: anchor centres on a width x height grid over the unit square."""
    ys, xs = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    centres = torch.stack([(xs.flatten() + 0.5) / width, (ys.flatten() + 0.5) / height], dim=1)
    return centres, torch.zeros(len(centres), dtype=torch.int64), torch.ones(len(centres), dtype=torch.bool)


def test_each_object_gets_k_positives_among_the_tokens_nearest_its_centre():
    centres, levels, valid = _grid_tokens()
    objects = torch.tensor([[0.1, 0.2], [0.8, 0.7]])
    cost = torch.cdist(centres, objects)  # cheaper the nearer: the k nearest candidates win
    tokens, owners = assign_one_to_many(cost, centres, levels, valid, objects, k=3, per_level=5)
    for obj in range(2):
        mine = tokens[owners == obj]
        assert len(mine) == 3
        nearest = torch.cdist(centres, objects[obj:obj + 1]).squeeze(1).argsort()[:3]
        assert set(mine.tolist()) == set(nearest.tolist())


def test_a_token_wanted_by_two_objects_goes_to_the_one_it_costs_least():
    centres, levels, valid = _grid_tokens()
    objects = torch.tensor([[0.5, 0.5], [0.5, 0.5]])  # the same place: every candidate is contested
    cost = torch.cdist(centres, objects)
    cost[:, 1] += 0.01  # object 1 is a little dearer everywhere
    tokens, owners = assign_one_to_many(cost, centres, levels, valid, objects, k=2, per_level=4)
    assert len(tokens.unique()) == len(tokens)  # no token twice
    assert set(owners.tolist()) == {0} and len(tokens) == 2


def test_invalid_tokens_are_never_positives_and_a_tiny_object_still_gets_its_share():
    centres, levels, valid = _grid_tokens()
    valid[0] = False  # the token right on the object's centre lies in the padding
    objects = torch.tensor([[0.0625, 0.125]])  # tiny object at token 0's centre
    cost = torch.cdist(centres, objects)
    tokens, _ = assign_one_to_many(cost, centres, levels, valid, objects, k=4, per_level=6)
    assert 0 not in tokens.tolist() and len(tokens) == 4


def test_dense_supervision_adds_its_losses_and_trains_the_query_selection_head():
    torch.manual_seed(0)
    images = torch.randint(0, 255, (2, 3, 90, 160), dtype=torch.uint8)
    targets = [{"boxes": torch.tensor([[10.0, 10.0, 22.0, 20.0], [60.0, 40.0, 70.0, 52.0]]),
                "labels": torch.tensor([0, 1])} for _ in range(2)]
    plain = build_model("rtdetr_cpu", 3).train()
    assert not any(k.startswith("o2m_") for k in plain(images, targets))
    model = build_model("rtdetr_cpu", 3, dense_o2m=4).train()
    losses = model(images, targets)
    assert {"o2m_vfl", "o2m_bbox", "o2m_giou"} <= set(losses) and all(torch.isfinite(v) for v in losses.values())
    # Only the dense term (the selected proposals' own losses left out): it reaches the proposal heads.
    sum(v for k, v in losses.items() if k.startswith("o2m_")).backward()
    assert model.decoder.enc_score_head.weight.grad.abs().sum() > 0
    assert model.decoder.enc_bbox_head.layers[-1].weight.grad.abs().sum() > 0


def test_model_options_for_the_levers_are_checked_before_building():
    with pytest.raises(ValueError, match="cls_loss must be one of"):
        build_model("rtdetr_cpu", 3, cls_loss="focal")
    with pytest.raises(ValueError, match="dense_o2m must be an integer >= 0"):
        build_model("rtdetr_cpu", 3, dense_o2m=-1)


def test_bce_helper_agrees_with_torch():
    assert _bce(0.3, 0.2, 0.7) == pytest.approx(float(F.binary_cross_entropy_with_logits(
        torch.tensor(0.3), torch.tensor(0.2), weight=torch.tensor(0.7))), rel=1e-6)
