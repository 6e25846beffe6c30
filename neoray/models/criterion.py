"""RT-DETR losses: IoU-aware classification + L1 + GIoU on boxes, for every set of predictions.

Sets: the final decoder layer, each earlier decoder layer (auxiliary), the encoder's top-k proposals,
and the denoising queries of every decoder layer (their targets are known, no matching needed). Each
loss is normalised by the number of ground-truth boxes: the caller passes the mean over its DDP ranks
(the engine agrees on it before the forward, so that no collective runs inside a forward that one rank
may not finish), else this batch's own count. Returned losses are already weighted; the engine sums them.

Classification (``cls_loss``):

* ``vfl`` (RT-DETR's varifocal loss): a matched query's target is its IoU with the object, weighted by that
  IoU; the others are negatives weighted like focal loss (``alpha * p^gamma``).
* ``mal`` (DEIM's matchability-aware loss): the target is ``IoU^mal_gamma`` with weight 1, so a poorly
  localised match still learns to score (VFL's weight, the IoU itself, all but silences those early in
  training); negatives as in VFL with ``mal_gamma`` as the focusing power.

``dense_o2m`` > 0 adds one-to-many supervision of the encoder's token proposals (neoray.models.dense_assign:
that many positives per object): the same classification and box losses, normalised by the positives,
weighted by ``dense_o2m_weight``, reported as ``o2m_*``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from neoray.models.box_ops import cxcywh_to_xyxy, paired_iou_and_giou
from neoray.models.dense_assign import assign_one_to_many
from neoray.models.matcher import HungarianMatcher, assignable_cost

DEFAULT_LOSS_WEIGHTS = {"vfl": 1.0, "bbox": 5.0, "giou": 2.0}
CLS_LOSSES = ("vfl", "mal")
O2M_CANDIDATES_PER_LEVEL = 9  # tokens nearest an object's centre on each level, from which its positives are drawn


class RTDETRCriterion(nn.Module):
    def __init__(
        self,
        num_classes: int,
        matcher: HungarianMatcher,
        loss_weights: dict | None = None,
        alpha: float = 0.75,
        gamma: float = 2.0,
        cls_loss: str = "vfl",
        mal_gamma: float = 1.5,
        dense_o2m: int = 0,
        dense_o2m_weight: float = 1.0,
    ):
        super().__init__()
        weights = dict(DEFAULT_LOSS_WEIGHTS)
        for key, value in (loss_weights or {}).items():
            if key not in weights:
                raise ValueError(f"loss_weights: unknown loss {key!r}; valid: {sorted(weights)}")
            weights[key] = float(value)
        if cls_loss not in CLS_LOSSES:
            raise ValueError(f"cls_loss must be one of {list(CLS_LOSSES)}, got {cls_loss!r}")
        self.num_classes, self.matcher, self.weights = num_classes, matcher, weights
        self.alpha, self.gamma = alpha, gamma
        self.cls_loss, self.mal_gamma = cls_loss, mal_gamma
        self.dense_o2m, self.dense_o2m_weight = int(dense_o2m), float(dense_o2m_weight)

    def varifocal(self, logits, boxes, targets, matches, num_boxes) -> torch.Tensor:
        """IoU-aware classification of every query: VFL or MAL (see the module docstring)."""
        batch_idx, query_idx, target_labels, target_boxes = _gather(matches, targets, logits.device)
        iou = torch.zeros(len(query_idx), device=logits.device)
        if len(query_idx):
            iou, _ = paired_iou_and_giou(
                cxcywh_to_xyxy(boxes[batch_idx, query_idx].detach().float()), cxcywh_to_xyxy(target_boxes)
            )
        return self.classification(logits, (batch_idx, query_idx, target_labels), iou.clamp(min=0), num_boxes)

    def classification(self, logits, positives: tuple, iou: torch.Tensor, normaliser: float) -> torch.Tensor:
        """BCE over every (query, class): ``positives`` = (batch, query, label) indices with their IoU."""
        batch_idx, query_idx, labels = positives
        is_target = torch.zeros_like(logits)
        is_target[batch_idx, query_idx, labels] = 1.0
        scores = torch.zeros_like(logits)
        prob = logits.sigmoid().detach()
        if self.cls_loss == "mal":
            scores[batch_idx, query_idx, labels] = iou.pow(self.mal_gamma).to(scores.dtype)
            weight = self.alpha * prob.pow(self.mal_gamma) * (1 - is_target) + is_target
        else:
            scores[batch_idx, query_idx, labels] = iou.to(scores.dtype)
            # Negatives are down-weighted like focal loss; positives are weighted by their IoU target.
            weight = self.alpha * prob.pow(self.gamma) * (1 - is_target) + scores
        loss = F.binary_cross_entropy_with_logits(logits, scores, weight=weight, reduction="none")
        return loss.mean(1).sum() * logits.shape[1] / normaliser

    def box_losses(self, boxes, targets, matches, num_boxes) -> tuple[torch.Tensor, torch.Tensor]:
        batch_idx, query_idx, _, target_boxes = _gather(matches, targets, boxes.device)
        # Indexing with possibly-empty indices keeps the box heads in the graph (zero gradient) even
        # when the batch has no objects, so DDP sees every parameter used.
        matched = boxes[batch_idx, query_idx].float()
        l1 = F.l1_loss(matched, target_boxes, reduction="sum") / num_boxes
        _, giou = paired_iou_and_giou(cxcywh_to_xyxy(matched), cxcywh_to_xyxy(target_boxes))
        return l1, (1 - giou).sum() / num_boxes

    def set_losses(self, logits, boxes, targets, matches, num_boxes) -> dict[str, torch.Tensor]:
        l1, giou = self.box_losses(boxes, targets, matches, num_boxes)
        return {"vfl": self.varifocal(logits, boxes, targets, matches, num_boxes), "bbox": l1, "giou": giou}

    def forward(self, outputs: dict, targets: list[dict], num_boxes: float | None = None) -> dict[str, torch.Tensor]:
        """outputs: "logits"/"boxes" (layers, B, Q, K|4) per decoder layer, "enc_logits"/"enc_boxes"
        (B, Q, K|4), optional "dn_logits"/"dn_boxes" (layers, B, N, K|4) with "dn_matches".
        targets: per image {"labels", "boxes" cxcywh normalised}."""
        if num_boxes is None:
            num_boxes = float(sum(len(t["labels"]) for t in targets))
        num_boxes = max(float(num_boxes), 1.0)
        totals = {name: outputs["logits"].new_zeros(()) for name in self.weights}

        def add(losses: dict, divide_by: float = 1.0) -> None:
            for name, value in losses.items():
                totals[name] = totals[name] + value / divide_by

        sets = list(zip(outputs["logits"], outputs["boxes"]))
        sets.append((outputs["enc_logits"], outputs["enc_boxes"]))
        for logits, boxes in sets:
            matches = self.matcher(logits, boxes, targets)
            add(self.set_losses(logits, boxes, targets, matches, num_boxes))
        if "dn_logits" in outputs:
            # Every object appears once per denoising group: divide by the group count too.
            groups = outputs["dn_groups"]
            for logits, boxes in zip(outputs["dn_logits"], outputs["dn_boxes"]):
                add(self.set_losses(logits, boxes, targets, outputs["dn_matches"], num_boxes), groups)
        losses = {name: totals[name] * self.weights[name] for name in self.weights}
        if self.dense_o2m > 0 and "token_logits" in outputs:
            dense = self.dense_losses(outputs, targets, num_boxes)
            losses.update({f"o2m_{name}": dense[name] * self.weights[name] * self.dense_o2m_weight for name in dense})
        return losses

    def dense_losses(self, outputs: dict, targets: list[dict], num_boxes: float) -> dict[str, torch.Tensor]:
        """One-to-many supervision of every encoder token's proposal (``dense_o2m`` positives per object),
        normalised like the other sets (by the objects, so k positives weigh as much as k matches would)."""
        logits, boxes = outputs["token_logits"], outputs["token_boxes"]
        matches = [self._dense_matches(logits[i], boxes[i], t, outputs) for i, t in enumerate(targets)]
        return self.set_losses(logits, boxes, targets, matches, num_boxes * self.dense_o2m)

    @torch.no_grad()
    def _dense_matches(self, logits, boxes, target: dict, outputs: dict) -> tuple[torch.Tensor, torch.Tensor]:
        if len(target["labels"]) == 0:
            empty = torch.zeros(0, dtype=torch.int64)
            return empty, empty
        cost = self.matcher.matching_cost(logits.float(), boxes.float(), target["labels"], target["boxes"].float())
        tokens, objects = assign_one_to_many(
            assignable_cost(cost), outputs["token_centres"],
            outputs["token_levels"], outputs["token_valid"], target["boxes"][:, :2], self.dense_o2m,
            O2M_CANDIDATES_PER_LEVEL)
        return tokens.cpu(), objects.cpu()


def _gather(matches, targets, device):
    """Flatten per-image matches into (batch_idx, query_idx, labels, boxes) for indexing the batch."""
    batch_idx = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(matches)]).to(device)
    query_idx = torch.cat([q for q, _ in matches]).to(device)
    labels = torch.cat([t["labels"][j.to(t["labels"].device)] for t, (_, j) in zip(targets, matches)]).to(device)
    boxes = torch.cat([t["boxes"][j.to(t["boxes"].device)] for t, (_, j) in zip(targets, matches)]).to(device)
    return batch_idx, query_idx, labels, boxes.float()
