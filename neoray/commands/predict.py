"""``neoray predict CHECKPOINT IMAGE... --out DIR``: draw a checkpoint's detections on images.

Each image (any size or aspect) is letterboxed to the size the model trained at (or ``--size``), run
through the model, and the boxes are mapped back to the original image, where they are drawn with class
names and scores into ``DIR/<stem>.png``. Images are read as ``neoray prepare`` reads them
(neoray.data.image_files: regular files of bounded size, the pixel count checked in the header before
decoding, so a decompression bomb is never decoded). An image that cannot be read (or drawn into DIR) is
reported and counted; the others are still processed, and the exit status is 1 if any image failed. DIR
is checked before anything is predicted.
"""

from __future__ import annotations

import os
import sys
import tempfile
import uuid

import numpy as np

from neoray import storage
from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.config import ConfigError, parse_size
from neoray.data.image_files import DEFAULT_MAX_IMAGE_PIXELS, Refused, read_image
from neoray.evaluation.inference import load_model, predict_image
from neoray.evaluation.visualize import draw_detections, write_image_atomic

MAX_IMAGE_BYTES = 512 << 20  # a larger file is not an image this command should decode
MAX_IMAGE_PIXELS = DEFAULT_MAX_IMAGE_PIXELS  # what prepare decodes at most: 8K frames and 50-megapixel photos


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or checkpoint.pt, a run directory, a reference "
                                           "RT-DETR .pth or a Hugging Face RT-DETR folder; local or a URI")
    parser.add_argument("images", nargs="+", help="image files (anything OpenCV reads), local or URIs")
    parser.add_argument("--out", required=True, help="output directory for the drawn PNGs (local or a URI)")
    parser.add_argument("--score-threshold", type=float, default=0.3, help="draw detections scoring at least this")
    parser.add_argument("--size", default=None, help="16:9 input size WxH (default: the checkpoint's data.size)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def _read_image(path: str) -> np.ndarray | str:
    """The BGR image (EXIF orientation applied, as OpenCV shows it), or why it was not read."""
    try:
        loaded = read_image(path, max_bytes=MAX_IMAGE_BYTES, max_pixels=MAX_IMAGE_PIXELS, exif_orientation=True,
                            bytes_option=f"{MAX_IMAGE_BYTES >> 20} MiB", pixels_option="the limit of")
    except OSError as exc:  # object storage that fails: no property of the image, but this one is not read
        return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    if isinstance(loaded, Refused):
        return f"{loaded.reason}: {loaded.detail}" if loaded.detail else loaded.reason
    return loaded[0]


def _check_out_dir(out_dir: str) -> None:
    """Refuse (StorageError, one line), before anything is predicted, an output folder that cannot be
    created or written: a file, a folder under a file, one without write permission."""
    local = storage.local_path(out_dir)
    try:
        if local is not None:
            os.makedirs(local, exist_ok=True)
            with tempfile.TemporaryFile(dir=local):
                pass
        else:
            probe = storage.join(out_dir, f".neoray-write-check-{uuid.uuid4().hex}")
            storage.write_bytes(probe, b"")
            storage.remove(probe)
    except OSError as exc:
        if local is not None and os.path.exists(local) and not os.path.isdir(local):
            reason = "it is a file"
        else:
            reason = exc.strerror or str(exc).strip().splitlines()[0]
        raise storage.StorageError(f"--out {out_dir}: cannot write drawings there ({reason})") from None


def _output_path(out_dir: str, source: str, used: set[str]) -> str:
    """DIR/<stem>.png, with _1, _2 ... when two inputs share a stem."""
    stem, n = storage.basename(source).rsplit(".", 1)[0], 0
    while (name := f"{stem}.png" if n == 0 else f"{stem}_{n}.png") in used:
        n += 1
    used.add(name)
    return storage.join(out_dir, name)


def run(args) -> int:
    out_dir = storage.absolute(args.out)
    try:
        model, meta = load_model(args.checkpoint, args.device)
        size = parse_size(args.size, "--size") if args.size else meta["size"]
        if size is None:
            raise ConfigError(f"{args.checkpoint}: checkpoint config has no data.size; pass --size WxH")
        _check_out_dir(out_dir)  # before any image is predicted
    except (ValueError, OSError) as exc:  # CheckpointError, PretrainedError, ConfigError, StorageError ...
        print(f"neoray predict: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    names = [c["name"] for c in sorted(meta["categories"], key=lambda c: c["label"])]
    used: set[str] = set()
    unreadable = unwritten = 0
    for image_arg in args.images:
        source = storage.absolute(image_arg)
        shown = storage.printable(source)
        image = _read_image(source)
        if isinstance(image, str):
            unreadable += 1
            print(f"{shown}: cannot read image ({image}); skipped", file=sys.stderr)
            continue
        boxes, scores, labels = predict_image(model, image, size, args.device, args.score_threshold)
        target = _output_path(out_dir, source, used)
        try:
            write_image_atomic(target, draw_detections(image, boxes, labels, scores, names))
        except (OSError, ValueError) as exc:  # the folder went away or filled up meanwhile
            unwritten += 1
            print(f"{shown}: drawing not written ({str(exc).strip().splitlines()[0]})", file=sys.stderr)
            continue
        print(f"{shown}: {len(boxes)} detections (score >= {args.score_threshold:g}) -> {storage.printable(target)}")
    done = len(args.images) - unreadable - unwritten
    not_written = f", {unwritten} not written" if unwritten else ""
    print(f"predicted {done} image(s) at {size[0]}x{size[1]}, {unreadable} unreadable{not_written}; drawings in "
          f"{storage.printable(out_dir)}")
    return EXIT_FAILED if unreadable or unwritten else EXIT_OK


__all__ = ["add_arguments", "run"]
