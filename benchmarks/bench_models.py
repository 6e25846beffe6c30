"""Training throughput (forward + backward + optimizer step) of every registered model, one table.

    python benchmarks/bench_models.py                      # CPU, 640x360, batch 2
    python benchmarks/bench_models.py --sizes 320x180 --models rtdetr_cpu fcos_r50
    python benchmarks/bench_models.py --device cuda        # adds 1920x1080, peak memory, AMP bf16
    # rtdetr_cpu with other backbones (model.options.backbone), rows named rtdetr_cpu+BACKBONE:
    python benchmarks/bench_models.py --models rtdetr_cpu --backbones tiny_resnet --batch 4 --steps 5

Images/s are measured in this run for every model, and each is divided by fcos_r50's images/s at the
same size (the torchvision baseline), so the ratio does not depend on the machine.
"""

from __future__ import annotations

import argparse
import time

import torch

from neoray.config import parse_size
from neoray.models import build_model, list_models

BASELINE = "fcos_r50"


def synthetic_batch(batch: int, width: int, height: int, device: torch.device):
    generator = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (batch, 3, height, width), dtype=torch.uint8, generator=generator).to(device)
    targets = []
    for _ in range(batch):
        xy = torch.rand(5, 2, generator=generator) * torch.tensor([width * 0.8, height * 0.8])
        wh = torch.rand(5, 2, generator=generator) * torch.tensor([width * 0.2, height * 0.2]) + 4
        boxes = torch.cat([xy, xy + wh], dim=1)
        targets.append({"boxes": boxes.to(device), "labels": torch.randint(0, 3, (5,), generator=generator).to(device)})
    return images, targets


def measure(name: str, size, batch: int, warmup: int, steps: int, device: torch.device, amp: bool,
            options: dict | None = None) -> dict:
    torch.manual_seed(0)
    model = build_model(name, num_classes=3, **(options or {})).to(device).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    images, targets = synthetic_batch(batch, *size, device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp)

    def step():
        with autocast:
            loss = sum(model(images, targets).values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / steps
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return {"step_s": seconds, "images_per_s": batch / seconds, "peak_mb": peak}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--models", nargs="+", default=list_models(), choices=list_models())
    parser.add_argument("--sizes", nargs="+", default=None, help="default: 640x360 (CPU), 640x360 1920x1080 (CUDA)")
    parser.add_argument("--backbones", nargs="+", default=[], metavar="BACKBONE",
                        help="also rtdetr_cpu with each of these backbones (model.options.backbone)")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2)
    args = parser.parse_args()

    device = torch.device(args.device)
    sizes = [
        parse_size(s) for s in (args.sizes or (["640x360", "1920x1080"] if device.type == "cuda" else ["640x360"]))
    ]
    names = list(dict.fromkeys([BASELINE, *args.models]))  # the baseline always runs, first
    rows = [(name, name, {}) for name in names]
    rows += [(f"rtdetr_cpu+{backbone}", "rtdetr_cpu", {"backbone": backbone}) for backbone in args.backbones]
    precisions = [False, True] if device.type == "cuda" else [False]
    print(f"device {device}, batch {args.batch}, {args.warmup} warm-up + {args.steps} timed train steps per model")
    print(f"{'model':<24} {'size':>10} {'amp':>5} {'step s':>8} {'img/s':>8} {'x fcos_r50':>10} {'peak MiB':>9}")
    for width, height in sizes:
        for amp in precisions:
            baseline = None
            for label, name, options in rows:
                result = measure(name, (width, height), args.batch, args.warmup, args.steps, device, amp, options)
                if label == BASELINE:
                    baseline = result["images_per_s"]
                ratio = result["images_per_s"] / baseline
                print(
                    f"{label:<24} {f'{width}x{height}':>10} {'bf16' if amp else 'fp32':>5} {result['step_s']:>8.3f} "
                    f"{result['images_per_s']:>8.2f} {ratio:>10.2f} {result['peak_mb']:>9.0f}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
