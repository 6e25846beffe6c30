"""Checkpoint save/load round trip (parameters, optimizer, scheduler, RNG) and clear errors."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from torch import nn

from neoray.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from neoray.config import TrainConfig
from neoray.engine.ema import ModelEMA
from neoray.engine.optim import build_optimizer, build_scheduler
from neoray.engine.seeding import capture_rng_state, restore_rng_state


def _trained(seed: int):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 8), nn.LayerNorm(8), nn.Linear(8, 2))
    train = TrainConfig(lr=1e-2, warmup_steps=2)
    optimizer = build_optimizer(model, train)
    scheduler = build_scheduler(optimizer, train, total_steps=10)
    for _ in range(3):
        model(torch.randn(5, 4)).pow(2).mean().backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    return model, optimizer, scheduler


def test_round_trip_restores_parameters_optimizer_scheduler_and_ema(tmp_path):
    model, optimizer, scheduler = _trained(0)
    ema = ModelEMA(model, decay=0.9, warmup_steps=0)
    ema.update(model)
    save_checkpoint(tmp_path / "ck", {"model": model.state_dict(), "ema": ema.module.state_dict(),
                                      "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                                      "epoch": 3, "step": 3, "rng": capture_rng_state(), "config": {"a": 1}})
    assert not [p for p in (tmp_path / "ck").iterdir() if p.name != "checkpoint.pt"]  # no temp file left
    payload = load_checkpoint(tmp_path / "ck")
    fresh, fresh_optimizer, fresh_scheduler = _trained(1)
    fresh.load_state_dict(payload["model"])
    fresh_optimizer.load_state_dict(payload["optimizer"])
    fresh_scheduler.load_state_dict(payload["scheduler"])
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    for a, b in zip(optimizer.state.values(), fresh_optimizer.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
    assert fresh_scheduler.last_epoch == 3
    assert [g["lr"] for g in fresh_optimizer.param_groups] == [g["lr"] for g in optimizer.param_groups]
    # The next update is identical too.
    x = torch.randn(5, 4)
    for m, opt in ((model, optimizer), (fresh, fresh_optimizer)):
        m(x).pow(2).mean().backward()
        opt.step()
    for a, b in zip(model.parameters(), fresh.parameters()):
        assert torch.equal(a, b)
    assert payload["epoch"] == 3 and payload["config"] == {"a": 1} and payload["format"] == "neoray-checkpoint"


def test_rng_state_round_trip(tmp_path):
    torch.manual_seed(5)
    save_checkpoint(tmp_path, {"rng": capture_rng_state()})
    expected = (random.random(), float(np.random.rand()), torch.rand(2))
    random.seed(99)
    np.random.seed(99)
    torch.manual_seed(99)
    restore_rng_state(load_checkpoint(tmp_path / "checkpoint.pt")["rng"])
    got = (random.random(), float(np.random.rand()), torch.rand(2))
    assert got[0] == expected[0] and got[1] == expected[1] and torch.equal(got[2], expected[2])


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint.pt found"):
        load_checkpoint(tmp_path)
    torch.save({"model": {}}, tmp_path / "checkpoint.pt")
    with pytest.raises(CheckpointError, match="not a neoray checkpoint"):
        load_checkpoint(tmp_path)
    (tmp_path / "checkpoint.pt").write_bytes(b"garbage")
    with pytest.raises(CheckpointError, match="checkpoint.pt: cannot read it as a torch file"):
        load_checkpoint(tmp_path)


def test_ema_decay_warms_up_and_tracks_the_weights():
    model = nn.Linear(2, 1)
    ema = ModelEMA(model, decay=0.99, warmup_steps=10)
    assert ema.current_decay() == 0.0
    with torch.no_grad():
        model.weight.add_(1.0)
    ema.update(model)  # decay 0.99 * (1 - e^-0.1) ~ 0.094: follows the model closely at first
    assert torch.allclose(ema.module.weight, model.weight, atol=0.1)
    assert not ema.module.weight.requires_grad
    ema.updates = 10_000
    assert ema.current_decay() == pytest.approx(0.99)
