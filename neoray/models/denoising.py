"""Contrastive denoising queries (DN-DETR / DINO, as used by RT-DETR) — training only.

Ground-truth boxes are copied into G groups. Each group holds every object twice: a *positive* copy
(box jittered by less than half its size, which the decoder must restore) and a *negative* copy
(jittered by 1-2x half its size, which the decoder must classify as background). Some labels are
flipped to random classes. The attention mask stops groups from seeing each other and stops the normal
(matching) queries from seeing any denoising query, so the answer never leaks into the real predictions.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from neoray.models.box_ops import cxcywh_to_xyxy, inverse_sigmoid, xyxy_to_cxcywh


@dataclass
class DenoisingQueries:
    content: torch.Tensor  # (B, N, C) label embeddings
    reference_logits: torch.Tensor  # (B, N, 4) noised boxes, cxcywh in logit space
    attn_mask: torch.Tensor  # (N + Q, N + Q) bool, True = may not attend
    matches: list  # per image (query indices of the positives, target indices), for the loss
    groups: int
    count: int  # N


def make_denoising_queries(
    targets: list[dict],
    num_queries: int,
    label_embed: nn.Embedding,
    num_denoising: int = 100,
    label_noise_ratio: float = 0.5,
    box_noise_scale: float = 1.0,
) -> DenoisingQueries | None:
    """targets: per image {"labels" (n,), "boxes" (n, 4) cxcywh in [0, 1]}; None when there are no boxes.

    label_embed has num_classes + 1 rows; the last one pads images with fewer objects than the most.
    """
    counts = [len(t["labels"]) for t in targets]
    most = max(counts, default=0)
    if most == 0 or num_denoising <= 0:
        return None
    num_classes = label_embed.num_embeddings - 1
    groups = max(1, num_denoising // most)
    batch, device = len(targets), label_embed.weight.device
    per_group = 2 * most  # positives then negatives
    total = groups * per_group

    labels = torch.full((batch, most), num_classes, dtype=torch.int64, device=device)
    boxes = torch.zeros(batch, most, 4, device=device)
    present = torch.zeros(batch, most, dtype=torch.bool, device=device)
    for i, t in enumerate(targets):
        labels[i, : counts[i]] = t["labels"].to(device)
        boxes[i, : counts[i]] = t["boxes"].to(device).float()
        present[i, : counts[i]] = True
    # (B, groups * 2 * most): [group0 pos, group0 neg, group1 pos, ...]
    labels = labels.repeat(1, 2 * groups)
    boxes = boxes.repeat(1, 2 * groups, 1)
    present = present.repeat(1, 2 * groups)
    negative = torch.zeros(batch, per_group, 1, device=device)
    negative[:, most:] = 1.0
    negative = negative.repeat(1, groups, 1)

    if label_noise_ratio > 0:
        flip = (torch.rand(labels.shape, device=device) < label_noise_ratio * 0.5) & present
        labels = torch.where(flip, torch.randint_like(labels, 0, num_classes), labels)
    if box_noise_scale > 0:
        xyxy = cxcywh_to_xyxy(boxes)
        half_size = (boxes[..., 2:] * 0.5).repeat(1, 1, 2)
        sign = torch.randint_like(boxes, 0, 2) * 2.0 - 1.0
        magnitude = torch.rand_like(boxes) + negative  # positives in [0, 1), negatives in [1, 2)
        xyxy = (xyxy + sign * magnitude * half_size * box_noise_scale).clamp(0.0, 1.0)
        boxes = xyxy_to_cxcywh(xyxy)

    mask = _attention_mask(groups, per_group, num_queries, device)
    matches = _positive_matches(counts, groups, per_group)
    return DenoisingQueries(label_embed(labels), inverse_sigmoid(boxes), mask, matches, groups, total)


def _attention_mask(groups: int, per_group: int, num_queries: int, device) -> torch.Tensor:
    """True where a query may not attend: matching queries never see denoising queries, and each
    denoising group sees only itself."""
    total = groups * per_group
    mask = torch.zeros(total + num_queries, total + num_queries, dtype=torch.bool, device=device)
    mask[total:, :total] = True
    for g in range(groups):
        start, end = g * per_group, (g + 1) * per_group
        mask[start:end, :start] = True
        mask[start:end, end:total] = True
    return mask


def _positive_matches(counts: list[int], groups: int, per_group: int) -> list:
    """Per image (query indices of the positive denoising queries, their target indices)."""
    matches = []
    for n in counts:
        targets_idx = torch.arange(n, dtype=torch.int64)
        query_idx = torch.cat([g * per_group + targets_idx for g in range(groups)]) if n else targets_idx
        matches.append((query_idx, targets_idx.repeat(groups)))
    return matches
