"""The wheels the Ray sections of benchmarks/gpu_check.py need, staged here for a GPU machine without a package index.

The GPU machine (README "Benchmarks") runs Python 3.12 on manylinux x86_64 with torch, torchvision, numpy, pandas,
pyarrow, scipy, opencv-python-headless, pyyaml, fsspec, safetensors, onnxruntime and tensorboard (PROVIDED), but
not Ray, albumentations, faster-coco-eval or tensorboardX, and each command carries at most 64 MiB, the working
tree included. Ray's wheel alone is 79 MB.

    python benchmarks/stage_gpu_wheels.py                 # here: resolve, download, trim, pack; prints the calls
    python benchmarks/stage_gpu_wheels.py --install DIR   # there (standard library only): keep DIR's wheels; once
                                                          # every folder has arrived, install offline and import
    python benchmarks/stage_gpu_wheels.py --verify PYTHON # here: the calls' installs rehearsed in a clean venv of
                                                          # PYTHON (3.12), then Ray run: Ray Data, Ray Tune

Staging: pip resolves REQUIREMENTS for CPython 3.12 on manylinux x86_64 (``pip install --dry-run --report``),
downloads every wheel of that closure except PROVIDED (``pip download --only-binary=:all: --no-deps``), removes
Ray's Java runtime from Ray's wheel (``ray/jars``: 31 MB of its 79, used only by Java workers, which neoray never
starts), and packs the wheels, largest first, into folders .whl/gpu-1, .whl/gpu-2 ... that each fit in 64 MiB
beside the working tree. Each folder's ``wheels.json`` lists every folder's wheels with their sha256, and the
requirements.

Install: each call copies its folder into a store in the repository's ignored .whl/ (kept on the machine between
two calls while it stays warm, about 30 s), and once the store holds every wheel with its sha256, runs
``python -m pip install --no-index --find-links STORE <requirements>`` and imports IMPORT_CHECK.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
WHEELS = ROOT / ".whl"  # ignored by git (.gitignore)
STORE = WHEELS / "store"
REQUIREMENTS = ["ray[default,data,train,tune]==2.60.0", "albumentations==2.0.8", "faster-coco-eval==1.8.0",
                "tensorboardX==2.6.5"]
# On the GPU machine already: never staged. Their own dependencies are staged when the closure has them (small;
# pip keeps an installed version that satisfies the requirement).
PROVIDED = {"numpy", "pandas", "pyarrow", "scipy", "opencv-python-headless", "pyyaml", "fsspec", "safetensors",
            "onnxruntime", "tensorboard", "torch", "torchvision"}
TARGET = ["--only-binary=:all:", "--python-version", "3.12", "--implementation", "cp", "--abi", "cp312",
          *[arg for platform in ("manylinux2014_x86_64", "manylinux_2_17_x86_64", "manylinux_2_27_x86_64",
                                 "manylinux_2_28_x86_64") for arg in ("--platform", platform)]]
TRIM = {"ray": ("ray/jars/",)}  # distribution -> path prefixes removed from its wheel
CARRY_LIMIT = 64 * 2**20  # what one command carries, the working tree included
MARGIN = 2 * 2**20  # room for the working tree to grow before the calls are made
IMPORT_CHECK = "import ray, ray.train, ray.tune, ray.data, albumentations, faster_coco_eval, tensorboardX"
MANIFEST = "wheels.json"


def normalize(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def pip(*args: str, python: str = sys.executable, offline: bool = False,
        timeout_s: float = 1800) -> subprocess.CompletedProcess:
    """``python -m pip args``; ``offline``: with no pip configuration at all (no index or link a config file or
    PIP_* variable names is tried)."""
    env = dict(os.environ)
    if offline:
        env = {k: v for k, v in env.items() if not k.startswith("PIP_")} | {"PIP_CONFIG_FILE": os.devnull}
    proc = subprocess.run([python, "-m", "pip", *args], capture_output=True, text=True, timeout=timeout_s, env=env)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        raise SystemExit(f"stage_gpu_wheels: pip {args[0]} failed: {' | '.join(tail)}")
    return proc


# ----------------------------------------------------------------------------------------------------
# Here: resolve, download, trim, pack
# ----------------------------------------------------------------------------------------------------


def resolve(work: Path) -> list[tuple[str, str]]:
    """(name, version) of every distribution REQUIREMENTS need on the GPU machine's Python, PROVIDED ones left out."""
    report = work / "resolve.json"
    pip("install", "--dry-run", "--ignore-installed", "--quiet", "--report", str(report), "--target",
        str(work / "unused"), *TARGET, *REQUIREMENTS)
    pins = [(item["metadata"]["name"], item["metadata"]["version"])
            for item in json.loads(report.read_text())["install"]]
    return sorted((name, version) for name, version in pins if normalize(name) not in PROVIDED)


def trim(wheel: Path, prefixes: tuple[str, ...]) -> int:
    """Remove the files under ``prefixes`` from a wheel, and their lines from its RECORD; bytes saved."""
    before = wheel.stat().st_size
    trimmed = wheel.with_name(wheel.name + ".trimmed")
    with zipfile.ZipFile(wheel) as src, zipfile.ZipFile(trimmed, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            if info.filename.startswith(prefixes):
                continue
            data = src.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = b"".join(line for line in data.splitlines(keepends=True)
                                if not line.decode().startswith(prefixes))
            dst.writestr(info, data, compress_type=zipfile.ZIP_DEFLATED)  # info keeps the file modes (executables)
    os.replace(trimmed, wheel)
    return before - wheel.stat().st_size


def carried_tree_bytes() -> int:
    """What a command carries besides the wheels: tracked files and untracked ones git does not ignore."""
    listing = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True, timeout=60).stdout
    paths = [ROOT / name for name in listing.decode().split("\0") if name]
    return sum(path.stat().st_size for path in paths if path.is_file())


def pack(wheels: list[Path], room: int) -> list[list[Path]]:
    """Wheels into as few folders of at most ``room`` bytes as first-fit (largest first) finds."""
    folders: list[list[Path]] = []
    for wheel in sorted(wheels, key=lambda w: -w.stat().st_size):
        size = wheel.stat().st_size
        if size > room:
            raise SystemExit(f"stage_gpu_wheels: {wheel.name} is {size / 2**20:.1f} MiB, more than the "
                             f"{room / 2**20:.1f} MiB a folder may hold beside the working tree")
        home = next((f for f in folders if sum(w.stat().st_size for w in f) + size <= room), None)
        if home is None:
            folders.append(home := [])
        home.append(wheel)
    return folders


def stage(out: Path) -> list[Path]:
    with tempfile.TemporaryDirectory(prefix="neoray-wheels-") as tmp:
        work = Path(tmp)
        pins = resolve(work)
        download = work / "download"
        pip("download", "--no-deps", "--quiet", "-d", str(download), *TARGET, *[f"{n}=={v}" for n, v in pins])
        wheels = sorted(download.glob("*.whl"))
        saved = {}
        for wheel in wheels:
            name = normalize(wheel.name.split("-")[0])
            if name in TRIM:
                saved[wheel.name] = trim(wheel, TRIM[name])
        tree = carried_tree_bytes()
        folders = pack(wheels, CARRY_LIMIT - tree - MARGIN)
        for old in out.glob("gpu-*"):
            shutil.rmtree(old)
        manifest = {"requirements": REQUIREMENTS, "folders": len(folders), "wheels": {},
                    "trimmed": {name: list(TRIM[normalize(name.split("-")[0])]) for name in saved}}
        dirs = []
        for index, folder in enumerate(folders, start=1):
            target = out / f"gpu-{index}"
            target.mkdir(parents=True)
            for wheel in folder:
                shutil.move(str(wheel), target / wheel.name)
                manifest["wheels"][wheel.name] = {"folder": target.name, "sha256": sha256(target / wheel.name)}
            dirs.append(target)
        for target in dirs:
            (target / MANIFEST).write_text(json.dumps(manifest, indent=1))
    print_plan(dirs, tree, saved)
    return dirs


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.iterdir())


def print_plan(dirs: list[Path], tree: int, saved: dict) -> None:
    for name, size in saved.items():
        print(f"trimmed {name}: {size / 2**20:.1f} MiB less (Ray's Java runtime, ray/jars)")
    print(f"working tree carried with each call: {tree / 2**20:.1f} MiB")
    for folder in dirs:
        total = folder_bytes(folder) + tree
        print(f"{folder.relative_to(ROOT)}: {len(list(folder.glob('*.whl')))} wheels, "
              f"{folder_bytes(folder) / 2**20:.1f} MiB; with the working tree {total / 2**20:.1f} MiB "
              f"(limit {CARRY_LIMIT / 2**20:.0f})")
    print("\nOn the GPU machine, back to back (it is kept about 30 s between calls), one call per folder:")
    core = "python benchmarks/gpu_check.py --out $OUT --only core --budget-s 330"
    ray = "python benchmarks/gpu_check.py --out $OUT --only ray --budget-s 240"
    for index, folder in enumerate(dirs, start=1):
        rel = folder.relative_to(ROOT)
        line = f"python benchmarks/stage_gpu_wheels.py --install {rel}"
        if len(dirs) == 1:
            line += " && python benchmarks/gpu_check.py --out $OUT --budget-s 540"
        elif index == 1:
            line += f"; {core}"
        elif index == len(dirs):
            line += f" && {ray}"
        print(f"  call {index}, carry [\"{rel}\"]: {line}")
    print(f"The install line it runs once every folder is there: python -m pip install --no-index --find-links "
          f"{STORE.relative_to(ROOT)} {' '.join(repr(r) for r in REQUIREMENTS)}")


# ----------------------------------------------------------------------------------------------------
# There: keep, check, install (standard library only)
# ----------------------------------------------------------------------------------------------------


def install(folder: Path, store: Path, python: str = sys.executable) -> bool:
    """Keep ``folder``'s wheels in ``store``; once every folder's wheels are there (checked by sha256), install
    them offline and import-check. True when installed; False (with what is missing) otherwise."""
    manifest = json.loads((folder / MANIFEST).read_text())
    store.mkdir(parents=True, exist_ok=True)
    for wheel in folder.glob("*.whl"):
        shutil.copyfile(wheel, store / wheel.name)
    missing = sorted({entry["folder"] for name, entry in manifest["wheels"].items()
                      if not (store / name).exists() or sha256(store / name) != entry["sha256"]})
    if missing:
        print(f"stage_gpu_wheels: kept {folder.name} in {store}; still missing: {', '.join(missing)}: carry "
              f"{' and '.join(missing)} in the next call while this machine is warm (it is kept about 30 s)")
        return False
    pip("install", "--no-index", "--find-links", str(store), *manifest["requirements"], python=python, offline=True)
    check = subprocess.run([python, "-c", IMPORT_CHECK], capture_output=True, text=True, timeout=600)
    if check.returncode != 0:
        raise SystemExit(f"stage_gpu_wheels: installed, but the imports fail: {check.stderr.strip().splitlines()[-1]}")
    print(f"stage_gpu_wheels: installed {', '.join(manifest['requirements'])} offline from {store}; {IMPORT_CHECK}: ok")
    return True


# ----------------------------------------------------------------------------------------------------
# Here: the GPU machine's install, rehearsed in a clean venv
# ----------------------------------------------------------------------------------------------------

# Ray runs: a local instance with its dashboard, a Ray Data pipeline, a one-trial Tune run (no torch needed).
SMOKE = """
import ray, ray.data, ray.train, ray.tune, albumentations, faster_coco_eval, tensorboardX
from ray import tune
ray.init(num_cpus=2, include_dashboard=True, configure_logging=False)
assert ray.data.range(64).map_batches(lambda b: {"id": b["id"] * 2}).sum("id") == 2 * sum(range(64))
result = tune.Tuner(lambda config: {"score": config["x"] * 2}, param_space={"x": tune.grid_search([1, 2])}).fit()
assert sorted(r.metrics["score"] for r in result) == [2, 4], [r.metrics for r in result]
ray.shutdown()
print("ray", ray.__version__, "runs: local instance, Ray Data, Ray Tune")
"""


def verify(python: str, dirs: list[Path]) -> None:
    """A clean venv of ``python`` with what the GPU machine provides that the imports need (from the index), then
    every folder installed as the calls would, offline, then Ray started and used."""
    with tempfile.TemporaryDirectory(prefix="neoray-verify-") as tmp:
        venv, store = Path(tmp) / "venv", Path(tmp) / "store"
        subprocess.run([python, "-m", "venv", str(venv)], check=True, timeout=300)
        vpython = str(venv / "bin" / "python")
        version = subprocess.run([vpython, "-c", "import sys; print(sys.version.split()[0])"], capture_output=True,
                                 text=True, check=True).stdout.strip()
        provided = ["numpy", "pandas", "pyarrow", "scipy", "opencv-python-headless", "pyyaml", "fsspec"]
        pip("install", "--quiet", "--only-binary=:all:", *provided, python=vpython)
        print(f"verify: clean venv, Python {version}, with {', '.join(provided)} (as on the GPU machine)")
        for folder in dirs:
            done = install(folder, store, python=vpython)
        if not done:
            raise SystemExit("stage_gpu_wheels: verify: the folders did not complete the store")
        smoke = subprocess.run([vpython, "-c", SMOKE], capture_output=True, text=True, timeout=900)
        if smoke.returncode != 0:
            raise SystemExit(f"stage_gpu_wheels: verify: Ray does not run: {smoke.stderr.strip()[-2000:]}")
        print(f"verify: {smoke.stdout.strip().splitlines()[-1]}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--install", type=Path, help="on the GPU machine: a staged folder (.whl/gpu-N) to keep and, "
                                                     "once all are there, install")
    parser.add_argument("--store", type=Path, default=STORE, help=f"where --install keeps wheels (default {STORE})")
    parser.add_argument("--verify", metavar="PYTHON",
                        help="here: rehearse the install of the staged folders in a clean venv of PYTHON (stages "
                             "them first if there are none)")
    args = parser.parse_args(argv)
    if args.install:
        install(args.install, args.store)  # kept, or installed: either is a success (the next call completes it)
        return 0
    if args.verify:
        verify(args.verify, sorted(WHEELS.glob("gpu-*")) or stage(WHEELS))  # the folders staged last, else new ones
        return 0
    stage(WHEELS)
    return 0


if __name__ == "__main__":
    sys.exit(main())
