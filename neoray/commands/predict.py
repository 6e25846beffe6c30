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

from neoray import storage
from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.config import ConfigError, parse_size
from neoray.evaluation.inference import CheckpointError, load_model, predict_image
from neoray.evaluation.visualize import draw_detections, write_image_atomic

MAX_IMAGE_BYTES = 512 << 20  # a larger file is not an image this command should decode


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or checkpoint.pt, a run directory, a reference "
                                           "RT-DETR .pth or a Hugging Face RT-DETR folder; local or a URI")
    parser.add_argument("images", nargs="+", help="image files (anything OpenCV reads), local or URIs")
    parser.add_argument("--out", required=True, help="output directory for the drawn PNGs (local or a URI)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this")
    parser.add_argument("--size", default=None, help="16:9 input size WxH (default: the checkpoint's data.size)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


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
    try:
        model, meta = load_model(args.checkpoint, args.device)
        size = parse_size(args.size, "--size") if args.size else meta["size"]
        if size is None:
            raise ConfigError(f"{args.checkpoint}: checkpoint config has no data.size; pass --size WxH")
    except (CheckpointError, ConfigError, OSError) as exc:
        print(f"neoray predict: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
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
    return EXIT_FAILED if failed else EXIT_OK


__all__ = ["add_arguments", "run"]
