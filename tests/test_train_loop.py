"""The training loop in a plain process (LocalContext) with a tiny deterministic detector.

The tiny model implements the detector interface (a ``backbone``; train forward returns a dict of
losses; every parameter used) with mean-reduced losses, so one batch of 4 and two accumulated
batches of 2 give the same gradient, and so do two DDP workers with 2 images each.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from types import SimpleNamespace

import pytest
import torch
import torch.multiprocessing as mp
from fault_hooks import Faults
from torch import nn

from neoray.checkpoints import load_checkpoint, read_pointers
from neoray.config import from_dict
from neoray.engine import ranking
from neoray.engine import step as step_module
from neoray.engine.context import LocalContext, ReadyBatches
from neoray.engine.loop import run_training_loop
from neoray.engine.optim import build_optimizer, build_scheduler, lr_at
from neoray.engine.state import TrainState
from neoray.engine.step import EpochStats, finish_update, train_one_epoch

CATEGORIES = [{"id": 1, "name": "a", "label": 0}, {"id": 2, "name": "b", "label": 1}]


@dataclass
class TinyBatch:
    """A Batch of 32x18 images that are their own source images (scale 1, no padding)."""

    images: torch.Tensor
    targets: list
    image_ids: torch.Tensor

    def to(self, device):
        return TinyBatch(self.images.to(device), [{k: v.to(device) for k, v in t.items()} for t in self.targets],
                         self.image_ids)

    @property
    def scale(self):
        return torch.ones(len(self.images))

    @property
    def pad(self):
        return torch.zeros(len(self.images), 2)

    @property
    def orig_sizes(self):
        return torch.tensor([[self.images.shape[3], self.images.shape[2]]] * len(self.images))


class TinyDetector(nn.Module):
    """Mean colour -> backbone -> head predicting per-class box counts; MSE losses (batch means)."""

    def __init__(self, num_classes: int):
        super().__init__()
        torch.manual_seed(0)
        self.backbone = nn.Sequential(nn.Linear(3, 8), nn.LayerNorm(8))
        self.head = nn.Linear(8, num_classes)
        self.box = nn.Linear(8, 1)
        self.num_classes = num_classes

    def forward(self, images, targets=None, num_boxes=None):
        x = images.float().mean(dim=(2, 3)) / 255.0
        features = torch.tanh(self.backbone(x))
        counts = self.head(features)
        if not self.training:
            return [{"boxes": torch.zeros(0, 4), "scores": torch.zeros(0), "labels": torch.zeros(0, dtype=torch.long)}
                    for _ in range(images.shape[0])]
        wanted = torch.stack([torch.bincount(t["labels"], minlength=self.num_classes).float() for t in targets])
        areas = torch.stack([(t["boxes"][:, 2:] - t["boxes"][:, :2]).prod(1).sum() / 1000.0 for t in targets])
        return {"count": ((counts - wanted) ** 2).mean(), "area": ((self.box(features)[:, 0] - areas) ** 2).mean()}


def make_batches(num_images: int, batch_size: int, seed: int = 0, first_id: int = 0, empty: bool = False):
    generator = torch.Generator().manual_seed(seed)
    batches = []
    for start in range(0, num_images - batch_size + 1, batch_size):
        images = torch.randint(0, 256, (batch_size, 3, 18, 32), dtype=torch.uint8, generator=generator)
        targets = []
        for _ in range(batch_size):
            n = 0 if empty else int(torch.randint(1, 4, (1,), generator=generator))
            xy = torch.rand(n, 2, generator=generator) * torch.tensor([16.0, 8.0])
            wh = 1 + torch.rand(n, 2, generator=generator) * torch.tensor([15.0, 9.0])
            boxes = torch.cat([xy, xy + wh], dim=1)  # inside the 32x18 image
            targets.append({"boxes": boxes, "labels": torch.randint(0, 2, (n,), generator=generator),
                            "iscrowd": torch.zeros(n, dtype=torch.bool), "areas": torch.ones(n)})
        ids = torch.arange(first_id + start, first_id + start + batch_size)
        batches.append(TinyBatch(images, targets, ids))
    return batches


def rebatch(batches, batch_size):
    """The same images in the same order, cut into batches of another size."""
    images = torch.cat([b.images for b in batches])
    targets = [t for b in batches for t in b.targets]
    ids = torch.cat([b.image_ids for b in batches])
    return [TinyBatch(images[i:i + batch_size], targets[i:i + batch_size], ids[i:i + batch_size])
            for i in range(0, len(targets), batch_size)]


def tiny_config(**train):
    base = {"epochs": 1, "batch_size": 4, "accumulate": 1, "lr": 0.05, "optimizer": "sgd", "momentum": 0.0,
            "weight_decay": 0.0, "schedule": "constant", "clip_grad_norm": 0.0, "ema": False, "amp": "off"}
    base.update(train)
    return from_dict({"model": {"name": "tiny"}, "train": base})


def ready(batches, val=None):
    return ReadyBatches(batches, val, categories=CATEGORIES)


def run_local(cfg, batches, tmp_path=None, val=None, **kwargs):
    ctx = LocalContext(ready(batches, val), checkpoint_root=tmp_path)
    models = []

    def model_fn(num_classes):
        models.append(TinyDetector(num_classes))
        return models[-1]

    run_training_loop(cfg, ctx, model_fn=model_fn, log=None, **kwargs)
    return models[0], ctx


def test_loss_falls_and_one_report_per_epoch(tmp_path):
    cfg = tiny_config(epochs=3, optimizer="adamw", lr=0.02, schedule="cosine", warmup_steps=2, ema=True)
    _, ctx = run_local(cfg, make_batches(32, 4), tmp_path)
    assert [r["epoch"] for r in ctx.reports] == [1, 2, 3]
    assert ctx.reports[-1]["loss"] < ctx.reports[0]["loss"]
    assert ctx.reports[-1]["step"] == 24
    for key in ("lr", "loss_count", "loss_area", "images_per_s", "step_time_s", "peak_mem_mb",
                "skipped_steps", "oom_skipped"):
        assert key in ctx.reports[0], key
    assert ctx.reports[0]["stop_reason"] == ""
    payload = load_checkpoint(tmp_path / "epoch_0003")
    assert payload["epoch"] == 3 and payload["step"] == 24 and payload["ema"] is not None


def test_accumulation_matches_a_bigger_batch():
    batches = make_batches(16, 4)
    big, _ = run_local(tiny_config(batch_size=4, accumulate=1), batches)
    small, _ = run_local(tiny_config(batch_size=2, accumulate=2), rebatch(batches, 2))
    untouched = TinyDetector(2)
    for (name, a), b, c in zip(big.named_parameters(), small.parameters(), untouched.parameters()):
        assert not torch.allclose(a, c), f"{name} did not train"
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_partial_accumulation_group_steps_at_epoch_end():
    # 5 batches with accumulate 2: groups (2, 2, 1) -> 3 optimizer steps per epoch.
    _, ctx = run_local(tiny_config(batch_size=2, accumulate=2, epochs=2), make_batches(10, 2))
    assert [r["step"] for r in ctx.reports] == [3, 6]


def test_partial_accumulation_group_is_a_full_size_update():
    # 3 batches with accumulate 2: groups (2, 1). The last group's update must be the plain update of
    # its one batch (mean loss), not half of it.
    batches = make_batches(6, 2)
    accumulated, _ = run_local(tiny_config(batch_size=2, accumulate=2), batches)
    plain, _ = run_local(tiny_config(batch_size=4, accumulate=1), rebatch(batches[:2], 4) + batches[2:])
    for (name, a), b in zip(accumulated.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_warmup_counts_optimizer_steps_with_accumulation(monkeypatch):
    # 8 micro-batches x 2 epochs with accumulate 2 = 8 optimizer steps: the k-th update uses lr_at(k).
    used = []
    original = torch.optim.SGD.step

    def step(self, *args, **kwargs):
        used.append(next(g["lr"] for g in self.param_groups if g["name"] == "head_decay"))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.SGD, "step", step)
    cfg = tiny_config(batch_size=2, accumulate=2, epochs=2, warmup_steps=5, schedule="cosine")
    _, ctx = run_local(cfg, make_batches(16, 2))
    assert used == pytest.approx([lr_at(cfg.train, 8, k) for k in range(8)])
    assert used[:5] == pytest.approx([0.05 * (k + 1) / 5 for k in range(5)])  # warmup over 5 updates
    assert [r["lr"] for r in ctx.reports] == pytest.approx([lr_at(cfg.train, 8, 4), lr_at(cfg.train, 8, 8)])


class RandomDrawDetector(TinyDetector):
    """Draws from the global RNGs in every train forward, like RT-DETR's denoising noise."""

    def __init__(self, num_classes):
        super().__init__(num_classes)
        self.draws = []

    def forward(self, images, targets=None, num_boxes=None):
        if self.training:
            self.draws.append((float(torch.rand(())), random.random()))
        return super().forward(images, targets)


def test_preflight_does_not_consume_the_rng_stream():
    # The preflight's forward (first draw) must leave the RNGs as they were, so the first training
    # step draws the same numbers as a run without a preflight (and a resumed run continues its stream).
    models = []

    def model_fn(num_classes):
        models.append(RandomDrawDetector(num_classes))
        return models[-1]

    run_training_loop(tiny_config(), LocalContext(ready(make_batches(8, 4))), model_fn=model_fn, log=None)
    preflight, first_step, second_step = models[0].draws
    assert preflight == first_step and second_step != first_step


def test_frozen_backbone_has_no_gradient_until_its_epoch():
    cfg = tiny_config(epochs=3, freeze_backbone_until_epoch=2)
    batches = make_batches(8, 4)
    model_holder = []
    backbone_after_epoch = []
    backbone_requires_grad = []

    class Ctx(LocalContext):
        def report(self, metrics, checkpoint_dir):
            super().report(metrics, checkpoint_dir)
            params = list(model_holder[0].backbone.parameters())
            backbone_after_epoch.append([p.detach().clone() for p in params])
            backbone_requires_grad.append({p.requires_grad for p in params})

    def model_fn(num_classes):
        model_holder.append(TinyDetector(num_classes))
        return model_holder[0]

    initial = [p.detach().clone() for p in TinyDetector(2).backbone.parameters()]
    run_training_loop(cfg, Ctx(ready(batches)), model_fn=model_fn, log=None)
    epoch1, epoch2, epoch3 = backbone_after_epoch
    assert all(torch.equal(a, b) for a, b in zip(initial, epoch1))  # frozen in epoch 1 (index 0)
    assert all(torch.equal(a, b) for a, b in zip(initial, epoch2))  # and epoch 2 (index 1)
    assert not all(torch.equal(a, b) for a, b in zip(epoch2, epoch3))  # trains from epoch index 2
    assert backbone_requires_grad == [{False}, {False}, {True}]
    assert not torch.equal(model_holder[0].head.weight, TinyDetector(2).head.weight)


def test_resume_continues_step_and_lr(tmp_path):
    cfg = tiny_config(epochs=4, optimizer="adamw", schedule="cosine", lr=0.01)
    batches = make_batches(16, 4)
    _, full = run_local(cfg, batches, tmp_path)
    # Continue from the epoch-2 checkpoint in a fresh loop: epochs 3 and 4 must match the full run.
    ctx = LocalContext(ready(batches), resume_dir=str(tmp_path / "epoch_0002"))
    run_training_loop(cfg, ctx, model_fn=TinyDetector, log=None)
    assert [r["epoch"] for r in ctx.reports] == [3, 4]
    for resumed, reference in zip(ctx.reports, full.reports[2:]):
        assert resumed["step"] == reference["step"]
        assert resumed["lr"] == pytest.approx(reference["lr"])
        assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_a_prefix_of_the_schedule_continued_to_its_end_is_the_whole_run(tmp_path):
    """train.stop_after_epoch (a sweep's trial): the run stops after that epoch on the full schedule's LR, with
    an evaluation and a checkpoint; continued from it without the stop, it is the uninterrupted run."""
    cfg = tiny_config(epochs=4, optimizer="adamw", schedule="cosine", lr=0.01, warmup_steps=2)
    batches, val = make_batches(16, 4), make_batches(8, 4, seed=1)
    _, full = run_local(cfg, batches, tmp_path / "full", val=val)
    prefix_cfg = cfg.with_overrides({"train.stop_after_epoch": 2})
    _, prefix = run_local(prefix_cfg, batches, tmp_path / "prefix", val=val)
    assert [r["epoch"] for r in prefix.reports] == [1, 2]
    assert prefix.reports[-1]["evaluated"] == 1 and not prefix.reports[-1]["stop_reason"]
    for part, whole in zip(prefix.reports, full.reports):
        # the LR of a 4-epoch schedule, not of a 2-epoch one
        assert part["lr"] == pytest.approx(whole["lr"]) and part["loss"] == pytest.approx(whole["loss"], rel=1e-5)
    assert full.reports[1]["lr"] > full.reports[3]["lr"]
    ctx = LocalContext(ready(batches, val), resume_dir=str(tmp_path / "prefix" / "epoch_0002"))
    run_training_loop(cfg, ctx, model_fn=TinyDetector, log=None)
    assert [r["epoch"] for r in ctx.reports] == [3, 4]
    for resumed, reference in zip(ctx.reports, full.reports[2:]):
        assert resumed["step"] == reference["step"] and resumed["lr"] == pytest.approx(reference["lr"])
        assert resumed["loss"] == pytest.approx(reference["loss"], rel=1e-5)


def test_a_stop_past_the_schedule_trains_the_schedule():
    cfg = tiny_config(epochs=2, stop_after_epoch=5)
    _, ctx = run_local(cfg, make_batches(8, 4))
    assert [r["epoch"] for r in ctx.reports] == [1, 2]


def test_nan_loss_is_skipped_and_counted():
    cfg = tiny_config(epochs=1)
    batches = make_batches(24, 4)
    model, ctx = run_local(cfg, batches, hooks=Faults(nan_loss_at=(2,)))
    report = ctx.reports[0]
    assert report["skipped_steps"] == 1 and report["step"] == 5 and report["stop_reason"] == ""
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_too_many_nan_updates_stop_the_run_with_the_reason():
    cfg = tiny_config(epochs=3, max_skipped_fraction=0.25)
    _, ctx = run_local(cfg, make_batches(16, 4), hooks=Faults(nan_loss_at=(0, 1)))
    assert len(ctx.reports) == 1
    assert "non-finite" in ctx.reports[0]["stop_reason"] and ctx.reports[0]["skipped_steps"] == 2


def test_oom_skips_the_batch_then_stops_past_the_limit():
    _, ctx = run_local(tiny_config(epochs=1), make_batches(16, 4), hooks=Faults(oom_at=(1,)))
    assert ctx.reports[0]["oom_skipped"] == 1 and ctx.reports[0]["step"] == 3
    _, ctx = run_local(tiny_config(epochs=2, max_oom_per_epoch=1), make_batches(16, 4),
                       hooks=Faults(oom_at=(0, 2)))
    assert len(ctx.reports) == 1 and "out of memory" in ctx.reports[0]["stop_reason"]
    assert "train.accumulate=2" in ctx.reports[0]["stop_reason"]


def test_oom_in_backward_or_optimizer_step_skips_the_batch():
    # One worker: an OOM in the backward (after gradients were accumulated) or in the optimizer step
    # drops that batch's gradients; the run equals one without the batch.
    batches = make_batches(16, 4)
    without, _ = run_local(tiny_config(), batches[:1] + batches[2:])
    for fault in (Faults(oom_backward_at=(1,)), Faults(oom_step_at=(1,))):
        model, ctx = run_local(tiny_config(), batches, hooks=fault)
        assert ctx.reports[0]["oom_skipped"] == 1 and ctx.reports[0]["step"] == 3, fault
        for a, b in zip(model.parameters(), without.parameters()):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_oom_in_backward_drops_the_whole_accumulation_group():
    # accumulate 2, OOM in the backward of micro-batch 0: the group is dropped, micro-batch 1 starts the
    # next group -> groups (1, 2), (3): the same as training on batches 1..3.
    batches = make_batches(8, 2)
    model, ctx = run_local(tiny_config(batch_size=2, accumulate=2), batches,
                           hooks=Faults(oom_backward_at=(0,)))
    without, _ = run_local(tiny_config(batch_size=2, accumulate=2), batches[1:])
    assert ctx.reports[0]["oom_skipped"] == 1 and ctx.reports[0]["step"] == 2
    for a, b in zip(model.parameters(), without.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def _state(cfg, model, scaler=None):
    optimizer = build_optimizer(model, cfg.train)
    return TrainState(cfg=cfg, model=model, optimizer=optimizer,
                      scheduler=build_scheduler(optimizer, cfg.train, 100),
                      scaler=scaler or torch.amp.GradScaler("cpu", enabled=False), device=torch.device("cpu"))


def test_oom_under_ddp_is_skipped_only_where_no_all_reduce_ran(tmp_path, monkeypatch):
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path}/pg", rank=0, world_size=1)
    try:
        cfg = tiny_config(batch_size=2, accumulate=2)
        batches = make_batches(8, 2)
        # A no_sync micro-step's backward is local: the group is dropped on every rank.
        state = _state(cfg, TinyDetector(2))
        state.wrapped = DistributedDataParallel(state.model)
        stats = train_one_epoch(state, batches, Faults(oom_backward_at=(0,)))
        assert stats.counters.oom == 1 and state.step == 2
        # Several ranks (as the step sees them; a one-process group stands in for them here): the syncing
        # micro-step's backward started the gradient all-reduce, so it fails with advice ...
        monkeypatch.setattr(step_module, "is_distributed", lambda: True)
        state = _state(cfg, TinyDetector(2))
        state.wrapped = DistributedDataParallel(state.model)
        with pytest.raises(RuntimeError, match="all-reduce under DDP.*train.batch_size=1 with train.accumulate=4"):
            train_one_epoch(state, batches, Faults(oom_backward_at=(1,)))
        # ... and an optimizer step cannot be skipped either.
        state = _state(cfg, TinyDetector(2))
        state.wrapped = DistributedDataParallel(state.model)
        with pytest.raises(RuntimeError, match="optimizer step under DDP"):
            train_one_epoch(state, batches, Faults(oom_step_at=(1,)))
    finally:
        dist.destroy_process_group()


def test_fp16_scaler_overflow_is_counted_apart_from_non_finite_updates():
    # GradScaler on CPU stands in for CUDA fp16: an inf gradient after unscaling is an overflow.
    cfg = tiny_config()
    model = TinyDetector(2)
    state = _state(cfg, model, scaler=torch.amp.GradScaler("cpu", init_scale=2.0**16))
    before = [p.detach().clone() for p in model.parameters()]
    stats = EpochStats()
    batch = make_batches(4, 4)[0]
    state.scaler.scale(sum(model(batch.images, batch.targets).values())).backward()
    for param in model.parameters():
        param.grad.fill_(float("inf"))  # what an fp16 overflow leaves
    finish_update(state, stats, group_bad=False, group_len=1)
    assert stats.counters.amp_overflow == 1 and stats.counters.skipped == 0 and state.step == 0
    assert state.scaler.get_scale() == 2.0**15  # the scaler lowered its scale
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    finish_update(state, stats, group_bad=True, group_len=1)  # a non-finite loss is still a skip
    assert stats.counters.skipped == 1 and stats.counters.amp_overflow == 1 and stats.counters.updates == 2


def test_score_is_minus_the_loss_without_evaluation_and_map_only_when_evaluated():
    batches = make_batches(8, 4)
    _, ctx = run_local(tiny_config(epochs=3, eval_every=2), batches)
    for report in ctx.reports:  # no validation data
        assert report["score"] == -report["loss"] and report["evaluated"] == 0 and "map" not in report
    _, ctx = run_local(tiny_config(epochs=3, eval_every=2), batches, val=batches)
    assert [r["evaluated"] for r in ctx.reports] == [0, 1, 1]  # every second epoch and the last
    assert "map" not in ctx.reports[0] and ctx.reports[0]["score"] == -ctx.reports[0]["loss"]
    for report in ctx.reports[1:]:
        assert report["score"] == report["map"] >= 0


def test_checkpoint_record_follows_the_score(tmp_path):
    from neoray.run.trainer import RunRecorder

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    recorder = RunRecorder(str(run_dir), verbose=False)
    # Epoch 1 unevaluated (-loss), epochs 2 and 3 evaluated: an evaluated epoch always outranks it.
    for epoch, row in ((1, {"loss": 0.5, "score": -0.5, "evaluated": 0}),
                       (2, {"loss": 2.0, "map": 0.2, "score": 0.2, "evaluated": 1}),
                       (3, {"loss": 1.0, "map": 0.1, "score": 0.1, "evaluated": 1})):
        checkpoint = tmp_path / "run" / "ray" / f"checkpoint_{epoch}"
        checkpoint.mkdir(parents=True)
        recorder.after_report(None, [{"epoch": epoch, **row}], SimpleNamespace(path=str(checkpoint)))
    pointers = read_pointers(str(run_dir))
    assert pointers["best"]["path"] == "ray/checkpoint_2" and pointers["best"]["epoch"] == 2
    assert pointers["latest"]["path"] == "ray/checkpoint_3"
    assert list((run_dir / "tensorboard").glob("events.out.tfevents.*"))


def test_bad_label_fails_preflight_with_label_and_num_classes():
    batches = make_batches(8, 4)
    batches[0].targets[1]["labels"] = torch.tensor([0, 7])
    batches[0].targets[1]["boxes"] = torch.tensor([[1.0, 1.0, 5.0, 5.0], [2.0, 2.0, 6.0, 6.0]])
    model, ctx = run_local(tiny_config(epochs=2), batches)
    assert len(ctx.reports) == 1
    reason = ctx.reports[0]["stop_reason"]
    assert "label 7" in reason and "num_classes=2" in reason
    assert ctx.reports[0]["score"] == ranking.WORST and ctx.reports[0]["evaluated"] == 0  # Tune needs a score
    assert torch.equal(model.head.weight, TinyDetector(2).head.weight)  # nothing was trained


def test_images_without_boxes_train():
    batches = make_batches(8, 4, empty=True)
    _, ctx = run_local(tiny_config(epochs=1), batches)
    assert ctx.reports[0]["step"] == 2 and ctx.reports[0]["skipped_steps"] == 0


# ----------------------------------------------------------------------------------------------------
# Two DDP workers (gloo, torch.multiprocessing): accumulation and unequal shards
# ----------------------------------------------------------------------------------------------------


def _ddp_worker(rank, world_size, port, config_dict, shards, out_dir, hooks=None):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    from neoray.engine import state as state_module
    from neoray.engine.ema import ModelEMA

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    seen = {"allreduce_calls": 0}

    # Count DDP's gradient all-reduces (one per bucket; the tiny model has one bucket) with a comm
    # hook on every DDP the loop builds. This process is the test's own (spawned), so patching is local.
    def counting_hook(_, bucket):
        seen["allreduce_calls"] += 1
        return default_hooks.allreduce_hook(None, bucket)

    class CountingDDP(state_module.DistributedDataParallel):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            self.register_comm_hook(None, counting_hook)

    state_module.DistributedDataParallel = CountingDDP
    original_update = ModelEMA.update

    def ema_update(self, model):  # record the EMA's starting point
        seen.setdefault("ema_start", {k: v.clone() for k, v in self.module.state_dict().items()})
        original_update(self, model)

    ModelEMA.update = ema_update
    try:
        class Ctx(LocalContext):
            world_rank = rank
            local_rank = rank

        ctx = Ctx(ready(shards[rank]))
        ctx.world_size = world_size
        holder = []

        def model_fn(num_classes):
            holder.append(TinyDetector(num_classes))
            if rank > 0:  # ranks are seeded differently: DDP must start every rank from rank 0's weights
                with torch.no_grad():
                    for param in holder[0].parameters():
                        param.add_(1.0)
            return holder[0]

        run_training_loop(from_dict(config_dict), ctx, model_fn=model_fn, log=None, hooks=hooks)
        torch.save({"params": [p.detach() for p in holder[0].parameters()], "reports": ctx.reports, **seen},
                   f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_ddp(cfg, shards, tmp_path, hooks=None):
    mp.spawn(_ddp_worker, args=(2, _free_port(), cfg.to_dict(), shards, str(tmp_path), hooks),
             nprocs=2, join=True)
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]


@pytest.mark.slow
def test_ddp_accumulation_matches_single_process_big_batch(tmp_path):
    batches = make_batches(16, 4)  # 4 batches of 4 images on one process
    single, _ = run_local(tiny_config(batch_size=4, accumulate=1), batches)
    # Two workers, batch 1 x accumulate 2: each update sees 2 images per worker = 4 images, like above.
    # Worker r takes images 2r, 2r+1 of every batch of 4.
    ones = rebatch(batches, 1)
    shards = [[ones[i] for i in range(len(ones)) if (i % 4) // 2 == r] for r in range(2)]
    # Rank 1 starts from other weights (see _ddp_worker); EMA with no warmup shows where it started.
    results = run_ddp(tiny_config(batch_size=1, accumulate=2, ema=True, ema_warmup_steps=0), shards, tmp_path)
    initial = TinyDetector(2).state_dict()  # rank 0's weights
    for rank_result in results:
        assert rank_result["reports"][0]["step"] == 4
        for a, b in zip(single.parameters(), rank_result["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        # One gradient all-reduce per optimizer update, none on the no_sync micro-steps (averaging
        # every backward would give the same parameters, so only the count shows a missing no_sync).
        assert rank_result["allreduce_calls"] == 4
        # The EMA starts from the weights every rank trains (rank 0's, broadcast by DDP).
        for key, value in initial.items():
            assert torch.equal(rank_result["ema_start"][key], value), key
    assert results[0]["reports"][0]["loss"] == pytest.approx(results[1]["reports"][0]["loss"])


@pytest.mark.slow
def test_ddp_oom_in_a_no_sync_backward_on_one_rank_drops_the_group_on_both(tmp_path):
    batches = make_batches(16, 4)
    ones = rebatch(batches, 1)
    shards = [[ones[i] for i in range(len(ones)) if (i % 4) // 2 == r] for r in range(2)]
    # Rank 1 runs out of memory in the backward of micro-batch 0 (no_sync): both ranks drop that group
    # and micro-batch 1 starts the next one -> groups (1, 2), (3, 4), (5, 6), (7) on both ranks. The
    # reference: one process, accumulate 2, micro-batch i = both ranks' micro-batch i, without the first.
    results = run_ddp(tiny_config(batch_size=1, accumulate=2), shards, tmp_path,
                      Faults(oom_backward_at=(0,), oom_rank=1))
    pairs = [rebatch([a, b], 2)[0] for a, b in zip(*shards)]
    without, _ = run_local(tiny_config(batch_size=2, accumulate=2), pairs[1:])
    for rank_result in results:
        report = rank_result["reports"][0]
        assert report["oom_skipped"] == 1 and report["step"] == 4
        for a, b in zip(without.parameters(), rank_result["params"]):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_ddp_worker_with_only_empty_images_and_a_longer_shard_does_not_stall(tmp_path):
    # Rank 0 has boxes; rank 1 sees only images without boxes and one batch more: the ranks must agree
    # to stop together (no hang) and keep identical weights.
    shards = [make_batches(8, 2, seed=1), make_batches(10, 2, seed=2, first_id=100, empty=True)]
    results = run_ddp(tiny_config(batch_size=2, epochs=2), shards, tmp_path)
    assert [r["step"] for r in results[0]["reports"]] == [4, 8]
    for a, b in zip(results[0]["params"], results[1]["params"]):
        torch.testing.assert_close(a, b)
    assert results[0]["reports"][0]["stop_reason"] == ""


def _ddp_rtdetr_oom_worker(rank, world_size, port, out_dir):
    """A small RT-DETR on two gloo ranks; rank 1's decoder runs out of memory in its first forward."""
    import torch.distributed as dist

    from neoray.models import build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    try:
        seen = []

        def model_fn(num_classes):
            model = build_model("rtdetr_cpu", num_classes, hidden_dim=32, num_queries=8, num_denoising=4)
            decoder_forward, calls = model.decoder.forward, []

            def forward(*args, **kwargs):
                calls.append(1)
                if rank == 1 and model.training and len(calls) == 2:  # the 1st call is the preflight
                    raise torch.OutOfMemoryError("injected inside the model, before the loss")
                return decoder_forward(*args, **kwargs)

            model.decoder.forward = forward
            criterion_forward = model.criterion.forward
            model.criterion.forward = lambda outputs, targets, num_boxes=None: (
                seen.append(num_boxes), criterion_forward(outputs, targets, num_boxes))[1]
            return model

        class Ctx(LocalContext):
            world_rank = rank
            local_rank = rank

        ctx = Ctx(ready(make_batches(8, 2, seed=rank, first_id=100 * rank)))
        ctx.world_size = world_size
        run_training_loop(tiny_config(batch_size=2, epochs=1), ctx, model_fn=model_fn, log=None)
        torch.save({"reports": ctx.reports, "num_boxes": seen}, f"{out_dir}/rank{rank}.pt")
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ddp_oom_inside_the_model_forward_on_one_rank_keeps_the_ranks_in_step(tmp_path):
    """The loss normaliser is all-reduced before the forward: an OOM inside one rank's forward (before
    its loss) must not pair that rank's next collective with another rank's loss all-reduce."""
    mp.spawn(_ddp_rtdetr_oom_worker, args=(2, _free_port(), str(tmp_path)), nprocs=2, join=True)
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for result in results:
        report = result["reports"][0]
        assert report["oom_skipped"] == 1 and report["step"] == 3  # 4 micro-batches, the first dropped
    boxes = [[sum(len(t["labels"]) for t in b.targets) for b in make_batches(8, 2, seed=r, first_id=100 * r)]
             for r in range(2)]
    # Every loss a rank computed was normalised by the mean of both ranks' box counts for that micro-batch.
    expected = [(a + b) / 2 for a, b in zip(*boxes)]
    # [0] is each rank's preflight (its own count, None); rank 1 computed no loss for micro-batch 0.
    assert results[0]["num_boxes"][0] is None and results[1]["num_boxes"][0] is None
    assert results[0]["num_boxes"][1:] == pytest.approx(expected)
    assert results[1]["num_boxes"][1:] == pytest.approx(expected[1:])


def test_a_resumed_run_does_not_read_the_backbone_weights_again(tmp_path):
    """The checkpoint holds every weight: resuming must not need (or re-read) model.backbone_weights."""
    from neoray.models import build_model

    weights = tmp_path / "backbone.pt"
    torch.save(build_model("rtdetr_cpu", 2, hidden_dim=32, num_queries=8).backbone.body.state_dict(), weights)
    cfg = from_dict({**tiny_config(epochs=1, batch_size=2).to_dict(),
                     "model": {"name": "rtdetr_cpu", "backbone_weights": str(weights),
                               "options": {"hidden_dim": 32, "num_queries": 8, "num_denoising": 4}}})
    first = LocalContext(ready(make_batches(4, 2)), checkpoint_root=tmp_path / "ckpt")
    run_training_loop(cfg, first, log=None)
    weights.unlink()
    resumed = LocalContext(ready(make_batches(4, 2)), checkpoint_root=tmp_path / "ckpt")
    longer = from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"], "epochs": 2}})
    run_training_loop(longer, resumed, resume_from=str(tmp_path / "ckpt" / "epoch_0001"), log=None)
    assert [r["epoch"] for r in resumed.reports] == [2]
