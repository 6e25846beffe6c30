"""Overhead of Ray Train: the training function under TorchTrainer (1 worker) against the same loop in a
plain process (LocalContext), same model, same shards, same Ray Data stream, measured in one run.

Reported per path: the fixed start-up cost (from the call until the first epoch's report, minus one
steady epoch) and the steady-state rate (images between the first and the last report divided by the
wall time between them: it includes per-epoch checkpointing and Ray's report barrier). Goal: ratio of
the steady rates (Train / plain) >= 0.95.

    python benchmarks/bench_train_overhead.py                      # CPU: rtdetr_cpu at 320x180
    python benchmarks/bench_train_overhead.py --model rtdetr_r50 --size 1920x1080 --device cuda \\
        --images 256 --batch 4 --epochs 4                          # a GPU machine, AMP auto (bf16/fp16)
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


def make_shards(root: Path, images: int, size: tuple[int, int]) -> Path:
    from neoray.data.prepare import prepare_coco
    from neoray.data.synth import write_synthetic_dataset

    paths = write_synthetic_dataset(root / "synth", train=images, val=1, size=size, classes=6, seed=0)
    prepare_coco(paths["train_annotations"], paths["train_images"], root / "shards", size=size, workers=2)
    return root / "shards"


def rate_and_startup(start: float, report_times: list[float], images_per_epoch: int) -> tuple[float, float]:
    """(steady images/s, fixed start-up seconds) from the wall-clock times of the epoch reports."""
    epochs = len(report_times)
    steady = images_per_epoch * (epochs - 1) / (report_times[-1] - report_times[0])
    startup = report_times[0] - start - images_per_epoch / steady
    return steady, startup


def run_plain(cfg) -> tuple[list[float], float, float]:
    from neoray.engine.context import LocalContext
    from neoray.engine.loop import run_training_loop
    from neoray.engine.shard_batches import ShardBatches

    class TimedContext(LocalContext):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            times.append(time.time())
            peaks.append(metrics.get("peak_mem_mb") or 0.0)

    import torch

    # Ray gives a worker OMP_NUM_THREADS = its CPUs (cpus_per_worker); use as many torch threads here, so
    # the ratio measures Ray Train's overhead and not a different thread count.
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(max(1, int(cfg.train.cpus_per_worker)))
    times: list[float] = []
    peaks: list[float] = []
    start = time.time()
    ctx = TimedContext(ShardBatches(cfg))
    try:
        run_training_loop(cfg, ctx, log=None)
    finally:
        torch.set_num_threads(previous_threads)
    return times, start, max(peaks, default=0.0)


def run_ray_train(cfg, run_dir: Path) -> tuple[list[float], float, float]:
    from neoray.run.trainer import RunRecorder, build_trainer

    run_dir.mkdir(parents=True)
    start = time.time()
    trainer = build_trainer(cfg, str(run_dir), callbacks=[RunRecorder(str(run_dir), verbose=False)])
    trainer.fit()
    rows = json.loads((run_dir / "metrics.json").read_text())
    # RunRecorder stamps each row when the controller receives it (same machine, same clock).
    return [row["time"] for row in rows], start, max((row.get("peak_mem_mb") or 0.0 for row in rows), default=0.0)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="rtdetr_cpu")
    parser.add_argument("--size", default="320x180")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--images", type=int, default=48, help="training images (synthetic)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=4, help=">= 2: the first epoch is start-up")
    parser.add_argument("--amp", default="auto")
    parser.add_argument("--cpus-per-worker", type=float, default=1.0, help="CPU threads of the worker (both paths)")
    parser.add_argument("--options", default="{}", help="JSON model options, e.g. '{\"hidden_dim\": 32}'")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2")

    import ray

    from neoray.config import from_dict, parse_size

    size = parse_size(args.size)
    work = Path(tempfile.mkdtemp(prefix="neoray-bench-"))
    shards = make_shards(work, args.images, size)
    cfg = from_dict({
        "model": {"name": args.model, "options": json.loads(args.options)},
        "data": {"train": str(shards), "size": args.size, "shuffle_buffer": 0},
        "train": {"epochs": args.epochs, "batch_size": args.batch, "workers": 1, "amp": args.amp,
                  "use_gpu": args.device == "cuda", "max_failures": 0, "warmup_steps": 5,
                  "cpus_per_worker": args.cpus_per_worker},
    })
    images_per_epoch = (args.images // args.batch) * args.batch
    ray.init(configure_logging=False, log_to_driver=False)  # dashboard on: Train V2's cleaner needs the State API
    try:
        plain_times, plain_start, plain_peak = run_plain(cfg)
        train_times, train_start, train_peak = run_ray_train(cfg, work / "run")
    finally:
        ray.shutdown()
    plain_rate, plain_startup = rate_and_startup(plain_start, plain_times, images_per_epoch)
    train_rate, train_startup = rate_and_startup(train_start, train_times, images_per_epoch)
    print(f"model {args.model} {args.size} on {args.device}, batch {args.batch}, {images_per_epoch} images/epoch, "
          f"{args.epochs} epochs")
    # Peak memory: the device's peak allocation on CUDA, the process's peak RSS on CPU (see the loop).
    for label, startup, rate, peak in (("plain process", plain_startup, plain_rate, plain_peak),
                                       ("TorchTrainer ", train_startup, train_rate, train_peak)):
        print(f"{label} : start-up {startup:6.1f} s, steady {rate:8.2f} images/s, peak {peak:8.0f} MiB")
    print(f"ratio (TorchTrainer / plain, steady): {train_rate / plain_rate:.3f}  (goal >= 0.95); "
          f"extra start-up {train_startup - plain_startup:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
