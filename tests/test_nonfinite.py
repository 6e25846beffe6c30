"""A model that diverges (NaN or inf in its outputs) costs an update, not the run: the matcher matches the
non-finite predictions (scipy would refuse them with a ValueError that killed the worker), the loss is
non-finite, and the engine skips that update and counts it (neoray.engine.guards); too many such updates
stop the run with the reason in one line."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from neoray.config import from_dict
from neoray.engine.state import TrainState
from neoray.engine.step import train_one_epoch
from neoray.models import build_model

RUN_TIMEOUT_S = 900  # a hang guard, not a speed assertion


@dataclass
class Batch:
    images: torch.Tensor
    targets: list

    def to(self, device):
        return Batch(self.images.to(device), [{k: v.to(device) for k, v in t.items()} for t in self.targets])


def _batches(count: int, size=(160, 90), per_batch: int = 2) -> list[Batch]:
    generator = torch.Generator().manual_seed(0)
    width, height = size
    out = []
    for _ in range(count):
        images = torch.randint(0, 256, (per_batch, 3, height, width), dtype=torch.uint8, generator=generator)
        targets = []
        for _ in range(per_batch):
            xy = torch.rand(2, 2, generator=generator) * torch.tensor([width * 0.6, height * 0.6])
            targets.append({"boxes": torch.cat([xy, xy + 20.0], dim=1), "labels": torch.tensor([0, 1])})
        out.append(Batch(images, targets))
    return out


def _tiny_model():
    torch.manual_seed(0)
    return build_model("rtdetr_cpu", num_classes=3, hidden_dim=32, num_queries=20, num_denoising=10)


def _poison(model) -> None:
    """NaN class logits from the last decoder layer on (what a diverged model produces)."""
    with torch.no_grad():
        model.decoder.score_heads[-1].bias.fill_(float("nan"))


def test_nan_logits_give_a_nonfinite_loss_instead_of_a_value_error():
    model = _tiny_model().train()
    _poison(model)
    batch = _batches(1)[0]
    losses = model(batch.images, batch.targets)
    assert not torch.isfinite(sum(losses.values()))


def test_the_engine_skips_and_counts_updates_of_a_model_that_outputs_nan():
    cfg = from_dict({"model": {"name": "rtdetr_cpu"},
                     "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "ema": False, "amp": "off",
                               "warmup_steps": 0}})
    model = _tiny_model()
    _poison(model)
    state = TrainState.build(cfg, model, torch.device("cpu"), total_steps=10)
    weights = [p.detach().clone() for p in model.parameters()]
    stats = train_one_epoch(state, _batches(3))
    assert stats.counters.updates == 3 and stats.counters.skipped == 3 and state.step == 0
    for before, after in zip(weights, model.parameters()):
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True)  # no update was made


@pytest.mark.slow
def test_neoray_train_that_diverges_stops_with_the_reason_in_one_line(synthetic_shards, tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump({
        "model": {"name": "rtdetr_cpu", "options": {"hidden_dim": 32, "num_queries": 20, "num_denoising": 10}},
        "data": {"train": str(synthetic_shards["train"]), "val": str(synthetic_shards["val"]), "size": "160x90",
                 "shuffle_buffer": 8},
        "train": {"epochs": 2, "batch_size": 4, "seed": 1},
    }))
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # its own Ray instance
    neoray = str(Path(sys.executable).with_name("neoray"))
    result = subprocess.run([neoray, "train", str(config), "train.lr=1e6", "train.warmup_steps=0",
                             "train.clip_grad_norm=0", "train.ema=false", "--output", str(tmp_path / "runs")],
                            cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            timeout=RUN_TIMEOUT_S)
    out = result.stdout
    # (Not "no Traceback at all": on a machine running other Ray instances, Ray Train's placement-group cleaner
    # prints its own about finding several.)
    assert "invalid numeric entries" not in out and "WorkerGroupError" not in out, out[-3000:]
    last = out.strip().splitlines()[-1]
    assert result.returncode == 1 and last.startswith("neoray train: "), out[-3000:]
    assert "had a non-finite loss or gradient" in last and "lower train.lr" in last, last
