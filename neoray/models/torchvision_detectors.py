"""torchvision's FCOS and RetinaNet (ResNet-50 FPN) behind the neoray Detector interface: baselines.

- Input uint8 (B, 3, H, W), normalised by our Detector; torchvision's GeneralizedRCNNTransform is
  replaced by one that neither resizes nor normalises (it only pads to a multiple of 32, bottom/right),
  so boxes stay in input pixels in both directions.
- Labels: FCOS and RetinaNet score every class with a sigmoid and mark background by "no match", not by
  a class index (see torchvision's FCOSHead.compute_loss: background is matched_idx < 0, and the
  one-hot target is indexed by the label itself). So label k in 0..K-1 is class k and num_classes=K,
  with no background slot to shift by.
- NMS stays on (these heads predict many overlapping boxes per object).
"""

from __future__ import annotations

import torch
from torchvision import models
from torchvision.models.detection import fcos_resnet50_fpn, retinanet_resnet50_fpn
from torchvision.models.detection.transform import GeneralizedRCNNTransform

from neoray.models.base import PAD_MULTIPLE, Detector
from neoray.models.weights import load_backbone_weights

BUILDERS = {"fcos": fcos_resnet50_fpn, "retinanet": retinanet_resnet50_fpn}


class PadOnlyTransform(GeneralizedRCNNTransform):
    """torchvision's batching transform with resizing and normalisation switched off."""

    def __init__(self):
        super().__init__(min_size=1, max_size=1, image_mean=[0.0] * 3, image_std=[1.0] * 3, size_divisible=PAD_MULTIPLE)

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        return image  # already normalised by Detector.normalize

    def resize(self, image, target=None):
        return image, target


class TorchvisionDetector(Detector):
    def __init__(
        self,
        num_classes: int,
        kind: str = "fcos",
        backbone_weights: str = "none",
        nms_threshold: float | None = None,
        max_detections: int = 100,
        score_threshold: float = 0.0,
    ):
        super().__init__(num_classes, max_detections, score_threshold)
        if kind not in BUILDERS:
            raise ValueError(f"unknown torchvision detector {kind!r}; valid: {sorted(BUILDERS)}")
        extra = {} if nms_threshold is None else {"nms_thresh": nms_threshold}
        # weights_backbone=None gives plain BatchNorm and all layers trainable; weights are loaded below.
        self.detector = BUILDERS[kind](
            weights=None,
            weights_backbone=None,
            num_classes=num_classes,
            detections_per_img=max_detections,
            score_thresh=score_threshold,
            **extra,
        )
        self.detector.transform = PadOnlyTransform()
        self.loaded_tensors = load_backbone_weights(
            self.detector.backbone.body, backbone_weights, models.ResNet50_Weights.IMAGENET1K_V1.url, "resnet50",
            "detector.backbone.body.",
        )

    @property
    def backbone(self):
        """The ResNet-50 + FPN (a submodule of the torchvision model; one copy in the state dict)."""
        return self.detector.backbone

    def compute_losses(self, x, size, targets, num_boxes=None):  # torchvision normalises its own losses
        losses = self.detector(list(x), targets)
        return {name: value for name, value in losses.items()}

    @torch.no_grad()
    def predict(self, x, size):
        # Read the limits now, not at build time, so changing them on a built model works as for RT-DETR.
        self.detector.score_thresh = self.score_threshold
        self.detector.detections_per_img = self.max_detections
        detections = self.detector(list(x))
        return [{"boxes": d["boxes"], "scores": d["scores"], "labels": d["labels"]} for d in detections]
