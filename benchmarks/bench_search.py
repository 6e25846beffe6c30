"""Search quality: does a neoray sweep find the better detector for an epoch budget, and can ASHA be trusted?

Measured as hyperparameter-optimisation research measures searchers (tabular benchmarks): a fixed design of
configurations is trained once to full length with neoray's own training function, recording every epoch,
and every method is replayed on the recorded curves through Ray Tune (neoray.tune.replay).

    # 1. ground truth (about an hour per task on 2 cores; resumable: finished configurations are kept)
    python benchmarks/bench_search.py ground-truth --task default
    python benchmarks/bench_search.py ground-truth --task dense
    # 2. the same configurations at half resolution, for the first epochs (resolution as a fidelity)
    python benchmarks/bench_search.py ground-truth --task default --size 160x90 --stop-after 4
    # 3. the replay: methods x seeds on the tables (minutes), the figures README quotes
    python benchmarks/bench_search.py replay --seeds 20
    python benchmarks/bench_search.py fidelity

Tables live in benchmarks/data/ (search_<task>.csv, one row per configuration, size and epoch, and
search_<task>.json with the command, the commit and the machine that made them); the replay writes
benchmarks/data/replay_<task>.json and search_quality.png.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

from neoray import storage  # noqa: E402
from neoray.config import format_size, load_config, parse_size  # noqa: E402
from neoray.configs import DEFAULT_CONFIG  # noqa: E402
from neoray.data.demo import ensure_default_data  # noqa: E402
from neoray.engine.context import LocalContext, ShardBatches  # noqa: E402
from neoray.engine.loop import run_training_loop  # noqa: E402
from neoray.tune.replay import TABLE_COLUMNS  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
TASKS = {
    # the README's default sweep: its synthetic data, its model and training config
    "default": {"layout": "shapes"},
    # many small objects per image (12-30 shapes of 7-22 px): the same detector on a harder task
    "dense": {"layout": "dense"},
}
# The design: 4 learning rates (a factor of 2 apart) x 2 warmups x 3 batch pairs = 24 configurations over
# the default space, every one trained to the full budget of EPOCHS epochs. (A batch of 2 was left out: on
# 2 cores it trains 1.4x slower per image than 4, and lr 4e-3 at batch 2 reached mAP50 0.22 in 16 epochs.)
DESIGN_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
DESIGN_WARMUPS = (20, 100)
DESIGN_BATCHES = ("4x1", "4x2", "8x1")  # effective batches 4, 8 (accumulated) and 8
EPOCHS = 12


def design() -> list[dict]:
    points = []
    for batch in DESIGN_BATCHES:
        for warmup in DESIGN_WARMUPS:
            for lr in DESIGN_LRS:
                points.append({"config": f"c{len(points) + 1:02d}", "lr": lr, "warmup_steps": warmup, "batch": batch})
    return points


class StopAfter(Exception):
    """Raised by the context's report to end a run after ``--stop-after`` epochs (low-fidelity rows)."""


class RecordingContext(LocalContext):
    """A plain-process context that records each epoch's metrics and wall time, and can end the run."""

    def __init__(self, data, stop_after: int):
        super().__init__(data)
        self.stop_after, self.rows, self._last = stop_after, [], time.perf_counter()

    def report(self, metrics: dict, checkpoint_dir: str | None) -> None:
        now = time.perf_counter()
        self.rows.append({**metrics, "seconds": round(now - self._last, 2)})
        self._last = now
        if self.stop_after and metrics["epoch"] >= self.stop_after:
            raise StopAfter()


def _connect_worker(address: str, threads: int) -> None:
    """A training process: joins the benchmark's own Ray instance (for Ray Data) with ``threads`` torch
    threads. Processes, not Ray tasks: inside a Ray task the same run was 4x slower per epoch here."""
    torch.set_num_threads(threads)
    ray.init(address=address, configure_logging=False, log_to_driver=False)


def train_point(point: dict, shards: dict, size: tuple[int, int], epochs: int, stop_after: int) -> list[dict]:
    """One configuration trained with neoray's own training function; its per-epoch rows."""
    batch_size, accumulate = (int(v) for v in point["batch"].split("x"))
    cfg = load_config(DEFAULT_CONFIG, {
        "data.train": str(shards["train"]), "data.val": str(shards["val"]), "data.size": format_size(size),
        "train.lr": point["lr"], "train.warmup_steps": point["warmup_steps"], "train.batch_size": batch_size,
        "train.accumulate": accumulate, "train.epochs": epochs, "train.eval_every": 1,
    })
    ctx = RecordingContext(ShardBatches(cfg), stop_after)
    try:
        run_training_loop(cfg, ctx, log=None)
    except StopAfter:
        pass
    return ctx.rows


def _git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                              cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _read_rows(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def _write_rows(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=TABLE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(str(path), out.getvalue())


def ground_truth(args) -> None:
    size = parse_size(args.size or "320x180", "--size")
    path = Path(args.data_dir) / f"search_{args.task}.csv"
    rows = _read_rows(path)
    done = {(r["config"], r["size"]) for r in rows}
    shards = ensure_default_data(layout=TASKS[args.task]["layout"])
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    threads = max(1, cpus // args.parallel)
    started = time.time()
    todo = [p for p in design()[:args.configs or None] if (p["config"], format_size(size)) not in done]
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=spawn, initializer=_connect_worker,
                             initargs=(ray.get_runtime_context().gcs_address, threads)) as pool:
        futures = {pool.submit(train_point, p, shards, size, args.epochs, args.stop_after): p for p in todo}
        for future in as_completed(futures):
            _record_point(args, size, futures[future], future.result(), rows, path)
    _write_record(args, size, time.time() - started, threads)


def _record_point(args, size, point: dict, epochs: list[dict], rows: list[dict], path: Path) -> None:
    """Add one configuration's rows to the table and rewrite it (a killed run keeps what it finished)."""
    for m in epochs:
        rows.append({"task": args.task, **point, "size": format_size(size), "epoch": m["epoch"], "score": m["score"],
                     "loss": m.get("loss", ""), "map": m.get("map", ""), "map50": m.get("map50", ""),
                     "seconds": m["seconds"]})
    _write_rows(path, rows)
    last = epochs[-1]
    print(f"{args.task} {format_size(size)} {point['config']} lr {point['lr']:g} warmup {point['warmup_steps']} "
          f"batch {point['batch']}: {len(epochs)} epochs in {sum(m['seconds'] for m in epochs):.0f} s, final mAP "
          f"{last.get('map', float('nan')):.4f} mAP50 {last.get('map50', float('nan')):.4f}", flush=True)


def _write_record(args, size, seconds: float, threads: int) -> None:
    """search_<task>.json: the command, commit and machine behind each size's rows."""
    path = Path(args.data_dir) / f"search_{args.task}.json"
    record = json.loads(path.read_text()) if path.exists() else {}
    record[format_size(size)] = {
        "command": "python benchmarks/bench_search.py " + " ".join(sys.argv[1:]), "commit": _git_commit(),
        "epochs": args.epochs, "stop_after": args.stop_after, "design": design(),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs; {args.parallel} configurations at a time, "
                   f"{threads} torch thread(s) each",
        "seconds_this_invocation": round(seconds),
    }
    storage.write_json(str(path), record, indent=2)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="step", required=True)
    gt = sub.add_parser("ground-truth", help="train the design to full length (or --stop-after N epochs)")
    gt.add_argument("--task", choices=sorted(TASKS), required=True)
    gt.add_argument("--size", default=None, help="training and evaluation size (default 320x180)")
    gt.add_argument("--epochs", type=int, default=EPOCHS, help=f"the schedule's length (default {EPOCHS})")
    gt.add_argument("--stop-after", type=int, default=0, help="end each run after N epochs (0: run them all)")
    gt.add_argument("--configs", type=int, default=0, help="only the first N configurations (a smoke run)")
    gt.add_argument("--data-dir", default=str(DATA_DIR), help="where the tables go (default benchmarks/data)")
    gt.add_argument("--parallel", type=int, default=max(2, (os.cpu_count() or 1) // 2),
                    help="configurations trained at a time (default: half the CPUs, at least 2; on 2 cores two "
                         "1-thread runs trained 1.3x faster than one 2-thread run)")
    args = parser.parse_args(argv)
    if args.step == "ground-truth":
        ground_truth(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
