"""``neoray synth OUT_DIR``: write the embedded synthetic COCO dataset (neoray.data.synth).

Only numpy and cv2 are imported: ``neoray synth`` does not pay for torch or Ray."""

from __future__ import annotations

import sys

from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.config import ConfigError
from neoray.data.synth import LAYOUT_NAMES, SHAPES, write_synthetic_dataset
from neoray.data.synth_photo import KINDS


def add_arguments(parser) -> None:
    parser.add_argument("out_dir", metavar="OUT_DIR", help="where to write train/, val/ and annotations/")
    parser.add_argument("--train", type=int, default=256, help="number of training images (default 256)")
    parser.add_argument("--val", type=int, default=64, help="number of validation images (default 64)")
    parser.add_argument("--size", default="320x180", help="image size WxH (default 320x180)")
    parser.add_argument("--classes", type=int, default=None,
                        help=f"number of classes: shapes 1..{len(SHAPES)} (default 6); photo: the kinds labelled, "
                             f"1..{len(KINDS)} ({', '.join(k[1] for k in KINDS)}; default 1, the others drawn "
                             "unlabelled)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed writes the same dataset")
    parser.add_argument("--aspect-mix", action="store_true",
                        help="make some images 4:3 and some portrait, to exercise letterboxing")
    parser.add_argument("--layout", choices=list(LAYOUT_NAMES), default="shapes",
                        help="shapes: 1-6 objects of every size (default); dense: 12-30 small objects per image; "
                             "photo: 8-64 px vehicles and structures seen from above in cluttered, "
                             "photographed-looking scenes, validation from another site (neoray.data.synth_photo)")


def run(args) -> int:
    try:
        out = write_synthetic_dataset(args.out_dir, train=args.train, val=args.val, size=args.size,
                                      classes=args.classes, seed=args.seed, aspect_mix=args.aspect_mix,
                                      layout=args.layout)
    except (ConfigError, ValueError, OSError) as exc:  # OSError: the folder or bucket cannot be written
        print(f"neoray synth: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    names = ", ".join(f"{c['id']}={c['name']}" for c in out["categories"])
    print(f"wrote {args.train} train + {args.val} val images ({args.layout}) to {out['root']} (categories {names})")
    return EXIT_OK
