"""The best trial as a training config: ``SWEEP_DIR/best_config.yaml``, ready for ``neoray train``.

Its parameters on the sweep's base config, its learning rate as it trained (with an LR rule, the scaled one).
Local paths under the sweep's working directory are written relative to it, as configs name them, so that
the file works in a teammate's checkout too. Nothing here imports Ray.
"""

from __future__ import annotations

import os

from neoray import storage
from neoray.config import Config, save_config
from neoray.tune.space import PARAMS, trial_config

FILE_NAME = "best_config.yaml"


def export_best_config(base: Config, row: dict, path: str, sweep_name: str, lr_scaling: dict | None = None,
                       cwd: str | None = None) -> Config:
    """The best trial's config (its parameters on the base config, its lr as it trained): ready for
    `neoray train BEST_CONFIG`. Local paths under ``cwd`` (the sweep's working directory) are written
    relative to it, as configs name them, so the file works in a teammate's checkout too."""
    params = {k: row[k] for k in PARAMS if k in row and row[k] not in (None, "")}
    cfg = trial_config(base, params, lr_scaling).with_overrides({"name": f"{sweep_name}_best"})
    cfg = cfg.with_overrides(_relative_paths(cfg, cwd or os.getcwd()))
    save_config(cfg, path)
    return cfg


PATH_KEYS = ("data.train", "data.val", "output", "model.init_from", "model.backbone_weights")


def _relative_paths(cfg: Config, cwd: str) -> dict:
    flat = {"data.train": cfg.data.train, "data.val": cfg.data.val, "output": cfg.output,
            "model.init_from": cfg.model.init_from, "model.backbone_weights": cfg.model.backbone_weights}
    out = {}
    for key in PATH_KEYS:
        path = flat[key]
        if path and not storage.is_uri(path) and os.path.isabs(path) and os.path.commonpath([path, cwd]) == cwd:
            out[key] = os.path.relpath(path, cwd)
    return out


__all__ = ["FILE_NAME", "PATH_KEYS", "export_best_config"]
