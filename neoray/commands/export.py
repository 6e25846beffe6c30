"""``neoray export CHECKPOINT --out model.onnx [--size WxH] [--batch N|dynamic]``: a detector to ONNX.

CHECKPOINT is anything ``neoray predict`` takes (a run directory, a checkpoint, a reference RT-DETR
``.pth``, a Hugging Face folder). The model, its contract, the verification and the tolerances are
neoray.export.onnx's; this module parses, prints and turns failures into one line.
"""

from __future__ import annotations

import sys

from neoray import storage
from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.config import ConfigError, format_size
from neoray.evaluation.inference import CheckpointError, load_model
from neoray.export.onnx import (
    BOX_TOLERANCE_PX,
    SCORE_TOLERANCE,
    ExportError,
    check_size,
    export_detector,
    import_runtime,
    parse_batch,
)

DEFAULT_SIZE = (1920, 1080)  # for weights that record no training size (a reference .pth, Hugging Face)


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="run directory (its best checkpoint), checkpoint directory or "
                                           "checkpoint.pt, a reference RT-DETR .pth or a Hugging Face RT-DETR "
                                           "folder; local or a URI")
    parser.add_argument("--out", required=True, help="the .onnx file to write (local or a URI)")
    parser.add_argument("--size", default=None, help="16:9 input size WxH (default: the checkpoint's data.size, "
                                                     f"else {format_size(DEFAULT_SIZE)})")
    parser.add_argument("--batch", default="1", help="images per run: a fixed N, or 'dynamic' for a batch axis "
                                                     "of any size (default 1)")


def _print_report(report) -> None:
    batch = "dynamic" if report.batch is None else str(report.batch)
    print(f"exported {report.model_name} at {format_size(report.size)}, batch {batch}, opset {report.opset} "
          f"-> {report.out} ({report.num_bytes / 2**20:.1f} MiB)")
    print(f"onnxruntime vs PyTorch on {report.images} sample image(s): max |boxes| difference "
          f"{report.max_box_diff:.2g} px (tolerance {BOX_TOLERANCE_PX:g}), max |scores| difference "
          f"{report.max_score_diff:.2g} (tolerance {SCORE_TOLERANCE:g})")
    print(f"onnxruntime CPU latency: {report.latency_ms:.1f} ms per batch of {report.latency_batch} "
          f"(median of {report.latency_runs} runs)")


def run(args) -> int:
    try:
        import_runtime()  # before loading anything: a missing extra is the first thing to say
        batch = parse_batch(args.batch)
        size = check_size(args.size) if args.size else None
        out = storage.absolute(args.out)
        if storage.is_dir(out):
            raise ConfigError(f"--out: {out} is a directory; name the .onnx file")
        model, meta = load_model(args.checkpoint, "cpu")
        size = size or check_size(meta["size"] or DEFAULT_SIZE)
        print(f"exporting {meta['model_name']} ({meta['num_classes']} classes, {meta['weights']} weights) at "
              f"{format_size(size)}; verifying with onnxruntime ...", flush=True)
        report = export_detector(model, meta, out, size, batch)
    except (ExportError, CheckpointError, ConfigError, OSError) as exc:
        print(f"neoray export: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    _print_report(report)
    return EXIT_OK


__all__ = ["add_arguments", "run"]
