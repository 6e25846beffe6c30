"""What data.decode: gpu does for the device it runs on (neoray.data.tensor_augment), checked on the CPU:

- a batch uploads no lookup table once the first batch of its sizes has run (each upload from pageable
  memory waits for the CUDA stream; a batch used to make about 30);
- the tables made on the device are exactly the numpy tables the CPU path's kernels were matched with;
- a CUDA decode waits for the caller's stream first (torchvision's CUDA decode_jpeg writes its outputs
  from nvJPEG's own stream, which does not wait for work queued on the caller's).
"""

from __future__ import annotations

import numpy as np
import torch

from neoray.data import tensor_augment as T
from neoray.data.draws import BatchDraw, ColorDraw


def _images(count: int = 3, width: int = 320, height: int = 180) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (count, 3, height, width), dtype=torch.uint8, generator=generator)


def _draw(size: tuple[int, int], seed: int) -> BatchDraw:
    rng = np.random.default_rng(seed)
    colors = tuple(ColorDraw(*(float(v) for v in rng.uniform(0.6, 1.4, 3)), float(rng.uniform(-0.05, 0.05)),
                             tuple(int(i) for i in rng.permutation(4))) for _ in range(3))
    return BatchDraw(size, (True, False, True), colors)


def test_a_batch_uploads_no_lookup_table_once_its_sizes_have_been_seen(monkeypatch):
    images = _images()
    for size in ((256, 144), (384, 216)):  # area shrink and bilinear growth
        T.apply_draw(images, _draw(size, seed=0))
    uploads = []
    for name in ("from_numpy", "tensor", "as_tensor"):
        original = getattr(torch, name)
        monkeypatch.setattr(torch, name, lambda *a, _name=name, _original=original, **k: (uploads.append(_name),
                                                                                           _original(*a, **k))[1])
    for seed, size in enumerate(((256, 144), (384, 216)), start=1):  # other flips and colour factors
        T.apply_draw(images, _draw(size, seed=seed))
    assert uploads == []


def test_tables_made_on_the_device_equal_the_numpy_tables():
    rng = np.random.default_rng(0)
    device = torch.device("cpu")
    for factor in rng.uniform(0.0, 2.0, 500).tolist() + [0.5, 1.5, 255 / 254]:
        expected = np.clip(np.arange(256, dtype=np.float32) * np.float32(factor), 0, 255).astype(np.uint8)
        np.testing.assert_array_equal(T._brightness_table(factor, device).numpy(), expected)
    for factor in rng.uniform(-0.5, 0.5, 500).tolist() + [-0.5, 0.5, 1 / 180, -1 / 180, -1e-17]:
        expected = np.mod(np.arange(0, 256, dtype=np.int16) + 180 * factor, 180).astype(np.uint8)
        np.testing.assert_array_equal(T._hue_table(factor, device).numpy(), expected)


def test_a_cuda_decode_waits_for_the_callers_stream_first(monkeypatch):
    events = []

    class Stream:
        def synchronize(self):
            events.append("synchronize")

    def decode(inputs, mode, device):
        events.append(f"decode on {device}")
        return [torch.zeros(3, 2, 2, dtype=torch.uint8) for _ in inputs]

    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: Stream())
    monkeypatch.setattr(T, "decode_jpeg", decode)
    T.decode_jpegs([b"\xff\xd8 one", b"\xff\xd8 two"], "cuda")
    assert events == ["synchronize", "decode on cuda"]
    events.clear()
    T.decode_jpegs([b"\xff\xd8 one"], "cpu")
    assert events == ["decode on cpu"]
