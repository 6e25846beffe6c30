"""data.decode: gpu against data.decode: cpu: the tensor-op path (neoray.data.tensor_augment) gives the batches
of the albumentations/OpenCV path up to rounding.

The GPU path's code runs here on the CPU (torchvision's CPU JPEG decoder, the same tensor ops on CPU tensors):
no GPU is needed to hold it to the CPU path. On CUDA the decoder is nvJPEG, whose IDCT rounds differently by
a level or two; the augmentation kernels are the same code.

Tolerance (stated once, used by every pixel comparison below): per kernel, at most 1 level on any pixel
(OpenCV's SIMD loops and their scalar tails round differently, and the tails' width depends on the CPU's
vector width: a row whose width is not a multiple of 64 pixels has a rounded, not truncated, tail after
HSV->RGB on an AVX-512 machine); for whole augmented batches, at most ``MAX_LEVELS`` levels on any pixel
(a 1-level difference before a hue shift can move a pixel's 8-bit hue by one step, a few levels of RGB)
and a mean absolute difference under ``MEAN_LEVELS`` levels. Boxes, labels, iscrowd, areas, ids, scale
and pad: identical.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from albumentations.augmentations.pixel import functional as fpixel

from neoray import storage
from neoray.config import DataConfig
from neoray.data import tensor_augment as T
from neoray.data.augment import apply_draw, augment_images
from neoray.data.draws import BatchDraw, ColorDraw, Layout, Piece, draw_batch, strong_augment
from neoray.data.shards import FORMAT, MANIFEST_NAME, VERSION, shard_name, write_shard
from neoray.data.stream import ShardSet, iter_eval_batches, iter_train_batches

MAX_LEVELS = 8
MEAN_LEVELS = 0.25
W, H = 320, 180


def _picture(seed: int, w: int = W, h: int = H) -> np.ndarray:
    """A photo-like RGB image: smooth colour fields with edges (filled shapes), some texture."""
    rng = np.random.default_rng(seed)
    image = cv2.GaussianBlur(rng.integers(0, 256, (h, w, 3), dtype=np.uint8), (0, 0), 6)
    image = cv2.normalize(image, None, 0, 255, cv2.NORM_MINMAX)
    for _ in range(6):
        color = tuple(int(c) for c in rng.integers(0, 256, 3))
        x, y = int(rng.integers(0, w - 20)), int(rng.integers(0, h - 20))
        cv2.rectangle(image, (x, y), (x + int(rng.integers(8, 80)), y + int(rng.integers(8, 60))), color, -1)
    noise = rng.normal(0, 4, image.shape)
    return np.clip(image + noise, 0, 255).astype(np.uint8)


def _levels(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.abs(a.astype(np.int32) - b.astype(np.int32))


def _chw(image: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1)))


def _hwc(tensor: torch.Tensor) -> np.ndarray:
    return tensor.permute(1, 2, 0).numpy()


# ----------------------------------------------------------------------------------------------------
# Kernel by kernel
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("target", [(256, 144), (288, 162), (160, 90), (96, 54), (480, 270), (640, 360)])
def test_resize_matches_opencv(target):
    image = _picture(1)
    interpolation = cv2.INTER_AREA if target[0] < W else cv2.INTER_LINEAR
    expected = cv2.resize(image, target, interpolation=interpolation)
    got = _hwc(T.resize_images(_chw(image)[None], target)[0])
    diff = _levels(got, expected)
    assert got.shape == expected.shape and diff.max() <= 1 and diff.mean() < 0.01


def test_resize_of_any_crop_matches_opencv():
    # A layout's piece resizes a crop of any width and height (draws.piece_window), up or down.
    image, rng = _picture(9), np.random.default_rng(9)
    for _ in range(12):
        w, h = int(rng.integers(5, W)), int(rng.integers(5, H))
        x, y = int(rng.integers(0, W - w + 1)), int(rng.integers(0, H - h + 1))
        ratio = float(rng.choice([0.3, 0.55, 0.8, 1.25, 1.7]))
        target = (max(1, round(w * ratio)), max(1, round(h * ratio)))
        crop = np.ascontiguousarray(image[y:y + h, x:x + w])
        expected = cv2.resize(crop, target, interpolation=cv2.INTER_AREA if ratio < 1 else cv2.INTER_LINEAR)
        got = _hwc(T.resize_images(_chw(crop)[None], target)[0])
        assert got.shape == expected.shape and _levels(got, expected).max() <= 1, (w, h, target)


@pytest.mark.parametrize("factor", [0.62, 0.93, 1.08, 1.4])
def test_brightness_contrast_saturation_match_albumentations(factor):
    image = _picture(2)
    tensor = _chw(image)
    for ours, theirs in ((T._brightness, fpixel.adjust_brightness_torchvision),
                         (T._contrast, fpixel.adjust_contrast_torchvision),
                         (T._saturation, fpixel.adjust_saturation_torchvision)):
        diff = _levels(_hwc(ours(tensor, factor)), theirs(image, factor))
        assert diff.max() <= 1 and diff.mean() < 0.01, (ours.__name__, diff.max(), diff.mean())


@pytest.mark.parametrize("factor", [-0.05, -0.013, 0.004, 0.031, 0.05])
def test_hue_matches_albumentations(factor):
    image = _picture(3)
    diff = _levels(_hwc(T._hue(_chw(image), factor)), fpixel.adjust_hue_torchvision(image.copy(), factor))
    assert diff.max() <= 1 and diff.mean() < 0.01


def test_jpeg_decoders_agree_and_a_bad_jpeg_names_its_record():
    jpegs = [cv2.imencode(".jpg", _picture(seed)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, q])[1].tobytes()
             for seed, q in ((4, 90), (5, 75))]
    decoded = T.decode_jpegs(jpegs, "cpu")
    for data, tensor in zip(jpegs, decoded):
        expected = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR_RGB)
        assert _levels(_hwc(tensor), expected).max() <= 1
    with pytest.raises(ValueError, match=r"shard-7\.parquet: image_id 9: field 'image': not a decodable JPEG"):
        T.decode_jpegs([jpegs[0], b"not a jpeg"], "cpu", ["a", "shard-7.parquet: image_id 9"])


def test_one_draw_applied_both_ways():
    images = [_picture(seed) for seed in range(6)]
    draw = BatchDraw((256, 144), (True, False, True, False, True, False), (
        ColorDraw(1.3, 0.7, 1.2, 0.04, (0, 1, 2, 3)), ColorDraw(0.8, 1.3, 0.6, -0.05, (3, 2, 1, 0)),
        ColorDraw(1.0, 1.0, 1.0, 0.0, (1, 3, 0, 2)), None, ColorDraw(0.65, 1.35, 1.4, 0.02, (2, 0, 3, 1)),
        ColorDraw(1.4, 1.1, 0.9, -0.01, (3, 0, 2, 1))))
    expected = np.stack([apply_draw(image, draw.size, flip, color)
                         for image, flip, color in zip(images, draw.flips, draw.colors)])
    got = T.apply_draw(torch.stack([_chw(image) for image in images]), draw).permute(0, 2, 3, 1).numpy()
    diff = _levels(got, expected)
    assert got.shape == expected.shape and diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS


def test_layouts_applied_both_ways():
    # Every kind of piece: zoomed in (a window of a 400x225 image), zoomed out onto grey (160x90 at (37, 50)),
    # mosaic tiles at the batch's size and enlarged, a mixup layer, a piece hanging off every edge.
    images = [_picture(seed) for seed in range(4)]
    size = (256, 144)
    layouts = (
        Layout((Piece(0, (400, 225), (-61, -40)),), (Piece(2, size, (0, 0)),), 97),
        Layout((Piece(1, (160, 90), (37, 50)),)),
        Layout(tuple(Piece(j, size, corner) for j, corner in zip((2, 3, 0, 1), ((-150, -60), (106, -60), (-150, 84),
                                                                             (106, 84))))),
        Layout(tuple(Piece(j, (352, 198), corner) for j, corner in zip((3, 0, 1, 2), ((-300, -190), (52, -190),
                                                                                   (-300, 8), (52, 8)))),
               (Piece(0, (96, 54), (200, 100)),), 160),
    )
    draw = BatchDraw(size, (True, False, False, True), (
        ColorDraw(1.3, 0.7, 1.2, 0.04, (0, 1, 2, 3)), None, ColorDraw(0.8, 1.3, 0.6, -0.05, (3, 2, 1, 0)),
        ColorDraw(1.1, 0.9, 1.2, 0.01, (2, 0, 3, 1))), layouts)
    expected = np.stack(list(augment_images(images, draw)))
    got = T.apply_draw(torch.stack([_chw(image) for image in images]), draw).permute(0, 2, 3, 1).numpy()
    diff = _levels(got, expected)
    assert got.shape == expected.shape == (4, 144, 256, 3)
    assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS
    # Without colour jitter only the resize kernels' rounding is left: at most 1 level, and the grey is exact.
    plain = BatchDraw(size, draw.flips, (None,) * 4, layouts)
    expected = np.stack(list(augment_images(images, plain)))
    got = T.apply_draw(torch.stack([_chw(image) for image in images]), plain).permute(0, 2, 3, 1).numpy()
    assert _levels(got, expected).max() <= 1 and (got[1, :50] == 114).all() and (expected[1, :50] == 114).all()


def test_drawn_strong_batches_applied_both_ways():
    # No colour jitter: the layouts must add nothing to the resize kernels' rounding (1 level). The jitter
    # after them is the same code as without layouts (the kernel tests above).
    strong = strong_augment(DataConfig(mosaic=0.5, mixup=0.5, zoom=[0.5, 1.5]), 0)
    images = [_picture(seed) for seed in range(10, 16)]
    for seed in range(3):
        draw = draw_batch([(256, 144), (W, H), (480, 270)], 0.5, 0.0, 6, np.random.default_rng(seed), strong)
        expected = np.stack(list(augment_images(images, draw)))
        got = T.apply_draw(torch.stack([_chw(image) for image in images]), draw).permute(0, 2, 3, 1).numpy()
        diff = _levels(got, expected)
        assert got.shape == expected.shape and diff.max() <= 1 and diff.mean() < 0.01


def test_the_device_path_needs_neither_albumentations_nor_ray():
    # Layouts included: a worker's device path must run where albumentations and Ray are not importable.
    code = """
import sys
sys.modules["albumentations"] = sys.modules["ray"] = None
import torch
from neoray.data import tensor_augment as T
from neoray.data.draws import BatchDraw, Layout, Piece
images = torch.zeros((2, 3, 36, 64), dtype=torch.uint8)
draw = BatchDraw((64, 36), (True, False), (None, None), (Layout((Piece(1, (32, 18), (5, 6)),), (Piece(0, (96, 54),
                                                                                     (-8, -9)),), 100),
                                                          Layout((Piece(0, (64, 36), (0, 0)),))))
assert T.apply_draw(images, draw).shape == (2, 3, 36, 64)
"""
    root = str(Path(T.__file__).resolve().parents[2])  # the checkout this test imports neoray from
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": root})


def test_the_caller_tensor_is_not_modified():
    images = torch.stack([_chw(_picture(7)), _chw(_picture(8))])
    before = images.clone()
    draw = draw_batch([(W, H)], 1.0, 0.4, 2, np.random.default_rng(0))  # no resize: edits would be in place
    T.apply_draw(images, draw)
    assert torch.equal(images, before)


# ----------------------------------------------------------------------------------------------------
# Whole streams: data.decode cpu vs gpu (its code on the CPU)
# ----------------------------------------------------------------------------------------------------

NUM_IMAGES = 24


def _row(image_id: int) -> dict:
    rng = np.random.default_rng(100 + image_id)
    n = int(rng.integers(0, 6))
    x1, y1 = rng.uniform(0, W - 40, n), rng.uniform(0, H - 30, n)
    # Some boxes under 2 px wide: they drop below 1 px when shrunk, on both paths alike.
    w, h = rng.choice([1.5, 5.0, 30.0], n), rng.uniform(1.2, 25, n)
    boxes = np.stack([x1, y1, x1 + w, y1 + h], axis=1).astype(np.float32).reshape(-1, 4)
    jpeg = cv2.imencode(".jpg", _picture(image_id)[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])[1].tobytes()
    return {"image_id": image_id, "file_name": f"{image_id}.jpg", "image": jpeg, "width": W, "height": H,
            "orig_width": 2 * W, "orig_height": 2 * H, "scale": 0.5, "pad_x": 0.0, "pad_y": 0.0,
            "boxes": boxes.tolist(), "labels": list(range(n)), "iscrowd": [k == 1 for k in range(n)],
            "areas": [float(10 * (k + 1)) for k in range(n)], "ann_ids": list(range(n))}


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("tensor") / "shards"
    out.mkdir()
    rows = [_row(i) for i in range(NUM_IMAGES)]
    entries = []
    for index, start in enumerate(range(0, NUM_IMAGES, 10)):
        write_shard(rows[start:start + 10], out / shard_name(index))
        entries.append({"file": shard_name(index), "rows": len(rows[start:start + 10]),
                        "sha256": storage.sha256(out / shard_name(index))})
    (out / MANIFEST_NAME).write_text(json.dumps({
        "format": FORMAT, "version": VERSION, "size": [W, H],
        "categories": [{"id": k + 1, "name": f"c{k}", "label": k} for k in range(6)],
        "num_images": NUM_IMAGES, "num_boxes": sum(len(r["boxes"]) for r in rows), "shards": entries,
        "options": {}, "skipped": {"images": {}, "annotations": {}}, "counts": {}}))
    return ShardSet.open(str(out))


def _assert_same_batch(a, b) -> None:
    assert torch.equal(a.image_ids, b.image_ids)
    assert torch.equal(a.scale, b.scale) and torch.equal(a.pad, b.pad) and torch.equal(a.orig_sizes, b.orig_sizes)
    for ta, tb in zip(a.targets, b.targets):
        assert ta.keys() == tb.keys() and all(torch.equal(ta[k], tb[k]) for k in ta)
    assert a.images.shape == b.images.shape and a.images.dtype == b.images.dtype == torch.uint8
    diff = _levels(a.images.numpy(), b.images.numpy())
    assert diff.max() <= MAX_LEVELS and diff.mean() < MEAN_LEVELS, (diff.max(), diff.mean())


def test_train_batches_match_between_cpu_and_gpu_decode(ray_session, shard_dir):
    sizes = [(256, 144), (W, H), (480, 270), (160, 90)]
    common = dict(size=(W, H), multiscale=sizes, hflip=0.5, color_jitter=0.4, shuffle_buffer=8)
    cpu, gpu = DataConfig(**common, decode="cpu"), DataConfig(**common, decode="gpu")
    seen_sizes, dropped_somewhere = set(), False
    for epoch in range(2):
        a = list(iter_train_batches(shard_dir, 4, cpu, seed=3, epoch=epoch))
        b = list(iter_train_batches(shard_dir, 4, gpu, seed=3, epoch=epoch, device="cpu"))
        assert len(a) == len(b) == NUM_IMAGES // 4
        for batch_a, batch_b in zip(a, b):
            _assert_same_batch(batch_a, batch_b)
            seen_sizes.add(tuple(batch_a.images.shape[2:]))
            dropped_somewhere |= any(len(t["labels"]) < len(_row(i)["labels"])
                                     for t, i in zip(batch_a.targets, batch_a.image_ids.tolist()))
    assert len(seen_sizes) >= 3 and dropped_somewhere  # shrink, grow and keep; sub-pixel boxes dropped


def test_strong_train_batches_match_between_cpu_and_gpu_decode(ray_session, shard_dir):
    # No colour jitter (as above): what is left is a level of the decoders and a level of the resize kernels.
    common = dict(size=(W, H), multiscale=[(256, 144), (W, H), (480, 270)], hflip=0.5, color_jitter=0.0,
                  shuffle_buffer=8, mosaic=0.6, mixup=0.4, zoom=[0.5, 1.5])
    cpu, gpu = DataConfig(**common, decode="cpu"), DataConfig(**common, decode="gpu")
    a = list(iter_train_batches(shard_dir, 4, cpu, seed=5, epoch=0))
    b = list(iter_train_batches(shard_dir, 4, gpu, seed=5, epoch=0, device="cpu"))
    assert len(a) == len(b) == NUM_IMAGES // 4
    for batch_a, batch_b in zip(a, b):
        _assert_same_batch(batch_a, batch_b)
        assert _levels(batch_a.images.numpy(), batch_b.images.numpy()).max() <= 2
    # Mosaic and mixup outputs carry boxes of other rows: more boxes than the anchor rows had, somewhere.
    assert any(len(t["labels"]) > len(_row(i)["labels"]) for batch in a
               for t, i in zip(batch.targets, batch.image_ids.tolist()))


def test_eval_batches_match_between_cpu_and_gpu_decode(ray_session, shard_dir):
    for size in (None, (256, 144), (480, 270)):
        size = size or shard_dir.size  # the shards' own size: no resize
        a = list(iter_eval_batches(shard_dir, 5, DataConfig(size=size)))
        b = list(iter_eval_batches(shard_dir, 5, DataConfig(size=size, decode="gpu"), device="cpu"))
        assert [len(x) for x in a] == [len(x) for x in b] == [5, 5, 5, 5, 4]
        for batch_a, batch_b in zip(a, b):
            _assert_same_batch(batch_a, batch_b)


@pytest.mark.parametrize("decode", ["cpu", "gpu"])
def test_a_bad_jpeg_in_training_names_file_record_and_field(ray_session, shard_dir, tmp_path, decode):
    bad = tmp_path / "bad"
    bad.mkdir()
    rows = [_row(0), {**_row(1), "image": b"not a jpeg"}, _row(2), _row(3)]
    write_shard(rows, bad / shard_name(0))
    manifest = json.loads((Path(shard_dir.directory) / MANIFEST_NAME).read_text())
    manifest.update(num_images=4, shards=[{"file": shard_name(0), "rows": 4,
                                           "sha256": storage.sha256(bad / shard_name(0))}])
    (bad / MANIFEST_NAME).write_text(json.dumps(manifest))
    cfg = DataConfig(size=(W, H), decode=decode, shuffle_buffer=0)
    with pytest.raises(Exception, match=r"shard-00000\.parquet: image_id 1: field 'image': not a decodable JPEG"):
        list(iter_train_batches(ShardSet.open(str(bad)), 4, cfg, seed=0, epoch=0, device="cpu"))


def test_data_decode_is_cpu_or_gpu():
    from neoray.config import ConfigError, from_dict

    assert from_dict({}).data.decode == "cpu"
    assert from_dict({"data": {"decode": "gpu"}}).data.decode == "gpu"
    with pytest.raises(ConfigError, match="data.decode must be cpu or gpu, got 'nvjpeg'"):
        from_dict({"data": {"decode": "nvjpeg"}})
