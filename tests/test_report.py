"""`neoray report`: Optuna study rebuilt from trial rows (out-of-range points and numeric choices included),
an importances table aligned by parameter name, partial sweeps marked, clear errors."""

import csv
import json
from pathlib import Path

import pytest

from neoray.config import ConfigError
from neoray.tune.asha import AshaSettings
from neoray.tune.record import SweepRecord, read_record
from neoray.tune.report import param_importances, rebuild_study, write_report


def test_study_rebuilt_from_rows_gives_importances():
    record = SweepRecord(name="s", asha=AshaSettings(max_t=4), num_samples=6,
                         params={"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2},
                                 "batch": {"distribution": "choice", "values": ["4x1", "2x2"]}})
    rows = [{"trial": f"trial_{i:04d}", "lr": str(lr), "batch": b, "best_map": str(m), "best_score": str(m)}
            for i, (lr, b, m) in enumerate([(1e-3, "4x1", 0.30), (3.0, "2x2", 0.0), (2e-4, "4x1", 0.10),
                                            (5e-3, "2x2", 0.25), (1e-4, "4x1", 0.05)])]
    rows.append({"trial": "trial_0009", "lr": "1e-3", "batch": "4x1", "best_map": "", "best_score": ""})  # errored
    study = rebuild_study(record, rows)
    assert len(study.trials) == 5  # lr=3.0 lies outside the space and is still kept; the errored row is not
    assert study.best_trial.params == {"lr": 1e-3, "batch": "4x1"}
    importances = param_importances(study)
    assert importances and all(set(v) == {"lr", "batch"} for v in importances.values())


def test_not_a_sweep_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a sweep directory"):
        write_report(tmp_path)


def _fake_sweep(tmp_path, rows, params, num_samples=None):
    """What a sweep leaves for `neoray report`: sweep.json and trials.csv (no trial histories needed)."""
    meta = {"name": "fake", "metric": "score", "mode": "max", "metric_doc": "score = map",
            "asha": {"time_attr": "epoch", "grace_period": 1, "reduction_factor": 2, "max_t": 4},
            "rungs": [1, 2], "params": params, "seed": 0, "num_samples": num_samples or len(rows)}
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    with open(tmp_path / "trials.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)


def test_numeric_choice_read_back_from_csv(tmp_path):
    """trials.csv holds text: a `choice` of numbers must map back to the number Optuna was given."""
    params = {"weight_decay": {"distribution": "choice", "values": [1e-05, 0.01, 0.1]},
              "warmup_steps": {"distribution": "choice", "values": [0, 50]}}
    rows = [{"trial": f"trial_{i:04d}", "status": "finished", "weight_decay": wd, "warmup_steps": w,
             "best_map": m, "best_score": m}
            for i, (wd, w, m) in enumerate([(0.01, 0, 0.3), (1e-05, 50, 0.1), (0.1, 0, 0.2)], start=1)]
    _fake_sweep(tmp_path, rows, params)
    with open(tmp_path / "trials.csv", newline="") as handle:
        study = rebuild_study(read_record(str(tmp_path)), list(csv.DictReader(handle)))
    assert study.best_trial.params == {"weight_decay": 0.01, "warmup_steps": 0}
    assert {t.params["weight_decay"] for t in study.trials} == {1e-05, 0.01, 0.1}
    assert Path(write_report(tmp_path)).exists()


def test_importances_table_columns_follow_parameter_names(tmp_path, monkeypatch):
    """Each evaluator sorts its parameters by its own importance; the table must still line up by name."""
    import neoray.tune.report as report

    params = {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2},
              "batch": {"distribution": "choice", "values": ["4x1", "2x2"]}}
    rows = [{"trial": "trial_0001", "status": "finished", "lr": "0.001", "batch": "4x1", "best_map": "0.3",
             "best_score": "0.3"},
            {"trial": "trial_0002", "status": "stopped early (ASHA)", "lr": "0.003", "batch": "2x2",
             "best_map": "0.1", "best_score": "0.1"}]
    _fake_sweep(tmp_path, rows, params, num_samples=3)  # 2 of 3 trials: an interrupted sweep
    monkeypatch.setattr(report, "param_importances", lambda study: {
        "fANOVA": {"lr": 0.9, "batch": 0.1}, "PED-ANOVA": {"batch": 0.7, "lr": 0.3}})
    text = Path(write_report(tmp_path)).read_text()
    assert "| evaluator | lr | batch |" in text
    assert "| fANOVA | 0.900 | 0.100 |" in text
    assert "| PED-ANOVA | 0.300 | 0.700 |" in text  # by name, not in PED-ANOVA's own order
    assert "Partial: the sweep was interrupted (2 of 3 trials started)" in text


def test_importances_from_few_trials_are_flagged(tmp_path, monkeypatch):
    import neoray.tune.report as report

    params = {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}}
    rows = [{"trial": f"trial_{i:04d}", "status": "finished", "lr": str(lr), "best_map": str(m), "best_score": str(m)}
            for i, (lr, m) in enumerate([(1e-3, 0.3), (2e-4, 0.1), (5e-3, 0.2), (1e-4, 0.05)], start=1)]
    _fake_sweep(tmp_path, rows, params)
    monkeypatch.setattr(report, "param_importances", lambda study: {"fANOVA": {"lr": 1.0}, "PED-ANOVA": {"lr": 1.0}})
    text = Path(write_report(tmp_path)).read_text()
    assert "From 4 trials only: too few to mean much" in text


def test_log_axes_label_only_1_2_and_5_of_each_decade():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from neoray.tune.report import _plain_log_axis

    fig, ax = plt.subplots()
    ax.plot([3e-4, 5e-3], [0, 1])
    _plain_log_axis(ax.xaxis, ax.set_xscale)
    fig.canvas.draw()
    labels = [t.get_text() for t in ax.get_xticklabels(minor=True) + ax.get_xticklabels() if t.get_text()]
    assert "0.002" in labels and "0.0005" in labels
    assert all(label.lstrip("0.")[0] in "125" for label in labels)  # never 3x10^-3 beside 4x10^-3
    plt.close(fig)


def test_the_report_says_how_far_the_asha_rungs_can_be_trusted(tmp_path):
    """Histories in each trial's result.json: at the rung (epoch 2) the eventual best trailed, and the rung
    ranked the finished trials in reverse; the report gives the numbers and the fix."""
    curves = {"trial_0001": [0.05, 0.10, 0.30, 0.50], "trial_0002": [0.10, 0.20, 0.30, 0.40],
              "trial_0003": [0.20, 0.30, 0.30, 0.30], "trial_0004": [0.01, 0.05], "trial_0005": [0.15, 0.25]}
    rows = []
    for trial, scores in curves.items():
        (tmp_path / trial).mkdir()
        (tmp_path / trial / "result.json").write_text("".join(
            json.dumps({"epoch": e, "score": s, "evaluated": 1, "map": s}) + "\n" for e, s in enumerate(scores, 1)))
        rows.append({"trial": trial, "status": "finished" if len(scores) == 4 else "stopped early (ASHA)",
                     "lr": "0.001", "best_map": str(max(scores)), "best_score": str(max(scores))})
    _fake_sweep(tmp_path, rows, {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2}})
    meta = json.loads((tmp_path / "sweep.json").read_text())
    meta["rungs"], meta["asha"]["grace_period"] = [2], 2
    (tmp_path / "sweep.json").write_text(json.dumps(meta))
    text = Path(write_report(tmp_path)).read_text()
    assert "## Can the early stopping be trusted?" in text
    assert "rank correlation with the final standing -1.00 over 3 trials that reached the end" in text
    assert "the eventual best (trial_0001) ranked 4 of 5 there" in text
    assert "--grace-period 3" in text
    assert json.loads((tmp_path / "rung_trust.json").read_text())["rungs"][0]["correlation"] == -1.0
