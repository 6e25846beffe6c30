"""The Hungarian matcher finds the cheapest one-to-one assignment (checked by brute force)."""

import itertools

import torch
from torchvision.ops import generalized_box_iou

from neoray.models.box_ops import cxcywh_to_xyxy
from neoray.models.matcher import HungarianMatcher


def random_boxes(n: int) -> torch.Tensor:
    centre = torch.rand(n, 2) * 0.6 + 0.2
    size = torch.rand(n, 2) * 0.3 + 0.05
    return torch.cat([centre, size], dim=1)


def test_assignment_is_optimal_against_brute_force():
    matcher = HungarianMatcher()
    generator = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    for case in range(20):
        queries = int(torch.randint(2, 6, (1,), generator=generator))
        objects = int(torch.randint(1, queries + 1, (1,), generator=generator))
        logits = torch.randn(1, queries, 3)
        boxes = random_boxes(queries)[None]
        target = {"labels": torch.randint(0, 3, (objects,)), "boxes": random_boxes(objects)}
        (rows, cols), = matcher(logits, boxes, [target])
        cost = matcher.matching_cost(logits[0], boxes[0], target["labels"], target["boxes"])
        assert len(rows) == objects and sorted(cols.tolist()) == list(range(objects))
        found = cost[rows, cols].sum().item()
        best = min(
            sum(cost[q, t].item() for t, q in enumerate(perm))
            for perm in itertools.permutations(range(queries), objects)
        )
        assert abs(found - best) < 1e-5, f"case {case}: matcher cost {found} > optimum {best}"


def test_cost_combines_class_l1_and_giou_terms():
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=1.0, cost_giou=0.0)
    boxes = random_boxes(4)
    targets = random_boxes(3)
    cost = matcher.matching_cost(torch.zeros(4, 2), boxes, torch.tensor([0, 1, 1]), targets)
    torch.testing.assert_close(cost, (boxes[:, None] - targets[None]).abs().sum(-1))
    matcher = HungarianMatcher(cost_class=0.0, cost_bbox=0.0, cost_giou=1.0)
    cost = matcher.matching_cost(torch.zeros(4, 2), boxes, torch.tensor([0, 1, 1]), targets)
    torch.testing.assert_close(cost, -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(targets)))


def test_confident_right_class_is_cheaper():
    matcher = HungarianMatcher(cost_bbox=0.0, cost_giou=0.0)
    logits = torch.tensor([[5.0, -5.0], [-5.0, 5.0]])
    cost = matcher.matching_cost(logits, random_boxes(2), torch.tensor([0]), random_boxes(1))
    assert cost[0, 0] < cost[1, 0]


def test_images_without_objects_get_empty_matches():
    matcher = HungarianMatcher()
    empty = {"labels": torch.zeros(0, dtype=torch.int64), "boxes": torch.zeros(0, 4)}
    (rows, cols), = matcher(torch.randn(1, 4, 2), random_boxes(4)[None], [empty])
    assert len(rows) == 0 and len(cols) == 0


def test_nonfinite_costs_are_matched_instead_of_refused():
    # A diverged model's NaN logits or inf boxes: scipy refuses NaN/inf costs (ValueError, which killed the
    # worker); the matcher matches those predictions instead, so their values reach the loss.
    matcher = HungarianMatcher()
    logits = torch.randn(1, 6, 3)
    boxes = random_boxes(6)[None]
    logits[0, 4] = float("nan")
    boxes[0, 1, 2] = float("inf")
    target = {"labels": torch.tensor([0, 2]), "boxes": random_boxes(2)}
    (rows, cols), = matcher(logits, boxes, [target])
    assert sorted(rows.tolist()) == [1, 4] and sorted(cols.tolist()) == [0, 1]


def test_all_nan_predictions_still_get_a_full_matching():
    matcher = HungarianMatcher()
    logits = torch.full((1, 5, 3), float("nan"))
    boxes = torch.full((1, 5, 4), float("nan"))
    target = {"labels": torch.tensor([0, 1, 2]), "boxes": random_boxes(3)}
    (rows, cols), = matcher(logits, boxes, [target])
    assert len(set(rows.tolist())) == 3 and sorted(cols.tolist()) == [0, 1, 2]
