"""Reading a source image file safely: what ``neoray prepare`` decodes, and what it refuses.

Reading is bounded: only regular files (a FIFO would block forever, a link to ``/dev/zero`` never end),
at most ``max_bytes``, and the pixel count declared in the header (read by Pillow without decoding) at
most ``max_pixels``, so a decompression bomb is refused before it is decoded. A JPEG cut short is
found from its markers (libjpeg would decode it with grey rows and only a warning).
"""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from neoray import storage
from neoray.data import sources as src

# Decoding costs about 3 bytes per pixel, and there is one worker per CPU. 8192x8192 fits 8K frames
# (7680x4320) and 50-megapixel photos.
DEFAULT_MAX_IMAGE_PIXELS = 8192 * 8192
DEFAULT_MAX_IMAGE_BYTES = 256 << 20
EXIF_ORIENTATION_TAG = 0x0112


@dataclass
class Refused:
    """Why an image was not decoded."""

    reason: str
    detail: str = ""


def _jpeg_complete(data: bytes) -> bool | None:
    """Whether the JPEG in ``data`` reaches its end-of-image marker (FFD9): True, False (the file ends
    first: truncated), or None (the marker structure is not one we understand; the decoder decides).

    libjpeg decodes a cut-off JPEG with only a warning (grey bottom rows), so the end must be checked
    here. It is found by walking the marker segments from the start, not by looking at the last bytes:
    cameras and phones append data after FFD9 (maker trailers, the video of a motion photo, a second
    preview JPEG), and that data may itself contain FFDA/FFD9 byte pairs.
    """
    n, i = len(data), 2  # after SOI (FFD8)
    while True:
        if i >= n:
            return False
        if data[i] != 0xFF:
            return None  # a marker must start here
        while i < n and data[i] == 0xFF:  # any number of FF fill bytes may precede a marker
            i += 1
        if i >= n:
            return False
        marker = data[i]
        i += 1
        if marker == 0xD9:  # EOI
            return True
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # RSTn and TEM stand alone, no length
            continue
        if i + 2 > n:
            return False
        length = int.from_bytes(data[i:i + 2], "big")  # includes its own two bytes
        if length < 2:
            return None
        i += length
        if marker == 0xDA:  # SOS: entropy-coded data up to the next FF that is neither FF00 nor RSTn
            while True:
                i = data.find(b"\xff", i)
                if i < 0 or i + 1 >= n:
                    return False
                following = data[i + 1]
                if following == 0x00 or 0xD0 <= following <= 0xD7:
                    i += 2
                    continue
                break


def _read_file(path: str, max_bytes: int) -> bytes | Refused:
    """The bytes of a regular file of at most ``max_bytes``, or why not."""
    try:
        return storage.read_bytes(path, max_bytes=max_bytes)
    except FileNotFoundError:
        return Refused(src.IMAGE_MISSING)
    except storage.TooLarge as exc:
        return Refused(src.IMAGE_TOO_LARGE, str(exc).rsplit(": ", 1)[-1])
    except OSError as exc:
        if storage.is_uri(path):
            # Object storage: a network or service error is no property of the image. It fails the
            # shard (retried on the cluster; a re-run reuses the finished shards), never a skip for good.
            raise
        with contextlib.suppress(OSError):
            kind = storage.info(path).kind
            if kind in ("other", "dir"):
                what = "a directory" if kind == "dir" else "a FIFO, device or socket (or a link to one)"
                return Refused(src.IMAGE_NOT_REGULAR, f"{what}; not read")
        return Refused(src.IMAGE_UNREADABLE, str(exc)[:200])


@contextlib.contextmanager
def _pillow_bomb_check_off():
    # Pillow refuses images above its own fixed pixel limit when opening them; here it only reads the
    # header, and neoray's configurable limit (which may be higher) decides.
    saved, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = saved


def _header(data: bytes) -> tuple[int, int, int] | None:
    """(width, height, EXIF orientation) as the file declares them, without decoding; None when Pillow
    cannot identify the file."""
    try:
        with _pillow_bomb_check_off(), Image.open(io.BytesIO(data)) as image:
            width, height = image.size
            orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
    except Exception:  # Pillow raises many types (OSError, SyntaxError, ValueError, ...) for a bad header
        return None
    return width, height, orientation if isinstance(orientation, int) else 1


def read_image(path: str, *, max_bytes: int = DEFAULT_MAX_IMAGE_BYTES, max_pixels: int = DEFAULT_MAX_IMAGE_PIXELS,
               exif_orientation: bool = False, bytes_option: str = "--max-image-bytes",
               pixels_option: str = "--max-image-pixels") -> tuple[np.ndarray, int] | Refused:
    """(BGR image, EXIF orientation) or why the image is skipped. ``exif_orientation``: decode in the
    displayed frame (the EXIF rotation applied), else in the stored one. ``bytes_option`` and
    ``pixels_option`` name the limits in the reasons (the caller's options, or words where it has none)."""
    data = _read_file(path, max_bytes)
    if isinstance(data, Refused):
        if data.reason == src.IMAGE_TOO_LARGE:
            data.detail += f" ({bytes_option})"
        return data
    if data[:2] == b"\xff\xd8" and _jpeg_complete(data) is False:
        return Refused(src.IMAGE_TRUNCATED, "JPEG ends before its end-of-image marker")
    header = _header(data) if data else None
    if header is None:
        return Refused(src.IMAGE_UNREADABLE, f"not a decodable image ({len(data)} bytes)")
    width, height, orientation = header
    if width * height > max_pixels:
        return Refused(src.IMAGE_TOO_MANY_PIXELS, f"{width}x{height} = {width * height} pixels, over "
                                                  f"{pixels_option} {max_pixels}")
    flags = cv2.IMREAD_COLOR if exif_orientation else cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION
    try:
        img = cv2.imdecode(np.frombuffer(data, np.uint8), flags)
    except cv2.error as exc:
        return Refused(src.IMAGE_UNREADABLE, str(exc).strip().splitlines()[-1][:200])
    if img is None:
        return Refused(src.IMAGE_UNREADABLE, f"not a decodable image ({len(data)} bytes)")
    return img, orientation


__all__ = ["DEFAULT_MAX_IMAGE_BYTES", "DEFAULT_MAX_IMAGE_PIXELS", "Refused", "read_image"]
