"""What a bounded read costs per image: neoray's ``storage.read_bytes(path, max_bytes=N)`` (allocates what the
file holds) against the read it replaced, which asked pyarrow for ``N + 1`` bytes and so reserved the whole
bound for every file, timed in one run on the same files.

    python benchmarks/bench_bounded_read.py [--images 400] [--size 960x540] [--max-bytes 256M] [--repeats 5]

Writes ``--images`` JPEGs of ``--size`` to a temporary folder (what ``neoray prepare`` reads per image, with
its default ``--max-image-bytes`` of 256 MiB), reads each of them ``--repeats`` times both ways (alternating,
so that the page cache serves both alike) and prints the median time per image of each, their ratio, and the
peak address space one read reserves each way (from /proc/self/status, VmPeak growth around one read).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import pyarrow.fs as pafs

from neoray import storage


def reserving_read(path: str, max_bytes: int) -> bytes:
    """The read before the fix: ask for the bound plus one byte (pyarrow reserves all of it up front)."""
    with pafs.LocalFileSystem().open_input_stream(path) as handle:
        return handle.read(max_bytes + 1)


def vm_peak_kb() -> int:
    with open("/proc/self/status") as handle:
        return next(int(line.split()[1]) for line in handle if line.startswith("VmPeak:"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=400)
    parser.add_argument("--size", default="960x540")
    parser.add_argument("--max-bytes", default="256M")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    width, height = (int(v) for v in args.size.lower().split("x"))
    units = {"k": 1 << 10, "m": 1 << 20, "g": 1 << 30}
    text = args.max_bytes.strip().lower()
    max_bytes = int(float(text[:-1]) * units[text[-1]]) if text[-1] in units else int(text)
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="neoray-bench-read-") as tmp:
        paths = []
        for index in range(args.images):
            image = rng.integers(0, 256, (height, width, 3), dtype=np.uint8)
            path = Path(tmp) / f"{index:05d}.jpg"
            cv2.imwrite(str(path), cv2.GaussianBlur(image, (9, 9), 0))
            paths.append(str(path))
        mean_kb = sum(Path(p).stat().st_size for p in paths) / len(paths) / 1024
        before = vm_peak_kb()
        storage.read_bytes(paths[0], max_bytes=max_bytes)
        neoray_peak = vm_peak_kb() - before
        before = vm_peak_kb()
        reserving_read(paths[0], max_bytes)
        reserving_peak = vm_peak_kb() - before
        times = {"neoray": [], "reserving": []}
        for _ in range(args.repeats):
            for name, read in (("neoray", lambda p: storage.read_bytes(p, max_bytes=max_bytes)),
                               ("reserving", lambda p: reserving_read(p, max_bytes))):
                start = time.perf_counter()
                for path in paths:
                    read(path)
                times[name].append((time.perf_counter() - start) / len(paths))
    ours, theirs = statistics.median(times["neoray"]), statistics.median(times["reserving"])
    print(f"{args.images} JPEGs of {args.size} ({mean_kb:.0f} KiB on average), bound {max_bytes} bytes, "
          f"median of {args.repeats} passes")
    print(f"neoray read_bytes : {ours * 1e6:8.1f} us/image, address space reserved by one read {neoray_peak} KiB")
    print(f"reserving read    : {theirs * 1e6:8.1f} us/image, address space reserved by one read {reserving_peak} KiB")
    print(f"ratio reserving / neoray: {theirs / ours:.2f}")


if __name__ == "__main__":
    main()
