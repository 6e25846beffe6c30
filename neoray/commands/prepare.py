"""``neoray prepare``: COCO or YOLO -> validated 16:9 Parquet shards (neoray.data.prepare)."""

from __future__ import annotations

import math
import os
import sys

from neoray import cluster
from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.config import ConfigError, parse_size
from neoray.data import sources as src
from neoray.data.image_files import DEFAULT_MAX_IMAGE_PIXELS
from neoray.data.prepare import PrepareResult, prepare_coco, prepare_yolo

_BYTE_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30}


def parse_bytes(text: str, key: str = "--max-image-bytes") -> int:
    """``"268435456"``, ``"256M"``, ``"1G"`` (powers of 1024) -> bytes."""
    value = str(text).strip().lower().removesuffix("b").removesuffix("i")
    unit = value[-1:] if value[-1:] in _BYTE_UNITS else ""
    try:
        number = float(value[:len(value) - len(unit)])
    except ValueError:
        raise ConfigError(f"{key}: expected a byte count like 268435456 or 256M, got {text!r}") from None
    if not (math.isfinite(number) and number >= 1):
        raise ConfigError(f"{key}: must be at least 1 byte, got {text!r}")
    return int(number * _BYTE_UNITS[unit])


def parse_pixels(text: str, key: str = "--max-image-pixels") -> int:
    """``"67108864"`` or ``"8192x8192"`` -> pixels."""
    if "x" in str(text).lower():
        width, height = parse_size(text, key, require_16_9=False)
        return width * height
    try:
        pixels = int(str(text).strip())
    except ValueError:
        raise ConfigError(f"{key}: expected a pixel count like 67108864 or 8192x8192, got {text!r}") from None
    if pixels < 1:
        raise ConfigError(f"{key}: must be at least 1, got {text!r}")
    return pixels


def add_arguments(parser) -> None:
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--coco", metavar="ANN.json", help="COCO annotation file (with --images); a path or URI")
    source.add_argument("--yolo", metavar="DATA_DIR", help="Ultralytics dataset folder holding data.yaml")
    parser.add_argument("--images", metavar="IMG_DIR", help="COCO: folder the file_names are relative to")
    parser.add_argument("--split", choices=("train", "val"), default="train", help="YOLO: which split (train)")
    parser.add_argument("--out", required=True, metavar="SHARD_DIR",
                        help="output shard directory: a path, a shared mount or a URI (s3://bucket/prefix)")
    parser.add_argument("--size", required=True, metavar="WxH", help="target size, exactly 16:9 (e.g. 1920x1080)")
    parser.add_argument("--strict", action="store_true", help="exit 1 if any problem was found (report still written)")
    parser.add_argument("--workers", type=int, default=None,
                        help="worker processes (default: all CPUs; with Ray: the cluster's CPUs)")
    parser.add_argument("--quality", type=int, default=90, help="JPEG quality 1..100 (default 90)")
    parser.add_argument("--rows-per-shard", type=int, default=256,
                        help="images per shard file, at most (default 256; fewer when there are fewer images than "
                             "workers x this, so that every worker gets a shard)")
    parser.add_argument("--max-image-pixels", default=str(DEFAULT_MAX_IMAGE_PIXELS), metavar="N|WxH",
                        help="skip images whose header declares more pixels (default 8192x8192 = "
                             f"{DEFAULT_MAX_IMAGE_PIXELS}); refused before decoding")
    parser.add_argument("--max-image-bytes", default="256M", metavar="N",
                        help="skip image files bigger than this (default 256M; K/M/G suffixes are powers of 1024)")
    parser.add_argument("--ray", action="store_true",
                        help="run the shard tasks on a Ray cluster (implied by --address or RAY_ADDRESS)")
    cluster.add_address_argument(parser)


def _run(args) -> PrepareResult:
    size = parse_size(args.size, "--size")
    use_ray = args.ray or args.address is not None or bool(os.environ.get(cluster.ADDRESS_ENV))
    options = dict(strict=args.strict, workers=args.workers, quality=args.quality,
                   rows_per_shard=args.rows_per_shard, max_image_pixels=parse_pixels(args.max_image_pixels),
                   max_image_bytes=parse_bytes(args.max_image_bytes), ray=use_ray, address=args.address)
    if args.coco:
        if not args.images:
            raise ConfigError("--coco needs --images IMG_DIR (the folder its file_names are relative to)")
        return prepare_coco(args.coco, args.images, args.out, size, **options)
    return prepare_yolo(args.yolo, args.out, size, split=args.split, **options)


def _os_error_text(exc: OSError) -> str:
    if exc.filename and exc.strerror:
        return f"{exc.filename}: {exc.strerror}"
    return str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__


def run(args) -> int:
    try:
        result = _run(args)
    except (ConfigError, src.SourceError, cluster.ClusterError) as exc:
        print(f"neoray prepare: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except OSError as exc:  # the output folder cannot be created, a bucket does not exist, ...
        print(f"neoray prepare: error: {_os_error_text(exc)}", file=sys.stderr)
        return EXIT_FAILED
    print(result.summary())
    if args.strict and result.problems:
        print(f"neoray prepare: --strict: {result.problems} problems (see {result.report_path})", file=sys.stderr)
        return EXIT_FAILED
    return EXIT_OK
