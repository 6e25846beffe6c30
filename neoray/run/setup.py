"""What the driver settles before anything runs on a worker or in a trial (``neoray train`` and the sweep).

``prepare_config``: every path a config names is made absolute against the caller's working directory
(Ray workers and trials run elsewhere), and everything that can be checked without Ray is checked, each
failure one line: the output folder (not a file), the model name and options, the weight files (read as
the workers will read them: a truncated file or ``/dev/zero`` is refused here, not inside Ray), the shard
manifests (training and validation from the same category list, a validation set with boxes to score).
Pretrained weights bring their conventions (input normalisation, position embedding) into
``model.options``, so the resolved config, and every checkpoint made from it, rebuilds the model exactly.

``check_cluster``: the run fits the connected cluster (neoray.cluster.plan_trials), and on a cluster of
several nodes every path the workers need is one they can all reach.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from neoray import storage
from neoray.checkpoints import FILE_NAME, CheckpointError, read_checkpoint_file, read_pointers, resolve_checkpoint
from neoray.checkpoints.files import check_safetensors, huggingface_files
from neoray.cluster import ClusterInfo, check_visible_on_all_nodes, plan_trials
from neoray.config import Config, ConfigError, brief, load_config
from neoray.data.shards import ManifestError, read_manifest
from neoray.data.stream import train_rows_per_epoch
from neoray.models import PretrainedError, check_model, describe_pretrained, model_options, read_torch_file
from neoray.models.pretrained.load import kept_class_names
from neoray.run.rundir import RAY_DIR


def prepare_config(cfg: Config, output: str | None = None, *, resume: bool = False,
                   writes_output: bool = True) -> Config:
    """A copy of ``cfg`` with absolute paths and pretrained conventions, checked (ConfigError, one line).
    ``output``: the command line's ``--output``, which replaces ``cfg.output``. ``resume``: the run
    continues from a checkpoint, which brings every weight: ``model.backbone_weights`` is not read.
    ``writes_output``: the caller writes under the output folder (``neoray train``), which is then probed; a
    sweep writes in its own directory instead, which it probes itself."""
    out = storage.absolute(output or cfg.output)
    check_output_dir(out, "--output" if output else "output", probe=writes_output)
    updates = {"output": out,
               "data.train": storage.absolute(cfg.data.train), "data.val": storage.absolute(cfg.data.val)}
    weights = cfg.model.backbone_weights
    if weights not in ("", "none", "imagenet"):
        if resume:
            updates["model.backbone_weights"] = storage.absolute(weights)
        else:
            updates["model.backbone_weights"] = _existing(weights, "model.backbone_weights")
            _check_backbone_file(updates["model.backbone_weights"])
    if cfg.model.init_from:
        try:
            updates["model.init_from"] = resolve_checkpoint(_existing(cfg.model.init_from, "model.init_from"))
        except CheckpointError as exc:
            raise ConfigError(f"model.init_from: {exc}") from None
    cfg = cfg.with_overrides(updates)
    _check_data(cfg)
    cfg = _with_pretrained_options(cfg)
    _check_model(cfg, with_weights=not resume)
    return cfg


def _existing(path: str, key: str) -> str:
    path = storage.absolute(path)
    if not storage.exists(path):
        raise ConfigError(f"{key}: {path} not found")
    return path


def _check_backbone_file(path: str) -> None:
    """Read ``model.backbone_weights`` as the workers will (weights-only; a Hugging Face model's safetensors
    header), so that a file that cannot be read is one line here rather than a failed run inside Ray."""
    try:
        hf = huggingface_files(path)
        if hf is not None:
            check_safetensors(hf[0])
        else:
            read_torch_file(path)  # regular files of bounded size only: never /dev/zero or a FIFO
    except (PretrainedError, OSError) as exc:
        raise ConfigError(f"model.backbone_weights: {exc}") from None


def check_output_dir(path: str, key: str = "--output", probe: bool = True) -> None:
    """Refuse (ConfigError, one line naming the folder) an output folder where nothing can be written, before
    any work: locally a file in the way (the folder is one, or lies under one); with ``probe``, a read-only
    folder or mount, or on object storage a bucket that refuses the probe (``storage.probe_writable``)."""
    local = storage.local_path(path)
    if local is not None:
        probe = os.path.abspath(local)
        while not os.path.exists(probe) and os.path.dirname(probe) != probe:
            probe = os.path.dirname(probe)
        if os.path.exists(probe) and not os.path.isdir(probe):
            where = "is a file" if probe == os.path.abspath(local) else f"is under {probe}, a file"
            raise ConfigError(f"{key}: {path} {where}; give a folder for the runs")
    if not probe:
        return
    try:
        storage.probe_writable(path)
    except storage.StorageError as exc:
        raise ConfigError(f"{key}: {exc}") from None


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
    "output", "name", "data.train", "data.val", "train.epochs", "train.stop_after_epoch", "train.eval_every",
    "train.eval_score_threshold", "train.early_stop_patience", "train.max_skipped_fraction",
    "train.max_oom_per_epoch", "train.max_failures", "train.log_every", "train.workers", "train.use_gpu",
    "train.gpus_per_worker", "train.cpus_per_worker", "train.torch_threads", "train.placement",
})


def check_resume(cfg: Config, run_dir: str, log=None) -> None:
    """Refuse (ConfigError, one line) to resume ``run_dir`` with a config that differs from the run's own
    config.yaml in anything but ``RESUMABLE_CHANGES``; ``log`` the changes it allows."""
    saved_path = storage.join(storage.absolute(run_dir), "config.yaml")
    if not storage.is_file(saved_path):
        other = storage.not_a_folder(storage.absolute(run_dir))
        if other:
            raise ConfigError(f"--resume: {storage.absolute(run_dir)} is {other}, not a neoray run directory")
        raise ConfigError(f"--resume: {storage.absolute(run_dir)} is not a neoray run directory (no config.yaml)")
    check_output_dir(storage.absolute(run_dir), "--resume")  # the resumed run writes there
    saved = _flat(load_config(saved_path).to_dict())
    given = _flat(cfg.to_dict())
    changed = sorted(key for key in saved.keys() | given.keys() if saved.get(key) != given.get(key))
    refused = [key for key in changed if key not in RESUMABLE_CHANGES]
    if refused:
        shown = ", ".join(f"{key} ({brief(saved.get(key), 200)} -> {brief(given.get(key), 200)})"
                          for key in refused[:3])
        more = f" and {len(refused) - 3} more" if len(refused) > 3 else ""
        raise ConfigError(f"--resume: the config differs from the run's own {saved_path} in {shown}{more}; "
                          "resume with the run's config.yaml, or start a new run with model.init_from=RUN_DIR")
    if changed and log:
        log("resuming with " + ", ".join(f"{key}={brief(given.get(key), 200)} (was {brief(saved.get(key), 200)})"
                                         for key in changed))


@dataclass(frozen=True)
class ResumePoint:
    """Where ``--resume`` continues a run: ``checkpoint`` (a directory; None: the run has no checkpoint yet and
    starts over), its ``epoch``, and the run's checkpoint folders that could not be read (``unreadable``, by
    folder name), which the workers must not restore even where Ray's own record of the run names them."""

    checkpoint: str | None = None
    epoch: int = 0
    unreadable: tuple[str, ...] = ()


def resume_point(run_dir: str, log=None) -> ResumePoint:
    """Read the run's latest checkpoint on the driver, before any worker starts (a worker that cannot read it
    fails, and Ray restarts it into the same failure, each time with a traceback). When it cannot be read (a
    truncated or empty file), fall back to the newest of the run's other checkpoints that can and is older than it,
    and ``log`` which;
    ``CheckpointError`` (one line naming the file) when there is none."""
    latest = read_pointers(run_dir).get("latest")
    if not latest:
        return ResumePoint()
    first = storage.join(run_dir, latest["path"])
    latest_epoch = int(latest.get("epoch") or 0) or float("inf")
    others = [entry.path for entry in storage.list_dir(storage.join(run_dir, RAY_DIR))
              if entry.kind == "dir" and entry.name.startswith("checkpoint_") and entry.path != first]
    unreadable, why = [], None
    readable = []
    for candidate in [first, *others]:
        try:
            epoch = int(read_checkpoint_file(storage.join(candidate, FILE_NAME)).get("epoch") or 0)
        except (CheckpointError, OSError) as exc:
            unreadable.append(storage.basename(candidate))
            why = why or str(exc)
            continue
        if candidate == first:
            return ResumePoint(first, epoch, tuple(unreadable))
        if epoch < latest_epoch:  # a later one was written but never reported (killed in between): no metrics row
            readable.append((epoch, candidate))
    if not readable:
        more = f" and no other checkpoint of the run can be read ({len(others)} tried)" if others else \
            "; the run has no other checkpoint to fall back to"
        raise CheckpointError(f"--resume: the latest checkpoint cannot be read: {why}{more}")
    epoch, chosen = max(readable)
    if log:
        log(f"the latest checkpoint cannot be read ({why}); resuming from the previous one, {chosen} (epoch "
            f"{epoch}): the epochs after it are trained again")
    return ResumePoint(chosen, epoch, tuple(unreadable))


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


def _check_model(cfg: Config, with_weights: bool = True) -> None:
    try:
        check_model(cfg.model.name, model_options(cfg.model, with_weights=with_weights))
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


def needed_everywhere(cfg: Config, output_dir: str, resume: bool = False) -> dict[str, str]:
    """The paths every node must reach, by the key a user would change: what the workers read, and the
    directory Ray Train stores checkpoints in. ``resume``: the run continues from a checkpoint, and its
    workers do not read ``model.backbone_weights``."""
    paths = {"data.train": cfg.data.train, "data.val": cfg.data.val, "--output": output_dir,
             "model.init_from": cfg.model.init_from}
    if cfg.model.backbone_weights not in ("", "none", "imagenet") and not resume:
        paths["model.backbone_weights"] = cfg.model.backbone_weights
    return {key: path for key, path in paths.items() if path}


def check_cluster(cfg: Config, info: ClusterInfo, output_dir: str, *, gpus_per_worker: float | None = None,
                  max_concurrent: int | None = 1, autoscale: bool = False, sweep: bool = True, resume: bool = False):
    """Refuse (ConfigError, one line) what cannot run on the connected cluster; returns the resource plan
    (of each sweep trial, or of the one run of ``neoray train`` with ``sweep=False``). ``output_dir``, where
    the run or the sweep writes, must not be a file or lie under one."""
    check_output_dir(output_dir, probe=False)  # probed before Ray started
    plan = plan_trials(cfg, gpus_per_worker, max_concurrent, autoscale=autoscale, sweep=sweep)
    if info.nodes > 1:
        check_visible_on_all_nodes(needed_everywhere(cfg, output_dir, resume))
    return plan


__all__ = [
    "ResumePoint",
    "check_batches",
    "check_cluster",
    "check_output_dir",
    "check_resume",
    "needed_everywhere",
    "prepare_config",
    "pretrained_class_rows",
    "resume_point",
]
