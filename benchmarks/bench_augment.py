"""What the strong augmentations (data.mosaic, data.mixup, data.zoom) cost: images/s with each of them on
against all of them off, measured in one run, passes interleaved so that every configuration sees the same
machine load.

    python benchmarks/bench_augment.py [--images 480] [--src-size 960x540] [--size 640x360] [--batch-size 16]
                                       [--workers 2] [--passes 3] [--data-dir DIR] [--json FILE]

Every configuration adds its keys to the same baseline (multi-scale 80/90/100 %, hflip 0.5, colour jitter
0.4, as benchmarks/bench_data.py): off, zoom [0.5, 1.5], mosaic 1.0, mixup 1.0, and all three (mosaic 1.0,
mixup 0.5, zoom [0.5, 1.5]). Per configuration:

  batch task:    the CPU path's work without the pipeline: --workers processes running
                 neoray.data.augment.decode_augment_batch (decode, compose, resize, flip, jitter, CHW) on
                 the shards' JPEGs, whole batches with their draws; images per CPU second of those
                 processes (their process time: what a core does, whatever else runs on the machine).
  stream:        neoray.data.stream.iter_train_batches with data.decode=cpu (Ray Data reads, one Ray task
                 per batch), on --workers CPUs.
  tensor path:   neoray.data.tensor_augment on this machine's --device (default: cuda if there is one, else
                 cpu with --workers threads): decode_jpegs + apply_draw, batch by batch, on the first
                 --tensor-batches batches (default: all on cuda, 2 on the cpu, where the colour jitter's
                 exact OpenCV emulation makes it slow: the path exists for GPUs); images/s on cuda, images
                 per CPU second (all threads) on the cpu.

The stream's images/s are wall-clock rates: on a shared machine they move with the other load, which the
interleaved passes spread over all configurations alike; the CPU-time rates do not.

The first pass is a warm-up (imports, page cache, Ray Data's start) and is left out of the figures. Synthetic
data (neoray.data.synth + neoray.data.prepare, as bench_data.py) is made in a temporary directory first.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_data import make_data, multiscale_sizes, shard_jpegs  # noqa: E402

from neoray.config import DataConfig, parse_size  # noqa: E402
from neoray.data.augment import decode_augment_batch  # noqa: E402
from neoray.data.draws import draw_batch, strong_augment, train_sizes  # noqa: E402
from neoray.data.stream import ShardSet, iter_train_batches  # noqa: E402
from neoray.data.tensor_augment import apply_draw, decode_jpegs  # noqa: E402

CONFIGS = {
    "off": {},
    "zoom": {"zoom": [0.5, 1.5]},
    "mosaic": {"mosaic": 1.0},
    "mixup": {"mixup": 1.0},
    "all": {"mosaic": 1.0, "mixup": 0.5, "zoom": [0.5, 1.5]},
}


def data_config(size: tuple[int, int], extra: dict) -> DataConfig:
    return DataConfig(size=size, multiscale=multiscale_sizes(size), hflip=0.5, color_jitter=0.4, shuffle_buffer=64,
                      **extra)


def batch_draws(cfg: DataConfig, count: int, batch_size: int) -> list:
    strong = strong_augment(cfg, 0)
    return [draw_batch(train_sizes(cfg), cfg.hflip, cfg.color_jitter, batch_size, np.random.default_rng([0, 0, 0, k]),
                       strong) for k in range(count)]


# ----------------------------------------------------------------------------------------------------
# The batch task's work, --workers processes
# ----------------------------------------------------------------------------------------------------

_JPEGS: list = []


def _init(jpegs: list) -> None:
    _JPEGS[:] = jpegs


def _task(job: tuple[list[int], object]) -> float:
    """CPU seconds of one batch task."""
    indices, draw = job
    start = time.process_time()
    decode_augment_batch([_JPEGS[i][0] for i in indices], [_JPEGS[i][1] for i in indices], draw,
                         ["bench"] * len(indices))
    return time.process_time() - start


def task_rate(pool, batches: list[list[int]], draws: list) -> float:
    """Images per CPU second of the batch tasks."""
    return sum(len(b) for b in batches) / sum(pool.map(_task, list(zip(batches, draws)), chunksize=1))


# ----------------------------------------------------------------------------------------------------
# The stream and the tensor path
# ----------------------------------------------------------------------------------------------------


def stream_rate(shard_dir: Path, cfg: DataConfig, batch_size: int, epoch: int) -> float:
    start, images = time.perf_counter(), 0
    for batch in iter_train_batches(ShardSet.open(str(shard_dir)), batch_size, cfg, seed=0, epoch=epoch):
        images += len(batch)
    return images / (time.perf_counter() - start)


def tensor_rate(jpegs: list, batches: list[list[int]], draws: list, device: torch.device) -> float:
    """Images/s on cuda; images per CPU second of this process (all its threads) on the cpu."""
    clock = time.perf_counter if device.type == "cuda" else time.process_time
    start, images = clock(), 0
    for indices, draw in zip(batches, draws):
        decoded = torch.stack(decode_jpegs([jpegs[i][0] for i in indices], device))
        images += len(apply_draw(decoded, draw))
    if device.type == "cuda":
        torch.cuda.synchronize()
    return images / (clock() - start)


# ----------------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=480)
    parser.add_argument("--src-size", default="960x540", help="size of the original JPEGs (any aspect)")
    parser.add_argument("--size", default="640x360", help="shard / training size (16:9)")
    parser.add_argument("--workers", type=int, default=2, help="cores: batch-task processes, Ray CPUs, torch threads")
    parser.add_argument("--passes", type=int, default=3, help="passes per configuration; the first is a warm-up")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--device", default=None, help="the tensor path's device (default: cuda if any, else cpu)")
    parser.add_argument("--tensor-batches", type=int, default=None, help="batches the tensor path runs per pass "
                                                                          "(default: all on cuda, 2 on cpu)")
    parser.add_argument("--data-dir", default=None, help="make the data here, or reuse what a previous run made here")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def print_table(rates: dict, device: torch.device) -> None:
    tensor_unit = "img/s" if device.type == "cuda" else "img/CPU-s"
    print(f"later passes, ratio to 'off' in brackets; tensor path on {device}:")
    print(f"{'config':<8} {'batch task img/CPU-s':>22} {'stream img/s':>18} {'tensor path ' + tensor_unit:>22}")
    base = rates["off"]
    for name, r in rates.items():
        cells = [f"{r[k]:8.1f} ({r[k] / base[k]:4.2f}x)" for k in ("task", "stream", "tensor")]
        print(f"{name:<8} {cells[0]:>22} {cells[1]:>18} {cells[2]:>22}")


def main(argv=None) -> int:
    args = parse_args(argv)
    size, src_size = parse_size(args.size, "--size"), parse_size(args.src_size, "--src-size", require_16_9=False)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    torch.set_num_threads(args.workers)
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="neoray-bench-augment-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        make_data(tmp, args, size, src_size, data_config(size, {}))
        jpegs = shard_jpegs(tmp / "shards")
        batches = [list(range(i, i + args.batch_size)) for i in range(0, len(jpegs) - args.batch_size + 1,
                                                                       args.batch_size)]
        configs = {name: data_config(size, extra) for name, extra in CONFIGS.items()}
        draws = {name: batch_draws(cfg, len(batches), args.batch_size) for name, cfg in configs.items()}
        pool = multiprocessing.get_context("spawn").Pool(args.workers, initializer=_init, initargs=(jpegs,))
        import ray

        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        tensor_batches = args.tensor_batches or (len(batches) if device.type == "cuda" else 2)
        passes: dict = {name: [] for name in configs}
        for epoch in range(args.passes):  # interleaved: every configuration sees the same load
            for name, cfg in configs.items():
                passes[name].append({"task": task_rate(pool, batches, draws[name]),
                                     "stream": stream_rate(tmp / "shards", cfg, args.batch_size, epoch),
                                     "tensor": tensor_rate(jpegs, batches[:tensor_batches], draws[name], device)})
            print(f"pass {epoch + 1}: " + ", ".join(f"{n} {p[-1]['stream']:.1f}" for n, p in passes.items())
                  + " img/s (stream)", flush=True)
        pool.close()
        ray.shutdown()
        later = {name: {k: float(np.mean([p[k] for p in runs[1:] or runs])) for k in runs[0]}
                 for name, runs in passes.items()}
        print_table(later, device)
        if args.json:
            Path(args.json).write_text(json.dumps({"args": vars(args), "device": str(device), "passes": passes,
                                                   "later": later}, indent=2))
    finally:
        if not args.data_dir:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
