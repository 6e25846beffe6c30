"""The first call on a GPU: everything worth learning there, section by section, each row on disk the moment it is
measured.

    python benchmarks/gpu_check.py --out DIR --budget-s 330 --only core   # CUDA: the sections that need no Ray
    python benchmarks/gpu_check.py --out DIR --budget-s 240 --only ray    # after benchmarks/stage_gpu_wheels.py
    python benchmarks/gpu_check.py --device cpu --tiny --out DIR          # CI: the same script on a CPU, 160x90

Written for the machine it will meet (README "Benchmarks"): one GPU, no package index, Ray, Optuna, albumentations
and the COCO evaluators not installed, 10 minutes a command. So:

* the core sections import nothing beyond torch, torchvision, numpy, pyarrow, opencv, scipy and neoray's Ray-free
  modules (neoray.engine.state/step, neoray.data.decode/draws/tensor_augment/shards);
* every row catches its own failure (recorded, the next row runs); the report (``--out DIR``: DIR/gpu_check.json,
  DIR/gpu_check.txt) is rewritten atomically after every row, so a killed run keeps all it finished; output is
  line-buffered;
* ``--budget-s`` bounds the call: a section or row that no longer fits its estimate is skipped with the reason,
  and at the limit the running row is stopped and the report closed; every subprocess has a timeout.

Sections (``--only``; "core" names the first seven, "ray" the last two):

  models    rtdetr_r18vd and rtdetr_r50vd at 1920x1080, batch 4: training images/s, step time and peak memory with
            AMP bf16, fp16 (with the GradScaler's final scale and the steps it skipped) and off; evaluation images/s;
            training FLOPs per image (torch's FlopCounterMode) and the model FLOPs utilisation, FLOPs/image x
            images/s over the card's dense bf16 peak (PEAK_BF16_TFLOPS).
  amp       AMP against a true fp32 reference (TF32 off for convolutions and matmuls) on the same weights and
            batches over a few optimizer steps, within AMP_TOLERANCE (stated for CUDA and CPU autocast apart).
  decode    real shard bytes (synthetic 1080p JPEGs in neoray's Parquet shards, read with pyarrow) through
            data.decode=gpu's code without Ray: images/s of reading, of decoding on the device, of decoding +
            augmenting (multi-scale, flip, colour jitter), and the share of the GPU that stream takes at the
            training rate; the device's JPEG decoder against the CPU's (mean < PATHS_MEAN_LEVELS).
  engine    neoray's own train_one_epoch (TrainState: AMP auto, EMA, clipping, the guards; fused AdamW on CUDA) for a
            few hundred optimizer steps at 1080p on those batches; a checkpoint saved, loaded and resumed: the
            resumed losses against the original's; then an fp16 run: the GradScaler's scale, overflows, skips.
  maxbatch  the largest batch that fits at 1080p (doubling, then bisection; a bounded number of probes): bf16 for
            both models, then fp16 and fp32 while the budget lasts; images/s and peak memory there.
  layout    channels_last and cudnn.benchmark against the default layout (bf16, batch 4).
  ddp       DistributedDataParallel over NCCL (gloo on a CPU) in a one-process group with gradient accumulation
            (no_sync): the weights equal those of the same steps without DDP.
  stream    (Ray) the training stream (neoray.data.stream) at 1080p with data.decode=cpu and gpu: images/s; the two
            paths' batches compared.
  train     (Ray) `neoray train` with one worker on the GPU for 1 epoch, then `--resume` to epoch 2.

Exit status 0 when every check that ran passed, 1 otherwise (or without CUDA, refused in one line first).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import importlib.metadata
import importlib.util
import json
import math
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterator

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import numpy as np  # noqa: E402
import torch  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("models", "amp", "decode", "engine", "maxbatch", "layout", "ddp", "stream", "train")
GROUPS = {"core": SECTIONS[:7], "ray": SECTIONS[7:]}
# What the Ray sections import beyond the core (benchmarks/stage_gpu_wheels.py brings them to a GPU machine).
RAY_MODULES = ("ray", "albumentations", "faster_coco_eval", "tensorboardX")
AMP_MODES = ("bf16", "fp16", "off")
AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}

# AMP against fp32 on the same weights and batch, at every step: |loss_amp - loss_fp32| / loss_fp32 at most "loss",
# and the cosine between the flattened gradients at least "grad_cosine". DETR's Hungarian matching reassigns
# queries whose costs nearly tie, which moves the gradient of the matched heads by a few percent: measured on a
# CPU, cosine 0.85-0.99 per parameter tensor of a freshly initialised rtdetr_cpu in bf16. CUDA autocast casts
# differently (LayerNorm, softmax and the losses run in fp32 there; grid_sample takes its widest input, the fp32
# grid), so its tolerances are stated apart; until a GPU run measures them they are the CPU's, and the report
# records the worst values seen. A broken AMP path (overflow, underflowing fp16 gradients, a wrong cast) shows as
# a loss off by far more, or a cosine near 0 or NaN.
AMP_TOLERANCE = {
    "cpu": {"bf16": {"loss": 0.05, "grad_cosine": 0.8}},
    "cuda": {"bf16": {"loss": 0.05, "grad_cosine": 0.8}, "fp16": {"loss": 0.02, "grad_cosine": 0.9}},
}
# The device's JPEG decoder against the CPU's, same draws: mean absolute difference under this many levels.
# torchvision's own test holds nvJPEG to libjpeg-turbo at a mean under 2 levels (their IDCTs and chroma
# upsampling differ); the augmentation kernels after it match to a level (tests/test_tensor_augment.py).
PATHS_MEAN_LEVELS = 2.0
QUANTILE_LIMIT = 2**24  # torch.quantile refuses inputs with more elements
# Dense (no sparsity) bf16 tensor-core peak in TFLOPs by device name, the most specific name first.
PEAK_BF16_TFLOPS = (("H200 NVL", 835.5), ("H200", 989.4), ("GH200", 989.4), ("H100 NVL", 835.5),
                    ("H100 PCIe", 756.0), ("H100", 989.4), ("A100", 312.0))


def settings(tiny: bool) -> dict:
    """What each section runs. --tiny tests the script on a CPU in CI: the small CPU model stands in for the
    RT-DETR presets (one r50vd step at 1080p takes a minute on a CPU), at 160x90, a step or two each."""
    if tiny:
        return {"models": ["rtdetr_cpu"], "size": (160, 90), "batch": 1, "warmup": 1, "steps": 1, "eval_batches": 1,
                "amp_model": "rtdetr_cpu", "amp_size": (160, 90), "amp_batch": 2, "amp_steps": 2,
                "images": 16, "data_batch": 4, "decode_passes": 2, "compare_batches": 2,
                "engine_model": "rtdetr_cpu", "engine_batch": 2, "engine_steps": 3, "resume_steps": 3,
                "fp16_steps": 2, "ddp_model": "rtdetr_cpu", "ddp_size": (160, 90), "ddp_micro_steps": 4,
                "maxbatch_amps": ["bf16"], "maxbatch_start": 1, "maxbatch_cap": 2, "maxbatch_probes": 3,
                "train_model": "rtdetr_cpu", "train_batch": 2, "subprocess_timeout_s": 600}
    return {"models": ["rtdetr_r18vd", "rtdetr_r50vd"], "size": (1920, 1080), "batch": 4, "warmup": 3, "steps": 8,
            "eval_batches": 4, "amp_model": "rtdetr_r18vd", "amp_size": (640, 360), "amp_batch": 2, "amp_steps": 3,
            "images": 96, "data_batch": 4, "decode_passes": 2, "compare_batches": 3,
            "engine_model": "rtdetr_r18vd", "engine_batch": 4, "engine_steps": 100, "resume_steps": 10,
            "fp16_steps": 40, "ddp_model": "rtdetr_r18vd", "ddp_size": (640, 360), "ddp_micro_steps": 4,
            "maxbatch_amps": ["bf16", "fp16", "off"], "maxbatch_start": 4, "maxbatch_cap": 128, "maxbatch_probes": 8,
            "train_model": "rtdetr_r18vd", "train_batch": 4, "subprocess_timeout_s": 300}


# Rough seconds per section on one H100 (full) or CI's CPU (tiny): a section starts only when this much of
# --budget-s is left. Rows inside a section check the budget again.
SECTION_COST_S = {"models": (60, 30), "amp": (20, 20), "decode": (30, 15), "engine": (60, 40), "maxbatch": (60, 20),
                  "layout": (30, 10), "ddp": (15, 15), "stream": (60, 60), "train": (150, 150)}


# ----------------------------------------------------------------------------------------------------
# The run: budget, report, rows
# ----------------------------------------------------------------------------------------------------


class BudgetExhausted(BaseException):
    """--budget-s ran out (or the process was told to stop): close the report with what is done. A BaseException
    so that a row's own ``except Exception`` does not swallow it."""


class Budget:
    def __init__(self, seconds: float):
        self.seconds, self.start = seconds, time.monotonic()

    def left(self) -> float:
        return self.seconds - (time.monotonic() - self.start)

    def allows(self, seconds: float) -> bool:
        return self.left() >= seconds

    def why_not(self, seconds: float) -> str:
        return f"needs about {seconds:.0f} s, {max(0.0, self.left()):.0f} s left of --budget-s {self.seconds:.0f}"

    @contextlib.contextmanager
    def enforced(self):
        """Raise BudgetExhausted at the limit (SIGALRM) or on SIGTERM, wherever the run is."""
        def stop(signum, frame):
            raise BudgetExhausted("--budget-s reached" if signum == signal.SIGALRM else "terminated (SIGTERM)")

        previous = {sig: signal.signal(sig, stop) for sig in (signal.SIGALRM, signal.SIGTERM)}
        signal.setitimer(signal.ITIMER_REAL, max(0.001, self.left()))
        try:
            yield
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            for sig, handler in previous.items():
                signal.signal(sig, handler)


class Report:
    """The report as JSON, rewritten atomically after every row, and its table as text next to it."""

    def __init__(self, path: Path, head: dict):
        self.path = path
        self.data = {**head, "sections": {}, "ok": None}
        self.save()

    def section(self, name: str) -> dict:
        return self.data["sections"].setdefault(name, {"status": "running", "rows": []})

    def add(self, name: str, row: dict) -> None:
        self.section(name)["rows"].append(row)
        self.save()
        try:
            line = describe(name, row)
        except Exception:  # noqa: BLE001 - a row this code did not expect is still worth printing
            line = json.dumps(row, default=str)
        print(f"[{name}] {line}", flush=True)

    def close(self, name: str, status: str, seconds: float, **extra) -> None:
        self.section(name).update(status=status, seconds=round(seconds, 1), **extra)
        self.save()
        note = extra.get("reason") or extra.get("error") or ""
        print(f"[{name}] {status} in {seconds:.0f} s{': ' + note if note else ''}", flush=True)

    def save(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(self.data, indent=1, default=str))
        os.replace(tmp, self.path)


def one_line(exc: BaseException) -> str:
    if isinstance(exc, torch.OutOfMemoryError):
        return "out of memory"
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def attempt(fields: dict, measure: Callable[[], dict], device: torch.device) -> dict:
    """One row: ``fields`` plus what ``measure`` returns, or plus its error in one line."""
    row = dict(fields)
    try:
        row.update(measure())
    except Exception as exc:  # noqa: BLE001 - one failed row must not cost the others
        row["error"] = one_line(exc)
    free(device)
    return row


@dataclasses.dataclass
class Context:
    device: torch.device
    tiny: bool
    s: dict
    budget: Budget
    root: Path
    report: Report
    cache: dict = dataclasses.field(default_factory=dict)  # shards, rows: made once, shared by sections

    def rows(self, section: str) -> list[dict]:
        return self.report.data["sections"].get(section, {}).get("rows", [])


def _size(size: tuple[int, int]) -> str:
    return "x".join(map(str, size))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _peak_mib(device: torch.device) -> float | None:
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def _reset_peak(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)


# ----------------------------------------------------------------------------------------------------
# models: training and evaluation throughput per AMP mode, FLOPs and utilisation
# ----------------------------------------------------------------------------------------------------


def synthetic_batch(batch: int, size: tuple[int, int], device: torch.device, channels_last: bool = False):
    """Random uint8 images and five boxes of three classes per image (xyxy pixels)."""
    width, height = size
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator).to(device)
    if channels_last:
        images = images.contiguous(memory_format=torch.channels_last)
    targets = []
    for _ in range(batch):
        xy = torch.rand(5, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
        wh = torch.rand(5, 2, generator=generator) * torch.tensor([width * 0.2, height * 0.2]) + 4
        targets.append({"boxes": torch.cat([xy, xy + wh], dim=1).to(device),
                        "labels": torch.randint(0, 3, (5,), generator=generator).to(device)})
    return images, targets


class Trainer:
    """A model with fused AdamW (on CUDA) and, for fp16, a GradScaler: the training step neoray runs, without
    the engine's guards, to measure the model itself."""

    def __init__(self, name: str, amp: str, device: torch.device, channels_last: bool = False):
        from neoray.models import build_model

        torch.manual_seed(0)
        self.model = build_model(name, num_classes=3).to(device).train()
        if channels_last:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=1e-4, fused=device.type == "cuda")
        self.scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
        self.dtype, self.device, self.channels_last = AMP_DTYPES[amp], device, channels_last
        self.steps_run, self.scaler_skips = 0, 0

    def step(self, images, targets) -> None:
        with torch.autocast(self.device.type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None):
            loss = sum(self.model(images, targets).values())
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        scale = self.scaler.get_scale() if self.scaler.is_enabled() else None
        self.scaler.step(self.optimizer)
        self.scaler.update()
        self.steps_run += 1
        if scale is not None and self.scaler.get_scale() < scale:
            self.scaler_skips += 1  # an inf/NaN gradient: the scaler skipped the step and halved its scale

    def forget_step(self) -> None:
        """After an out-of-memory step: no gradients, and a scaler without that step's half-done state."""
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler = torch.amp.GradScaler(self.device.type, init_scale=self.scaler.get_scale(),
                                           enabled=self.scaler.is_enabled())

    def rate(self, batch: int, size: tuple[int, int], warmup: int, steps: int) -> dict:
        """Training images/s, seconds per step and peak memory at ``batch`` (after ``warmup`` steps)."""
        images, targets = synthetic_batch(batch, size, self.device, self.channels_last)
        for _ in range(warmup):
            self.step(images, targets)
        _sync(self.device)
        _reset_peak(self.device)
        start = time.perf_counter()
        for _ in range(steps):
            self.step(images, targets)
        _sync(self.device)
        seconds = (time.perf_counter() - start) / steps
        out = {"images_per_s": batch / seconds, "step_s": seconds, "peak_mib": _peak_mib(self.device)}
        if self.scaler.is_enabled():
            out.update(grad_scale=self.scaler.get_scale(), scaler_skipped_steps=self.scaler_skips,
                       steps_run=self.steps_run)
        return out


def train_rate(name: str, amp: str, device: torch.device, s: dict, batch: int, channels_last: bool = False) -> dict:
    return Trainer(name, amp, device, channels_last).rate(batch, s["size"], s["warmup"], s["steps"])


def eval_rate(name: str, device: torch.device, s: dict) -> dict:
    from neoray.engine.device import resolve_amp
    from neoray.models import build_model

    dtype, _ = resolve_amp("auto", device)
    model = build_model(name, num_classes=3).to(device).eval()
    images, _ = synthetic_batch(s["batch"], s["size"], device)
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


def train_flops_per_image(name: str, size: tuple[int, int], device: torch.device) -> float:
    """FLOPs of one training step (forward and backward) per image, as torch's FlopCounterMode counts them
    (matmuls, convolutions, attention; the same in any precision)."""
    from torch.utils.flop_counter import FlopCounterMode

    from neoray.models import build_model

    torch.manual_seed(0)
    model = build_model(name, num_classes=3).to(device).train()
    images, targets = synthetic_batch(1, size, device)
    with FlopCounterMode(display=False) as counter:
        sum(model(images, targets).values()).backward()
    return float(counter.get_total_flops())


def peak_bf16_tflops(device_name: str) -> float | None:
    return next((tflops for key, tflops in PEAK_BF16_TFLOPS if key in device_name), None)


def section_models(ctx: Context) -> Iterator[dict]:
    s, device = ctx.s, ctx.device
    peak = ctx.report.data["environment"].get("peak_bf16_tflops")
    row_cost = 12 if not ctx.tiny else 2
    for name in s["models"]:
        base = {"model": name, "size": _size(s["size"])}
        flops = attempt(base | {"measure": "train FLOPs per image"},
                        lambda: {"flops_per_image": train_flops_per_image(name, s["size"], device)}, device)
        yield flops
        per_image = flops.get("flops_per_image")
        for amp in AMP_MODES:
            fields = base | {"measure": "train", "amp": amp, "batch": s["batch"]}
            if not ctx.budget.allows(row_cost):
                yield fields | {"skipped": ctx.budget.why_not(row_cost)}
                continue
            row = attempt(fields, lambda: train_rate(name, amp, device, s, s["batch"]), device)
            yield with_mfu(row, per_image, peak)
        yield attempt(base | {"measure": "eval", "batch": s["batch"]}, lambda: eval_rate(name, device, s), device)


def with_mfu(row: dict, flops_per_image: float | None, peak_tflops: float | None) -> dict:
    if flops_per_image and peak_tflops and row.get("images_per_s"):
        row["mfu"] = flops_per_image * row["images_per_s"] / (peak_tflops * 1e12)
    return row


# ----------------------------------------------------------------------------------------------------
# amp: loss and gradients against a true fp32 reference
# ----------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def true_fp32():
    """IEEE fp32 for convolutions and matmuls: CUDA lets cuDNN run fp32 convolutions in TF32 by default (10 bits
    of mantissa, close to bf16's 8), which would make a poor reference for AMP."""
    knobs = [torch.backends.cudnn.conv, torch.backends.cuda.matmul]
    if not all(hasattr(knob, "fp32_precision") for knob in knobs):  # torch before 2.9: the older switches
        knobs, attr, ieee = [torch.backends.cudnn, torch.backends.cuda.matmul], "allow_tf32", False
    else:
        attr, ieee = "fp32_precision", "ieee"
    before = [getattr(knob, attr) for knob in knobs]
    for knob in knobs:
        setattr(knob, attr, ieee)
    try:
        yield
    finally:
        for knob, value in zip(knobs, before):
            setattr(knob, attr, value)


def _loss_and_grad(model, images, targets, dtype, device) -> tuple[float, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    torch.manual_seed(1)  # the same denoising noise in every precision
    with torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None):
        loss = sum(model(images, targets).values())
    scale = 1024.0 if dtype == torch.float16 else 1.0  # a fixed loss scale keeps fp16 gradients from underflowing
    (loss * scale).backward()
    grad = torch.cat([p.grad.detach().float().flatten() / scale for p in model.parameters() if p.grad is not None])
    return float(loss.detach()), grad


def section_amp(ctx: Context) -> Iterator[dict]:
    """A few AdamW steps on fp32 gradients; at every step the AMP loss and gradients are compared with fp32's on
    the same weights and batch (so the steps cover several points in weight space, not only the init)."""
    from neoray.models import build_model

    s, device = ctx.s, ctx.device
    tolerance = AMP_TOLERANCE[device.type]
    torch.manual_seed(0)
    model = build_model(s["amp_model"], num_classes=3).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    worst = {mode: {"loss": 0.0, "grad_cosine": 1.0} for mode in tolerance}
    images, targets = synthetic_batch(s["amp_batch"], s["amp_size"], device)
    for step in range(s["amp_steps"]):
        batch = torch.roll(images, shifts=step * 7, dims=3)  # a different batch each step
        results = {mode: _loss_and_grad(model, batch, targets, AMP_DTYPES[mode], device) for mode in tolerance}
        with true_fp32():
            ref_loss, ref_grad = _loss_and_grad(model, batch, targets, None, device)
        for mode, (loss, grad) in results.items():
            worst[mode]["loss"] = max(worst[mode]["loss"], abs(loss - ref_loss) / max(abs(ref_loss), 1e-12))
            cosine = float(torch.nn.functional.cosine_similarity(grad, ref_grad, dim=0))
            worst[mode]["grad_cosine"] = min(worst[mode]["grad_cosine"], cosine)
        optimizer.step()  # the fp32 gradients are the ones left in .grad
    for mode, values in worst.items():
        limit = tolerance[mode]
        ok = values["loss"] <= limit["loss"] and values["grad_cosine"] >= limit["grad_cosine"]
        yield {"model": s["amp_model"], "size": _size(s["amp_size"]), "steps": s["amp_steps"], "amp": mode,
               "reference": "fp32, TF32 off", **values, "tolerance": limit, "ok": bool(ok)}


# ----------------------------------------------------------------------------------------------------
# Shards, and data.decode=gpu's batches without Ray
# ----------------------------------------------------------------------------------------------------


def multiscale_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    """80%, 90% and 100% of ``size``, each a 16:9 multiple of 16x9 (what the GPU machine trains with)."""
    k = size[0] // 16
    return sorted({(16 * max(1, round(k * r)), 9 * max(1, round(k * r))) for r in (0.8, 0.9, 1.0)})


def write_shards(root: Path, images: int, size: tuple[int, int]) -> dict:
    """Synthetic 16:9 JPEGs at ``size`` (neoray synth's images) written as neoray shards with their manifest,
    without `neoray prepare` (which imports Ray): the images already are the shard size, so no letterbox."""
    from neoray import storage
    from neoray.data.shards import FORMAT, MANIFEST_NAME, VERSION, shard_name, write_shard
    from neoray.data.synth import write_synthetic_dataset

    paths = write_synthetic_dataset(root / "synth", train=images, val=max(4, images // 8), size=size, classes=4,
                                    seed=0)
    out = {}
    for split in ("train", "val"):
        coco = json.loads(Path(paths[f"{split}_annotations"]).read_text())
        categories = [{"id": c["id"], "name": c["name"], "label": i}
                      for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))]
        label = {c["id"]: c["label"] for c in categories}
        rows = []
        for image in sorted(coco["images"], key=lambda i: i["id"]):
            anns = [a for a in coco["annotations"] if a["image_id"] == image["id"]]
            rows.append({
                "image_id": image["id"], "file_name": image["file_name"],
                "image": (Path(paths[f"{split}_images"]) / image["file_name"]).read_bytes(),
                "width": size[0], "height": size[1], "orig_width": size[0], "orig_height": size[1],
                "scale": 1.0, "pad_x": 0.0, "pad_y": 0.0,
                "boxes": [[x, y, x + w, y + h] for x, y, w, h in (a["bbox"] for a in anns)],
                "labels": [label[a["category_id"]] for a in anns], "iscrowd": [bool(a["iscrowd"]) for a in anns],
                "areas": [float(a["area"]) for a in anns], "ann_ids": [a["id"] for a in anns]})
        directory = root / "shards" / split
        directory.mkdir(parents=True)
        digest = write_shard(rows, str(directory / shard_name(0)))
        boxes = sum(len(r["boxes"]) for r in rows)
        storage.write_json(str(directory / MANIFEST_NAME), {
            "format": FORMAT, "version": VERSION, "size": list(size), "categories": categories,
            "num_images": len(rows), "num_boxes": boxes,
            "shards": [{"file": shard_name(0), "rows": len(rows), "sha256": digest, "boxes": boxes}],
            "options": {"written_by": "benchmarks/gpu_check.py"}, "skipped": {}, "warnings": {}, "counts": {}})
        out[split] = directory
    return out


def shards(ctx: Context) -> dict:
    if "shards" not in ctx.cache:
        ctx.cache["shards"] = write_shards(ctx.root, ctx.s["images"], ctx.s["size"])
    return ctx.cache["shards"]


def read_samples(shard_dir: Path) -> list[dict]:
    """Every row of a shard directory as the stream's samples (JPEG bytes, targets, mapping), read with pyarrow
    (neoray.data.decode.read_rows, what the stream's read tasks run)."""
    from neoray.data.decode import check_targets, read_rows
    from neoray.data.shards import shard_files

    samples = []
    for path in shard_files(str(shard_dir)):
        table = read_rows(path, 0, _row_count(path))
        columns = table.to_pydict()
        for i, image_id in enumerate(columns["image_id"]):
            where = f"{path}: image_id {image_id}"
            samples.append({
                "jpeg": columns["image"][i], "width": columns["width"][i], "height": columns["height"][i],
                "where": where, "boxes": check_targets(columns, i, where),
                "labels": np.asarray(columns["labels"][i], dtype=np.int64), "image_id": int(image_id)})
    return samples


def _row_count(path: str) -> int:
    import pyarrow.parquet as pq

    from neoray import storage

    fs, inner = storage.resolve(path)
    with fs.open_input_file(inner) as handle:
        return pq.ParquetFile(handle).metadata.num_rows


@dataclasses.dataclass
class Batch:
    """What train_one_epoch needs of neoray.data.stream.Batch (which lives in a module that imports Ray)."""

    images: torch.Tensor
    targets: list[dict]

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(self.images.to(device, non_blocking=non_blocking),
                     [{k: v.to(device, non_blocking=non_blocking) for k, v in t.items()} for t in self.targets])


def device_batches(samples: list[dict], batch: int, count: int, device: torch.device, *, seed: int, epoch: int,
                   decode_device: torch.device | None = None) -> Iterator[Batch]:
    """``count`` training batches as data.decode=gpu makes them: an order of the samples per epoch, each batch's
    draws from (seed, epoch, batch index) (neoray.data.draws), JPEGs decoded and augmented on ``decode_device``
    (default ``device``; neoray.data.tensor_augment), boxes moved with numpy. Cycles through the samples."""
    from neoray.data.draws import draw_batch, transform_boxes
    from neoray.data.tensor_augment import apply_draw, decode_jpegs

    size = (samples[0]["width"], samples[0]["height"])
    sizes = multiscale_sizes(size)
    order = np.random.default_rng([seed, epoch]).permutation(len(samples))
    for index in range(count):
        picked = [samples[order[(index * batch + i) % len(order)]] for i in range(batch)]
        draw = draw_batch(sizes, 0.5, 0.4, batch, np.random.default_rng([seed, epoch, index]))
        images = torch.stack(decode_jpegs([p["jpeg"] for p in picked], decode_device or device,
                                          [p["where"] for p in picked]))
        images = apply_draw(images, draw).to(device)
        targets = []
        for sample, flip in zip(picked, draw.flips):
            boxes, keep = transform_boxes(sample["boxes"], size, draw.size, flip)
            targets.append({"boxes": torch.from_numpy(boxes), "labels": torch.from_numpy(sample["labels"][keep])})
        yield Batch(images, targets)


def quantile_sample(values: torch.Tensor, limit: int = QUANTILE_LIMIT) -> torch.Tensor:
    """An evenly strided subsample of at most ``limit`` elements (all of them when they fit): what
    torch.quantile accepts."""
    step = -(-values.numel() // limit)
    return values[::step] if step > 1 else values


# ----------------------------------------------------------------------------------------------------
# decode: reading, decoding and augmenting on the device; device decoder vs CPU decoder
# ----------------------------------------------------------------------------------------------------


def _timed(fn: Callable[[], int], device: torch.device) -> float:
    """Items per second of ``fn`` (which returns how many items it made)."""
    _sync(device)
    start = time.perf_counter()
    items = fn()
    _sync(device)
    return items / (time.perf_counter() - start)


def section_decode(ctx: Context) -> Iterator[dict]:
    from neoray.data.tensor_augment import decode_jpegs

    s, device = ctx.s, ctx.device
    dirs = shards(ctx)
    holder = {}

    def read() -> dict:
        start = time.perf_counter()
        holder["samples"] = read_samples(dirs["train"])
        ctx.cache["samples"] = holder["samples"]
        return {"images": len(holder["samples"]),
                "images_per_s": len(holder["samples"]) / (time.perf_counter() - start)}

    yield attempt({"measure": "read shard rows (pyarrow, 1 core)"}, read, device)
    samples = holder.get("samples")
    if not samples:
        return
    batch, count = s["data_batch"], len(samples) // s["data_batch"]

    decode_jpegs([x["jpeg"] for x in samples[:batch]], device)  # the decoder's start-up is not its rate

    def decode_only() -> int:
        for i in range(count):
            decode_jpegs([x["jpeg"] for x in samples[i * batch:(i + 1) * batch]], device)
        return count * batch

    yield attempt({"measure": "decode", "batch": batch}, lambda: {"images_per_s": _timed(decode_only, device)},
                  device)
    for epoch in range(s["decode_passes"]):
        fields = {"measure": "decode + augment", "batch": batch, "pass": epoch + 1,
                  "sizes": [_size(x) for x in multiscale_sizes(s["size"])]}

        def stream(epoch: int = epoch) -> int:
            return sum(len(b) for b in device_batches(samples, batch, count, device, seed=0, epoch=epoch))

        row = attempt(fields, lambda: {"images_per_s": _timed(stream, device)}, device)
        yield with_train_share(row, ctx)
    yield attempt({"measure": "device decoder vs CPU decoder", "batches": s["compare_batches"]},
                  lambda: compare_decoders(samples, batch, s["compare_batches"], device), device)


def with_train_share(row: dict, ctx: Context) -> dict:
    """The share of the GPU's time the stream takes when training runs at each model's bf16 rate (batch 4): the
    images it must decode per second over the images it decodes per second alone."""
    rates = {r["model"]: r["images_per_s"] for r in ctx.rows("models")
             if r.get("measure") == "train" and r.get("amp") == "bf16" and r.get("images_per_s")}
    if row.get("images_per_s"):
        row["train_images_per_s"] = rates
        row["stream_share_of_device"] = {m: rate / row["images_per_s"] for m, rate in rates.items()}
    return row


def compare_decoders(samples: list[dict], batch: int, batches: int, device: torch.device) -> dict:
    """The same draws through the device's decoder and the CPU's (libjpeg-turbo), then the same tensor ops."""
    cpu = torch.device("cpu")
    ours = device_batches(samples, batch, batches, cpu, seed=0, epoch=0, decode_device=device)
    theirs = device_batches(samples, batch, batches, cpu, seed=0, epoch=0, decode_device=cpu)
    diffs = [(a.images.int() - b.images.int()).abs().flatten() for a, b in zip(ours, theirs)]
    diff = torch.cat(diffs).float()
    mean = float(diff.mean())
    return {"max_levels": int(diff.max()), "mean_levels": mean,
            "p999_levels": float(torch.quantile(quantile_sample(diff), 0.999)),
            "tolerance_mean_levels": PATHS_MEAN_LEVELS, "ok": mean < PATHS_MEAN_LEVELS}


# ----------------------------------------------------------------------------------------------------
# engine: neoray's train_one_epoch, a checkpoint and a resume; an fp16 run
# ----------------------------------------------------------------------------------------------------


class LossRecorder:
    """TrainHooks that keep every micro-step's loss (and pass it on unchanged)."""

    def __init__(self):
        from neoray.engine.hooks import TrainHooks

        self.losses: list[float] = []
        self.hooks = type("RecordingHooks", (TrainHooks,), {"after_forward": self._after_forward})()

    def _after_forward(self, micro_step: int, rank: int, loss: torch.Tensor) -> torch.Tensor:
        self.losses.append(float(loss.detach()))
        return loss


def engine_config(s: dict, amp: str):
    from neoray.config import from_dict

    return from_dict({"model": {"name": s["engine_model"]},
                      "train": {"epochs": 2, "batch_size": s["engine_batch"], "lr": 1e-4, "warmup_steps": 20,
                                "amp": amp, "ema": True, "ema_warmup_steps": 20, "clip_grad_norm": 0.1, "seed": 0}})


def build_state(cfg, device: torch.device, total_steps: int):
    from neoray.engine.state import TrainState
    from neoray.models import build_model

    torch.manual_seed(cfg.train.seed)
    return TrainState.build(cfg, build_model(cfg.model.name, num_classes=4), device, total_steps)


def run_epoch(state, samples: list[dict], steps: int, epoch: int) -> tuple[list[float], dict]:
    """One engine epoch of ``steps`` batches; (every micro-step's loss, the epoch's figures)."""
    from neoray.engine.step import train_one_epoch

    recorder = LossRecorder()
    _reset_peak(state.device)
    batches = device_batches(samples, state.cfg.train.batch_size, steps, state.device, seed=state.cfg.train.seed,
                             epoch=epoch)
    stats = train_one_epoch(state, batches, recorder.hooks)
    state.epoch += 1
    counters = stats.counters
    return recorder.losses, {"images_per_s": stats.images / stats.seconds if stats.seconds else None,
                             "steps": state.step, "skipped_steps": counters.skipped,
                             "amp_overflow_steps": counters.amp_overflow, "oom_skipped": counters.oom,
                             "peak_mib": _peak_mib(state.device)}


def _samples(ctx: Context) -> list[dict]:
    if "samples" not in ctx.cache:
        ctx.cache["samples"] = read_samples(shards(ctx)["train"])
    return ctx.cache["samples"]


def train_and_resume(ctx: Context) -> dict:
    """Epoch 1, a checkpoint, epoch 2; then a fresh state from the checkpoint runs epoch 2's first batches again:
    its losses against the original's (the first one exactly: same weights, batch and RNG state)."""
    from neoray.checkpoints import load_checkpoint, save_checkpoint
    from neoray.engine.seeding import capture_rng_state, restore_rng_state

    s, device, samples = ctx.s, ctx.device, _samples(ctx)
    steps, compare = s["engine_steps"], min(s["resume_steps"], s["engine_steps"])
    cfg = engine_config(s, "auto")
    state = build_state(cfg, device, 2 * steps)
    _, first = run_epoch(state, samples, steps, epoch=0)
    directory = ctx.root / "engine-checkpoint"
    save_checkpoint(directory, {**state.state_dict(), "rng": {"per_rank": [capture_rng_state()]},
                                "config": cfg.to_dict(), "model_name": cfg.model.name, "num_classes": 4})
    losses, second = run_epoch(state, samples, steps, epoch=1)
    del state
    free(device)
    resumed = build_state(cfg, device, 2 * steps)
    payload = load_checkpoint(directory)
    resumed.load_state_dict(payload)
    restore_rng_state(payload["rng"]["per_rank"][0])
    again, _ = run_epoch(resumed, samples, compare, epoch=1)
    rel = [abs(a - b) / max(abs(b), 1e-12) for a, b in zip(again, losses[:compare])]
    mean_rel = abs(sum(again) - sum(losses[:compare])) / max(abs(sum(losses[:compare])), 1e-12)
    ok = bool(rel) and rel[0] <= 1e-5 and mean_rel <= 1e-2 and resumed.step == first["steps"] + compare
    return {"amp_dtype": str(resumed.amp_dtype).replace("torch.", "") if resumed.amp_dtype else "off",
            "epoch1": first, "epoch2": second, "resumed_steps_compared": compare,
            "first_loss_rel_diff": rel[0] if rel else None, "max_loss_rel_diff": max(rel) if rel else None,
            "mean_loss_rel_diff": mean_rel, "losses_after_resume": again, "ok": ok}


def fp16_run(ctx: Context) -> dict:
    s, device = ctx.s, ctx.device
    cfg = engine_config(s, "fp16")
    state = build_state(cfg, device, 2 * s["fp16_steps"])
    losses, figures = run_epoch(state, _samples(ctx), s["fp16_steps"], epoch=0)
    finite = all(math.isfinite(x) for x in losses)
    return {"amp_dtype": str(state.amp_dtype).replace("torch.", "") if state.amp_dtype else "off",
            "grad_scaler": state.scaler.is_enabled(),
            "grad_scale": state.scaler.get_scale() if state.scaler.is_enabled() else None,
            "optimizer": type(state.optimizer).__name__ + (" (fused)" if state.optimizer.defaults.get("fused") else ""),
            "last_loss": losses[-1] if losses else None, **figures,
            "ok": finite and figures["skipped_steps"] == 0 and figures["steps"] > 0}


def section_engine(ctx: Context) -> Iterator[dict]:
    s = ctx.s
    fields = {"model": s["engine_model"], "size": _size(s["size"]), "batch": s["engine_batch"]}
    yield attempt(fields | {"measure": "train_one_epoch + checkpoint + resume", "steps_per_epoch": s["engine_steps"]},
                  lambda: train_and_resume(ctx), ctx.device)
    yield attempt(fields | {"measure": "train_one_epoch, amp fp16", "steps_per_epoch": s["fp16_steps"]},
                  lambda: fp16_run(ctx), ctx.device)


# ----------------------------------------------------------------------------------------------------
# maxbatch: the largest batch that fits
# ----------------------------------------------------------------------------------------------------


def largest_fitting(fits: Callable[[int], bool], start: int, cap: int, max_probes: int) -> tuple[int, int | None, list]:
    """The largest batch for which ``fits`` holds, found by doubling from ``start`` (to ``cap``) and then bisecting
    to within an eighth; at most ``max_probes`` calls. Returns (largest that fit or 0, smallest that did not or
    None, [(batch, fitted)] in probe order)."""
    probes: list[tuple[int, bool]] = []

    def probe(batch: int) -> bool:
        probes.append((batch, fits(batch)))
        return probes[-1][1]

    good, bad, batch = 0, None, start
    while len(probes) < max_probes:
        if not probe(batch):
            bad = batch
            break
        good = batch
        if batch >= cap:
            break
        batch = min(cap, batch * 2)
    while bad is not None and bad - good > max(1, good // 8) and len(probes) < max_probes:
        middle = (good + bad) // 2
        if probe(middle):
            good = middle
        else:
            bad = middle
    return good, bad, probes


def search_batch(name: str, amp: str, ctx: Context) -> dict:
    s, device = ctx.s, ctx.device
    trainer = Trainer(name, amp, device)
    rates: dict[int, dict] = {}

    def fits(batch: int) -> bool:
        try:
            rates[batch] = trainer.rate(batch, s["size"], warmup=1, steps=2)
            return True
        except torch.OutOfMemoryError:
            pass
        trainer.forget_step()  # outside the except: its traceback holds the step's tensors
        free(device)
        return False

    good, bad, probes = largest_fitting(fits, s["maxbatch_start"], s["maxbatch_cap"], s["maxbatch_probes"])
    return {"largest_batch": good, "first_too_large": bad, "cap": s["maxbatch_cap"],
            "probes": [f"{b}:{'ok' if ok else 'oom'}" for b, ok in probes], **rates.get(good, {})}


def section_maxbatch(ctx: Context) -> Iterator[dict]:
    s = ctx.s
    flops = {r["model"]: r.get("flops_per_image") for r in ctx.rows("models") if "flops_per_image" in r}
    peak = ctx.report.data["environment"].get("peak_bf16_tflops")
    cost = 25 if not ctx.tiny else 3
    for amp in s["maxbatch_amps"]:
        for name in s["models"]:
            fields = {"model": name, "size": _size(s["size"]), "amp": amp}
            if not ctx.budget.allows(cost):
                yield fields | {"skipped": ctx.budget.why_not(cost)}
                continue
            yield with_mfu(attempt(fields, lambda: search_batch(name, amp, ctx), ctx.device), flops.get(name), peak)


# ----------------------------------------------------------------------------------------------------
# layout: channels_last and cudnn.benchmark
# ----------------------------------------------------------------------------------------------------

LAYOUTS = (("default", False, False), ("cudnn.benchmark", False, True), ("channels_last + cudnn.benchmark", True, True))


@contextlib.contextmanager
def cudnn_benchmark(enabled: bool):
    before = torch.backends.cudnn.benchmark
    torch.backends.cudnn.benchmark = enabled
    try:
        yield
    finally:
        torch.backends.cudnn.benchmark = before


def section_layout(ctx: Context) -> Iterator[dict]:
    s, device = ctx.s, ctx.device
    cost = 10 if not ctx.tiny else 2
    for name in s["models"]:
        baseline = None
        for layout, channels_last, benchmark in LAYOUTS:
            fields = {"model": name, "size": _size(s["size"]), "batch": s["batch"], "amp": "bf16", "layout": layout}
            if not ctx.budget.allows(cost):
                yield fields | {"skipped": ctx.budget.why_not(cost)}
                continue
            with cudnn_benchmark(benchmark):
                row = attempt(fields, lambda: train_rate(name, "bf16", device, s, s["batch"], channels_last), device)
            if layout == "default":
                baseline = row.get("images_per_s")
            elif baseline and row.get("images_per_s"):
                row["ratio_to_default"] = row["images_per_s"] / baseline
            yield row


# ----------------------------------------------------------------------------------------------------
# ddp: DistributedDataParallel with accumulation (no_sync) in a one-process group
# ----------------------------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ddp_against_plain(ctx: Context) -> dict:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    from neoray.config import from_dict
    from neoray.engine.step import train_one_epoch

    s, device = ctx.s, ctx.device
    cfg = from_dict({"model": {"name": s["ddp_model"]},
                     "train": {"batch_size": 2, "accumulate": 2, "lr": 1e-4, "amp": "off", "ema": False, "seed": 0}})
    images, targets = synthetic_batch(2, s["ddp_size"], device)
    batches = [Batch(torch.roll(images, shifts=7 * i, dims=3), targets) for i in range(s["ddp_micro_steps"])]
    backend = "nccl" if device.type == "cuda" else "gloo"
    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{_free_port()}", rank=0, world_size=1)
    try:
        states = []
        for wrap in (False, True):
            state = build_state(cfg, device, 10)
            if wrap:
                ids = [device.index] if device.type == "cuda" else None
                state.wrapped = DistributedDataParallel(state.model, device_ids=ids)
            torch.manual_seed(1)
            train_one_epoch(state, batches)
            states.append(state)
    finally:
        dist.destroy_process_group()
    plain, ddp = ({name: p.detach() for name, p in st.model.named_parameters()} for st in states)
    diff = max(float((plain[k] - ddp[k]).abs().max()) for k in plain)
    scale = max(float(p.abs().max()) for p in plain.values())
    return {"backend": backend, "micro_steps": len(batches), "accumulate": 2, "steps": [st.step for st in states],
            "max_weight_diff": diff, "max_weight": scale,
            "ok": states[0].step == states[1].step == len(batches) // 2 and diff <= 1e-3 * scale}


def section_ddp(ctx: Context) -> Iterator[dict]:
    yield attempt({"model": ctx.s["ddp_model"], "size": _size(ctx.s["ddp_size"]), "measure": "DDP + no_sync vs plain"},
                  lambda: ddp_against_plain(ctx), ctx.device)


# ----------------------------------------------------------------------------------------------------
# stream (Ray): the training stream, CPU decode vs GPU decode
# ----------------------------------------------------------------------------------------------------


def _data_config(s: dict, decode: str):
    from neoray.config import DataConfig

    return DataConfig(size=s["size"], multiscale=multiscale_sizes(s["size"]), hflip=0.5, color_jitter=0.4,
                      shuffle_buffer=64, decode=decode)


def stream_rate(shard_dir: Path, decode: str, device: torch.device, s: dict) -> dict:
    from neoray.data.stream import ShardSet, iter_train_batches

    passes = []
    for epoch in range(2):
        start, images = time.perf_counter(), 0
        for batch in iter_train_batches(ShardSet.open(str(shard_dir)), s["data_batch"], _data_config(s, decode),
                                        seed=0, epoch=epoch, device=device):
            images += len(batch)
        _sync(device)
        passes.append(images / (time.perf_counter() - start))
    return {"first_pass_images_per_s": passes[0], "images_per_s": passes[1]}


def compare_paths(shard_dir: Path, device: torch.device, s: dict) -> dict:
    """data.decode=cpu (cv2 + albumentations in Ray tasks) against data.decode=gpu on the same epoch."""
    from neoray.data.stream import ShardSet, iter_train_batches

    shard_set = ShardSet.open(str(shard_dir))
    pairs = zip(iter_train_batches(shard_set, s["data_batch"], _data_config(s, "cpu"), seed=0, epoch=0),
                iter_train_batches(shard_set, s["data_batch"], _data_config(s, "gpu"), seed=0, epoch=0, device=device))
    same_targets, diffs = True, []
    for index, (a, b) in enumerate(pairs):
        if index == s["compare_batches"]:
            break
        same_targets &= torch.equal(a.image_ids, b.image_ids) and all(
            torch.equal(ta[k], tb[k]) for ta, tb in zip(a.targets, b.targets) for k in ta)
        diffs.append((a.images.int() - b.images.cpu().int()).abs().flatten())
    diff = torch.cat(diffs).float()
    mean = float(diff.mean())
    return {"batches": len(diffs), "targets_identical": bool(same_targets), "max_levels": int(diff.max()),
            "mean_levels": mean, "p999_levels": float(torch.quantile(quantile_sample(diff), 0.999)),
            "tolerance_mean_levels": PATHS_MEAN_LEVELS, "ok": bool(same_targets) and mean < PATHS_MEAN_LEVELS}


def section_stream(ctx: Context) -> Iterator[dict]:
    import ray

    from neoray.data.stream import quiet_ray_data

    s, device = ctx.s, ctx.device
    train_dir = shards(ctx)["train"]
    cpus = os.cpu_count() or 1
    ray.init(num_cpus=cpus, include_dashboard=False, configure_logging=False, log_to_driver=False)
    try:
        quiet_ray_data()
        for decode in ("cpu", "gpu"):
            row = attempt({"measure": "stream", "decode": decode, "cpus": cpus},
                          lambda: stream_rate(train_dir, decode, device, s), device)
            if row.get("images_per_s"):
                row["images_per_s_per_cpu"] = row["images_per_s"] / cpus
            yield with_train_share(row, ctx) if decode == "gpu" else row
        yield attempt({"measure": "decode=gpu vs decode=cpu batches"}, lambda: compare_paths(train_dir, device, s),
                      device)
    finally:
        ray.shutdown()


# ----------------------------------------------------------------------------------------------------
# train (Ray): `neoray train` with a checkpoint, then --resume
# ----------------------------------------------------------------------------------------------------


def run_command(args: list[str], log: Path, timeout_s: float) -> tuple[int | None, float]:
    """(exit code or None on timeout, seconds): the command in its own process group, all of which is killed at
    the timeout (a `neoray train` starts Ray's processes under it)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a private local Ray per run
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    start = time.perf_counter()
    with open(log, "ab") as out:
        proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT, start_new_session=True)
        try:
            return proc.wait(timeout=max(1.0, timeout_s)), time.perf_counter() - start
        except BaseException:  # the timeout, or --budget-s / SIGTERM while waiting: never leave it running
            for sig, grace in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, sig)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(timeout=grace)
                    break
            if sys.exc_info()[0] is not subprocess.TimeoutExpired:
                raise
    return None, time.perf_counter() - start


def neoray_train_and_resume(ctx: Context) -> dict:
    import yaml

    s, device = ctx.s, ctx.device
    dirs = shards(ctx)
    config = ctx.root / "train.yaml"
    config.write_text(yaml.safe_dump({
        "name": "gpu_check", "output": str(ctx.root / "runs"), "model": {"name": s["train_model"]},
        "data": {"train": str(dirs["train"]), "val": str(dirs["val"]), "size": _size(s["size"]), "decode": "gpu",
                 "shuffle_buffer": 16},
        "train": {"epochs": 1, "batch_size": s["train_batch"], "use_gpu": device.type == "cuda",
                  "cpus_per_worker": 1, "workers": 1, "ema": False, "eval_every": 1, "amp": "auto"}}))
    log, run_dir = ctx.root / "train.log", ctx.root / "runs" / "gpu_check"
    neoray = [sys.executable, "-m", "neoray.cli", "train", str(config)]
    codes, seconds = [], []
    for extra in ([], ["train.epochs=2", "--resume", str(run_dir)]):
        timeout = min(s["subprocess_timeout_s"], ctx.budget.left() - 5)
        code, took = run_command(neoray + extra, log, timeout)
        codes.append(code)
        seconds.append(round(took, 1))
        if code != 0:
            break
    metrics = json.loads((run_dir / "metrics.json").read_text()) if (run_dir / "metrics.json").exists() else []
    pointers = json.loads((run_dir / "checkpoints.json").read_text()) if (run_dir / "checkpoints.json").exists() else {}
    epochs = [int(row["epoch"]) for row in metrics]
    ok = codes == [0, 0] and epochs == [1, 2] and pointers.get("latest", {}).get("epoch") == 2 \
        and (run_dir / "summary.json").exists()
    return {"exit_codes": ["timeout" if c is None else c for c in codes], "seconds": seconds, "epochs": epochs,
            "images_per_s": [row.get("images_per_s") for row in metrics],
            "peak_mem_mb": [row.get("peak_mem_mb") for row in metrics],
            "device": metrics[-1].get("device") if metrics else None, "ok": ok,
            "log_tail": "" if ok else log.read_text(errors="replace")[-3000:]}


def section_train(ctx: Context) -> Iterator[dict]:
    yield attempt({"model": ctx.s["train_model"], "size": _size(ctx.s["size"]), "batch": ctx.s["train_batch"],
                   "measure": "neoray train + --resume"}, lambda: neoray_train_and_resume(ctx), ctx.device)


SECTION_RUNS = {"models": section_models, "amp": section_amp, "decode": section_decode, "engine": section_engine,
                "maxbatch": section_maxbatch, "layout": section_layout, "ddp": section_ddp, "stream": section_stream,
                "train": section_train}


# ----------------------------------------------------------------------------------------------------
# The environment, the table, the run
# ----------------------------------------------------------------------------------------------------


def installed(name: str) -> str | None:
    """The installed version of a distribution, without importing it (None when absent)."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def importable(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ImportError:  # a parent package missing, or an import blocker
        return False


def environment(device: torch.device) -> dict:
    import torchvision

    env = {"device": str(device), "python": platform.python_version(), "torch": torch.__version__,
           "torchvision": torchvision.__version__, "cpus": os.cpu_count(),
           "ray": installed("ray") if importable("ray") else None,
           "missing_for_ray_sections": [m for m in RAY_MODULES if not importable(m)]}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1), cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version(), capability=f"{props.major}.{props.minor}",
                   bf16=torch.cuda.is_bf16_supported(), peak_bf16_tflops=peak_bf16_tflops(props.name))
    return env


def _fmt(value, spec: str = ".1f") -> str:
    return "-" if value is None or (isinstance(value, float) and value != value) else format(value, spec)


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def describe(section: str, row: dict) -> str:
    """One line for a row, as printed when it is measured and in the table."""
    head = " ".join(str(row[k]) for k in ("model", "size", "measure", "decode", "layout", "amp") if k in row)
    if "batch" in row:
        head += f" b{row['batch']}"
    if "skipped" in row:
        return f"{head}: skipped ({row['skipped']})"
    if "error" in row:
        return f"{head}: FAILED: {row['error']}"
    if section in ("models", "layout", "maxbatch"):
        parts = [f"batch {row['largest_batch']} fits (first too large: {row['first_too_large']}; probes "
                 f"{' '.join(row['probes'])})"] if "largest_batch" in row else []
        if "flops_per_image" in row:
            parts.append(f"{row['flops_per_image'] / 1e9:.1f} GFLOPs per image (forward + backward)")
        if "images_per_s" in row:
            parts.append(f"{row['images_per_s']:.1f} img/s")
        if "step_s" in row:
            parts.append(f"{row['step_s']:.3f} s/step, peak {_fmt(row.get('peak_mib'), '.0f')} MiB, "
                         f"MFU {_pct(row.get('mfu'))}")
        if "grad_scale" in row:
            parts.append(f"GradScaler scale {row['grad_scale']:.0f}, skipped {row['scaler_skipped_steps']} of "
                         f"{row['steps_run']} steps")
        if "ratio_to_default" in row:
            parts.append(f"{row['ratio_to_default']:.2f}x default")
        if "amp_dtype" in row:
            parts.append(f"amp {row['amp_dtype']}")
        return f"{head}: {', '.join(parts)}"
    if section == "amp":
        return (f"{head} vs {row['reference']} ({row['steps']} steps): worst loss rel diff {row['loss']:.2e} "
                f"(<= {row['tolerance']['loss']}), worst grad cosine {row['grad_cosine']:.4f} "
                f"(>= {row['tolerance']['grad_cosine']}): {_ok(row)}")
    if "mean_levels" in row:
        return (f"{head}: pixels max {row['max_levels']} / p99.9 {row['p999_levels']:.0f} / mean "
                f"{row['mean_levels']:.3f} levels (mean < {row['tolerance_mean_levels']})"
                f"{', targets identical ' + str(row['targets_identical']) if 'targets_identical' in row else ''}: "
                f"{_ok(row)}")
    if section in ("decode", "stream"):
        share = ", ".join(f"{_pct(v)} of the device's time at {m}'s bf16 training rate" for m, v in
                          row.get("stream_share_of_device", {}).items())
        first = f" (first pass {row['first_pass_images_per_s']:.1f})" if "first_pass_images_per_s" in row else ""
        return f"{head}: {_fmt(row.get('images_per_s'))} img/s{first}{'; ' + share if share else ''}"
    if section == "engine":
        if "epoch1" in row:
            return (f"{head}: {row['amp_dtype']}, {row['epoch2']['steps']} optimizer steps, "
                    f"{_fmt(row['epoch2']['images_per_s'])} img/s with the decode inline, peak "
                    f"{_fmt(row['epoch2']['peak_mib'], '.0f')} MiB; resumed: first loss rel diff "
                    f"{_fmt(row['first_loss_rel_diff'], '.1e')}, mean over {row['resumed_steps_compared']} steps "
                    f"{_fmt(row['mean_loss_rel_diff'], '.1e')}: {_ok(row)}")
        return (f"{head}: {row['amp_dtype']}, scaler {row['grad_scaler']}, scale {_fmt(row['grad_scale'], '.0f')}, "
                f"{row['steps']} steps, {row['amp_overflow_steps']} overflows, {row['skipped_steps']} skipped, "
                f"{row['optimizer']}, {_fmt(row['images_per_s'])} img/s: {_ok(row)}")
    if section == "ddp":
        return (f"{head}: {row['backend']}, steps {row['steps']}, max weight diff {row['max_weight_diff']:.1e} "
                f"(largest weight {row['max_weight']:.2f}): {_ok(row)}")
    if section == "train":
        return (f"{head} ({row['device']}): exit {row['exit_codes']}, epochs {row['epochs']}, "
                f"{', '.join(_fmt(v) for v in row['images_per_s'])} img/s, {' + '.join(map(str, row['seconds']))} s: "
                f"{_ok(row)}")
    return f"{head}: {row}"


def _ok(row: dict) -> str:
    return "ok" if row.get("ok") else "FAILED"


def table(report: dict) -> str:
    env = report["environment"]
    lines = [f"== gpu_check: {env.get('gpu', env['device'])}, torch {env['torch']}, python {env['python']}, "
             f"{env['cpus']} CPUs ({'tiny' if report['tiny'] else 'full'}; {report.get('seconds', 0):.0f} s) =="]
    for name, section in report["sections"].items():
        lines.append(f"-- {name}: {section['status']}" + (f" ({section.get('reason') or section.get('error')})"
                                                          if section.get("reason") or section.get("error") else ""))
        lines += [f"   {describe(name, row)}" for row in section["rows"]]
    lines.append(f"gpu_check: {'all checks passed' if report['ok'] else 'FAILED'}")
    return "\n".join(lines)


def row_failed(row: dict) -> bool:
    return "error" in row or row.get("ok") is False


def run_sections(ctx: Context, names: list[str]) -> None:
    """Run the sections in order; at --budget-s the running one is closed as stopped and the rest as skipped."""
    missing = ctx.report.data["environment"]["missing_for_ray_sections"]
    for index, name in enumerate(names):
        cost = SECTION_COST_S[name][1 if ctx.tiny else 0]
        if name in GROUPS["ray"] and missing:
            ctx.report.close(name, "skipped", 0.0, reason=f"not installed here: {', '.join(missing)} (stage them with "
                                                          f"benchmarks/stage_gpu_wheels.py)")
            continue
        if not ctx.budget.allows(cost):
            ctx.report.close(name, "skipped", 0.0, reason=ctx.budget.why_not(cost))
            continue
        began = time.perf_counter()
        ctx.report.section(name)
        try:
            for row in SECTION_RUNS[name](ctx):
                ctx.report.add(name, row)
        except BudgetExhausted as exc:
            ctx.report.close(name, "stopped", time.perf_counter() - began, reason=str(exc))
            for later in names[index + 1:]:
                ctx.report.close(later, "skipped", 0.0, reason=str(exc))
            return
        except Exception as exc:  # noqa: BLE001 - e.g. the shards could not be made: the next section still runs
            ctx.report.close(name, "failed", time.perf_counter() - began, error=one_line(exc))
        else:
            rows = ctx.report.section(name)["rows"]
            ctx.report.close(name, "failed" if any(map(row_failed, rows)) else "done", time.perf_counter() - began)
        free(ctx.device)


def expand(names: list[str]) -> list[str]:
    wanted = {n for name in names for n in GROUPS.get(name, (name,))}
    return [name for name in SECTIONS if name in wanted]


def main(argv=None) -> int:
    sys.stdout.reconfigure(line_buffering=True)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu (with --tiny: to test the script)")
    parser.add_argument("--tiny", action="store_true", help="160x90, a step or two each: checks the script, not a GPU")
    parser.add_argument("--out", type=Path, help="folder for gpu_check.json and gpu_check.txt (written as rows finish)")
    parser.add_argument("--json", type=Path, help="the report (default: OUT/gpu_check.json, else ./gpu_check.json)")
    parser.add_argument("--only", nargs="+", choices=[*SECTIONS, *GROUPS], default=["core", "ray"],
                        help="these sections, in the script's order ('core': no Ray needed; 'ray': needs Ray)")
    parser.add_argument("--budget-s", type=float, default=540.0,
                        help="stay within this many seconds: skip what no longer fits, stop at the limit (default 540)")
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); run it on a GPU machine, or "
              "pass --device cpu --tiny to test the script", file=sys.stderr)
        return 1
    if device.type != "cuda" and not args.tiny:
        print("gpu_check: the full check needs a GPU; on the CPU only --tiny runs", file=sys.stderr)
        return 1
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    if device.type == "cpu":
        torch.set_num_threads(1)  # testing the script: tiny ops on a shared CPU are quicker without a thread pool
    budget = Budget(args.budget_s)
    json_path = args.json or (args.out / "gpu_check.json" if args.out else Path("gpu_check.json"))
    s = settings(args.tiny)
    report = Report(json_path, {"tiny": args.tiny, "budget_s": args.budget_s, "environment": environment(device),
                                "settings": {k: list(v) if isinstance(v, tuple) else v for k, v in s.items()}})
    np.random.seed(0)
    try:
        with budget.enforced(), tempfile.TemporaryDirectory(prefix="neoray-gpu-check-") as tmp:
            run_sections(Context(device, args.tiny, s, budget, Path(tmp), report), expand(args.only))
    except BudgetExhausted as exc:  # between two sections, or while the temporary folder was removed
        print(f"gpu_check: {exc}; the report holds every row finished before it", flush=True)
    sections = report.data["sections"]
    report.data["seconds"] = budget.seconds - budget.left()
    report.data["ok"] = all(sec["status"] != "failed" for sec in sections.values())  # skipped and stopped say so
    report.save()
    text = table(report.data)
    print("\n" + text)
    if args.out:
        (args.out / "gpu_check.txt").write_text(text + "\n")
    print(f"gpu_check: report written to {json_path}")
    return 0 if report.data["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
