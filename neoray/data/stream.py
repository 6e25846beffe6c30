"""Stream 16:9 Parquet shards into training and evaluation batches with Ray Data.

Each training worker builds its own stream, every epoch, from a plan that is a function of
(seed, epoch, rank, world size) and of the manifest alone, never of the cluster it runs on:

1. ``epoch_plan``: the manifest's shard files cut into chunks of ``ROWS_PER_TASK`` rows, shuffled by
   (seed, epoch); their rows, concatenated in that order, are cut into one equal, contiguous range per
   rank (training drops the last ``rows % world_size`` rows, so every rank runs the same number of
   steps; evaluation gives every row to exactly one rank).
2. ``encoded_dataset``: a Ray Data dataset with one row per chunk; ``map_batches`` reads the chunk's rows
   from its Parquet file (``neoray.data.decode.read_encoded_chunk``), JPEGs still encoded, one Ray task
   per chunk, in parallel on the cluster's CPUs. Rows leave in plan order (``preserve_order``).
3. ``iter_train_batches``, on the worker: mix the rows (JPEG bytes and targets, a fraction of a decoded
   image each) in a shuffle buffer seeded by (seed, epoch, rank), draw each batch's augmentation
   (``neoray.data.draws.draw_batch``, seeded by (seed, epoch, rank, batch index)), move its boxes, and
   have its pixels made where ``data.decode`` says:

   ================================  ====================================  ==================================
   work                              ``data.decode: cpu``                  ``data.decode: gpu``
   ================================  ====================================  ==================================
   read Parquet rows                 Ray Data tasks                        Ray Data tasks
   shuffle buffer, draws, boxes      the training worker                   the training worker
   JPEG decode                       one Ray task per batch (cv2)          the worker's device (nvJPEG)
   mosaic, mixup, zoom (compose)     the same task (slicing, blend)        the worker's device (tensor ops)
   multi-scale resize, flip, jitter  the same task (albumentations)        the worker's device (tensor ops)
   collate into (B, 3, H, W) uint8   the same task                         the worker's device
   ================================  ====================================  ==================================

   The batch tasks run on the worker's node, up to ``decode_parallelism(workers on the node)`` at a time,
   their results taken in order. ``iter_eval_batches``: with ``cpu`` the Ray Data tasks decode
   (``read_chunk``) and the worker collates (and resizes, when asked); with ``gpu`` the worker decodes and
   resizes on its device.

Why decoding moved out of the Ray Data tasks for training: at 1920x1080 a decoded image is 6 MB against
0.2-0.4 MB of JPEG, and every decoded chunk went through the object store to the training worker, which
then augmented and collated every image in its one process: one CPU core's worth of augmentation per
worker, whatever the node had (README "Benchmarks" has the figures). A batch task does the decode, the
augmentation and the CHW layout while each image is in cache, on any free core of the node, and only the
finished batch crosses the object store; with ``gpu`` no decoded pixel crosses it at all.

Why a plan of our own rather than Ray Train's dataset split: which rows reach which worker under
``streaming_split`` is decided at run time, and Ray Data's file shuffle is reseeded by how many passes a
dataset has made, so the sample order changed with the cluster's CPU count and repeated an epoch's
order after a restart. Here a resumed or restarted run trains epoch N on exactly the samples of epoch N.

Why ``iter_batches`` + our own collate rather than ``iter_torch_batches``: targets are ragged (0..n
boxes per image) and the train augmentation needs the whole batch at once to give it one size.
"""

from __future__ import annotations

import logging
from collections import deque
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterator

import numpy as np
import ray
import torch

from neoray import ray_compat, storage
from neoray.config import DataConfig, parse_size
from neoray.data.augment import decode_augment_batch, resize_image
from neoray.data.decode import check_targets, read_chunk, read_encoded_chunk
from neoray.data.draws import BatchDraw, batch_targets, draw_batch, resize_factor, strong_augment, train_sizes
from neoray.data.shards import read_manifest
from neoray.data.tensor_augment import apply_draw, decode_jpegs, resize_images

# Rows per read-and-decode task: big enough that task overhead stays small, small enough to use every
# CPU and to start the first batch quickly.
ROWS_PER_TASK = 32


# ----------------------------------------------------------------------------------------------------
# The plan: which rows, in which order, on which rank
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ShardSet:
    """A shard directory as the stream reads it: its files (full paths) with their row counts."""

    directory: str
    files: tuple[tuple[str, int], ...]
    categories: list
    size: tuple[int, int]

    @classmethod
    def open(cls, shard_dir: str) -> "ShardSet":
        manifest = read_manifest(shard_dir)
        files = tuple((storage.join(shard_dir, entry["file"]), int(entry["rows"])) for entry in manifest["shards"])
        return cls(str(shard_dir), files, manifest["categories"], tuple(manifest["size"]))

    @property
    def num_rows(self) -> int:
        return sum(rows for _, rows in self.files)


def _subset(files: tuple[tuple[str, int], ...], max_rows: int) -> list[tuple[str, int, int]]:
    """(path, first row, end row) pieces of the first ``max_rows`` rows in manifest order (all when 0):
    a fixed subset, the same every epoch."""
    pieces, left = [], max_rows if max_rows > 0 else None
    for path, rows in files:
        take = rows if left is None else min(rows, left)
        if take > 0:
            pieces.append((path, 0, take))
        if left is not None:
            left -= take
            if left <= 0:
                break
    return pieces


def epoch_plan(shard_set: ShardSet, *, epoch: int, rank: int, world_size: int, seed: int | None,
               equal: bool, max_rows: int = 0, rows_per_task: int = ROWS_PER_TASK) -> list[dict]:
    """This rank's chunks for this epoch: ``[{"path", "start", "stop"}]`` in reading order.

    Every file is cut into chunks of ``rows_per_task`` rows; ``seed`` shuffles the chunks by
    (seed, epoch) (None keeps the manifest order: evaluation). ``equal``: every rank gets
    ``rows // world_size`` rows (training); otherwise rank r gets rows ``[r * rows // W, (r + 1) * rows // W)``
    of the order (evaluation: each row exactly once over all ranks). Shuffling chunks rather than files
    gives every rank a different mix of files every epoch, even when there are fewer files than ranks."""
    chunks = [(path, first, min(stop, first + rows_per_task))
              for path, start, stop in _subset(shard_set.files, max_rows)
              for first in range(start, stop, rows_per_task)]
    if seed is not None:
        order = np.random.default_rng([int(seed), int(epoch)]).permutation(len(chunks))
        chunks = [chunks[i] for i in order]
    total = sum(stop - start for _, start, stop in chunks)
    if equal:
        per_rank = total // world_size
        begin, end = rank * per_rank, (rank + 1) * per_rank
    else:
        begin, end = rank * total // world_size, (rank + 1) * total // world_size
    mine, offset = [], 0
    for path, start, stop in chunks:
        lo, hi = max(begin, offset), min(end, offset + stop - start)
        if lo < hi:
            mine.append({"path": path, "start": start + lo - offset, "stop": start + hi - offset})
        offset += stop - start
    return mine


def quiet_ray_data() -> None:
    """No per-epoch progress bars or "Starting execution" lines from Ray Data in this process.

    Training logs (and a sweep's job log) should show epochs and Tune's trial table, not one bar per
    epoch per dataset; Ray Data's own log files still have everything.
    """
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


def chunk_dataset(chunks: list[dict], read=read_chunk) -> ray.data.Dataset:
    """The rows of ``chunks``, in plan order, one Ray task per chunk: decoded (``read_chunk``) or as stored
    (``read_encoded_chunk``)."""
    ds = ray.data.from_items(chunks, override_num_blocks=max(1, len(chunks)))
    ds = ds.map_batches(read, batch_format="numpy", batch_size=1)
    ds.context.execution_options.preserve_order = True  # rows leave in plan order
    return ds


def encoded_dataset(chunks: list[dict]) -> ray.data.Dataset:
    """The rows of ``chunks`` with their JPEGs still encoded, in plan order, one Ray task per chunk."""
    return chunk_dataset(chunks, read_encoded_chunk)


# ----------------------------------------------------------------------------------------------------
# The batch handed to the model
# ----------------------------------------------------------------------------------------------------


@dataclass
class Batch:
    images: torch.Tensor  # uint8 (B, 3, H, W), RGB, one size per batch
    targets: list[dict]  # per image {"boxes": float32 (N, 4) xyxy pixels of `images`, "labels": int64 (N,),
    #                                 "iscrowd": bool (N,), "areas": float32 (N,) in original pixels}
    image_ids: torch.Tensor  # int64 (B,)
    scale: torch.Tensor  # float32 (B,)   orig = (pixel - pad) / scale, for THIS tensor's size, unflipped images
    pad: torch.Tensor  # float32 (B, 2) (pad_x, pad_y), same mapping
    orig_sizes: torch.Tensor  # int64 (B, 2) (orig_width, orig_height)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def to(self, device, non_blocking: bool = True) -> "Batch":
        def move(t: torch.Tensor) -> torch.Tensor:
            return t.to(device, non_blocking=non_blocking)

        return Batch(
            images=move(self.images),
            targets=[{key: move(value) for key, value in target.items()} for target in self.targets],
            image_ids=move(self.image_ids),
            scale=move(self.scale),
            pad=move(self.pad),
            orig_sizes=move(self.orig_sizes),
        )


# ----------------------------------------------------------------------------------------------------
# Worker side: batches
# ----------------------------------------------------------------------------------------------------


def _seed(*parts: int) -> int:
    """A 32-bit seed mixed from integers (SeedSequence keeps nearby tuples like (0, 1) and (1, 0) apart)."""
    return int(np.random.SeedSequence([int(p) for p in parts]).generate_state(1)[0])


def _samples(columns: dict[str, np.ndarray]) -> list[dict]:
    """Split one numpy batch from ``iter_batches`` into per-image dicts (ragged columns stay per image)."""
    samples = []
    for i in range(len(columns["image_id"])):
        samples.append({
            "image": columns["pixels"][i],
            "boxes": np.asarray(columns["boxes"][i], dtype=np.float32).reshape(-1, 4),
            "labels": np.asarray(columns["labels"][i], dtype=np.int64).reshape(-1),
            "iscrowd": np.asarray(columns["iscrowd"][i], dtype=bool).reshape(-1),
            "areas": np.asarray(columns["areas"][i], dtype=np.float32).reshape(-1),
            "image_id": int(columns["image_id"][i]),
            "scale": float(columns["scale"][i]),
            "pad": (float(columns["pad_x"][i]), float(columns["pad_y"][i])),
            "orig_size": (int(columns["orig_width"][i]), int(columns["orig_height"][i])),
            "factor": 1.0,  # resize factor applied since the shard; scale and pad multiply by it
        })
    return samples


def assemble(images: torch.Tensor, samples: list[dict]) -> Batch:
    """A ``Batch`` of ``images`` (uint8 (B, 3, H, W), any device) and the samples' targets and mapping
    (scale/pad follow each sample's "factor"); everything but the images stays on the CPU."""
    # torch.tensor copies: the per-image arrays may be read-only views of Ray's Arrow buffers.
    targets = [{
        "boxes": torch.tensor(s["boxes"], dtype=torch.float32).reshape(-1, 4),
        "labels": torch.tensor(s["labels"], dtype=torch.int64),
        "iscrowd": torch.tensor(s["iscrowd"], dtype=torch.bool),
        "areas": torch.tensor(s["areas"], dtype=torch.float32),
    } for s in samples]
    return Batch(
        images=images,
        targets=targets,
        image_ids=torch.tensor([s["image_id"] for s in samples], dtype=torch.int64),
        scale=torch.tensor([s["scale"] * s["factor"] for s in samples], dtype=torch.float32),
        pad=torch.tensor([[p * s["factor"] + o for p, o in zip(s["pad"], s.get("offset", (0, 0)))] for s in samples],
                         dtype=torch.float32).reshape(-1, 2),
        orig_sizes=torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64).reshape(-1, 2),
    )


def collate(samples: list[dict]) -> Batch:
    """Stack per-image samples (all one size, "image" HWC uint8) into a ``Batch``."""
    shapes = {s["image"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate: images of one batch must have one size, got {sorted(shapes)} "
                         f"(image ids {[s['image_id'] for s in samples]})")
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous()
    return assemble(images, samples)


def _iter_numpy(chunks: list[dict], batch_size: int | None, **options) -> Iterator[dict]:
    if not chunks:
        return iter(())
    return chunk_dataset(chunks).iter_batches(batch_size=batch_size, batch_format="numpy", **options)


def _iter_encoded(chunks: list[dict], batch_size: int | None, **options) -> Iterator:
    if not chunks:
        return iter(())
    return encoded_dataset(chunks).iter_batches(batch_size=batch_size, batch_format="pyarrow", **options)


def _encoded_samples(table) -> list[dict]:
    """Split one pyarrow batch of encoded rows into per-image dicts: the JPEG bytes, the row's size, the
    targets (checked) and the letterbox mapping; "where" names the record in errors."""
    columns = table.to_pydict()
    samples = []
    for i, image_id in enumerate(columns["image_id"]):
        where = f"{columns['path'][i]}: image_id {image_id}"
        samples.append({
            "jpeg": columns["image"][i],
            "width": int(columns["width"][i]),
            "height": int(columns["height"][i]),
            "where": where,
            "boxes": check_targets(columns, i, where),
            "labels": np.asarray(columns["labels"][i], dtype=np.int64).reshape(-1),
            "iscrowd": np.asarray(columns["iscrowd"][i], dtype=bool).reshape(-1),
            "areas": np.asarray(columns["areas"][i], dtype=np.float32).reshape(-1),
            "image_id": int(image_id),
            "scale": float(columns["scale"][i]),
            "pad": (float(columns["pad_x"][i]), float(columns["pad_y"][i])),
            "orig_size": (int(columns["orig_width"][i]), int(columns["orig_height"][i])),
            "factor": 1.0,  # resize factor applied since the shard; scale and pad multiply by it
        })
    return samples


def decode_on_device(samples: list[dict], device) -> torch.Tensor:
    """The samples' JPEGs decoded as one batch on ``device`` (nvJPEG on CUDA): uint8 (B, 3, H, W)."""
    decoded = decode_jpegs([s["jpeg"] for s in samples], device, [s["where"] for s in samples])
    for sample, image in zip(samples, decoded):
        if tuple(image.shape[1:]) != (sample["height"], sample["width"]):
            raise ValueError(f"{sample['where']}: field 'image': decoded {image.shape[2]}x{image.shape[1]} but the "
                             f"row says width x height = {sample['width']}x{sample['height']}")
    if len({tuple(image.shape) for image in decoded}) > 1:
        raise ValueError(f"{samples[0]['where']}: field 'image': images of one batch differ in size; a shard "
                         "directory holds one size")
    return torch.stack(decoded)


def _device(device) -> torch.device:
    """The device ``data.decode: gpu`` decodes on: the one given, else this process's GPU, else the CPU."""
    if device is not None:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


_EMPTY_DRAW = BatchDraw((16, 9), (), ())
MAX_DECODE_TASKS = 16


@lru_cache(maxsize=1)
def _batch_task():
    return ray.remote(decode_augment_batch)


def decode_parallelism(workers_on_node: int = 1) -> int:
    """Batch tasks one training stream keeps in flight (``data.decode: cpu``): this node's CPUs shared by
    its ``workers_on_node`` training workers, plus one queued so that a core never waits for the next; at
    most ``MAX_DECODE_TASKS`` (each holds a finished batch in the object store until it is taken)."""
    if not ray.is_initialized():
        ray.init()  # what Ray Data does on first use
    here = ray.get_runtime_context().get_node_id()
    cpus = next((node["Resources"].get("CPU", 0) for node in ray.nodes() if node["NodeID"] == here), 2)
    return min(MAX_DECODE_TASKS, max(2, int(cpus) // max(1, workers_on_node)) + 1)


def _task_batches(jobs: Iterator[tuple[list[dict], BatchDraw]], in_flight: int) -> Iterator[Batch]:
    """``data.decode: cpu``: one Ray task per batch on this node, at most ``in_flight`` at once, in order."""
    if not ray.is_initialized():
        ray.init()  # what Ray Data does on first use
    # This node while it has a free CPU, any node that has one otherwise (never waiting for this one).
    task = _batch_task().options(num_cpus=1,
                                 scheduling_strategy=ray_compat.prefer_node(ray.get_runtime_context().get_node_id()))
    # Empty tasks first, while Ray Data reads the first chunks: fresh worker processes pay their imports
    # (albumentations brings torch: seconds) before the first real batch instead of after it.
    warm = [task.remote([], [], _EMPTY_DRAW, []) for _ in range(in_flight)]
    pending: deque = deque()
    for samples, draw in jobs:
        ref = task.remote([s["jpeg"] for s in samples], [(s["width"], s["height"]) for s in samples], draw,
                          [s["where"] for s in samples])
        pending.append((samples, ref))
        if len(pending) >= in_flight:
            yield _finished(*pending.popleft())
    while pending:
        yield _finished(*pending.popleft())
    del warm  # held to the end: their results are never read, but they must run


def _finished(samples: list[dict], ref) -> Batch:
    # np.array copies out of Ray's read-only shared memory: the batch is the caller's to modify.
    return assemble(torch.from_numpy(np.array(ray.get(ref))), samples)


def _shuffle_buffer(samples: Iterator[dict], size: int, rng: np.random.Generator) -> Iterator[dict]:
    """Samples mixed by a buffer of ``size``: each incoming sample takes the place of a randomly drawn
    one, which leaves; the rest leave in random order at the end. Every sample leaves exactly once.

    Ray Data's own local shuffle buffer (``iter_batches(local_shuffle_buffer_size=...)``) is not used:
    in Ray 2.60 it lost rows and returned a short last batch despite ``drop_last`` (15 rows, batches of
    5, a buffer of 5 gave batches of 5, 5 and 3; tests/test_stream.py checks the counts)."""
    if size <= 0:
        yield from samples
        return
    buffer: list[dict] = []
    for sample in samples:
        if len(buffer) < size:
            buffer.append(sample)
            continue
        index = int(rng.integers(size))
        yield buffer[index]
        buffer[index] = sample
    rng.shuffle(buffer)
    yield from buffer


def _full_batches(samples: Iterator[dict], batch_size: int) -> Iterator[list[dict]]:
    batch: list[dict] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == batch_size:
            yield batch
            batch = []


def _drawn_batches(samples: Iterator[dict], batch_size: int, data_cfg: DataConfig,
                   seed_parts: tuple[int, int, int], epochs: int | None) -> Iterator[tuple[list[dict], BatchDraw]]:
    """Full batches with their draws (seeded by (seed, epoch, rank, batch index)) and moved targets: one
    sample per output image, in batch order (an output of a mosaic or mixup is its anchor row's)."""
    sizes = train_sizes(data_cfg)
    strong = strong_augment(data_cfg, seed_parts[1], epochs)
    for index, batch in enumerate(_full_batches(samples, batch_size)):
        draw = draw_batch(sizes, data_cfg.hflip, data_cfg.color_jitter, len(batch),
                          np.random.default_rng([*seed_parts, index]), strong)
        yield batch_targets(batch, draw)[0], draw


def iter_train_batches(shard_set: ShardSet, batch_size: int, data_cfg: DataConfig, *, seed: int, epoch: int,
                       rank: int = 0, world_size: int = 1, prefetch_batches: int = 2, device=None,
                       workers_on_node: int = 1, epochs: int | None = None) -> Iterator[Batch]:
    """Augmented training batches of this rank for this epoch (see the module docstring).

    Every rank yields ``(rows // world_size) // batch_size`` full batches (the rest is dropped). Rows
    are mixed by a shuffle buffer of ``data_cfg.shuffle_buffer`` rows seeded by (seed, epoch, rank); each
    batch is resized to one size drawn from ``data_cfg.multiscale`` and flipped/jittered per image with
    draws seeded by (seed, epoch, rank, batch index); ``data.mosaic``, ``data.mixup`` and ``data.zoom``
    compose outputs from the batch's rows in epochs before ``data.strong_aug_until`` (a fraction of
    ``epochs``, the run's train.epochs, or an epoch number; neoray.data.draws). ``data_cfg.decode``:
    ``cpu`` makes the pixels in Ray tasks (``decode_parallelism(workers_on_node)`` in flight: this node's
    CPUs shared by the training workers on it), ``gpu`` on ``device`` (default: this process's GPU, else
    the CPU), whose batches' images stay there."""
    chunks = epoch_plan(shard_set, epoch=epoch, rank=rank, world_size=world_size, seed=seed, equal=True,
                        max_rows=data_cfg.max_train_images)
    tables = _iter_encoded(chunks, None, prefetch_batches=prefetch_batches)  # whole chunks, in plan order
    samples = (sample for table in tables for sample in _encoded_samples(table))
    mixed = _shuffle_buffer(samples, data_cfg.shuffle_buffer, np.random.default_rng(_seed(seed, epoch, rank)))
    jobs = _drawn_batches(mixed, batch_size, data_cfg, (seed, epoch, rank), epochs)
    if data_cfg.decode == "gpu":
        target = _device(device)
        for batch, draw in jobs:
            yield assemble(apply_draw(decode_on_device(batch, target), draw), batch)
    else:
        yield from _task_batches(jobs, decode_parallelism(workers_on_node))


def train_rows_per_epoch(num_rows: int, max_rows: int = 0) -> int:
    """The training rows an epoch uses (``data.max_train_images``, 0 = all)."""
    return num_rows if max_rows <= 0 else min(num_rows, max_rows)


def train_batches_per_epoch(shard_set: ShardSet, batch_size: int, world_size: int, max_rows: int = 0) -> int:
    """What ``iter_train_batches`` yields per rank and epoch: full batches of an equal part per rank."""
    return (train_rows_per_epoch(shard_set.num_rows, max_rows) // world_size) // batch_size


def _resize_targets(samples: list[dict], target: tuple[int, int]) -> None:
    """Evaluation at another size: each sample's boxes and "factor" follow the whole-image resize."""
    for sample in samples:
        h, w = sample["image"].shape[:2] if "image" in sample else (sample["height"], sample["width"])
        sample["factor"] = resize_factor((w, h), target, sample["image_id"])
        sample["boxes"] = sample["boxes"] * np.float32(sample["factor"])


def _eval_size(shard_set: ShardSet, data_cfg: DataConfig | None) -> tuple[int, int] | None:
    """The size evaluation resizes to: the config's, when it differs from the shards' own (None: keep)."""
    if data_cfg is None:
        return None
    size = parse_size(data_cfg.size, "data.size")
    return None if size == tuple(shard_set.size) else size


def iter_eval_batches(shard_set: ShardSet, batch_size: int, data_cfg: DataConfig | None = None, *, rank: int = 0,
                      world_size: int = 1, prefetch_batches: int = 2, device=None) -> Iterator[Batch]:
    """Evaluation batches of this rank: no augmentation, in manifest order, the last batch possibly short;
    over all ranks every image exactly once.

    ``data_cfg`` (None: the shards as they are, decoded by Ray Data's tasks): the images are resized to
    ``data_cfg.size`` when the shards hold another size (16:9 to 16:9, a pure scale; boxes, scale and pad
    follow, so ``(pixel - pad) / scale`` still maps back to original coordinates), and decoded where
    ``data_cfg.decode`` says: ``cpu`` in the Ray Data tasks, ``gpu`` on ``device`` (as in training), where
    the images stay. No box is dropped: ground truth must stay complete for scoring.
    """
    decode = data_cfg.decode if data_cfg is not None else "cpu"
    target = _eval_size(shard_set, data_cfg)
    chunks = epoch_plan(shard_set, epoch=0, rank=rank, world_size=world_size, seed=None, equal=False)
    if decode == "gpu":
        where = _device(device)
        for table in _iter_encoded(chunks, batch_size, drop_last=False, prefetch_batches=prefetch_batches):
            samples = _encoded_samples(table)
            images = decode_on_device(samples, where)
            if target is not None:
                _resize_targets(samples, target)
                images = resize_images(images, target)
            yield assemble(images, samples)
        return
    for columns in _iter_numpy(chunks, batch_size, drop_last=False, prefetch_batches=prefetch_batches):
        samples = _samples(columns)
        if target is not None:
            _resize_targets(samples, target)
            for sample in samples:
                sample["image"] = resize_image(sample["image"], target)
        yield collate(samples)


__all__ = [
    "Batch", "ROWS_PER_TASK", "ShardSet", "assemble", "chunk_dataset", "collate", "decode_on_device",
    "decode_parallelism", "encoded_dataset", "epoch_plan", "iter_eval_batches", "iter_train_batches", "quiet_ray_data",
    "train_batches_per_epoch", "train_rows_per_epoch",
]
