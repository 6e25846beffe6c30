"""The embedded synthetic dataset and its shards, made on first use in a cache directory and reused.

``python experiments/sweep_lr.py`` with no arguments trains on this, so that a new user sees the whole
system work without finding a dataset first. Layout::

    CACHE/synthetic_320x180_t256_v64_c6/dataset/{train,val,annotations}   (neoray.data.synth)
    CACHE/synthetic_320x180_t256_v64_c6/shards/{train,val}                (neoray.data.prepare)

The search benchmark's harder task is the same call with ``layout="dense"`` (many small objects per
image), cached beside it (``..._c6_dense``); the quality benchmark (benchmarks/bench_quality.py) also
uses ``layout="photo"`` (small vehicles in cluttered aerial-like scenes, ``..._c1_photo``).

CACHE is ``$NEORAY_CACHE`` or ``./.neoray_cache``. A lock file makes concurrent first uses wait for one
another instead of writing the same files twice.
"""

from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from neoray.config import format_size, parse_size
from neoray.data.prepare import prepare_coco
from neoray.data.synth import default_classes, write_synthetic_dataset

DEFAULT_TRAIN_IMAGES = 256
DEFAULT_VAL_IMAGES = 64
COMPLETE_MARKER = ".complete"


def cache_dir() -> Path:
    return Path(os.environ.get("NEORAY_CACHE") or ".neoray_cache").resolve()


@contextmanager
def _locked(path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def ensure_default_data(size=(320, 180), train: int = DEFAULT_TRAIN_IMAGES, val: int = DEFAULT_VAL_IMAGES,
                        classes: int | None = None, root: str | Path | None = None, layout: str = "shapes") -> dict:
    """Make (once) and return ``{"train": shard_dir, "val": shard_dir, "dataset": dataset_dir}``.
    ``classes``: None is the layout's default (6 shapes; 1 kind for ``photo``)."""
    size = parse_size(size, "data.size")
    classes = default_classes(layout) if classes is None else classes
    base = Path(root) if root is not None else cache_dir()
    suffix = "" if layout == "shapes" else f"_{layout}"
    home = base / f"synthetic_{format_size(size)}_t{train}_v{val}_c{classes}{suffix}"
    dataset, shard_root = home / "dataset", home / "shards"
    out = {"train": shard_root / "train", "val": shard_root / "val", "dataset": dataset}
    with _locked(home / ".lock"):
        if not (dataset / COMPLETE_MARKER).exists():
            print(f"[neoray] making the synthetic dataset in {dataset} (first use only)", flush=True)
            write_synthetic_dataset(dataset, train=train, val=val, size=size, classes=classes, seed=0, layout=layout)
            (dataset / COMPLETE_MARKER).write_text("ok\n")  # written last: a cut-short run is redone
        for split in ("train", "val"):
            if not (out[split] / COMPLETE_MARKER).exists():
                print(f"[neoray] writing {split} shards to {out[split]} (first use only)", flush=True)
                prepare_coco(dataset / "annotations" / f"instances_{split}.json", dataset / split, out[split],
                             size=size, workers=1)
                (out[split] / COMPLETE_MARKER).write_text("ok\n")
    return out
