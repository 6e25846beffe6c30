"""A multi-worker trial's record of its Train worker placement groups, and their release.

Kept apart from ``neoray.tune.trainable`` on purpose: ``RecordPlacementGroupCallback`` is a Ray Train
controller callback, and the controller (a fresh process per trial) imports the module of every callback it
is given. This module needs only Ray and neoray.storage; ``trainable`` brings torch and the whole engine,
which cost the controller seconds of imports before it could start the trial's workers (measured in
benchmarks/bench_sweep_overhead.py; see README "Benchmarks").
"""

from __future__ import annotations

import ray
from ray.util.placement_group import PlacementGroup, remove_placement_group

from neoray import ray_compat, storage

PG_RECORD = "train_placement_groups.txt"  # ids of a trial's Train worker placement groups


def trial_record_path(sweep_dir: str, trial_name: str) -> str:
    """Where a trial lists its Train worker placement groups: in the sweep's storage, which the driver
    reads from any node (a trial's own directory lives on the node that ran it)."""
    return storage.join(sweep_dir, "trials", trial_name, PG_RECORD)


class RecordPlacementGroupCallback(ray_compat.worker_group_callback_base()):
    """Appends the id of the trial's Train worker placement group to its record, for
    ``release_worker_pgs`` (see ray_compat.worker_group_callback_base for why). Ray passes
    non-UserCallback run_config callbacks to its controller for such workarounds."""

    def __init__(self, record_path: str):
        self.record_path = record_path

    def after_worker_group_start(self, worker_group):
        try:
            known = storage.read_text(self.record_path)
        except FileNotFoundError:
            known = ""
        pg_id = ray_compat.worker_group_placement_group_id(worker_group)
        storage.write_text(self.record_path, known + pg_id + "\n")  # one line per worker-group (re)start


def release_worker_pgs(record_path: str) -> int:
    """Remove the placement groups listed in ``record_path`` that are still alive; returns how many."""
    try:
        ids = set(storage.read_text(record_path).split())
    except FileNotFoundError:
        return 0
    removed = 0
    for pg_id in ids:
        pg = PlacementGroup(ray.PlacementGroupID(bytes.fromhex(pg_id)))
        if ray.util.placement_group_table(pg).get("state") not in (None, "REMOVED"):
            remove_placement_group(pg)
            removed += 1
    return removed


__all__ = ["PG_RECORD", "RecordPlacementGroupCallback", "release_worker_pgs", "trial_record_path"]
