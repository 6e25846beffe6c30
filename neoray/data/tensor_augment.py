"""JPEG decoding and the training augmentation as tensor ops on any torch device (``data.decode: gpu``).

With ``data.decode: gpu`` the stream hands JPEG bytes to the training worker, which decodes a whole batch
on its own GPU (torchvision's ``decode_jpeg`` with ``device="cuda"``: nvJPEG) and applies the batch's
``BatchDraw`` (neoray.data.draws) here: the 16:9 multi-scale resize (or, with strong augmentations, each
output's layout: mosaic, mixup, zoom), the horizontal flip and the colour jitter. The same code runs on
the CPU (``device="cpu"``: libjpeg-turbo through torchvision), which is how the tests hold it to the CPU
path without a GPU.

Every kernel reproduces what the CPU path computes with albumentations and OpenCV on uint8 images, so
the two paths give the same batch up to rounding (tests/test_tensor_augment.py states the tolerance):

* resize: OpenCV's INTER_AREA (float area weights; integer factors average whole blocks) to shrink and
  INTER_LINEAR (11-bit fixed-point weights, the SIMD path's rounding) to grow, as separable taps;
* layouts: each piece resized by the kernels above and pasted by slicing, mixup blended in the same
  integers as the CPU path (exact);
* flip: a mirror in x;
* ColorJitter (albumentations' torchvision-style functions): brightness and contrast as the same float32
  lookup tables (contrast around the mean of OpenCV's fixed-point grey), saturation as OpenCV's
  ``addWeighted`` with the grey image (one rounding, as its fused multiply-add), hue through OpenCV's
  8-bit HSV (integer RGB->HSV, a lookup table on H, float HSV->RGB truncated as its SIMD path).

Boxes never come here: both paths transform them with the same numpy code (draws.batch_targets).
"""

from __future__ import annotations

from functools import lru_cache

import numpy as np
import torch
from torchvision.io import ImageReadMode, decode_jpeg

from neoray.data.draws import FILL, MIX_UNIT, BatchDraw, ColorDraw, Piece, piece_window, visible_rect

# OpenCV's RGB -> grey for 8-bit images: (9798 R + 19235 G + 3735 B + 2^14) >> 15.
_GREY = (9798, 19235, 3735)
_HSV_SHIFT = 12


def decode_jpegs(jpegs: list[bytes], device: torch.device | str, where: list[str] | None = None) -> list[torch.Tensor]:
    """JPEG bytes -> uint8 (3, H, W) RGB tensors on ``device``, decoded as one batch (nvJPEG on CUDA).
    A JPEG that does not decode is an error naming its record (``where``)."""
    device = torch.device(device)
    if device.type == "cuda":
        # torchvision's CUDA decode allocates its outputs on this stream but nvJPEG writes them from its own
        # stream, without waiting: memory just freed here may still be read by queued kernels. Let them finish.
        torch.cuda.current_stream(device).synchronize()
    sizes = [len(data) for data in jpegs]
    flat = torch.empty(sum(sizes), dtype=torch.uint8)  # one host buffer: one allocation, no read-only views
    view, offset, inputs = flat.numpy(), 0, []
    for data, size in zip(jpegs, sizes):
        view[offset:offset + size] = np.frombuffer(data, np.uint8)
        inputs.append(flat[offset:offset + size])
        offset += size
    try:
        return decode_jpeg(inputs, mode=ImageReadMode.RGB, device=device)
    except RuntimeError:
        for i, data in enumerate(inputs):  # find the record to name (a batch decode fails as a whole)
            try:
                decode_jpeg(data, mode=ImageReadMode.RGB)
            except RuntimeError:
                label = where[i] if where else f"image {i}"
                raise ValueError(f"{label}: field 'image': not a decodable JPEG ({sizes[i]} bytes)") from None
        raise


# ----------------------------------------------------------------------------------------------------
# Resize (OpenCV's kernels as separable taps)
# ----------------------------------------------------------------------------------------------------


# Both tables are computed for every (source, destination) length a piece's crop has: with numpy, not a
# Python loop per pixel, so that a batch of mosaics does not spend its time here.
@lru_cache(maxsize=1024)
def _area_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_AREA weights along one axis (``computeResizeAreaTab``): (index, weight) arrays of
    shape (K, dst), taps in OpenCV's summation order (the partial first cell, the whole ones, the partial
    last); unused taps have weight 0."""
    scale = 1.0 / (dst / src)
    fsx1 = np.arange(dst, dtype=np.float64) * scale
    fsx2 = fsx1 + scale
    cell = np.minimum(scale, src - fsx1)
    sx2 = np.minimum(np.floor(fsx2).astype(np.int64), src - 1)
    sx1 = np.minimum(np.ceil(fsx1).astype(np.int64), sx2)
    head, tail, whole = (sx1 - fsx1 > 1e-3), (fsx2 - sx2 > 1e-3), sx2 - sx1
    k = int((head + whole + tail).max())
    j = np.arange(k)[:, None] - head  # the tap's place among the whole cells
    inner = (j >= 0) & (j < whole)
    index = np.where(inner, sx1 + j, 0)
    weight = np.where(inner, 1.0 / cell, 0.0)
    first, last = (j == -1) & head, (j == whole) & tail
    index = np.where(first, sx1 - 1, np.where(last, sx2, index))
    weight = np.where(first, (sx1 - fsx1) / cell, weight)
    weight = np.where(last, np.minimum(np.minimum(fsx2 - sx2, 1.0), cell) / cell, weight)
    return index.astype(np.int64), weight.astype(np.float32)


@lru_cache(maxsize=1024)
def _linear_taps(src: int, dst: int) -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's INTER_LINEAR weights along one axis for uint8: source indices (2, dst) and 11-bit fixed
    point weights (2, dst), edges clamped as OpenCV does."""
    scale = 1.0 / (dst / src)
    fx = ((np.arange(dst) + 0.5) * scale - 0.5).astype(np.float32)
    sx = np.floor(fx).astype(np.int64)
    fx = fx - sx.astype(np.float32)
    clamped = (sx < 0) | (sx >= src - 1)
    fx = np.where(clamped, np.float32(0), fx)
    sx = np.clip(sx, 0, src - 1)
    index = np.stack([sx, np.minimum(sx + 1, src - 1)])
    weight = np.stack([np.rint((np.float32(1) - fx) * 2048), np.rint(fx * 2048)]).astype(np.int32)
    return index, weight


@lru_cache(maxsize=256)
def _on_device(make, args: tuple, device: torch.device) -> tuple[torch.Tensor, ...]:
    """The numpy arrays ``make(*args)`` returns (one or a tuple), uploaded to ``device`` once and kept there:
    an upload from pageable host memory waits for the stream, and a batch would make about 30 of them."""
    arrays = make(*args)
    arrays = arrays if isinstance(arrays, tuple) else (arrays,)
    return tuple(torch.from_numpy(array).to(device) for array in arrays)


def _area(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    (width, height), (_, _, src_h, src_w) = size, images.shape
    if src_w % width == 0 and src_h % height == 0 and src_w // width == src_h // height:
        k = src_w // width  # OpenCV averages whole k x k blocks (its "fast" area path)
        sums = images.view(*images.shape[:2], height, k, width, k).sum((3, 5), dtype=torch.int32)
        if k == 2:
            return ((sums + 2) >> 2).to(torch.uint8)  # its SIMD rounding for 2x2
        return torch.round(sums.float() * np.float32(1.0 / (k * k))).clamp_(0, 255).to(torch.uint8)
    x = images.float()
    for dim, (src, dst) in ((3, (src_w, width)), (2, (src_h, height))):
        index, weight = _on_device(_area_taps, (src, dst), x.device)
        shape = [1, 1, 1, 1]
        shape[dim] = dst
        acc = x.index_select(dim, index[0]) * weight[0].view(shape)
        for j in range(1, index.shape[0]):
            acc = acc + x.index_select(dim, index[j]) * weight[j].view(shape)
        x = acc
    return torch.round(x).clamp_(0, 255).to(torch.uint8)


def _linear(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    (width, height), (_, _, src_h, src_w) = size, images.shape
    x = images.to(torch.int32)
    index, weight = _on_device(_linear_taps, (src_w, width), x.device)
    rows = x.index_select(3, index[0]) * weight[0] + x.index_select(3, index[1]) * weight[1]
    index, weight = _on_device(_linear_taps, (src_h, height), x.device)
    top, bottom = rows.index_select(2, index[0]), rows.index_select(2, index[1])
    b0, b1 = weight[0].view(1, 1, -1, 1), weight[1].view(1, 1, -1, 1)
    # OpenCV's vertical pass (VResizeLinearVec_32s8u): 16-bit multiply-high of (row >> 4) by each weight,
    # then (sum + 2) >> 2.
    out = ((((top >> 4) * b0) >> 16) + (((bottom >> 4) * b1) >> 16) + 2) >> 2
    return out.clamp_(0, 255).to(torch.uint8)


def resize_images(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 (B, 3, H, W) -> (B, 3, H', W') with ``size`` = (W', H'): area averaging to shrink, bilinear to
    grow (what ``neoray.data.augment.resize_image`` and the CPU path do with OpenCV)."""
    width, height = size
    if (images.shape[3], images.shape[2]) == (width, height):
        return images
    return _area(images, size) if width < images.shape[3] else _linear(images, size)


# ----------------------------------------------------------------------------------------------------
# Colour jitter (albumentations' ColorJitter on uint8, op by op)
# ----------------------------------------------------------------------------------------------------


def _grey(image: torch.Tensor) -> torch.Tensor:
    r, g, b = image.to(torch.int32).unbind(0)
    return (r * _GREY[0] + g * _GREY[1] + b * _GREY[2] + (1 << 14)) >> 15


def _lookup(image: torch.Tensor, table: torch.Tensor) -> torch.Tensor:
    return table[image.long()]


def _brightness(image: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 0:
        return torch.zeros_like(image)
    if factor == 1:
        return image
    return _lookup(image, _brightness_table(factor, image.device))


def _brightness_table(factor: float, device: torch.device) -> torch.Tensor:
    """uint8 (256,): ``clip(i * float32(factor), 0, 255)`` truncated, as numpy computes it in float32; made on
    ``device`` (a product of two float32 values rounds to the same float32 in float32 or float64 arithmetic)."""
    table = torch.arange(256, dtype=torch.float32, device=device) * float(np.float32(factor))
    return table.clamp_(0, 255).to(torch.uint8)


def _contrast(image: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return image
    grey = _grey(image)
    mean = grey.sum(dtype=torch.int64).double() / grey.numel()  # exact integer sum, as numpy's mean
    if factor == 0:
        return torch.floor(mean + 0.5).to(torch.uint8).expand_as(image).clone()
    offset = (mean * (1 - factor)).float()
    table = torch.arange(256, dtype=torch.float32, device=image.device) * factor + offset
    return _lookup(image, table.clamp_(0, 255).to(torch.uint8))


def _saturation(image: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 1:
        return image
    grey = _grey(image).to(torch.uint8).expand_as(image)
    if factor == 0:
        return grey.clone()
    # cv2.addWeighted(image, a, grey, b, 0) on uint8: fma(image, a, fma(grey, b, 0)) in float32, rounded
    # to nearest even. The float64 sum is exact, so rounding it to float32 once is the outer fma.
    alpha, beta = np.float32(factor), np.float32(1 - factor)
    inner = grey.float() * beta
    outer = (image.double() * float(alpha) + inner.double()).float()
    return torch.round(outer).clamp_(0, 255).to(torch.uint8)


@lru_cache(maxsize=1)
def _hsv_tables() -> tuple[np.ndarray, np.ndarray]:
    """OpenCV's RGB2HSV_b division tables (hsv_shift 12, H range 180)."""
    i = np.arange(1, 256, dtype=np.float64)
    sdiv, hdiv = np.zeros(256, np.int32), np.zeros(256, np.int32)
    sdiv[1:] = np.rint((255 << _HSV_SHIFT) / i)
    hdiv[1:] = np.rint((180 << _HSV_SHIFT) / (6.0 * i))
    return sdiv, hdiv


def _rgb_to_hsv(image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sdiv, hdiv = _on_device(_hsv_tables, (), image.device)
    r, g, b = image.to(torch.int32).unbind(0)
    v = torch.maximum(torch.maximum(r, g), b)
    diff = v - torch.minimum(torch.minimum(r, g), b)
    half = 1 << (_HSV_SHIFT - 1)
    s = (diff * sdiv[v.long()] + half) >> _HSV_SHIFT
    h = torch.where(v == r, g - b, torch.where(v == g, b - r + 2 * diff, r - g + 4 * diff))
    h = (h * hdiv[diff.long()] + half) >> _HSV_SHIFT
    return torch.where(h < 0, h + 180, h), s, v


def _one_minus(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """1 - a * b rounded once to float32 (a fused multiply-add)."""
    return (1.0 - a.double() * b.double()).float()


def _hsv_to_rgb(h: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """OpenCV's HSV2RGB_b (its SIMD path): float32, sector from the truncated hue, channels truncated."""
    one = torch.ones((), dtype=torch.float32, device=h.device)
    hue = h.float() * np.float32(6.0 / 180)
    pre = torch.trunc(hue)
    hue = hue - pre
    s = s.float() * np.float32(1.0 / 255.0)
    v = v.float() * np.float32(1.0 / 255.0)
    # OpenCV's build fuses 1 - s * x into one fused multiply-add: emulated with the exact float64 product.
    tab = (v, v * (one - s), v * _one_minus(s, hue), v * _one_minus(s, one - hue))
    sector = pre - torch.trunc(pre * np.float32(1.0 / 6.0)) * 6
    # (r, g, b) = tab[SECTORS[sector]]; sector 0..5 as in OpenCV's sector_data (b, g, r order reversed)
    pick = torch.stack(tab)  # (4, H, W)
    table, = _on_device(_hsv_sectors, (), h.device)
    which = table[sector.long()].permute(2, 0, 1)  # (3, H, W): tab index of r, g, b
    rgb = torch.gather(pick, 0, which)
    return torch.trunc(rgb * np.float32(255.0)).clamp_(0, 255).to(torch.uint8)


def _hsv_sectors() -> np.ndarray:
    return np.array([[0, 3, 1], [2, 0, 1], [1, 0, 3], [1, 2, 0], [3, 1, 0], [0, 1, 2]])


def _hue_table(factor: float, device: torch.device) -> torch.Tensor:
    """uint8 (256,): ``np.mod(i + 180 * factor, 180)`` truncated, in float64 on ``device`` (numpy's mod: fmod,
    plus the divisor when negative)."""
    shifted = torch.arange(256, dtype=torch.float64, device=device) + 180 * factor
    mod = torch.fmod(shifted, 180.0)
    return torch.where(mod < 0, mod + 180.0, mod).to(torch.uint8)


def _hue(image: torch.Tensor, factor: float) -> torch.Tensor:
    if factor == 0:
        return image
    h, s, v = _rgb_to_hsv(image)
    h = _hue_table(factor, image.device)[h.long()]
    return _hsv_to_rgb(h, s, v)


_COLOR_OPS = (_brightness, _contrast, _saturation, _hue)


def color_jitter(image: torch.Tensor, color: ColorDraw) -> torch.Tensor:
    """One uint8 (3, H, W) image jittered as albumentations' ColorJitter.apply with these parameters."""
    factors = (color.brightness, color.contrast, color.saturation, color.hue)
    for op in color.order:
        image = _COLOR_OPS[op](image, factors[op])
    return image


# ----------------------------------------------------------------------------------------------------
# Layouts: mosaic, mixup, zoom (neoray.data.draws; the CPU path's neoray.data.augment.compose)
# ----------------------------------------------------------------------------------------------------


def _paste(canvas: torch.Tensor, images: torch.Tensor, pieces: tuple[Piece, ...]) -> torch.Tensor:
    """``pieces`` on ``canvas`` (3, H, W), in place: of each, only its window's crop is resized."""
    size = (canvas.shape[2], canvas.shape[1])
    for piece in pieces:
        x0, y0, x1, y1 = visible_rect(piece, size)
        if x1 > x0 and y1 > y0:
            window = piece_window(piece, (images.shape[3], images.shape[2]), size)
            (left, top, right, bottom), (ax, ay) = window.crop, window.at
            crop = images[piece.source:piece.source + 1, :, top:bottom, left:right].contiguous()
            canvas[:, y0:y1, x0:x1] = resize_images(crop, window.size)[0, :, y0 - ay:y1 - ay, x0 - ax:x1 - ax]
    return canvas


def blend(a: torch.Tensor, b: torch.Tensor, weight: int) -> torch.Tensor:
    """uint8 ``a`` and ``b`` mixed as ``(a * (MIX_UNIT - weight) + b * weight) / MIX_UNIT``, rounded half up
    (the CPU path's integers exactly)."""
    mixed = a.to(torch.int32) * (MIX_UNIT - weight) + b.to(torch.int32) * weight + MIX_UNIT // 2
    return torch.div(mixed, MIX_UNIT, rounding_mode="floor").to(torch.uint8)


def compose_batch(images: torch.Tensor, draw: BatchDraw) -> torch.Tensor:
    """uint8 (B, 3, H, W) at the draw's size: each output's layout, its pieces resized and pasted on a grey
    canvas, the mix layer blended in (before flip and jitter)."""
    width, height = draw.size
    out = torch.full((len(draw.layouts), 3, height, width), FILL, dtype=torch.uint8, device=images.device)
    for i, layout in enumerate(draw.layouts):
        _paste(out[i], images, layout.pieces)
        if layout.mix:
            mix = _paste(torch.full_like(out[i], FILL), images, layout.mix)
            out[i] = blend(out[i], mix, layout.mix_weight)
    return out


def apply_draw(images: torch.Tensor, draw: BatchDraw) -> torch.Tensor:
    """A uint8 (B, 3, H, W) batch resized (or composed, with layouts), flipped and jittered as ``draw`` says
    (any device)."""
    resized = compose_batch(images, draw) if draw.layouts else resize_images(images, draw.size)
    flips = [i for i, flip in enumerate(draw.flips) if flip]
    if flips or any(color is not None for color in draw.colors):
        # Edited in place below: never the caller's tensor.
        images = resized.clone() if resized is images else resized
        for i in flips:  # one by one: an index tensor would be another upload
            images[i] = images[i].flip(-1)
        for i, color in enumerate(draw.colors):
            if color is not None:
                images[i] = color_jitter(images[i], color)
        return images
    return resized


__all__ = ["apply_draw", "blend", "color_jitter", "compose_batch", "decode_jpegs", "resize_images"]
