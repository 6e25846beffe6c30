"""ASHA's settings, in one type from the space file and the command line to the report, its rungs, and the
record of the trials it stopped. Nothing here imports Ray (the scheduler itself is neoray.tune.scheduler).

``AshaSettings`` as a space file writes it may give the grace period as a fraction of the run
(``grace_period: 0.33``) and has no ``max_t``; ``resolved(epochs)`` turns it into epochs for one training
config, which is the form a sweep records and every reader (results, rung trust, report, trackers) uses.
Rungs are at ``grace_period * reduction_factor^k`` epochs below ``max_t``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from neoray import storage

TIME_ATTRS = ("epoch", "training_iteration")
STOPPED_FILE = "asha_stopped.json"  # {trial: {time_attr: t, score: s}} for every trial ASHA stopped


@dataclass(frozen=True)
class AshaSettings:
    # "epoch" is the engine's count of epochs finished; unlike training_iteration it survives a TorchTrainer
    # trial's restart (Tune holds no checkpoint of its own for those trials).
    time_attr: str = "epoch"
    grace_period: int | float = 1  # epochs, or a fraction (0, 1) of train.epochs until resolved
    reduction_factor: float = 2
    max_t: int | None = None  # the run's epochs, once resolved
    enabled: bool = True  # False (``asha: false`` in a space file): no early stopping, every trial runs to the end

    def resolved(self, epochs: int) -> "AshaSettings":
        """These settings for a run of ``epochs`` epochs: a fractional grace period becomes that share of the
        run (rounded, at least 1 epoch), ``max_t`` the run's length."""
        grace = self.grace_period
        if isinstance(grace, float) and grace < 1:
            grace = max(1, round(grace * epochs))
        return replace(self, grace_period=int(grace), max_t=int(epochs))

    def with_overrides(self, grace_period: int | None = None, reduction_factor: float | None = None
                       ) -> "AshaSettings":
        """The command line's ``--grace-period`` / ``--reduction-factor`` over the space file's values; either one
        turns early stopping on where the space file has it off (``asha: false``): asking for a rung is asking for
        ASHA."""
        changes = {}
        if grace_period is not None:
            changes["grace_period"] = grace_period
        if reduction_factor is not None:
            changes["reduction_factor"] = reduction_factor
        if changes:
            changes["enabled"] = True
        return replace(self, **changes)

    @property
    def rungs(self) -> list[float]:
        """The milestones at which ASHA compares trials (needs ``max_t``: see ``resolved``); none when disabled."""
        if not self.enabled:
            return []
        return asha_rungs(self.grace_period, self.reduction_factor, self.max_t)

    def to_dict(self) -> dict:
        return asdict(self)


def asha_rungs(grace_period: float, reduction_factor: float, max_t: int | None) -> list[float]:
    """grace_period * rf^k for every k with a value below max_t."""
    if max_t is None:
        raise ValueError("ASHA's rungs need max_t: resolve the settings against the run's epochs first")
    rungs, t = [], float(grace_period)
    while t < max_t:
        rungs.append(t)
        t *= reduction_factor
    return rungs


def stopped_path(sweep_dir: str) -> str:
    return storage.join(sweep_dir, STOPPED_FILE)


def read_stopped(sweep_dir: str) -> dict:
    """The trials ASHA stopped before max_t, ``{trial: {time_attr: t, "score": s}}`` ({} when none yet)."""
    try:
        return storage.read_json(stopped_path(sweep_dir))
    except FileNotFoundError:
        return {}


def record_stopped(sweep_dir: str, trial: str, entry: dict) -> None:
    """Add one stopped trial to the record, written atomically as the decision is made (it survives a
    killed driver)."""
    stopped = read_stopped(sweep_dir)
    stopped[trial] = entry
    storage.write_json(stopped_path(sweep_dir), stopped, indent=2)


__all__ = ["STOPPED_FILE", "TIME_ATTRS", "AshaSettings", "asha_rungs", "read_stopped", "record_stopped",
           "stopped_path"]
