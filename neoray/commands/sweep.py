"""``neoray sweep`` and ``python experiments/sweep_lr.py``: one argument definition for both (neoray.tune.sweep)."""

from __future__ import annotations

import argparse
import shlex
import sys

from neoray import interrupts
from neoray.cluster import ClusterError, add_address_argument
from neoray.commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, program
from neoray.config import ConfigError
from neoray.run.run_tracking import add_track_argument
from neoray.run.rundir import ended_well
from neoray.storage import StorageError
from neoray.tune.continue_best import ContinuationError
from neoray.tune.sweep import SweepOptions, run_sweep


def add_arguments(parser) -> None:
    parser.add_argument("--config", default=None,
                        help="training config YAML (default experiments/configs/synthetic_cpu.yaml; empty data "
                             "paths mean the embedded synthetic dataset, made on first use)")
    parser.add_argument("--space", default=None,
                        help="search-space YAML (default experiments/configs/space_default.yaml)")
    parser.add_argument("--num-samples", type=int, default=None, help="trials to run (default: the space file's)")
    parser.add_argument("--max-concurrent", type=int, default=None,
                        help="trials at a time (default: as many as the cluster can hold)")
    parser.add_argument("--workers-per-trial", type=int, default=None,
                        help="Ray Train workers per trial (default: the config's train.workers); 1 runs the "
                             "training loop inside the trial, more run a TorchTrainer per trial")
    parser.add_argument("--gpus-per-worker", type=float, default=None,
                        help="GPUs per worker (default: train.gpus_per_worker if train.use_gpu, else 0); a "
                             "fraction such as 0.5 lets two workers or trials share a GPU, on both trial paths")
    parser.add_argument("--autoscale", action="store_true",
                        help="the cluster adds nodes on demand (ray up cluster.yaml): do not refuse trials that "
                             "do not fit today's nodes; they wait for the autoscaler. Without it, a trial that "
                             "cannot fit the cluster is refused at start")
    parser.add_argument("--output", default="sweeps",
                        help="parent directory of sweeps: local, a shared mount or a URI such as s3://bucket/sweeps "
                             "(default ./sweeps)")
    parser.add_argument("--name", default="sweep_lr", help="sweep name; results go to OUTPUT/NAME")
    parser.add_argument("--resume", action="store_true",
                        help="continue an interrupted sweep OUTPUT/NAME. Resuming unpickles Ray Tune's saved "
                             "state, which can run code: resume only sweeps you or your team wrote")
    parser.add_argument("--warm-start", default=None, metavar="SWEEP_DIR",
                        help="seed the search with a previous sweep (local or a URI): its best trials' configurations "
                             "run first (up to half of --num-samples), then the search goes on from them; for a "
                             "sweep again after the data changed")
    parser.add_argument("--trial-epochs", type=_trial_epochs, default=None, metavar="N",
                        help="each trial trains only the first N epochs of the config's schedule (or a fraction "
                             "such as 0.25 of train.epochs), then the best continues to the end in OUTPUT/NAME/final; "
                             "0: every trial trains the whole schedule (overrides the space file's "
                             "search.trial_epochs)")
    parser.add_argument("--grace-period", type=int, default=None,
                        help="ASHA grace period in epochs (overrides the space file; turns ASHA on where the space "
                             "file has asha: false)")
    parser.add_argument("--reduction-factor", type=float, default=None,
                        help="ASHA reduction factor (overrides the space file)")
    parser.add_argument("--max-failures", type=int, default=2, help="retries of a failed trial (default 2)")
    parser.add_argument("--optuna-storage", default=None, metavar="URL",
                        help="database URL for the sweep's Optuna study (postgresql://..., mysql://..., sqlite:///...; "
                             "default: OUTPUT/NAME/optuna.db); optuna-dashboard URL shows it live")
    add_track_argument(parser, "sweep (a parent run, one run per trial)")
    add_address_argument(parser)
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="training config overrides, e.g. train.epochs=3 data.max_train_images=64")


def _trial_epochs(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number of epochs or a fraction, got {text!r}") from None
    return int(value) if value >= 1 and value == int(value) else value


def options_from_args(args):
    return SweepOptions(
        config=args.config, space=args.space, num_samples=args.num_samples, max_concurrent=args.max_concurrent,
        workers_per_trial=args.workers_per_trial, gpus_per_worker=args.gpus_per_worker, output=args.output,
        name=args.name, resume=args.resume, overrides=list(args.overrides), grace_period=args.grace_period,
        trial_epochs=args.trial_epochs,
        reduction_factor=args.reduction_factor, max_failures=args.max_failures, autoscale=args.autoscale,
        address=args.address, warm_start=args.warm_start, track=list(args.track), optuna_storage=args.optuna_storage,
    )


def resume_command(argv: list[str]) -> str:
    """The command line that continues this sweep: the same one with --resume."""
    args = list(argv[1:])
    if "--resume" not in args:
        args.append("--resume")
    return shlex.join(program(argv[0]) + args)


def run(args) -> int:
    try:
        result = run_sweep(options_from_args(args))
    except ContinuationError as exc:
        print(f"neoray sweep: error: the sweep ended, its best trial could not be continued: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except (ConfigError, ClusterError, StorageError) as exc:
        print(f"neoray sweep: error: {exc}", file=sys.stderr)
        return EXIT_FAILED
    if result.interrupted:  # Ctrl-C or SIGTERM: Tune saved its state and returned
        print(f"sweep {interrupts.how_stopped()}; continue with: {resume_command(sys.argv)}", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    if result.final is not None and not ended_well(str(result.final.get("stop_reason"))):
        return EXIT_FAILED  # the final run stopped on a guard: its summary says why
    return EXIT_OK if result.best is not None else EXIT_FAILED
