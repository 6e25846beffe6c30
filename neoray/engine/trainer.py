"""Runs a training config on Ray Train: run directory, TorchTrainer, metrics files, final summary.

Run directory ``OUTPUT/NAME`` (NAME: ``cfg.name``, or the config file's stem plus ``-2``, ``-3``... when
that run already exists; an existing run is only continued with ``resume``):

    config.yaml        the resolved config
    metrics.csv/.json  one row per reported epoch, rewritten atomically after each report
    ray/               Ray Train's storage (RunConfig(storage_path=RUN_DIR, name="ray")): its checkpoints
                       and the snapshot that lets a resumed run find them with ray.train.get_checkpoint()
    checkpoints/latest, checkpoints/best   relative links into ray/ (best: highest ckpt_score, the
                       key CheckpointConfig keeps checkpoints by: evaluated mAP, or -loss without val)
    summary.json/.md   the training report, written when the run ends (also after a failure)

Metrics rows are written from the Train controller (a ``UserCallback`` that sees every report and
runs on the driver's node), so the files exist while the run goes on, whatever the workers do.

Ray Train's controller polls the workers every ``RAY_TRAIN_HEALTH_CHECK_INTERVAL_S`` (2 s by default)
and a worker's ``ray.train.report`` waits until the previous report was polled, so with short epochs
every report blocked ~1-2 s; we default the interval to 0.25 s (set the variable to override).
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

from neoray.config import Config, ConfigError, save_config
from neoray.io import write_text_atomic

RAY_DIR = "ray"
POLL_INTERVAL_ENV = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
POLL_INTERVAL_S = "0.25"


class RunDirError(ValueError):
    """The run directory cannot be used (exists without --resume, or is not a run)."""


# ----------------------------------------------------------------------------------------------------
# Run directory and files
# ----------------------------------------------------------------------------------------------------


def new_run_dir(cfg: Config, config_path: str | os.PathLike | None, output: str | None = None) -> Path:
    """A fresh run directory: ``cfg.name`` exactly (an error when it exists), or the config stem with a
    counter (``synthetic_cpu``, ``synthetic_cpu-2`` ...)."""
    root = Path(output or cfg.output)
    if cfg.name:
        run_dir = root / cfg.name
        if run_dir.exists():
            raise RunDirError(f"run directory {run_dir} already exists; continue it with --resume {run_dir} "
                              f"or choose another name=")
    else:
        stem = Path(config_path).stem if config_path else "run"
        run_dir, counter = root / stem, 1
        while run_dir.exists():
            counter += 1
            run_dir = root / f"{stem}-{counter}"
    run_dir.mkdir(parents=True)
    return run_dir


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _json_value(value.item())
    return str(value)


def write_metrics(run_dir: Path, history: list[dict]) -> None:
    """metrics.json (a list of rows) and metrics.csv (columns: union of keys, first-seen order)."""
    rows = [{k: _json_value(v) for k, v in row.items() if not isinstance(v, (dict, list))} for row in history]
    write_text_atomic(run_dir / "metrics.json", json.dumps(rows, indent=1) + "\n")
    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    write_text_atomic(run_dir / "metrics.csv", buffer.getvalue())


def read_metrics(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "metrics.json"
    return json.loads(path.read_text()) if path.exists() else []


def _link(link: Path, target: Path) -> None:
    """Point ``link`` at ``target`` with a relative symlink, replaced atomically."""
    link.parent.mkdir(parents=True, exist_ok=True)
    tmp = link.with_name(f".{link.name}.tmp")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    os.symlink(os.path.relpath(target, link.parent), tmp)
    os.replace(tmp, link)


def _ckpt_score(row: dict) -> float | None:
    """A row's ckpt_score, None when absent or NaN (Ray ranks NaN below every number)."""
    value = row.get("ckpt_score")
    return float(value) if isinstance(value, (int, float)) and value == value else None


def epoch_line(row: dict) -> str:
    """The one-line progress summary printed per epoch."""
    parts = [f"epoch {row.get('epoch')}", f"step {row.get('step')}"]
    for key, fmt in (("loss", "{:.4f}"), ("lr", "{:.2e}"), ("images_per_s", "{:.1f} img/s"),
                     ("peak_mem_mb", "{:.0f} MB")):
        if isinstance(row.get(key), (int, float)):
            parts.append(f"{key if key in ('loss', 'lr') else ''} {fmt.format(row[key])}".strip())
    if row.get("evaluated"):
        parts.append(f"mAP {row['map']:.4f} mAP50 {row.get('map50', float('nan')):.4f}")
    if row.get("skipped_steps") or row.get("oom_skipped"):
        parts.append(f"skipped {row.get('skipped_steps', 0)} non-finite, {row.get('oom_skipped', 0)} OOM")
    if row.get("stop_reason"):
        parts.append(f"STOP: {row['stop_reason']}")
    return " | ".join(parts)


def _ray_callback_base():
    import ray.train

    return ray.train.UserCallback


class RunRecorder(_ray_callback_base()):
    """Ray Train callback (runs in the Train controller, on the driver's node): appends rank 0's
    aggregated metrics to the run's history, rewrites metrics.csv/json, points checkpoints/latest and
    checkpoints/best at Ray's checkpoint folders and prints one line per epoch."""

    def __init__(self, run_dir: str | os.PathLike, verbose: bool = True):
        self.run_dir = str(run_dir)
        self.verbose = verbose

    def after_report(self, run_context, metrics: list[dict], checkpoint) -> None:
        run_dir = Path(self.run_dir)
        row = dict(metrics[0])  # rank 0's metrics are already aggregated over all workers
        row["time"] = round(time.time(), 3)
        history = read_metrics(run_dir) + [row]
        write_metrics(run_dir, history)
        if checkpoint is not None and Path(checkpoint.path).is_dir():
            ckpt_path = Path(checkpoint.path)
            _link(run_dir / "checkpoints" / "latest", ckpt_path)
            # Best = highest ckpt_score, later epochs winning ties, exactly as Ray's CheckpointConfig
            # ranks them, so the checkpoint linked here is one Ray keeps (it deletes the others).
            score = _ckpt_score(row)
            if score is not None and score >= max(s for s in map(_ckpt_score, history) if s is not None):
                _link(run_dir / "checkpoints" / "best", ckpt_path)
        if self.verbose:
            print(epoch_line(row), flush=True)


# ----------------------------------------------------------------------------------------------------
# Summary (seed 003's "final training report")
# ----------------------------------------------------------------------------------------------------


def hardware_info(cfg: Config, history: list[dict]) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    devices = sorted({str(r["device"]) for r in history if r.get("device")})
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "workers": cfg.train.workers,
            "use_gpu": cfg.train.use_gpu, "devices": devices}


def write_summary(run_dir: Path, cfg: Config, history: list[dict], seconds: float,
                  stop_reason: str) -> dict:
    evaluated = [r for r in history if r.get("evaluated")]
    best = max(evaluated, key=lambda r: (r["map"], r["epoch"])) if evaluated else None
    rates = [r["images_per_s"] for r in history if isinstance(r.get("images_per_s"), (int, float))]
    steady = rates[1:] or rates  # the first epoch includes warm-up (data pipeline start, allocator)
    summary = {
        "run_dir": str(run_dir),
        "model": cfg.model.name,
        "size": f"{cfg.data.size[0]}x{cfg.data.size[1]}",
        "epochs_planned": cfg.train.epochs,
        "epochs_run": len({r["epoch"] for r in history if "loss" in r}),
        "steps": history[-1].get("step") if history else 0,
        "stop_reason": stop_reason,
        "total_time_s": round(seconds, 1),
        "images_per_s": round(sum(steady) / len(steady), 2) if steady else None,
        "peak_mem_mb": max((r.get("peak_mem_mb") or 0 for r in history), default=None),
        "effective_batch": cfg.effective_batch,
        "best_epoch": best["epoch"] if best else None,
        "best_metrics": {k: v for k, v in best.items() if k.startswith(("map", "mar", "precision", "recall", "f1"))}
        if best else {},
        "final_loss": history[-1].get("loss") if history else None,
        "skipped_steps": sum(r.get("skipped_steps") or 0 for r in history),
        "oom_skipped": sum(r.get("oom_skipped") or 0 for r in history),
        "amp_overflow_steps": sum(r.get("amp_overflow_steps") or 0 for r in history),
        "hardware": hardware_info(cfg, history),
        "best_checkpoint": "checkpoints/best" if (run_dir / "checkpoints" / "best").exists() else None,
        "latest_checkpoint": "checkpoints/latest" if (run_dir / "checkpoints" / "latest").exists() else None,
    }
    write_text_atomic(run_dir / "summary.json", json.dumps(summary, indent=1, default=str) + "\n")
    write_text_atomic(run_dir / "summary.md", summary_markdown(summary, history))
    return summary


def summary_markdown(summary: dict, history: list[dict]) -> str:
    hw = summary["hardware"]
    lines = [
        f"# Training report: {Path(summary['run_dir']).name}", "",
        f"- model **{summary['model']}** at {summary['size']}, effective batch {summary['effective_batch']}",
        f"- epochs: {summary['epochs_run']} of {summary['epochs_planned']} ({summary['steps']} optimizer steps)",
        f"- stopped: {summary['stop_reason']}",
        f"- total time {summary['total_time_s']} s; {summary['images_per_s']} images/s (all workers); "
        f"peak memory {summary['peak_mem_mb'] and round(summary['peak_mem_mb'])} MB per worker",
        f"- hardware: {hw['workers']} worker(s) on {', '.join(hw['devices']) or 'n/a'}; CPU {hw['cpu']} "
        f"({hw['cpu_count']} cores)",
        f"- skipped updates: {summary['skipped_steps']} non-finite, {summary['oom_skipped']} out-of-memory",
    ]
    if summary["best_epoch"]:
        best = summary["best_metrics"]
        lines += [f"- best epoch **{summary['best_epoch']}**: mAP {best.get('map', 0):.4f}, "
                  f"mAP50 {best.get('map50', 0):.4f} (checkpoint: `{summary['best_checkpoint']}`)"]
    lines += ["", "| epoch | loss | lr | mAP | mAP50 | images/s |", "|---|---|---|---|---|---|"]
    for r in history:
        def cell(key, fmt):
            value = r.get(key)
            return fmt.format(value) if isinstance(value, (int, float)) else ""
        lines.append(f"| {r.get('epoch')} | {cell('loss', '{:.4f}')} | {cell('lr', '{:.2e}')} | "
                     f"{cell('map', '{:.4f}') if r.get('evaluated') else ''} | "
                     f"{cell('map50', '{:.4f}') if r.get('evaluated') else ''} | {cell('images_per_s', '{:.1f}')} |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------------
# Building and running the TorchTrainer
# ----------------------------------------------------------------------------------------------------


def latest_checkpoint_in(run_dir: Path) -> str | None:
    link = Path(run_dir) / "checkpoints" / "latest"
    return str(link.resolve()) if link.exists() else None


def build_trainer(cfg: Config, run_dir: Path, *, categories: list, resume_from: str | None = None,
                  start_epoch: int = 0, fault_injection=None, callbacks: list | None = None,
                  name: str = RAY_DIR):
    """The TorchTrainer for ``cfg``. ``name``/``storage_path`` are deterministic (RUN_DIR/ray), so a
    restarted driver with the same run_dir finds the checkpoints; the sweep passes its own callbacks.
    ``start_epoch``: epochs already done by a resumed run, so its training stream continues with the
    file order of the epochs it has not run yet."""
    import ray.train
    from ray.train.torch import TorchTrainer

    from neoray.data.stream import ExactSplitDataConfig, eval_dataset, quiet_ray_data, train_dataset
    from neoray.engine.loop import train_loop_per_worker

    quiet_ray_data()
    datasets = {"train": train_dataset(cfg.data.train, seed=cfg.train.seed, max_images=cfg.data.max_train_images,
                                       start_epoch=start_epoch)}
    if cfg.data.val:
        datasets["val"] = eval_dataset(cfg.data.val)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = cfg.train.gpus_per_worker
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"config": cfg.to_dict(), "categories": categories, "resume_from": resume_from,
                           "fault_injection": fault_injection},
        scaling_config=ray.train.ScalingConfig(num_workers=cfg.train.workers, use_gpu=cfg.train.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=name, storage_path=str(Path(run_dir).resolve()),
            failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=ray.train.CheckpointConfig(
                num_to_keep=2, checkpoint_score_attribute="ckpt_score", checkpoint_score_order="max"),
            callbacks=callbacks,
        ),
        datasets=datasets,
        # Every worker trains on its own part (equal sizes) and scores its own part of val (each image once).
        dataset_config=ExactSplitDataConfig(exact=["val"]),
    )


def train(cfg: Config, *, config_path: str | None = None, output: str | None = None,
          resume_dir: str | None = None, fault_injection=None, verbose: bool = True) -> dict:
    """Run ``cfg`` to the end on the connected Ray cluster; returns the summary (also written).

    ``resume_dir``: continue that run (its Ray storage and checkpoints/latest) instead of a new one.
    """
    from neoray.data.shards import read_manifest

    if not cfg.data.train:
        raise ConfigError("data.train: no training shard directory given (set data.train=DIR)")
    categories = read_manifest(cfg.data.train)["categories"]
    if resume_dir:
        run_dir = Path(resume_dir)
        if not (run_dir / "config.yaml").exists():
            raise RunDirError(f"{run_dir}: not a neoray run directory (no config.yaml)")
    else:
        run_dir = new_run_dir(cfg, config_path, output)
    save_config(cfg, run_dir / "config.yaml")
    if verbose:
        print(f"neoray train: run directory {run_dir}", flush=True)
    os.environ.setdefault(POLL_INTERVAL_ENV, POLL_INTERVAL_S)  # see the module docstring

    done = read_metrics(run_dir) if resume_dir else []
    trainer = build_trainer(cfg, run_dir, categories=categories,
                            resume_from=latest_checkpoint_in(run_dir) if resume_dir else None,
                            start_epoch=int(done[-1]["epoch"]) if done else 0,
                            fault_injection=fault_injection, callbacks=[RunRecorder(run_dir, verbose)])
    start = time.perf_counter()
    error = None
    try:
        trainer.fit()
    except Exception as exc:  # the summary is written for failed runs too, then the error goes on
        error = exc
    history = read_metrics(run_dir)
    last_reason = history[-1].get("stop_reason") if history else ""
    if error is not None:
        stop_reason = f"failed: {type(error).__name__}: {str(error).strip().splitlines()[-1] if str(error).strip() else ''}"
    elif last_reason:
        stop_reason = last_reason
    else:
        stop_reason = "completed"
    summary = write_summary(run_dir, cfg, history, time.perf_counter() - start, stop_reason)
    if error is not None:
        raise error
    return summary


__all__ = [
    "RunDirError", "RunRecorder", "build_trainer", "epoch_line", "latest_checkpoint_in", "new_run_dir",
    "read_metrics", "summary_markdown", "train", "write_metrics", "write_summary",
]
