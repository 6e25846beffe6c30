"""Preflight, rank-consistent skip decisions and the per-epoch stop rules."""

from __future__ import annotations

import pytest
import torch
from test_train_loop import TinyDetector, make_batches

from neoray.engine import guards


def test_preflight_passes_and_leaves_no_gradient():
    model = TinyDetector(2)
    losses = guards.preflight(model, make_batches(4, 4)[0], num_classes=2, device=torch.device("cpu"))
    assert set(losses) == {"count", "area"}
    assert all(p.grad is None for p in model.parameters())


def test_preflight_names_the_label_and_num_classes():
    batch = make_batches(4, 4)[0]
    batch.targets[2]["labels"] = torch.full_like(batch.targets[2]["labels"], 5)
    with pytest.raises(guards.PreflightError, match=r"label 5 .*num_classes=2"):
        guards.preflight(TinyDetector(2), batch, num_classes=2, device=torch.device("cpu"))


def test_preflight_rejects_float_images_and_a_nan_loss():
    batch = make_batches(4, 4)[0]
    batch.images = batch.images.float()
    with pytest.raises(guards.PreflightError, match="uint8"):
        guards.check_batch(batch, 2)

    class NanModel(TinyDetector):
        def forward(self, images, targets=None):
            return {k: v * float("nan") for k, v in super().forward(images, targets).items()}

    with pytest.raises(guards.PreflightError, match="not finite"):
        guards.preflight(NanModel(2), make_batches(4, 4)[0], 2, torch.device("cpu"))


def test_preflight_turns_oom_into_advice():
    class OomModel(TinyDetector):
        def forward(self, images, targets=None):
            raise torch.OutOfMemoryError("CUDA out of memory")

    with pytest.raises(guards.PreflightError, match="lower train.batch_size"):
        guards.preflight(OomModel(2), make_batches(4, 4)[0], 2, torch.device("cpu"))


def test_epoch_stop_reasons():
    ok = guards.EpochCounters(updates=100, skipped=25, oom=3)
    assert guards.epoch_stop_reason(ok, 0.25, 3, batch_size=8, accumulate=1) is None
    nan = guards.EpochCounters(updates=100, skipped=26)
    assert "26 of 100 updates" in guards.epoch_stop_reason(nan, 0.25, 3, 8, 1)
    oom = guards.EpochCounters(updates=100, oom=4)
    reason = guards.epoch_stop_reason(oom, 0.25, 3, batch_size=8, accumulate=2)
    assert "train.batch_size=4" in reason and "train.accumulate=4" in reason


def test_fp16_overflows_do_not_count_toward_the_skip_limit():
    # 60 GradScaler overflows while the fp16 scale settles, no non-finite loss: no reason to stop.
    assert guards.epoch_stop_reason(guards.EpochCounters(updates=100, amp_overflow=60), 0.25, 3, 8, 1) is None
    # Non-finite updates are judged against the updates that were not overflows: 11 of 40 > 25%.
    counters = guards.EpochCounters(updates=100, skipped=11, amp_overflow=60)
    assert "11 of 40 updates" in guards.epoch_stop_reason(counters, 0.25, 3, 8, 1)


def test_collectives_without_a_process_group_are_the_local_values():
    from neoray import distributed

    assert distributed.any_flags([True, False]) == [True, False]
    assert distributed.gather({"a": 1}) == [{"a": 1}] and distributed.from_rank0("x") == "x"
    assert distributed.mean_over_ranks(3.0) == 3.0 and not distributed.is_distributed()
    assert guards.is_oom(torch.OutOfMemoryError("x")) and not guards.is_oom(RuntimeError("x"))
