"""One-to-many assignment of objects to encoder tokens: several positives per object, for dense supervision.

DETR's one-to-one matching gives each object one positive query per set of predictions, which is what lets it
skip NMS and also what makes it slow to learn from scratch on images of many small objects (each object
trains one query). One-stage detectors assign several locations per object (ATSS, YOLO's task-aligned
assigner). Here the encoder's proposals (every token proposes a class score and a box before query
selection) get such an assignment as an auxiliary loss: their head is what picks the queries, so training it
densely means better queries from the first epochs, while the decoder keeps its one-to-one matching.

Per image and object: the candidates are the ``per_level`` tokens of each feature level whose anchor centres
lie nearest the object's centre (ATSS's centre prior, which keeps an object of 7 pixels its share of tokens
on the stride-8 level); among them the ``k`` with the lowest matching cost (the Hungarian matcher's class +
L1 + GIoU cost on the token's own prediction) become positives. A token claimed by several objects goes to
the one it costs least.
"""

from __future__ import annotations

import torch


@torch.no_grad()
def assign_one_to_many(cost: torch.Tensor, centres: torch.Tensor, levels: torch.Tensor, valid: torch.Tensor,
                       target_centres: torch.Tensor, k: int, per_level: int) -> tuple[torch.Tensor, torch.Tensor]:
    """For one image: cost (S, T) of giving object t to token s; centres (S, 2) of the tokens' anchors and
    target_centres (T, 2), both normalised; levels (S,) each token's level; valid (S,) tokens that may be
    positives. Returns (token indices, object indices), int64 on the cost's device, one row per positive."""
    num_tokens, num_targets = cost.shape
    if num_targets == 0 or k <= 0:
        empty = torch.zeros(0, dtype=torch.int64, device=cost.device)
        return empty, empty
    distance = torch.cdist(centres.float(), target_centres.float())  # (S, T)
    distance = distance.masked_fill(~valid[:, None], float("inf"))
    candidate = torch.zeros(num_tokens, num_targets, dtype=torch.bool, device=cost.device)
    for level in levels.unique():
        on_level = (levels == level).nonzero().squeeze(1)
        nearest = distance[on_level].topk(min(per_level, len(on_level)), dim=0, largest=False).indices  # (c, T)
        candidate[on_level[nearest], torch.arange(num_targets, device=cost.device)[None].expand_as(nearest)] = True
    candidate &= valid[:, None]
    masked = torch.where(candidate, cost, torch.full_like(cost, float("inf")))
    chosen = masked.topk(min(k, num_tokens), dim=0, largest=False)  # k cheapest candidates per object
    keep = torch.isfinite(chosen.values)
    tokens = chosen.indices[keep]
    objects = torch.arange(num_targets, device=cost.device)[None].expand_as(chosen.indices)[keep]
    # A token positive for several objects keeps the one it costs least.
    order = torch.argsort(cost[tokens, objects], stable=True)
    tokens, objects = tokens[order], objects[order]
    _, group = torch.unique(tokens, return_inverse=True)
    position = torch.arange(len(tokens), device=cost.device)
    first = torch.full((int(group.max()) + 1 if len(group) else 0,), len(tokens), device=cost.device)
    first = first.scatter_reduce(0, group, position, reduce="amin")
    keep = position == first[group]
    return tokens[keep], objects[keep]


__all__ = ["assign_one_to_many"]
