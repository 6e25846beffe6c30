"""Fine-tuning with model.init_from (through neoray.models.load_pretrained): the EMA starts from the
loaded weights, every tensor that could not be loaded is named in the run's log with its reason, and a
reference RT-DETR checkpoint gives the run's classes of the same name their pretrained rows."""

from __future__ import annotations

import torch
from test_train_loop import CATEGORIES, TinyDetector, make_batches, tiny_config

from neoray.checkpoints import save_checkpoint
from neoray.config import from_dict
from neoray.engine.context import LocalContext, ReadyBatches
from neoray.engine.ema import ModelEMA
from neoray.engine.loop import run_training_loop
from neoray.models import build_model
from neoray.models.pretrained.keymaps import reference_key_map


def _source_checkpoint(path, num_classes: int) -> dict:
    """A checkpoint of a TinyDetector for ``num_classes`` whose weights are far from a fresh model's."""
    source = TinyDetector(num_classes)
    with torch.no_grad():
        for param in source.parameters():
            param.add_(1.0)
    state = {k: v.clone() for k, v in source.state_dict().items()}
    save_checkpoint(path, {"model": state, "ema": None})
    return state


def _run(cfg, init_from, monkeypatch, model_fn=TinyDetector, categories=CATEGORIES):
    """Train ``cfg`` fine-tuned from ``init_from``; returns (the EMA's weights just before its first
    update, the log lines)."""
    cfg = from_dict({**cfg.to_dict(), "model": {"name": "tiny", "init_from": str(init_from)}})
    before_first_update = []
    original = ModelEMA.update

    def spy(self, model):
        if not before_first_update:
            before_first_update.append({k: v.clone() for k, v in self.module.state_dict().items()})
        original(self, model)

    monkeypatch.setattr(ModelEMA, "update", spy)
    lines: list[str] = []
    context = LocalContext(ReadyBatches(make_batches(8, 4), categories=categories))
    run_training_loop(cfg, context, model_fn=model_fn, log=lines.append)
    return before_first_update[0], lines


def test_ema_starts_from_the_init_from_weights(tmp_path, monkeypatch):
    loaded = _source_checkpoint(tmp_path / "source", num_classes=2)
    ema, _ = _run(tiny_config(ema=True, ema_warmup_steps=0), tmp_path / "source", monkeypatch)
    # With ema_warmup_steps=0 the first update keeps 99.99% of the EMA: it must be the loaded weights,
    # not the fresh model's random initialisation.
    assert ema.keys() == loaded.keys()
    for key, value in loaded.items():
        assert torch.equal(ema[key], value), key


def test_another_class_count_loads_the_rest_and_names_what_was_skipped(tmp_path, monkeypatch):
    loaded = _source_checkpoint(tmp_path / "source", num_classes=3)
    ema, lines = _run(tiny_config(ema=True, ema_warmup_steps=0), tmp_path / "source", monkeypatch)
    fresh = TinyDetector(2).state_dict()
    for key in ("backbone.0.weight", "backbone.1.bias", "box.weight"):  # shapes match: loaded
        assert torch.equal(ema[key], loaded[key]), key
    for key in ("head.weight", "head.bias"):  # 3 vs 2 classes: left at their initial values
        assert torch.equal(ema[key], fresh[key]), key
    skipped = [line for line in lines if line.startswith("init_from: not loaded")]
    assert skipped == [
        "init_from: not loaded head.weight: shape (3, 8) vs (2, 8) (checkpoint vs model; keeps its initial value)",
        "init_from: not loaded head.bias: shape (3,) vs (2,) (checkpoint vs model; keeps its initial value)",
    ]
    assert any("6 tensors loaded, 2 not loaded" in line for line in lines)


def test_a_reference_checkpoint_gives_classes_of_the_same_name_their_rows(tmp_path, monkeypatch):
    small = dict(hidden_dim=32, encoder_ffn_dim=64, decoder_ffn_dim=64, num_decoder_layers=2, num_queries=10)
    torch.manual_seed(0)
    coco = build_model("rtdetr_r18vd", 80, **small)
    with torch.no_grad():
        coco.decoder.score_heads[1].bias.copy_(torch.arange(80.0))  # row i holds i: easy to follow
    state = coco.state_dict()
    torch.save({"ema": {"module": {reference_key_map(coco)[k]: v for k, v in state.items()}}}, tmp_path / "coco.pth")
    categories = [{"id": 5, "name": "Person", "label": 0}, {"id": 9, "name": "dog-toy", "label": 1}]
    built = []

    def model_fn(num_classes):
        built.append(build_model("rtdetr_r18vd", num_classes, **small, input_normalization="unit", position_order="yx"))
        return built[-1]

    ema, lines = _run(tiny_config(ema=True, ema_warmup_steps=0), tmp_path / "coco.pth", monkeypatch,
                      model_fn=model_fn, categories=categories)
    assert ema["decoder.score_heads.1.bias"][0] == 0.0  # COCO's person (label 0)
    assert ema["decoder.score_heads.1.bias"][1] != 1.0  # dog-toy: its fresh prior bias, not COCO's bicycle
    assert "init_from: classes that kept pretrained rows: Person <- person (1 of 2); starting from scratch: dog-toy" \
        in lines
    assert any(line.startswith(f"init_from: reference checkpoint {tmp_path / 'coco.pth'}: ") for line in lines)
