"""The best config a sweep exports reproduces its trial, whatever the cluster: the sample order (and so
every loss and metric) is a function of the seed and the epoch alone.

Two separate Ray instances of different sizes, each in its own process, neither of them this session's:

1. `neoray sweep` (one trial, the direct single-worker path) from a working directory whose config names
   its shards by relative paths, on the private local instance neoray starts itself (the machine's CPUs;
   it must not join this session's 4-CPU `ray_session`, which runs meanwhile);
2. `neoray train best_config.yaml` (the TorchTrainer path) on an instance of 4 CPUs.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO_ROOT = Path(__file__).resolve().parents[1]
RUN_TIMEOUT_S = 900  # a hang guard, not a speed assertion
# Starts Ray with a given CPU count, then runs the `neoray` command line in this process.
DRIVER = ("import sys, ray; ray.init(num_cpus=int(sys.argv[1]), configure_logging=False); "
          "from neoray.cli import main; sys.exit(main(sys.argv[2:]))")


def _run(args: list[str], cwd: Path) -> str:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    result = subprocess.run(args, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=RUN_TIMEOUT_S)
    assert result.returncode == 0, result.stdout[-3000:]
    return result.stdout


@pytest.mark.slow
def test_best_config_reproduces_the_trial_on_another_cluster(ray_session, synthetic_shards, tmp_path):
    work = tmp_path / "work"
    shutil.copytree(synthetic_shards["train"], work / "data" / "train")
    shutil.copytree(synthetic_shards["val"], work / "data" / "val")
    (work / "tiny.yaml").write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu", "options": {"hidden_dim": 32, "num_queries": 20, "num_denoising": 10}},
        "data": {"train": "data/train", "val": "data/val", "size": "160x90", "shuffle_buffer": 16},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "warmup_steps": 2, "ema_warmup_steps": 4, "seed": 3},
    }))
    (work / "space.yaml").write_text(yaml.safe_dump({
        "params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
        "asha": {"time_attr": "epoch", "grace_period": 2, "reduction_factor": 2},
        "search": {"seed": 0, "num_samples": 1},
    }))
    neoray = str(Path(sys.executable).with_name("neoray"))
    out = _run([neoray, "sweep", "--config", "tiny.yaml", "--space", "space.yaml", "--output", "sweeps",
                "--name", "rep"], work)
    assert "[neoray] started a local Ray instance: 1 node" in out  # not this session's 4-CPU instance
    sweep_dir = work / "sweeps" / "rep"
    trial = [json.loads(line) for line in (sweep_dir / "trial_0001" / "result.json").read_text().splitlines()]

    # The best config names the project's data as the sweep's config did, relative to the project folder.
    best = yaml.safe_load((sweep_dir / "best_config.yaml").read_text())
    assert best["data"]["train"] == "data/train" and best["output"] == "runs"
    out = _run([sys.executable, "-c", DRIVER, "4", "train", "sweeps/rep/best_config.yaml", "--output",
                str(tmp_path / "runs")], work)
    assert "using the Ray instance this process is connected to: 1 node, 4 CPUs" in out
    run = json.loads(next((tmp_path / "runs").glob("*/metrics.json")).read_text())

    assert [r["epoch"] for r in run] == [r["epoch"] for r in trial] == [1, 2]
    for ours, theirs in zip(run, trial):
        for key in ("loss", "loss_vfl", "loss_bbox", "loss_giou", "map", "map50", "score", "lr"):
            assert ours[key] == pytest.approx(theirs[key], rel=1e-6, abs=1e-9), (ours["epoch"], key)
