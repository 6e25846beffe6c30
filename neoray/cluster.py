"""Which Ray cluster neoray runs on: one connection policy for every command that uses Ray.

``--address`` (or ``RAY_ADDRESS``):

* ``local``: start a private Ray instance for this command, even when another one runs on the machine;
* ``auto``: join the Ray instance started with ``ray start`` on this machine (an error when there is none);
* ``HOST:PORT`` or ``ray://HOST:PORT``: join that cluster.

Without either, neoray starts a private local instance: it never joins a cluster it was not told about
(on a shared workstation, ``ray.init()`` would join whichever instance another user started last).
Inside ``ray job submit`` Ray sets ``RAY_ADDRESS`` for the job, so jobs run on their cluster. Every
connection prints one line: which cluster, how many nodes, CPUs and GPUs. A ``HOST:PORT`` where nothing
accepts a connection (a cluster that is gone, a stale ``RAY_ADDRESS``) is refused in one line within
``REACH_TIMEOUT_S``, before ``ray.init``, which would retry such an address for minutes.

Once connected, ``plan_trials`` sizes a run (or each trial of a sweep) against the cluster and refuses
what cannot be placed, and ``check_visible_on_all_nodes`` refuses local paths that not every node sees.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
import uuid
from dataclasses import dataclass
from typing import Callable

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from neoray import interrupts, ray_compat, ray_reaper, storage
from neoray.config import Config, ConfigError

ADDRESS_ENV = "RAY_ADDRESS"
REACH_TIMEOUT_S = 10.0  # for a HOST:PORT to accept a TCP connection before Ray is asked to join it
RAY_CLIENT_PORT = 10001  # Ray Client's default, for a ray://HOST without a port
ADDRESS_HELP = ("Ray cluster: 'local' (a private instance, the default), 'auto' (the one `ray start` runs on "
                "this machine) or HOST:PORT / ray://HOST:PORT; default: $RAY_ADDRESS if set, else local")


class ClusterError(RuntimeError):
    """Ray cannot be reached or used as asked; one line."""


@dataclass
class ClusterInfo:
    address: str  # what was asked for ("local", "auto", an address)
    how: str  # "started" (a private instance of this process), "joined" (the address), "connected already"
    nodes: int
    cpus: float
    gpus: float

    def line(self) -> str:
        where = {"started": "started a local Ray instance", "joined": f"joined the Ray cluster at {self.address}",
                 "connected already": "using the Ray instance this process is connected to"}[self.how]
        return (f"{where}: {self.nodes} node{'s' if self.nodes != 1 else ''}, {self.cpus:g} CPUs, "
                f"{self.gpus:g} GPUs")


def add_address_argument(parser) -> None:
    parser.add_argument("--address", default=None, metavar="ADDRESS", help=ADDRESS_HELP)


def requested_address(address: str | None) -> str:
    """The address a command was given, else $RAY_ADDRESS, else "local"."""
    return address or os.environ.get(ADDRESS_ENV) or "local"


def alive_nodes() -> list[dict]:
    """The resources of every alive node (``ray.nodes()`` entries' "Resources" plus "NodeID")."""
    return [{**node["Resources"], "NodeID": node["NodeID"]} for node in ray.nodes() if node.get("Alive")]


def describe(address: str, how: str) -> ClusterInfo:
    total = ray.cluster_resources()
    return ClusterInfo(address, how, len(alive_nodes()), float(total.get("CPU", 0)), float(total.get("GPU", 0)))


def connect(address: str | None = None, *, num_cpus: int | None = None,
            log: Callable[[str], None] | None = print) -> ClusterInfo:
    """Connect this process to Ray by the policy in the module docstring (once: later calls describe
    the existing connection). ``num_cpus`` applies to a local instance only."""
    target = requested_address(address)
    if ray.is_initialized():
        info = describe(target, "connected already")
    else:
        _check_reachable(target, from_env=not address and bool(os.environ.get(ADDRESS_ENV)))
        options = {"configure_logging": False, "log_to_driver": True}
        try:
            if target == "local":
                # With the dashboard (ray[default]): Train V2's placement-group cleaner uses its State API.
                ray.init(address="local", num_cpus=num_cpus, **options)
                ray_reaper.watch(ray_compat.local_instance_pids())  # it ends with this process, however it ends
            else:
                # "auto" must not fall back to RAY_ADDRESS silently: pass what was asked, resolved.
                ray.init(address=target, **options)
        except ConnectionError as exc:
            raise ClusterError(_connection_advice(target, exc)) from None
        except (ValueError, RuntimeError) as exc:
            raise ClusterError(f"cannot connect to Ray at {target!r}: {str(exc).strip().splitlines()[0]}") from None
        interrupts.install()  # ray.init replaced the SIGTERM handler with one that exits at once
        info = describe(target, "started" if target == "local" else "joined")
    if log:
        log(info.line())
    return info


def _host_port(target: str) -> tuple[str, int] | None:
    """(host, port) of a ``HOST:PORT`` or ``ray://HOST[:PORT]`` address; None for anything else (Ray
    parses it)."""
    text, default = (target[len("ray://"):], RAY_CLIENT_PORT) if target.startswith("ray://") else (target, None)
    host, sep, port = text.rpartition(":")
    if not sep or "]" in port:  # no port (or only an IPv6 address's colons)
        host, port = text, default
    host = host.strip("[]")
    try:
        port = int(port)
    except (TypeError, ValueError):
        return None
    return (host, port) if host and 0 < port < 65536 else None


def _check_reachable(target: str, from_env: bool) -> None:
    """Refuse (ClusterError, one line) an address where nothing accepts a TCP connection."""
    if target in ("local", "auto"):
        return
    where = _host_port(target)
    if where is None:
        return
    try:
        socket.create_connection(where, timeout=REACH_TIMEOUT_S).close()
    except OSError as exc:
        reason = f"no answer within {REACH_TIMEOUT_S:g} s" if isinstance(exc, TimeoutError) else (
            exc.strerror or str(exc).strip() or type(exc).__name__)
        source = f" (from ${ADDRESS_ENV})" if from_env else ""
        advice = f"; unset {ADDRESS_ENV} or pass --address local" if from_env else ""
        raise ClusterError(f"cannot connect to the Ray cluster at {target}{source}: nothing accepts connections at "
                           f"{where[0]}:{where[1]} ({reason}); is the cluster still running?{advice}") from None


def _connection_advice(target: str, exc: BaseException) -> str:
    if target == "auto":
        return ("--address auto: no Ray instance runs on this machine (start one with `ray start --head`, or "
                "use --address local)")
    first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return f"cannot connect to the Ray cluster at {target}: {first}"


# ----------------------------------------------------------------------------------------------------
# Resources: one plan for `neoray train` and for each trial of a sweep
# ----------------------------------------------------------------------------------------------------

# Ray Data's read and decode tasks need CPUs of their own; a run that holds every CPU starves them and
# waits forever ("Cluster resources are not enough ... may hang forever").
DATA_HEADROOM_CPUS = 1.0
# A multi-worker trial's driver only waits on its TorchTrainer; Tune refuses 0, so it asks for a sliver.
TRAINER_DRIVER_CPUS = 0.01
# ... but Ray Data's tasks and the batch tasks each need a whole CPU, and a sliver leaves its node a fraction
# short of one: two trials of 2 x 1-CPU workers on two 3-CPU nodes left 0.99 CPUs free on each, 1.98 in all,
# and no task could ever start (measured, Ray 2.60). Planning counts a trial's sliver as the whole CPU it spoils.
TRAINER_DRIVER_PLANNED_CPUS = 1.0
AUTOSCALE_HINT = "; if the cluster autoscales (ray up cluster.yaml), pass --autoscale to wait for new nodes"


@dataclass
class TrialResources:
    tune_request: dict  # what Tune reserves for a sweep trial itself
    cpus: float  # what one run or trial holds in all (its driver + its workers)
    gpus: float
    max_concurrent: int
    direct: bool  # True: one worker, which a sweep runs inside the trial itself


def worker_gpus(cfg: Config, gpus_per_worker: float | None) -> float:
    """The GPUs one worker gets: ``gpus_per_worker`` when given (the sweep's --gpus-per-worker, which it
    also writes into train.gpus_per_worker), else the config's, so planning and placement agree."""
    if gpus_per_worker is not None:
        return float(gpus_per_worker)
    return float(cfg.train.gpus_per_worker) if cfg.train.use_gpu else 0.0


def plan(cfg: Config, gpus_per_worker: float | None, max_concurrent: int | None, cluster: dict,
         nodes: list[dict] | None = None, autoscale: bool = False, sweep: bool = True) -> TrialResources:
    """Size each run and how many run at once so that every admitted one can place all its workers.

    ``cluster`` is ray.cluster_resources(); ``nodes`` the resources of each alive node. On a fixed
    cluster this refuses (ConfigError, one line) a run that cannot fit, in total, with the CPUs Ray Data
    needs, or because no single node holds one worker: otherwise its workers wait for resources forever.
    With ``autoscale`` today's resources say nothing about tomorrow's, so nothing is refused.
    ``sweep``: plan a sweep's trials (a multi-worker trial adds its driver); else one ``neoray train`` run.
    """
    workers, cpw = cfg.train.workers, cfg.train.cpus_per_worker
    direct = workers == 1
    gpw = worker_gpus(cfg, gpus_per_worker)
    run_cpus = workers * cpw + (TRAINER_DRIVER_CPUS if sweep and not direct else 0.0)
    planned_cpus = workers * cpw + (TRAINER_DRIVER_PLANNED_CPUS if sweep and not direct else 0.0)
    run_gpus = workers * gpw
    have_cpus, have_gpus = float(cluster.get("CPU", 0)), float(cluster.get("GPU", 0))
    usable_cpus = have_cpus - DATA_HEADROOM_CPUS
    what, hint = ("one trial" if sweep else "the run"), AUTOSCALE_HINT
    if max_concurrent is not None and max_concurrent < 1:
        raise ConfigError("--max-concurrent must be >= 1")
    if not autoscale:
        if run_cpus > usable_cpus + 1e-9:
            raise ConfigError(
                f"{what} needs {run_cpus:g} CPUs ({workers} workers x {cpw:g} train.cpus_per_worker) plus "
                f"{DATA_HEADROOM_CPUS:g} for Ray Data, but the cluster has {have_cpus:g}; lower the workers or "
                f"train.cpus_per_worker, or add nodes{hint}")
        if run_gpus > have_gpus + 1e-9:
            raise ConfigError(
                f"{what} needs {run_gpus:g} GPUs ({workers} workers x {gpw:g} GPUs per worker), but the cluster "
                f"has {have_gpus:g}; lower the workers or the GPUs per worker, or add GPU nodes{hint}")
        # One worker is one bundle, placed on one node: cluster totals can hide that no node is big enough.
        if nodes is not None and not any(n.get("CPU", 0) + 1e-9 >= cpw and n.get("GPU", 0) + 1e-9 >= gpw
                                         for n in nodes):
            raise ConfigError(
                f"one worker needs {cpw:g} CPUs and {gpw:g} GPUs on a single node, but no node has that (largest: "
                f"{max((n.get('CPU', 0) for n in nodes), default=0):g} CPUs, "
                f"{max((n.get('GPU', 0) for n in nodes), default=0):g} GPUs); lower train.cpus_per_worker or the "
                f"GPUs per worker, or add a bigger node{hint}")
    fit = math.floor(max(usable_cpus, 0.0) / planned_cpus + 1e-9) if planned_cpus > 0 else 1
    if run_gpus > 0:
        fit = min(fit, math.floor(have_gpus / run_gpus + 1e-9))
    if autoscale:
        # The autoscaler adds nodes for pending trials; without --max-concurrent, admit what fits today
        # (at least one) rather than guess the cluster's maximum.
        fit = max_concurrent if max_concurrent is not None else max(1, fit)
        waiting = "trials that do not fit today's cluster" if sweep else "workers that do not fit today's cluster"
        print(f"[neoray] --autoscale: {waiting} ({have_cpus:g} CPUs, {have_gpus:g} GPUs) wait for the autoscaler"
              + (f"; up to {fit} at a time" if sweep else ""), flush=True)
    elif max_concurrent is not None:
        if max_concurrent > fit and sweep:
            print(f"[neoray] --max-concurrent {max_concurrent} lowered to {fit}: more trials than that cannot "
                  f"place their workers on this cluster", flush=True)
        fit = min(fit, max_concurrent)
    request = {"cpu": cpw, "gpu": gpw} if direct else {"cpu": TRAINER_DRIVER_CPUS}
    return TrialResources(request, run_cpus, run_gpus, max(1, fit), direct)


def plan_trials(cfg: Config, gpus_per_worker: float | None, max_concurrent: int | None, *,
                autoscale: bool = False, sweep: bool = True) -> TrialResources:
    """``plan`` against the connected cluster."""
    return plan(cfg, gpus_per_worker, max_concurrent, ray.cluster_resources(), nodes=alive_nodes(),
                autoscale=autoscale, sweep=sweep)


# ----------------------------------------------------------------------------------------------------
# Paths every node must reach
# ----------------------------------------------------------------------------------------------------


def _look_on_node(checks: list[tuple[str, str]]) -> tuple[str, list[str]]:
    """(this node's address, the keys whose path this node does not see). Runs as a Ray task."""
    missing = [key for key, path in checks if not os.path.exists(path)]
    return ray.util.get_node_ip_address(), missing


def _make_dirs(path: str) -> list[str]:
    """``os.makedirs(path)``; returns the directories it created, outermost first (and only those)."""
    missing = []
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for folder in reversed(missing):
        os.mkdir(folder)
    return list(reversed(missing))


def check_visible_on_all_nodes(paths: dict[str, str]) -> None:
    """Refuse (ConfigError, one line) a local path that not every alive node sees, before anything runs.

    As Ray checks its storage path: a marker file is written from the driver into each directory that
    must be shared (the output), and a task on every node looks for it; inputs must exist on every node
    (a copy on each node's own disk is fine for reading). URIs are reachable from every node by nature."""

    local = {key: path for key, path in paths.items() if storage.local_path(path) is not None}
    if not local:
        return
    checks, markers, created = [], [], []
    for key, path in local.items():
        if key == "--output":
            created += _make_dirs(path)
            marker = os.path.join(path, f".neoray-visible-{uuid.uuid4().hex}")
            storage.write_text(marker, "written by the driver; every node must see it\n")
            markers.append(marker)
            checks.append((key, marker))
        else:
            checks.append((key, path))
    look = ray.remote(num_cpus=0)(_look_on_node)
    try:
        answers = ray.get([look.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                           .remote(checks) for node in alive_nodes()], timeout=120)
    finally:
        for marker in markers:
            storage.remove(marker)
        for path in reversed(created):  # leave no trace of a check (the run itself makes its directory)
            with contextlib.suppress(OSError):
                os.rmdir(path)
    for address, missing in answers:
        if missing:
            key = missing[0]
            raise ConfigError(f"{key}: {local[key]} is a local path that the node at {address} does not see; on a "
                              f"cluster of several nodes use a URI (s3://..., gs://...) or a mount every node has")


__all__ = [
    "ADDRESS_ENV", "ClusterError", "ClusterInfo", "DATA_HEADROOM_CPUS", "TrialResources", "add_address_argument",
    "alive_nodes", "check_visible_on_all_nodes", "connect", "describe", "plan", "plan_trials", "requested_address",
    "worker_gpus",
]
