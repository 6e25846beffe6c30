"""Quality against the peer: neoray's default sweep, a single neoray run of the same wall time, and Ultralytics
YOLO11n from scratch, at equal wall time on the same cores, scored by pycocotools on the same validation COCO
JSON, with a curve per epoch.

    python benchmarks/bench_quality.py --task dense        # every arm; T = the sweep's wall time
    python benchmarks/bench_quality.py --task photo
    # a quick check of the whole harness (a minute per arm, small data, results outside benchmarks/data):
    python benchmarks/bench_quality.py --task photo --train 16 --val 8 --minutes 1 --data-dir /tmp/q \\
        --work /tmp/q/work --sweep-args="--num-samples 2" --config-overrides train.epochs=2
    # a recipe variant of the neoray arms against the recorded peers (same T):
    python benchmarks/bench_quality.py --task photo --arms single --tag lr4 --config-overrides train.lr=4e-3

Tasks (data made once with ``neoray.data.demo.ensure_default_data`` under ``WORK/data``: the COCO dataset,
its shards from ``neoray prepare``, and the Ultralytics layout made from the same COCO JSON):

- ``dense``: ``neoray synth --layout dense``, 128 training and 48 validation images at 320x180, six shape
  classes, 12-30 small objects per image (bench_search's dense task);
- ``photo``: ``neoray synth --layout photo``, 96 training and 48 validation images at 640x360, one class
  (cars; trucks and tanks drawn unlabelled), tens of 8-64 px objects in clutter, validation from another
  site: built to resemble the held-out real set of issue 22 (91 training images at 640x360).

Arms, run one after another on the same machine:

- ``sweep``: ``python experiments/sweep_lr.py --config CONFIG`` (the demo config with the task's data and
  size), as a user runs it. Its wall time, end to end, is T. Curves: every trial's per-epoch validation
  (neoray's evaluator, faster-coco-eval on the same ground truth: the same 12 numbers as pycocotools);
  final: the best trial's checkpoint at its best epoch (the latest one Tune kept if that one is gone: the
  record says which), scored by pycocotools on the validation JSON from ``neoray eval``'s detections.
- ``single``: one ``neoray train`` of the same config on every core (``train.cpus_per_worker`` = CPUs - 1,
  the other one Ray Data's, and ``OMP_NUM_THREADS`` = CPUs). Its epochs are chosen to fit T: a probe run of
  ``PROBE_EPOCHS`` epochs measures the start-up, the time per epoch (training and evaluation) and the
  shut-down, and epochs = floor((T - start-up - shut-down) / epoch time). Final: the run's best checkpoint.
- ``yolo_rect`` and ``yolo_mosaic``: ``YOLO("yolo11n.yaml")`` from scratch, the default recipe, batch 8,
  imgsz = the task's width, ``time=T/3600`` (Ultralytics fits its schedule into the time), with
  ``rect=True`` (issue 22's measurement; no mosaic) and ``rect=False`` (the default: mosaic on). On a CPU
  Ultralytics loads data in the training process and trains on CPUs - 1 torch threads (one of two cores);
  ``--yolo-threads`` (default: every CPU, as the neoray arms) sets the threads, 0 keeps Ultralytics' own.
  Every epoch's weights (``save_period=1``) are scored after the run by pycocotools (predictions at conf
  0.001, at most 100 per image: COCO's maxDets). Final: the epoch of best validation mAP, the rule neoray's
  best checkpoint follows. Ultralytics runs in a child process with its settings in ``WORK/ultralytics``
  (every integration off, offline, no plots: it downloads nothing). Its ``time`` counts from the start of
  its training loop, after its set-up (a few seconds), which the arm's wall time includes.

Outputs (``--data-dir``, default benchmarks/data): ``quality_<task>.csv``, one row per arm x trial x epoch
(elapsed seconds since the arm started, mAP, mAP50, who scored it) and ``quality_<task>.json`` (per arm:
command, commit, versions, machine, load average before and after, T, wall time, final and last mAP/mAP50;
the ratios neoray / YOLO, each against the stronger YOLO arm measured on the same machine and given the same
wall time). The table is printed at the end. Equal wall time only means something on one machine and one
budget: when the neoray arms run on another machine than the recorded YOLO arms, rerun the peer there under
``--peer-tag NAME`` (recorded as ``yolo_rect-NAME``); a tagged sweep is compared at its own wall time (its T
is the untagged sweep's), so it has a peer only once a YOLO arm ran for that time (``--minutes``, within 10%).

Resumable: an arm already recorded is not rerun (``--force ARM`` reruns it); a cut-short arm starts over.
T is ``--minutes`` when given, else the recorded (or now run) untagged sweep's wall time. ``--tag NAME``
records the neoray arms under ``ARM-NAME``, for recipe variants (``--config-overrides``, recorded);
``--peer-tag NAME`` the YOLO arms.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import json
import math
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

import yaml
from portable import portable

from neoray import storage
from neoray.config import format_size
from neoray.configs import DEFAULT_CONFIG
from neoray.data.demo import COMPLETE_MARKER, ensure_default_data
from neoray.tune.continue_best import FINAL_DIR
from neoray.tune.results import best_row, load_history

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = REPO_ROOT / "benchmarks" / "data"
TASKS = {
    "dense": {"layout": "dense", "train": 128, "val": 48, "size": (320, 180), "classes": 6},
    "photo": {"layout": "photo", "train": 96, "val": 48, "size": (640, 360), "classes": 1},
}
NEORAY_ARMS = ("sweep", "single")
YOLO_ARMS = {"yolo_rect": True, "yolo_mosaic": False}  # arm -> rect
ARMS = (*NEORAY_ARMS, *YOLO_ARMS)
PROBE_EPOCHS = 5  # start-up, then four epoch-to-epoch gaps: their median outlasts one slow epoch
YOLO_BATCH = 8
YOLO_CONF = 0.001  # every detection counts for AP, as Ultralytics' own validation
MAX_DETS = 100  # COCO's maxDets
CSV_COLUMNS = ("task", "arm", "trial", "epoch", "elapsed_s", "map", "map50", "scored_by")
PYCOCOTOOLS = "pycocotools"
NEORAY_EVALUATOR = "neoray (faster-coco-eval)"
OFF_BUDGET = 0.15  # an arm whose wall time is further than this share from T is pointed out


class BenchError(RuntimeError):
    """Something the harness cannot go on with; one line for the user."""


# ----------------------------------------------------------------------------------------------------
# Pure parts: COCO <-> YOLO, detections, scores, the table (tests/test_bench_quality.py)
# ----------------------------------------------------------------------------------------------------


def category_ids(coco: dict) -> list[int]:
    """The COCO category ids in YOLO class order (class i = the i-th smallest id), as ``neoray prepare``
    ranks them."""
    return sorted(int(c["id"]) for c in coco["categories"])


def yolo_label_lines(coco: dict) -> dict[str, list[str]]:
    """Per image file name, its YOLO label lines ``class cx cy w h`` normalised to the image size (an image
    without boxes gets no lines: a background image)."""
    cls_of = {cid: i for i, cid in enumerate(category_ids(coco))}
    images = {img["id"]: img for img in coco["images"]}
    lines: dict[str, list[str]] = {img["file_name"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        img = images[ann["image_id"]]
        x, y, w, h = (float(v) for v in ann["bbox"])
        width, height = float(img["width"]), float(img["height"])
        lines[img["file_name"]].append(f"{cls_of[ann['category_id']]} {(x + w / 2) / width:.8f} "
                                       f"{(y + h / 2) / height:.8f} {w / width:.8f} {h / height:.8f}")
    return lines


def write_yolo_split(coco_json: Path, image_dir: Path, root: Path, split: str) -> None:
    """``root/images/<split>/`` (copies of the images) and ``root/labels/<split>/*.txt`` (every image gets
    a label file, empty for a background image)."""
    coco = json.loads(Path(coco_json).read_text())
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "labels" / split).mkdir(parents=True, exist_ok=True)
    for file_name, lines in yolo_label_lines(coco).items():
        shutil.copyfile(image_dir / file_name, root / "images" / split / file_name)
        label = (root / "labels" / split / file_name).with_suffix(".txt")
        storage.write_text(str(label), "".join(line + "\n" for line in lines))


def write_yolo_dataset(dataset: Path, root: Path) -> Path:
    """The Ultralytics layout of a neoray synthetic dataset (``dataset/{train,val}``, ``annotations/``),
    made once (a marker says it is complete); returns ``root/data.yaml``."""
    data_yaml = root / "data.yaml"
    if (root / COMPLETE_MARKER).exists():
        return data_yaml
    shutil.rmtree(root, ignore_errors=True)
    coco = json.loads((dataset / "annotations" / "instances_train.json").read_text())
    names = {i: next(c["name"] for c in coco["categories"] if c["id"] == cid)
             for i, cid in enumerate(category_ids(coco))}
    for split in ("train", "val"):
        write_yolo_split(dataset / "annotations" / f"instances_{split}.json", dataset / split, root, split)
    storage.write_text(str(data_yaml), yaml.safe_dump({"path": str(root), "train": "images/train",
                                                       "val": "images/val", "names": names}, sort_keys=False))
    (root / COMPLETE_MARKER).write_text("ok\n")
    return data_yaml


def detections_to_coco(image_id: int, boxes_xyxy, scores, classes, cat_ids: list[int]) -> list[dict]:
    """One image's detections (pixel ``x1 y1 x2 y2``, score, YOLO class index) as COCO results
    (``bbox`` = ``[x, y, w, h]``, the class mapped back to its category id)."""
    out = []
    for (x1, y1, x2, y2), score, cls in zip(boxes_xyxy, scores, classes):
        x1, y1, x2, y2 = (float(v) for v in (x1, y1, x2, y2))
        out.append({"image_id": int(image_id), "category_id": cat_ids[int(cls)],
                    "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                    "score": round(float(score), 5)})
    return out


def results_to_coco(results, image_ids: dict[str, int], cat_ids: list[int]) -> list[dict]:
    """Ultralytics ``Results`` (boxes in the original image's pixels) as COCO results; ``image_ids``: file
    name -> COCO image id."""
    out = []
    for result in results:
        boxes = result.boxes
        out += detections_to_coco(image_ids[Path(result.path).name], boxes.xyxy.tolist(), boxes.conf.tolist(),
                                  boxes.cls.tolist(), cat_ids)
    return out


def coco_scores(gt_json: str | Path, detections: list[dict]) -> dict:
    """pycocotools' bbox mAP and mAP50 of ``detections`` on every image of ``gt_json`` (no detection at
    all: 0.0, as COCO counts it)."""
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    with contextlib.redirect_stdout(io.StringIO()):  # pycocotools prints its progress
        gt = COCO(str(gt_json))
        if not detections:
            return {"map": 0.0, "map50": 0.0}
        evaluator = COCOeval(gt, gt.loadRes(detections), "bbox")
        evaluator.evaluate()
        evaluator.accumulate()
        evaluator.summarize()
    return {"map": float(evaluator.stats[0]), "map50": float(evaluator.stats[1])}


def _base_arm(name: str) -> str:
    """``yolo_rect-epyc`` -> ``yolo_rect``: the arm a recorded name was run as."""
    return name.split("-", 1)[0]


def _same_machine(a: dict, b: dict) -> bool:
    return (a.get("machine") or {}) == (b.get("machine") or {})


EQUAL_BUDGET = 0.1  # a peer's T within 10% of an arm's budget counts as the same wall time


def arm_budget_s(name: str, arm: dict) -> float | None:
    """The wall time an arm is compared at: a sweep's own wall time (a sweep ends when its trials do, and a
    tagged sweep need not take the untagged one's T); every other arm's T, the time it was fitted to."""
    return arm.get("wall_s") if _base_arm(name) == "sweep" else arm.get("T_s")


def _same_budget(peer: dict, budget_s: float | None) -> bool:
    return bool(budget_s and peer.get("T_s")) and abs(peer["T_s"] - budget_s) <= EQUAL_BUDGET * budget_s


def peer_arm(arms: dict, of: str | None = None) -> str | None:
    """The stronger recorded YOLO arm (the higher final mAP50); with ``of``, among those measured on the same
    machine as the arm ``of`` (CPU model, count and platform) and given the same wall time (within
    EQUAL_BUDGET of ``of``'s budget): equal wall time means nothing across machines or across budgets."""
    budget = arm_budget_s(of, arms[of]) if of else None
    yolo = [name for name in arms if _base_arm(name) in YOLO_ARMS and arms[name].get("final")
            and (of is None or (_same_machine(arms[name], arms[of]) and _same_budget(arms[name], budget)))]
    return max(yolo, key=lambda name: arms[name]["final"]["map50"], default=None)


def ratio_table(record: dict) -> str:
    """The Markdown table of every recorded arm, with neoray / YOLO ratios against the stronger YOLO arm measured
    on the same machine (the peer column names it)."""
    arms = record.get("arms", {})
    budget = f"T = {record['T_s']:.0f} s ({record['T_from']})" if record.get("T_s") else "T not known yet"
    lines = [f"{record['task']}: {budget}; ratios against the stronger YOLO arm on the same machine and budget",
             "| arm | T s | wall s | epochs | final epoch | mAP | mAP50 | mAP / YOLO | mAP50 / YOLO | peer |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name in sorted(arms, key=_arm_order):
        arm = arms[name]
        final = arm.get("final") or {}
        peer = None if _base_arm(name) in YOLO_ARMS else peer_arm(arms, name)
        ref = arms[peer]["final"] if peer else None

        def ratio(key):
            if ref is None or not final or ref[key] <= 0:
                return "-"
            return f"{final[key] / ref[key]:.2f}x"

        cells = [name, f"{arm['T_s']:.0f}" if arm.get("T_s") else "-", f"{arm['wall_s']:.0f}",
                 str(arm.get("epochs", "-")), str(final.get("epoch", "-")), _num(final.get("map")),
                 _num(final.get("map50")), ratio("map"), ratio("map50"), peer or "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _num(value) -> str:
    return "-" if value is None else f"{value:.4f}"


def _arm_order(name: str) -> tuple:
    base = name.split("-", 1)[0]
    return (ARMS.index(base) if base in ARMS else len(ARMS), name)


def fit_epochs(budget_s: float, report_times: list[float], started: float, ended: float) -> dict:
    """The single arm's epochs that fit ``budget_s``, from a probe run: ``report_times`` are the unix times
    its epochs were reported, ``started``/``ended`` when the command started and exited. The time per epoch
    is the median gap between reports; start-up = first report - start - one epoch; shut-down = end - last
    report."""
    if len(report_times) < 2:
        raise BenchError(f"the probe run reported {len(report_times)} epoch(s); need at least 2 to time an epoch")
    gaps = sorted(b - a for a, b in zip(report_times, report_times[1:]))
    epoch_s = gaps[len(gaps) // 2] if len(gaps) % 2 else (gaps[len(gaps) // 2 - 1] + gaps[len(gaps) // 2]) / 2
    startup_s = max(0.0, report_times[0] - started - epoch_s)
    shutdown_s = max(0.0, ended - report_times[-1])
    epochs = max(1, math.floor((budget_s - startup_s - shutdown_s) / epoch_s))
    return {"epochs": epochs, "epoch_s": round(epoch_s, 2), "startup_s": round(startup_s, 2),
            "shutdown_s": round(shutdown_s, 2)}


# ----------------------------------------------------------------------------------------------------
# Records: the CSV of curves and the JSON of arms
# ----------------------------------------------------------------------------------------------------


def _paths(args) -> tuple[Path, Path]:
    out = Path(args.data_dir)
    return out / f"quality_{args.task}.csv", out / f"quality_{args.task}.json"


def _read_csv(path: Path) -> list[dict]:
    return list(csv.DictReader(io.StringIO(path.read_text()))) if path.exists() else []


def _write_csv(path: Path, rows: list[dict]) -> None:
    out = io.StringIO()
    writer = csv.DictWriter(out, fieldnames=CSV_COLUMNS, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    storage.write_text(str(path), out.getvalue())


def _read_record(path: Path, task: str) -> dict:
    return json.loads(path.read_text()) if path.exists() else {"task": task, "arms": {}}


def _save_arm(args, name: str, arm: dict, rows: list[dict]) -> None:
    """Replace the arm's rows and record (a killed run keeps every arm it finished)."""
    csv_path, json_path = _paths(args)
    kept = [r for r in _read_csv(csv_path) if r["arm"] != name]
    _write_csv(csv_path, kept + [{"task": args.task, "arm": name, **r} for r in rows])
    record = _read_record(json_path, args.task)
    record["arms"][name] = arm
    storage.write_json(str(json_path), portable(_with_ratios(record)), indent=1)


def _with_ratios(record: dict) -> dict:
    """``ratios``: each neoray arm against the stronger YOLO arm on its machine (``peers`` names it); ``peer``:
    the stronger YOLO arm overall."""
    record["peer"] = peer_arm(record["arms"])
    record["ratios"], record["peers"] = {}, {}
    for name, arm in record["arms"].items():
        peer = None if _base_arm(name) in YOLO_ARMS else peer_arm(record["arms"], name)
        if peer and arm.get("final"):
            ref = record["arms"][peer]["final"]
            record["peers"][name] = peer
            record["ratios"][name] = {k: (arm["final"][k] / ref[k] if ref[k] > 0 else None) for k in ("map", "map50")}
    return record


def _git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], capture_output=True, text=True, check=True, cwd=REPO_ROOT).stdout.strip()

    try:
        return git("rev-parse", "HEAD") + ("+dirty" if git("status", "--porcelain", "--untracked-files=no") else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _versions() -> dict:
    out = {"python": platform.python_version()}
    for package in ("neoray", "torch", "torchvision", "ray", "ultralytics", "pycocotools"):
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def _machine() -> dict:
    model = ""
    with contextlib.suppress(OSError):
        model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("model name")), "")
    return {"platform": platform.platform(), "cpu": model or platform.processor(), "cpus": os.cpu_count()}


def _load() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


# ----------------------------------------------------------------------------------------------------
# Running the arms
# ----------------------------------------------------------------------------------------------------


def _child_env(**extra) -> dict:
    """The environment of every arm's command: this checkout's neoray first, a private Ray instance (no
    RAY_ADDRESS), no usage reports; ``extra`` on top (None removes a variable)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    for key, value in extra.items():
        if value is None:
            env.pop(key, None)
        else:
            env[key] = value
    return env


def _run(cmd: list[str], log: Path, env: dict) -> tuple[float, float]:
    """Run ``cmd`` with its output in ``log``; (start, end) unix times. A failure is a BenchError with
    the log's last lines."""
    print(f"  $ {shlex.join(cmd)}\n    (log: {log})", flush=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.time()
    with open(log, "w") as out:
        code = subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=REPO_ROOT).returncode
    ended = time.time()
    if code != 0:
        tail = "\n".join(log.read_text(errors="replace").splitlines()[-15:])
        raise BenchError(f"{log.stem} exited {code}; the end of {log}:\n{tail}")
    return started, ended


def _neoray(*args: str) -> list[str]:
    return [sys.executable, "-m", "neoray.cli", *args]


def _data_overrides(task: dict, shards: dict) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['val']}", f"data.size={format_size(task['size'])}"]


def _score_neoray_checkpoint(checkpoint: str, shards: dict, gt_json: Path, out: Path) -> dict:
    """``neoray eval`` of a checkpoint (or a run directory: its best checkpoint) on the validation shards,
    its detections scored again by pycocotools on the validation JSON."""
    metrics_path = out / "eval.json"
    _run(_neoray("eval", checkpoint, "--data", str(shards["val"]), "--gt-json", str(gt_json), "--out",
                 str(metrics_path)), out / "eval.log", _child_env())
    metrics = json.loads(metrics_path.read_text())
    detections = json.loads((out / metrics["detections_file"]).read_text())
    scores = coco_scores(gt_json, detections)
    return {**scores, "epoch": metrics["epoch"], "checkpoint": metrics["checkpoint"], "scored_by": PYCOCOTOOLS,
            "neoray_eval": {"map": metrics["map"], "map50": metrics["map50"]}}


def run_sweep_arm(args, ctx: dict, name: str, work: Path) -> dict:
    sweep_dir = work / "sweep"
    cmd = [sys.executable, str(REPO_ROOT / "experiments" / "sweep_lr.py"), "--config", args.config,
           "--output", str(work), "--name", "sweep", *shlex.split(args.sweep_args),
           *_data_overrides(ctx["task"], ctx["shards"]), *args.config_overrides]
    # a trial's torch threads follow its CPUs (Ray's OMP_NUM_THREADS), not this shell's
    started, ended = _run(cmd, work / "sweep.log", _child_env(OMP_NUM_THREADS=None))
    rows, histories = [], {}
    for trial_dir in sorted(sweep_dir.glob("trial_*")):
        histories[trial_dir.name] = load_history(str(sweep_dir), trial_dir.name)
        for h in histories[trial_dir.name]:
            if h.get("evaluated"):
                rows.append({"trial": trial_dir.name, "epoch": h["epoch"],
                             "elapsed_s": round(float(h.get("timestamp", started)) - started, 1), "map": h["map"],
                             "map50": h["map50"], "scored_by": NEORAY_EVALUATOR})
    best = best_row(_typed_rows(sweep_dir / "trials.csv"))
    if best is None:
        raise BenchError(f"{sweep_dir}: no trial reported a result")
    final_run = sweep_dir / FINAL_DIR  # search.trial_epochs: the best trial continued to the end of its schedule
    if (final_run / "metrics.csv").is_file():
        rows += [{"trial": FINAL_DIR, "epoch": int(float(r["epoch"])),
                  "elapsed_s": round(float(r["time"]) - started, 1), "map": float(r["map"]),
                  "map50": float(r["map50"]), "scored_by": NEORAY_EVALUATOR}
                 for r in _metrics_rows(final_run) if r.get("map") not in (None, "")]
        final = _score_neoray_checkpoint(str(final_run), ctx["shards"], ctx["val_json"], work)
        epochs, best_epoch, curve = _last(rows, FINAL_DIR)["epoch"], final.get("epoch"), FINAL_DIR
    else:
        checkpoint, best_epoch = _trial_checkpoint(sweep_dir / best["trial"], histories[best["trial"]])
        final = _score_neoray_checkpoint(str(checkpoint), ctx["shards"], ctx["val_json"], work)
        epochs, curve = max((h["epoch"] for h in histories[best["trial"]]), default=0), best["trial"]
    return {"command": shlex.join(cmd), "wall_s": round(ended - started, 1), "started": started, "rows": rows,
            "final": final, "best_trial": best["trial"], "best_trial_best_epoch": best_epoch,
            "continued": curve == FINAL_DIR, "epochs": epochs, "trials": len(histories), "last": _last(rows, curve)}


def _typed_rows(path: Path) -> list[dict]:
    """trials.csv with its numbers as numbers (best_row ranks them)."""
    def value(text: str):
        try:
            return float(text)
        except ValueError:
            return None if text == "" else text

    return [{k: value(v) for k, v in row.items()} for row in _read_csv(path)]


def _trial_checkpoint(trial_dir: Path, history: list[dict]) -> tuple[Path, int]:
    """The trial's checkpoint at its best epoch (ranking.best over its reports) when Tune kept it, else the
    latest kept; and the best epoch. Tune names the checkpoint of each report in ``checkpoint_dir_name``."""
    from neoray.engine import ranking

    best = ranking.best(history)
    kept = {h["epoch"]: trial_dir / h["checkpoint_dir_name"] for h in history
            if h.get("checkpoint_dir_name") and (trial_dir / h["checkpoint_dir_name"]).is_dir()}
    if not kept:
        raise BenchError(f"{trial_dir}: no checkpoint left")
    epoch = best["epoch"] if best and best["epoch"] in kept else max(kept)
    return kept[epoch], (best["epoch"] if best else epoch)


def _last(rows: list[dict], trial: str = "") -> dict:
    mine = [r for r in rows if r.get("trial", "") == trial]
    if not mine:
        return {}
    last = max(mine, key=lambda r: r["epoch"])
    return {"epoch": last["epoch"], "map": last["map"], "map50": last["map50"], "scored_by": last["scored_by"]}


def run_single_arm(args, ctx: dict, name: str, work: Path) -> dict:
    cpus = os.cpu_count() or 1
    env = _child_env(OMP_NUM_THREADS=str(cpus))  # every core's threads in the one worker
    base = [args.config, *_data_overrides(ctx["task"], ctx["shards"]), *args.config_overrides,
            f"train.cpus_per_worker={max(1, cpus - 1)}"]
    probe_dir = work / "probe"
    started, ended = _run(_neoray("train", *base, f"train.epochs={PROBE_EPOCHS}", "name=probe", "--output",
                                  str(probe_dir)), work / "probe.log", env)
    probe_rows = _metrics_rows(probe_dir / "probe")
    fit = fit_epochs(ctx["T_s"], [float(r["time"]) for r in probe_rows], started, ended)
    print(f"  probe: {fit['epoch_s']} s per epoch, {fit['startup_s']} s start-up, {fit['shutdown_s']} s shut-down "
          f"-> {fit['epochs']} epochs in T = {ctx['T_s']:.0f} s", flush=True)
    cmd = _neoray("train", *base, f"train.epochs={fit['epochs']}", "name=single", "--output", str(work))
    started, ended = _run(cmd, work / "single.log", env)
    run_dir = work / "single"
    rows = [{"trial": "", "epoch": int(float(r["epoch"])), "elapsed_s": round(float(r["time"]) - started, 1),
             "map": float(r["map"]), "map50": float(r["map50"]), "scored_by": NEORAY_EVALUATOR}
            for r in _metrics_rows(run_dir) if r.get("map") not in (None, "")]
    final = _score_neoray_checkpoint(str(run_dir), ctx["shards"], ctx["val_json"], work)
    return {"command": shlex.join(cmd), "wall_s": round(ended - started, 1), "started": started, "rows": rows,
            "final": final, "epochs": fit["epochs"], "fit": fit, "env": {"OMP_NUM_THREADS": str(cpus)},
            "last": _last(rows)}


def _metrics_rows(run_dir: Path) -> list[dict]:
    rows = _read_csv(run_dir / "metrics.csv")
    if not rows:
        raise BenchError(f"{run_dir}: no metrics.csv rows")
    return rows


def run_yolo_arm(args, ctx: dict, name: str, work: Path) -> dict:
    spec = {"data_yaml": str(ctx["data_yaml"]), "project": str(work), "name": "train", "imgsz": ctx["task"]["size"][0],
            "hours": ctx["T_s"] / 3600, "rect": YOLO_ARMS[_base_arm(name)], "val_json": str(ctx["val_json"]),
            "val_images": str(ctx["dataset"] / "val"), "out": str(work / "yolo_scores.json"),
            "threads": args.yolo_threads, "launched": time.time()}
    spec_path = work / "spec.json"
    storage.write_json(str(spec_path), spec, indent=1)
    config_dir = Path(args.work) / "ultralytics"  # Ultralytics' settings file, away from the user's own
    env = _child_env(YOLO_CONFIG_DIR=str(config_dir), YOLO_OFFLINE="1")
    cmd = [sys.executable, str(Path(__file__).resolve()), "yolo-arm", str(spec_path)]
    _run(cmd, work / "yolo.log", env)
    result = json.loads((work / "yolo_scores.json").read_text())
    rows = [{"trial": "", **r, "scored_by": PYCOCOTOOLS} for r in result["rows"]]
    if not rows:
        raise BenchError(f"{work}: YOLO saved no epoch weights")
    best = max(rows, key=lambda r: (r["map"], r["epoch"]))
    return {"command": f"{shlex.join(cmd)}  # {json.dumps(_yolo_train_kwargs(spec))}",
            "wall_s": round(result["train_end"] - spec["launched"], 1), "started": spec["launched"],
            "rows": rows, "epochs": len(rows), "ultralytics_val": result["ultralytics_val"],
            "torch_threads": result["torch_threads"],
            "final": {"epoch": best["epoch"], "map": best["map"], "map50": best["map50"], "scored_by": PYCOCOTOOLS,
                      "checkpoint": str(work / "train" / "weights" / f"epoch{best['epoch'] - 1}.pt")},
            "last": _last(rows)}


def _yolo_train_kwargs(spec: dict) -> dict:
    return {"data": spec["data_yaml"], "time": spec["hours"], "imgsz": spec["imgsz"], "batch": YOLO_BATCH,
            "rect": spec["rect"], "save_period": 1, "plots": False, "device": "cpu", "project": spec["project"],
            "name": spec["name"], "exist_ok": True, "seed": 0, "verbose": False}


def yolo_arm_child(spec_path: str) -> None:
    """The YOLO arm in its own process (Ultralytics sets OMP_NUM_THREADS and torch threads on import and
    training): train from scratch, then score every epoch's weights with pycocotools."""
    import torch
    from ultralytics import YOLO, settings

    # Every integration off (Ultralytics turns on those whose package is installed), nothing sent anywhere.
    settings.update({"sync": False, "clearml": False, "comet": False, "dvc": False, "mlflow": False,
                     "raytune": False, "tensorboard": False, "wandb": False, "vscode_msg": False,
                     "openvino_msg": False})
    spec = json.loads(Path(spec_path).read_text())
    model = YOLO("yolo11n.yaml")
    threads_seen = set()
    if spec["threads"]:  # over Ultralytics' own choice (CPUs - 1, set whenever it picks the device)
        model.add_callback("on_train_epoch_start", lambda trainer: torch.set_num_threads(spec["threads"]))
    model.add_callback("on_train_epoch_end", lambda trainer: threads_seen.add(torch.get_num_threads()))
    model.train(**_yolo_train_kwargs(spec))
    train_end, threads_used = time.time(), sorted(threads_seen)
    weights = Path(spec["project"]) / spec["name"] / "weights"
    val = json.loads(Path(spec["val_json"]).read_text())
    ids = {img["file_name"]: img["id"] for img in val["images"]}
    cat_ids = category_ids(val)
    images = [str(Path(spec["val_images"]) / name) for name in sorted(ids)]
    rows = []
    for path in sorted(weights.glob("epoch*.pt"), key=lambda p: int(p.stem[5:])):
        results = YOLO(str(path)).predict(images, conf=YOLO_CONF, max_det=MAX_DETS, imgsz=spec["imgsz"], device="cpu",
                                          stream=True, verbose=False, batch=YOLO_BATCH)
        scores = coco_scores(spec["val_json"], results_to_coco(results, ids, cat_ids))
        rows.append({"epoch": int(path.stem[5:]) + 1, "elapsed_s": round(path.stat().st_mtime - spec["launched"], 1),
                     **scores})
        print(f"epoch {rows[-1]['epoch']}: mAP {scores['map']:.4f} mAP50 {scores['map50']:.4f}", flush=True)
    results_csv = Path(spec["project"]) / spec["name"] / "results.csv"
    own = [{k.strip(): v for k, v in r.items()} for r in _read_csv(results_csv)]
    ultralytics_val = [{"epoch": int(float(r["epoch"])), "map50": float(r["metrics/mAP50(B)"]),
                        "map": float(r["metrics/mAP50-95(B)"])} for r in own]
    storage.write_json(spec["out"], {"train_end": train_end, "torch_threads": threads_used, "rows": rows,
                                     "ultralytics_val": ultralytics_val}, indent=1)


RUNNERS = {"sweep": run_sweep_arm, "single": run_single_arm, "yolo_rect": run_yolo_arm, "yolo_mosaic": run_yolo_arm}


# ----------------------------------------------------------------------------------------------------
# The benchmark
# ----------------------------------------------------------------------------------------------------


def _arm_name(arm: str, tag: str, peer_tag: str = "") -> str:
    if arm in NEORAY_ARMS:
        return f"{arm}-{tag}" if tag else arm
    return f"{arm}-{peer_tag}" if peer_tag else arm


def prepare_task(args) -> dict:
    task = dict(TASKS[args.task])
    task["train"] = args.train or task["train"]
    task["val"] = args.val or task["val"]
    shards = ensure_default_data(size=task["size"], train=task["train"], val=task["val"], classes=task["classes"],
                                 root=Path(args.work) / "data", layout=task["layout"])
    dataset = shards["dataset"]
    data_yaml = write_yolo_dataset(dataset, dataset.parent / "yolo")
    return {"task": task, "shards": shards, "dataset": dataset, "data_yaml": data_yaml,
            "val_json": dataset / "annotations" / "instances_val.json"}


def _budget(args, record: dict) -> tuple[float | None, str]:
    if args.minutes:
        return args.minutes * 60.0, f"--minutes {args.minutes:g}"
    sweep = record["arms"].get("sweep")
    if sweep:
        return sweep["wall_s"], "the sweep's wall time"
    return None, ""


def run_benchmark(args) -> dict:
    csv_path, json_path = _paths(args)
    Path(args.data_dir).mkdir(parents=True, exist_ok=True)
    ctx = prepare_task(args)
    names = [_arm_name(arm, args.tag, args.peer_tag) for arm in args.arms]
    for name in args.force:
        if name not in names:
            raise BenchError(f"--force {name}: not one of the arms asked for ({', '.join(names)})")
    for arm, name in zip(args.arms, names):
        record = _read_record(json_path, args.task)
        done = record["arms"].get(name)
        if done and name not in args.force:
            if arm in NEORAY_ARMS and done.get("config_overrides") != args.config_overrides:
                raise BenchError(f"{name} is recorded with --config-overrides {done.get('config_overrides')}, not "
                                 f"{args.config_overrides}: pass --force {name} or another --tag")
            print(f"{name}: recorded ({_num(done['final']['map50'])} mAP50); --force {name} reruns it", flush=True)
            continue
        ctx["T_s"], t_from = _budget(args, record)
        if ctx["T_s"] is None and arm != "sweep":
            raise BenchError(f"{name} needs T: run the sweep arm first (--arms sweep ...) or pass --minutes")
        work = Path(args.work) / args.task / name
        shutil.rmtree(work, ignore_errors=True)  # a cut-short arm starts over
        work.mkdir(parents=True)
        print(f"{name}: running" + (f" for T = {ctx['T_s']:.0f} s ({t_from})" if ctx["T_s"] else "")
              + f" in {work}", flush=True)
        load_before = _load()
        result = RUNNERS[arm](args, ctx, name, work)
        rows = result.pop("rows")
        if arm == "sweep" and not args.tag and not args.minutes:
            ctx["T_s"], t_from = result["wall_s"], "the sweep's wall time"
        arm_record = {**result, "T_s": ctx["T_s"] if ctx["T_s"] is not None else result["wall_s"],
                      "T_from": t_from or "its own wall time", "load_before": load_before, "load_after": _load(),
                      "config": args.config if arm in NEORAY_ARMS else None,
                      "config_overrides": args.config_overrides if arm in NEORAY_ARMS else None,
                      "sweep_args": args.sweep_args if arm == "sweep" else None,
                      "data": {k: ctx["task"][k] for k in ("layout", "train", "val", "classes")}
                      | {"size": format_size(ctx["task"]["size"])},
                      "commit": _git_commit(), "versions": _versions(), "machine": _machine(),
                      "invocation": "python benchmarks/bench_quality.py " + shlex.join(sys.argv[1:]),
                      "recorded": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        _save_arm(args, name, arm_record, rows)
        print(f"{name}: {result['wall_s']:.0f} s, final mAP {_num(result['final']['map'])} mAP50 "
              f"{_num(result['final']['map50'])}", flush=True)
        if arm != "sweep" and abs(result["wall_s"] - arm_record["T_s"]) > OFF_BUDGET * arm_record["T_s"]:
            print(f"note: {name} ran {result['wall_s']:.0f} s for T = {arm_record['T_s']:.0f} s (load average "
                  f"{load_before} before, {arm_record['load_after']} after: a busy machine times arms unequally)",
                  flush=True)
    record = _read_record(json_path, args.task)
    record["T_s"], record["T_from"] = _budget(args, record)
    record.update({"command": "python benchmarks/bench_quality.py " + shlex.join(sys.argv[1:]),
                   "commit": _git_commit(), "versions": _versions(), "machine": _machine()})
    storage.write_json(str(json_path), portable(_with_ratios(record)), indent=1)
    _warn_unequal_budgets(record)
    print("\n" + ratio_table(record) + f"\ncurves: {csv_path}\nrecord: {json_path}", flush=True)
    return record


def _warn_unequal_budgets(record: dict) -> None:
    if not record.get("T_s"):
        return
    other = {name: arm["T_s"] for name, arm in record["arms"].items()
             if not name.startswith("sweep") and arm.get("T_s") and abs(arm["T_s"] - record["T_s"]) > 1}
    if other:
        print(f"note: arms recorded at another T than {record['T_s']:.0f} s: "
              + ", ".join(f"{name} {t:.0f} s" for name, t in other.items()), flush=True)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", choices=sorted(TASKS), required=True)
    parser.add_argument("--arms", nargs="+", choices=ARMS, default=list(ARMS),
                        help="arms to run, in this order (default: all; the sweep first, it measures T)")
    parser.add_argument("--force", nargs="+", default=[], metavar="ARM",
                        help="rerun these arms even when recorded (with --tag: ARM-TAG)")
    parser.add_argument("--minutes", type=float, default=None,
                        help="T in minutes, instead of the sweep's wall time (quick checks, ablations)")
    parser.add_argument("--config", default=str(DEFAULT_CONFIG),
                        help="the neoray arms' training config (default: the demo config, synthetic_cpu.yaml); "
                             "the task's data paths and size are set on top")
    parser.add_argument("--config-overrides", nargs="+", default=[], metavar="KEY=VALUE",
                        help="overrides of the neoray arms' config (recorded with the arms)")
    parser.add_argument("--yolo-threads", type=int, default=os.cpu_count() or 1,
                        help="torch threads of the YOLO arms' training (default: every CPU, the cores the neoray "
                             "arms use; 0: Ultralytics' own choice, CPUs - 1, with which issue 22 measured it)")
    parser.add_argument("--sweep-args", default="", help="more arguments of sweep_lr.py, one string (recorded)")
    parser.add_argument("--tag", default="", help="record the neoray arms as ARM-TAG (recipe variants)")
    parser.add_argument("--peer-tag", default="", help="record the YOLO arms as ARM-TAG (the peer rerun, e.g. on "
                                                        "another machine: ratios pair arms of the same machine)")
    parser.add_argument("--train", type=int, default=0, help="training images (default: the task's)")
    parser.add_argument("--val", type=int, default=0, help="validation images (default: the task's)")
    parser.add_argument("--work", default=str(REPO_ROOT / ".neoray_cache" / "quality"),
                        help="data, sweeps, runs and YOLO runs (default .neoray_cache/quality)")
    parser.add_argument("--data-dir", default=str(DATA_DIR), help="where the CSV and JSON go (default benchmarks/data)")
    args = parser.parse_args(argv)
    for flag, value in (("--tag", args.tag), ("--peer-tag", args.peer_tag)):
        if value and not re.fullmatch(r"[A-Za-z0-9_.]+", value):
            parser.error(f"{flag}: letters, digits, '_' and '.' only")
    if args.minutes is not None and args.minutes <= 0:
        parser.error("--minutes must be > 0")
    args.arms = [arm for arm in ARMS if arm in args.arms]  # the sweep first: it measures T
    args.config = str(Path(args.config).resolve())
    return args


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["yolo-arm"]:  # the harness's own child process (run_yolo_arm)
        yolo_arm_child(argv[1])
        return 0
    try:
        run_benchmark(parse_args(argv))
    except BenchError as exc:
        print(f"bench_quality: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
