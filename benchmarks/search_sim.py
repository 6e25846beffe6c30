"""The search-quality simulator: neoray's sweep policies replayed on recorded learning curves, without Ray.

A ground-truth table (benchmarks/bench_search.py ground-truth) holds, for every configuration of a design, the
score of every epoch of a full-length training, for one or several training seeds. A simulated sweep runs
exactly the policies the shipped sweep runs, on a simulated clock:

* the searcher is Optuna's own sampler (random, TPE or GP) asked and told through Optuna's ask/tell API, with
  the config's own values enqueued first, over the shipped space (log-uniform lr, warmup in steps of 10, the
  batch pairs); a suggestion trains the design configuration nearest to it (log-lr and warmup scaled by the
  design's span, the batch pair exactly);
* every trial of one sweep trains with the same training seed, as ``neoray sweep`` trains every trial with the
  config's one ``train.seed``; a simulated sweep draws that seed from its search seed among the table's recorded
  seeds. A configuration recorded at that seed gives its own curve; one recorded at seed 0 only gives its seed-0
  curve moved by the seed's shift (the mean per-epoch difference from seed 0 over the configurations recorded at
  both), because a training seed moves every configuration alike far more than it reorders them;
* ``workers`` trials run at a time; an epoch costs the seconds measured for its batch pair (one run at a time,
  bench_search.py cost); a trial's reports reach the scheduler in the order of the simulated clock;
* the scheduler is none, or ASHA as neoray.tune.scheduler.OrderedASHA decides it (a trial's cut at a rung from
  the trials before it in trial order; paused until they have been heard from), or promotion ASHA (a trial
  pauses at each rung and continues only once it ranks in the top 1/rf of that rung, which it may do later,
  resumed from its checkpoint); trials ASHA stops are told to Optuna PRUNED with their intermediate values
  (``tell_stopped="complete"`` replays the old behaviour, COMPLETE with the rung's score);
* the pick at any point is the trial with the best reported score so far (as ``neoray sweep`` picks its best
  trial), and its quality is its configuration's true final score: its final score averaged over the table's
  training seeds (recorded, or seed 0 moved by the seed's shift), i.e. an additive configuration + seed model.

``simulate`` returns the sweep's events; ``success_at`` says at which costs (epochs, seconds) the pick was
within the task's margin of the best configuration: max(2% of the best, 2 standard deviations of the noise that
reorders configurations). That noise is the configuration x seed interaction of the final score on the
configurations recorded at every seed (the residual of the additive model), not the raw seed-to-seed deviation:
the common shift of a seed moves the best and the pick alike, so it cannot make a pick look better or worse.
"""

from __future__ import annotations

import csv
import hashlib
import heapq
import io
import json
import math
from dataclasses import dataclass, field

import numpy as np
import optuna
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution
from optuna.trial import TrialState

WITHIN = 0.02  # relative: within 2% of the best configuration's true score
NOISE_SIGMAS = 2.0  # ... or within this many standard deviations of the training-seed noise, if that is wider
WORKERS = 2  # trials at a time, as the shipped demo runs them on 2 cores
# Budgets at which success is read, in full-length trainings: epochs summed over trials, or the sweep's own
# wall clock with WORKERS trials at a time (k full runs of the median batch pair, WORKERS at once).
BUDGETS_FULL_RUNS = (4, 6, 8, 12, 16, 24)
# Bumped whenever a change alters what a simulated sweep does or how its outcome is scored, so that outcomes
# stored by another version are not kept beside new ones (bench_search.py simulate, bench_search_peers.py).
# 2: every trial of a sweep trains at the sweep's one training seed; the margin from the configuration x seed
# interaction.
SIMULATOR_VERSION = 2
SELECT_SEEDS = range(0, 500)  # defaults are chosen on this block of search seeds ...
REPORT_SEEDS = range(1000, 1500)  # ... and the headline is read on this one


# ----------------------------------------------------------------------------------------------------
# The table
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Configuration:
    key: str
    lr: float
    warmup_steps: int
    batch: str
    curves: dict  # training seed -> tuple of per-epoch scores, as recorded


@dataclass
class Table:
    task: str
    configs: dict[str, Configuration]
    seconds_per_epoch: dict[str, float]  # batch pair -> seconds one epoch takes (one run at a time)
    lr_range: tuple[float, float] = (1e-3, 1.6e-2)
    warmup_range: tuple[int, int] = (20, 100)
    warmup_step: int = 10
    batches: tuple[str, ...] = ("4x1", "4x2", "8x1")
    own: dict = field(default_factory=lambda: {"lr": 2e-3, "warmup_steps": 20, "batch": "4x1"})
    # For a table trained at one seed only (v1): the interaction noise relative to the best configuration's score,
    # measured on a table of the same task that has seed repeats (``relative_noise``). None: the table's own.
    borrowed_relative_noise: float | None = None
    # Derived from the configurations once, when the table is made (plain attributes, not cached properties:
    # the Tune check pickles the class by value, and Python 3.11's cached_property holds a lock).
    seed_shift: dict = field(init=False, repr=False)  # training seed -> per-epoch shift from seed 0
    true_scores: dict = field(init=False, repr=False)  # configuration -> its quality
    noise_sigma: float = field(init=False, repr=False)  # the noise that reorders configurations

    def __post_init__(self) -> None:
        self.seed_shift = self._seed_shifts() if self.configs else {}
        self.true_scores = {key: float(np.mean([self.curve(c, s)[-1] for s in self.seeds]))
                            for key, c in self.configs.items()}
        self.noise_sigma = self._interaction_sigma() if self.configs else 0.0
        if self.borrowed_relative_noise is not None:
            if self.seed_sigma > 0:
                raise ValueError(f"{self.task}: the table has seed repeats, so its noise is its own; a borrowed noise "
                                 f"is only for a table trained at one seed")
            self.noise_sigma = self.borrowed_relative_noise * self.true_score(self.best.key)

    @property
    def epochs(self) -> int:
        return min(len(curve) for c in self.configs.values() for curve in c.curves.values())

    @property
    def seeds(self) -> list[int]:
        """Every training seed recorded for any configuration (seed 0 is recorded for all)."""
        return sorted({s for c in self.configs.values() for s in c.curves})

    def _seed_shifts(self) -> dict[int, np.ndarray]:
        """Per training seed, its per-epoch shift from seed 0: the mean difference over the configurations recorded
        at both."""
        shift = {}
        for seed in self.seeds:
            pairs = [np.subtract(c.curves[seed][:self.epochs], c.curves[0][:self.epochs])
                     for c in self.configs.values() if seed in c.curves]
            shift[seed] = np.mean(pairs, axis=0)
        return shift

    def curve(self, config: Configuration, seed: int) -> tuple:
        """``config``'s curve at training ``seed``: the recorded one, else seed 0's moved by the seed's shift."""
        if seed in config.curves:
            return tuple(config.curves[seed][:self.epochs])
        return tuple(float(v) for v in np.add(config.curves[0][:self.epochs], self.seed_shift[seed]))

    def true_score(self, key: str) -> float:
        """A configuration's quality: its final score averaged over the table's training seeds."""
        return self.true_scores[key]

    @property
    def best(self) -> Configuration:
        return max(self.configs.values(), key=lambda c: (self.true_score(c.key), c.key))

    def _fully_repeated_finals(self) -> np.ndarray:
        """Final scores (configuration x seed) of the configurations recorded at every one of the table's seeds."""
        full = [c for c in self.configs.values() if set(c.curves) == set(self.seeds)]
        return np.array([[c.curves[s][self.epochs - 1] for s in self.seeds] for c in full]).reshape(len(full), -1)

    @property
    def seed_sigma(self) -> float:
        """The raw training-seed deviation of the final score: pooled over the configurations recorded with
        several seeds (0 when none was). It includes the shift a seed gives every configuration alike."""
        repeated = [[curve[self.epochs - 1] for curve in c.curves.values()]
                    for c in self.configs.values() if len(c.curves) > 1]
        if not repeated:
            return 0.0
        return float(math.sqrt(np.mean([np.var(scores, ddof=1) for scores in repeated])))

    def _interaction_sigma(self) -> float:
        """The noise that reorders configurations: the deviation of the configuration x seed interaction of the
        final score (the residual of config + seed effects, on (C-1)(S-1) degrees of freedom), over the
        configurations recorded at every seed. With fewer than two such configurations the interaction cannot
        be told from the seed's shift, and the raw seed deviation stands in (the wider, cautious choice)."""
        finals = self._fully_repeated_finals()
        n_configs, n_seeds = finals.shape
        if n_configs < 2 or n_seeds < 2:
            return self.seed_sigma
        residual = (finals - finals.mean(axis=1, keepdims=True) - finals.mean(axis=0, keepdims=True)
                    + finals.mean())
        return float(math.sqrt(np.sum(residual ** 2) / ((n_configs - 1) * (n_seeds - 1))))

    @property
    def relative_noise(self) -> float:
        """The noise that reorders configurations, relative to the best configuration's score."""
        return self.noise_sigma / self.true_score(self.best.key)

    @property
    def margin(self) -> float:
        return max(WITHIN * self.true_score(self.best.key), NOISE_SIGMAS * self.noise_sigma)

    def succeeds(self, key: str) -> bool:
        return self.true_score(key) >= self.true_score(self.best.key) - self.margin

    def nearest(self, lr: float, warmup_steps: float, batch: str) -> Configuration:
        """The design configuration nearest to a suggestion: log-lr and warmup each scaled by the space's span,
        the batch pair exactly; ties to the smaller key."""
        log_span = math.log(self.lr_range[1] / self.lr_range[0])
        warmup_span = self.warmup_range[1] - self.warmup_range[0]

        def distance(c: Configuration) -> tuple[float, str]:
            return (math.hypot(math.log(c.lr / lr) / log_span, (c.warmup_steps - warmup_steps) / warmup_span), c.key)

        return min((c for c in self.configs.values() if c.batch == batch), key=distance)

    def distributions(self) -> dict:
        return {"lr": FloatDistribution(*self.lr_range, log=True),
                "warmup_steps": IntDistribution(*self.warmup_range, step=self.warmup_step),
                "batch": CategoricalDistribution(list(self.batches))}


def load_table(text: str, task: str, seconds_per_epoch: dict[str, float] | None = None,
               size: str = "320x180", epochs: int | None = None, borrowed_relative_noise: float | None = None) -> Table:
    """A ground-truth CSV (bench_search.py's columns) as a Table; configurations without a complete seed-0
    curve are left out. ``seconds_per_epoch`` defaults to the table's own median seconds per batch pair;
    ``borrowed_relative_noise``: see Table."""
    rows = [r for r in csv.DictReader(io.StringIO(text)) if r["size"] == size]
    params, curves, seconds = {}, {}, {}
    for r in rows:
        seed = int(r.get("seed") or 0)
        params[r["config"]] = (float(r["lr"]), int(r["warmup_steps"]), r["batch"])
        curves.setdefault(r["config"], {}).setdefault(seed, {})[int(r["epoch"])] = float(r["score"])
        seconds.setdefault(r["batch"], []).append(float(r["seconds"] or "nan"))
    full = epochs or max((max(c[0]) for c in curves.values() if 0 in c), default=0)
    configs = {}
    for key, by_seed in curves.items():
        complete = {s: tuple(v[e] for e in range(1, full + 1)) for s, v in by_seed.items()
                    if all(e in v for e in range(1, full + 1))}
        if 0 in complete:
            configs[key] = Configuration(key, *params[key], curves=complete)
    costs = seconds_per_epoch or {b: float(np.nanmedian(v)) for b, v in seconds.items()}
    return Table(task, configs, costs, borrowed_relative_noise=borrowed_relative_noise)


# ----------------------------------------------------------------------------------------------------
# Policies
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Policy:
    sampler: str = "tpe"  # random | tpe | gp
    startup: int = 10  # TPE's / GP's random start-up trials
    scheduler: str = "none"  # none | asha (stopping, in trial order) | promotion (pause and resume)
    grace: int = 1
    rf: float = 2.0
    workers: int = WORKERS
    tell_stopped: str = "pruned"  # pruned | complete (what Ray's OptunaSearch told before neoray's fix)

    @property
    def name(self) -> str:
        searcher = self.sampler if self.sampler == "random" else f"{self.sampler}{self.startup}"
        if self.scheduler == "none":
            return f"{searcher}+no-ES"
        told = "" if self.tell_stopped == "pruned" else ",told-complete"
        kind = "asha" if self.scheduler == "asha" else "promo"
        return f"{searcher}+{kind}(g{self.grace},rf{self.rf:g}{told})"

    def rungs(self, max_t: int) -> list[int]:
        if self.scheduler == "none":
            return []
        rungs, t = [], float(self.grace)
        while t < max_t:
            rungs.append(int(round(t)))
            t *= self.rf
        return rungs


def make_sampler(policy: Policy, seed: int) -> optuna.samplers.BaseSampler:
    if policy.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if policy.sampler == "gp":
        return optuna.samplers.GPSampler(seed=seed, n_startup_trials=policy.startup)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=policy.startup)


# ----------------------------------------------------------------------------------------------------
# The simulated sweep
# ----------------------------------------------------------------------------------------------------


@dataclass
class SimTrial:
    index: int
    config: Configuration
    curve: tuple
    optuna_trial: object
    epoch: int = 0  # epochs trained
    rung_scores: dict = field(default_factory=dict)
    state: str = "running"  # running | paused (at a rung: its decision or its promotion is due) | ended
    best: float = -math.inf


@dataclass
class Event:
    """One report: at simulated ``seconds``, after ``epochs`` epochs trained over all trials, ``trial`` reported
    ``score`` at its epoch ``epoch``."""

    seconds: float
    epochs: int
    trial: int
    epoch: int
    score: float
    config: str


class Simulation:
    """One simulated sweep; it runs until both ``max_epochs`` epochs were trained and ``max_seconds`` of its clock
    went by (or ``max_trials`` trials ended)."""

    def __init__(self, table: Table, policy: Policy, seed: int, max_trials: int = 400, max_epochs: int = 0,
                 max_seconds: float = 0.0):
        self.table, self.policy, self.seed = table, policy, seed
        self.max_t = table.epochs
        self.max_trials = max_trials
        self.max_epochs = max_epochs or 40 * self.max_t
        self.max_seconds = max_seconds
        self.rungs = policy.rungs(self.max_t)
        self.training_seed = sweep_training_seed(table, seed)
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        self.study = optuna.create_study(direction="maximize", sampler=make_sampler(policy, seed))
        self.study.enqueue_trial(dict(table.own))
        self.trials: list[SimTrial] = []
        self.events: list[Event] = []
        self.clock, self.spent = 0.0, 0
        self.running: list[tuple[float, int]] = []  # heap of (time of the next report, trial index)
        self.ready: list[int] = []  # paused trials allowed to continue, in the order they may resume

    # ---- trials

    def _new_trial(self) -> None:
        trial = self.study.ask(self.table.distributions())
        p = trial.params
        config = self.table.nearest(p["lr"], p["warmup_steps"], p["batch"])
        index = len(self.trials) + 1
        self.trials.append(SimTrial(index, config, self.table.curve(config, self.training_seed), trial))
        self._start(self.trials[-1])

    def _start(self, trial: SimTrial) -> None:
        trial.state = "running"
        self._next_report(trial)

    def _fill_slots(self) -> None:
        while len(self.running) < self.policy.workers:
            if self.ready:
                self._start(self.trials[self.ready.pop(0) - 1])
            elif len(self.trials) < self.max_trials and not self._held():
                self._new_trial()
            else:
                return

    def _held(self) -> bool:
        """Tune's concurrency limit counts OrderedASHA's paused trials as live: no new trial while a worker's
        worth of trials wait for their decisions (promotion ASHA starts new trials beside paused ones)."""
        paused = sum(1 for t in self.trials if t.state == "paused")
        return self.policy.scheduler == "asha" and len(self.running) + paused >= self.policy.workers

    def _end(self, trial: SimTrial, stopped: bool) -> None:
        trial.state = "ended"
        if stopped and self.policy.tell_stopped == "pruned":
            self.study.tell(trial.optuna_trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial.optuna_trial, trial.curve[trial.epoch - 1])

    # ---- the scheduler

    def _decide(self, trial: SimTrial, rung: int) -> None:
        """OrderedASHA at ``rung``: the cut from the trials before this one there; while one of them has not been
        heard from at the rung, the trial stays paused. A trial decided while paused joins the resume queue."""
        earlier = [t for t in self.trials if t.index < trial.index]
        if any(rung not in t.rung_scores and not (t.state == "ended" and t.epoch < rung) for t in earlier):
            trial.state = "paused"
            return
        scores = [t.rung_scores[rung] for t in earlier if rung in t.rung_scores]
        cut = float(np.nanpercentile(scores, (1 - 1 / self.policy.rf) * 100)) if scores else -math.inf
        if trial.rung_scores[rung] < cut:
            self._end(trial, stopped=True)
        elif trial.state == "paused":
            self.ready.append(trial.index)
        else:
            self._next_report(trial)

    def _settle_paused(self) -> None:
        for trial in self.trials:
            if trial.state == "paused" and trial.index not in self.ready:
                self._decide(trial, max(trial.rung_scores))

    def _promote(self) -> None:
        """Promotion ASHA: a paused trial resumes once it ranks in the top 1/rf of its rung's scores."""
        for trial in self.trials:
            if trial.state != "paused" or trial.index in self.ready:
                continue
            rung = max(trial.rung_scores)
            at_rung = sorted((t.rung_scores[rung] for t in self.trials if rung in t.rung_scores), reverse=True)
            keep = int(len(at_rung) / self.policy.rf)
            if keep >= 1 and trial.rung_scores[rung] >= at_rung[keep - 1]:
                self.ready.append(trial.index)

    # ---- the loop

    def run(self) -> list[Event]:
        self._fill_slots()
        while self.running and (self.spent < self.max_epochs or self.clock < self.max_seconds):
            self.clock, index = heapq.heappop(self.running)
            self._report(self.trials[index - 1])
            if self.policy.scheduler == "asha":
                self._settle_paused()
            elif self.policy.scheduler == "promotion":
                self._promote()
            self._fill_slots()
        return self.events

    def _next_report(self, trial: SimTrial) -> None:
        heapq.heappush(self.running, (self.clock + self.table.seconds_per_epoch[trial.config.batch], trial.index))

    def _report(self, trial: SimTrial) -> None:
        trial.epoch += 1
        self.spent += 1
        score = trial.curve[trial.epoch - 1]
        trial.best = max(trial.best, score)
        trial.optuna_trial.report(score, trial.epoch)
        self.events.append(Event(self.clock, self.spent, trial.index, trial.epoch, score, trial.config.key))
        if trial.epoch >= self.max_t:
            self._end(trial, stopped=False)
        elif trial.epoch not in self.rungs:
            self._next_report(trial)
        else:
            trial.rung_scores[trial.epoch] = score
            if self.policy.scheduler == "asha":
                self._decide(trial, trial.epoch)
            else:  # promotion: every trial pauses at a rung until it ranks high enough there
                trial.state = "paused"


def sweep_training_seed(table: Table, search_seed: int) -> int:
    """The training seed every trial of one simulated sweep trains with: one of the table's recorded seeds, drawn
    from the search seed alone, so that the Tune replay (search_tune_check.py) draws the same."""
    seeds = table.seeds
    return seeds[int(np.random.default_rng([search_seed]).integers(len(seeds)))]


def simulate(table: Table, policy: Policy, seed: int, max_epochs: int = 0, max_seconds: float = 0.0) -> list[Event]:
    return Simulation(table, policy, seed, max_epochs=max_epochs, max_seconds=max_seconds).run()


def table_digest(table: Table) -> str:
    """A digest of everything a sweep's outcome depends on in the table: the design, every seed's curve and the
    seconds per epoch (a table that grew by a seed or a configuration gets a new digest)."""
    content = {"configs": [[c.key, c.lr, c.warmup_steps, c.batch, sorted(c.curves.items())]
                           for c in sorted(table.configs.values(), key=lambda c: c.key)],
               "seconds_per_epoch": sorted(table.seconds_per_epoch.items())}
    return hashlib.sha256(json.dumps(content).encode()).hexdigest()[:16]


def budgets(table: Table) -> tuple[list[int], list[float]]:
    """The budgets of BUDGETS_FULL_RUNS full runs: in epochs, and in seconds of the sweep's clock (k full runs of
    the median batch pair's seconds per epoch, WORKERS at a time)."""
    full_run_seconds = table.epochs * float(np.median(list(table.seconds_per_epoch.values())))
    return ([k * table.epochs for k in BUDGETS_FULL_RUNS],
            [k * full_run_seconds / WORKERS for k in BUDGETS_FULL_RUNS])


def seed_blocks(n: int) -> list[int]:
    """The first ``n`` search seeds of each block."""
    return list(SELECT_SEEDS)[:n] + list(REPORT_SEEDS)[:n]


# ----------------------------------------------------------------------------------------------------
# Measures
# ----------------------------------------------------------------------------------------------------


def picks(events: list[Event]) -> list[tuple[int, float, str]]:
    """(epochs spent, seconds, picked configuration) after every report: the best reported score so far."""
    best, out = -math.inf, []
    pick = None
    for e in events:
        if e.score > best:
            best, pick = e.score, e.config
        out.append((e.epochs, e.seconds, pick))
    return out


def success_at(table: Table, events: list[Event], budgets: list[float], by: str = "epochs") -> list[bool]:
    """Whether the pick was within the margin of the best configuration once ``budgets`` (in epochs or seconds)
    were spent; a budget the sweep did not reach counts as its last pick."""
    trace = picks(events)
    out = []
    for budget in budgets:
        spent = [p for p in trace if (p[0] if by == "epochs" else p[1]) <= budget]
        out.append(bool(spent) and table.succeeds(spent[-1][2]))
    return out


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson interval of a success rate."""
    if n == 0:
        return (0.0, 1.0)
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return (max(0.0, centre - half), min(1.0, centre + half))


__all__ = ["BUDGETS_FULL_RUNS", "REPORT_SEEDS", "SELECT_SEEDS", "SIMULATOR_VERSION", "WORKERS", "Configuration",
           "Event", "Policy", "Simulation", "Table", "budgets", "load_table", "make_sampler", "picks", "seed_blocks",
           "simulate", "success_at", "sweep_training_seed", "table_digest", "wilson"]
