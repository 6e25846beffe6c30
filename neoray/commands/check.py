"""``neoray check SHARD_DIR``: verify shards against their manifest and summarise them (neoray.data.check)."""

from __future__ import annotations

import sys

from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.data.check import check_shards


def add_arguments(parser) -> None:
    parser.add_argument("shard_dir", metavar="SHARD_DIR",
                        help="a directory written by `neoray prepare`: a path or a URI (s3://bucket/prefix)")
    parser.add_argument("--decode-every", type=int, default=1, metavar="N",
                        help="decode every N-th image to check its size (default 1: all)")


def run(args) -> int:
    result = check_shards(args.shard_dir, decode_every=args.decode_every)
    if result.summary:
        print(result.summary_text())
    if result.ok:
        print("OK")
        return EXIT_OK
    if len(result.problems) == 1:  # e.g. no manifest: the one-line error of any command
        print(f"neoray check: {result.problems[0]}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{len(result.problems)} problems:", file=sys.stderr)
    for line in result.problems:
        print(f"  {line}", file=sys.stderr)
    return EXIT_FAILED
