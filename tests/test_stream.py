"""Ray Data streaming of shards into Batches: shapes, ragged targets, scale/pad, the per-rank plan,
determinism.

Most tests write their own small shard directory (with the shard schema of docs/ARCHITECTURE.md), so
that every box, pad and scale is known; one end-to-end test streams the `synthetic_shards` fixture.
"""

from __future__ import annotations

import json

import cv2
import numpy as np
import pytest
import torch

from neoray import storage
from neoray.config import DataConfig
from neoray.data.augment import apply_draw
from neoray.data.draws import augment_targets, draw_batch, train_sizes
from neoray.data.shards import FORMAT, MANIFEST_NAME, VERSION, shard_name, write_shard
from neoray.data.stream import (
    Batch,
    ShardSet,
    epoch_plan,
    iter_eval_batches,
    iter_train_batches,
    train_batches_per_epoch,
)

W, H = 160, 90  # shard size
ORIG_W, ORIG_H = 320, 240  # a 4:3 source, letterboxed into 160x90
SCALE = H / ORIG_H  # 0.375
PAD_X, PAD_Y = (W - ORIG_W * SCALE) / 2, 0.0  # 20.0, 0.0
NUM_IMAGES, ROWS_PER_SHARD = 30, 10
NUM_CLASSES = 8


def _num_boxes(image_id: int) -> int:
    return [0, 1, 7, 2][image_id % 4]  # empty, one and many boxes


def _shard_boxes(image_id: int) -> np.ndarray:
    """Boxes inside the letterboxed picture area, at least 6 px, distinct per image."""
    rng = np.random.default_rng(image_id)
    n = _num_boxes(image_id)
    x1 = rng.uniform(PAD_X, W - PAD_X - 20, n)
    y1 = rng.uniform(0, H - 20, n)
    w, h = rng.uniform(6, 19, n), rng.uniform(6, 19, n)
    return np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32).reshape(-1, 4)


def _row(image_id: int, image_bytes: bytes | None = None) -> dict:
    boxes = _shard_boxes(image_id)
    n = len(boxes)
    if image_bytes is None:
        image = np.random.default_rng(1000 + image_id).integers(0, 256, (H, W, 3), dtype=np.uint8)
        image_bytes = cv2.imencode(".jpg", image)[1].tobytes()
    return {
        "image_id": image_id, "file_name": f"{image_id:06d}.jpg", "image": image_bytes,
        "width": W, "height": H, "orig_width": ORIG_W, "orig_height": ORIG_H,
        "scale": SCALE, "pad_x": PAD_X, "pad_y": PAD_Y,
        "boxes": boxes.tolist(),
        "labels": list(range(n)),  # label k is box k: lets a test find the source box of a kept box
        "iscrowd": [k == 1 for k in range(n)],
        "areas": [float(100 * (k + 1)) for k in range(n)],
        "ann_ids": [image_id * 100 + k for k in range(n)],
    }


def _write_shard_dir(out_dir, rows: list[dict], rows_per_shard: int = ROWS_PER_SHARD) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    shards = []
    for index, start in enumerate(range(0, len(rows), rows_per_shard)):
        chunk = rows[start:start + rows_per_shard]
        write_shard(chunk, out_dir / shard_name(index))
        shards.append(
            {"file": shard_name(index), "rows": len(chunk), "sha256": storage.sha256(out_dir / shard_name(index))}
        )
    manifest = {
        "format": FORMAT, "version": VERSION, "size": [W, H],
        "categories": [{"id": k + 1, "name": f"c{k}", "label": k} for k in range(NUM_CLASSES)],
        "num_images": len(rows), "num_boxes": sum(len(r["boxes"]) for r in rows), "shards": shards,
        "options": {}, "skipped": {"images": {}, "annotations": {}}, "counts": {},
    }
    (out_dir / MANIFEST_NAME).write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("stream") / "shards"
    _write_shard_dir(out, [_row(i) for i in range(NUM_IMAGES)])
    return out


def shards(path) -> ShardSet:
    return ShardSet.open(str(path))


def _orig_boxes(image_id: int) -> np.ndarray:
    return (_shard_boxes(image_id) - np.array([PAD_X, PAD_Y, PAD_X, PAD_Y])) / SCALE


def _to_orig(batch: Batch, i: int) -> np.ndarray:
    pad = batch.pad[i].numpy().astype(np.float64)
    return (batch.targets[i]["boxes"].numpy() - np.concatenate([pad, pad])) / float(batch.scale[i])


def _check_batch_types(batch: Batch) -> None:
    assert batch.images.dtype == torch.uint8 and batch.images.ndim == 4 and batch.images.shape[1] == 3
    assert len(batch) == batch.images.shape[0] == len(batch.targets) == batch.image_ids.shape[0]
    assert batch.image_ids.dtype == torch.int64 and batch.orig_sizes.dtype == torch.int64
    assert batch.scale.dtype == torch.float32 and batch.pad.shape == (len(batch), 2)
    for t in batch.targets:
        n = t["boxes"].shape[0]
        assert t["boxes"].dtype == torch.float32 and t["boxes"].shape == (n, 4)
        assert t["labels"].dtype == torch.int64 and t["labels"].shape == (n,)
        assert t["iscrowd"].dtype == torch.bool and t["iscrowd"].shape == (n,)
        assert t["areas"].dtype == torch.float32 and t["areas"].shape == (n,)


# ----------------------------------------------------------------------------------------------------
# Evaluation stream
# ----------------------------------------------------------------------------------------------------


def test_eval_stream_reproduces_every_shard_row_once(ray_session, shard_dir):
    seen = []
    for batch in iter_eval_batches(shards(shard_dir), 4):
        _check_batch_types(batch)
        assert batch.images.shape[2:] == (H, W)
        for i, image_id in enumerate(batch.image_ids.tolist()):
            seen.append(image_id)
            row = _row(image_id)
            expected = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR_RGB)
            np.testing.assert_array_equal(batch.images[i].permute(1, 2, 0).numpy(), expected)
            target = batch.targets[i]
            np.testing.assert_array_equal(target["boxes"].numpy(), _shard_boxes(image_id))
            assert target["boxes"].shape == (_num_boxes(image_id), 4)  # 0, 1 and 7 boxes survive
            assert target["labels"].tolist() == row["labels"]
            assert target["iscrowd"].tolist() == row["iscrowd"]
            assert target["areas"].tolist() == row["areas"]
            assert batch.orig_sizes[i].tolist() == [ORIG_W, ORIG_H]
            np.testing.assert_allclose(_to_orig(batch, i), _orig_boxes(image_id), atol=1e-3)
    assert sorted(seen) == list(range(NUM_IMAGES))
    assert seen == sorted(seen)  # eval keeps manifest order


def test_eval_resized_to_another_size_still_maps_back_to_original_boxes(ray_session, shard_dir):
    seen = 0
    for batch in iter_eval_batches(shards(shard_dir), 8, DataConfig(size=(320, 180))):
        assert batch.images.shape[2:] == (180, 320)
        np.testing.assert_allclose(batch.scale.numpy(), SCALE * 2, rtol=1e-6)
        np.testing.assert_allclose(batch.pad.numpy(), [[PAD_X * 2, PAD_Y * 2]] * len(batch), rtol=1e-6)
        for i, image_id in enumerate(batch.image_ids.tolist()):
            np.testing.assert_allclose(batch.targets[i]["boxes"].numpy(), _shard_boxes(image_id) * 2, atol=1e-3)
            np.testing.assert_allclose(_to_orig(batch, i), _orig_boxes(image_id), atol=1e-3)
            seen += 1
    assert seen == NUM_IMAGES


def test_eval_split_over_ranks_yields_every_image_exactly_once(ray_session, tmp_path):
    # 29 images over 2 ranks: an equal split would have to drop one; evaluation must score each once.
    odd_dir = tmp_path / "odd"
    _write_shard_dir(odd_dir, [_row(i) for i in range(29)])
    parts = [[i for b in iter_eval_batches(shards(odd_dir), 4, rank=r, world_size=2) for i in b.image_ids.tolist()]
             for r in range(2)]
    assert parts[0] and parts[1]
    assert sorted(parts[0] + parts[1]) == list(range(29))


def test_bad_jpeg_is_an_error_naming_file_record_and_field(ray_session, tmp_path):
    bad_dir = tmp_path / "bad"
    _write_shard_dir(bad_dir, [_row(0), _row(1, image_bytes=b"not a jpeg"), _row(2)])
    with pytest.raises(Exception, match=r"shard-00000\.parquet: image_id 1: field 'image': not a decodable JPEG"):
        list(iter_eval_batches(shards(bad_dir), 4))


# ----------------------------------------------------------------------------------------------------
# Training stream
# ----------------------------------------------------------------------------------------------------


def test_train_batches_stack_with_one_configured_size_each(ray_session, shard_dir):
    sizes = [(160, 90), (320, 180), (256, 144)]
    cfg = DataConfig(size=(160, 90), multiscale=sizes, hflip=0.5, color_jitter=0.4, shuffle_buffer=8)
    batches = list(iter_train_batches(shards(shard_dir), 4, cfg, seed=0, epoch=0))
    assert len(batches) == NUM_IMAGES // 4 == train_batches_per_epoch(shards(shard_dir), 4, 1)  # drop_last
    seen_sizes = set()
    for batch in batches:
        _check_batch_types(batch)
        assert len(batch) == 4
        h, w = batch.images.shape[2:]
        assert (w, h) in sizes
        seen_sizes.add((w, h))
        for target in batch.targets:
            boxes = target["boxes"]
            assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
    assert len(seen_sizes) > 1
    ids = [i for b in batches for i in b.image_ids.tolist()]
    assert len(set(ids)) == len(ids) == len(batches) * 4


def test_train_scale_and_pad_map_unflipped_boxes_back_to_original(ray_session, shard_dir):
    cfg = DataConfig(size=(160, 90), multiscale=[(320, 180), (480, 270)], hflip=0.0, color_jitter=0.0)
    count = 0
    for batch in iter_train_batches(shards(shard_dir), 5, cfg, seed=1, epoch=0):  # 30 images: 6 full batches
        for i, image_id in enumerate(batch.image_ids.tolist()):
            source = _orig_boxes(image_id)[batch.targets[i]["labels"].numpy()]  # label k = source box k
            assert len(source) == _num_boxes(image_id)  # enlarging drops nothing
            np.testing.assert_allclose(_to_orig(batch, i), source, atol=0.5 / SCALE)
            ratio = batch.images.shape[3] / W
            np.testing.assert_allclose(batch.targets[i]["boxes"].numpy(), _shard_boxes(image_id) * ratio, atol=0.5)
            count += 1
    assert count == NUM_IMAGES


def test_train_hflip_mirrors_boxes_and_pixels_at_every_scale(ray_session, shard_dir):
    sizes = [(128, 72), (320, 180), (480, 270)]
    cfg = DataConfig(size=(160, 90), multiscale=sizes, hflip=1.0, color_jitter=0.0, shuffle_buffer=0)
    count, seen_sizes = 0, set()
    for batch in iter_train_batches(shards(shard_dir), 5, cfg, seed=2, epoch=0):
        out_h, out_w = batch.images.shape[2:]
        seen_sizes.add((out_w, out_h))
        ratio = out_w / W
        for i, image_id in enumerate(batch.image_ids.tolist()):
            kept = batch.targets[i]["labels"].numpy()  # label k = source box k
            assert len(kept) == _num_boxes(image_id)  # boxes of >= 6 px survive even at 0.8x
            x1, y1, x2, y2 = (_shard_boxes(image_id)[kept] * ratio).T
            mirrored = np.stack([out_w - x2, y1, out_w - x1, y2], axis=1)
            np.testing.assert_allclose(batch.targets[i]["boxes"].numpy(), mirrored, atol=1.0)
            # The pixels are mirrored too: the boxes above only prove something if image and boxes agree.
            row = _row(image_id)
            source = cv2.imdecode(np.frombuffer(row["image"], np.uint8), cv2.IMREAD_COLOR_RGB)
            interpolation = cv2.INTER_AREA if out_w < W else cv2.INTER_LINEAR
            expected = cv2.resize(source, (out_w, out_h), interpolation=interpolation).astype(np.float32)
            got = batch.images[i].permute(1, 2, 0).numpy().astype(np.float32)
            assert np.abs(got - expected[:, ::-1]).mean() < 0.25 * np.abs(got - expected).mean()
            count += 1
    assert count == NUM_IMAGES and len(seen_sizes) > 1


def _decoded(image_id: int) -> np.ndarray:
    return cv2.imdecode(np.frombuffer(_row(image_id)["image"], np.uint8), cv2.IMREAD_COLOR_RGB)


def test_without_strong_augmentations_batches_are_the_per_image_recipe_bit_for_bit(ray_session, shard_dir):
    # The contract the strong augmentations must leave alone: the draw seeded by (seed, epoch, rank, batch
    # index), then per image the resize, flip and jitter (apply_draw) and the boxes (augment_targets).
    cfg = DataConfig(size=(160, 90), multiscale=[(128, 72), (160, 90), (320, 180)], hflip=0.5, color_jitter=0.4,
                     shuffle_buffer=8)
    for index, batch in enumerate(iter_train_batches(shards(shard_dir), 4, cfg, seed=6, epoch=1)):
        draw = draw_batch(train_sizes(cfg), 0.5, 0.4, 4, np.random.default_rng([6, 1, 0, index]))
        assert draw.layouts == ()
        for i, image_id in enumerate(batch.image_ids.tolist()):
            expected = apply_draw(_decoded(image_id), draw.size, draw.flips[i], draw.colors[i])
            assert torch.equal(batch.images[i], torch.from_numpy(np.ascontiguousarray(expected.transpose(2, 0, 1))))
            row = _row(image_id)
            sample = {"boxes": _shard_boxes(image_id), "labels": np.array(row["labels"], np.int64),
                      "iscrowd": np.array(row["iscrowd"], bool), "areas": np.array(row["areas"], np.float32),
                      "width": W, "height": H, "image_id": image_id}
            moved, _ = augment_targets(sample, draw.size, draw.flips[i])
            for key in ("boxes", "labels", "iscrowd", "areas"):
                assert torch.equal(batch.targets[i][key], torch.from_numpy(np.asarray(moved[key])))
            assert batch.scale[i] == np.float32(SCALE * moved["factor"])


def _same_batches(a: list[Batch], b: list[Batch]) -> bool:
    return len(a) == len(b) and all(
        torch.equal(x.images, y.images) and torch.equal(x.image_ids, y.image_ids) and torch.equal(x.pad, y.pad)
        and all(torch.equal(s[k], t[k]) for s, t in zip(x.targets, y.targets) for k in s) for x, y in zip(a, b))


@pytest.mark.parametrize("until, epochs", [(2, None), (0.5, 4)])
def test_strong_augmentations_stop_at_data_strong_aug_until(ray_session, shard_dir, until, epochs):
    plain = DataConfig(size=(160, 90), hflip=0.5, color_jitter=0.2, shuffle_buffer=8)
    strong = DataConfig(size=(160, 90), hflip=0.5, color_jitter=0.2, shuffle_buffer=8, mosaic=0.8, mixup=0.3,
                        zoom=[0.6, 1.4], strong_aug_until=until)

    def batches(cfg, epoch):
        return list(iter_train_batches(shards(shard_dir), 5, cfg, seed=2, epoch=epoch, epochs=epochs))

    for epoch in (1, 2):
        a, b = batches(plain, epoch), batches(strong, epoch)
        assert [x.image_ids.tolist() for x in a] == [x.image_ids.tolist() for x in b]  # the same rows
        assert _same_batches(a, b) == (epoch >= 2)


def test_strong_augmentations_keep_the_epoch_rows_and_the_batch_shape(ray_session, shard_dir):
    sizes = [(128, 72), (160, 90), (320, 180)]
    cfg = DataConfig(size=(160, 90), multiscale=sizes, hflip=0.5, color_jitter=0.4, shuffle_buffer=8, mosaic=1.0,
                     mixup=0.5, zoom=[0.5, 1.5])
    batches = list(iter_train_batches(shards(shard_dir), 4, cfg, seed=0, epoch=0))
    plain = DataConfig(size=(160, 90), multiscale=sizes, hflip=0.5, color_jitter=0.4, shuffle_buffer=8)
    rows = [b.image_ids.tolist() for b in iter_train_batches(shards(shard_dir), 4, plain, seed=0, epoch=0)]
    assert [b.image_ids.tolist() for b in batches] == rows  # every row once, in the same batches
    more = 0
    for batch in batches:
        _check_batch_types(batch)
        h, w = batch.images.shape[2:]
        assert len(batch) == 4 and (w, h) in sizes
        for target, image_id in zip(batch.targets, batch.image_ids.tolist()):
            boxes = target["boxes"]
            assert (boxes[:, 2] - boxes[:, 0] >= 1).all() and (boxes[:, 3] - boxes[:, 1] >= 1).all()
            assert (boxes[:, :2] >= 0).all() and (boxes[:, 2] <= w).all() and (boxes[:, 3] <= h).all()
            more += len(boxes) > _num_boxes(image_id)  # tiles of other rows bring their boxes
    assert more > 0


def _epoch_ids(shard_set, cfg, seed, epoch, batch_size=4, rank=0, world_size=1) -> list[int]:
    return [i for b in iter_train_batches(shard_set, batch_size, cfg, seed=seed, epoch=epoch, rank=rank,
                                          world_size=world_size) for i in b.image_ids.tolist()]


def test_train_order_is_deterministic_per_seed_and_changes_per_epoch(ray_session, shard_dir):
    cfg = DataConfig(size=(160, 90), hflip=0.5, color_jitter=0.0, shuffle_buffer=8)
    a0, a1 = _epoch_ids(shards(shard_dir), cfg, 3, 0), _epoch_ids(shards(shard_dir), cfg, 3, 1)
    b1, b0 = _epoch_ids(shards(shard_dir), cfg, 3, 1), _epoch_ids(shards(shard_dir), cfg, 3, 0)  # other order
    assert a0 == b0 and a1 == b1
    assert a0 != a1
    assert a0 != list(range(len(a0)))  # actually shuffled
    assert _epoch_ids(shards(shard_dir), cfg, 4, 0) != a0


def test_ranks_split_the_epoch_into_equal_disjoint_parts(ray_session, tmp_path):
    # 31 images in shards of 3 over 2 ranks: 15 each (one dropped), disjoint, the same on every call.
    order_dir = tmp_path / "order"
    _write_shard_dir(order_dir, [_row(i) for i in range(31)], rows_per_shard=3)
    cfg = DataConfig(size=(160, 90), hflip=0.0, color_jitter=0.0, shuffle_buffer=4)
    parts = [_epoch_ids(shards(order_dir), cfg, 5, 2, batch_size=5, rank=r, world_size=2) for r in range(2)]
    assert [len(p) for p in parts] == [15, 15] and not set(parts[0]) & set(parts[1])
    assert parts[1] == _epoch_ids(shards(order_dir), cfg, 5, 2, batch_size=5, rank=1, world_size=2)


def test_epoch_plan_is_a_function_of_seed_epoch_rank_and_manifest_only():
    shard_set = ShardSet("d", tuple((f"d/shard-{k}.parquet", 10) for k in range(3)), [], (160, 90))
    plans = {(epoch, rank): epoch_plan(shard_set, epoch=epoch, rank=rank, world_size=2, seed=7, equal=True,
                                       rows_per_task=4)
             for epoch in range(3) for rank in range(2)}
    assert plans == {(epoch, rank): epoch_plan(shard_set, epoch=epoch, rank=rank, world_size=2, seed=7, equal=True,
                                               rows_per_task=4) for epoch in range(3) for rank in range(2)}

    def rows(plan):
        return [(c["path"], r) for c in plan for r in range(c["start"], c["stop"])]

    for epoch in range(3):
        mine, theirs = rows(plans[epoch, 0]), rows(plans[epoch, 1])
        assert len(mine) == len(theirs) == 15 and not set(mine) & set(theirs)
        assert all(c["stop"] - c["start"] <= 4 for c in plans[epoch, 0])
    assert rows(plans[0, 0]) != rows(plans[1, 0])  # reshuffled every epoch, whole files mixed across ranks
    # Evaluation: manifest order, every row exactly once, also when the count does not divide.
    evaluation = [rows(epoch_plan(shard_set, epoch=0, rank=r, world_size=4, seed=None, equal=False)) for r in range(4)]
    assert sum(evaluation, []) == [(f"d/shard-{k}.parquet", r) for k in range(3) for r in range(10)]
    # max_rows: a fixed subset (the first rows in manifest order), shuffled within itself.
    subset = rows(epoch_plan(shard_set, epoch=1, rank=0, world_size=1, seed=7, equal=True, max_rows=12))
    assert sorted(subset) == [("d/shard-0.parquet", r) for r in range(10)] + [("d/shard-1.parquet", 0),
                                                                             ("d/shard-1.parquet", 1)]


def test_max_images_keeps_the_same_subset_every_epoch(ray_session, shard_dir):
    cfg = DataConfig(size=(160, 90), hflip=0.0, color_jitter=0.0, shuffle_buffer=4, max_train_images=12)
    e0, e1 = _epoch_ids(shards(shard_dir), cfg, 0, 0), _epoch_ids(shards(shard_dir), cfg, 0, 1)
    assert len(e0) == len(e1) == 12
    assert sorted(e0) == sorted(e1) == list(range(12))


def test_shards_stream_from_object_storage(ray_session, shard_dir, s3_bucket):
    remote = f"{s3_bucket}/shards"
    for entry in storage.list_dir(str(shard_dir)):
        storage.write_bytes(storage.join(remote, entry.name), storage.read_bytes(entry.path))
    cfg = DataConfig(size=(160, 90), hflip=0.5, color_jitter=0.2, shuffle_buffer=8)
    assert _epoch_ids(shards(remote), cfg, 0, 1) == _epoch_ids(shards(shard_dir), cfg, 0, 1)
    assert [i for b in iter_eval_batches(shards(remote), 7) for i in b.image_ids.tolist()] == list(range(NUM_IMAGES))


def test_batch_to_moves_every_tensor(ray_session, shard_dir):
    batch = next(iter_eval_batches(shards(shard_dir), 3))
    moved = batch.to(torch.device("cpu"), non_blocking=True)
    assert len(moved) == 3 and torch.equal(moved.images, batch.images)
    assert moved.targets[2]["boxes"].shape == batch.targets[2]["boxes"].shape


# ----------------------------------------------------------------------------------------------------
# End to end on shards written by `neoray prepare`
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_synthetic_shards_stream_end_to_end(ray_session, synthetic_shards):
    from neoray.data.geometry import xywh_to_xyxy
    from neoray.data.shards import read_manifest

    root = synthetic_shards["root"]
    coco = json.loads((root / "annotations" / "instances_val.json").read_text())
    source = {img["id"]: [] for img in coco["images"]}
    for ann in coco["annotations"]:
        source[ann["image_id"]].append(ann["bbox"])
    seen = []
    for batch in iter_eval_batches(shards(synthetic_shards["val"]), 3, DataConfig(size=(320, 180))):
        _check_batch_types(batch)
        for i, image_id in enumerate(batch.image_ids.tolist()):
            seen.append(image_id)
            expected = xywh_to_xyxy(source[image_id]) if source[image_id] else np.zeros((0, 4))
            got = _to_orig(batch, i)
            assert got.shape == expected.shape
            np.testing.assert_allclose(np.sort(got, axis=0), np.sort(expected, axis=0), atol=0.05)
    assert sorted(seen) == sorted(source)

    cfg = DataConfig(size=(160, 90), multiscale=[(160, 90), (320, 180)], hflip=0.5, color_jitter=0.4)
    train_ids = _epoch_ids(shards(synthetic_shards["train"]), cfg, 0, 0)
    assert len(train_ids) == len(set(train_ids)) == read_manifest(synthetic_shards["train"])["num_images"] // 4 * 4
