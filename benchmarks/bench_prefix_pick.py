"""What a sweep loses by picking its best trial on a prefix of the schedule (``search.trial_epochs``), read off
the search benchmark's ground-truth tables (benchmarks/data/search_<task>.csv, 48 configurations trained 12 epochs).

    python benchmarks/bench_prefix_pick.py                      # the three v2 tasks, 4- and 12-trial sweeps
    python benchmarks/bench_prefix_pick.py --trials 4 --epochs 2 4 6 --samples 5000

For each sweep size n, ``--samples`` sets of n different configurations are drawn (seeded). Each set is a sweep
whose trials all trained at training seed 0; its whole-run pick is the configuration with the best final score,
its prefix pick the one with the best score at epoch k. Printed per task, n and k: how often the two picks are
the same configuration, the prefix pick's true quality (its final score averaged over the table's seeds, the
search benchmark's measure) as a share of the whole-run pick's, and how often the prefix pick is within the
task's margin of the whole-run pick (the search benchmark's max(2%, 2 sigma of the configuration x seed noise)).

Where this is not the shipped sweep: the tables' epoch k lies on a 12-epoch cosine schedule, already decaying at
epoch 4, where a shipped trial's prefix lies on the whole run's schedule (epoch 4 of 70 is at the full LR). What
it measures is how far early scores order configurations as their finals do on these tasks.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from search_sim import load_table  # noqa: E402  (a sibling module of this script)

DATA_DIR = Path(__file__).resolve().parent / "data"
TASKS = ("default", "dense", "photo")


def prefix_pick(table, trials: int, epoch: int, samples: int, seed: int = 0) -> dict:
    """Over ``samples`` drawn sweeps of ``trials`` configurations: the share whose prefix pick is the whole-run
    pick, the mean ratio of their true scores, and the share whose prefix pick is within the margin of it."""
    rng = random.Random(seed)
    keys = sorted(table.configs)
    same, ratios, within = 0, [], 0
    for _ in range(samples):
        drawn = [table.configs[k] for k in rng.sample(keys, trials)]
        whole = max(drawn, key=lambda c: (table.curve(c, 0)[-1], c.key))
        early = max(drawn, key=lambda c: (table.curve(c, 0)[epoch - 1], c.key))
        same += early is whole
        ratios.append(table.true_score(early.key) / table.true_score(whole.key))
        within += table.true_score(early.key) >= table.true_score(whole.key) - table.margin
    return {"same": same / samples, "ratio": statistics.fmean(ratios), "within": within / samples}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    parser.add_argument("--trials", nargs="+", type=int, default=[4, 12])
    parser.add_argument("--epochs", nargs="+", type=int, default=[1, 2, 4, 6, 8])
    parser.add_argument("--samples", type=int, default=5000)
    parser.add_argument("--data-dir", default=str(DATA_DIR))
    args = parser.parse_args(argv)
    print("| task | trials | pick at epoch | same pick | true score / whole-run pick's | within the margin |")
    print("|---|---|---|---|---|---|")
    for task in args.tasks:
        table = load_table((Path(args.data_dir) / f"search_{task}.csv").read_text(), task)
        for trials in args.trials:
            if not 1 <= trials <= len(table.configs):
                raise SystemExit(f"bench_prefix_pick: --trials {trials}: the {task} table has {len(table.configs)} "
                                 "configurations")
            for epoch in args.epochs:
                if not 1 <= epoch <= table.epochs:
                    raise SystemExit(f"bench_prefix_pick: --epochs {epoch}: the {task} table has {table.epochs}")
                r = prefix_pick(table, trials, epoch, args.samples)
                print(f"| {task} | {trials} | {epoch} | {r['same']:.2f} | {r['ratio']:.3f} | {r['within']:.2f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
