"""``neoray eval CHECKPOINT --data SHARD_DIR``: COCO evaluation of a checkpoint on a shard directory.

Runs in one process: the shards are streamed with neoray.data.stream (Ray Data on the Ray instance of
neoray.cluster's policy: a private local one unless ``--address`` says otherwise), the model runs on
``--device`` with a progress bar, and the metrics are those of
neoray.evaluation.coco_eval (read its docstring for the exact conventions). Prints the overall metrics and
the per-class AP, writes the metrics JSON (``--out``, default ``eval_metrics.json`` next to the
checkpoint) and the detections as a COCO results JSON beside it (``<out stem>.detections.json``).
"""

from __future__ import annotations

import sys

from tqdm import tqdm

from neoray import storage
from neoray.cluster import ClusterError, add_address_argument, connect
from neoray.commands import EXIT_FAILED, EXIT_OK
from neoray.config import DataConfig, format_size
from neoray.data.stream import ShardSet, iter_eval_batches, quiet_ray_data
from neoray.evaluation.coco_eval import CocoEvaluator, format_metrics_table, json_safe, run_evaluator
from neoray.evaluation.inference import load_model


def add_arguments(parser) -> None:
    parser.add_argument("checkpoint", help="checkpoint directory or checkpoint.pt, a run directory (its best "
                                           "checkpoint), RUN_DIR/checkpoints/best|latest, a reference RT-DETR "
                                           ".pth or a Hugging Face RT-DETR folder; local or a URI")
    parser.add_argument("--data", required=True, help="shard directory written by `neoray prepare` (local or a URI)")
    parser.add_argument("--batch-size", type=int, default=8, help="images per forward pass (default 8)")
    parser.add_argument("--gt-json", default=None,
                        help="score against this COCO annotation file (the one the shards came from) "
                             "instead of the ground truth stored in the shards")
    parser.add_argument("--score-threshold", type=float, default=0.5,
                        help="score threshold of precision/recall/f1 (AP uses every detection)")
    parser.add_argument("--out", default=None, help="metrics JSON path (default: eval_metrics.json next to the "
                                                    "checkpoint)")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    add_address_argument(parser)


def default_metrics_path(checkpoint_file: str) -> str:
    return storage.join(storage.parent(checkpoint_file), "eval_metrics.json")


def detections_path(metrics_path: str) -> str:
    stem = storage.basename(metrics_path).rsplit(".", 1)[0]
    return storage.join(storage.parent(metrics_path), f"{stem}.detections.json")


def _check_categories(shard_dir, manifest_categories: list[dict], checkpoint_categories: list[dict]) -> None:
    def key(cats):
        return sorted((int(c["label"]), int(c["id"])) for c in cats)

    if key(manifest_categories) != key(checkpoint_categories):
        raise ValueError(f"{shard_dir}: the shards' categories (label -> id) differ from the checkpoint's; "
                         "evaluate on shards prepared from the same category list")


def _progress(batches, total_images: int):
    """A progress bar on stderr (images scored), instead of Ray Data's own log lines."""
    with tqdm(total=total_images, unit="img", desc="eval", file=sys.stderr, disable=not sys.stderr.isatty()) as bar:
        for batch in batches:
            yield batch
            bar.update(len(batch.images))


def run(args) -> int:
    if args.batch_size < 1:
        print("neoray eval: error: --batch-size must be >= 1", file=sys.stderr)
        return EXIT_FAILED
    try:
        model, meta = load_model(args.checkpoint, args.device)
        shard_set = ShardSet.open(storage.absolute(args.data))
        _check_categories(args.data, shard_set.categories, meta["categories"])
        # Evaluate at the size the model trained at; the stream rescales and the Batch's scale/pad follow.
        data_cfg = DataConfig(size=tuple(meta["size"])) if meta["size"] else None
        evaluator = CocoEvaluator(shard_set.categories, score_threshold=args.score_threshold, gt_json=args.gt_json)
        connect(args.address, log=None)
        quiet_ray_data()
        batches = _progress(iter_eval_batches(shard_set, args.batch_size, data_cfg), shard_set.num_rows)
        run_evaluator(model, batches, evaluator, args.device)
        metrics = evaluator.summarize()
        out = storage.absolute(args.out) if args.out else default_metrics_path(meta["file"])
        dets_out = detections_path(out)
        evaluator.write_detections(dets_out)
        record = {
            **json_safe(metrics),
            "checkpoint": meta["file"], "weights": meta["weights"], "epoch": meta["epoch"], "data": str(args.data),
            "gt_json": str(args.gt_json) if args.gt_json else None,
            "eval_size": format_size(data_cfg.size if data_cfg else shard_set.size),
            "detections_file": storage.basename(dets_out),
        }
        storage.write_json(out, record)
    except (ValueError, OSError, ClusterError) as exc:  # CheckpointError, ManifestError, StorageError ...
        print(f"neoray eval: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    print(f"{meta['model_name']} ({meta['weights']} weights, epoch {meta['epoch']}) on {args.data}: "
          f"{metrics['num_images']} images, {metrics['num_gt']} GT boxes, {metrics['num_detections']} detections")
    print(format_metrics_table(metrics))
    if metrics["duplicate_images"]:
        print(f"warning: {metrics['duplicate_images']} repeated image(s) in the stream were counted once")
    print(f"metrics: {out}\ndetections: {dets_out}")
    return EXIT_OK


__all__ = ["add_arguments", "default_metrics_path", "detections_path", "run"]
