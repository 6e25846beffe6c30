"""Everything worth learning on a GPU, in one call (under 8 minutes on one GPU): run this first when a GPU is
available.

    python benchmarks/gpu_check.py                          # CUDA: the full check at 1920x1080
    python benchmarks/gpu_check.py --device cpu --tiny      # CI: the same script at 160x90 on the CPU

What it measures and checks, each section timed, all of it printed as one table and written to --json:

  models    rtdetr_r18vd and rtdetr_r50vd at 1920x1080: training images/s (forward, backward, AdamW step) and
            peak memory with AMP bf16, AMP fp16 (with a GradScaler) and off; evaluation images/s (AMP as
            train.amp=auto picks it).
  amp       AMP against fp32 on the same weights and batches (rtdetr_r18vd at 640x360): relative loss difference and the
            cosine between the flattened gradients, each against the tolerance stated in AMP_TOLERANCE.
  data      the training stream (neoray.data.stream.iter_train_batches) at 1920x1080 shards with the 80/90/100%
            multi-scale, flip and jitter: images/s with data.decode=cpu (Ray tasks on this machine's CPUs) and
            data.decode=gpu (nvJPEG + tensor ops on the GPU), first and second pass; and the two paths' batches of
            one epoch compared (targets identical, pixels within PATHS_MEAN_LEVELS on average).
  train     `neoray train` with 1 worker on the GPU (data.decode=gpu) for 1 epoch, then `--resume` to epoch 2
            from its checkpoint: both exit 0, the resumed run continues at epoch 2, every file is there.

Exit status 0 when every check passed, 1 otherwise (or without CUDA, refused in one line before anything runs).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402
from bench_models import synthetic_batch  # noqa: E402  (benchmarks/ is the script's own directory)

MODELS = ("rtdetr_r18vd", "rtdetr_r50vd")
AMP_MODES = ("bf16", "fp16", "off")
# AMP vs fp32 on the same weights and batch, at every step: |loss_amp - loss_fp32| / loss_fp32 at most "loss",
# and the cosine between the flattened gradients at least "grad_cosine". bf16 keeps 8 bits of mantissa, fp16 11;
# DETR's Hungarian matching then reassigns queries whose costs nearly tie, which moves the gradient of the
# matched heads by a few percent (measured: cosine 0.85-0.99 per parameter tensor of a freshly initialised
# rtdetr_cpu in bf16 on a CPU). A broken AMP path (overflow, underflowing fp16 gradients, a wrong cast) shows as
# a loss off by far more, or a cosine near 0 or NaN.
AMP_TOLERANCE = {"bf16": {"loss": 0.05, "grad_cosine": 0.8}, "fp16": {"loss": 0.02, "grad_cosine": 0.9}}
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}


def settings(tiny: bool) -> dict:
    """What each section runs. --tiny tests the script on a CPU in CI: the small CPU model stands in for the
    RT-DETR presets there (one r50vd step takes seconds on a CPU), at 160x90."""
    if tiny:
        return {"models": ("rtdetr_cpu",), "size": (160, 90), "batch": 1, "warmup": 1, "steps": 1, "eval_batches": 1,
                "amp_model": "rtdetr_cpu", "amp_size": (160, 90), "amp_batches": 3, "data_images": 24,
                "data_batch": 4, "train_model": "rtdetr_cpu"}
    return {"models": MODELS, "size": (1920, 1080), "batch": 4, "warmup": 3, "steps": 8, "eval_batches": 4,
            "amp_model": "rtdetr_r18vd", "amp_size": (640, 360), "amp_batches": 3, "data_images": 192,
            "data_batch": 4, "train_model": "rtdetr_r18vd"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ----------------------------------------------------------------------------------------------------
# models: training and evaluation throughput per AMP mode
# ----------------------------------------------------------------------------------------------------


def train_rate(name: str, amp: str, device: torch.device, s: dict) -> dict:
    from neoray.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=3).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    images, targets = synthetic_batch(s["batch"], *s["size"], device)
    dtype = AMP_DTYPES[amp]

    def step():
        with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()

    for _ in range(s["warmup"]):
        step()
    _sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    start = time.perf_counter()
    for _ in range(s["steps"]):
        step()
    _sync(device)
    seconds = (time.perf_counter() - start) / s["steps"]
    peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else float("nan")
    return {"images_per_s": s["batch"] / seconds, "step_s": seconds, "peak_mb": peak}


def eval_rate(name: str, device: torch.device, s: dict) -> dict:
    from neoray.engine.device import resolve_amp
    from neoray.models import build_model

    dtype, _ = resolve_amp("auto", device)
    model = build_model(name, num_classes=3).to(device).eval()
    images, _ = synthetic_batch(s["batch"], *s["size"], device)
    with torch.no_grad(), torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        model(images)
        _sync(device)
        start = time.perf_counter()
        for _ in range(s["eval_batches"]):
            model(images)
        _sync(device)
    seconds = time.perf_counter() - start
    return {"images_per_s": s["batch"] * s["eval_batches"] / seconds,
            "amp_dtype": str(dtype).replace("torch.", "") if dtype else "off"}


def check_models(device: torch.device, s: dict) -> list[dict]:
    rows = []
    for name in s["models"]:
        for amp in AMP_MODES:
            row = {"model": name, "amp": amp, "size": "x".join(map(str, s["size"])), "batch": s["batch"]}
            try:
                row.update(train_rate(name, amp, device, s))
            except torch.OutOfMemoryError:
                row["error"] = "out of memory"
            except RuntimeError as exc:  # e.g. an AMP dtype this device does not support
                row["error"] = str(exc).splitlines()[0][:120]
            rows.append(row)
            _free(device)
        rows.append({"model": name, "amp": "eval", "size": "x".join(map(str, s["size"])), "batch": s["batch"],
                     **eval_rate(name, device, s)})
        _free(device)
    return rows


def _free(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()


# ----------------------------------------------------------------------------------------------------
# amp: loss and gradients against fp32
# ----------------------------------------------------------------------------------------------------


def _loss_and_grad(model, images, targets, dtype, device) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same denoising noise in every precision
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = sum(model(images, targets).values())
    scale = 1024.0 if dtype == torch.float16 else 1.0  # a fixed loss scale keeps fp16 gradients from underflowing
    (loss * scale).backward()
    grad = torch.cat([p.grad.detach().float().flatten() / scale for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grad


def check_amp(device: torch.device, s: dict) -> dict:
    """A few AdamW steps on fp32 gradients; at every step the AMP loss and gradients are compared with fp32's
    on the same weights and batch (so the steps cover several points in weight space, not only the init)."""
    from neoray.models import build_model

    torch.manual_seed(0)
    model = build_model(s["amp_model"], num_classes=3).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    modes = [m for m in ("bf16", "fp16") if device.type == "cuda" or m == "bf16"]  # CPU autocast: bf16
    worst = {m: {"loss": 0.0, "grad_cosine": 1.0} for m in modes}
    images, targets = synthetic_batch(2, *s["amp_size"], device)
    for step in range(s["amp_batches"]):
        batch = torch.roll(images, shifts=step * 7, dims=3)  # a different batch each step
        results = {mode: _loss_and_grad(model, batch, targets, AMP_DTYPES[mode], device) for mode in modes}
        ref_loss, ref_grad = _loss_and_grad(model, batch, targets, None, device)
        for mode, (loss, grad) in results.items():
            worst[mode]["loss"] = max(worst[mode]["loss"], abs(loss - ref_loss) / max(abs(ref_loss), 1e-12))
            cosine = float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))
            worst[mode]["grad_cosine"] = min(worst[mode]["grad_cosine"], cosine)
        optimizer.step()  # the fp32 gradients are the ones left in .grad
    out = {"model": s["amp_model"], "size": "x".join(map(str, s["amp_size"])), "steps": s["amp_batches"]}
    for mode, values in worst.items():
        limit = AMP_TOLERANCE[mode]
        ok = values["loss"] <= limit["loss"] and values["grad_cosine"] >= limit["grad_cosine"]
        out[mode] = {**values, "tolerance": limit, "ok": ok}
    out["ok"] = all(out[m]["ok"] for m in modes)
    return out


# ----------------------------------------------------------------------------------------------------
# data: the training stream, CPU decode vs GPU decode
# ----------------------------------------------------------------------------------------------------


def make_shards(root: Path, images: int, size: tuple[int, int]) -> dict:
    from neoray.data.prepare import prepare_coco
    from neoray.data.synth import write_synthetic_dataset

    paths = write_synthetic_dataset(root / "synth", train=images, val=8, size=size, classes=4, seed=0)
    out = {}
    for split in ("train", "val"):
        prepare_coco(paths[f"{split}_annotations"], paths[f"{split}_images"], root / "shards" / split, size=size)
        out[split] = root / "shards" / split
    return out


def stream_rate(shard_dir: Path, decode: str, device: torch.device, s: dict) -> dict:
    from bench_data import multiscale_sizes

    from neoray.config import DataConfig
    from neoray.data.stream import ShardSet, iter_train_batches

    size = s["size"]
    cfg = DataConfig(size=size, multiscale=multiscale_sizes(size), hflip=0.5, color_jitter=0.4, shuffle_buffer=64,
                     decode=decode)
    passes = []
    for epoch in range(2):
        start, images = time.perf_counter(), 0
        for batch in iter_train_batches(ShardSet.open(str(shard_dir)), s["data_batch"], cfg, seed=0, epoch=epoch,
                                        device=device):
            images += len(batch)
        _sync(device)
        passes.append(images / (time.perf_counter() - start))
    return {"decode": decode, "first_pass_images_per_s": passes[0], "images_per_s": passes[1]}


# data.decode=gpu against data.decode=cpu on the same epoch: targets identical, pixels within the decoders'
# rounding (nvJPEG's IDCT and upsampling differ from libjpeg-turbo's by a level or two; the augmentation kernels
# match to one level, see tests/test_tensor_augment.py): mean absolute difference under this many levels.
PATHS_MEAN_LEVELS = 1.0


def compare_paths(shard_dir: Path, device: torch.device, s: dict, batches: int = 3) -> dict:
    from bench_data import multiscale_sizes

    from neoray.config import DataConfig
    from neoray.data.stream import ShardSet, iter_train_batches

    common = dict(size=s["size"], multiscale=multiscale_sizes(s["size"]), hflip=0.5, color_jitter=0.4,
                  shuffle_buffer=64)
    shard_set = ShardSet.open(str(shard_dir))
    pairs = zip(iter_train_batches(shard_set, s["data_batch"], DataConfig(**common, decode="cpu"), seed=0, epoch=0),
                iter_train_batches(shard_set, s["data_batch"], DataConfig(**common, decode="gpu"), seed=0, epoch=0,
                                   device=device))
    same_targets, diffs = True, []
    for index, (a, b) in enumerate(pairs):
        if index == batches:
            break
        same_targets &= torch.equal(a.image_ids, b.image_ids) and all(
            torch.equal(ta[k], tb[k]) for ta, tb in zip(a.targets, b.targets) for k in ta)
        diffs.append((a.images.int() - b.images.cpu().int()).abs().flatten())
    diff = torch.cat(diffs).float()
    mean = float(diff.mean())
    return {"batches": len(diffs), "targets_identical": bool(same_targets), "max_levels": int(diff.max()),
            "mean_levels": mean, "p999_levels": float(torch.quantile(diff[::max(1, diff.numel() // 2**24)], 0.999)),
            "tolerance_mean_levels": PATHS_MEAN_LEVELS, "ok": bool(same_targets) and mean < PATHS_MEAN_LEVELS}


def check_data(shards: dict, device: torch.device, s: dict) -> list[dict]:
    import ray

    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        from neoray.data.stream import quiet_ray_data

        quiet_ray_data()
        rows = [stream_rate(shards["train"], decode, device, s) for decode in ("cpu", "gpu")]
        paths = compare_paths(shards["train"], device, s)
    finally:
        ray.shutdown()
    for row in rows:
        row["cpus"] = cpus
        row["images_per_s_per_cpu"] = row["images_per_s"] / cpus
    return {"streams": rows, "paths": paths}


# ----------------------------------------------------------------------------------------------------
# train: `neoray train` with a checkpoint, then --resume
# ----------------------------------------------------------------------------------------------------


def _neoray(args: list[str], log: Path) -> tuple[int, float]:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray per run
    start = time.perf_counter()
    with open(log, "ab") as out:
        code = subprocess.call([sys.executable, "-m", "neoray.cli", *args], stdout=out, stderr=subprocess.STDOUT,
                               env=env)
    return code, time.perf_counter() - start


def check_train(shards: dict, root: Path, device: torch.device, s: dict) -> dict:
    import yaml

    gpu = device.type == "cuda"
    config = root / "train.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gpu_check", "output": str(root / "runs"),
        "model": {"name": s["train_model"]},
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "size": "x".join(map(str, s["size"])),
                 "decode": "gpu", "shuffle_buffer": 16},
        "train": {"epochs": 1, "batch_size": 2, "use_gpu": gpu, "cpus_per_worker": 1, "workers": 1,
                  "ema": False, "eval_every": 1, "amp": "auto"},
    }))
    log = root / "train.log"
    first, first_s = _neoray(["train", str(config)], log)
    run_dir = root / "runs" / "gpu_check"
    resumed, resumed_s = _neoray(["train", str(config), "train.epochs=2", "--resume", str(run_dir)], log)
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else []
    pointers = json.loads((run_dir / "checkpoints.json").read_text()) if (run_dir / "checkpoints.json").exists() else {}
    epochs = [int(row["epoch"]) for row in metrics]
    ok = first == 0 and resumed == 0 and epochs == [1, 2] and pointers.get("latest", {}).get("epoch") == 2 \
        and (run_dir / "summary.json").exists()
    tail = "" if ok else log.read_text(errors="replace")[-3000:]
    return {"model": s["train_model"], "exit_codes": [first, resumed], "seconds": [first_s, resumed_s],
            "epochs": epochs, "images_per_s": [row.get("images_per_s") for row in metrics],
            "peak_mem_mb": [row.get("peak_mem_mb") for row in metrics], "device": metrics[-1].get("device") if metrics
            else None, "ok": ok, "log_tail": tail}


# ----------------------------------------------------------------------------------------------------
# The table and the run
# ----------------------------------------------------------------------------------------------------


def environment(device: torch.device) -> dict:
    import ray
    import torchvision

    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "ray": ray.__version__, "cpus": os.cpu_count()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   bf16=torch.cuda.is_bf16_supported())
    return env


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else format(value, spec)


def print_table(report: dict) -> None:
    env = report["environment"]
    print(f"\n== gpu_check: {env.get('gpu', env['device'])}, torch {env['torch']}, {env['cpus']} CPUs "
          f"({'tiny' if report['tiny'] else 'full'}; {report['seconds']:.0f} s) ==")
    print(f"{'model':<14} {'size':>10} {'batch':>5} {'amp':>13} {'img/s':>8} {'step s':>7} {'peak MiB':>9}")
    for row in report.get("models", []):
        rate = row.get("error") or _fmt(row.get("images_per_s"))
        amp = f"train {row['amp']}" if row["amp"] != "eval" else f"eval {row['amp_dtype']}"
        print(f"{row['model']:<14} {row['size']:>10} {row['batch']:>5} {amp:>13} {rate:>8} "
              f"{_fmt(row.get('step_s'), '.3f'):>7} {_fmt(row.get('peak_mb'), '.0f'):>9}")
    amp = report.get("amp") or {}
    for mode in ("bf16", "fp16"):
        if mode in amp:
            m = amp[mode]
            print(f"amp {mode} vs fp32 ({amp['model']} {amp['size']}, {amp['steps']} steps): worst loss rel diff "
                  f"{m['loss']:.2e} (<= {m['tolerance']['loss']}), worst grad cosine {m['grad_cosine']:.4f} "
                  f"(>= {m['tolerance']['grad_cosine']}): {'ok' if m['ok'] else 'FAILED'}")
    data = report.get("data") or {}
    for row in data.get("streams", []):
        print(f"data stream decode={row['decode']}: {row['images_per_s']:.1f} img/s "
              f"({row['images_per_s_per_cpu']:.1f} per CPU of {row['cpus']}), first pass "
              f"{row['first_pass_images_per_s']:.1f} img/s")
    if "paths" in data:
        m = data["paths"]
        print(f"decode=gpu vs decode=cpu batches ({m['batches']}): targets identical {m['targets_identical']}, "
              f"pixels max {m['max_levels']} / p99.9 {m['p999_levels']:.0f} / mean {m['mean_levels']:.3f} levels "
              f"(mean < {m['tolerance_mean_levels']}): {'ok' if m['ok'] else 'FAILED'}")
    train = report.get("train")
    if train:
        print(f"neoray train + --resume ({train['model']}, {train['device']}): exit {train['exit_codes']}, epochs "
              f"{train['epochs']}, {', '.join(_fmt(v) for v in train['images_per_s'])} img/s, "
              f"{' + '.join(f'{v:.0f}' for v in train['seconds'])} s: {'ok' if train['ok'] else 'FAILED'}")
    for name, error in report.get("errors", {}).items():
        print(f"{name}: FAILED: {error}")
    print(f"gpu_check: {'all checks passed' if report['ok'] else 'FAILED'}")


def run_checks(device: torch.device, tiny: bool, sections: list[str], root: Path) -> dict:
    s = settings(tiny)
    report = {"tiny": tiny, "environment": environment(device), "settings": {k: list(v) if isinstance(v, tuple)
                                                                               else v for k, v in s.items()},
              "errors": {}, "section_seconds": {}}
    start = time.perf_counter()
    shards = None
    for name in sections:
        began = time.perf_counter()
        try:
            if name == "models":
                report["models"] = check_models(device, s)
            elif name == "amp":
                report["amp"] = check_amp(device, s)
            else:
                shards = shards or make_shards(root, s["data_images"], s["size"])
                if name == "data":
                    report["data"] = check_data(shards, device, s)
                else:
                    report["train"] = check_train(shards, root, device, s)
        except Exception as exc:  # noqa: BLE001 - one failed section must not hide the others' figures
            report["errors"][name] = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300]}"
        report["section_seconds"][name] = round(time.perf_counter() - began, 1)
    report["seconds"] = time.perf_counter() - start
    report["ok"] = not report["errors"] and all(report.get(name, {}).get("ok", True) for name in ("amp", "train")) \
        and report.get("data", {}).get("paths", {}).get("ok", True)
    return report


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: to test the script)")
    parser.add_argument("--tiny", action="store_true", help="160x90, one step each: checks the script, not a GPU")
    parser.add_argument("--json", default="gpu_check.json", help="where the report goes (default: gpu_check.json)")
    parser.add_argument("--only", nargs="+", choices=["models", "amp", "data", "train"],
                        default=["models", "amp", "data", "train"], help="run these sections only")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "pass --device cpu --tiny to test the script", file=sys.stderr)
        return 1
    if device.type != "cuda" and not args.tiny:
        print("gpu_check: the full check needs a GPU; on the CPU only --tiny runs", file=sys.stderr)
        return 1
    np.random.seed(0)
    with tempfile.TemporaryDirectory(prefix="neoray-gpu-check-") as tmp:
        report = run_checks(device, args.tiny, args.only, Path(tmp))
    print_table(report)
    Path(args.json).write_text(json.dumps(report, indent=2, default=str))
    print(f"gpu_check: report written to {args.json}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
