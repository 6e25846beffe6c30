"""``neoray train CONFIG [key=value ...] [--output DIR] [--resume RUN_DIR] [--address ADDRESS] [--autoscale]
[--track mlflow[:URI]] [--track wandb[:PROJECT]]``.

Checks the config and the files it names, connects to Ray (neoray.cluster's policy: a private local
instance unless told otherwise), checks that the run fits the cluster and that every node reaches its
paths, then trains. Prints the run directory and one line per epoch; the run directory gets
config.yaml, metrics.csv/json, checkpoints.json, the checkpoints and summary.json/md (neoray.run.rundir).
Exit status: 0 when the run completed or stopped early on mAP, 1 on a config error, a run stopped by a
guard (non-finite updates, out of memory, failed preflight) or a failed run; 130 on Ctrl-C and 143 on SIGTERM
(the summary written, the resume command printed).
"""

from __future__ import annotations

import argparse
import shlex
import sys

from neoray import interrupts, storage
from neoray.checkpoints import CheckpointError, read_pointers
from neoray.cluster import ClusterError, add_address_argument, connect
from neoray.commands import EXIT_FAILED, EXIT_INTERRUPTED, EXIT_OK, program
from neoray.config import ConfigError, load_config
from neoray.data.shards import ManifestError
from neoray.run.run_tracking import add_track_argument, parse_track
from neoray.run.rundir import RunDirError, ended_well
from neoray.run.setup import check_cluster, check_resume, prepare_config, resume_point
from neoray.run.trainer import RunInterrupted, train
from neoray.storage import StorageError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see experiments/configs/); a local path or a URI")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    parser.add_argument("--output", default=None,
                        help="parent folder of the run directory, local, a shared mount or a URI such as "
                             "s3://bucket/runs (default: the config's output)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue this stopped run from its latest checkpoint (a local path or a URI); "
                             "CONFIG must be the run's own, where only train.epochs and how the run is placed "
                             "and evaluated may change")
    parser.add_argument("--autoscale", action="store_true",
                        help="the cluster adds nodes on demand (ray up cluster.yaml): do not refuse a run that "
                             "does not fit today's nodes; its workers wait for the autoscaler")
    add_address_argument(parser)
    add_track_argument(parser, "run")


def _resumes_from_a_checkpoint(run_dir: str | None) -> bool:
    """Whether --resume continues from a checkpoint, which brings every weight (the backbone's file is not
    read again); a run stopped before its first checkpoint starts over and needs it."""
    try:
        return bool(run_dir) and bool(read_pointers(storage.absolute(run_dir)).get("latest"))
    except CheckpointError:
        return False  # check_resume and the trainer report the broken run directory


def _log(line: str) -> None:
    print(f"neoray train: {line}", flush=True)


def resume_command(argv: list[str], run_dir: str) -> str:
    """The command line that continues a stopped run: the same one with ``--resume RUN_DIR``."""
    args = list(argv[1:])
    if "--resume" in args:
        del args[args.index("--resume"):args.index("--resume") + 2]
    args = [arg for arg in args if not arg.startswith("--resume=")]
    return shlex.join([*program(argv[0]), *args, "--resume", run_dir])


def run(args: argparse.Namespace) -> int:
    try:
        track = parse_track(args.track)  # a tracker that is not installed fails before anything starts
        resuming = _resumes_from_a_checkpoint(args.resume)
        cfg = prepare_config(load_config(args.config, args.overrides), output=args.output, resume=resuming)
        resume = None
        if args.resume:
            check_resume(cfg, args.resume, log=_log)
            resume = resume_point(storage.absolute(args.resume), log=_log)  # read here, before any worker starts
        info = connect(args.address, log=_log)
        check_cluster(cfg, info, storage.absolute(args.resume) if args.resume else cfg.output,
                      autoscale=args.autoscale, sweep=False, resume=resuming)
        summary = train(cfg, config_path=args.config, resume_dir=args.resume, track=track, resume=resume)
    except RunInterrupted as stopped:
        print(f"neoray train: {interrupts.how_stopped()} after {stopped.summary['epochs_run']} epochs; the run keeps "
              f"its last checkpoint; continue with: {resume_command(sys.argv, stopped.run_dir)}", file=sys.stderr,
              flush=True)
        return EXIT_INTERRUPTED
    except (ConfigError, ClusterError, RunDirError, ManifestError, StorageError, CheckpointError) as exc:
        print(f"neoray train: {exc}", file=sys.stderr)
        return EXIT_FAILED
    except Exception as exc:  # a failed run: the summary was written; keep the message to one line
        text = str(exc).strip().splitlines()
        print(f"neoray train: run failed: {type(exc).__name__}: {text[-1] if text else ''}", file=sys.stderr)
        return EXIT_FAILED
    reason = summary["stop_reason"]
    best = summary["best_metrics"].get("map")
    best_text = f"best mAP {best:.4f} at epoch {summary['best_epoch']}" if best is not None else "no evaluation"
    print(f"neoray train: {reason}; {summary['epochs_run']} epochs; {best_text}; report "
          f"{summary['run_dir']}/summary.md", flush=True)
    return EXIT_OK if ended_well(reason) else EXIT_FAILED
