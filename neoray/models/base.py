"""What every detector shares: uint8 input checks, normalisation, padding, target validation.

Input: uint8 (B, 3, H, W) RGB of any size (16:9 in practice, e.g. 1920x1080). Inside the model, on the
device, pixels become floats by the model's ``input_normalization``:

* "imagenet" (the default): (pixel / 255 - ImageNet mean) / ImageNet std;
* "unit": pixel / 255 and nothing else, which is what the reference RT-DETR (lyuwenyu/RT-DETR) and the
  Hugging Face RT-DETR image processor feed; a model imported from them keeps seeing its inputs so.

The batch is then padded at the bottom and right to a multiple of 32 (1920x1080 -> 1920x1088) with the
ImageNet mean colour, whatever the normalisation (0 after "imagenet", the mean itself after "unit"), so
the padding looks like flat grey. Boxes, in targets and in predictions, are always in pixels of the
un-padded input; predictions are clipped to it.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
PAD_MULTIPLE = 32
INPUT_NORMALIZATIONS = ("imagenet", "unit")
BOX_TOLERANCE_PX = 1.0  # boxes may overhang the image by rounding; they are clipped inside


def check_targets(targets: list[dict], num_classes: int, image_size: tuple[int, int]) -> None:
    """Raise a one-line ValueError for targets a detector cannot train on; image_size is (width, height).

    Runs on CPU copies, so a bad label is reported here instead of as a device-side index assertion.
    """
    width, height = image_size
    if not isinstance(targets, (list, tuple)):
        raise ValueError(f"targets must be a list of dicts, got {type(targets).__name__}")
    for i, target in enumerate(targets):
        if "boxes" not in target or "labels" not in target:
            raise ValueError(f"targets[{i}]: needs 'boxes' and 'labels', got keys {sorted(target)}")
        boxes = torch.as_tensor(target["boxes"]).detach().cpu()
        labels = torch.as_tensor(target["labels"]).detach().cpu()
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"targets[{i}]: boxes must have shape (N, 4), got {tuple(boxes.shape)}")
        if labels.ndim != 1 or len(labels) != len(boxes):
            raise ValueError(f"targets[{i}]: labels must have shape ({len(boxes)},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.dtype == torch.bool:
            raise ValueError(f"targets[{i}]: labels must be integers, got {labels.dtype}")
        if len(labels) == 0:
            continue
        bad = (labels < 0) | (labels >= num_classes)
        if bad.any():
            raise ValueError(
                f"targets[{i}]: label {int(labels[bad][0])} is outside [0, {num_classes}) "
                f"(num_classes={num_classes}); image {i} of the batch"
            )
        if not torch.isfinite(boxes).all():
            raise ValueError(f"targets[{i}]: boxes contain NaN or Inf")
        degenerate = (boxes[:, 2] <= boxes[:, 0]) | (boxes[:, 3] <= boxes[:, 1])
        if degenerate.any():
            raise ValueError(
                f"targets[{i}]: box {boxes[degenerate][0].tolist()} has x2 <= x1 or y2 <= y1 (xyxy expected)"
            )
        limit = torch.tensor([width, height, width, height], dtype=boxes.dtype) + BOX_TOLERANCE_PX
        outside = ((boxes < -BOX_TOLERANCE_PX) | (boxes > limit)).any(1)
        if outside.any():
            raise ValueError(f"targets[{i}]: box {boxes[outside][0].tolist()} lies outside the {width}x{height} image")


class Detector(nn.Module):
    """Base class: subclasses implement ``compute_losses(x, size, targets)`` and ``predict(x, size)``."""

    def __init__(
        self, num_classes: int, max_detections: int = 100, score_threshold: float = 0.0,
        input_normalization: str = "imagenet",
    ):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"num_classes must be >= 1, got {num_classes}")
        if max_detections < 1:
            raise ValueError(f"max_detections must be >= 1, got {max_detections}")
        self.num_classes = num_classes
        self.max_detections = max_detections
        self.score_threshold = score_threshold
        # Non-persistent: they are constants, not learned, and stay out of checkpoints (the convention
        # itself is a build option, recorded in the run's config).
        self.register_buffer("pixel_mean", torch.zeros(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.ones(1, 3, 1, 1), persistent=False)
        self.register_buffer("pad_value", torch.zeros(1, 3, 1, 1), persistent=False)
        self.set_input_normalization(input_normalization)

    def set_input_normalization(self, kind: str) -> None:
        """"imagenet" or "unit" (see the module docstring); the padding stays the ImageNet mean colour."""
        if kind not in INPUT_NORMALIZATIONS:
            raise ValueError(f"input_normalization must be one of {list(INPUT_NORMALIZATIONS)}, got {kind!r}")
        mean_colour = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
        with torch.no_grad():
            if kind == "imagenet":
                self.pixel_mean.copy_(mean_colour * 255.0)
                self.pixel_std.copy_(torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) * 255.0)
                self.pad_value.zero_()
            else:
                self.pixel_mean.zero_()
                self.pixel_std.fill_(255.0)
                self.pad_value.copy_(mean_colour)
        self.input_normalization = kind

    def conventions(self) -> dict:
        """The input conventions this model was built with (build options; see neoray.models.pretrained)."""
        return {"input_normalization": self.input_normalization}

    def set_conventions(self, **conventions) -> None:
        for key, value in conventions.items():
            if key == "input_normalization":
                self.set_input_normalization(value)
            else:
                raise ValueError(f"{type(self).__name__}: no convention {key!r}; valid: {sorted(self.conventions())}")

    @staticmethod
    def check_images(images: torch.Tensor) -> None:
        if images.dtype != torch.uint8 or images.ndim != 4 or images.shape[1] != 3:
            raise ValueError(f"images must be uint8 (B, 3, H, W), got {images.dtype} {tuple(images.shape)}")

    def normalize(self, images: torch.Tensor) -> torch.Tensor:
        self.check_images(images)
        return (images.to(self.pixel_mean.device, torch.float32) - self.pixel_mean) / self.pixel_std

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """Pad bottom/right to a multiple of PAD_MULTIPLE with the mean colour (in normalised units)."""
        height, width = x.shape[-2:]
        pad_h = -height % PAD_MULTIPLE
        pad_w = -width % PAD_MULTIPLE
        if not (pad_h or pad_w):
            return x
        if self.input_normalization == "imagenet":  # the mean colour is 0 after normalisation
            return F.pad(x, (0, pad_w, 0, pad_h))
        out = self.pad_value.to(x.device, x.dtype).expand(x.shape[0], -1, height + pad_h, width + pad_w).clone()
        out[..., :height, :width] = x
        return out

    def forward(self, images: torch.Tensor, targets: list[dict] | None = None, num_boxes: float | None = None):
        """Train mode: dict of weighted scalar losses. Eval mode: per image {"boxes", "scores", "labels"}.

        ``num_boxes``: what the losses are normalised by, the boxes per worker averaged over the DDP ranks
        (the engine agrees on it before the forward); None: this batch's own count."""
        size = (images.shape[-1], images.shape[-2])  # (width, height)
        if not self.training:
            return self.predict(self.normalize(images), size)
        if targets is None:
            raise ValueError("train mode needs targets; call model.eval() to get predictions")
        if len(targets) != len(images):
            raise ValueError(f"got {len(images)} images but {len(targets)} targets")
        # Targets are checked on CPU copies before the first kernel of this step runs on the device.
        self.check_images(images)
        check_targets(targets, self.num_classes, size)
        x = self.normalize(images)
        device = x.device
        clean = [
            {
                "boxes": torch.as_tensor(t["boxes"]).to(device, torch.float32).reshape(-1, 4),
                "labels": torch.as_tensor(t["labels"]).to(device, torch.int64).reshape(-1),
            }
            for t in targets
        ]  # extra keys (iscrowd, areas, ...) are ignored
        return self.compute_losses(x, size, clean, num_boxes)

    def compute_losses(self, x: torch.Tensor, size: tuple[int, int], targets: list[dict],
                       num_boxes: float | None = None) -> dict:
        raise NotImplementedError

    def predict(self, x: torch.Tensor, size: tuple[int, int]) -> list[dict]:
        raise NotImplementedError
