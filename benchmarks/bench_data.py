"""Data pipeline throughput: Ray Data streaming from 16:9 shards vs a torch DataLoader on the JPEG files,
and the same shards streamed from local disk vs from an S3 server.

    python benchmarks/bench_data.py [--images 2000] [--src-size 960x540] [--size 640x360] [--workers 2]
                                    [--passes 3] [--batch-size 16] [--growth 4] [--s3]

Both pipelines do the same work per image and produce the same ``Batch`` (uint8, one size per batch):

  (a) shards:   neoray.data.stream.iter_train_batches: read the Parquet rows of this epoch's plan, decode the JPEG
                (already letterboxed to --size by `neoray prepare`) in Ray Data tasks, then flip, colour
                jitter, multi-scale resize and collate on the consumer.
  (b) baseline: torch DataLoader, --workers processes, each reading an ORIGINAL JPEG with cv2, letterboxing
                it to --size, then the same augmentation (neoray.data.augment.TrainAugment) and collate.

Ray gets --workers CPUs (ray.init(num_cpus=...)); the DataLoader gets --workers worker processes.
Whole passes are timed; the first pass (cold: worker start-up, first reads) is reported apart from the
later ones. ray.init and time-to-first-batch are printed separately. Finally the shard stream runs on a
dataset --growth times larger (the same shards repeated) to show that the cost per image does not grow
with the dataset size (no per-epoch listing, no per-file set-up that scales badly).
Synthetic data (neoray.data.synth + neoray.data.prepare) is made in a temporary directory first.

``--s3`` adds the storage comparison: a local S3 server (moto's, from the dev extra) on 127.0.0.1, the
shards copied to a bucket there, and passes alternating between the local directory and the s3:// URI.
On a real cluster the network is the limit; here the ratio shows what neoray's own reading adds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from neoray.config import DataConfig, format_size, parse_size  # noqa: E402
from neoray.data.augment import TrainAugment  # noqa: E402
from neoray.data.geometry import boxes_to_letterbox, letterbox_image, letterbox_params, xywh_to_xyxy  # noqa: E402

# Imported here, before the DataLoader forks its workers, so that they do not each import Ray again.
from neoray.data.stream import ShardSet, collate, iter_train_batches  # noqa: E402


def multiscale_sizes(size: tuple[int, int]) -> list[tuple[int, int]]:
    """80%, 90% and 100% of ``size``, each a 16:9 multiple of 16x9."""
    k = size[0] // 16
    return sorted({(16 * max(1, round(k * r)), 9 * max(1, round(k * r))) for r in (0.8, 0.9, 1.0)})


# ----------------------------------------------------------------------------------------------------
# Baseline: DataLoader over the original JPEG files
# ----------------------------------------------------------------------------------------------------


class JpegBatches(torch.utils.data.Dataset):
    """Item ``i`` is batch ``i``: read, letterbox and augment its images, collate. Whole batches per item so
    that every batch gets one multi-scale size, exactly as the shard stream does."""

    def __init__(self, ann_json: Path, image_dir: Path, size, data_cfg: DataConfig, batch_size: int, epoch: int):
        coco = json.loads(Path(ann_json).read_text())
        boxes = {img["id"]: [] for img in coco["images"]}
        for ann in coco["annotations"]:
            boxes[ann["image_id"]].append(ann)
        label_of = {c["id"]: i for i, c in enumerate(sorted(coco["categories"], key=lambda c: c["id"]))}
        self.records = [(img["id"], image_dir / img["file_name"], boxes[img["id"]], label_of) for img in coco["images"]]
        rng = np.random.default_rng(epoch)  # a shuffled order per epoch, like the shard stream
        self.order = rng.permutation(len(self.records))
        self.size, self.data_cfg, self.batch_size, self.epoch = size, data_cfg, batch_size, epoch
        self.augment = None  # built in the worker process

    def __len__(self) -> int:
        return len(self.records) // self.batch_size

    def _load(self, index: int) -> dict:
        image_id, path, anns, label_of = self.records[index]
        image = cv2.imread(str(path), cv2.IMREAD_COLOR_RGB)
        h, w = image.shape[:2]
        scale, pad_x, pad_y = letterbox_params(w, h, *self.size)
        boxes = boxes_to_letterbox(xywh_to_xyxy([a["bbox"] for a in anns]), scale, pad_x, pad_y).astype(np.float32)
        return {
            "image": letterbox_image(image, *self.size), "boxes": boxes,
            "labels": np.array([label_of[a["category_id"]] for a in anns], np.int64),
            "iscrowd": np.array([bool(a.get("iscrowd", 0)) for a in anns], bool),
            "areas": np.array([a["area"] for a in anns], np.float32),
            "image_id": image_id, "scale": scale, "pad": (pad_x, pad_y), "orig_size": (w, h), "factor": 1.0,
        }

    def __getitem__(self, batch_index: int):
        if self.augment is None:
            self.augment = TrainAugment(self.data_cfg)
        picks = self.order[batch_index * self.batch_size:(batch_index + 1) * self.batch_size]
        samples, _size, _dropped = self.augment([self._load(int(i)) for i in picks],
                                                np.random.default_rng([0, self.epoch, 0, batch_index]))
        return collate(samples)


def baseline_pass(ann_json, image_dir, size, data_cfg, batch_size, workers, epoch) -> dict:
    start = time.perf_counter()
    dataset = JpegBatches(ann_json, image_dir, size, data_cfg, batch_size, epoch)
    # batch_size=None: each item already is a batch. persistent_workers is off on purpose: a new
    # DataLoader per epoch is what most training scripts do, and it is what the first pass costs.
    loader = torch.utils.data.DataLoader(dataset, batch_size=None, shuffle=False, num_workers=workers,
                                         collate_fn=lambda b: b)
    return timed_pass(loader, start)


def timed_pass(batches, start: float) -> dict:
    images, first = 0, None
    for batch in batches:
        first = first if first is not None else time.perf_counter() - start
        images += len(batch)
    return {"seconds": time.perf_counter() - start, "images": images, "first_batch_s": first}


# ----------------------------------------------------------------------------------------------------
# Shards: Ray Data stream
# ----------------------------------------------------------------------------------------------------


def shards_pass(shard_dir, data_cfg, batch_size, epoch) -> dict:
    start = time.perf_counter()
    return timed_pass(iter_train_batches(ShardSet.open(str(shard_dir)), batch_size, data_cfg, seed=0, epoch=epoch),
                      start)


def repeat_shards(shard_dir: Path, out_dir: Path, times: int) -> Path:
    """A shard directory holding the shards of ``shard_dir`` ``times`` times (for the dataset-size check)."""
    from neoray.data.shards import MANIFEST_NAME, read_manifest, shard_name

    manifest = read_manifest(shard_dir)
    out_dir.mkdir(parents=True)
    shards = []
    for _ in range(times):
        for entry in manifest["shards"]:
            name = shard_name(len(shards))
            os.link(shard_dir / entry["file"], out_dir / name)  # same bytes, no copy
            shards.append({**entry, "file": name})
    manifest = {**manifest, "shards": shards, "num_images": manifest["num_images"] * times,
                "num_boxes": manifest["num_boxes"] * times}
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest))
    return out_dir


# ----------------------------------------------------------------------------------------------------
# Local disk vs S3
# ----------------------------------------------------------------------------------------------------


def start_s3_server(tmp: Path) -> dict:
    """moto's S3 server on a free port of 127.0.0.1, and the AWS variables pointing at it."""
    import socket
    import subprocess

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(server), "-H", "127.0.0.1", "-p", str(port)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    os.environ.update(AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}", AWS_ACCESS_KEY_ID="bench",
                      AWS_SECRET_ACCESS_KEY="bench", AWS_DEFAULT_REGION="us-east-1")
    for _ in range(100):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.2)
    return {"proc": proc, "port": port}


def compare_storage(shard_dir: Path, s3: dict, data_cfg, args) -> None:
    import boto3

    from neoray import storage

    boto3.client("s3").create_bucket(Bucket="bench")
    remote = "s3://bench/shards"
    for entry in storage.list_dir(str(shard_dir)):
        storage.write_bytes(storage.join(remote, entry.name), storage.read_bytes(entry.path))
    local, on_s3 = [], []
    for epoch in range(args.passes):  # alternating, so that both see the same machine load
        local.append(shards_pass(shard_dir, data_cfg, args.batch_size, epoch))
        on_s3.append(shards_pass(remote, data_cfg, args.batch_size, epoch))
    print(f"{'pass':>6} {'local img/s':>12} {'s3 img/s':>9} {'ratio':>7}")
    for i, (a, b) in enumerate(zip(local, on_s3)):
        print(f"{i + 1:>6} {rate(a):>12.1f} {rate(b):>9.1f} {rate(b) / rate(a):>7.2f}")
    print(
        f"storage: first pass s3/local = {rate(on_s3[0]) / rate(local[0]):.2f}   later passes: s3 "
        f"{warm_rate(on_s3):.1f} img/s / local {warm_rate(local):.1f} img/s = {warm_rate(on_s3) / warm_rate(local):.2f}"
    )
    s3["proc"].terminate()


# ----------------------------------------------------------------------------------------------------


def rate(r: dict) -> float:
    return r["images"] / r["seconds"]


def warm_rate(results: list[dict]) -> float:
    later = results[1:] or results
    return sum(r["images"] for r in later) / sum(r["seconds"] for r in later)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--src-size", default="960x540", help="size of the original JPEGs (any aspect)")
    parser.add_argument("--size", default="640x360", help="shard / training size (16:9)")
    parser.add_argument("--workers", type=int, default=2, help="DataLoader workers and Ray CPUs")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--growth", type=int, default=4, help="size factor of the dataset-size check (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--s3", action="store_true", help="also stream the shards from a local S3 server (moto) and "
                                                          "compare with local disk")
    args = parser.parse_args(argv)

    from neoray.data.prepare import prepare_coco
    from neoray.data.synth import write_synthetic_dataset

    src_size = parse_size(args.src_size, "--src-size", require_16_9=False)
    size = parse_size(args.size, "--size")
    data_cfg = DataConfig(size=size, multiscale=multiscale_sizes(size), hflip=0.5, color_jitter=0.4,
                          shuffle_buffer=256)
    tmp = Path(tempfile.mkdtemp(prefix="neoray-bench-data-"))
    try:
        start = time.perf_counter()
        write_synthetic_dataset(tmp / "src", train=args.images, val=0, size=src_size, classes=4, seed=0)
        ann_json, image_dir = tmp / "src" / "annotations" / "instances_train.json", tmp / "src" / "train"
        prepare_coco(ann_json, image_dir, tmp / "shards", size=size, workers=args.workers)
        print(f"data: {args.images} images {format_size(src_size)} -> shards at {format_size(size)}, "
              f"multiscale {[format_size(s) for s in data_cfg.multiscale]}, batch {args.batch_size}, "
              f"{args.workers} workers; made in {time.perf_counter() - start:.1f} s")

        import ray

        s3 = start_s3_server(tmp) if args.s3 else None  # before ray.init: Ray's workers inherit its address
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        init_s = time.perf_counter() - start
        ray.data.DataContext.get_current().enable_progress_bars = False
        # Passes alternate (baseline, shards, baseline, ...) so that both see the same machine load.
        base, shards = [], []
        for epoch in range(args.passes):
            base.append(baseline_pass(ann_json, image_dir, size, data_cfg, args.batch_size, args.workers, epoch))
            shards.append(shards_pass(tmp / "shards", data_cfg, args.batch_size, epoch))

        print(f"ray.init: {init_s:.2f} s   time to first batch: "
              f"shards {shards[0]['first_batch_s']:.2f} s, baseline {base[0]['first_batch_s']:.2f} s")
        print(f"{'pass':>6} {'baseline img/s':>15} {'shards img/s':>13} {'ratio':>7}")
        for i, (b, s) in enumerate(zip(base, shards)):
            print(f"{i + 1:>6} {rate(b):>15.1f} {rate(s):>13.1f} {rate(s) / rate(b):>7.2f}")
        print(f"first pass: shards/baseline = {rate(shards[0]) / rate(base[0]):.2f}   "
              f"later passes: shards {warm_rate(shards):.1f} img/s / baseline {warm_rate(base):.1f} img/s = "
              f"{warm_rate(shards) / warm_rate(base):.2f}")

        if args.growth > 1:
            big = repeat_shards(tmp / "shards", tmp / "shards-big", args.growth)
            big_runs = [shards_pass(big, data_cfg, args.batch_size, epoch) for epoch in range(2)]
            small_ms = 1000 / warm_rate(shards)
            big_ms = 1000 / warm_rate(big_runs)
            print(f"dataset size check (shards, later passes): {args.images} images {small_ms:.2f} ms/img, "
                  f"{args.images * args.growth} images {big_ms:.2f} ms/img (x{big_ms / small_ms:.2f})")
        if s3 is not None:
            compare_storage(tmp / "shards", s3, data_cfg, args)
        ray.shutdown()
    finally:
        if args.keep:
            print(f"data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
