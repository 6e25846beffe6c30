"""``neoray predict CHECKPOINT IMAGE... --out DIR``: draw a checkpoint's detections on images.

Each image (any size or aspect) is letterboxed to the size the model trained at (or ``--size``), run
through the model, and the boxes are mapped back to the original image, where they are drawn with class
names and scores into ``DIR/<stem>.png``. An unreadable image is reported and counted; the others are
still processed, and the exit status is 1 if any image failed.
"""

from __future__ import annotations

import sys

import cv2
import numpy as np
import torch

from neoray import storage

MAX_IMAGE_BYTES = 512 << 20  # a larger file is not an image this command should decode


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or checkpoint.pt, a run directory, a reference "
                                           "RT-DETR .pth or a Hugging Face RT-DETR folder; local or a URI")
    parser.add_argument("images", nargs="+", help="image files (anything OpenCV reads), local or URIs")
    parser.add_argument("--out", required=True, help="output directory for the drawn PNGs (local or a URI)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this")
    parser.add_argument("--size", default=None, help="16:9 input size WxH (default: the checkpoint's data.size)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def predict_image(model: torch.nn.Module, image_bgr: np.ndarray, size: tuple[int, int], device,
                  score_threshold: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(boxes xyxy in original pixels, scores, labels) of one BGR image, scores >= threshold."""
    from neoray.data.geometry import boxes_from_letterbox, clip_boxes, letterbox_image, letterbox_params

    height, width = image_bgr.shape[:2]
    rgb = cv2.cvtColor(image_bgr, cv2.COLOR_BGR2RGB)  # the shards (and so the model) are RGB
    canvas = letterbox_image(rgb, *size)
    scale, pad_x, pad_y = letterbox_params(width, height, *size)
    tensor = torch.from_numpy(np.ascontiguousarray(canvas.transpose(2, 0, 1)))[None].to(device)
    with torch.no_grad():
        output = model(tensor)[0]
    scores = output["scores"].float().cpu().numpy()
    keep = scores >= score_threshold
    boxes = output["boxes"].float().cpu().numpy()[keep]
    boxes = clip_boxes(boxes_from_letterbox(boxes, scale, pad_x, pad_y), width, height)
    return boxes, scores[keep], output["labels"].cpu().numpy()[keep]


def _read_image(path: str) -> np.ndarray | None:
    # imdecode on the bytes instead of imread: works for any storage and for names OpenCV cannot open.
    try:
        data = storage.read_bytes(path, max_bytes=MAX_IMAGE_BYTES)
    except OSError:
        return None
    return cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR) if data else None


def _output_path(out_dir: str, source: str, used: set[str]) -> str:
    """DIR/<stem>.png, with _1, _2 ... when two inputs share a stem."""
    stem, n = storage.basename(source).rsplit(".", 1)[0], 0
    while (name := f"{stem}.png" if n == 0 else f"{stem}_{n}.png") in used:
        n += 1
    used.add(name)
    return storage.join(out_dir, name)


def run(args) -> int:
    from neoray.config import ConfigError, parse_size
    from neoray.engine.inference import CheckpointError, load_model
    from neoray.engine.visualize import draw_detections, write_image_atomic

    try:
        model, meta = load_model(args.checkpoint, args.device)
        size = parse_size(args.size, "--size") if args.size else meta["size"]
        if size is None:
            raise ConfigError(f"{args.checkpoint}: checkpoint config has no data.size; pass --size WxH")
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"neoray predict: error: {exc}", file=sys.stderr)
        return 2
    names = [c["name"] for c in sorted(meta["categories"], key=lambda c: c["label"])]
    out_dir = storage.absolute(args.out)
    used: set[str] = set()
    failed = 0
    for image_arg in args.images:
        source = storage.absolute(image_arg)
        image = _read_image(source)
        if image is None:
            failed += 1
            print(f"{source}: cannot read image (missing, empty or not an image); skipped", file=sys.stderr)
            continue
        boxes, scores, labels = predict_image(model, image, size, args.device, args.score_threshold)
        target = _output_path(out_dir, source, used)
        write_image_atomic(target, draw_detections(image, boxes, labels, scores, names))
        print(f"{source}: {len(boxes)} detections (score >= {args.score_threshold:g}) -> {target}")
    done = len(args.images) - failed
    print(f"predicted {done} image(s) at {size[0]}x{size[1]}, {failed} unreadable; drawings in {out_dir}")
    return 1 if failed else 0


__all__ = ["add_arguments", "predict_image", "run"]
