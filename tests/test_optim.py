"""Parameter groups (no decay on norms, biases, embeddings; backbone LR) and LR schedules via lr_at."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from neoray.config import TrainConfig
from neoray.engine.optim import (
    build_optimizer,
    build_scheduler,
    lr_at,
    optimizer_steps_per_epoch,
    param_groups,
)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4))
        self.query_embed = nn.Embedding(5, 4)
        self.pos_scale = nn.Parameter(torch.ones(4))
        self.proj = nn.Linear(4, 4)
        self.norm = nn.LayerNorm(4)


def _groups_by_name(model, **kwargs):
    names = {id(p): n for n, p in model.named_parameters()}
    return {g["name"]: (g, sorted(names[id(p)] for p in g["params"])) for g in param_groups(model, **kwargs)}


def test_no_decay_on_norms_biases_embeddings_and_backbone_lr():
    groups = _groups_by_name(Net(), lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    assert groups["backbone_decay"][1] == ["backbone.0.weight"]
    assert groups["backbone_no_decay"][1] == ["backbone.0.bias", "backbone.1.bias", "backbone.1.weight"]
    assert groups["head_decay"][1] == ["proj.weight"]
    assert groups["head_no_decay"][1] == ["norm.bias", "norm.weight", "pos_scale", "proj.bias", "query_embed.weight"]
    assert groups["backbone_decay"][0]["lr"] == pytest.approx(1e-4)
    assert groups["head_decay"][0]["lr"] == pytest.approx(1e-3)
    assert groups["backbone_decay"][0]["weight_decay"] == 0.05 and groups["head_no_decay"][0]["weight_decay"] == 0.0


def test_linear_layers_named_like_queries_or_positions_decay():
    class Decoder(nn.Module):
        def __init__(self):
            super().__init__()
            self.query_pos_head = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 4))
            self.denoising_class_embed = nn.Embedding(3, 4)
            self.pos_embed = nn.Parameter(torch.zeros(10, 4))  # a raw learned position table

    model = nn.Module()
    model.decoder = Decoder()
    groups = _groups_by_name(model, lr=1e-3, weight_decay=0.05, backbone_lr_mult=0.1)
    assert groups["head_decay"][1] == ["decoder.query_pos_head.0.weight", "decoder.query_pos_head.2.weight"]
    assert groups["head_no_decay"][1] == ["decoder.denoising_class_embed.weight", "decoder.pos_embed",
                                          "decoder.query_pos_head.0.bias", "decoder.query_pos_head.2.bias"]


def test_optimizer_kinds():
    assert isinstance(build_optimizer(Net(), TrainConfig()), torch.optim.AdamW)
    sgd = build_optimizer(Net(), TrainConfig(optimizer="sgd", momentum=0.8))
    assert isinstance(sgd, torch.optim.SGD) and sgd.param_groups[0]["momentum"] == 0.8


def test_a_partial_accumulation_group_counts_as_an_optimizer_step():
    assert optimizer_steps_per_epoch(12, 5) == 3  # groups of 5, 5, 2


def test_warmup_then_cosine():
    train = TrainConfig(lr=1e-3, warmup_steps=10, schedule="cosine", min_lr_ratio=0.01)
    assert lr_at(train, 110, 0) == pytest.approx(1e-4)
    assert lr_at(train, 110, 4) == pytest.approx(5e-4)
    assert lr_at(train, 110, 10) == pytest.approx(1e-3)  # warmup done: the cosine starts at the top
    assert lr_at(train, 110, 60) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))  # halfway
    assert lr_at(train, 110, 110) == pytest.approx(1e-5)
    assert lr_at(train, 110, 500) == pytest.approx(1e-5)  # clamped past the end


def test_flat_cosine_holds_the_full_lr_then_decays_over_the_rest():
    train = TrainConfig(lr=1e-3, warmup_steps=10, schedule="flat_cosine", flat_fraction=0.5, min_lr_ratio=0.01)
    assert lr_at(train, 110, 4) == pytest.approx(5e-4)  # the same warmup
    assert lr_at(train, 110, 10) == lr_at(train, 110, 59) == pytest.approx(1e-3)  # flat for half of 100 steps
    assert lr_at(train, 110, 85) == pytest.approx(1e-3 * (0.01 + 0.99 * 0.5))  # halfway down the cosine
    assert lr_at(train, 110, 110) == pytest.approx(1e-5)
    no_flat = TrainConfig(lr=1e-3, warmup_steps=10, schedule="flat_cosine", flat_fraction=0.0)
    cosine = TrainConfig(lr=1e-3, warmup_steps=10, schedule="cosine")
    assert [lr_at(no_flat, 110, s) for s in range(0, 111, 7)] == [lr_at(cosine, 110, s) for s in range(0, 111, 7)]


def test_multistep_fractions_and_step_numbers():
    fractions = TrainConfig(lr=1.0, schedule="multistep", milestones=[0.5, 0.75], gamma=0.1)
    assert [lr_at(fractions, 100, s) for s in (49, 50, 74, 75)] == pytest.approx([1.0, 0.1, 0.1, 0.01])
    numbers = TrainConfig(lr=1.0, schedule="multistep", milestones=[30], gamma=0.5, warmup_steps=5)
    assert [lr_at(numbers, 100, s) for s in (0, 29, 30)] == pytest.approx([0.2, 1.0, 0.5])


def test_onecycle_and_constant():
    onecycle = TrainConfig(lr=1.0, schedule="onecycle", warmup_steps=10, min_lr_ratio=0.0)
    assert lr_at(onecycle, 110, 0) == pytest.approx(0.04)
    assert lr_at(onecycle, 110, 10) == pytest.approx(1.0)
    assert lr_at(onecycle, 110, 60) == pytest.approx(0.5)
    assert lr_at(onecycle, 110, 110) == pytest.approx(0.0)
    assert lr_at(TrainConfig(lr=0.3, schedule="constant", warmup_steps=3), 50, 40) == pytest.approx(0.3)


def test_lambda_scheduler_follows_lr_at_and_scales_the_backbone():
    train = TrainConfig(lr=1e-3, warmup_steps=4, schedule="cosine", backbone_lr_mult=0.1)
    model = Net()
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, total_steps=20)
    for step in range(20):
        lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
        assert lrs["head_decay"] == pytest.approx(lr_at(train, 20, step))
        assert lrs["backbone_decay"] == pytest.approx(0.1 * lr_at(train, 20, step))
        optimizer.step()
        scheduler.step()
    assert not math.isnan(optimizer.param_groups[0]["lr"])
