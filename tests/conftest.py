"""Shared fixtures: one local Ray instance per test session, tiny synthetic data made on demand."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

# Keep Ray quiet and light on a 2-core machine; no dashboard or usage reporting needed in tests.
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("RAY_DEDUP_LOGS", "1")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# A local S3 API (moto's standalone server) for the s3:// tests. Its address is fixed here, before any
# Ray instance starts, because Ray's workers inherit the environment of the process that started Ray;
# pyarrow (and boto3) read these variables. The server itself starts only when a test asks for it.
S3_PORT = free_port()
os.environ["AWS_ENDPOINT_URL"] = f"http://127.0.0.1:{S3_PORT}"
os.environ["AWS_ACCESS_KEY_ID"] = "neoray-test"
os.environ["AWS_SECRET_ACCESS_KEY"] = "neoray-test"
os.environ["AWS_DEFAULT_REGION"] = "us-east-1"
os.environ.pop("AWS_PROFILE", None)


@pytest.fixture(scope="session")
def s3_server():
    """moto's S3 server on 127.0.0.1 (the endpoint in AWS_ENDPOINT_URL) for the whole session."""
    moto_server = Path(sys.executable).with_name("moto_server")
    proc = subprocess.Popen([str(moto_server), "-H", "127.0.0.1", "-p", str(S3_PORT)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", S3_PORT), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                pytest.fail(f"moto_server did not start on port {S3_PORT}")
            time.sleep(0.2)
    yield os.environ["AWS_ENDPOINT_URL"]
    proc.terminate()
    proc.wait(timeout=30)


@pytest.fixture
def s3_bucket(s3_server) -> str:
    """A new, empty bucket on the test S3 server; returns its URI (s3://name)."""
    import boto3

    name = f"neoray-{uuid.uuid4().hex[:12]}"
    boto3.client("s3").create_bucket(Bucket=name)
    return f"s3://{name}"


def _pickle_fault_hooks_by_value() -> None:
    """Ray workers and Tune trials cannot import the tests folder: ship the hook classes by value."""
    import fault_hooks
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(fault_hooks)


@pytest.fixture(scope="session")
def ray_session():
    """A local Ray instance shared by every test that needs one (started once: it costs seconds)."""
    import ray

    if not ray.is_initialized():
        # With the dashboard, as users run it: Ray Train V2's placement-group cleaner queries the State
        # API, and without it wrongly decides the controller is dead and removes a live run's workers.
        ray.init(num_cpus=4, log_to_driver=True, configure_logging=False)
    _pickle_fault_hooks_by_value()
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
