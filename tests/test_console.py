"""What a person sees in the terminal of ``neoray train``: neoray's one line per epoch, not Ray Train's
``Reporting training result N: TrainingReport(checkpoint=..., metrics={...})`` dump of every report (kilobytes
per epoch, from the worker, forwarded by Ray to the driver's terminal; see ray_compat.TRAIN_REPORT_LOGGER).

The real command runs in its own process on the private Ray instance it starts itself (not this session's),
so what Ray forwards from its controller and worker processes is in the captured output.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

RUN_TIMEOUT_S = 900  # a hang guard, not a speed assertion
EPOCH_LINE = re.compile(r"\bepoch (\d+) \| step \d+ \| loss ")  # neoray.run.rundir.epoch_line


@pytest.mark.slow
def test_train_prints_one_line_per_epoch_and_no_ray_report_dumps(synthetic_shards, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu", "options": {"hidden_dim": 32, "num_queries": 20, "num_denoising": 10}},
        "data": {"train": str(synthetic_shards["train"]), "val": str(synthetic_shards["val"]), "size": "160x90",
                 "shuffle_buffer": 8},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "ema_warmup_steps": 4, "seed": 1},
    }))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
    neoray = str(Path(sys.executable).with_name("neoray"))
    result = subprocess.run([neoray, "train", str(config), "--output", str(tmp_path / "runs")], cwd=tmp_path,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=RUN_TIMEOUT_S)
    out = result.stdout
    assert result.returncode == 0, out[-3000:]
    assert "started a local Ray instance" in out  # its own instance, not this session's
    assert [m.group(1) for m in map(EPOCH_LINE.search, out.splitlines()) if m] == ["1", "2"], out[-3000:]
    assert "TrainingReport(" not in out and "Reporting training result" not in out, out[-3000:]
    # Ray Train's INFO lines (resources requested, worker group started) stay in Ray's log files.
    assert "Started training worker group" not in out
