"""A run directory, local or on shared/object storage, and the files in it.

``OUTPUT/NAME`` (NAME: ``cfg.name``, or the config file's stem plus ``-2``, ``-3``... when that run
already exists; an existing run is only continued with ``--resume``). Two runs started at once never
share a directory: a local one (a shared mount too) is created exclusively; object storage has no
exclusive create, so each run writes a claim object of its own and keeps the name only when its claim
is alone there (two runs that claim at once both move on)::

    config.yaml        the resolved config
    metrics.csv/.json  one row per reported epoch, rewritten after each report (metrics.json also keeps
                       the per-class AP of evaluation epochs)
    checkpoints.json   the best and the latest checkpoint, relative to the run directory (a JSON record
                       rather than symlinks, which object storage does not have)
    ray/               Ray Train's storage (RunConfig(storage_path=RUN_DIR, name="ray")): its checkpoints
                       and the snapshot that lets a resumed run find them
    tensorboard/       TensorBoard event files (loss, lr, mAP, images/s per epoch)
    summary.json/.md   the training report, written when the run ends (also after a failure)
"""

from __future__ import annotations

import csv
import io
import json
import os
import platform
import random
import time
import uuid
from typing import Any

from neoray import storage
from neoray.checkpoints import read_pointers
from neoray.config import Config
from neoray.engine import ranking

RAY_DIR = "ray"
CLAIM_PREFIX = ".neoray-claim-"  # object storage: the marker a run writes to take a run directory's name
MAX_NAMES = 10000  # stem, stem-2, ... stem-10000: then the config's name must be chosen


class RunDirError(ValueError):
    """The run directory cannot be used (exists without --resume, or is not a run)."""


def new_run_dir(cfg: Config, config_path: str | None, output: str | None = None) -> str:
    """A fresh run directory: ``cfg.name`` exactly (an error when it exists), or the config stem with a
    counter (``synthetic_cpu``, ``synthetic_cpu-2`` ...)."""
    root = storage.absolute(output or cfg.output)
    if cfg.name:
        run_dir = storage.join(root, cfg.name)
        if not claim_directory(run_dir):
            raise RunDirError(f"run directory {run_dir} already exists; continue it with --resume {run_dir} "
                              f"or choose another name=")
        return run_dir
    stem = os.path.splitext(storage.basename(config_path))[0] if config_path else "run"
    for counter in range(1, MAX_NAMES + 1):
        run_dir = storage.join(root, stem if counter == 1 else f"{stem}-{counter}")
        if claim_directory(run_dir):
            return run_dir
    raise RunDirError(f"{root} holds {MAX_NAMES} runs named {stem}, {stem}-2, ...; choose a name=")


def claim_directory(run_dir: str) -> bool:
    """Create ``run_dir`` (a run's, or a sweep's) for this process alone: True, or False when it exists or
    another process took it at the same moment. Locally (a shared mount too) an exclusive create; on object
    storage a claim object kept only when it is alone under the prefix."""
    local = storage.local_path(run_dir)
    if local is not None:
        try:
            os.makedirs(os.path.dirname(os.path.abspath(local)), exist_ok=True)
            os.mkdir(local)  # atomic, on a shared mount too: exactly one of two runs creates it
        except FileExistsError:
            if os.path.isdir(os.path.dirname(os.path.abspath(local))):
                return False
            raise storage.StorageError(f"{run_dir}: cannot create the directory (a file is in the way)") from None
        except OSError as exc:
            raise storage.StorageError(f"{run_dir}: cannot create the directory ({exc.strerror or exc})") from None
        return True
    if storage.exists(run_dir):
        return False
    claim = CLAIM_PREFIX + uuid.uuid4().hex
    storage.write_bytes(storage.join(run_dir, claim), b"")
    # Listings are strongly consistent (S3, GCS): of two runs that each see only their own claim, one would
    # have listed before the other wrote, and the other would have seen both.
    if [entry.name for entry in storage.list_dir(run_dir)] == [claim]:
        return True
    storage.remove(storage.join(run_dir, claim))
    time.sleep(random.uniform(0.0, 0.2))  # two runs that collided then look at the next name at other times
    return False


def existing_run_dir(path: str) -> str:
    run_dir = storage.absolute(path)
    if not storage.is_file(storage.join(run_dir, "config.yaml")):
        other = storage.not_a_folder(run_dir)
        if other:
            raise RunDirError(f"{run_dir}: {other}, not a neoray run directory")
        raise RunDirError(f"{run_dir}: not a neoray run directory (no config.yaml)")
    return run_dir


def _json_value(value: Any) -> Any:
    if isinstance(value, float) and value != value:  # NaN is not JSON
        return None
    if isinstance(value, dict):
        return {str(k): _json_value(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_json_value(v) for v in value]
    if isinstance(value, (int, float, str, bool)) or value is None:
        return value
    if hasattr(value, "item"):
        return _json_value(value.item())
    return str(value)


def write_metrics(run_dir: str, history: list[dict]) -> None:
    """metrics.json (a list of rows, nested per-class AP kept) and metrics.csv (flat columns: the union
    of keys, first-seen order)."""
    rows = [{k: _json_value(v) for k, v in row.items() if not isinstance(v, list)} for row in history]
    storage.write_text(storage.join(run_dir, "metrics.json"), json.dumps(rows, indent=1) + "\n")
    flat = [{k: v for k, v in row.items() if not isinstance(v, dict)} for row in rows]
    columns: list[str] = []
    for row in flat:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(flat)
    storage.write_text(storage.join(run_dir, "metrics.csv"), buffer.getvalue())


def read_metrics(run_dir: str) -> list[dict]:
    try:
        return storage.read_json(storage.join(run_dir, "metrics.json"))
    except FileNotFoundError:
        return []


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


# ----------------------------------------------------------------------------------------------------
# Summary: the run's final training report
# ----------------------------------------------------------------------------------------------------


def hardware_info(cfg: Config, history: list[dict]) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    devices = sorted({str(r["device"]) for r in history if r.get("device")})
    nodes = sorted({n for r in history for n in str(r.get("nodes") or "").split(",") if n})
    return {"cpu": cpu, "cpu_count": os.cpu_count(), "workers": cfg.train.workers, "use_gpu": cfg.train.use_gpu,
            "devices": devices, "nodes": len(nodes)}


def ended_well(stop_reason: str) -> bool:
    """Whether a run's summary ``stop_reason`` is a normal end: the schedule completed, or early stopping on mAP."""
    return stop_reason == "completed" or stop_reason.startswith("early stop")


def write_summary(run_dir: str, cfg: Config, history: list[dict], seconds: float, stop_reason: str,
                  pretrained_classes: list[str] | None = None) -> dict:
    best = ranking.best(history)
    rates = [r["images_per_s"] for r in history if isinstance(r.get("images_per_s"), (int, float))]
    steady = rates[1:] or rates  # the first epoch includes warm-up (data pipeline start, allocator)
    pointers = _pointers(run_dir)
    summary = {
        "run_dir": run_dir,
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
        "score": ranking.SCORE_DOC,
        "best_epoch": best["epoch"] if best else None,
        "best_score": ranking.score_of(best) if best else None,
        "best_metrics": {k: v for k, v in best.items()
                         if k.startswith(("map", "mar", "precision", "recall", "f1", "per_class_ap"))} if best else {},
        "final_loss": history[-1].get("loss") if history else None,
        "skipped_steps": sum(r.get("skipped_steps") or 0 for r in history),
        "oom_skipped": sum(r.get("oom_skipped") or 0 for r in history),
        "amp_overflow_steps": sum(r.get("amp_overflow_steps") or 0 for r in history),
        "init_from": cfg.model.init_from or None,
        "pretrained_class_rows": pretrained_classes or [],
        "hardware": hardware_info(cfg, history),
        "best_checkpoint": pointers.get("best", {}).get("path"),
        "latest_checkpoint": pointers.get("latest", {}).get("path"),
    }
    storage.write_text(storage.join(run_dir, "summary.json"), json.dumps(_json_value(summary), indent=1) + "\n")
    storage.write_text(storage.join(run_dir, "summary.md"), summary_markdown(summary, history))
    return summary


def _pointers(run_dir: str) -> dict:
    return read_pointers(run_dir)


def summary_markdown(summary: dict, history: list[dict]) -> str:
    hw = summary["hardware"]
    lines = [
        f"# Training report: {storage.basename(summary['run_dir'])}", "",
        f"- model **{summary['model']}** at {summary['size']}, effective batch {summary['effective_batch']}",
        f"- epochs: {summary['epochs_run']} of {summary['epochs_planned']} ({summary['steps']} optimizer steps)",
        f"- stopped: {summary['stop_reason']}",
        f"- total time {summary['total_time_s']} s; {summary['images_per_s']} images/s (all workers); "
        f"peak memory {summary['peak_mem_mb'] and round(summary['peak_mem_mb'])} MB per worker",
        f"- hardware: {hw['workers']} worker(s) on {hw['nodes'] or 1} node(s), {', '.join(hw['devices']) or 'n/a'}; "
        f"CPU {hw['cpu']} ({hw['cpu_count']} cores)",
        f"- skipped updates: {summary['skipped_steps']} non-finite, {summary['oom_skipped']} out-of-memory",
    ]
    if summary["init_from"]:
        kept = ", ".join(summary["pretrained_class_rows"]) or "none"
        lines.append(f"- started from `{summary['init_from']}`; classes that kept pretrained rows: {kept}")
    if summary["best_epoch"]:
        best = summary["best_metrics"]
        if "map" in best:
            lines.append(f"- best epoch **{summary['best_epoch']}**: mAP {best['map']:.4f}, "
                         f"mAP50 {best.get('map50', 0):.4f} (checkpoint: `{summary['best_checkpoint']}`)")
        else:
            lines.append(f"- best epoch **{summary['best_epoch']}** by training loss (no validation data; "
                         f"checkpoint: `{summary['best_checkpoint']}`)")
    lines += ["", "| epoch | loss | lr | mAP | mAP50 | images/s |", "|---|---|---|---|---|---|"]
    for r in history:
        def cell(key, fmt):
            value = r.get(key)
            return fmt.format(value) if isinstance(value, (int, float)) else ""
        lines.append(f"| {r.get('epoch')} | {cell('loss', '{:.4f}')} | {cell('lr', '{:.2e}')} | "
                     f"{cell('map', '{:.4f}')} | {cell('map50', '{:.4f}')} | {cell('images_per_s', '{:.1f}')} |")
    per_class = summary["best_metrics"].get("per_class_ap") or {}
    if per_class:
        lines += ["", f"Per-class AP at the best epoch ({summary['best_epoch']}):", "", "| class | AP |", "|---|---|"]
        lines += [f"| {name} | {'no GT' if ap is None else f'{ap:.4f}'} |" for name, ap in per_class.items()]
    return "\n".join(lines) + "\n"


__all__ = [
    "RAY_DIR", "RunDirError", "claim_directory", "ended_well", "epoch_line", "existing_run_dir", "new_run_dir",
    "read_metrics", "summary_markdown", "write_metrics", "write_summary",
]
