"""Nothing lost when things die: a rerun or ``--resume`` continues from the last consistent state, every file
is whole or absent, and what a user sees is neoray's one line, never a Ray worker's traceback.

One fault per test: an output that cannot be written (read-only), a latest checkpoint that cannot be read, a
disk that fills while checkpoints are written, SIGTERM (what Kubernetes and batch schedulers send) to
``neoray train`` and to a sweep, two sweeps of one name at once, the output deleted while training, and a
SIGKILLed driver whose local Ray instance must end with it. Commands that start Ray run in a process of their
own with a private Ray (RAY_TMPDIR), so that nothing here touches another Ray instance, and are marked slow.
"""

from __future__ import annotations

import contextlib
import errno
import io
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import yaml
from cli_output import one_line, user_lines
from process_tools import alive, descendants, pids_naming
from test_eval_cli import save_checkpoint
from test_sweep_resume import REPO_ROOT, _csv_rows

from neoray import cluster, storage
from neoray.checkpoints import CheckpointError, write_pointers
from neoray.cli import main
from neoray.config import load_config
from neoray.data import sources as src
from neoray.data.shards import read_manifest
from neoray.engine.context import LocalContext
from neoray.engine.loop import run_training_loop
from neoray.run import rundir, trainer
from neoray.run.setup import prepare_config, resume_point
from neoray.tune import sweep as sweep_module

TIMEOUT_S = 600  # a hang guard for the end-to-end runs, not a speed assertion


def run_cli(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()



def _no_ray(*args, **kwargs):
    raise AssertionError("Ray was started: the check must come first")


def _data(shards: dict) -> list[str]:
    return [f"data.train={shards['train']}", f"data.val={shards['val']}", "data.size=160x90"]


def _tiny_config(path: Path, shards: dict, output: Path, epochs: int = 3) -> Path:
    path.write_text(yaml.safe_dump({
        "output": str(output), "model": {"name": "rtdetr_cpu"},
        "data": {"train": str(shards["train"]), "val": str(shards["val"]), "size": "160x90", "shuffle_buffer": 16},
        "train": {"epochs": epochs, "batch_size": 4, "lr": 1e-3, "ema": False, "eval_every": 2,
                  "cpus_per_worker": 1, "max_failures": 1},
    }))
    return path


def _mount(*args: str) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def read_only_folder(tmp_path):
    """An existing folder nothing can be written in: mode 555 for a user, a read-only bind mount for root
    (whom modes do not stop); skipped where root cannot mount."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if not (_mount("--bind", str(folder), str(folder)) and _mount("-o", "remount,ro,bind", str(folder))):
        subprocess.run(["umount", str(folder)], capture_output=True)
        pytest.skip("cannot make a read-only mount here")
    try:
        yield folder
    finally:
        subprocess.run(["umount", str(folder)], check=True)


@contextlib.contextmanager
def small_disk(folder: Path, size: str):
    """A tmpfs of ``size`` at ``folder`` (root only; skipped elsewhere)."""
    folder.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 or not _mount("-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)):
        pytest.skip("mounting a small tmpfs needs root")
    try:
        yield folder
    finally:
        subprocess.run(["umount", "-l", str(folder)], check=True)


class Neoray:
    """``python -m neoray.cli ARGV`` in a session of its own, with a private local Ray under ``ray_tmp``, its
    output (stdout and stderr) in a log file: a pipe would stay open as long as any process that inherited it."""

    def __init__(self, argv: list[str], ray_tmp: str, log: Path):
        env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
        env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0", PYTHONUNBUFFERED="1",
                   PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
        self.log = log
        with open(log, "w") as handle:
            self.proc = subprocess.Popen([sys.executable, "-m", "neoray.cli", *argv], cwd=REPO_ROOT, env=env,
                                         stdout=handle, stderr=subprocess.STDOUT, start_new_session=True)

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, text: str) -> None:
        deadline = time.monotonic() + TIMEOUT_S
        while text not in self.output():
            assert self.proc.poll() is None, f"exited ({self.proc.returncode}):\n{self.output()[-4000:]}"
            assert time.monotonic() < deadline, f"never printed {text!r}:\n{self.output()[-4000:]}"
            time.sleep(0.2)

    def finish(self) -> tuple[int, str]:
        return self.proc.wait(timeout=TIMEOUT_S), self.output()


def last_line(output: str) -> str:
    return user_lines(output)[-1]


@pytest.fixture
def ray_tmp():
    """A private temp dir for the Ray of a subprocess; whatever of it is left is killed afterwards."""
    path = tempfile.mkdtemp(prefix="nrcr")  # short: Ray's socket paths must stay under ~107 bytes
    yield path
    for pid in pids_naming(path):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    shutil.rmtree(path, ignore_errors=True)


def worker_tracebacks(output: str) -> list[str]:
    """Tracebacks in a command's output. Ray Train's PlacementGroupCleaner prints one of its own when several Ray
    instances run on one machine (its State API client cannot tell which is its own), as on a shared test
    machine: not a fault these tests inject, so it is left out."""
    return [line for line in output.splitlines() if ("Traceback" in line or "Error in training function" in line)
            and "PlacementGroupCleaner" not in line]


# ----------------------------------------------------------------------------------------------------
# 1. An output that cannot be written is found before any work
# ----------------------------------------------------------------------------------------------------


def test_outputs_that_cannot_be_written_are_refused_before_any_work(read_only_folder, synthetic_shards, tmp_path,
                                                                    monkeypatch):
    from neoray.commands import train as train_command

    monkeypatch.setattr(src, "read_coco", lambda *a, **k: pytest.fail("read the source before probing --out"))
    monkeypatch.setattr(train_command, "connect", _no_ray)
    monkeypatch.setattr(sweep_module, "connect", _no_ray)
    root = synthetic_shards["root"]
    out = read_only_folder / "shards"
    code, _, err = run_cli(["prepare", "--coco", str(root / "annotations" / "instances_train.json"), "--images",
                            str(root / "train"), "--out", str(out), "--size", "160x90"])
    assert code == 1 and str(out) in one_line(err) and "Read-only file system" in err or "Permission" in err
    config = tmp_path / "c.yaml"
    config.write_text("{}")
    code, _, err = run_cli(["train", str(config), *_data(synthetic_shards), "--output", str(read_only_folder)])
    assert code == 1 and f"--output: {read_only_folder}: cannot write there" in one_line(err)
    code, _, err = run_cli(["sweep", "--config", str(config), "--output", str(read_only_folder), "--num-samples", "1",
                            *_data(synthetic_shards)])
    assert code == 1 and f"--output: {read_only_folder}: cannot write there" in one_line(err)
    assert not list(read_only_folder.iterdir())


def test_the_write_probe_leaves_nothing_behind(tmp_path):
    storage.probe_writable(tmp_path / "not" / "yet")  # probed in the nearest folder that exists
    assert list(tmp_path.iterdir()) == []
    bucket = f"memory://probe-{os.getpid()}"
    storage.makedirs(f"{bucket}/out")
    storage.probe_writable(f"{bucket}/out")
    assert storage.list_dir(f"{bucket}/out") == []


# ----------------------------------------------------------------------------------------------------
# 2. A latest checkpoint that cannot be read: checked on the driver, the previous one named
# ----------------------------------------------------------------------------------------------------


def _run_with_checkpoints(tmp_path: Path, shards: dict, epochs: tuple[int, ...]) -> Path:
    """A run directory as a run that checkpointed ``epochs`` leaves it (pointers to the last)."""
    cfg = prepare_config(load_config(None, [*_data(shards), f"output={tmp_path / 'runs'}"]))
    run_dir = tmp_path / "runs" / "r"
    categories = read_manifest(shards["train"])["categories"]
    for epoch in epochs:
        folder = save_checkpoint(run_dir / "ray" / f"checkpoint_{epoch}", categories)
        payload = __import__("torch").load(folder / "checkpoint.pt", weights_only=True)
        payload["epoch"] = epoch
        __import__("torch").save(payload, folder / "checkpoint.pt")
    (run_dir / "config.yaml").write_text(cfg.to_yaml())
    last = f"ray/checkpoint_{epochs[-1]}"
    write_pointers(str(run_dir), {"latest": {"path": last, "epoch": epochs[-1]},
                                  "best": {"path": last, "epoch": epochs[-1], "score": 0.5}})
    rundir.write_metrics(str(run_dir), [{"epoch": e, "loss": 1.0 / e, "score": -1.0 / e} for e in epochs])
    return run_dir


@pytest.mark.parametrize("damage", ["truncated", "empty"])
def test_resume_falls_back_to_the_previous_checkpoint_and_names_it(synthetic_shards, tmp_path, monkeypatch, damage):
    run_dir = _run_with_checkpoints(tmp_path, synthetic_shards, (1, 2))
    latest = run_dir / "ray" / "checkpoint_2" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000] if damage == "truncated" else b"")
    said = []
    point = resume_point(str(run_dir), log=said.append)
    assert (point.checkpoint, point.epoch, point.unreadable) == (str(run_dir / "ray" / "checkpoint_1"), 1,
                                                                  ("checkpoint_2",))
    assert len(said) == 1 and str(latest) in said[0] and str(run_dir / "ray" / "checkpoint_1") in said[0]

    seen = {}

    class Trainer:  # what the workers would get: the fallback, and which of Ray's checkpoints to pass over
        def fit(self):
            pass

    def build(cfg, storage_path, **kwargs):
        seen.update(kwargs)
        return Trainer()

    monkeypatch.setattr(trainer, "build_trainer", build)
    cfg = load_config(str(run_dir / "config.yaml"))
    trainer.train(cfg, resume_dir=str(run_dir), verbose=False, resume=point)
    assert seen["resume_from"] == str(run_dir / "ray" / "checkpoint_1") and seen["unreadable"] == ("checkpoint_2",)
    # Epoch 2 is trained again: its row goes, the pointers name what the run continues from.
    assert [row["epoch"] for row in rundir.read_metrics(str(run_dir))] == [1]
    pointers = json.loads((run_dir / "checkpoints.json").read_text())
    assert pointers["latest"] == pointers["best"] == {"path": "ray/checkpoint_1", "epoch": 1}


def test_resume_falls_back_past_a_checkpoint_that_was_never_reported(synthetic_shards, tmp_path):
    # A kill between rank 0 writing epoch 3's checkpoint and its report leaves checkpoint_3 with no metrics row
    # and no pointer: continuing from it would leave epoch 3 out of the run's history.
    run_dir = _run_with_checkpoints(tmp_path, synthetic_shards, (1, 2, 3))
    write_pointers(str(run_dir), {"latest": {"path": "ray/checkpoint_2", "epoch": 2}})
    rundir.write_metrics(str(run_dir), [{"epoch": e, "loss": 1.0 / e} for e in (1, 2)])
    latest = run_dir / "ray" / "checkpoint_2" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:1000])
    point = resume_point(str(run_dir))
    assert (point.checkpoint, point.epoch) == (str(run_dir / "ray" / "checkpoint_1"), 1)


def test_resume_with_no_readable_checkpoint_is_one_line_before_ray(synthetic_shards, tmp_path, monkeypatch):
    from neoray.commands import train as train_command

    run_dir = _run_with_checkpoints(tmp_path, synthetic_shards, (1,))
    latest = run_dir / "ray" / "checkpoint_1" / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:-500])
    with pytest.raises(CheckpointError, match="no other checkpoint to fall back to"):
        resume_point(str(run_dir))
    monkeypatch.setattr(train_command, "connect", _no_ray)
    code, _, err = run_cli(["train", str(run_dir / "config.yaml"), "--resume", str(run_dir)])
    assert code == 1 and str(latest) in one_line(err)


# ----------------------------------------------------------------------------------------------------
# 3. A checkpoint that cannot be written (a full disk) stops the run with the reason, nothing partial left
# ----------------------------------------------------------------------------------------------------


def test_a_checkpoint_that_cannot_be_written_stops_the_run_with_the_reason(tmp_path):
    from test_train_loop import TinyDetector, make_batches, ready, tiny_config

    class FullDisk(LocalContext):
        def persist(self, checkpoint_dir):
            if len(self.reports) == 1:  # the second epoch's checkpoint
                raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "ray"))
            return super().persist(checkpoint_dir)

    batches = make_batches(8, 4)
    ctx = FullDisk(ready(batches), checkpoint_root=tmp_path / "ckpts")
    run_training_loop(tiny_config(epochs=4), ctx, model_fn=TinyDetector, log=None)
    assert [r["epoch"] for r in ctx.reports] == [1, 2]  # stopped after the epoch it could not checkpoint
    assert ctx.reports[-1]["stop_reason"].startswith("disk full: the checkpoint of epoch 2 could not be written")
    assert sorted(p.name for p in (tmp_path / "ckpts").iterdir()) == ["epoch_0001"]


def test_a_checkpoint_copied_onto_a_full_disk_leaves_no_partial_folder(tmp_path, monkeypatch):
    from neoray import ray_compat
    from neoray.engine.ray_context import RayTrainContext

    source = tmp_path / "local"
    source.mkdir()
    (source / "checkpoint.pt").write_bytes(os.urandom(3 << 20))
    with small_disk(tmp_path / "disk", "2m") as disk:
        (disk / "ray").mkdir()
        monkeypatch.setattr(ray_compat, "train_run_storage",
                            lambda: (__import__("pyarrow.fs").fs.LocalFileSystem(), str(disk / "ray"), "checkpoint_x"))
        with pytest.raises(OSError, match="No space left|space"):
            RayTrainContext.persist(None, str(source))
        assert list((disk / "ray").iterdir()) == []  # neither the checkpoint nor its partial copy


# ----------------------------------------------------------------------------------------------------
# 4 and 5. Sweeps: SIGTERM is Ctrl-C; one sweep directory, one sweep
# ----------------------------------------------------------------------------------------------------


def _sweep_inputs(tmp_path: Path, shards: dict, trials: int, epochs: int = 1) -> tuple[str, str]:
    config = _tiny_config(tmp_path / "tiny.yaml", shards, tmp_path / "runs", epochs=epochs)
    space = tmp_path / "space.yaml"
    space.write_text(yaml.safe_dump({
        "params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
        "asha": {"time_attr": "epoch", "grace_period": epochs, "reduction_factor": 2},  # no early stop
        "search": {"seed": 0, "num_samples": trials},
    }))
    return str(config), str(space)


@pytest.mark.slow
def test_a_sweep_stopped_by_sigterm_resumes_with_a_consistent_study(synthetic_shards, tmp_path, ray_tmp):
    import optuna

    config, space = _sweep_inputs(tmp_path, synthetic_shards, trials=3, epochs=2)
    output, name = tmp_path / "sweeps", "term"
    sweep_dir = output / name
    argv = ["sweep", "--config", config, "--space", space, "--output", str(output), "--name", name,
            "--max-concurrent", "1"]
    run = Neoray(argv, ray_tmp, tmp_path / "first.log")
    run.wait_for("[neoray] trial_0002 started")  # trial_0001 has ended, trial_0002 runs
    os.kill(run.proc.pid, signal.SIGTERM)  # the driver alone, as Kubernetes does
    code, first = run.finish()
    assert code == 143, first[-3000:]
    resume = shlex.join(["neoray", *argv, "--resume"])
    assert last_line(first) == f"sweep stopped by SIGTERM; continue with: {resume}", first[-3000:]
    assert "Traceback" not in first, first[-3000:]
    assert _csv_rows(sweep_dir)["trial_0001"]["status"] == "finished"  # the partial table
    assert (sweep_dir / "trials.md").read_text().startswith("**Partial results")

    code, out = Neoray([*argv, "--resume"], ray_tmp, tmp_path / "second.log").finish()
    assert code == 0, out[-4000:]
    rows = _csv_rows(sweep_dir)
    assert set(rows) == {"trial_0001", "trial_0002", "trial_0003"}
    assert all(row["status"] == "finished" for row in rows.values()), rows
    study = optuna.load_study(study_name=name, storage=f"sqlite:///{sweep_dir / 'optuna.db'}")
    assert len(study.trials) == 3 and all(t.state.name == "COMPLETE" for t in study.trials), study.trials


def test_a_trial_the_study_opened_just_before_a_kill_is_handed_out_again_on_resume(tmp_path):
    import optuna

    from neoray.tune import study

    url = f"sqlite:///{tmp_path}/optuna.db"
    space = {"lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)}

    def searcher():
        return study.StudySearch(space=space, metric="score", mode="max", sampler=optuna.samplers.RandomSampler(0),
                                 storage=study.open_storage(url), study_name="s")

    first = searcher()
    first.suggest("a")
    first.on_trial_complete("a", {"score": 0.3, "training_iteration": 1})
    first.save(str(tmp_path / "searcher.pkl"))  # Tune's last save before the kill
    orphan = first.suggest("b")  # asked for, then the driver was SIGKILLed before Tune saved again
    restored = searcher()
    restored.restore(str(tmp_path / "searcher.pkl"))  # --resume
    again = restored.suggest("b")
    restored.on_trial_complete("b", {"score": 0.2, "training_iteration": 1})
    trials = optuna.load_study(study_name="s", storage=url).trials
    assert again == orphan and [t.state.name for t in trials] == ["COMPLETE", "COMPLETE"]  # no third, no FAIL


def test_a_trial_that_had_finished_before_a_resume_still_counts_as_finished():
    from types import SimpleNamespace

    from neoray.tune.results import trial_ended

    def trial(status="TERMINATED", **last_result):  # as Tune restores it: its saved last result has no "done"
        return SimpleNamespace(status=status, last_result=last_result)

    assert trial_ended(trial(epoch=2), {}, max_t=2)  # ran every epoch
    assert trial_ended(trial(epoch=1, stop_reason="early stop at epoch 1"), {}, max_t=2)  # stopped itself
    assert not trial_ended(trial(epoch=1), {}, max_t=2)  # stopped by Ctrl-C or SIGTERM half way
    assert not trial_ended(trial(status="PENDING"), {}, max_t=2)


def test_two_sweeps_of_one_name_at_once_the_second_is_refused_in_one_line(synthetic_shards, tmp_path, monkeypatch):
    config, _ = _sweep_inputs(tmp_path, synthetic_shards, trials=1)
    inside, leave = threading.Event(), threading.Event()

    def connect(*args, **kwargs):  # the first sweep holds the directory while "Ray starts"
        inside.set()
        leave.wait(60)
        raise cluster.ClusterError("stopped here by the test")

    monkeypatch.setattr(sweep_module, "connect", connect)
    argv = ["sweep", "--config", config, "--output", str(tmp_path / "sweeps"), "--name", "same",
            "--num-samples", "1"]
    first = {}
    thread = threading.Thread(target=lambda: first.update(code=main(argv)))
    thread.start()
    assert inside.wait(120)
    code, _, err = run_cli(argv)
    leave.set()
    thread.join(60)
    assert code == 1 and f"{tmp_path / 'sweeps' / 'same'} already exists" in one_line(err)
    assert first["code"] == 1
    assert not (tmp_path / "sweeps" / "same").exists()  # the failed start gave the name back


def test_a_second_driver_of_a_running_sweep_is_refused(tmp_path):
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time\nfrom neoray.tune.sweep import hold_sweep_lock\n"
                               f"hold_sweep_lock({str(sweep_dir)!r}); print('held', flush=True); time.sleep(120)"],
                              stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(sweep_module.ConfigError, match="another sweep is running there now"):
            sweep_module.hold_sweep_lock(str(sweep_dir))
    finally:
        holder.kill()
        holder.wait()
    sweep_module.hold_sweep_lock(str(sweep_dir))  # the kernel let go of a killed holder's lock
    sweep_module.release_sweep_lock()


# ----------------------------------------------------------------------------------------------------
# End to end: neoray train killed, stopped, starved of disk, its output deleted
# ----------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_train_stopped_by_sigterm_then_resumed_past_a_truncated_checkpoint(synthetic_shards, tmp_path, ray_tmp):
    # Enough epochs that the signal lands mid-run however fast the machine finishes one after "epoch 2".
    config = _tiny_config(tmp_path / "tiny.yaml", synthetic_shards, tmp_path / "runs", epochs=6)
    run = Neoray(["train", str(config)], ray_tmp, tmp_path / "first.log")
    run.wait_for("epoch 2 |")
    os.kill(run.proc.pid, signal.SIGTERM)
    code, first = run.finish()
    assert code == 143, first[-3000:]
    (run_dir,) = (tmp_path / "runs").iterdir()
    last = last_line(first)
    stopped = re.match(r"neoray train: stopped by SIGTERM after (\d+) epochs", last)
    assert stopped and 2 <= int(stopped.group(1)) < 6 and f"--resume {run_dir}" in last, last
    assert len(rundir.read_metrics(str(run_dir))) == int(stopped.group(1))  # the message counts what was kept
    assert json.loads((run_dir / "summary.json").read_text())["stop_reason"] == "interrupted"

    pointers = json.loads((run_dir / "checkpoints.json").read_text())
    latest = run_dir / pointers["latest"]["path"] / "checkpoint.pt"
    latest.write_bytes(latest.read_bytes()[:2000])  # a crash of the disk, not of neoray
    code, second = Neoray(["train", str(config), "--resume", str(run_dir)], ray_tmp, tmp_path / "second.log").finish()
    assert code == 0, second[-4000:]
    assert "the latest checkpoint cannot be read" in second and "resuming from the previous one" in second
    assert not worker_tracebacks(second), second[-4000:]
    assert [row["epoch"] for row in rundir.read_metrics(str(run_dir))] == [1, 2, 3, 4, 5, 6]  # every epoch once


@pytest.mark.slow
def test_a_disk_that_fills_during_training_stops_in_one_line_and_resumes_after_freeing_space(
        synthetic_shards, tmp_path, ray_tmp):
    disk = tmp_path / "disk"
    with small_disk(disk, "24m"):  # config, metrics and one checkpoint of rtdetr_cpu (~7 MB), not three
        config = _tiny_config(tmp_path / "tiny.yaml", synthetic_shards, disk, epochs=6)
        code, out = Neoray(["train", str(config)], ray_tmp, tmp_path / "first.log").finish()
        assert code == 1, out[-4000:]
        assert not worker_tracebacks(out), out[-4000:]
        (run_dir,) = disk.iterdir()
        assert last_line(out).startswith("neoray train: disk full: the checkpoint of epoch"), out[-3000:]
        assert not [p for p in (run_dir / "ray").iterdir() if p.name.startswith(".partial-")]
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["stop_reason"].startswith("disk full")
        assert _mount("-o", "remount,size=256m", str(disk))
        code, out = Neoray(["train", str(config), "--resume", str(run_dir)], ray_tmp, tmp_path / "second.log").finish()
        assert code == 0, out[-4000:]
        assert [row["epoch"] for row in rundir.read_metrics(str(run_dir))] == [1, 2, 3, 4, 5, 6]


@pytest.mark.slow
def test_an_output_deleted_while_training_ends_in_one_line_without_a_worker_traceback(synthetic_shards, tmp_path,
                                                                                      ray_tmp):
    config = _tiny_config(tmp_path / "tiny.yaml", synthetic_shards, tmp_path / "runs", epochs=4)
    run = Neoray(["train", str(config)], ray_tmp, tmp_path / "train.log")
    run.wait_for("epoch 1 |")
    (run_dir,) = (tmp_path / "runs").iterdir()
    shutil.rmtree(run_dir)
    code, out = run.finish()
    assert code == 1, out[-4000:]
    assert not worker_tracebacks(out), out[-4000:]
    assert last_line(out).startswith(f"neoray train: {run_dir}: the run directory was deleted while the run went on")
    assert not run_dir.exists()  # nothing wrote it again


def test_a_killed_driver_takes_its_local_ray_instance_with_it(ray_tmp):
    script = ("from neoray.cluster import connect\nimport time\nconnect('local', num_cpus=1, log=None)\n"
              "print('READY', flush=True)\ntime.sleep(600)\n")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env.update(RAY_TMPDIR=ray_tmp, RAY_USAGE_STATS_ENABLED="0",
               PYTHONPATH=os.pathsep.join([str(REPO_ROOT), env.get("PYTHONPATH", "")]))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, stdout=subprocess.PIPE, text=True,
                            start_new_session=True)
    assert proc.stdout.readline().strip() == "READY"
    deadline = time.monotonic() + 60
    while not any("DashboardAgent" in c or "RuntimeEnvAgent" in c for c in descendants(proc.pid).values()):
        assert time.monotonic() < deadline, descendants(proc.pid)
        time.sleep(0.5)
    time.sleep(2)  # the watchdog's next look at the instance
    instance = set(descendants(proc.pid)) - {proc.pid}
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 20  # Ray's agents alone lingered about 60 s
    while alive(instance) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert not alive(instance), {pid: c for pid, c in descendants(1).items() if pid in alive(instance)}
