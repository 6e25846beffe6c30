"""Stream 16:9 Parquet shards into training and evaluation batches with Ray Data.

Two halves, because Ray Train splits them across processes:

* Driver side, ``train_dataset`` / ``eval_dataset``: a ``ray.data.Dataset`` that reads the manifest's shard
  files and decodes the JPEGs with cv2 in ``map_batches`` (uint8 HWC RGB, in Ray Data's CPU tasks, so the
  training process does not decode). Pass them to ``TorchTrainer(datasets=...)``; split the eval dataset
  with ``ExactSplitDataConfig`` so that every image is evaluated exactly once.
* Worker side, ``iter_train_batches`` / ``iter_eval_batches``: take the iterator from
  ``ray.train.get_dataset_shard(name)`` (or a ``Dataset``, for the single-process path), pull numpy batches
  with ``iter_batches``, augment (train only, ``neoray.data.augment``) and collate into a ``Batch``.

Why plain ``iter_batches`` + our own collate rather than ``iter_torch_batches``: targets are ragged
(0..n boxes per image) and the train augmentation needs the whole batch at once to give it one size, so
the collate step is ours anyway; a plain function as ``collate_fn`` is deprecated in Ray 2.60 and a
collate class would only wrap the same code.

Reading: the shards are read with Ray Data's V1 Parquet reader, from the explicit file list of the
manifest. The V2 reader (Ray 2.60's default) re-lists and re-reads every file footer at the start of
EVERY epoch (1-3 s here) and bin-packs small row groups into 128 MiB read tasks, i.e. one task, one
decoding CPU for a few thousand images, whatever ``override_num_blocks`` says. V1 resolves the files once,
when the dataset is built, and honours ``override_num_blocks`` by splitting each file's output into
several blocks; the decode step then runs as separate tasks, one per block of ~``ROWS_PER_DECODE_TASK``
images, in parallel on all CPUs.

Determinism: the file order is shuffled per epoch with ``FileShuffleConfig(seed)``, whose seed Ray mixes
with the dataset's execution index (``DataContext._execution_idx``: 0 for a new dataset, +1 after every
completed pass), and rows come out in file order (``preserve_order``); the local shuffle buffer and the
augmentation draw from seeds made of (seed, epoch, rank[, batch index]). Ray counts passes, not epochs,
so a run resumed at epoch N with a new dataset would replay epoch 0's file order. Hence:

* ``iter_train_batches`` sets the execution index to ``epoch`` when it iterates a dataset in its own
  process (a ``Dataset``, or ``Dataset.iterator()`` as the sweep's direct path uses): the order is then
  a function of (seed, epoch) alone, whether or not earlier epochs ran in this process;
* a ``ray.train.get_dataset_shard`` iterator is executed by Ray Train's split coordinator actor, out of
  the worker's reach, one pass per epoch from the index the driver's dataset had. A driver that resumes
  should pass the run's first epoch as ``train_dataset(..., start_epoch=N)``; the order is then exact for
  a run started at N (without it, from epoch 0's order on), but Ray Train's own restart of a worker group after a failure (``max_failures``) re-splits
  the driver's dataset, and its first epoch gets epoch N's file order again. Ray 2.60 offers no hook to
  fix that, and the local shuffle and augmentation still follow the true epoch.

Ray's reseeding is ``hash((seed, index))``, stable across processes for integers. Across several Ray
Train workers, which rows reach which worker is decided at run time by ``streaming_split``, so only the
single-worker order is exactly reproducible.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterator, Sequence

import cv2
import numpy as np
import ray
import ray.train

from neoray.config import DataConfig, parse_size
from neoray.data.shards import read_manifest, shard_files

if TYPE_CHECKING:
    import torch

# Ray's decode tasks import this module to find `decode_images`; torch and albumentations (3+ s of
# imports per fresh worker, paid in the time to the first batch) are therefore imported only inside the
# worker-side functions that use them.

# Columns the stream needs from a shard (file_name and ann_ids stay on disk); "path" is added by the reader
# so that a bad record can be reported with its shard file.
READ_COLUMNS = ["image_id", "image", "width", "height", "orig_width", "orig_height", "scale", "pad_x", "pad_y",
                "boxes", "labels", "iscrowd", "areas"]
# Images per decode task: big enough that task overhead stays small, small enough to use every CPU
# (2000 images -> 63 tasks) and to start the first batch quickly.
ROWS_PER_DECODE_TASK = 32


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
# Driver side: datasets
# ----------------------------------------------------------------------------------------------------


def quiet_ray_data() -> None:
    """No per-epoch progress bars or "Starting execution" lines from Ray Data in this process.

    Training logs (and a sweep's job log) should show epochs and Tune's trial table, not one bar per
    epoch per dataset; Ray Data's own log files still have everything.
    """
    import logging

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    context.enable_operator_progress_bars = False
    logging.getLogger("ray.data").setLevel(logging.WARNING)


@contextmanager
def _parquet_v1_reader():
    """Build a read_parquet plan with the V1 reader (see the module docstring for why).

    ``use_datasource_v2`` is read only when ``read_parquet`` builds its plan, so flipping it for the
    duration of that call affects no other dataset.
    """
    context = ray.data.DataContext.get_current()
    previous = context.use_datasource_v2
    context.use_datasource_v2 = False
    try:
        yield
    finally:
        context.use_datasource_v2 = previous


def _object_array(items: list) -> np.ndarray:
    """A 1-D object array of per-row arrays (np.array would try to stack equal-length rows into 3-D)."""
    out = np.empty(len(items), dtype=object)
    out[:] = items
    return out


def decode_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """``map_batches`` step: JPEG bytes -> uint8 HWC RGB "pixels"; ragged columns -> per-row numpy arrays.

    Boxes arrive as lists of 4-float lists, which Ray cannot turn back into Arrow; as (N, 4) float32 arrays
    they become Arrow tensors, so 0, 1 or many boxes per image all survive. Bad records raise one line
    naming the shard file, the image id and the field.
    """
    pixels, boxes, labels, iscrowd, areas = [], [], [], [], []
    for i, data in enumerate(batch["image"]):
        where = f"{batch['path'][i]}: image_id {int(batch['image_id'][i])}"
        image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        if image is None:
            raise ValueError(f"{where}: field 'image': not a decodable JPEG ({len(data)} bytes)")
        width, height = int(batch["width"][i]), int(batch["height"][i])
        if image.shape[:2] != (height, width):
            raise ValueError(f"{where}: field 'image': decoded {image.shape[1]}x{image.shape[0]} but the row says "
                             f"width x height = {width}x{height}")
        if pixels and image.shape != pixels[0].shape:
            raise ValueError(f"{where}: field 'image': {width}x{height} differs from "
                             f"{pixels[0].shape[1]}x{pixels[0].shape[0]} in the same shard; a shard directory "
                             "holds one size")
        row_boxes = [np.asarray(box, dtype=np.float32) for box in batch["boxes"][i]]
        row_boxes = np.stack(row_boxes) if row_boxes else np.zeros((0, 4), np.float32)
        if row_boxes.ndim != 2 or row_boxes.shape[1] != 4:
            raise ValueError(f"{where}: field 'boxes': expected [x1, y1, x2, y2] per box, got shape {row_boxes.shape}")
        for name in ("labels", "iscrowd", "areas"):
            if len(batch[name][i]) != len(row_boxes):
                raise ValueError(f"{where}: field '{name}': {len(batch[name][i])} entries for {len(row_boxes)} boxes")
        pixels.append(image)
        boxes.append(row_boxes)
        labels.append(np.asarray(batch["labels"][i], dtype=np.int64))
        iscrowd.append(np.asarray(batch["iscrowd"][i], dtype=bool))
        areas.append(np.asarray(batch["areas"][i], dtype=np.float32))
    out = {key: batch[key] for key in ("image_id", "orig_width", "orig_height", "scale", "pad_x", "pad_y")}
    # The JPEG bytes, path and width/height are dropped here: the pixels carry the size.
    out["pixels"] = np.stack(pixels) if pixels else np.zeros((0, 0, 0, 3), np.uint8)
    out["boxes"], out["labels"] = _object_array(boxes), _object_array(labels)
    out["iscrowd"], out["areas"] = _object_array(iscrowd), _object_array(areas)
    return out


def _pin_file_order(data, epoch: int) -> None:
    """Make the next pass over ``data`` use epoch ``epoch``'s file order, when this process executes it.

    The file shuffle is seeded with (seed, execution index), see the module docstring; setting the index
    to the epoch makes the order independent of how many passes ran before. A streaming-split iterator
    (Ray Train) is executed elsewhere and is left as it is.
    """
    base = data if isinstance(data, ray.data.Dataset) else getattr(data, "_base_dataset", None)
    if isinstance(base, ray.data.Dataset):
        # Private in Ray 2.60 (read by the Parquet reader, incremented after each pass); pyproject pins Ray
        # to 2.60.x and test_stream's resume test fails if it stops steering the order.
        base.context._execution_idx = int(epoch)


def _shard_dataset(shard_dir, *, seed: int | None, max_images: int) -> ray.data.Dataset:
    manifest = read_manifest(shard_dir)
    files = [str(path) for path in shard_files(shard_dir)]
    rows = [int(entry["rows"]) for entry in manifest["shards"]]
    if not files:
        raise ValueError(f"{shard_dir}: the manifest lists no shard files (0 images)")
    if max_images > 0:
        # A fixed subset (the first files, in manifest order) so that every epoch trains on the same images;
        # shuffling files first would make limit() pick a different subset each epoch.
        keep = next((k + 1 for k in range(len(rows)) if sum(rows[:k + 1]) >= max_images), len(rows))
        files, rows, seed = files[:keep], rows[:keep], None
    num_rows = sum(rows) if max_images <= 0 else min(sum(rows), max_images)
    num_blocks = max(len(files), math.ceil(num_rows / ROWS_PER_DECODE_TASK))
    shuffle = ray.data.FileShuffleConfig(seed=seed) if seed is not None else None  # reseeded every epoch
    with _parquet_v1_reader():
        ds = ray.data.read_parquet(files, shuffle=shuffle, include_paths=True, override_num_blocks=num_blocks)
    ds = ds.select_columns(READ_COLUMNS + ["path"])
    if max_images > 0:
        ds = ds.limit(max_images)
    # batch_size=None: one call per block as read (a batch size would merge small blocks into one task).
    ds = ds.map_batches(decode_images, batch_format="numpy", batch_size=None)
    # Rows leave in file order, so the order is reproducible (see the module docstring).
    ds.context.execution_options.preserve_order = True
    return ds


def train_dataset(shard_dir, *, seed: int = 0, max_images: int = 0, start_epoch: int = 0) -> ray.data.Dataset:
    """The training images of ``shard_dir``, decoded, file order shuffled per epoch (deterministic for
    ``seed``). ``max_images`` > 0 keeps a fixed subset of that many images (smoke runs).

    ``start_epoch``: the first epoch this dataset will serve (a resumed run's epochs done), so that the
    passes of a Ray Train split get the file order of epochs start_epoch, start_epoch + 1, ...; iterated
    in-process by ``iter_train_batches`` the order follows its ``epoch`` anyway (module docstring)."""
    ds = _shard_dataset(shard_dir, seed=seed, max_images=max_images)
    _pin_file_order(ds, start_epoch)
    return ds


def eval_dataset(shard_dir) -> ray.data.Dataset:
    """The evaluation images of ``shard_dir``, decoded, in manifest order, no shuffling, each exactly once."""
    return _shard_dataset(shard_dir, seed=None, max_images=0)


class ExactSplitDataConfig(ray.train.DataConfig):
    """``ray.train.DataConfig`` that splits the datasets named in ``exact`` with ``equal=False``.

    Ray Train's own DataConfig splits every dataset with ``streaming_split(n, equal=True)``, which DROPS up
    to n-1 rows so that all workers get the same count: right for training, wrong for evaluation, where
    every image must be scored exactly once. Datasets in ``exact`` go to the workers without loss or
    duplication (workers may then get different numbers of eval batches); the others are handled by the
    parent class as usual. Use: ``TorchTrainer(..., dataset_config=ExactSplitDataConfig(exact=["val"]))``.
    """

    def __init__(self, exact: Sequence[str] = ("val",), **kwargs):
        super().__init__(**kwargs)
        self._exact = list(exact)

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        exact = {name: ds for name, ds in datasets.items() if name in self._exact}
        others = {name: ds for name, ds in datasets.items() if name not in self._exact}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        hints = worker_node_ids if self._enable_shard_locality else None
        for name, ds in exact.items():
            ds = ds.copy(ds)
            if ds.name is None:
                ds.set_name(name)
            ds.context.execution_options = self._resolve_execution_options(name)
            for rank, split in enumerate(ds.streaming_split(world_size, equal=False, locality_hints=hints)):
                output[rank][name] = split
        return output


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


def collate(samples: list[dict]) -> Batch:
    """Stack per-image samples (all one size) into a ``Batch``; scale/pad follow each sample's "factor"."""
    import torch

    shapes = {s["image"].shape for s in samples}
    if len(shapes) != 1:
        raise ValueError(f"collate: images of one batch must have one size, got {sorted(shapes)} "
                         f"(image ids {[s['image_id'] for s in samples]})")
    images = torch.from_numpy(np.stack([s["image"] for s in samples])).permute(0, 3, 1, 2).contiguous()
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
        pad=torch.tensor([[p * s["factor"] for p in s["pad"]] for s in samples], dtype=torch.float32).reshape(-1, 2),
        orig_sizes=torch.tensor([s["orig_size"] for s in samples], dtype=torch.int64).reshape(-1, 2),
    )


def iter_train_batches(data, batch_size: int, data_cfg: DataConfig, *, seed: int, epoch: int, rank: int = 0,
                       drop_last: bool = True, prefetch_batches: int = 2,
                       stats: dict | None = None) -> Iterator[Batch]:
    """Augmented training batches from ``data`` (a ``DataIterator`` from ``get_dataset_shard`` or a Dataset).

    Rows are mixed by a local shuffle buffer of ``data_cfg.shuffle_buffer`` rows seeded by (seed, epoch,
    rank); each batch is resized to one size drawn from ``data_cfg.multiscale`` and flipped/jittered per
    image with draws seeded by (seed, epoch, rank, batch index). ``stats``, when given, accumulates
    "images", "boxes" (kept) and "boxes_dropped" (degenerate after augmentation), for the epoch report.
    """
    from neoray.data.augment import TrainAugment

    augment = TrainAugment(data_cfg)
    _pin_file_order(data, epoch)
    shuffle = {}
    if data_cfg.shuffle_buffer > 0:
        shuffle = {"local_shuffle_buffer_size": data_cfg.shuffle_buffer,
                   "local_shuffle_seed": _seed(seed, epoch, rank)}
    batches = data.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=drop_last,
                                prefetch_batches=prefetch_batches, **shuffle)
    for index, columns in enumerate(batches):
        rng = np.random.default_rng([seed, epoch, rank, index])
        samples, _size, dropped = augment(_samples(columns), rng)
        if stats is not None:
            stats["images"] = stats.get("images", 0) + len(samples)
            stats["boxes"] = stats.get("boxes", 0) + sum(len(s["boxes"]) for s in samples)
            stats["boxes_dropped"] = stats.get("boxes_dropped", 0) + dropped
        yield collate(samples)


def iter_eval_batches(data, batch_size: int, *, size=None, prefetch_batches: int = 2) -> Iterator[Batch]:
    """Evaluation batches: no augmentation, every row once, in stream order, the last batch possibly short.

    Images keep the shard size unless ``size`` (W, H) is given: then the whole image is resized to it
    (16:9 to 16:9, a pure scale) and boxes, scale and pad follow, so ``(pixel - pad) / scale`` still maps
    back to original coordinates. No box is dropped: ground truth must stay complete for scoring.
    """
    from neoray.data.augment import resize_factor, resize_image

    target = parse_size(size, "size") if size is not None else None
    batches = data.iter_batches(batch_size=batch_size, batch_format="numpy", drop_last=False,
                                prefetch_batches=prefetch_batches)
    for columns in batches:
        samples = _samples(columns)
        if target is not None:
            for sample in samples:
                h, w = sample["image"].shape[:2]
                sample["factor"] = resize_factor((w, h), target, sample["image_id"])
                sample["image"] = resize_image(sample["image"], target)
                sample["boxes"] = sample["boxes"] * np.float32(sample["factor"])
        yield collate(samples)


__all__ = [
    "Batch", "ExactSplitDataConfig", "READ_COLUMNS", "ROWS_PER_DECODE_TASK", "collate", "decode_images",
    "eval_dataset", "iter_eval_batches", "iter_train_batches", "train_dataset",
]
