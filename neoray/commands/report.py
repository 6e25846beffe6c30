"""``neoray report SWEEP_DIR``: a Markdown report with plots for a sweep (neoray.tune.report)."""

from __future__ import annotations

import sys

from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.config import ConfigError
from neoray.tune.report import write_report


def add_arguments(parser) -> None:
    parser.add_argument("sweep_dir", metavar="SWEEP_DIR",
                        help="a sweep directory (OUTPUT/NAME of neoray sweep), local or a URI")


def run(args) -> int:
    try:
        out = write_report(args.sweep_dir)
    except (ConfigError, OSError, ValueError) as exc:  # StorageError, a broken sweep.json ...
        print(f"neoray report: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"wrote {out}")
    return EXIT_OK
