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
from matplotlib.figure import Figure  # noqa: E402

from neoray import storage  # noqa: E402
from neoray.config import format_size, load_config, parse_size  # noqa: E402
from neoray.configs import DEFAULT_CONFIG  # noqa: E402
from neoray.data.demo import ensure_default_data  # noqa: E402
from neoray.engine.context import LocalContext  # noqa: E402
from neoray.engine.loop import run_training_loop  # noqa: E402
from neoray.engine.shard_batches import ShardBatches  # noqa: E402
from neoray.tune.replay import (  # noqa: E402
    TABLE_COLUMNS,
    Method,
    budget_to_within,
    load_table,
    rank_correlation,
    regret_at,
    run_method,
    summarise,
    trajectory,
)

DATA_DIR = Path(__file__).resolve().parent / "data"
TASKS = {
    # the README's default sweep: its synthetic data (256 training, 64 validation images), model and config
    "default": {"layout": "shapes", "train": 256, "val": 64},
    # many small objects per image (12-30 shapes of 7-22 px): the same detector on a harder task. Half the
    # images, each with ~6x the objects: at 256 images a configuration took 4x the default's time here
    # (matching and losses grow with the objects); at 128 one takes 4-5 minutes, two at a time on 2 cores.
    "dense": {"layout": "dense", "train": 128, "val": 48},
}
# The design: 4 learning rates (a factor of 2 apart) x 2 warmups x 3 batch pairs = 24 configurations over
# the default space, every one trained to the full budget of EPOCHS epochs. (A batch of 2 was left out: on
# 2 cores it trains 1.4x slower per image than 4, and lr 4e-3 at batch 2 reached mAP50 0.22 in 16 epochs.)
DESIGN_LRS = (1e-3, 2e-3, 4e-3, 8e-3)
DESIGN_WARMUPS = (20, 100)
DESIGN_BATCHES = ("4x1", "4x2", "8x1")  # effective batches 4, 8 (accumulated) and 8
EPOCHS = 12


def design(task: str = "default") -> list[dict]:
    """The task's configurations: the full grid, or its first ``configs`` points."""
    points = []
    for batch in DESIGN_BATCHES:
        for warmup in DESIGN_WARMUPS:
            for lr in DESIGN_LRS:
                points.append({"config": f"c{len(points) + 1:02d}", "lr": lr, "warmup_steps": warmup, "batch": batch})
    return points[:TASKS[task].get("configs")]


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
    task = TASKS[args.task]
    shards = ensure_default_data(train=task["train"], val=task["val"], layout=task["layout"])
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    threads = max(1, cpus // args.parallel)
    started = time.time()
    todo = [p for p in design(args.task)[:args.configs or None] if (p["config"], format_size(size)) not in done]
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
        "epochs": args.epochs, "stop_after": args.stop_after, "design": design(args.task),
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs; {args.parallel} configurations at a time, "
                   f"{threads} torch thread(s) each",
        "seconds_this_invocation": round(seconds),
    }
    storage.write_json(str(path), record, indent=2)


# ----------------------------------------------------------------------------------------------------
# The replay
# ----------------------------------------------------------------------------------------------------

# (grace period, reduction factor): rungs at epochs 1-3-9, 2-4-8, 3-9, 4-8 and 6 of a 12-epoch run.
ASHA_SETTINGS = [(1, 3), (2, 2), (3, 3), (4, 2), (6, 2)]
SEARCHERS = [("random", 10), ("tpe", 10), ("tpe", 4)]  # (sampler, TPE start-up trials)


def methods(which: str) -> list[Method]:
    """``all``: every searcher with no early stopping and with every ASHA setting, and the LR rules with
    TPE; ``core``: the contenders the default task's ``all`` left (12 of the 22, for a second task at
    half the cost); ``quick``: three methods for a smoke run (CI)."""
    if which == "quick":
        return [Method("random"), Method("tpe", 2, 3, startup_trials=4), Method("tpe", 2, 3, 4, lr_rule="sqrt")]
    if which == "core":
        return [*(Method(searcher, grace, rf, startup) for searcher, startup in (("random", 10), ("tpe", 4))
                  for grace, rf in ((0, 2), (3, 3), (4, 2), (6, 2))),
                Method("random", 1, 3, 10), Method("tpe", startup_trials=10), Method("tpe", 4, 2, 10),
                Method("tpe", 4, 2, 4, lr_rule="sqrt")]
    out = []
    for searcher, startup in SEARCHERS:
        out.append(Method(searcher, startup_trials=startup))
        out += [Method(searcher, grace, rf, startup) for grace, rf in ASHA_SETTINGS]
    for rule in ("linear", "sqrt"):
        out += [Method("tpe", 0, 2, 4, lr_rule=rule), Method("tpe", 4, 2, 4, lr_rule=rule)]
    return out


def _replay_one(table, method: Method, seed: int, budget: int) -> list:
    return run_method(table, method, seed, budget)


def replay(args) -> None:
    """Every method x seed on each task's table (one Tune run each, several processes at a time)."""
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, configure_logging=False, log_to_driver=False)
    spawn = multiprocessing.get_context("spawn")
    report = {}
    for task in args.tasks:
        table = load_table(str(Path(args.data_dir) / f"search_{task}.csv"), size="320x180")
        started = time.perf_counter()
        jobs = [(m, seed) for m in methods(args.methods) for seed in range(args.seeds)]
        with ProcessPoolExecutor(args.parallel, mp_context=spawn, initializer=_connect_worker,
                                 initargs=(ray.get_runtime_context().gcs_address, 1)) as pool:
            futures = {pool.submit(_replay_one, table, m, seed, args.budget): (m, seed) for m, seed in jobs}
            logs = {}
            for done, future in enumerate(as_completed(futures), 1):
                logs[futures[future]] = future.result()
                if done % 20 == 0 or done == len(jobs):
                    print(f"{task}: {done}/{len(jobs)} runs replayed", flush=True)
        report[task] = _summarise_task(table, logs, args.budget)
        report[task]["seconds"] = round(time.perf_counter() - started)
        _print_task(task, table, report[task])
    out = Path(args.data_dir) / f"replay_{args.methods}.json"
    record = json.loads(out.read_text()) if out.exists() else {"tasks": {}}  # other tasks' results stay
    for task in report:
        record["tasks"][task] = {**report[task], "command": "python benchmarks/bench_search.py "
                                 + " ".join(sys.argv[1:]), "commit": _git_commit(), "seeds": args.seeds}
    storage.write_json(str(out), record, indent=1)
    _plot(record["tasks"], Path(args.data_dir) / f"search_quality_{args.methods}.png")
    print(f"wrote {out}")


def _summarise_task(table, logs: dict, max_budget: int) -> dict:
    """Per method: median and quartiles of the regret at budgets of 1, 2, 4 ... full trainings, and of
    the budget needed to come within 2% of the design's best."""
    budgets = [b for b in (table.epochs * k for k in (1, 2, 3, 4, 6, 8, 12, 16, 24)) if b <= max_budget]
    out = {"best_final": table.best_final, "epochs": table.epochs, "configs": len(table.points),
           "budgets": budgets, "methods": {}}
    for method in {m for m, _seed in logs}:
        trajectories = [trajectory(log, table) for (m, _seed), log in sorted(logs.items(), key=lambda kv: kv[0][1])
                        if m == method]
        regrets = [regret_at(t, table, budgets) for t in trajectories]
        within = [budget_to_within(t, table) for t in trajectories]
        out["methods"][method.name] = {"regret_seeds": regrets, "budget_to_2pct_seeds": within}
    return _with_summaries(out)


def _with_summaries(result: dict) -> dict:
    """Median and quartiles over seeds of every method's regrets and budgets to within 2%."""
    for m in result["methods"].values():
        regrets, within = m.get("regret_seeds"), m["budget_to_2pct_seeds"]
        if regrets is not None:
            m["regret"] = [summarise([r[i] for r in regrets]) for i in range(len(result["budgets"]))]
        m["budget_to_2pct"] = summarise(within)
        m["reached_2pct"] = sum(1 for w in within if w != float("inf"))
    return result


def _print_task(task: str, table, result: dict) -> None:
    print(f"\n## {task}: {result['configs']} configurations x {result['epochs']} epochs, best final mAP "
          f"{result['best_final']:.4f}; {result['seconds']} s of replay")
    budgets = result["budgets"]
    print("| method | epochs to within 2% (median [IQR]) | seeds within 2% | "
          + " | ".join(f"regret @{b}" for b in budgets) + " |")
    print("|---" * (3 + len(budgets)) + "|")
    ranked = sorted(result["methods"].items(), key=lambda kv: (kv[1]["budget_to_2pct"]["median"],
                                                                kv[1]["regret"][-1]["median"]))
    for name, m in ranked:
        w = m["budget_to_2pct"]
        cells = [f"{r['median']:.4f}" for r in m["regret"]]
        print(f"| {name} | {w['median']:g} [{w['q25']:g}, {w['q75']:g}] | {m['reached_2pct']} | "
              + " | ".join(cells) + " |")


def _plot(report: dict, path: Path) -> None:
    """Median regret against the budget (in full trainings) with the interquartile band, per task, for the
    baselines and the best method of each searcher."""
    fig = Figure(figsize=(6 * len(report), 4), layout="constrained")
    axes = fig.subplots(1, len(report), squeeze=False)[0]
    for ax, (task, result) in zip(axes, report.items()):
        x = [b / result["epochs"] for b in result["budgets"]]
        for name in _plotted(result):
            regret = result["methods"][name]["regret"]
            line = ax.plot(x, [r["median"] for r in regret], marker="o", markersize=3, label=name)[0]
            ax.fill_between(x, [r["q25"] for r in regret], [r["q75"] for r in regret], alpha=0.15,
                            color=line.get_color())
        ax.set(xlabel=f"budget (in {result['epochs']}-epoch trainings)", ylabel="regret (best final mAP - pick's)",
               title=f"{task} ({result['configs']} configurations)")
        ax.legend(fontsize=7)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    storage.write_bytes(str(path), buffer.getvalue())


def _plotted(result: dict) -> list[str]:
    names = list(result["methods"])
    chosen = [n for n in ("random+no-ES", "tpe10+no-ES") if n in names]
    for prefix in ("random+asha", "tpe10+asha", "tpe4+asha"):
        candidates = [n for n in names if n.startswith(prefix) and ", lr" not in n]
        if candidates:
            chosen.append(min(candidates, key=lambda n: (result["methods"][n]["budget_to_2pct"]["median"],
                                                         result["methods"][n]["regret"][-1]["median"])))
    return chosen or names


def summary(args) -> None:
    """The table and plot of a replay already run (its JSON keeps every seed's numbers)."""
    path = Path(args.data_dir) / f"replay_{args.methods}.json"
    record = json.loads(path.read_text())
    for task, result in record["tasks"].items():
        _print_task(task, None, _with_summaries(result))
    _plot(record["tasks"], Path(args.data_dir) / f"search_quality_{args.methods}.png")


def fidelity(args) -> None:
    """Do early rankings at a lower resolution agree with the full-resolution final ranking? Spearman's rank
    correlation at each early epoch, against the same at full resolution, with each epoch's cost; the
    tables go to stdout and to fidelity.md."""
    lines = []
    for task in args.tasks:
        path = str(Path(args.data_dir) / f"search_{task}.csv")
        full, low = load_table(path, size="320x180"), load_table(path, size=args.low)
        keys = sorted(set(full.points) & set(low.points))
        final = [full.points[k].final_score for k in keys]
        lines += [f"\n## {task}: rank correlation with the full-resolution final score ({len(keys)} configurations)",
                  f"| epoch | 320x180 | {args.low} | s/epoch 320x180 | s/epoch {args.low} |", "|---|---|---|---|---|"]
        for epoch in range(1, low.epochs + 1):
            at_full = rank_correlation([full.points[k].curve[epoch - 1]["score"] for k in keys], final)
            at_low = rank_correlation([low.points[k].curve[epoch - 1]["score"] for k in keys], final)
            lines.append(f"| {epoch} | {at_full:.2f} | {at_low:.2f} | {_mean_seconds(full, keys, epoch):.1f} | "
                         f"{_mean_seconds(low, keys, epoch):.1f} |")
    print("\n".join(lines))
    storage.write_text(str(Path(args.data_dir) / "fidelity.md"), "\n".join(lines).lstrip() + "\n")


def _mean_seconds(table, keys: list[str], epoch: int) -> float:
    return sum(float(table.points[k].curve[epoch - 1].get("seconds") or 0) for k in keys) / len(keys)


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
                         "1-thread runs trained 1.3x faster than one 2-thread run at 320x180; at 160x90 they kept "
                         "Ray starting and reaping idle workers, epochs stalled for up to 150 s: use 1 there)")
    rp = sub.add_parser("replay", help="replay the methods on the tables through Ray Tune")
    rp.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    rp.add_argument("--seeds", type=int, default=20)
    rp.add_argument("--budget", type=int, default=16 * EPOCHS, help="epochs per run, summed over trials")
    rp.add_argument("--methods", choices=("all", "core", "quick"), default="all")
    rp.add_argument("--parallel", type=int, default=6, help="Tune runs at a time (each waits on its trials more "
                                                             "than it computes)")
    rp.add_argument("--data-dir", default=str(DATA_DIR))
    sm = sub.add_parser("summary", help="the table and plot of a replay already run")
    sm.add_argument("--methods", choices=("all", "core", "quick"), default="all")
    sm.add_argument("--data-dir", default=str(DATA_DIR))
    fd = sub.add_parser("fidelity", help="rank correlation of early epochs at a lower resolution")
    fd.add_argument("--tasks", nargs="+", default=sorted(TASKS), choices=sorted(TASKS))
    fd.add_argument("--low", default="160x90")
    fd.add_argument("--data-dir", default=str(DATA_DIR))
    args = parser.parse_args(argv)
    {"ground-truth": ground_truth, "replay": replay, "summary": summary, "fidelity": fidelity}[args.step](args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
