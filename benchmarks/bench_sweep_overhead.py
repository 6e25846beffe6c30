"""Overhead of a sweep per trial: wall time of an N-trial sweep against the sum of its trials' own training
time, one trial at a time, measured in one run (same Ray instance, same shards, same model).

A trial's own training time is estimated from its epoch reports as in bench_train_overhead.py: the
steady epochs (report 2..E, Tune's ``time_this_iter_s``) scaled to all E epochs, i.e. the first epoch
counted at the steady rate. Everything else is overhead: Tune scheduling and the trial actor's start,
building the datasets and the model, the first epoch's warm-up, and on the TorchTrainer path the
trainer's controller and worker group (placement group, worker processes, DDP setup).

    overhead per trial = (sweep wall time - sum of own training times) / N

Paths: ``direct`` (1 worker: the loop runs inside the Tune trial) and, with ``--torch-trainer``,
``trainer`` (a TorchTrainer per trial with ``--workers-per-trial 2``). Reference before neoray's direct
path: a Tune trial building a 1-worker TorchTrainer cost ~45 s of overhead, a plain Tune function
trainable ~8 s; goal < 5 s per trial on the direct path.

    python benchmarks/bench_sweep_overhead.py                         # N=4, direct path
    python benchmarks/bench_sweep_overhead.py --trials 4 --torch-trainer
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


def make_shards(root: Path, images: int, size: tuple[int, int]) -> dict:
    from neoray.data.prepare import prepare_coco
    from neoray.data.synth import write_synthetic_dataset

    write_synthetic_dataset(root / "synth", train=images, val=8, size=size, classes=4, seed=0)
    out = {}
    for split in ("train", "val"):
        prepare_coco(root / "synth" / "annotations" / f"instances_{split}.json", root / "synth" / split,
                     root / "shards" / split, size=size, workers=1)
        out[split] = root / "shards" / split
    return out


def write_inputs(root: Path, shards: dict, size: str, epochs: int, trials: int) -> tuple[str, str]:
    import yaml

    config = root / "bench.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu"},
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "size": size, "shuffle_buffer": 16},
        "train": {"epochs": epochs, "batch_size": 4, "lr": 1e-3, "ema": False, "eval_every": epochs},
    }))
    space = root / "space.yaml"
    # grace_period == epochs: no ASHA rung, every trial runs all its epochs (the same work per trial).
    space.write_text(yaml.safe_dump({
        "params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
        "asha": {"time_attr": "epoch", "grace_period": epochs, "reduction_factor": 2},
        "search": {"seed": 0, "num_samples": trials},
    }))
    return str(config), str(space)


def own_training_s(rows: list[dict]) -> float:
    """Steady epochs (reports 2..E) scaled to E epochs: the trial's training time without its start-up."""
    steady = [float(r["time_this_iter_s"]) for r in rows[1:]]
    return sum(steady) / len(steady) * len(rows)


def run_path(label: str, config: str, space: str, output: Path, trials: int, workers: int) -> dict:
    from neoray.tune.results import load_history
    from neoray.tune.sweep import SweepOptions, run_sweep

    opts = SweepOptions(config=config, space=space, output=str(output), name=label, num_samples=trials,
                        max_concurrent=1, workers_per_trial=workers, overrides=["train.cpus_per_worker=1"])
    start = time.perf_counter()
    result = run_sweep(opts)
    wall = time.perf_counter() - start
    own, tune_total = [], []
    for row in result.rows:
        history = load_history(result.sweep_dir, row["trial"])
        if len(history) < 2 or row["status"] != "finished":
            raise SystemExit(f"{label}: {row['trial']} {row['status']} after {len(history)} epochs; "
                             "the benchmark needs every trial to finish >= 2 epochs")
        own.append(own_training_s(history))
        tune_total.append(float(history[-1]["time_total_s"]))
    return {"path": label, "trials": trials, "workers_per_trial": workers, "wall_s": wall,
            "own_training_s": own, "tune_time_total_s": tune_total,
            "overhead_per_trial_s": (wall - sum(own)) / trials,
            # Tune's time_total_s starts when the trial's function starts: what remains is Tune's own cost.
            "outside_trial_per_trial_s": (wall - sum(tune_total)) / trials}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--epochs", type=int, default=3, help=">= 2: the first epoch holds the start-up")
    parser.add_argument("--images", type=int, default=24, help="training images (synthetic)")
    parser.add_argument("--size", default="160x90")
    parser.add_argument("--num-cpus", type=int, default=4, help="CPUs Ray advertises (the trainer path needs 4)")
    parser.add_argument("--torch-trainer", action="store_true", help="also the TorchTrainer path, 2 workers/trial")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args(argv)
    if args.epochs < 2:
        parser.error("--epochs must be >= 2")

    import ray

    width, height = (int(v) for v in args.size.lower().split("x"))
    with tempfile.TemporaryDirectory(prefix="nrbench") as tmp:
        root = Path(tmp)
        shards = make_shards(root, args.images, (width, height))
        config, space = write_inputs(root, shards, args.size, args.epochs, args.trials)
        t0 = time.perf_counter()
        # Dashboard on: Train V2's cleaner (TorchTrainer path) needs the State API.
        ray.init(num_cpus=args.num_cpus, configure_logging=False, log_to_driver=False)
        ray_start = time.perf_counter() - t0
        results = [run_path("direct", config, space, root / "sweeps", args.trials, 1)]
        if args.torch_trainer:
            results.append(run_path("trainer", config, space, root / "sweeps", args.trials, 2))
        ray.shutdown()

    print(f"\n{args.trials} trials x {args.epochs} epochs, {args.images} images at {args.size}, one trial at a "
          f"time; ray.init {ray_start:.1f} s (not counted)")
    for r in results:
        print(f"{r['path']:8s}: sweep wall {r['wall_s']:7.1f} s, own training {sum(r['own_training_s']):7.1f} s "
              f"(per trial {', '.join(f'{s:.1f}' for s in r['own_training_s'])}) -> overhead "
              f"{r['overhead_per_trial_s']:5.1f} s/trial (goal < 5); outside the trial function "
              f"{r['outside_trial_per_trial_s']:5.1f} s/trial")
        # Inside the trial function but not training: datasets, model, the first epoch's warm-up.
        inside = [t - o for t, o in zip(r["tune_time_total_s"], r["own_training_s"])]
        print(f"{'':8s}  start-up inside each trial function: {', '.join(f'{s:.1f}' for s in inside)} s "
              f"(the first trial also pays the worker's cold imports)")
    if args.json:
        Path(args.json).write_text(json.dumps({"ray_init_s": ray_start, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
