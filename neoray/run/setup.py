"""What the driver settles before anything runs on a worker or in a trial (``neoray train`` and the sweep).

``prepare_config``: every path a config names is made absolute against the caller's working directory
(Ray workers and trials run elsewhere), and everything that can be checked without Ray is checked, each
failure one line: the model name and options, the weight files, the shard manifests (training and
validation from the same category list, a validation set with boxes to score). Pretrained weights bring
their conventions (input normalisation, position embedding) into ``model.options``, so the resolved
config, and every checkpoint made from it, rebuilds the model exactly.

``check_cluster``: the run fits the connected cluster (neoray.cluster.plan_trials), and on a cluster of
several nodes every path the workers need is one they can all reach.
"""

from __future__ import annotations

from neoray import storage
from neoray.cluster import ClusterInfo, check_visible_on_all_nodes, plan_trials
from neoray.config import Config, ConfigError, load_config
from neoray.data.shards import ManifestError, read_manifest
from neoray.data.stream import train_rows_per_epoch
from neoray.models import PretrainedError, check_model, describe_pretrained, model_options
from neoray.models.pretrained.checkpoint import CheckpointError, resolve_checkpoint
from neoray.models.pretrained.load import kept_class_names


def prepare_config(cfg: Config, output: str | None = None) -> Config:
    """A copy of ``cfg`` with absolute paths and pretrained conventions, checked (ConfigError, one line).
    ``output``: the command line's ``--output``, which replaces ``cfg.output``."""
    updates = {"output": storage.absolute(output or cfg.output),
               "data.train": storage.absolute(cfg.data.train), "data.val": storage.absolute(cfg.data.val)}
    weights = cfg.model.backbone_weights
    if weights not in ("", "none", "imagenet"):
        updates["model.backbone_weights"] = _existing(weights, "model.backbone_weights")
    if cfg.model.init_from:
        try:
            updates["model.init_from"] = resolve_checkpoint(_existing(cfg.model.init_from, "model.init_from"))
        except CheckpointError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
    cfg = cfg.with_overrides(updates)
    _check_data(cfg)
    cfg = _with_pretrained_options(cfg)
    _check_model(cfg)
    return cfg


def _existing(path: str, key: str) -> str:
    path = storage.absolute(path)
    if not storage.exists(path):
        raise ConfigError(f"{key}: {path} not found")
    return path


def _check_data(cfg: Config) -> None:
    if not cfg.data.train:
        raise ConfigError("data.train: no training shard directory given (set data.train=DIR)")
    try:
        train = read_manifest(cfg.data.train)
        val = read_manifest(cfg.data.val) if cfg.data.val else None
    except ManifestError as exc:
        raise ConfigError(str(exc)) from None
    check_batches(cfg, train["num_images"])
    if val is None:
        return
    if _label_ids(val["categories"]) != _label_ids(train["categories"]):
        raise ConfigError(f"data.val: {cfg.data.val} has other categories (label -> id) than data.train "
                          f"{cfg.data.train}; prepare both from the same category list")
    if not val["num_boxes"]:
        raise ConfigError(f"data.val: {cfg.data.val} holds no boxes, and COCO mAP is undefined without ground "
                          "truth; give a validation set with boxes, or data.val= to train without evaluation")


# What may change when a run is resumed: how long it trains, how it is placed and evaluated, where its
# data lives. Anything else (the model, the augmentation, the optimiser, the schedule's shape) would
# make the checkpoint continue a different experiment than the one its run directory records.
RESUMABLE_CHANGES = frozenset({
    "output", "name", "data.train", "data.val", "train.epochs", "train.eval_every",
    "train.eval_score_threshold", "train.early_stop_patience", "train.max_skipped_fraction",
    "train.max_oom_per_epoch", "train.max_failures", "train.log_every", "train.workers", "train.use_gpu",
    "train.gpus_per_worker", "train.cpus_per_worker", "train.placement",
})


def check_resume(cfg: Config, run_dir: str, log=None) -> None:
    """Refuse (ConfigError, one line) to resume ``run_dir`` with a config that differs from the run's own
    config.yaml in anything but ``RESUMABLE_CHANGES``; ``log`` the changes it allows."""
    saved_path = storage.join(storage.absolute(run_dir), "config.yaml")
    if not storage.is_file(saved_path):
        raise ConfigError(f"--resume: {storage.absolute(run_dir)} is not a neoray run directory (no config.yaml)")
    saved = _flat(load_config(saved_path).to_dict())
    given = _flat(cfg.to_dict())
    changed = sorted(key for key in saved.keys() | given.keys() if saved.get(key) != given.get(key))
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if refused:
        shown = ", ".join(f"{key} ({saved.get(key)!r} -> {given.get(key)!r})" for key in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise ConfigError(f"--resume: the config differs from the run's own {saved_path} in {shown}{more}; "
                          "resume with the run's config.yaml, or start a new run with model.init_from=RUN_DIR")
    if changed and log:
        log("resuming with " + ", ".join(f"{key}={given.get(key)!r} (was {saved.get(key)!r})" for key in changed))


def _flat(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict) and key != "options":
            flat.update(_flat(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def check_batches(cfg: Config, num_images: int) -> None:
    """Every worker gets at least one full batch per epoch; an epoch without a step trains nothing."""
    rows = train_rows_per_epoch(num_images, cfg.data.max_train_images)
    workers, batch = cfg.train.workers, cfg.train.batch_size
    if rows // workers < batch:
        limit = f" (data.max_train_images={cfg.data.max_train_images})" if rows < num_images else ""
        raise ConfigError(f"data.train: {rows} training images{limit} give each of the {workers} workers "
                          f"{rows // workers}, fewer than train.batch_size={batch}: an epoch would have no step; "
                          "lower train.batch_size or train.workers")


def _label_ids(categories: list) -> list:
    return sorted((int(c["label"]), int(c["id"])) for c in categories)


def _check_model(cfg: Config) -> None:
    try:
        check_model(cfg.model.name, model_options(cfg.model))
    except ValueError as exc:
        raise ConfigError(f"model: {exc}") from None


def _with_pretrained_options(cfg: Config) -> Config:
    """``model.options`` plus what ``init_from``'s format needs (the config's own options win)."""
    if not cfg.model.init_from:
        return cfg
    needed = _describe(cfg.model.init_from).options
    options = {**needed, **cfg.model.options}
    if options == cfg.model.options:
        return cfg
    return cfg.with_overrides({"model.options": options})


def _describe(path: str):
    try:
        return describe_pretrained(path)
    except (PretrainedError, ValueError, OSError) as exc:
        raise ConfigError(f"model.init_from: {exc}") from None


def pretrained_class_rows(cfg: Config) -> list[str]:
    """The run's classes that start from rows of ``init_from`` (what the run's log says)."""
    ours = [c["name"] for c in sorted(read_manifest(cfg.data.train)["categories"], key=lambda c: c["label"])]
    return kept_class_names(_describe(cfg.model.init_from), ours)


def needed_everywhere(cfg: Config, output_dir: str) -> dict[str, str]:
    """The paths every node must reach, by the key a user would change: what the workers read, and the
    directory Ray Train stores checkpoints in."""
    paths = {"data.train": cfg.data.train, "data.val": cfg.data.val, "--output": output_dir,
             "model.init_from": cfg.model.init_from}
    if cfg.model.backbone_weights not in ("", "none", "imagenet"):
        paths["model.backbone_weights"] = cfg.model.backbone_weights
    return {key: path for key, path in paths.items() if path}


def check_cluster(cfg: Config, info: ClusterInfo, output_dir: str, *, gpus_per_worker: float | None = None,
                  max_concurrent: int | None = 1, autoscale: bool = False, sweep: bool = True):
    """Refuse (ConfigError, one line) what cannot run on the connected cluster; returns the resource plan
    (of each sweep trial, or of the one run of ``neoray train`` with ``sweep=False``)."""
    plan = plan_trials(cfg, gpus_per_worker, max_concurrent, autoscale=autoscale, sweep=sweep)
    if info.nodes > 1:
        check_visible_on_all_nodes(needed_everywhere(cfg, output_dir))
    return plan


__all__ = [
    "check_batches",
    "check_cluster",
    "check_resume",
    "needed_everywhere",
    "prepare_config",
    "pretrained_class_rows",
]
