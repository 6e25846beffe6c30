"""Data pipeline throughput per CPU core: neoray's training stream from 16:9 shards against the limit (the same
cores doing nothing but decode the JPEGs), against a torch DataLoader on the original JPEG files, and the same
shards streamed from local disk vs from an S3 server.

    python benchmarks/bench_data.py [--images 2000] [--src-size 960x540] [--size 640x360] [--workers 2]
                                    [--passes 3] [--batch-size 16] [--growth 4] [--s3] [--json FILE]
    python benchmarks/bench_data.py --images 240 --src-size 1920x1080 --size 1920x1080 --passes 3 --growth 0 \
        --batch-size 4                                     # full HD: 1920x1080 shards

Everything below is measured in one run, on --workers cores (Ray gets --workers CPUs; the DataLoader and the
limits get --workers processes), and reported per core:

  limit (decode only):  --workers processes doing nothing but cv2.imdecode on the shards' JPEGs (read beforehand):
                        no pipeline can decode JPEGs on the CPU faster. Goal: the stream >= 0.8 of it per core.
  decode + augment:     the same processes decoding AND augmenting as the CPU path does (the batch task's work:
                        neoray.data.augment.decode_augment_batch), no pipeline around it: the most this
                        augmentation allows on the CPU.
  stream:               neoray.data.stream.iter_train_batches with data.decode=cpu: read the Parquet rows of this
                        epoch's plan (Ray Data), shuffle buffer, then one Ray task per batch decoding, resizing
                        (80/90/100% multi-scale), flipping, colour-jittering and collating. First pass reported
                        apart from the later ones (Ray Data's start, cold worker imports).
  baseline:             torch DataLoader, --workers processes, each reading an ORIGINAL JPEG with cv2, letterboxing
                        it to --size, then the same augmentation (neoray.data.augment.TrainAugment) and collate.
                        Goal: the stream >= 1.3x it.

"where the time goes" times each step of the CPU path on one core (a sample of the shard images): Parquet read,
JPEG decode, resize, flip, each colour op, the CHW copy and the object-store round trip of a finished batch.
Finally the shard stream runs on a dataset --growth times larger (the same shards repeated) to show that the cost
per image does not grow with the dataset size. Synthetic data (neoray.data.synth + neoray.data.prepare) is made in
a temporary directory first.

``--s3`` adds the storage comparison: a local S3 server (moto's, from the dev extra) on 127.0.0.1, the
shards copied to a bucket there, and passes alternating between the local directory and the s3:// URI.
On a real cluster the network is the limit; here the ratio shows what neoray's own reading adds.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
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
from neoray.data.augment import TrainAugment, decode_augment_batch  # noqa: E402
from neoray.data.draws import draw_batch, train_sizes  # noqa: E402
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
# The limits: the same cores doing only the per-image work, no pipeline
# ----------------------------------------------------------------------------------------------------

_WORK: list = []  # (jpeg bytes, (W, H)) of every shard image, in each limit process


def shard_jpegs(shard_dir: Path) -> list[tuple[bytes, tuple[int, int]]]:
    from neoray.data.decode import read_rows
    from neoray.data.shards import read_manifest

    out = []
    for entry in read_manifest(shard_dir)["shards"]:
        columns = read_rows(str(shard_dir / entry["file"]), 0, entry["rows"], ["image", "width", "height"]).to_pydict()
        out += list(zip(columns["image"], zip(columns["width"], columns["height"])))
    return out


def _limit_process(jpegs: list) -> None:
    _WORK[:] = jpegs
    cv2.setNumThreads(1)  # one process per core, as the Ray tasks run


def _decode_only(indices: list[int]) -> int:
    for i in indices:
        cv2.imdecode(np.frombuffer(_WORK[i][0], np.uint8), cv2.IMREAD_COLOR_RGB)
    return len(indices)


def _decode_augment(job: tuple[list[int], object]) -> int:
    indices, draw = job
    decode_augment_batch([_WORK[i][0] for i in indices], [_WORK[i][1] for i in indices], draw, ["bench"] * len(indices))
    return len(indices)


class Limits:
    """--workers processes (spawned before Ray starts, kept for the whole run) doing only the per-image work:
    the decode, or the decode and the CPU path's augmentation of whole batches. Their passes are interleaved
    with the stream's and the DataLoader's, so that every ratio compares passes run under the same load."""

    def __init__(self, jpegs: list, data_cfg: DataConfig, batch_size: int, workers: int):
        self.pool = multiprocessing.get_context("spawn").Pool(workers, initializer=_limit_process, initargs=(jpegs,))
        self.batches = [list(range(i, i + batch_size)) for i in range(0, len(jpegs) - batch_size + 1, batch_size)]
        sizes = train_sizes(data_cfg)
        self.jobs = [(b, draw_batch(sizes, data_cfg.hflip, data_cfg.color_jitter, len(b),
                                    np.random.default_rng([0, 0, 0, k]))) for k, b in enumerate(self.batches)]
        self.run()  # warm: imports and page cache, not counted

    def run(self) -> dict:
        rates = {}
        for name, fn, work in (("decode_only", _decode_only, self.batches), ("decode_augment", _decode_augment,
                                                                             self.jobs)):
            start = time.perf_counter()
            images = sum(self.pool.map(fn, work, chunksize=1))
            rates[name] = images / (time.perf_counter() - start)
        return rates

    def close(self) -> None:
        self.pool.close()
        self.pool.join()


# ----------------------------------------------------------------------------------------------------
# Where the time goes: each step of the CPU path, one core
# ----------------------------------------------------------------------------------------------------


def _ms(fn, repeat: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeat):
        fn()
    return (time.perf_counter() - start) / repeat * 1000


def time_steps(shard_dir: Path, jpegs: list, data_cfg: DataConfig, batch_size: int, repeat: int = 8) -> dict:
    """Milliseconds per image of each step of the CPU path on one core (cv2 on one thread)."""
    import ray
    from albumentations.augmentations.pixel import functional as fpixel

    from neoray.data.augment import apply_draw
    from neoray.data.decode import read_rows
    from neoray.data.shards import read_manifest

    threads = cv2.getNumThreads()
    cv2.setNumThreads(1)
    entry = read_manifest(shard_dir)["shards"][0]
    data, shape = jpegs[0]
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
    sizes = train_sizes(data_cfg)
    batch = np.empty((batch_size, 3, image.shape[0], image.shape[1]), np.uint8)
    steps = {
        "Parquet read (rows of a chunk)": _ms(lambda: read_rows(str(shard_dir / entry["file"]), 0, entry["rows"]),
                                             2) / entry["rows"],
        "JPEG decode (cv2)": _ms(lambda: cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB), repeat),
        "multi-scale resize (mean over sizes)": sum(_ms(lambda: apply_draw(image, size, False, None), repeat)
                                                    for size in sizes) / len(sizes),
        "horizontal flip (x hflip)": _ms(lambda: apply_draw(image, tuple(shape), True, None), repeat) * data_cfg.hflip,
        "brightness": _ms(lambda: fpixel.adjust_brightness_torchvision(image, 1.2), repeat),
        "contrast": _ms(lambda: fpixel.adjust_contrast_torchvision(image, 1.2), repeat),
        "saturation": _ms(lambda: fpixel.adjust_saturation_torchvision(image, 1.2), repeat),
        "hue": _ms(lambda: fpixel.adjust_hue_torchvision(image, 0.03), repeat),
        "CHW copy into the batch": _ms(lambda: np.copyto(batch[0], image.transpose(2, 0, 1)), repeat),
        "object store: batch put + get + copy": _ms(lambda: np.array(ray.get(ray.put(batch))), repeat) / batch_size,
    }
    cv2.setNumThreads(threads)
    return steps


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


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--src-size", default="960x540", help="size of the original JPEGs (any aspect)")
    parser.add_argument("--size", default="640x360", help="shard / training size (16:9)")
    parser.add_argument("--workers", type=int, default=2, help="cores: DataLoader workers, Ray CPUs, limit processes")
    parser.add_argument("--passes", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--growth", type=int, default=4, help="size factor of the dataset-size check (0: skip)")
    parser.add_argument("--keep", action="store_true", help="keep the temporary data directory")
    parser.add_argument("--data-dir", default=None, help="make the data here, or reuse what a previous run made here "
                                                         "with the same --images and sizes (kept afterwards)")
    parser.add_argument("--s3", action="store_true", help="also stream the shards from a local S3 server (moto) and "
                                                          "compare with local disk")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    return parser.parse_args(argv)


def make_data(tmp: Path, args, size, src_size, data_cfg) -> tuple[Path, Path]:
    from neoray.data.prepare import prepare_coco
    from neoray.data.synth import write_synthetic_dataset

    start = time.perf_counter()
    ann_json, image_dir = tmp / "src" / "annotations" / "instances_train.json", tmp / "src" / "train"
    stamp = tmp / "made.json"
    wanted = {"images": args.images, "src_size": list(src_size), "size": list(size)}
    if not (stamp.exists() and json.loads(stamp.read_text()) == wanted):
        write_synthetic_dataset(tmp / "src", train=args.images, val=0, size=src_size, classes=4, seed=0)
        prepare_coco(ann_json, image_dir, tmp / "shards", size=size, workers=args.workers)
        stamp.write_text(json.dumps(wanted))
    print(f"data: {args.images} images {format_size(src_size)} -> shards at {format_size(size)}, "
          f"multiscale {[format_size(s) for s in data_cfg.multiscale]}, batch {args.batch_size}, "
          f"{args.workers} cores; made in {time.perf_counter() - start:.1f} s", flush=True)
    return ann_json, image_dir


def print_steps(steps: dict) -> None:
    total = sum(steps.values())
    print("where the time goes (CPU path, one core, ms per image):")
    for name, ms in steps.items():
        print(f"  {name:<44} {ms:8.2f} ms  {100 * ms / total:5.1f}%")
    print(f"  {'sum':<44} {total:8.2f} ms  -> at most {1000 / total:.1f} img/s per core", flush=True)


def print_passes(base: list, shards: list, limits: list[dict], workers: int) -> dict:
    """Per pass: the stream against the limits and the DataLoader of the same pass; later passes summed."""
    print(f"{'pass':>5} {'decode-only':>12} {'decode+aug':>11} {'baseline':>9} {'stream':>7} {'per core':>9} "
          f"{'/ decode-only':>14} {'/ decode+aug':>13} {'/ baseline':>11}   (img/s)")
    for i, (lim, b, s) in enumerate(zip(limits, base, shards)):
        decode, full = lim["decode_only"], lim["decode_augment"]
        print(f"{i + 1:>5} {decode:>12.1f} {full:>11.1f} {rate(b):>9.1f} {rate(s):>7.1f} {rate(s) / workers:>9.1f} "
              f"{rate(s) / decode:>14.2f} {rate(s) / full:>13.2f} {rate(s) / rate(b):>11.2f}")
    later = slice(1, None) if len(shards) > 1 else slice(0, None)
    mean = {key: sum(lim[key] for lim in limits[later]) / len(limits[later]) for key in limits[0]}
    stream, baseline = warm_rate(shards), warm_rate(base)
    print(f"later passes: stream {stream:.1f} img/s = {stream / workers:.1f} per core = "
          f"{stream / mean['decode_only']:.2f} of the decode-only limit ({mean['decode_only'] / workers:.1f} per core; "
          f"goal 0.8), {stream / mean['decode_augment']:.2f} of decode + augment, {stream / baseline:.2f}x the "
          f"DataLoader (goal 1.3); first pass {rate(shards[0]) / limits[0]['decode_only']:.2f} of the limit, "
          f"{rate(shards[0]) / rate(base[0]):.2f}x the DataLoader", flush=True)
    return {"limits": limits, "stream": [rate(s) for s in shards], "baseline": [rate(b) for b in base],
            "later": {"stream": stream, "baseline": baseline, **mean},
            "first_batch_s": {"stream": shards[0]["first_batch_s"], "baseline": base[0]["first_batch_s"]}}


def main(argv=None) -> int:
    args = parse_args(argv)
    src_size = parse_size(args.src_size, "--src-size", require_16_9=False)
    size = parse_size(args.size, "--size")
    data_cfg = DataConfig(size=size, multiscale=multiscale_sizes(size), hflip=0.5, color_jitter=0.4,
                          shuffle_buffer=256)
    tmp = Path(args.data_dir) if args.data_dir else Path(tempfile.mkdtemp(prefix="neoray-bench-data-"))
    tmp.mkdir(parents=True, exist_ok=True)
    try:
        ann_json, image_dir = make_data(tmp, args, size, src_size, data_cfg)
        jpegs = shard_jpegs(tmp / "shards")
        limits = Limits(jpegs, data_cfg, args.batch_size, args.workers)  # spawned before Ray starts
        import ray

        s3 = start_s3_server(tmp) if args.s3 else None  # before ray.init: Ray's workers inherit its address
        start = time.perf_counter()
        ray.init(num_cpus=args.workers, include_dashboard=False, log_to_driver=False, configure_logging=False)
        init_s = time.perf_counter() - start
        ray.data.DataContext.get_current().enable_progress_bars = False
        steps = time_steps(tmp / "shards", jpegs, data_cfg, args.batch_size)
        print_steps(steps)
        # Passes alternate (baseline, shards, baseline, ...) so that both see the same machine load.
        base, shards, limit_passes = [], [], []
        for epoch in range(args.passes):
            limit_passes.append(limits.run())
            base.append(baseline_pass(ann_json, image_dir, size, data_cfg, args.batch_size, args.workers, epoch))
            shards.append(shards_pass(tmp / "shards", data_cfg, args.batch_size, epoch))
        limits.close()
        print(f"ray.init: {init_s:.2f} s   time to first batch: "
              f"shards {shards[0]['first_batch_s']:.2f} s, baseline {base[0]['first_batch_s']:.2f} s")
        figures = {"args": vars(args), "steps_ms": steps, **print_passes(base, shards, limit_passes, args.workers)}
        if args.growth > 1:
            big = repeat_shards(tmp / "shards", tmp / "shards-big", args.growth)
            big_runs = [shards_pass(big, data_cfg, args.batch_size, epoch) for epoch in range(2)]
            small_ms, big_ms = 1000 / warm_rate(shards), 1000 / warm_rate(big_runs)
            print(f"dataset size check (shards, later passes): {args.images} images {small_ms:.2f} ms/img, "
                  f"{args.images * args.growth} images {big_ms:.2f} ms/img (x{big_ms / small_ms:.2f})")
        if s3 is not None:
            compare_storage(tmp / "shards", s3, data_cfg, args)
        ray.shutdown()
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2))
    finally:
        if args.keep or args.data_dir:
            print(f"data kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
