"""benchmarks/gpu_check.py, the one-call GPU check, tested where CI runs: on the CPU at a tiny size.

The script's own logic (every section, the table, the JSON, the exit status) runs here as it runs on a GPU; only
the device, the size and the models differ (--tiny). Timings are reported, never asserted.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"


@pytest.mark.slow
def test_gpu_check_tiny_on_cpu_passes_and_writes_its_report(tmp_path):
    out = tmp_path / "gpu_check.json"
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--json", str(out)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check: all checks passed" in proc.stdout
    report = json.loads(out.read_text())
    assert report["ok"] and report["tiny"] and not report["errors"]
    rows = report["models"]
    assert {(r["model"], r["amp"]) for r in rows} >= {("rtdetr_cpu", amp) for amp in ("bf16", "fp16", "off", "eval")}
    assert all(r["images_per_s"] > 0 for r in rows if "error" not in r)
    assert report["amp"]["ok"] and report["amp"]["bf16"]["loss"] <= report["amp"]["bf16"]["tolerance"]["loss"]
    streams = report["data"]["streams"]
    assert {r["decode"] for r in streams} == {"cpu", "gpu"}
    assert all(r["images_per_s"] > 0 and r["first_pass_images_per_s"] > 0 for r in streams)
    assert report["data"]["paths"]["ok"] and report["data"]["paths"]["targets_identical"]
    train = report["train"]
    assert train["ok"] and train["exit_codes"] == [0, 0] and train["epochs"] == [1, 2]


def test_gpu_check_refuses_to_start_without_cuda_in_one_line(tmp_path):
    probe = subprocess.run([sys.executable, "-c", "import torch; print(torch.cuda.is_available())"],
                           capture_output=True, text=True)
    if probe.stdout.strip() == "True":
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--json", str(tmp_path / "x.json")], cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "x.json").exists()
