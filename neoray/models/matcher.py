"""Hungarian matching of predictions to ground truth (one prediction per object).

The cost of giving object j to query i is a weighted sum of a focal-style class cost, the L1 distance of
the normalised cxcywh boxes and minus their GIoU; scipy's linear_sum_assignment finds the assignment
with the lowest total cost, image by image, on the CPU.

A diverged model (NaN or inf logits or boxes) gives non-finite costs, which scipy refuses with a ValueError
that would kill the worker. Those entries are made cheaper than every finite one instead
(``assignable_cost``): the non-finite predictions are then matched, so their values reach the loss, which
is non-finite, and the engine skips the update as it skips any non-finite loss (neoray.engine.guards).
"""

from __future__ import annotations

import torch
from scipy.optimize import linear_sum_assignment
from torch import nn
from torchvision.ops import generalized_box_iou

from neoray.models.box_ops import cxcywh_to_xyxy


def assignable_cost(cost: torch.Tensor) -> torch.Tensor:
    """``cost`` with every NaN/inf entry replaced by a value below all finite ones (see the module docstring);
    ``cost`` itself when it is all finite."""
    finite = torch.isfinite(cost)
    if bool(finite.all()):
        return cost
    lowest = cost[finite].min() - 1.0 if bool(finite.any()) else cost.new_zeros(())
    return torch.where(finite, cost, lowest)


class HungarianMatcher(nn.Module):
    def __init__(
        self,
        cost_class: float = 2.0,
        cost_bbox: float = 5.0,
        cost_giou: float = 2.0,
        alpha: float = 0.25,
        gamma: float = 2.0,
    ):
        super().__init__()
        self.cost_class, self.cost_bbox, self.cost_giou = cost_class, cost_bbox, cost_giou
        self.alpha, self.gamma = alpha, gamma

    def matching_cost(
        self, logits: torch.Tensor, boxes: torch.Tensor, target_labels: torch.Tensor, target_boxes: torch.Tensor
    ) -> torch.Tensor:
        """(Q, T) cost for one image: logits (Q, K), boxes (Q, 4) and target_boxes (T, 4) cxcywh in [0, 1]."""
        prob = logits.sigmoid()[:, target_labels]  # (Q, T): each query's score for each object's class
        # Focal-style: reward confidence on the right class, penalise confidence that would be wrong.
        positive = self.alpha * (1 - prob) ** self.gamma * -(prob + 1e-8).log()
        negative = (1 - self.alpha) * prob**self.gamma * -(1 - prob + 1e-8).log()
        class_cost = positive - negative
        l1_cost = torch.cdist(boxes, target_boxes, p=1)
        giou_cost = -generalized_box_iou(cxcywh_to_xyxy(boxes), cxcywh_to_xyxy(target_boxes))
        return self.cost_class * class_cost + self.cost_bbox * l1_cost + self.cost_giou * giou_cost

    @torch.no_grad()
    def forward(
        self, logits: torch.Tensor, boxes: torch.Tensor, targets: list[dict]
    ) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """logits (B, Q, K), boxes (B, Q, 4); targets: per image {"labels", "boxes" cxcywh normalised}.

        Returns per image (query_indices, target_indices), int64 tensors on the CPU of equal length.
        """
        matches = []
        for i, target in enumerate(targets):
            if len(target["labels"]) == 0:
                empty = torch.zeros(0, dtype=torch.int64)
                matches.append((empty, empty))
                continue
            cost = self.matching_cost(logits[i].float(), boxes[i].float(), target["labels"], target["boxes"].float())
            rows, cols = linear_sum_assignment(assignable_cost(cost.cpu()).numpy())
            matches.append((torch.as_tensor(rows, dtype=torch.int64), torch.as_tensor(cols, dtype=torch.int64)))
        return matches
