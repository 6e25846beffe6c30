"""Learning-rate / warmup / batch sweep: Ray Tune + Optuna + ASHA over neoray's training function.

    python experiments/sweep_lr.py                      # synthetic data, ~10 minutes on a laptop CPU
    python experiments/sweep_lr.py --config my.yaml --num-samples 32 --workers-per-trial 4 --gpus-per-worker 1
    python experiments/sweep_lr.py --resume             # continue an interrupted sweep (Ctrl-C exits 130, SIGTERM 143)
    python experiments/sweep_lr.py --config experiments/configs/coco_r50_8gpu.yaml \
        --space experiments/configs/space_coco.yaml --workers-per-trial 8 --gpus-per-worker 1 \
        --autoscale                                     # on `ray up cluster.yaml`: trials wait for new nodes

The same as ``neoray sweep`` (same arguments). Results: sweeps/sweep_lr/{trials.md,trials.csv,
best_config.yaml}; plots: ``neoray report sweeps/sweep_lr``.
"""

import argparse
import sys

from neoray import interrupts
from neoray.cli import exit_code
from neoray.commands import EXIT_INTERRUPTED
from neoray.commands import sweep as sweep_cmd


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sweep_cmd.add_arguments(parser)
    interrupts.install()  # SIGTERM does what Ctrl-C does (exit 143)
    try:
        return exit_code(sweep_cmd.run(parser.parse_args(argv)))
    except KeyboardInterrupt:
        print(f"sweep_lr: {interrupts.how_stopped()}; continue with --resume", file=sys.stderr)
        return exit_code(EXIT_INTERRUPTED)


if __name__ == "__main__":
    sys.exit(main())
