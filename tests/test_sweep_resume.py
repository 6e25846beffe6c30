"""A sweep killed after its first trial completes resumes with ``--resume`` without rerunning that trial.

The sweep runs as `python experiments/sweep_lr.py` in its own process group with its own local Ray
(RAY_TMPDIR points at a private temp dir, so neither the lead's Ray nor this session's `ray_session` is
touched); the test SIGKILLs the whole group once Tune's experiment state marks trial_0001 TERMINATED.
"""

from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from process_tools import pids_naming

REPO_ROOT = Path(__file__).resolve().parents[1]
SWEEP_TIMEOUT_S = 600  # a hang guard, not a speed assertion


def _write_inputs(tmp_path: Path, shards: dict) -> tuple[str, str]:
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu"},
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "size": "160x90", "shuffle_buffer": 16},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "ema": False, "eval_every": 2},
    }))
    space = tmp_path / "space.yaml"
    # grace_period == epochs: ASHA has no rung below max_t, so every trial runs both epochs.
    space.write_text(yaml.safe_dump({
        "params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
        "asha": {"time_attr": "epoch", "grace_period": 2, "reduction_factor": 2},
        "search": {"seed": 0, "num_samples": 3},
    }))
    return str(config), str(space)


def _trial_status(sweep_dir: Path) -> dict:
    """{trial name: Tune status} from the newest experiment state file ({} while none is readable)."""
    states = sorted(sweep_dir.glob("experiment_state-*.json"), key=lambda p: p.stat().st_mtime)
    if not states:
        return {}
    try:
        data = json.loads(states[-1].read_text())
    except (json.JSONDecodeError, OSError):
        return {}  # caught mid-write; the next poll reads it whole
    out = {}
    for trial_json, _runtime in data.get("trial_data", []):
        trial = json.loads(trial_json)
        out[trial.get("custom_dirname") or trial.get("relative_logdir")] = trial.get("status")
    return out


def _kill_group_and_ray(proc: subprocess.Popen, temp_dir: str) -> None:
    """SIGKILL the driver's process group and the processes of its local Ray (found by its temp dir),
    as a crash of the machine running the sweep would. Ray's processes would notice their dead driver
    on their own, but only after ~30 s; killing them by pid keeps the test short and touches nothing else."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()
    for pid in pids_naming(temp_dir):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + 30  # SIGKILL cannot be ignored; this only waits for the kernel
    while pids_naming(temp_dir) and time.monotonic() < deadline:
        time.sleep(0.2)


def _history(trial_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]


@pytest.mark.slow
def test_killed_sweep_resumes_without_rerunning_finished_trial(synthetic_shards, tmp_path):
    config, space = _write_inputs(tmp_path, synthetic_shards)
    output = tmp_path / "sweeps"
    sweep_dir = output / "resume"
    # Short: Ray's socket paths under the temp dir must stay below the OS limit (~107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="nrres")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1")
    cmd = [sys.executable, "experiments/sweep_lr.py", "--config", config, "--space", space,
           "--output", str(output), "--name", "resume", "--num-samples", "3", "--max-concurrent", "1"]
    log1 = tmp_path / "first.log"
    proc = None
    try:
        with open(log1, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            deadline = time.monotonic() + SWEEP_TIMEOUT_S
            while _trial_status(sweep_dir).get("trial_0001") != "TERMINATED":
                assert proc.poll() is None, f"sweep exited ({proc.returncode}) early:\n{log1.read_text()[-3000:]}"
                assert time.monotonic() < deadline, f"trial_0001 never finished:\n{log1.read_text()[-3000:]}"
                time.sleep(0.2)
            killed_at = time.time()
            _kill_group_and_ray(proc, ray_tmp)
        assert not (sweep_dir / "trials.csv").exists(), "the sweep finished before the kill; nothing to resume"
        assert pids_naming(ray_tmp) == [], "the killed sweep's Ray processes are still running"
        first_history = _history(sweep_dir / "trial_0001")
        assert [h["epoch"] for h in first_history] == [1, 2]

        result = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=SWEEP_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-4000:]
    finally:
        if proc is not None:  # also the resumed run's Ray, should it have outlived its driver
            _kill_group_and_ray(proc, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    with open(sweep_dir / "trials.csv", newline="") as handle:
        rows = {row["trial"]: row for row in csv.DictReader(handle)}
    assert set(rows) == {"trial_0001", "trial_0002", "trial_0003"}
    assert all(r["status"] == "finished" and r["epochs"] == "2" for r in rows.values()), rows
    # trial_0001 was not run again: its history is the one written before the kill, each epoch once.
    history = _history(sweep_dir / "trial_0001")
    assert [h["epoch"] for h in history] == [1, 2]
    assert history == first_history
    assert all(h["timestamp"] <= killed_at for h in history)
    started = _started_trials(result.stdout)
    assert "trial_0003" in started and "trial_0001" not in started, started


def _started_trials(log: str) -> set[str]:
    """Trials that Tune started in this driver ("Trial trial_0003 started with configuration:")."""
    return {line.split()[1] for line in log.splitlines()
            if line.startswith("Trial trial_") and "started with configuration" in line}
