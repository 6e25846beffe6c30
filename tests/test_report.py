"""`neoray report`: Optuna study rebuilt from trial rows (out-of-range points included), clear errors."""

import pytest

from neoray.config import ConfigError
from neoray.tune.report import param_importances, rebuild_study, write_report


def test_study_rebuilt_from_rows_gives_importances():
    meta = {"params": {"lr": {"distribution": "log_uniform", "low": 1e-4, "high": 1e-2},
                       "batch": {"distribution": "choice", "values": ["4x1", "2x2"]}}}
    rows = [{"trial": f"trial_{i:04d}", "lr": str(lr), "batch": b, "best_map": str(m), "best_score": str(m)}
            for i, (lr, b, m) in enumerate([(1e-3, "4x1", 0.30), (3.0, "2x2", 0.0), (2e-4, "4x1", 0.10),
                                            (5e-3, "2x2", 0.25), (1e-4, "4x1", 0.05)])]
    rows.append({"trial": "trial_0009", "lr": "1e-3", "batch": "4x1", "best_map": "", "best_score": ""})  # errored
    study = rebuild_study(meta, rows)
    assert len(study.trials) == 5  # lr=3.0 lies outside the space and is still kept; the errored row is not
    assert study.best_trial.params == {"lr": 1e-3, "batch": "4x1"}
    importances = param_importances(study)
    assert importances and all(set(v) == {"lr", "batch"} for v in importances.values())


def test_not_a_sweep_dir(tmp_path):
    with pytest.raises(ConfigError, match="not a sweep directory"):
        write_report(tmp_path)
