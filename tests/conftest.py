"""Shared fixtures: one local Ray instance per test session, tiny synthetic data made on demand."""

from __future__ import annotations

import os

import pytest

# Keep Ray quiet and light on a 2-core machine; no dashboard or usage reporting needed in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (started once: it costs seconds)."""
    import ray

    if not ray.is_initialized():
        # With the dashboard, as users run it: Ray Train V2's placement-group cleaner queries the State
        # API, and without it wrongly decides the controller is dead and removes a live run's workers.
        ray.init(num_cpus=4, log_to_driver=True, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def synthetic_dataset(tmp_path_factory):
    """A tiny synthetic COCO dataset (16:9, 160x90) made once per session with `neoray synth`'s code."""
    from neoray.data.synth import write_synthetic_dataset

    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=24, val=8, size=(160, 90), classes=4, seed=0)
    return root


@pytest.fixture(scope="session")
def synthetic_shards(synthetic_dataset, tmp_path_factory):
    """Shards of `synthetic_dataset` at 160x90: {"train": dir, "val": dir, "root": dataset dir}."""
    from neoray.data.prepare import prepare_coco

    out = tmp_path_factory.mktemp("shards")
    dirs = {"root": synthetic_dataset}
    for split in ("train", "val"):
        prepare_coco(
            synthetic_dataset / "annotations" / f"instances_{split}.json",
            synthetic_dataset / split,
            out / split,
            size=(160, 90),
            workers=1,
        )
        dirs[split] = out / split
    return dirs
