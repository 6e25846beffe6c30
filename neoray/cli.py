"""neoray: train and sweep 16:9 object detectors on a Ray cluster.

Each subcommand is a module of ``neoray.commands`` that defines ``add_arguments(parser)`` and
``run(args) -> int``. Modules are imported only when their subcommand runs (the one place where an
import waits on purpose), so that ``neoray synth`` does not pay for importing torch and Ray.
"""

from __future__ import annotations

import argparse
import importlib
import os
import resource
import sys

from neoray import interrupts
from neoray.commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_TERMINATED

COMMANDS = {
    "synth": ("neoray.commands.synth", "write the embedded synthetic COCO dataset"),
    "prepare": ("neoray.commands.prepare", "COCO or YOLO -> validated 16:9 Parquet shards"),
    "check": ("neoray.commands.check", "verify shards against their manifest and summarise them"),
    "train": ("neoray.commands.train", "train a detector with Ray Train (DDP)"),
    "eval": ("neoray.commands.eval", "COCO evaluation of a checkpoint on a shard directory"),
    "predict": ("neoray.commands.predict", "draw a checkpoint's detections on images"),
    "export": ("neoray.commands.export", "a detector to ONNX, checked against PyTorch with onnxruntime"),
    "sweep": ("neoray.commands.sweep", "hyperparameter sweep: Ray Tune + Optuna + ASHA"),
    "report": ("neoray.commands.report", "Markdown report with plots for a finished sweep"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="neoray", description=__doc__.splitlines()[0],
                                     epilog="`neoray COMMAND --help` describes each command.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        sub_parser = sub.add_parser(name, help=help_text, description=help_text)
        # Only the chosen subcommand's module is imported (its arguments are needed to parse).
        if argv and argv[0] == name:
            importlib.import_module(module_name).add_arguments(sub_parser)
    return parser


def fit_an_address_space_limit() -> None:
    """Under an address-space limit (``ulimit -v``, which some batch schedulers set), OpenBLAS reserves a buffer
    and a stack per thread, one thread per CPU, when numpy is first imported: with torch's own reservations a
    4 GB limit was gone before a command could say anything (it died in native code). neoray does no BLAS work
    in numpy (torch has its own), so one OpenBLAS thread does; a user's own setting wins."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft != resource.RLIM_INFINITY:
        os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    fit_an_address_space_limit()  # before the command's module imports numpy
    try:
        parser = build_parser(argv)
        args = parser.parse_args(argv)
        if not args.command:
            parser.print_help()
            return EXIT_FAILED
        interrupts.install()  # SIGTERM does what Ctrl-C does
        module = importlib.import_module(COMMANDS[args.command][0])
        code = int(module.run(args) or 0)
    except KeyboardInterrupt:
        print(f"neoray: {interrupts.how_stopped()}", file=sys.stderr)
        code = EXIT_INTERRUPTED
    except (MemoryError, ImportError) as exc:
        if isinstance(exc, ImportError) and "failed to map segment" not in str(exc):
            raise  # a broken installation, not the machine's limit: its traceback names the package
        print(f"neoray {argv[0] if argv else ''}: out of memory {memory_limit_text()}", file=sys.stderr)
        code = EXIT_FAILED
    return exit_code(code)


def memory_limit_text() -> str:
    """What a MemoryError most likely means here: an address-space limit below what torch and Ray map when they
    load (about 4 GiB with a CUDA build of torch), or a machine out of memory."""
    soft, _ = resource.getrlimit(resource.RLIMIT_AS)
    if soft == resource.RLIM_INFINITY:
        return "(the machine has no memory left)"
    return (f"under the address-space limit of {soft / (1 << 30):.1f} GiB (ulimit -v): torch and Ray alone map about "
            f"4 GiB when they load; raise the limit")


def exit_code(code: int) -> int:
    """A command's exit status; an interrupted one exits 143 when SIGTERM stopped it, 130 for Ctrl-C."""
    return EXIT_TERMINATED if code == EXIT_INTERRUPTED and interrupts.terminated() else code


if __name__ == "__main__":
    sys.exit(main())
