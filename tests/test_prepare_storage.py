"""`neoray prepare` and `neoray check` on object storage (a local S3 server) and on a Ray cluster.

The same dataset prepared to a local folder and to s3:// gives the same shard bytes; re-runs reuse shards
there too; an interrupted run leaves no manifest; a corrupted object is caught by `check`; Ray tasks and
the local process pool write the same shards.
"""

from __future__ import annotations

import json
import os

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from neoray import storage
from neoray.cli import main
from neoray.data import prepare as prepare_module
from neoray.data.check import check_shards
from neoray.data.prepare import prepare_coco, prepare_yolo
from neoray.data.shards import ManifestError, read_manifest, shard_files
from neoray.data.synth import write_synthetic_dataset

SIZE = (160, 90)


@pytest.fixture
def synth(tmp_path):
    """A local synthetic COCO split: (annotation file, image folder), as strings."""
    out = write_synthetic_dataset(tmp_path / "src", train=8, val=0, size=SIZE, classes=3, seed=0, aspect_mix=True)
    return str(out["train_annotations"]), str(out["train_images"])


def _rows(shard_dir) -> list[dict]:
    return [row for path in shard_files(shard_dir)
            for row in pq.read_table(pa.BufferReader(storage.read_bytes(path))).to_pylist()]


def _checksums(manifest: dict) -> list[tuple[str, int, str]]:
    return [(s["file"], s["rows"], s["sha256"]) for s in manifest["shards"]]


def _upload(local_dir: str, uri: str) -> str:
    storage.upload_dir(local_dir, uri)
    return uri


# ----------------------------------------------------------------------------------------------------
# storage.list_files: what a YOLO image root holds
# ----------------------------------------------------------------------------------------------------


def test_list_files_reports_special_files_and_does_not_enter_linked_folders(tmp_path):
    root = tmp_path / "root"
    (root / "sub").mkdir(parents=True)
    (root / "sub" / "a.jpg").write_bytes(b"a")
    (tmp_path / "real.jpg").write_bytes(b"real")
    os.symlink(tmp_path / "real.jpg", root / "link.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.symlink(tmp_path / "nowhere.jpg", root / "broken.jpg")
    os.mkfifo(root / "fifo.jpg")
    os.symlink(root, root / "sub" / "loop")  # would recurse forever if followed
    found = {os.path.relpath(e.path, root): e.kind for e in storage.list_files(root)}
    assert found == {"broken.jpg": "missing", "fifo.jpg": "other", "link.jpg": "file", "sub/a.jpg": "file",
                     "zero.jpg": "other"}
    assert storage.list_files(tmp_path / "missing") == []


# ----------------------------------------------------------------------------------------------------
# Shards on object storage
# ----------------------------------------------------------------------------------------------------


def test_prepare_to_s3_matches_local_and_check_passes(synth, tmp_path, s3_bucket, capsys):
    ann, images = synth
    local = prepare_coco(ann, images, tmp_path / "local", size=SIZE, workers=1, rows_per_shard=3)
    uri = f"{s3_bucket}/shards/train"
    code = main(["prepare", "--coco", ann, "--images", images, "--out", uri, "--size", "160x90",
                 "--workers", "1", "--rows-per-shard", "3"])
    assert code == 0 and f"in {uri}" in capsys.readouterr().out
    remote = read_manifest(uri)
    assert _checksums(remote) == _checksums(local.manifest) and len(remote["shards"]) == 3
    assert remote["counts"] == local.counts
    assert _rows(uri) == _rows(tmp_path / "local")
    names = sorted(e.name for e in storage.list_dir(uri))
    assert names == ["_manifest.json", "_report.json", "shard-00000.parquet", "shard-00001.parquet",
                     "shard-00002.parquet"]  # one object per file, no temporary objects
    assert shard_files(uri)[0] == f"{uri}/shard-00000.parquet"

    assert check_shards(uri).ok
    assert main(["check", uri]) == 0
    assert capsys.readouterr().out.strip().endswith("OK")


def test_rerun_on_s3_reuses_unchanged_shards(synth, s3_bucket):
    ann, images = synth
    uri = f"{s3_bucket}/out"
    run = lambda: prepare_coco(ann, images, uri, size=SIZE, workers=1, rows_per_shard=3)  # noqa: E731
    first = run()
    assert (first.shards_written, first.shards_reused) == (3, 0)
    second = run()
    assert (second.shards_written, second.shards_reused) == (0, 3) and second.manifest == first.manifest

    import cv2  # one changed image (ids 4..6 live in shard 1) re-encodes only its shard
    path = os.path.join(images, "000005.jpg")
    cv2.imwrite(path, 255 - cv2.imread(path))
    third = run()
    assert (third.shards_written, third.shards_reused) == (1, 2)

    damaged = f"{uri}/shard-00002.parquet"  # a damaged object is rebuilt, not trusted
    storage.write_bytes(damaged, storage.read_bytes(damaged)[:-10] + b"0123456789")
    assert run().shards_written == 1 and check_shards(uri).ok


def test_source_on_s3_gives_the_same_shards(synth, tmp_path, s3_bucket):
    ann, images = synth
    local = prepare_coco(ann, images, tmp_path / "local", size=SIZE, workers=1)
    remote_root = _upload(os.path.dirname(images), f"{s3_bucket}/coco")
    remote = prepare_coco(f"{remote_root}/annotations/instances_train.json", f"{remote_root}/train",
                          f"{s3_bucket}/shards", size=SIZE, workers=1)
    assert _checksums(remote.manifest) == _checksums(local.manifest)
    assert remote.manifest["options"]["images"] == f"{remote_root}/train"
    again = prepare_coco(f"{remote_root}/annotations/instances_train.json", f"{remote_root}/train",
                         f"{s3_bucket}/shards", size=SIZE, workers=1)
    assert again.shards_reused == len(again.manifest["shards"])  # object sizes and times are the fingerprint


def test_yolo_source_on_s3(tmp_path, s3_bucket):
    import cv2
    import numpy as np

    root = tmp_path / "yolo"
    (root / "images" / "train").mkdir(parents=True)
    (root / "labels" / "train").mkdir(parents=True)
    (root / "data.yaml").write_text("path: .\ntrain: images/train\nval: images/val\nnames: [a, b]\n")
    for i in range(3):
        cv2.imwrite(str(root / "images" / "train" / f"{i}.jpg"), np.full((90, 160, 3), 60 * i, np.uint8))
    (root / "labels" / "train" / "0.txt").write_text("1 0.5 0.5 0.25 0.5\n")
    (root / "labels" / "train" / "ghost.txt").write_text("0 0.5 0.5 0.1 0.1\n")
    local = prepare_yolo(root, tmp_path / "local", size=SIZE, workers=1)
    remote = prepare_yolo(_upload(str(root), f"{s3_bucket}/yolo"), f"{s3_bucket}/out", size=SIZE, workers=1)
    assert _checksums(remote.manifest) == _checksums(local.manifest)
    assert remote.counts == local.counts and remote.counts["images_without_label_file"] == 2
    assert [e["reason"] for e in remote.report] == ["label file without image"]


def test_relative_paths_are_made_absolute_on_the_driver(synth, tmp_path, monkeypatch):
    ann, images = synth
    monkeypatch.chdir(tmp_path)
    result = prepare_coco(os.path.relpath(ann), os.path.relpath(images), "rel_out", size=SIZE, workers=1)
    assert result.out_dir == str(tmp_path / "rel_out")
    assert result.manifest["options"]["images"] == images and result.manifest["options"]["annotations"] == ann


# ----------------------------------------------------------------------------------------------------
# Interrupted runs and corrupted objects
# ----------------------------------------------------------------------------------------------------


@pytest.fixture(params=["local", "s3"])
def out_dir(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "out")
    return f"{request.getfixturevalue('s3_bucket')}/out"


def test_interrupted_prepare_leaves_no_manifest(synth, out_dir, monkeypatch):
    ann, images = synth
    first = prepare_coco(ann, images, out_dir, size=SIZE, workers=1, rows_per_shard=2)
    real_build = prepare_module._build_shard

    def build(task):
        if task.index == 2:
            raise KeyboardInterrupt  # Ctrl-C half way through a run
        return real_build(task)

    monkeypatch.setattr(prepare_module, "_build_shard", build)
    with pytest.raises(KeyboardInterrupt):
        prepare_coco(ann, images, out_dir, size=SIZE, workers=1, rows_per_shard=2, quality=70)
    with pytest.raises(ManifestError, match="manifest not found"):
        read_manifest(out_dir)
    result = check_shards(out_dir)
    assert not result.ok and "manifest not found" in result.problems[0]

    monkeypatch.setattr(prepare_module, "_build_shard", real_build)
    again = prepare_coco(ann, images, out_dir, size=SIZE, workers=1, rows_per_shard=2)
    assert again.shards_written == 4  # without a manifest nothing is trusted: every shard is written again
    assert _checksums(again.manifest) == _checksums(first.manifest) and check_shards(out_dir).ok


def test_corrupted_object_is_caught_by_check(synth, s3_bucket, capsys):
    ann, images = synth
    uri = f"{s3_bucket}/out"
    prepare_coco(ann, images, uri, size=SIZE, workers=1, rows_per_shard=3)
    shard = f"{uri}/shard-00001.parquet"
    data = bytearray(storage.read_bytes(shard))
    middle = len(data) // 2
    data[middle:middle + 8] = bytes(b ^ 0xFF for b in data[middle:middle + 8])
    storage.write_bytes(shard, bytes(data))
    storage.remove(f"{uri}/shard-00002.parquet")
    storage.write_bytes(f"{uri}/extra/part.parquet", storage.read_bytes(f"{uri}/shard-00000.parquet"))

    problems = check_shards(uri).problems
    assert any(p.startswith("shard-00001.parquet: sha256") for p in problems)
    assert "shard-00002.parquet: file missing" in problems
    assert any(p.startswith("extra/part.parquet: Parquet file not listed") for p in problems)
    assert main(["check", uri]) == 1
    err = capsys.readouterr().err
    assert "shard-00001.parquet: sha256" in err and "Traceback" not in err


def test_storage_errors_are_one_line(synth, s3_server, capsys):
    ann, images = synth
    code = main(["prepare", "--coco", ann, "--images", images, "--out", "s3://no-such-bucket-here/x",
                 "--size", "160x90", "--workers", "1"])
    err = capsys.readouterr().err
    assert code == 1 and "no-such-bucket-here" in err and err.count("\n") == 1 and "Traceback" not in err
    assert main(["check", "s3://no-such-bucket-here/x"]) == 1
    assert "Traceback" not in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------------
# Ray tasks
# ----------------------------------------------------------------------------------------------------


def test_address_and_ray_address_choose_the_ray_executor(synth, tmp_path, monkeypatch):
    ann, images = synth
    calls = []
    monkeypatch.setattr(prepare_module, "_connect_ray", lambda address: calls.append(address) or 2)
    monkeypatch.setattr(prepare_module, "_run_ray_tasks",
                        lambda tasks: prepare_module._run_tasks(tasks, 1))  # the choice is under test
    args = ["prepare", "--coco", ann, "--images", images, "--size", "160x90"]
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert main(args + ["--out", str(tmp_path / "a"), "--workers", "1"]) == 0 and calls == []
    assert main(args + ["--out", str(tmp_path / "b"), "--address", "auto"]) == 0 and calls == ["auto"]
    assert read_manifest(tmp_path / "b")["options"]["workers"] == 2  # the cluster's CPUs
    monkeypatch.setenv("RAY_ADDRESS", "127.0.0.1:6379")
    assert main(args + ["--out", str(tmp_path / "c")]) == 0 and calls == ["auto", None]
    monkeypatch.delenv("RAY_ADDRESS")
    assert main(args + ["--out", str(tmp_path / "d"), "--ray"]) == 0 and calls == ["auto", None, None]


@pytest.mark.slow
def test_ray_tasks_and_process_pool_write_the_same_shards(ray_session, synth, tmp_path, s3_bucket):
    """Ray reads the source from object storage and writes there; the pool works on local files."""
    ann, images = synth
    pool = prepare_coco(ann, images, tmp_path / "pool", size=SIZE, workers=2, rows_per_shard=3)
    remote_root = _upload(os.path.dirname(images), f"{s3_bucket}/coco")
    on_ray = prepare_coco(f"{remote_root}/annotations/instances_train.json", f"{remote_root}/train",
                          f"{s3_bucket}/shards", size=SIZE, workers=2, rows_per_shard=3, ray=True)
    assert len(pool.manifest["shards"]) == 3
    assert _checksums(on_ray.manifest) == _checksums(pool.manifest)
    assert on_ray.counts == pool.counts and on_ray.report == pool.report
    assert check_shards(f"{s3_bucket}/shards").ok
    assert json.loads(json.dumps(on_ray.manifest["shards"])) == on_ray.manifest["shards"]


@pytest.mark.slow
def test_ray_task_failure_is_the_tasks_own_one_line_error(ray_session, synth, tmp_path):
    ann, images = synth
    out = tmp_path / "out"
    (out / "shard-00000.parquet").mkdir(parents=True)  # the first task cannot write its shard
    with pytest.raises(OSError) as err:
        prepare_coco(ann, images, out, size=SIZE, workers=2, ray=True)
    assert "\n" not in str(err.value) and "shard-00000.parquet: cannot write" in str(err.value)
    assert not (out / "_manifest.json").exists()


def test_an_object_store_error_fails_the_shard_and_a_local_one_skips_the_image(tmp_path, monkeypatch):
    """A network or service error while reading from object storage says nothing about the image: it
    must fail (and on a cluster retry) the shard, not record the image as unreadable for good."""
    from neoray.data import image_files
    from neoray.data import sources as src

    def flaky(path, max_bytes=None):
        raise storage.StorageError(f"{path}: cannot read (AWS Error NETWORK_CONNECTION during GetObject)")

    monkeypatch.setattr(storage, "read_bytes", flaky)
    with pytest.raises(storage.StorageError, match="s3://bucket/images/1.jpg: cannot read"):
        image_files.read_image("s3://bucket/images/1.jpg")
    local = tmp_path / "1.jpg"
    local.write_bytes(b"x")
    refused = image_files.read_image(str(local))
    assert isinstance(refused, image_files.Refused) and refused.reason == src.IMAGE_UNREADABLE


def test_a_ray_checkpoint_on_s3_is_read_in_place_not_downloaded(tmp_path, s3_bucket):
    """A restarted worker resumes from Ray's checkpoint on object storage: read from its URI, not copied
    into a temporary folder that nothing removes."""
    import pyarrow.fs
    import ray.train
    import torch

    from neoray.checkpoints import load_checkpoint, save_checkpoint
    from neoray.engine.ray_context import checkpoint_location

    save_checkpoint(tmp_path / "ckpt", {"epoch": 3, "model": {"w": torch.ones(2)}})
    uri = _upload(str(tmp_path / "ckpt"), f"{s3_bucket}/run/ray/checkpoint_000002")
    filesystem, path = pyarrow.fs.FileSystem.from_uri(uri)
    checkpoint = ray.train.Checkpoint(path=path, filesystem=filesystem)
    checkpoint.to_directory = lambda *args: pytest.fail("downloaded")
    location = checkpoint_location(checkpoint)
    assert location == uri
    assert load_checkpoint(location)["epoch"] == 3
