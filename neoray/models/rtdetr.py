"""RT-DETR (Zhao et al., "DETRs Beat YOLOs on Real-time Object Detection") for 16:9 inputs.

backbone (strides 8/16/32) -> hybrid encoder (AIFI + CCFM) -> IoU-aware top-k query selection ->
deformable decoder with iterative refinement -> one box and a score per class per query; no NMS.
Training adds contrastive denoising queries and auxiliary losses on every decoder layer and on the
encoder proposals. Internally boxes are cxcywh normalised by the padded input (see base.py for the
padding); targets and predictions are xyxy pixels of the un-padded input.

Options that record conventions (so that a config or a checkpoint carries them): ``input_normalization``
("imagenet" | "unit", base.py) and ``position_order`` ("xy" | "yx", position.py). Options of the
reference's training recipe: ``freeze_norm`` / ``freeze_at`` (backbone, norm.py), ``look_forward_twice``
and ``reference_init`` (decoder.py), ``encoder_dim`` (the hybrid encoder's width when it differs from the decoder's
``hidden_dim``: 384 vs 256 in the reference's r101vd). Options that speed up training from few images of many
small objects, off by default (the reference's recipe): ``cls_loss="mal"`` (DEIM's matchability-aware loss) and
``dense_o2m=k`` (k positives per object for the encoder's proposals), criterion.py.
"""

from __future__ import annotations

import torch

from neoray.models.backbone import make_backbone
from neoray.models.base import Detector
from neoray.models.box_ops import cxcywh_to_xyxy, xyxy_to_cxcywh
from neoray.models.criterion import RTDETRCriterion
from neoray.models.decoder import RTDETRDecoder
from neoray.models.denoising import make_denoising_queries
from neoray.models.encoder import HybridEncoder
from neoray.models.matcher import HungarianMatcher
from neoray.models.position import POSITION_ORDERS


class RTDETR(Detector):
    def __init__(
        self,
        num_classes: int,
        backbone: str = "resnet18",
        backbone_weights: str = "none",
        hidden_dim: int = 256,
        encoder_heads: int = 8,
        encoder_ffn_dim: int = 1024,
        csp_blocks: int = 3,
        csp_expansion: float = 0.5,
        num_queries: int = 300,
        num_decoder_layers: int = 3,
        decoder_heads: int = 8,
        decoder_ffn_dim: int = 1024,
        num_points: int = 4,
        dropout: float = 0.0,
        num_denoising: int = 100,
        label_noise_ratio: float = 0.5,
        box_noise_scale: float = 1.0,
        loss_weights: dict | None = None,
        matcher_costs: dict | None = None,
        max_detections: int = 100,
        score_threshold: float = 0.0,
        encoder_dim: int | None = None,
        freeze_norm: bool = False,
        freeze_at: int = -1,
        look_forward_twice: bool = True,
        reference_init: bool = True,
        input_normalization: str = "imagenet",
        position_order: str = "xy",
        cls_loss: str = "vfl",
        mal_gamma: float = 1.5,
        dense_o2m: int = 0,
        dense_o2m_weight: float = 1.0,
    ):
        super().__init__(num_classes, max_detections, score_threshold, input_normalization)
        self.backbone = make_backbone(backbone, backbone_weights, freeze_norm=freeze_norm, freeze_at=freeze_at)
        levels = len(self.backbone.out_channels)
        encoder_dim = hidden_dim if encoder_dim is None else encoder_dim
        self.encoder = HybridEncoder(
            self.backbone.out_channels, encoder_dim, encoder_heads, encoder_ffn_dim, csp_blocks, csp_expansion, dropout,
            position_order=position_order,
        )
        self.decoder = RTDETRDecoder(
            num_classes, hidden_dim, levels, num_queries, num_decoder_layers, decoder_heads, decoder_ffn_dim,
            num_points, dropout, in_dim=encoder_dim, look_forward_twice=look_forward_twice,
            reference_init=reference_init,
        )
        costs = {"cost_class": 2.0, "cost_bbox": 5.0, "cost_giou": 2.0}
        for key, value in (matcher_costs or {}).items():
            if key not in costs:
                raise ValueError(f"matcher_costs: unknown cost {key!r}; valid: {sorted(costs)}")
            costs[key] = float(value)
        self.criterion = RTDETRCriterion(num_classes, HungarianMatcher(**costs), loss_weights, cls_loss=cls_loss,
                                         mal_gamma=mal_gamma, dense_o2m=dense_o2m, dense_o2m_weight=dense_o2m_weight)
        self.num_denoising, self.label_noise_ratio = num_denoising, label_noise_ratio
        self.box_noise_scale = box_noise_scale

    def conventions(self) -> dict:
        return {**super().conventions(), "position_order": self.encoder.position_order}

    def set_conventions(self, **conventions) -> None:
        order = conventions.pop("position_order", None)
        if order is not None:
            if order not in POSITION_ORDERS:
                raise ValueError(f"position_order must be one of {list(POSITION_ORDERS)}, got {order!r}")
            self.encoder.position_order = order
        super().set_conventions(**conventions)

    def _run(self, x: torch.Tensor, size: tuple[int, int], denoising=None) -> dict:
        padded = self.pad(x)
        valid_fraction = (size[0] / padded.shape[-1], size[1] / padded.shape[-2])
        return self.decoder(self.encoder(self.backbone(padded)), valid_fraction, denoising)

    def _padded_scale(self, x: torch.Tensor) -> torch.Tensor:
        """(Wp, Hp, Wp, Hp) of the padded input: normalised boxes times this are pixels."""
        height = x.shape[-2] + (-x.shape[-2] % 32)
        width = x.shape[-1] + (-x.shape[-1] % 32)
        return torch.tensor([width, height, width, height], dtype=torch.float32, device=x.device)

    def compute_losses(self, x, size, targets, num_boxes=None):
        scale = self._padded_scale(x)
        width, height = size
        limit = torch.tensor([width, height, width, height], dtype=torch.float32, device=x.device)
        normalised = [
            {"labels": t["labels"], "boxes": xyxy_to_cxcywh(torch.min(t["boxes"].clamp(min=0), limit) / scale)}
            for t in targets
        ]
        denoising = None
        if self.num_denoising > 0:
            queries = min(self.decoder.num_queries, self._token_count(x))
            denoising = make_denoising_queries(normalised, queries, self.decoder.denoising_class_embed,
                                               self.num_denoising, self.label_noise_ratio, self.box_noise_scale)
        outputs = self._run(x, size, denoising)
        if denoising is not None:
            outputs.update(dn_matches=denoising.matches, dn_groups=denoising.groups)
        losses = self.criterion(outputs, normalised, num_boxes)
        if denoising is None:
            # No denoising queries this step (no boxes in the batch): keep their embedding in the graph
            # with a zero term, otherwise DDP without find_unused_parameters waits for its gradient.
            losses["vfl"] = losses["vfl"] + 0.0 * self.decoder.denoising_class_embed.weight.sum()
        return losses

    def _token_count(self, x: torch.Tensor) -> int:
        height = (x.shape[-2] + (-x.shape[-2] % 32)) // 8
        width = (x.shape[-1] + (-x.shape[-1] % 32)) // 8
        return sum((height >> i) * (width >> i) for i in range(len(self.backbone.out_channels)))

    @torch.no_grad()
    def predict(self, x, size):
        outputs = self._run(x, size)
        logits, boxes = outputs["logits"][-1], outputs["boxes"][-1]  # last decoder layer
        batch, queries, classes = logits.shape
        pixels = cxcywh_to_xyxy(boxes.float()) * self._padded_scale(x)
        width, height = size
        pixels[..., 0::2] = pixels[..., 0::2].clamp(0, width)
        pixels[..., 1::2] = pixels[..., 1::2].clamp(0, height)
        # Every (query, class) pair is a candidate detection; keep the best max_detections.
        scores, flat = logits.float().sigmoid().flatten(1).topk(min(self.max_detections, queries * classes), dim=1)
        results = []
        for i in range(batch):
            query, label = flat[i] // classes, flat[i] % classes
            keep = scores[i] > self.score_threshold
            results.append({"boxes": pixels[i, query][keep], "scores": scores[i][keep], "labels": label[keep]})
        return results
