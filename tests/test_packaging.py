"""The package carries what `neoray sweep` needs: a non-editable install (`pip install .`) finds the default
config and search space, and experiments/configs/ shows the same files (one copy, linked)."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_experiments_configs_link_to_the_packaged_configs():
    linked = sorted((REPO_ROOT / "experiments" / "configs").glob("*.yaml"))
    assert linked, "experiments/configs/ lists the configs users start from"
    for path in linked:
        assert path.is_symlink(), f"{path.name}: a copy would drift from neoray/configs/{path.name}"
        assert path.resolve() == (REPO_ROOT / "neoray" / "configs" / path.name).resolve()


@pytest.mark.slow
def test_a_built_wheel_carries_the_configs_and_finds_them_outside_the_checkout(tmp_path):
    subprocess.run([sys.executable, "-m", "pip", "wheel", str(REPO_ROOT), "--no-deps", "--no-build-isolation",
                    "-q", "-w", str(tmp_path / "wheel")], check=True, timeout=600)
    [wheel] = (tmp_path / "wheel").glob("neoray-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        archive.extractall(tmp_path / "site")
        packaged = {Path(name).name for name in archive.namelist() if name.startswith("neoray/configs/")}
    assert {p.name for p in (REPO_ROOT / "experiments" / "configs").glob("*.yaml")} <= packaged
    probe = ("import neoray.configs as c, neoray.config as cfg; "
             "print(c.__file__); cfg.load_config(c.DEFAULT_CONFIG); print(c.DEFAULT_SPACE.read_text()[:1])")
    out = subprocess.run([sys.executable, "-I", "-c", f"import sys; sys.path.insert(0, {str(tmp_path / 'site')!r}); "
                          + probe], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.splitlines()[0].startswith(str(tmp_path / "site"))
