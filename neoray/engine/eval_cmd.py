"""``neoray eval CHECKPOINT --data SHARD_DIR``: COCO evaluation of a checkpoint on a shard directory.

Runs in one process: the shards are streamed with neoray.data.stream (Ray Data on a local Ray instance
started here when none is running), the model runs on ``--device``, and the metrics are those of
neoray.engine.coco_eval (read its docstring for the exact conventions). Prints the overall metrics and
the per-class AP, writes the metrics JSON (``--out``, default ``eval_metrics.json`` next to the
checkpoint) and the detections as a COCO results JSON beside it (``<out stem>.detections.json``).
"""

from __future__ import annotations

import sys
from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or checkpoint.pt")
    parser.add_argument("--data", required=True, help="shard directory written by `neoray prepare`")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--gt-json", default=None,
                        help="score against this COCO annotation file (the one the shards came from) "
                             "instead of the ground truth stored in the shards")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="score threshold of precision/recall/f1 (AP uses every detection)")
    parser.add_argument("--out", default=None, help="metrics JSON path (default: eval_metrics.json next to the "
                                                    "checkpoint)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")


def default_metrics_path(checkpoint: str | Path) -> Path:
    path = Path(checkpoint)
    return (path if path.is_dir() else path.parent) / "eval_metrics.json"


def detections_path(metrics_path: Path) -> Path:
    return metrics_path.with_name(f"{metrics_path.stem}.detections.json")


def _check_categories(shard_dir, manifest_categories: list[dict], checkpoint_categories: list[dict]) -> None:
    def key(cats):
        return sorted((int(c["label"]), int(c["id"])) for c in cats)

    if key(manifest_categories) != key(checkpoint_categories):
        raise ValueError(f"{shard_dir}: the shards' categories (label -> id) differ from the checkpoint's; "
                         "evaluate on shards prepared from the same category list")


def _eval_batches(shard_dir, batch_size: int, size):
    """Batches of the whole eval stream in this process (a local Ray instance runs the Ray Data reads)."""
    import ray

    from neoray.data.stream import eval_dataset, iter_eval_batches

    started = False
    if not ray.is_initialized():
        ray.init(num_cpus=2, include_dashboard=False, configure_logging=False, log_to_driver=False)
        started = True
    try:
        yield from iter_eval_batches(eval_dataset(shard_dir), batch_size, size=size)
    finally:
        if started:
            ray.shutdown()


def run(args) -> int:
    from neoray.config import format_size
    from neoray.data.shards import read_manifest
    from neoray.engine.coco_eval import (
        CocoEvaluator, format_metrics_table, json_safe, run_evaluator, write_json_atomic,
    )
    from neoray.engine.inference import load_model

    if args.batch_size < 1:
        print("neoray eval: error: --batch-size must be >= 1", file=sys.stderr)
        return 2
    try:
        model, meta = load_model(args.checkpoint, args.device)
        manifest = read_manifest(args.data)
        _check_categories(args.data, manifest["categories"], meta["categories"])
        shard_size = tuple(manifest["size"])
        # Evaluate at the size the model trained at; the stream rescales and the Batch's scale/pad follow.
        size = meta["size"] if meta["size"] and tuple(meta["size"]) != shard_size else None
        evaluator = CocoEvaluator(manifest["categories"], score_threshold=args.score_threshold,
                                  gt_json=args.gt_json)
        run_evaluator(model, _eval_batches(args.data, args.batch_size, size), evaluator, args.device)
        metrics = evaluator.summarize()
    except (ValueError, FileNotFoundError) as exc:  # CheckpointError and ManifestError are ValueErrors
        print(f"neoray eval: error: {exc}", file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else default_metrics_path(args.checkpoint)
    dets_out = detections_path(out)
    evaluator.write_detections(dets_out)
    record = {
        **json_safe(metrics),
        "checkpoint": meta["file"], "weights": meta["weights"], "epoch": meta["epoch"], "data": str(args.data),
        "gt_json": str(args.gt_json) if args.gt_json else None, "eval_size": format_size(size or shard_size),
        "detections_file": dets_out.name,
    }
    write_json_atomic(out, record)
    print(f"{meta['model_name']} ({meta['weights']} weights, epoch {meta['epoch']}) on {args.data}: "
          f"{metrics['num_images']} images, {metrics['num_gt']} GT boxes, {metrics['num_detections']} detections")
    print(format_metrics_table(metrics))
    if metrics["duplicate_images"]:
        print(f"warning: {metrics['duplicate_images']} repeated image(s) in the stream were counted once")
    print(f"metrics: {out}\ndetections: {dets_out}")
    return 0


__all__ = ["add_arguments", "default_metrics_path", "detections_path", "run"]
