"""An interrupted sweep (Ctrl-C) and a killed one both continue with ``--resume`` without rerunning the
trials that had ended.

The sweep runs as `python experiments/sweep_lr.py` in its own process group with its own local Ray
(RAY_TMPDIR points at a private temp dir, so neither the lead's Ray nor this session's `ray_session` is
touched). First run: SIGINT to the driver (what Ctrl-C sends) once Tune's experiment state marks
trial_0001 TERMINATED (Tune may still finish the trial that is running then). Second run (--resume):
SIGKILL of the whole group once the first trial the first run left unfinished is TERMINATED. Third run
(--resume): the rest. Four trials, so that the second run always has work left when it is killed. The
sweep's Optuna study (SWEEP_DIR/optuna.db) goes on through both resumptions.
"""

from __future__ import annotations

import csv
import json
import os
import shlex
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
NUM_TRIALS = 4
TRIALS = [f"trial_{i:04d}" for i in range(1, NUM_TRIALS + 1)]


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
        "search": {"seed": 0, "num_samples": NUM_TRIALS},
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


def _wait_until_ended(sweep_dir: Path, trial: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + SWEEP_TIMEOUT_S
    while _trial_status(sweep_dir).get(trial) != "TERMINATED":
        assert proc.poll() is None, f"sweep exited ({proc.returncode}) early:\n{log.read_text()[-3000:]}"
        assert time.monotonic() < deadline, f"{trial} never finished:\n{log.read_text()[-3000:]}"
        time.sleep(0.2)


def _csv_rows(sweep_dir: Path) -> dict:
    with open(sweep_dir / "trials.csv", newline="") as handle:
        return {row["trial"]: row for row in csv.DictReader(handle)}


@pytest.mark.slow
def test_interrupted_then_killed_sweep_resumes_without_rerunning_ended_trials(synthetic_shards, tmp_path):
    config, space = _write_inputs(tmp_path, synthetic_shards)
    output = tmp_path / "sweeps"
    sweep_dir = output / "resume"
    # Short: Ray's socket paths under the temp dir must stay below the OS limit (~107 bytes).
    ray_tmp = tempfile.mkdtemp(prefix="nrres")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # never join another cluster
    # Tune saves its experiment state at most every 10 s by default ("auto"), about one trial here, so the
    # state the test polls (and a crashed sweep resumes from) would lag a whole trial behind.
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1", TUNE_GLOBAL_CHECKPOINT_S="0.5")
    cmd = [sys.executable, "experiments/sweep_lr.py", "--config", config, "--space", space,
           "--output", str(output), "--name", "resume", "--num-samples", str(NUM_TRIALS), "--max-concurrent", "1"]
    log1, log2 = tmp_path / "first.log", tmp_path / "second.log"
    proc = None
    try:
        # 1. Ctrl-C once trial_0001 has ended: Tune stops, the sweep says so and exits 130.
        with open(log1, "w") as log:
            proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=log, stderr=subprocess.STDOUT,
                                    start_new_session=True)
            _wait_until_ended(sweep_dir, "trial_0001", proc, log1)
            os.kill(proc.pid, signal.SIGINT)
            returncode = proc.wait(timeout=SWEEP_TIMEOUT_S)
        first_log = log1.read_text()
        assert returncode == 130, first_log[-4000:]
        resume_cmd = shlex.join(["python"] + cmd[1:] + ["--resume"])
        assert f"sweep interrupted; continue with: {resume_cmd}" in first_log
        partial = _csv_rows(sweep_dir)  # written, and marked partial, not passed off as the result
        assert partial["trial_0001"]["status"] == "finished"
        # Tune lets the running trial finish its current step after SIGINT, so trial_0002 may have ended
        # (all its epochs, `done`) or been stopped; either way each row says which, and one is not over.
        assert all(r["status"] == "interrupted" or (r["status"] == "finished" and r["epochs"] == "2")
                   for r in partial.values()), partial
        assert len(partial) < NUM_TRIALS or any(r["status"] == "interrupted" for r in partial.values()), partial
        ended_first = [t for t in TRIALS if t in partial and partial[t]["status"] == "finished"]
        # What the second run finishes first. Tune saves its state every few seconds, so by the time the
        # test sees `target` TERMINATED a later trial may have run too: the kill then finds less (or nothing)
        # left, which is still a crash the third run must not redo.
        target = next(t for t in TRIALS if t not in ended_first)
        assert (sweep_dir / "trials.md").read_text().startswith("**Partial results: the sweep was interrupted")
        assert not (sweep_dir / "best_config.yaml").exists()
        _kill_group_and_ray(proc, ray_tmp)  # whatever of its local Ray outlived the driver
        first_history = _history(sweep_dir / "trial_0001")
        assert [h["epoch"] for h in first_history] == [1, 2]

        # 2. --resume, then a kill (a crash: nothing more is written) once `target` has ended.
        with open(log2, "w") as log:
            proc = subprocess.Popen(cmd + ["--resume"], cwd=REPO_ROOT, env=env, stdout=log,
                                    stderr=subprocess.STDOUT, start_new_session=True)
            _wait_until_ended(sweep_dir, target, proc, log2)
            killed_at = time.time()
            _kill_group_and_ray(proc, ray_tmp)
        assert pids_naming(ray_tmp) == [], "the killed sweep's Ray processes are still running"
        assert not set(ended_first) & _started_trials(log2.read_text())
        ended_second = ended_first + [target]
        histories = {t: _history(sweep_dir / t) for t in ended_second}
        assert _csv_rows(sweep_dir) == partial  # the kill left the first run's partial table as it was

        # 3. --resume runs what is left.
        result = subprocess.run(cmd + ["--resume"], cwd=REPO_ROOT, env=env, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, timeout=SWEEP_TIMEOUT_S)
        assert result.returncode == 0, result.stdout[-4000:]
    finally:
        if proc is not None:  # also the resumed run's Ray, should it have outlived its driver
            _kill_group_and_ray(proc, ray_tmp)
        shutil.rmtree(ray_tmp, ignore_errors=True)

    rows = _csv_rows(sweep_dir)
    assert set(rows) == set(TRIALS)
    assert all(r["status"] == "finished" and r["epochs"] == "2" for r in rows.values()), rows
    assert not (sweep_dir / "trials.md").read_text().startswith("**Partial")
    assert (sweep_dir / "best_config.yaml").exists()
    # No ended trial ran again: each history is the one written before the interrupt / the kill.
    assert _history(sweep_dir / "trial_0001") == first_history
    assert all(_history(sweep_dir / t) == histories[t] for t in ended_second)
    assert all(h["timestamp"] <= killed_at for t in ended_second for h in histories[t])
    started = _started_trials(result.stdout)
    assert not set(ended_second) & started, started
    _check_study_continued(sweep_dir, rows)


def _check_study_continued(sweep_dir: Path, rows: dict) -> None:
    """Both resumptions wrote to the sweep's one Optuna study: every trial there with its two epochs, and
    nothing left RUNNING (a trial the killed run had asked for and its resumption asked for again is FAIL)."""
    import optuna

    trials = optuna.load_study(study_name="resume", storage=f"sqlite:///{sweep_dir / 'optuna.db'}").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    assert len(complete) == NUM_TRIALS and all(sorted(t.intermediate_values) == [1, 2] for t in complete), trials
    assert not [t for t in trials if t.state.name == "RUNNING"], trials
    assert sorted(t.params["lr"] for t in complete) == pytest.approx(sorted(float(r["lr"]) for r in rows.values()))


def _started_trials(log: str) -> set[str]:
    """Trials started in this driver ("[neoray] trial_0003 started: lr=...", see sweep.AnnounceTrials)."""
    return {line.split()[1] for line in log.splitlines()
            if line.startswith("[neoray] trial_") and " started: " in line}
