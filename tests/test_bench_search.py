"""The search-quality benchmark's replay runs on the committed ground-truth tables (a short version of
`python benchmarks/bench_search.py replay`), and its tables are what the replay reads."""

from __future__ import annotations

import csv
import json
import subprocess
import sys
from pathlib import Path

import pytest
from search_replay import load_table

REPO_ROOT = Path(__file__).resolve().parents[1]
DATA = REPO_ROOT / "benchmarks" / "data" / "v1"


@pytest.mark.parametrize("task", ["default", "dense"])
def test_the_committed_ground_truth_is_a_full_design(task):
    table = load_table(str(DATA / f"search_{task}.csv"), size="320x180")
    record = json.loads((DATA / f"search_{task}.json").read_text())
    design = {p["config"] for p in record["320x180"]["design"]}
    assert set(table.points) == design and len(design) >= 8 and table.epochs == 12
    assert all(len(p.curve) == 12 for p in table.points.values())
    assert record["320x180"]["commit"] and record["320x180"]["command"].startswith("python benchmarks/bench_search.py")


@pytest.mark.slow
def test_a_short_replay_runs_through_tune_on_the_committed_tables(tmp_path):
    for name in ("search_default.csv", "search_default.json"):
        (tmp_path / name).write_bytes((DATA / name).read_bytes())
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_search.py"), "replay", "--tasks",
                          "default", "--methods", "quick", "--seeds", "2", "--budget", "36", "--parallel", "2",
                          "--data-dir", str(tmp_path)], capture_output=True, text=True, timeout=900)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads((tmp_path / "replay_quick.json").read_text())["tasks"]["default"]
    assert result["budgets"] == [12, 24, 36] and len(result["methods"]) == 3
    for method in result["methods"].values():
        assert len(method["budget_to_2pct_seeds"]) == 2 and len(method["regret"]) == 3
        assert all(r["median"] >= 0 for r in method["regret"] if r["median"] == r["median"])
    assert (tmp_path / "search_quality_quick.png").stat().st_size > 1000


def test_simulate_adds_a_second_policy_set_beside_the_first_and_success_prints_both(tmp_path):
    (tmp_path / "search_dense.csv").write_bytes((DATA / "search_dense.csv").read_bytes())
    bench = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_search.py")]
    common = ["--tasks", "dense", "--seeds", "3", "--parallel", "1", "--data-dir", str(tmp_path)]
    for policy_set in ("quick", "gp"):
        out = subprocess.run([*bench, "simulate", "--policies", policy_set, *common], capture_output=True, text=True,
                             timeout=900)
        assert out.returncode == 0, out.stderr[-3000:]
    record = json.loads((tmp_path / "sim_dense.json").read_text())
    assert set(record["outcomes"]) == {"random+no-ES", "tpe4+asha(g4,rf2)", "gp4+no-ES", "gp10+no-ES"}
    assert all(len(by_seed) == 6 for by_seed in record["outcomes"].values())  # two blocks of 3 search seeds
    out = subprocess.run([*bench, "success", "--tasks", "dense", "--block", "select_seeds", "--data-dir",
                          str(tmp_path)], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "| gp4+no-ES |" in out.stdout and "(select_seeds)" in out.stdout, out.stderr


def test_simulate_keeps_each_finished_policy_when_stopped_and_resume_skips_it(tmp_path, monkeypatch):
    """GPSampler's policies take hours: one stopped half way keeps the policies it finished, and --resume does not
    simulate them again."""
    import bench_search

    (tmp_path / "search_dense.csv").write_bytes((DATA / "search_dense.csv").read_bytes())
    real = bench_search._simulate_seed

    def interrupted_at_tpe(job):
        if job[1].sampler == "tpe":
            raise KeyboardInterrupt
        return real(job)

    args = ["simulate", "--tasks", "dense", "--seeds", "2", "--parallel", "1", "--policies", "quick",
            "--data-dir", str(tmp_path)]
    monkeypatch.setattr(bench_search, "_simulate_seed", interrupted_at_tpe)
    with pytest.raises(KeyboardInterrupt):
        bench_search.main(args)
    first = json.loads((tmp_path / "sim_dense.json").read_text())["outcomes"]
    assert set(first) == {"random+no-ES"} and len(first["random+no-ES"]) == 4  # two blocks of 2 search seeds

    simulated = []
    monkeypatch.setattr(bench_search, "_simulate_seed", lambda job: simulated.append(job[1].name) or real(job))
    bench_search.main([*args, "--resume"])
    assert set(simulated) == {"tpe4+asha(g4,rf2)"}
    outcomes = json.loads((tmp_path / "sim_dense.json").read_text())["outcomes"]
    assert set(outcomes) == {"random+no-ES", "tpe4+asha(g4,rf2)"} and outcomes["random+no-ES"] == first["random+no-ES"]


def test_simulate_drops_stored_outcomes_made_on_another_table_or_by_another_simulator(tmp_path, monkeypatch):
    """A policy set added to sim_<task>.json keeps the other sets' outcomes only if they were made on the same
    table by the same simulator: outcomes scored by another rule are not shown beside new ones."""
    import bench_search
    from search_sim import SIMULATOR_VERSION, Policy

    (tmp_path / "search_dense.csv").write_bytes((DATA / "search_dense.csv").read_bytes())
    args = ["simulate", "--tasks", "dense", "--seeds", "2", "--parallel", "1", "--data-dir", str(tmp_path)]
    bench_search.main([*args, "--policies", "quick"])
    path = tmp_path / "sim_dense.json"
    record = json.loads(path.read_text())
    assert record["simulator"] == SIMULATOR_VERSION and record["table_digest"]
    for stale in ({"simulator": SIMULATOR_VERSION - 1}, {"table_digest": "another table"}):
        path.write_text(json.dumps({**record, **stale}))
        monkeypatch.setattr(bench_search, "policies", lambda which: [Policy("tpe", 4)])
        bench_search.main([*args, "--policies", "gp"])
        assert set(json.loads(path.read_text())["outcomes"]) == {"tpe4+no-ES"}, stale
    path.write_text(json.dumps(record))
    bench_search.main([*args, "--policies", "gp"])  # the same table and simulator: kept beside the new set
    assert set(json.loads(path.read_text())["outcomes"]) == {"random+no-ES", "tpe4+asha(g4,rf2)", "tpe4+no-ES"}


def test_a_one_seed_table_scored_with_borrowed_noise_gets_its_own_record_and_no_peers_of_another_margin(tmp_path):
    """simulate --noise-from scores v1's one-seed table with the v2 table's relative noise: its outcomes go to their
    own record (the 2% ones stay), and success shows no peer row scored with the other margin beside them."""
    import bench_search
    from search_sim import load_table as load_sim_table

    v1 = tmp_path / "v1"
    v1.mkdir()
    (v1 / "search_dense.csv").write_bytes((DATA / "search_dense.csv").read_bytes())
    donor = REPO_ROOT / "benchmarks" / "data" / "search_dense.csv"
    args = ["--tasks", "dense", "--data-dir", str(v1), "--noise-from", str(donor)]
    bench_search.main(["simulate", *args, "--seeds", "2", "--parallel", "1", "--policies", "quick"])
    record = json.loads((v1 / "sim_dense.borrowed-noise.json").read_text())
    assert not (v1 / "sim_dense.json").exists()
    one_seed = load_sim_table((v1 / "search_dense.csv").read_text(), "dense")
    v2 = load_sim_table(donor.read_text(), "dense")
    assert record["noise_borrowed"] and one_seed.margin == pytest.approx(0.02 * record["best_score"])
    assert record["margin"] == pytest.approx(2 * v2.relative_noise * record["best_score"])
    assert record["margin"] > one_seed.margin
    peers = {**record, "margin": one_seed.margin, "outcomes": {"st:RandomSearch": record["outcomes"]["random+no-ES"]}}
    (v1 / "peers_dense.json").write_text(json.dumps(peers))
    out = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_search.py"), "success", *args],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "| random+no-ES |" in out.stdout, out.stderr[-3000:]
    assert "st:RandomSearch" not in out.stdout
    refused = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "bench_search.py"), "simulate",
                              "--tasks", "dense", "--data-dir", str(v1), "--noise-from", str(v1 / "search_dense.csv")],
                             capture_output=True, text=True, timeout=300)
    assert refused.returncode != 0 and "has no seed repeats" in refused.stderr and "Traceback" not in refused.stderr


def test_the_held_out_task_is_left_out_of_the_steps_that_choose_and_labelled_when_named(tmp_path):
    for task in ("default", "dense"):
        (tmp_path / f"sim_{task}.json").write_bytes((DATA / f"sim_{task}.json").read_bytes())
    bench = [sys.executable, str(REPO_ROOT / "benchmarks" / "bench_search.py"), "success", "--data-dir", str(tmp_path)]
    out = subprocess.run(bench, capture_output=True, text=True, timeout=300)  # no sim_photo.json: not read
    assert out.returncode == 0, out.stderr[-3000:]
    assert "## default:" in out.stdout and "## dense:" in out.stdout and "HELD OUT" not in out.stdout
    held_out = json.loads((DATA / "sim_dense.json").read_text())
    held_out["task"] = "photo"
    (tmp_path / "sim_photo.json").write_text(json.dumps(held_out))
    out = subprocess.run([*bench, "--tasks", "photo"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0 and "## photo HELD OUT (never used to choose a default)" in out.stdout, out.stderr


def test_ground_truth_refuses_to_add_runs_trained_on_another_recipe(tmp_path):
    """A table accumulates over days: runs trained on a changed recipe must not join the earlier ones."""
    import bench_search

    table = tmp_path / "search_dense.csv"
    rows = [{"config": "c01", "seed": "0", "size": "320x180"}, {"config": "c02", "seed": "0", "size": "320x180"}]
    with pytest.raises(SystemExit, match=r"search_dense.csv: 2 runs at 320x180 .*recipe_config"):
        bench_search.check_same_recipe(table, rows, (320, 180))

    recipe = bench_search.recipe_config()
    (tmp_path / "search_dense.json").write_text(json.dumps({"320x180": {"recipe_config": recipe}}))
    bench_search.check_same_recipe(table, rows, (320, 180))  # the same recipe: the table goes on

    old = json.loads(json.dumps(recipe))
    old["train"]["backbone_lr_mult"] = 0.5
    old["model"]["options"]["cls_loss"] = "old-loss"
    (tmp_path / "search_dense.json").write_text(json.dumps({"320x180": {"recipe_config": old}}))
    with pytest.raises(SystemExit, match=r"\(model\.options\.cls_loss, train\.backbone_lr_mult differ\)"):
        bench_search.check_same_recipe(table, rows, (320, 180))
    bench_search.check_same_recipe(table, rows, (160, 90))  # another size's runs are another table


def test_the_search_recipe_is_the_shipped_demo_recipe():
    """The v2 tables measure the recipe users run: the demo config's training keys, resolved."""
    import bench_search

    from neoray.config import load_config
    from neoray.configs import DEFAULT_CONFIG

    demo = load_config(str(DEFAULT_CONFIG))
    recipe = load_config(str(bench_search.RECIPE))
    assert recipe.model.options == demo.model.options
    assert recipe.train.backbone_lr_mult == demo.train.backbone_lr_mult
    for key in ("lr", "batch_size", "accumulate", "weight_decay", "optimizer", "schedule", "warmup_steps",
                "clip_grad_norm", "ema", "ema_decay", "ema_warmup_steps"):
        assert getattr(recipe.train, key) == getattr(demo.train, key), key


def test_the_sweep_step_reads_a_finished_sweep_and_judges_its_pick_against_the_table(tmp_path, monkeypatch, capsys):
    """`bench_search.py sweep`: a sweep that finished (best_config.yaml written) is not run again; its pick is
    judged against the task's table in --data-dir and the verdict written to sweep_<task>.json."""
    import bench_search

    (tmp_path / "search_dense.csv").write_bytes((DATA / "search_dense.csv").read_bytes())
    table = load_table(str(DATA / "search_dense.csv"), size="320x180")
    best = max(table.points.values(), key=lambda p: p.final_score)
    sweep = tmp_path / "work" / "sweep_dense"
    (sweep / "trial_0001").mkdir(parents=True)
    (sweep / "best_config.yaml").write_text("{}\n")
    (sweep / "trials.csv").write_text(
        "trial,status,lr,warmup_steps,batch,best_map,best_map50,best_score,epochs,failures,time_s,error\n"
        f"trial_0001,finished,{best.lr},{best.warmup_steps},{best.batch},0.5,0.6,{best.final_score},12,0,9.0,\n")
    (sweep / "trial_0001" / "progress.csv").write_text(f"epoch,score\n12,{best.final_score}\n")
    monkeypatch.setattr(bench_search, "ensure_default_data", lambda **_: {"train": "t", "val": "v"})
    real_run = subprocess.run

    def no_sweep(cmd, *args, **kwargs):
        assert "sweep_lr.py" not in " ".join(map(str, cmd)), "a finished sweep ran again"
        return real_run(cmd, *args, **kwargs)

    monkeypatch.setattr(bench_search.subprocess, "run", no_sweep)
    bench_search.main(["sweep", "--task", "dense", "--work", str(tmp_path / "work"), "--data-dir", str(tmp_path)])
    result = json.loads((tmp_path / "sweep_dense.json").read_text())
    assert result["pick"] == "trial_0001" and result["pick_within_margin"] is True
    assert result["trials"][0]["nearest_rank"] == 1 and "within it" in capsys.readouterr().out
    assert result["sweep_command"].startswith("python experiments/sweep_lr.py --config benchmarks/configs/")
    assert str(REPO_ROOT) not in (tmp_path / "sweep_dense.json").read_text()  # no path of this machine


def test_one_ground_truth_invocation_trains_the_design_and_then_its_seed_repeats(tmp_path, monkeypatch):
    """The repeats are the best of the finished design: an invocation that completes the design goes on to them
    (they were once chosen before the design's runs, so a fresh table stopped after the design)."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    import bench_search

    class InProcess:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

        def submit(self, fn, *args):
            future = Future()
            future.set_result(fn(*args))
            return future

    trained = []

    def fake_train(point, shards, size, epochs, stop_after, seed=0):
        trained.append((point["config"], seed))
        final = float(point["config"][1:]) / 10  # c02 ends above c01
        return [{"epoch": e, "score": final * e / epochs, "map": 0.0, "map50": 0.0, "seconds": 1.0}
                for e in range(1, epochs + 1)]

    monkeypatch.setattr(bench_search, "ProcessPoolExecutor", InProcess)
    monkeypatch.setattr(bench_search, "train_point", fake_train)
    monkeypatch.setattr(bench_search, "ensure_default_data", lambda **_: {"train": "t", "val": "v"})
    monkeypatch.setattr(bench_search.ray, "init", lambda **_: None)
    monkeypatch.setattr(bench_search.ray, "get_runtime_context", lambda: SimpleNamespace(gcs_address="x"))
    bench_search.main(["ground-truth", "--task", "dense", "--configs", "2", "--epochs", "2", "--data-dir",
                       str(tmp_path)])
    assert trained[:2] == [("c01", 0), ("c02", 0)]
    assert sorted(trained[2:]) == [("c01", 1), ("c01", 2), ("c02", 1), ("c02", 2)]
    rows = list(csv.DictReader((tmp_path / "search_dense.csv").open()))
    assert {(r["config"], r["seed"]) for r in rows} == set((c, str(s)) for c, s in trained)


def test_the_sweep_step_names_a_missing_trial_table_in_one_line(tmp_path, monkeypatch):
    import bench_search

    (tmp_path / "work" / "sweep_dense").mkdir(parents=True)
    (tmp_path / "work" / "sweep_dense" / "best_config.yaml").write_text("{}\n")
    monkeypatch.setattr(bench_search, "ensure_default_data", lambda **_: {"train": "t", "val": "v"})
    with pytest.raises(SystemExit, match=r"sweep_dense/trials.csv is missing"):
        bench_search.main(["sweep", "--task", "dense", "--work", str(tmp_path / "work"), "--data-dir", str(tmp_path)])
