"""Training-recipe ablations: which levers make neoray's detector learn faster on few images of many small objects?

Each variant is the task's base recipe plus config overrides, trained for a fixed number of epochs with neoray's
own training function (two 1-thread runs at a time on 2 cores, as bench_search's ground truth), every epoch's
mAP, mAP50, loss and seconds recorded. Results depend on the epochs trained, not on the machine's load, so the
runs may share the machine with other work; seconds per epoch are only indicative here (bench_quality measures
wall time on a quiet machine).

    python benchmarks/bench_recipe.py --task dense --epochs 30 \
        --variant base --variant "mal:model.options.cls_loss=mal" \
        --variant "o2m4:model.options.dense_o2m=4" --variant "zoom:data.zoom=[0.5,1.5];data.mosaic=0.5"
    python benchmarks/bench_recipe.py --task dense --table          # the table of what is recorded

A variant is ``NAME`` or ``NAME:key=value;key=value`` (``;`` between overrides: a value may hold commas).
Rows go to benchmarks/data/recipe_<task>.csv (one per
variant, seed and epoch) with the overrides, commit and machine in recipe_<task>.json; a variant already
recorded for the same epochs and seed is not trained again (the table accumulates).
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import multiprocessing
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
from bench_search import RecordingContext, _connect_worker, _git_commit  # noqa: E402

from neoray import storage  # noqa: E402
from neoray.config import load_config  # noqa: E402
from neoray.data.demo import ensure_default_data  # noqa: E402
from neoray.engine.loop import run_training_loop  # noqa: E402
from neoray.engine.shard_batches import ShardBatches  # noqa: E402

DATA_DIR = Path(__file__).resolve().parent / "data"
RECIPE = Path(__file__).resolve().parent / "configs" / "recipe_base.yaml"
TASKS = {
    "default": {"layout": "shapes", "train": 256, "val": 64, "size": "320x180"},
    "dense": {"layout": "dense", "train": 128, "val": 48, "size": "320x180"},
    "photo": {"layout": "photo", "train": 96, "val": 48, "size": "640x360"},
}
COLUMNS = ["task", "variant", "seed", "epoch", "map", "map50", "loss", "seconds"]


def parse_variant(text: str) -> tuple[str, dict]:
    """``name`` or ``name:key=value;key=value`` -> (name, {key: value})."""
    name, _, rest = text.partition(":")
    overrides = {}
    for item in filter(None, rest.split(";")):
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--variant {text}: expected key=value, got {item!r}")
        overrides[key.strip()] = value.strip()
    return name.strip(), overrides


def train_variant(task: str, overrides: dict, shards: dict, epochs: int, seed: int) -> list[dict]:
    """One variant trained for ``epochs`` epochs; its per-epoch metrics."""
    base = {"data.train": str(shards["train"]), "data.val": str(shards["val"]), "data.size": TASKS[task]["size"],
            "train.epochs": epochs, "train.eval_every": 1, "train.seed": seed}
    cfg = load_config(str(RECIPE), [f"{k}={v}" for k, v in {**base, **overrides}.items()])
    ctx = RecordingContext(ShardBatches(cfg), stop_after=0)
    run_training_loop(cfg, ctx, log=None)
    return ctx.rows


def _read(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def _write(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=COLUMNS, lineterminator="\n", extrasaction="ignore")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(str(path), out.getvalue())


def run(args) -> None:
    path = DATA_DIR / f"recipe_{args.task}.csv"
    rows = _read(path)
    record_path = DATA_DIR / f"recipe_{args.task}.json"
    record = json.loads(record_path.read_text()) if record_path.exists() else {"variants": {}}
    variants = dict(parse_variant(v) for v in args.variant)
    done = {(r["variant"], int(r["seed"])) for r in rows if int(r["epoch"]) == args.epochs}
    todo = [(name, seed) for name in variants for seed in args.seeds if (name, seed) not in done]
    task = TASKS[args.task]
    shards = ensure_default_data(size=task["size"], train=task["train"], val=task["val"], layout=task["layout"])
    ray.init(num_cpus=os.cpu_count() or 1, include_dashboard=False, configure_logging=False, log_to_driver=False)
    spawn = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(args.parallel, mp_context=spawn, initializer=_connect_worker,
                             initargs=(ray.get_runtime_context().gcs_address, 1)) as pool:
        futures = {pool.submit(train_variant, args.task, variants[name], shards, args.epochs, seed): (name, seed)
                   for name, seed in todo}
        for future in as_completed(futures):
            name, seed = futures[future]
            epochs = future.result()
            rows = [r for r in rows if not (r["variant"] == name and int(r["seed"]) == seed)]
            rows += [{"task": args.task, "variant": name, "seed": seed, "epoch": m["epoch"], "map": m.get("map", ""),
                      "map50": m.get("map50", ""), "loss": m.get("loss", ""), "seconds": m["seconds"]}
                     for m in epochs]
            _write(path, rows)
            record["variants"][name] = {"overrides": variants[name], "epochs": args.epochs, "commit": _git_commit(),
                                        "recipe": RECIPE.name, "machine": f"{platform.machine()}, {os.cpu_count()} "
                                        f"CPUs, {args.parallel} runs at a time, 1 torch thread each"}
            record["command"] = "python benchmarks/bench_recipe.py " + " ".join(sys.argv[1:])
            storage.write_json(str(record_path), record, indent=1)
            last = epochs[-1]
            print(f"{args.task} {name} seed {seed}: {len(epochs)} epochs, mAP {last.get('map', float('nan')):.4f} "
                  f"mAP50 {last.get('map50', float('nan')):.4f}, {sum(m['seconds'] for m in epochs):.0f} s",
                  flush=True)
    print_table(args.task)


def print_table(task: str) -> None:
    """Per variant (mean over seeds): mAP50 at a few epochs and at the end, and seconds per epoch."""
    rows = _read(DATA_DIR / f"recipe_{task}.csv")
    by_variant: dict[str, dict[int, list]] = {}
    for r in rows:
        if r["map50"] != "":
            by_variant.setdefault(r["variant"], {}).setdefault(int(r["epoch"]), []).append(r)
    if not by_variant:
        print("(nothing recorded)")
        return
    last = max(max(v) for v in by_variant.values())
    marks = sorted({e for e in (5, 10, 15, 20, 30, 40, last) if e <= last})
    print(f"\n## {task}: mAP50 by epoch (mean over seeds)\n")
    print("| variant | seeds | " + " | ".join(f"@{e}" for e in marks) + " | best mAP | s/epoch |")
    print("|---" * (len(marks) + 4) + "|")
    for name, curve in sorted(by_variant.items(), key=lambda kv: -_mean(kv[1].get(max(kv[1]), []), "map50")):
        cells = [f"{_mean(curve[e], 'map50'):.3f}" if e in curve else "" for e in marks]
        best_map = max(_mean(rows_at, "map") for rows_at in curve.values())
        seconds = sum(_mean(rows_at, "seconds") for rows_at in curve.values()) / len(curve)
        seeds = len(curve[min(curve)])
        print(f"| {name} | {seeds} | " + " | ".join(cells) + f" | {best_map:.3f} | {seconds:.1f} |")


def _mean(rows: list[dict], key: str) -> float:
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(values) / len(values) if values else float("nan")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--variant", action="append", default=[], help="NAME or NAME:key=value;key=value")
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--parallel", type=int, default=2)
    parser.add_argument("--table", action="store_true", help="print the recorded table and exit")
    args = parser.parse_args(argv)
    if args.table or not args.variant:
        print_table(args.task)
        return 0
    started = time.time()
    run(args)
    print(f"{time.time() - started:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
