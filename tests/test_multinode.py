"""neoray on a Ray cluster of three nodes that do not share a disk, made on this one machine.

The head node (0 CPUs, as cluster.yaml's: it only schedules) runs in this machine's namespace and sees
the test's folder; each of the two worker nodes is started with `ray start --address=...` inside its
own `unshare --mount`, with a private, empty tmpfs mounted over the test's folder, so it sees its own
empty disk there, as a second machine would. Shared storage is the S3 server of conftest.py, which
every node reaches on 127.0.0.1.

Isolation from every other Ray on the machine: the head has its own temp dir and free ports, HOME is a
temp dir and the token travels in RAY_AUTH_TOKEN (as in test_job_submit.py); teardown kills exactly the
processes of this cluster (by temp dir, and every process in a worker node's mount namespace).
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml
from cli_output import one_line
from conftest import free_port
from process_tools import kill_all, pids_naming

from neoray import storage

BIN = Path(sys.executable).parent
RUN_TIMEOUT_S = 900  # a hang guard, not a speed assertion
TINY_MODEL = {"hidden_dim": 32, "num_queries": 20, "num_denoising": 10}

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None,
                       reason="a node without the test's disk needs `unshare --mount` and root"),
]


def _mount_namespace(pid: int) -> str | None:
    try:
        return os.readlink(f"/proc/{pid}/ns/mnt")
    except OSError:
        return None


def _pids_in_namespace(namespace: str) -> list[int]:
    return [int(p.name) for p in Path("/proc").iterdir()
            if p.name.isdigit() and int(p.name) != os.getpid() and _mount_namespace(int(p.name)) == namespace]


class Cluster:
    def __init__(self, root: Path):
        self.root = root  # the folder the worker nodes do not see
        self.temp_dir = tempfile.mkdtemp(prefix="nrmn")  # short: Ray's socket paths must stay < 107 bytes
        self.home = Path(tempfile.mkdtemp(prefix="nrhome"))
        self.gcs_port = free_port()
        self.address = f"127.0.0.1:{self.gcs_port}"
        self.env = {k: v for k, v in os.environ.items() if not k.startswith(("RAY_ADDRESS", "RAY_AUTH"))}
        self.env.update(HOME=str(self.home), RAY_TMPDIR=self.temp_dir, RAY_USAGE_STATS_ENABLED="0",
                        RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=secrets.token_hex(16),
                        PATH=f"{BIN}{os.pathsep}{self.env.get('PATH', '')}")
        self.nodes: list[tuple[subprocess.Popen, str]] = []  # (unshare process, its mount namespace)

    def start(self) -> None:
        out = subprocess.run(
            [str(BIN / "ray"), "start", "--head", "--num-cpus", "0", "--temp-dir", self.temp_dir,
             "--port", str(self.gcs_port), "--dashboard-port", str(free_port()),
             "--dashboard-agent-listen-port", str(free_port()), "--ray-client-server-port", str(free_port()),
             "--include-dashboard=true", "--disable-usage-stats"],
            env=self.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=300)
        assert out.returncode == 0, out.stdout[-3000:]
        for count in (2, 3):  # one at a time: two nodes starting together on one machine stalled
            self.add_node()
            self.wait_for_nodes(count)

    def add_node(self) -> None:
        start = (f"mount -t tmpfs tmpfs {self.root} && exec {BIN / 'ray'} start --address={self.address} "
                 f"--num-cpus 3 --dashboard-agent-listen-port {free_port()} --disable-usage-stats --block")
        proc = subprocess.Popen(["unshare", "--mount", "--propagation", "private", "sh", "-c", start], env=self.env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + 30
        while (namespace := _mount_namespace(proc.pid)) == _mount_namespace(os.getpid()) or namespace is None:
            assert time.monotonic() < deadline and proc.poll() is None, "unshare did not start"
            time.sleep(0.1)
        self.nodes.append((proc, namespace))

    def alive_nodes(self) -> list[dict]:
        code = ("import json, ray; ray.init(address='%s', configure_logging=False, log_to_driver=False); "
                "print('NODES=' + json.dumps([{'id': n['NodeID'], 'cpus': n['Resources'].get('CPU', 0)} "
                "for n in ray.nodes() if n['Alive']]))" % self.address)
        out = subprocess.run([sys.executable, "-c", code], env=self.env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
        # the marked line: Ray may print its own lines to stdout around it
        return json.loads(next(line for line in out.stdout.splitlines() if line.startswith("NODES="))[len("NODES="):])

    def wait_for_nodes(self, count: int) -> None:
        deadline = time.monotonic() + 120
        while len(self.alive_nodes()) != count:
            assert time.monotonic() < deadline, f"the cluster did not reach {count} alive nodes"
            time.sleep(1)

    def kill_node(self, index: int) -> None:
        """SIGKILL every process of a worker node (its raylet, its Ray workers): the node is lost."""
        proc, namespace = self.nodes[index]
        kill_all(lambda: _pids_in_namespace(namespace), pause_s=0.3)
        proc.wait(timeout=30)

    def stop(self) -> None:
        for index in range(len(self.nodes)):
            self.kill_node(index)
        kill_all(lambda: pids_naming(self.temp_dir))
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        shutil.rmtree(self.home, ignore_errors=True)

    def neoray(self, *args: str, timeout: float = RUN_TIMEOUT_S) -> subprocess.CompletedProcess:
        return subprocess.run([str(BIN / "neoray"), *args, "--address", self.address], env=self.env, cwd=self.root,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def cluster(ray_session, synthetic_dataset, s3_server, tmp_path_factory):
    root = tmp_path_factory.mktemp("multinode")
    shutil.copytree(synthetic_dataset, root / "dataset")
    cluster = Cluster(root)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()


@pytest.fixture(scope="module")
def s3_shards(cluster, s3_server):
    """The synthetic dataset prepared into shards on S3, by Ray tasks on the worker nodes (which read the
    source from S3 too: the head's disk is not theirs)."""
    import boto3

    bucket = f"neoray-mn-{secrets.token_hex(4)}"
    boto3.client("s3").create_bucket(Bucket=bucket)
    source = f"s3://{bucket}/dataset"
    for path in sorted((cluster.root / "dataset").rglob("*")):
        if path.is_file():
            storage.write_bytes(f"{source}/{path.relative_to(cluster.root / 'dataset').as_posix()}", path.read_bytes())
    for split in ("train", "val"):
        out = cluster.neoray("prepare", "--coco", f"{source}/annotations/instances_{split}.json", "--images",
                             f"{source}/{split}", "--out", f"s3://{bucket}/shards/{split}", "--size", "160x90")
        assert out.returncode == 0, out.stderr[-3000:]
    return f"s3://{bucket}"


def _config(cluster: Cluster, data: str, name: str, **train) -> str:
    path = cluster.root / f"{name}.yaml"
    path.write_text(yaml.safe_dump({
        "name": name, "model": {"name": "rtdetr_cpu", "options": TINY_MODEL},
        "data": {"train": f"{data}/train", "val": f"{data}/val", "size": "160x90", "shuffle_buffer": 8},
        "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "cpus_per_worker": 1, "seed": 1, **train},
    }))
    return str(path)


def test_a_local_path_the_other_nodes_cannot_see_is_refused_in_one_line(cluster):
    local = cluster.root / "shards"
    for split in ("train", "val"):
        out = subprocess.run([str(BIN / "neoray"), "prepare", "--coco",
                              str(cluster.root / "dataset" / "annotations" / f"instances_{split}.json"), "--images",
                              str(cluster.root / "dataset" / split), "--out", str(local / split), "--size", "160x90",
                              "--workers", "1"], env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
    # three epochs: the default space's grace period (3) must fit the run, so that the data check is reached
    config = _config(cluster, str(local), "local", workers=2, epochs=3)
    for command in (["train", config, "--output", str(cluster.root / "runs")],
                    ["sweep", "--config", config, "--output", str(cluster.root / "sweeps"), "--num-samples", "2"]):
        out = cluster.neoray(*command, timeout=300)
        assert out.returncode != 0
        error = one_line(out.stderr)
        assert "data.train: " in error and "is a local path that the node at" in error and "s3://" in error
        assert "Traceback" not in out.stdout + out.stderr
    assert not (cluster.root / "runs").exists()


def test_two_workers_on_two_nodes_train_from_and_to_s3(cluster, s3_shards):
    config = _config(cluster, f"{s3_shards}/shards", "spread", workers=2, placement="spread")
    out = cluster.neoray("train", config, "--output", f"{s3_shards}/runs")
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    history = storage.read_json(f"{s3_shards}/runs/spread/metrics.json")
    assert [row["epoch"] for row in history] == [1, 2]
    workers = {node["id"] for node in cluster.alive_nodes() if node["cpus"] > 0}
    for row in history:  # the Ray node of each rank, as the workers reported it
        assert set(row["nodes"].split(",")) == workers


def test_a_sweep_on_a_prefix_runs_its_trials_on_the_worker_nodes_and_continues_the_best_there(cluster, s3_shards):
    # Two-worker trials (a TorchTrainer per trial, its checkpoints under SWEEP_DIR/trials in the bucket) train
    # epochs 1-2 of a 3-epoch schedule; the best continues from its checkpoint in the bucket to epoch 3.
    config = _config(cluster, f"{s3_shards}/shards", "sweep", epochs=3, workers=2)
    space = cluster.root / "space.yaml"
    space.write_text(yaml.safe_dump({"params": {"lr": {"distribution": "log_uniform", "low": 3e-4, "high": 3e-3}},
                                     "asha": False, "search": {"seed": 0, "num_samples": 2, "trial_epochs": 2}}))
    # Two trials at once would leave each 3-CPU node 0.99 CPUs (two workers and a trial driver's 0.01), where no
    # 1-CPU task of Ray Data can start: they waited forever. The plan runs one at a time here.
    out = cluster.neoray("sweep", "--config", config, "--space", str(space), "--output", f"{s3_shards}/sweeps",
                         "--name", "mn", "--max-concurrent", "2", timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "--max-concurrent 2 lowered to 1" in out.stdout
    sweep_dir = f"{s3_shards}/sweeps/mn"
    assert storage.is_file(f"{sweep_dir}/best_config.yaml")
    workers = {node["id"] for node in cluster.alive_nodes() if node["cpus"] > 0}
    steps = {}
    for trial in ("trial_0001", "trial_0002"):
        rows = [json.loads(line) for line in storage.read_text(f"{sweep_dir}/{trial}/result.json").splitlines()]
        assert [r["epoch"] for r in rows] == [1, 2] and set(rows[-1]["nodes"].split(",")) <= workers
        assert f"/sweeps/mn/trials/{trial}/" in rows[-1]["checkpoint_path"]
        steps[trial] = rows[-1]["step"]
    best = storage.read_text(f"{sweep_dir}/trials.md")
    assert f"run directory {sweep_dir}/final" in best
    history = storage.read_json(f"{sweep_dir}/final/metrics.json")
    assert [row["epoch"] for row in history] == [3] and set(history[0]["nodes"].split(",")) <= workers
    assert history[0]["step"] == steps["trial_0001"] * 3 // 2  # continued from epoch 2, not started again
    assert storage.read_json(f"{sweep_dir}/final/summary.json")["stop_reason"] == "completed"


def test_workers_that_fill_their_node_get_their_batches_decoded_on_another(cluster, s3_shards):
    # Three 1-CPU workers packed onto one 3-CPU node hold every CPU there: the batch tasks that prefer the
    # worker's node must run on the other node instead of waiting for this one forever.
    config = _config(cluster, f"{s3_shards}/shards", "packed", workers=3, epochs=1, placement="pack")
    out = cluster.neoray("train", config, "--output", f"{s3_shards}/runs", timeout=420)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    history = storage.read_json(f"{s3_shards}/runs/packed/metrics.json")
    assert [row["epoch"] for row in history] == [1]
    assert len(set(history[0]["nodes"].split(","))) == 1  # the three ranks did share one node


def test_losing_a_node_mid_run_resumes_on_the_nodes_that_remain(cluster, s3_shards):
    config = _config(cluster, f"{s3_shards}/shards", "survivor", workers=2, placement="spread", epochs=4,
                     max_failures=2)
    metrics = f"{s3_shards}/runs/survivor/metrics.json"
    proc = subprocess.Popen([str(BIN / "neoray"), "train", config, "--output", f"{s3_shards}/runs", "--address",
                             cluster.address], env=cluster.env, cwd=cluster.root, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + RUN_TIMEOUT_S
        while not (storage.exists(metrics) and storage.read_json(metrics)):  # epoch 1 recorded: epoch 2 runs
            assert proc.poll() is None and time.monotonic() < deadline, proc.stdout.read()[-3000:]
            time.sleep(0.2)
        cluster.kill_node(1)
        output, _ = proc.communicate(timeout=RUN_TIMEOUT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, output[-4000:]
    history = storage.read_json(metrics)
    assert [row["epoch"] for row in history] == [1, 2, 3, 4]  # each epoch once: none redone, none lost
    survivor = {node["id"] for node in cluster.alive_nodes() if node["cpus"] > 0}
    assert len(set(history[0]["nodes"].split(","))) == 2  # epoch 1 ran on both worker nodes ...
    assert len(survivor) == 1 and set(history[-1]["nodes"].split(",")) == survivor  # ... the last on the survivor
    assert storage.read_json(f"{s3_shards}/runs/survivor/summary.json")["stop_reason"] == "completed"
