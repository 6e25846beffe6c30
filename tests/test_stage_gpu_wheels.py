"""benchmarks/stage_gpu_wheels.py without the network: the wheel trim keeps a wheel installable, the packing keeps
every folder under what one command carries, and --install installs only once every folder has arrived intact.
(The real staging and an offline install into a clean Python 3.12 venv: `stage_gpu_wheels.py --verify python3.12`.)
"""

from __future__ import annotations

import importlib.util
import json
import stat
import sys
import zipfile
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "stage_gpu_wheels.py"


def _load():
    spec = importlib.util.spec_from_file_location("stage_gpu_wheels", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["stage_gpu_wheels"] = module
    spec.loader.exec_module(module)
    return module


stage = _load()


def _wheel(path: Path, files: dict[str, bytes], executable: tuple[str, ...] = ()) -> Path:
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for name, data in {**files, "ray-2.60.0.dist-info/RECORD": record.encode()}.items():
            info = zipfile.ZipInfo(name)
            info.external_attr = (0o755 if name in executable else 0o644) << 16
            out.writestr(info, data)
    return path


def test_trim_removes_the_prefix_from_the_wheel_and_its_record_and_keeps_file_modes(tmp_path):
    wheel = _wheel(tmp_path / "ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl",
                   {"ray/__init__.py": b"x = 1\n", "ray/jars/ray_dist.jar": b"j" * 100_000,
                    "ray/core/src/ray/raylet/raylet": b"\x7fELF" * 1000},
                   executable=("ray/core/src/ray/raylet/raylet",))
    saved = stage.trim(wheel, ("ray/jars/",))
    assert saved > 0
    with zipfile.ZipFile(wheel) as z:
        names = z.namelist()
        record = z.read("ray-2.60.0.dist-info/RECORD").decode()
        mode = z.getinfo("ray/core/src/ray/raylet/raylet").external_attr >> 16
    assert "ray/jars/ray_dist.jar" not in names and "ray/__init__.py" in names
    assert "ray/jars" not in record and "ray/__init__.py" in record
    assert mode & stat.S_IXUSR


def test_pack_puts_every_wheel_in_a_folder_under_the_room_largest_first(tmp_path):
    sizes = {"a": 50, "b": 30, "c": 20, "d": 12, "e": 5, "f": 1}
    wheels = []
    for name, size in sizes.items():
        path = tmp_path / f"{name}-1.0-py3-none-any.whl"
        path.write_bytes(b"x" * size)
        wheels.append(path)
    folders = stage.pack(wheels, room=64)
    assert sorted(w.name[0] for folder in folders for w in folder) == sorted(sizes)
    assert all(sum(w.stat().st_size for w in folder) <= 64 for folder in folders)
    assert [w.name[0] for w in folders[0]] == ["a", "d", "f"] and len(folders) == 2
    with pytest.raises(SystemExit, match="more than"):
        stage.pack(wheels, room=40)


def _folders(tmp_path: Path) -> list[Path]:
    manifest = {"requirements": ["ray[data]==2.60.0"], "folders": 2, "wheels": {}}
    dirs = []
    for index, names in enumerate((["ray-2.60.0-cp312-cp312-manylinux2014_x86_64.whl"],
                                   ["click-8.5.1-py3-none-any.whl", "msgpack-1.2.4-cp312-cp312-linux.whl"]), start=1):
        folder = tmp_path / f"gpu-{index}"
        folder.mkdir()
        for name in names:
            (folder / name).write_bytes(name.encode() * 10)
            manifest["wheels"][name] = {"folder": folder.name, "sha256": stage.sha256(folder / name)}
        dirs.append(folder)
    for folder in dirs:
        (folder / stage.MANIFEST).write_text(json.dumps(manifest))
    return dirs


def test_install_waits_for_every_folder_then_installs_offline(tmp_path, monkeypatch, capsys):
    calls = []
    monkeypatch.setattr(stage, "pip", lambda *args, **kwargs: calls.append((args, kwargs)))
    monkeypatch.setattr(stage.subprocess, "run", lambda *a, **k: type("Done", (), {"returncode": 0})())
    first, second = _folders(tmp_path)
    store = tmp_path / "store"
    assert stage.install(first, store) is False and calls == []
    assert "still missing: gpu-2" in capsys.readouterr().out
    assert stage.install(second, store) is True
    (args, kwargs), = calls
    assert args == ("install", "--no-index", "--find-links", str(store), "ray[data]==2.60.0")
    assert kwargs["offline"] is True


def test_a_wheel_damaged_on_the_way_counts_as_missing(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(stage, "pip", lambda *args, **kwargs: pytest.fail("must not install"))
    first, second = _folders(tmp_path)
    (second / "click-8.5.1-py3-none-any.whl").write_bytes(b"truncated")
    stage.install(first, tmp_path / "store")
    assert stage.install(second, tmp_path / "store") is False
    assert "still missing: gpu-2" in capsys.readouterr().out
