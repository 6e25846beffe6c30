"""``neoray train CONFIG [key=value ...] [--output DIR] [--resume RUN_DIR]``.

Connects to a running Ray cluster when there is one (RAY_ADDRESS set, or ``ray start`` on this machine)
and starts a local one otherwise. Prints the run directory and one line per epoch; the run directory
gets config.yaml, metrics.csv/json, checkpoints/ and summary.json/md (see neoray/engine/trainer.py).
Exit status: 0 when the run completed or stopped early on mAP, 1 on a config error, a run stopped by a
guard (non-finite updates, out of memory, failed preflight) or a failed run.
"""

from __future__ import annotations

import argparse
import sys

from neoray.config import ConfigError, load_config


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("config", help="YAML config (see experiments/configs/)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. train.lr=3e-4")
    parser.add_argument("--output", default=None, help="parent folder of the run directory (default: config's output)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR", help="continue this stopped run")


def connect_ray() -> str:
    """Join the running cluster when there is one, else start a local instance. Returns which."""
    import ray

    if ray.is_initialized():
        return "already connected"
    try:
        ray.init(address="auto", configure_logging=False, log_to_driver=True)
        return "connected to the running Ray cluster"
    except ConnectionError:
        # With the dashboard (ray[default]) the run shows in it, and Train's placement-group cleaner can
        # use the State API (without it, it warns every few seconds).
        ray.init(configure_logging=False, log_to_driver=True)
        return "started a local Ray instance"


def run(args: argparse.Namespace) -> int:
    try:
        cfg = load_config(args.config, args.overrides)
    except ConfigError as exc:
        print(f"neoray train: {exc}", file=sys.stderr)
        return 1
    from neoray.data.shards import ManifestError
    from neoray.engine.trainer import RunDirError, train

    print(f"neoray train: {connect_ray()}", flush=True)
    try:
        summary = train(cfg, config_path=args.config, output=args.output, resume_dir=args.resume)
    except (ConfigError, RunDirError, ManifestError) as exc:
        print(f"neoray train: {exc}", file=sys.stderr)
        return 1
    except Exception as exc:  # a failed run: the summary was written; keep the message to one line
        text = str(exc).strip().splitlines()
        print(f"neoray train: run failed: {type(exc).__name__}: {text[-1] if text else ''}", file=sys.stderr)
        return 1
    reason = summary["stop_reason"]
    print(f"neoray train: {reason}; {summary['epochs_run']} epochs; best mAP "
          f"{summary['best_metrics'].get('map', float('nan')):.4f} at epoch {summary['best_epoch']}; "
          f"report {summary['run_dir']}/summary.md", flush=True)
    return 0 if reason == "completed" or reason.startswith(("early stop", "stopped by")) else 1
