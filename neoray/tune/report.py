"""``neoray report SWEEP_DIR``: a Markdown report with plots for a finished (or interrupted) sweep.

Reads only what the sweep left on disk (sweep.json, trials.csv, each trial's result.json), so it works
after the fact, on another machine, without Ray running. Writes SWEEP_DIR/report.md and PNGs next to it:

* map_vs_lr.png           best mAP of each trial against its learning rate
* learning_curves.png     mAP (evaluated epochs) and training loss per epoch of every trial, with the
                          ASHA rungs (grace_period * reduction_factor^k) marked
* importances.png         parameter importances (Optuna's fANOVA and PED-ANOVA evaluators) on a study
                          rebuilt from the trial results
"""

from __future__ import annotations

import io
import sys

import optuna
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter
from optuna.importance import FanovaImportanceEvaluator, PedAnovaImportanceEvaluator

from neoray import storage
from neoray.config import ConfigError
from neoray.engine import ranking
from neoray.tune.best_config import FILE_NAME as BEST_CONFIG
from neoray.tune.record import SweepRecord, read_record
from neoray.tune.results import TABLE_MARKDOWN, finite_number, load_history, read_trial_rows
from neoray.tune.rung_trust import EXPLANATION, measure_trust
from neoray.tune.space import optuna_distributions, parse_space

STATUS_COLOURS = {"finished": "tab:green", "stopped early (ASHA)": "tab:orange", "errored": "tab:red",
                  "interrupted": "tab:gray"}


def _savefig(fig, path: str) -> None:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(path, buffer.getvalue())


def _plain_log_axis(axis, set_scale) -> None:
    """A log scale labelled in plain numbers at 1, 2 and 5 of each decade (matplotlib's default writes
    every minor label as 3x10^-3 next to 4x10^-3, and they run into each other)."""
    def label(value, _position) -> str:
        leading = f"{value:.0e}"[0]
        return f"{value:g}" if leading in "125" else ""

    set_scale("log")
    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


def plot_map_vs_lr(rows: list[dict], path: str) -> bool:
    points = [(finite_number(r.get("lr")), finite_number(r.get("best_map")), r["status"], r["trial"]) for r in rows]
    points = [p for p in points if p[0] is not None and p[1] is not None]
    if not points:
        return False
    fig = Figure(figsize=(6, 4), layout="constrained")
    ax = fig.subplots()
    for status in sorted({p[2] for p in points}):
        sel = [p for p in points if p[2] == status]
        ax.scatter([p[0] for p in sel], [p[1] for p in sel], label=status, color=STATUS_COLOURS.get(status, "gray"))
    for lr, value, _, trial in points:
        ax.annotate(trial.replace("trial_", ""), (lr, value), fontsize=7, xytext=(3, 3), textcoords="offset points")
    _plain_log_axis(ax.xaxis, ax.set_xscale)
    ax.set(xlabel="learning rate", ylabel="best mAP", title="best mAP against learning rate")
    ax.legend(fontsize=8)
    _savefig(fig, path)
    return True


def plot_learning_curves(sweep_dir: str, rows: list[dict], rungs: list[float], time_attr: str, path: str) -> bool:
    fig = Figure(figsize=(11, 4), layout="constrained")
    ax_map, ax_loss = fig.subplots(1, 2)
    drawn = False
    for row in rows:
        history = load_history(sweep_dir, row["trial"])
        if not history:
            continue
        drawn = True
        x = [h.get(time_attr, h.get("training_iteration")) for h in history]
        evals = [(xi, h["map"]) for xi, h in zip(x, history)
                 if h.get("evaluated") and finite_number(h.get("map")) is not None]
        losses = [(xi, h["loss"]) for xi, h in zip(x, history) if finite_number(h.get("loss")) is not None]
        style = "--" if row["status"] != "finished" else "-"
        label = f"{row['trial']} ({row['status']})"
        if evals:
            ax_map.plot(*zip(*evals), style, marker="o", markersize=3, label=label)
        if losses:
            ax_loss.plot(*zip(*losses), style, marker="o", markersize=3, label=label)
    if not drawn:
        return False
    for ax in (ax_map, ax_loss):
        for k, rung in enumerate(rungs):
            ax.axvline(rung, color="gray", linestyle=":", linewidth=1, label="ASHA rung" if k == 0 else None)
        ax.set_xlabel(time_attr)
    ax_map.set(ylabel="mAP", title="validation mAP")
    ax_loss.set(ylabel="training loss", title="training loss")
    _plain_log_axis(ax_loss.yaxis, ax_loss.set_yscale)
    ax_map.legend(fontsize=7)
    _savefig(fig, path)
    return True


def rebuild_study(record: SweepRecord, rows: list[dict]):
    """An Optuna study holding one completed trial per sweep trial that reported a result (value: best mAP,
    or best score for trials that never evaluated), so that Optuna's evaluators work without the searcher."""
    distributions = optuna_distributions(parse_space({"params": _space_params(record.params)}))
    distributions = _widened(distributions, rows)
    study = optuna.create_study(direction="maximize")
    for row in rows:
        value = finite_number(row.get("best_score"))  # the sweep's own ranking (neoray.engine.ranking)
        if value is None:
            continue
        params = {}
        for name, dist in distributions.items():
            raw = row.get(name)
            if isinstance(dist, optuna.distributions.CategoricalDistribution):
                params[name] = _choice(dist.choices, raw, name, row.get("trial"))
            elif isinstance(dist, optuna.distributions.IntDistribution):
                params[name] = int(float(raw))
            else:
                params[name] = float(raw)
        study.add_trial(optuna.trial.create_trial(params=params, distributions=distributions, value=value))
    return study


def _choice(choices, raw, name: str, trial) -> object:
    """The choice that trials.csv wrote as ``raw`` (CSV holds text: 0.01 comes back as '0.01')."""
    for choice in choices:
        if str(choice) == raw:
            return choice
    number = finite_number(raw)
    for choice in choices:
        if number is not None and not isinstance(choice, (bool, str)) and finite_number(choice) == number:
            return choice
    raise ConfigError(f"trials.csv: {trial} has {name}={raw!r}, which is not one of the choices {list(choices)}")


def _widened(distributions: dict, rows: list[dict]) -> dict:
    """Numeric ranges stretched to the values actually tried (points_to_evaluate may lie outside them)."""
    out = dict(distributions)
    for name, dist in distributions.items():
        if isinstance(dist, optuna.distributions.CategoricalDistribution):
            continue
        seen = [v for v in (finite_number(r.get(name)) for r in rows) if v is not None]
        if not seen:
            continue
        low, high = min([dist.low] + seen), max([dist.high] + seen)
        if isinstance(dist, optuna.distributions.IntDistribution):
            out[name] = optuna.distributions.IntDistribution(int(low), int(high), log=dist.log)
        else:
            out[name] = optuna.distributions.FloatDistribution(low, high, log=dist.log)
    return out


def _space_params(params: dict) -> dict:
    """sweep.json stores validated specs; batch is stored as its choice list: give it back as pairs."""
    out = {}
    for name, spec in params.items():
        out[name] = {"pairs": spec["values"]} if name == "batch" else dict(spec)
    return out


def param_importances(study) -> dict[str, dict[str, float]]:
    """{evaluator name: {param: importance}}; empty when there are too few trials to tell."""
    complete = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if len(complete) < 2:
        return {}
    out = {}
    for name, make in (
        ("fANOVA", lambda: FanovaImportanceEvaluator(seed=0)),
        ("PED-ANOVA", PedAnovaImportanceEvaluator),
    ):
        try:
            out[name] = dict(optuna.importance.get_param_importances(study, evaluator=make()))
        except (RuntimeError, ValueError, ImportError) as exc:  # identical params; fANOVA needs scikit-learn
            print(f"neoray report: {name} importances unavailable: {exc}", file=sys.stderr)
    return out


def importances_table(importances: dict[str, dict[str, float]]) -> list[str]:
    """Markdown rows: one column per parameter (in the first evaluator's order), one row per evaluator.
    Each evaluator returns its own parameters sorted by its own importance, so cells go by name."""
    params = list(next(iter(importances.values())))
    lines = ["| evaluator | " + " | ".join(params) + " |", "|---|" + "---|" * len(params)]
    for name, values in importances.items():
        cells = [f"{values[p]:.3f}" if p in values else "-" for p in params]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def plot_importances(importances: dict, path: str) -> bool:
    if not importances:
        return False
    # Constrained layout gives each panel room for its own parameter names (they overlapped the panel
    # on their left).
    fig = Figure(figsize=(5.5 * len(importances), 3), layout="constrained")
    axes = fig.subplots(1, len(importances), squeeze=False)
    for ax, (name, values) in zip(axes[0], importances.items()):
        params = list(values)
        ax.barh(params, [values[p] for p in params])
        ax.invert_yaxis()
        ax.set(title=f"{name} importance", xlabel="importance")
    _savefig(fig, path)
    return True


# Below this many finished trials, importances are noise: with 4 trials fANOVA and PED-ANOVA were seen to
# rank the same parameters in opposite orders.
MIN_TRIALS_FOR_IMPORTANCES = 10


def _importances_section(record: SweepRecord, rows: list[dict], sweep_dir: str) -> list[str]:
    study = rebuild_study(record, rows)
    importances = param_importances(study)
    if not plot_importances(importances, storage.join(sweep_dir, "importances.png")):
        return ["## Parameter importances", "", "Not available: too few completed trials, or no evaluator could run "
                "(see the command's messages).", ""]
    lines = ["## Parameter importances", ""]
    if len(study.trials) < MIN_TRIALS_FOR_IMPORTANCES:
        lines += [f"**From {len(study.trials)} trials only: too few to mean much** (fewer than "
                  f"{MIN_TRIALS_FOR_IMPORTANCES}; the two evaluators below may well disagree). Run more trials "
                  "before trusting them.", ""]
    return lines + importances_table(importances) + ["", "![parameter importances](importances.png)", ""]


def write_report(sweep_dir) -> str:
    sweep_dir = storage.absolute(sweep_dir)
    record, rows = read_record(sweep_dir), read_trial_rows(sweep_dir)
    asha = record.asha
    lines = [f"# Sweep report: {record.name}", ""]
    if len(rows) < record.num_samples or any(r["status"] == "interrupted" for r in rows):
        lines += [f"**Partial: the sweep was interrupted ({len(rows)} of {record.num_samples} trials started); "
                  f"continue it with --resume, then run neoray report again.**", ""]
    sampler = "random search" if record.search.sampler == "random" else "TPE"
    lines += [f"- trials: {len(rows)} ({', '.join(sorted({r['status'] for r in rows}))})",
              f"- ASHA drives on `{record.metric}` ({record.mode}; {ranking.SCORE_DOC}), time attribute "
              f"`{asha.time_attr}`, grace period {asha.grace_period}, reduction factor "
              f"{asha.reduction_factor}, max_t {asha.max_t}, rungs {record.rungs}",
              f"- search: OptunaSearch ({sampler}, seed {record.seed}), the config's own values evaluated first", ""]
    if record.search.trial_epochs and record.base_config is not None:
        epochs = record.base_config.train.epochs
        lines[-1:] = [f"- trials train epochs 1-{record.search.trial_epochs} of the {epochs}-epoch schedule; the best "
                      f"continues to its end in `{storage.join(sweep_dir, 'final')}`", ""]
    best_path = storage.join(sweep_dir, BEST_CONFIG)
    if storage.exists(best_path):
        lines += [f"Best configuration, ready for a full run: `neoray train {best_path} train.epochs=N`", ""]
    trials_md = storage.join(sweep_dir, TABLE_MARKDOWN)
    lines += ["## Trials", "", storage.read_text(trials_md) if storage.exists(trials_md) else "", ""]
    if plot_map_vs_lr(rows, storage.join(sweep_dir, "map_vs_lr.png")):
        lines += ["## mAP against learning rate", "", "![mAP against learning rate](map_vs_lr.png)", ""]
    if plot_learning_curves(sweep_dir, rows, record.rungs, asha.time_attr,
                            storage.join(sweep_dir, "learning_curves.png")):
        lines += ["## Learning curves", "", "Dotted lines: ASHA rungs, where trials below the top "
                  f"1/{asha.reduction_factor} are stopped.", "", "![learning curves](learning_curves.png)", ""]
    lines += _trust_section(record, rows, sweep_dir)
    lines += _importances_section(record, rows, sweep_dir)
    return storage.write_text(storage.join(sweep_dir, "report.md"), "\n".join(lines))


def _trust_section(record: SweepRecord, rows: list[dict], sweep_dir: str) -> list[str]:
    """How far the early stopping can be trusted, from the sweep's own trials (neoray.tune.rung_trust)."""
    lines = ["## Can the early stopping be trusted?", ""]
    if not record.rungs:
        return lines + ["No ASHA rung before the last epoch: no trial could be stopped early.", ""]
    trust, verdict = measure_trust(sweep_dir, record, rows)
    rf = float(record.asha.reduction_factor)
    lines += [EXPLANATION, ""] + [f"- {rung.line(rf)}" for rung in trust] + [""]
    flagged = any(not rung.trusted for rung in trust)
    return lines + [f"**{verdict}**" if flagged else verdict, ""]
