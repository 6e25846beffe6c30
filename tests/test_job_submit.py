"""`ray job submit --working-dir . -- python experiments/sweep_lr.py ...` against a local `ray start --head`
cluster (the README's cluster workflow), on a throwaway head node with token authentication.

Isolation from every other Ray on the machine (the lead's, this session's `ray_session`):
* the head has its own temp dir (RAY_TMPDIR and --temp-dir) and free ports for everything that has a
  fixed default (GCS 6379, dashboard 8265, dashboard agent 52365, Ray Client 10001);
* HOME is a temp dir, so neither `ray start` nor the CLI reads or writes the real ~/.ray/auth_token;
  the token travels in RAY_AUTH_TOKEN;
* teardown never runs `ray stop` (it kills every Ray process of the user on the machine): it SIGKILLs
  only the processes whose command line names the head's temp dir (the job's driver included, as its
  output path is under that dir), and the test checks that `ray_session` still works afterwards.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import yaml
from process_tools import kill_all, pids_naming

REPO_ROOT = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
EXCLUDES = [".venv", ".neoray_cache", ".git", "sweeps", "runs"]
JOB_TIMEOUT_S = 900  # a hang guard, not a speed assertion


def _free_ports(n: int) -> list[int]:
    socks = [socket.socket() for _ in range(n)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def _kill_head(temp_dir: str) -> None:
    """Stop the throwaway head: SIGKILL every process that names its temp dir, and only those."""
    kill_all(lambda: pids_naming(temp_dir))


def _ray(env: dict, *args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([str(BIN / "ray"), *args], env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=timeout)


def _job_status(env: dict, address: str, job_id: str) -> str:
    """The job's status from Ray's SDK (JobSubmissionClient), run with the head's token in its env."""
    code = ("import sys; from ray.job_submission import JobSubmissionClient; "
            "print(JobSubmissionClient(sys.argv[1]).get_job_status(sys.argv[2]).value)")
    out = subprocess.run([sys.executable, "-c", code, address, job_id], env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return out.stdout.strip().splitlines()[-1]


@pytest.mark.slow
def test_job_submit_runs_a_sweep_on_a_local_head(ray_session, synthetic_shards, tmp_path):
    # Short: Ray's socket paths under the temp dir must stay below the OS limit (~107 bytes).
    temp_dir = tempfile.mkdtemp(prefix="nrjob")
    home = tmp_path / "home"
    home.mkdir()
    output = Path(temp_dir) / "out"
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu"},
        "data": {"train": str(synthetic_shards["train"]), "val": str(synthetic_shards["val"]),
                 "size": "160x90", "shuffle_buffer": 16},
        "train": {"epochs": 2, "batch_size": 4, "lr": 1e-3, "ema": False, "eval_every": 2},
    }))
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
        "asha": {"time_attr": "epoch", "grace_period": 2, "reduction_factor": 2},
        "search": {"seed": 0, "num_samples": 2},
    }))
    gcs_port, dash_port, agent_port, client_port = _free_ports(4)
    address = f"http://127.0.0.1:{dash_port}"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
    env.update(
        HOME=str(home), RAY_TMPDIR=temp_dir, RAY_USAGE_STATS_ENABLED="0",
        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
        # The job's `python` is the one on the head's PATH: this venv's, which has neoray installed.
        PATH=f"{BIN}{os.pathsep}{env.get('PATH', '')}",
    )
    try:
        started = _ray(env, "start", "--head", "--num-cpus", "4", "--temp-dir", temp_dir,
                       "--port", str(gcs_port), "--dashboard-port", str(dash_port),
                       "--dashboard-agent-listen-port", str(agent_port),
                       "--ray-client-server-port", str(client_port),
                       "--include-dashboard=true", "--disable-usage-stats")
        assert started.returncode == 0, started.stdout[-3000:]

        submitted = _ray(
            env, "job", "submit", "--address", address, "--working-dir", ".",
            "--runtime-env-json", json.dumps({"excludes": EXCLUDES}), "--",
            "python", "experiments/sweep_lr.py", "--config", str(config), "--space", str(space),
            "--output", str(output), "--name", "job", "--num-samples", "2",
            timeout=JOB_TIMEOUT_S,
        )
        assert submitted.returncode == 0, submitted.stdout[-4000:]
        job_id = next(line.split("'")[1] for line in submitted.stdout.splitlines()
                      if "submitted successfully" in line)
        assert _job_status(env, address, job_id) == "SUCCEEDED"
        logs = _ray(env, "job", "logs", "--address", address, job_id)
        assert logs.returncode == 0 and "[neoray] best trial" in logs.stdout, logs.stdout[-2000:]

        # A client that sends no token is refused by the cluster: authentication is really on.
        no_token = {k: v for k, v in env.items() if k != "RAY_AUTH_TOKEN"}
        no_token["RAY_AUTH_MODE"] = "disabled"
        refused = _ray(no_token, "job", "status", "--address", address, job_id)
        assert refused.returncode != 0 and "Unauthorized" in refused.stdout, refused.stdout[-2000:]

        sweep_dir = output / "job"
        assert (sweep_dir / "best_config.yaml").is_file()
        rows = (sweep_dir / "trials.csv").read_text().splitlines()
        assert len(rows) == 3 and rows[0].startswith("trial,status")  # header + 2 trials
    finally:
        _kill_head(temp_dir)
        leftovers = pids_naming(temp_dir)
        shutil.rmtree(temp_dir, ignore_errors=True)
    assert leftovers == [], f"processes of the throwaway head outlived its teardown: {leftovers}"
    # The session's own Ray was not touched by the teardown.
    assert ray_session.get(ray_session.put(7)) == 7
