"""Everything one worker trains with, and how it is saved and restored: ``TrainState``.

``state_dict()`` is the part of a checkpoint that belongs to training (model, EMA, optimizer, schedule,
loss scaler, counters, early stopping); ``load_state_dict()`` puts it back, so that a restored worker
continues exactly where the checkpoint was written. Starting from pretrained weights (``init_from``) is
the other way in, next to it.

Frozen backbone under DDP: ``requires_grad`` is set before DDP wraps the model, so frozen parameters are
not registered with DDP at all (``find_unused_parameters`` stays False); at the unfreeze epoch the model
is re-wrapped. The optimizer knows the backbone parameters from the start (it skips params without grad).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from neoray.config import Config
from neoray.distributed import is_distributed
from neoray.engine.device import resolve_amp
from neoray.engine.ema import ModelEMA
from neoray.engine.optim import build_optimizer, build_scheduler
from neoray.models import load_pretrained


@dataclass
class EarlyStopping:
    """Stop after ``patience`` evaluations without a better score (0: never)."""

    patience: int = 0
    best_score: float | None = None
    best_epoch: int = 0
    evals_since_best: int = 0

    def update(self, score: float, epoch: int) -> str:
        """Record an evaluation's score; returns the stop reason, or "" to go on."""
        if self.best_score is None or score > self.best_score:
            self.best_score, self.best_epoch, self.evals_since_best = score, epoch, 0
            return ""
        self.evals_since_best += 1
        if self.patience and self.evals_since_best >= self.patience:
            return (f"early stop: mAP did not improve in {self.patience} evaluations "
                    f"(best {self.best_score:.4f} at epoch {self.best_epoch})")
        return ""


@dataclass
class TrainState:
    """``model`` is the plain module; ``wrapped`` is what the forward goes through (DDP on several ranks,
    the module itself otherwise). ``epoch`` counts finished epochs, ``step`` optimizer steps."""

    cfg: Config
    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    device: torch.device
    rank: int = 0
    ema: ModelEMA | None = None
    amp_dtype: torch.dtype | None = None
    wrapped: nn.Module | None = None
    epoch: int = 0
    step: int = 0
    micro_step: int = 0  # micro-batches seen by this process (the hooks count these)
    frozen: bool = False
    backbone_trainable: list = field(default_factory=list)
    early: EarlyStopping = field(default_factory=EarlyStopping)

    @classmethod
    def build(
        cls, cfg: Config, model: nn.Module, device: torch.device, total_steps: int, rank: int = 0
    ) -> "TrainState":
        model.to(device)
        amp_dtype, use_scaler = resolve_amp(cfg.train.amp, device)
        optimizer = build_optimizer(model, cfg.train)
        backbone = getattr(model, "backbone", None)
        return cls(
            cfg=cfg, model=model, optimizer=optimizer, scheduler=build_scheduler(optimizer, cfg.train, total_steps),
            scaler=torch.amp.GradScaler(device.type, enabled=use_scaler), device=device, rank=rank,
            ema=ModelEMA(model, cfg.train.ema_decay, cfg.train.ema_warmup_steps) if cfg.train.ema else None,
            amp_dtype=amp_dtype,
            backbone_trainable=[p for p in backbone.parameters() if p.requires_grad] if backbone else [],
            early=EarlyStopping(cfg.train.early_stop_patience),
        )

    def forward_module(self) -> nn.Module:
        return self.wrapped if self.wrapped is not None else self.model

    def eval_module(self) -> nn.Module:
        """What evaluation scores: the EMA weights when there are any."""
        return self.ema.module if self.ema is not None else self.model

    # ------------------------------------------------------------------ saving and restoring

    def state_dict(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "ema": self.ema.module.state_dict() if self.ema is not None else None,
            "ema_updates": self.ema.updates if self.ema is not None else 0,
            "optimizer": self.optimizer.state_dict(),
            "scheduler": self.scheduler.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else None,
            "epoch": self.epoch,
            "step": self.step,
            "early_stopping": asdict(self.early),
        }

    def load_state_dict(self, payload: dict) -> None:
        self.model.load_state_dict(payload["model"])
        if self.ema is not None:
            if payload.get("ema") is not None:
                self.ema.module.load_state_dict(payload["ema"])
                self.ema.updates = int(payload.get("ema_updates", 0))
            else:
                self.ema.reset(self.model)
        self.optimizer.load_state_dict(payload["optimizer"])
        self.scheduler.load_state_dict(payload["scheduler"])
        if payload.get("scaler"):
            self.scaler.load_state_dict(payload["scaler"])
        self.epoch, self.step = int(payload["epoch"]), int(payload["step"])
        saved = payload.get("early_stopping") or {}
        self.early = EarlyStopping(self.cfg.train.early_stop_patience, saved.get("best_score"),
                                   int(saved.get("best_epoch", 0)), int(saved.get("evals_since_best", 0)))

    def init_from(self, path: str, class_names: list[str], log: Callable[[str], None] | None) -> list[str]:
        """Start from pretrained weights (any format ``neoray.models.load_pretrained`` reads); the EMA
        starts from them too. Returns the names of the classes that kept pretrained rows."""
        result = load_pretrained(self.model, path, class_names=class_names)
        if self.ema is not None:
            self.ema.reset(self.model)
        if log:
            for line in result.lines():
                log(f"init_from: {line}")
        return sorted(result.class_rows)

    # ------------------------------------------------------------------ the backbone and DDP

    def set_backbone_frozen(self, frozen: bool) -> None:
        """Freeze/unfreeze the backbone parameters that were trainable when the model was built, and
        (re)wrap DDP so that it registers exactly the trainable parameters."""
        if frozen != self.frozen:
            for param in self.backbone_trainable:
                param.requires_grad_(not frozen)
            self.frozen = frozen
            self.wrapped = None  # the old DDP knows the wrong parameter set
        if is_distributed() and self.wrapped is None:
            device_ids = [self.device.index] if self.device.type == "cuda" else None
            # DDP's constructor broadcasts rank 0's parameters and buffers: every rank trains the same weights.
            self.wrapped = DistributedDataParallel(self.model, device_ids=device_ids, find_unused_parameters=False)


__all__ = ["EarlyStopping", "TrainState"]
