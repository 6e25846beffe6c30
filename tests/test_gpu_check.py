"""benchmarks/gpu_check.py, the first call on a GPU, tested where CI runs: on the CPU at a tiny size.

The GPU machine has no Ray, Optuna or albumentations and gives a command 10 minutes: the Ray-free core must run
with those unimportable, every finished row must survive a kill, and --budget-s must keep the call in its limit.
The script's logic runs here as on a GPU; only the device, the size and the models differ (--tiny). Timings are
reported, never asserted.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
BLOCKED = ("ray", "optuna", "albumentations", "pycocotools", "faster_coco_eval", "tensorboardX")
CORE = ("models", "amp", "decode", "engine", "maxbatch", "layout", "ddp")
# Runs what follows with those packages unimportable, as on the GPU machine: a finder ahead of all others refuses
# them (importlib.util.find_spec raises, `import ray` raises ModuleNotFoundError).
WITHOUT_RAY = f"""
import sys
class Refuse:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in {BLOCKED!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked: the GPU machine has none)", name=name)
sys.meta_path.insert(0, Refuse())
"""


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), *filter(None, [env.get("PYTHONPATH")])])
    return env


def _without_ray(*args: str) -> list[str]:
    run = f"import runpy; sys.argv = {[str(SCRIPT), *args]!r}; runpy.run_path({str(SCRIPT)!r}, run_name='__main__')"
    return [sys.executable, "-c", WITHOUT_RAY + run]


def _load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _load_script()


def test_the_engine_and_the_device_path_import_without_ray(tmp_path):
    probe = ("import neoray.engine.state, neoray.engine.step, neoray.data.tensor_augment, neoray.data.decode\n"
             "from neoray.engine.device import node_id\n"
             "assert node_id() == '', node_id()\n"
             "try:\n    import ray\nexcept ImportError:\n    print('ray blocked')\n")
    proc = subprocess.run([sys.executable, "-c", WITHOUT_RAY + probe], env=_env(), cwd=tmp_path,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == "ray blocked"


@pytest.mark.slow
def test_the_ray_free_core_runs_where_ray_optuna_and_albumentations_cannot_be_imported(tmp_path):
    proc = subprocess.run(_without_ray("--device", "cpu", "--tiny", "--out", str(tmp_path / "out")), env=_env(),
                          cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert "gpu_check: all checks passed" in proc.stdout
    report = json.loads((tmp_path / "out" / "gpu_check.json").read_text())
    assert {"ray", "albumentations", "faster_coco_eval"} <= set(report["environment"]["missing_for_ray_sections"])
    sections = report["sections"]
    assert [name for name in sections] == [*CORE, "stream", "train"]
    for name in CORE:
        assert sections[name]["status"] == "done" and sections[name]["rows"], (name, sections[name])
        assert not [row for row in sections[name]["rows"] if "error" in row or row.get("ok") is False], name
    for name in ("stream", "train"):
        assert sections[name]["status"] == "skipped" and "ray" in sections[name]["reason"]
    rows = {(r.get("measure"), r.get("amp")): r for r in sections["models"]["rows"]}
    assert all(rows[("train", amp)]["images_per_s"] > 0 for amp in ("bf16", "fp16", "off"))
    assert rows[("train FLOPs per image", None)]["flops_per_image"] > 0
    assert rows[("train", "fp16")]["grad_scale"] > 0 and "scaler_skipped_steps" in rows[("train", "fp16")]
    engine = sections["engine"]["rows"][0]
    assert engine["ok"] and engine["first_loss_rel_diff"] == 0.0 and engine["epoch2"]["steps"] == 6
    assert sections["ddp"]["rows"][0]["backend"] == "gloo" and sections["ddp"]["rows"][0]["steps"] == [2, 2]
    assert (tmp_path / "out" / "gpu_check.txt").read_text().startswith("== gpu_check: cpu")


@pytest.mark.slow
def test_the_ray_sections_run_where_ray_is_installed(tmp_path):
    proc = subprocess.run([sys.executable, str(SCRIPT), "--device", "cpu", "--tiny", "--only", "ray", "--out",
                           str(tmp_path)], env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=1800)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    streams = {row.get("decode"): row for row in sections["stream"]["rows"]}
    assert streams["cpu"]["images_per_s"] > 0 and streams["gpu"]["images_per_s"] > 0
    assert streams[None]["ok"] and streams[None]["targets_identical"]
    train = sections["train"]["rows"][0]
    assert train["ok"] and train["exit_codes"] == [0, 0] and train["epochs"] == [1, 2]


@pytest.mark.slow
def test_a_killed_run_keeps_the_sections_it_finished(tmp_path):
    out = tmp_path / "gpu_check.json"
    proc = subprocess.Popen(_without_ray("--device", "cpu", "--tiny", "--only", "amp", "decode", "engine", "--json",
                                         str(out)), env=_env(), cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline, done = time.monotonic() + 900, []
    try:
        while not done and time.monotonic() < deadline and proc.poll() is None:
            time.sleep(0.2)
            if out.exists():
                sections = json.loads(out.read_text())["sections"]  # complete JSON at every moment
                done = [name for name, section in sections.items() if section["status"] == "done"]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
    assert done, "no section finished before the deadline"
    sections = json.loads(out.read_text())["sections"]
    assert sections["amp"]["status"] == "done" and sections["amp"]["rows"][0]["ok"]


def _fake_sections(monkeypatch):
    def quick(ctx):
        yield {"measure": "quick", "images_per_s": 1.0}
        yield {"measure": "quick", "images_per_s": 2.0}

    def slow(ctx):
        yield {"measure": "before the hang", "images_per_s": 3.0}
        time.sleep(60)
        yield {"measure": "never"}

    def failing(ctx):
        yield {"measure": "fine", "images_per_s": 1.0}
        raise RuntimeError("the shards could not be made\nsecond line")

    monkeypatch.setitem(gpu_check.SECTION_RUNS, "models", quick)
    monkeypatch.setitem(gpu_check.SECTION_RUNS, "amp", failing)
    monkeypatch.setitem(gpu_check.SECTION_RUNS, "decode", slow)
    for name in gpu_check.SECTIONS:
        monkeypatch.setitem(gpu_check.SECTION_COST_S, name, (0, 0))
    monkeypatch.setitem(gpu_check.SECTION_COST_S, "engine", (0, 1000))


def _context(tmp_path, seconds: float):
    report = gpu_check.Report(tmp_path / "gpu_check.json", {"tiny": True, "environment": {
        "missing_for_ray_sections": ["ray"]}})
    budget = gpu_check.Budget(seconds)
    return gpu_check.Context(torch.device("cpu"), True, gpu_check.settings(True), budget, tmp_path, report), budget


def test_a_section_that_fails_or_does_not_fit_is_recorded_and_the_next_one_runs(tmp_path, monkeypatch):
    _fake_sections(monkeypatch)
    monkeypatch.setitem(gpu_check.SECTION_RUNS, "decode", lambda ctx: iter([{"measure": "quick too"}]))
    ctx, budget = _context(tmp_path, 600)
    with budget.enforced():
        gpu_check.run_sections(ctx, ["models", "amp", "decode", "engine", "stream"])
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["models"]["status"] == "done" and len(sections["models"]["rows"]) == 2
    assert sections["amp"] == {**sections["amp"], "status": "failed",
                               "error": "RuntimeError: the shards could not be made"}
    assert sections["amp"]["rows"] == [{"measure": "fine", "images_per_s": 1.0}]
    assert sections["decode"]["status"] == "done"
    assert sections["engine"]["status"] == "skipped" and "needs about 1000 s" in sections["engine"]["reason"]
    assert sections["stream"]["status"] == "skipped" and "not installed here: ray" in sections["stream"]["reason"]


def test_the_budget_stops_a_running_section_and_keeps_its_finished_rows(tmp_path, monkeypatch):
    _fake_sections(monkeypatch)
    ctx, budget = _context(tmp_path, 3.0)
    start = time.monotonic()
    with budget.enforced():
        gpu_check.run_sections(ctx, ["models", "decode", "layout"])
    assert time.monotonic() - start < 30  # the hanging row was stopped, not waited for
    sections = json.loads((tmp_path / "gpu_check.json").read_text())["sections"]
    assert sections["models"]["status"] == "done"
    assert sections["decode"]["status"] == "stopped" and sections["decode"]["reason"] == "--budget-s reached"
    assert sections["decode"]["rows"] == [{"measure": "before the hang", "images_per_s": 3.0}]
    assert sections["layout"] == {"status": "skipped", "rows": [], "seconds": 0.0, "reason": "--budget-s reached"}


def test_quantile_sample_stays_within_what_torch_quantile_accepts():
    limit = gpu_check.QUANTILE_LIMIT
    for n in (limit - 1, limit, limit + 1, 2 * limit - 1, 2 * limit + 1, 3 * limit + 5):
        sample = gpu_check.quantile_sample(torch.zeros(n, dtype=torch.uint8))
        assert limit // 2 < sample.numel() <= limit or (n <= limit and sample.numel() == n), n
    # The old stride, n // 2**24, kept up to 2**25 - 1 elements: e.g. all of them just over the limit.
    assert torch.zeros(limit + 1)[::max(1, (limit + 1) // limit)].numel() == limit + 1
    values = torch.arange(limit + 3, dtype=torch.float32)
    estimate = float(torch.quantile(gpu_check.quantile_sample(values), 0.999))
    assert abs(estimate - 0.999 * (limit + 2)) <= 2.0


def test_the_largest_batch_is_found_within_the_probe_budget():
    def search(limit, start=4, cap=128, probes=8):
        return gpu_check.largest_fitting(lambda b: b <= limit, start, cap, probes)

    good, bad, probes = search(37)
    assert 33 <= good <= 37 and bad > 37 and len(probes) <= 8 and bad - good <= max(1, good // 8)
    assert search(500)[:2] == (128, None)  # everything fits up to the cap
    assert search(2)[:2] == (2, 3)  # the start does not fit: bisect below it
    assert search(0)[0] == 0
    assert len(search(100, probes=3)[2]) == 3


def test_peak_bf16_tflops_by_device_name():
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert gpu_check.peak_bf16_tflops("NVIDIA H100 PCIe") == 756.0
    assert gpu_check.peak_bf16_tflops("NVIDIA H200") == 989.4
    assert gpu_check.peak_bf16_tflops("NVIDIA H200 NVL") == 835.5
    assert gpu_check.peak_bf16_tflops("NVIDIA GeForce RTX 4090") is None
    row = gpu_check.with_mfu({"images_per_s": 10.0}, 2e12, 1000.0)
    assert row["mfu"] == pytest.approx(0.02)


def test_gpu_check_refuses_to_start_without_cuda_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    proc = subprocess.run([sys.executable, str(SCRIPT), "--out", str(tmp_path / "out")], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    assert proc.stderr.strip().count("\n") == 0 and "no CUDA device" in proc.stderr
    assert not (tmp_path / "out").exists()


def test_an_out_of_memory_probe_is_a_no_and_the_search_goes_on(tmp_path, monkeypatch):
    forgotten = []

    def rate(self, batch, size, warmup, steps):
        if batch > 3:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return {"images_per_s": 10.0 * batch, "peak_mib": 100.0 * batch}

    original_forget = gpu_check.Trainer.forget_step
    monkeypatch.setattr(gpu_check.Trainer, "rate", rate)
    monkeypatch.setattr(gpu_check.Trainer, "forget_step",
                        lambda self: (forgotten.append(self.scaler.get_scale()), original_forget(self)))
    ctx, _ = _context(tmp_path, 600)
    ctx.s.update(maxbatch_start=1, maxbatch_cap=16, maxbatch_probes=6)
    row = gpu_check.search_batch("rtdetr_cpu", "fp16", ctx)
    assert row["largest_batch"] == 3 and row["first_too_large"] == 4
    assert row["images_per_s"] == 30.0 and row["peak_mib"] == 300.0  # measured at the largest batch
    assert row["probes"] == ["1:ok", "2:ok", "4:oom", "3:ok"] and len(forgotten) == 1
