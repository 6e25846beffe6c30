"""The quality benchmark's pure parts (benchmarks/bench_quality.py): the YOLO layout made from the COCO JSON
reads back as the same boxes, YOLO detections become COCO results of the right categories, pycocotools
scores them, the epochs that fit a budget, the records and the ratio table. Ultralytics is needed only to
check that its own reader sees the layout as neoray's does."""

from __future__ import annotations

import importlib.util
import json
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest

from neoray.data.prepare import prepare_coco, prepare_yolo
from neoray.data.shards import shard_files
from neoray.data.synth import write_synthetic_dataset

REPO_ROOT = Path(__file__).resolve().parents[1]


def _load_bench():
    spec = importlib.util.spec_from_file_location("bench_quality", REPO_ROOT / "benchmarks" / "bench_quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """Six shape classes (non-contiguous ids 1, 3, 7, 8, 11, 14), empty frames included."""
    root = tmp_path_factory.mktemp("synth")
    write_synthetic_dataset(root, train=10, val=9, size=(320, 180), layout="dense", seed=3)
    return root


def _rows_by_name(shard_dir) -> dict:
    return {row["file_name"]: row for path in shard_files(shard_dir) for row in pq.read_table(path).to_pylist()}


def test_the_yolo_layout_reads_back_as_the_coco_boxes_and_classes(dataset, tmp_path):
    data_yaml = bench.write_yolo_dataset(dataset, tmp_path / "yolo")
    coco = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    assert bench.category_ids(coco) == [1, 3, 7, 8, 11, 14]
    empty = [img["file_name"] for img in coco["images"]
             if not any(a["image_id"] == img["id"] for a in coco["annotations"])]
    assert empty and all((tmp_path / "yolo" / "labels" / "val" / name).with_suffix(".txt").read_text() == ""
                         for name in empty)
    # neoray's YOLO reader (Ultralytics' conventions) against the COCO source, through the same letterbox
    prepare_coco(dataset / "annotations" / "instances_val.json", dataset / "val", tmp_path / "coco",
                 size=(320, 180), workers=1)
    from_yolo = prepare_yolo(data_yaml.parent, tmp_path / "yolo_shards", size=(320, 180), split="val", workers=1)
    assert [c["name"] for c in from_yolo.manifest["categories"]] == [c["name"] for c in coco["categories"]]
    coco_rows, yolo_rows = _rows_by_name(tmp_path / "coco"), _rows_by_name(tmp_path / "yolo_shards")
    assert coco_rows.keys() == yolo_rows.keys() and len(coco_rows) == 9
    for name, c in coco_rows.items():
        y = yolo_rows[name]
        assert y["labels"] == c["labels"]
        np.testing.assert_allclose(np.array(y["boxes"]).reshape(-1, 4), np.array(c["boxes"]).reshape(-1, 4),
                                   atol=1e-3)
    assert sum(len(r["labels"]) for r in yolo_rows.values()) == len(coco["annotations"]) > 50
    assert bench.write_yolo_dataset(dataset, tmp_path / "yolo") == data_yaml  # made once


@pytest.mark.slow  # importing Ultralytics takes seconds
def test_ultralytics_reads_the_layout_with_the_same_classes_and_boxes(dataset, tmp_path, monkeypatch):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "settings"))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics")
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data_yaml = bench.write_yolo_dataset(dataset, tmp_path / "yolo")
    data = check_det_dataset(str(data_yaml))
    labels = YOLODataset(img_path=data["val"], data=data, task="detect", augment=False, imgsz=320).labels
    coco = json.loads((dataset / "annotations" / "instances_val.json").read_text())
    cat_ids = bench.category_ids(coco)
    for label in labels:
        img = next(i for i in coco["images"] if i["file_name"] == Path(label["im_file"]).name)
        anns = [a for a in coco["annotations"] if a["image_id"] == img["id"]]
        assert [cat_ids[int(c)] for c in label["cls"].ravel()] == [a["category_id"] for a in anns]
        w, h = img["width"], img["height"]
        expected = [[(x + bw / 2) / w, (y + bh / 2) / h, bw / w, bh / h] for x, y, bw, bh in (a["bbox"] for a in anns)]
        np.testing.assert_allclose(label["bboxes"].reshape(-1, 4), np.array(expected).reshape(-1, 4), atol=1e-6)
    assert len(labels) == 9


def test_yolo_detections_become_coco_results_with_category_ids_and_xywh():
    out = bench.detections_to_coco(42, [[10.0, 20.0, 30.5, 60.0], [0, 0, 5, 5]], [0.91234567, 0.2], [2, 0],
                                   [1, 3, 7])
    assert out == [
        {"image_id": 42, "category_id": 7, "bbox": [10.0, 20.0, 20.5, 40.0], "score": 0.91235},
        {"image_id": 42, "category_id": 1, "bbox": [0.0, 0.0, 5.0, 5.0], "score": 0.2},
    ]
    assert bench.detections_to_coco(1, [], [], [], [1]) == []


@pytest.mark.slow  # importing Ultralytics takes seconds
def test_ultralytics_results_become_coco_results_of_their_image(monkeypatch, tmp_path):
    monkeypatch.setenv("YOLO_CONFIG_DIR", str(tmp_path / "settings"))
    monkeypatch.setenv("YOLO_OFFLINE", "1")
    pytest.importorskip("ultralytics")
    import torch
    from ultralytics.engine.results import Results

    image = np.zeros((180, 320, 3), np.uint8)
    results = [
        Results(image, "/data/val/000002.jpg", {0: "a", 1: "b"},
                boxes=torch.tensor([[10.0, 20.0, 50.0, 40.0, 0.75, 1.0], [0.0, 0.0, 8.0, 6.0, 0.5, 0.0]])),
        Results(image, "/data/val/000009.jpg", {0: "a", 1: "b"}, boxes=torch.zeros((0, 6))),
    ]
    out = bench.results_to_coco(results, {"000002.jpg": 2, "000009.jpg": 9}, [3, 7])
    assert out == [{"image_id": 2, "category_id": 7, "bbox": [10.0, 20.0, 40.0, 20.0], "score": 0.75},
                   {"image_id": 2, "category_id": 3, "bbox": [0.0, 0.0, 8.0, 6.0], "score": 0.5}]


def test_pycocotools_scores_perfect_shifted_and_missing_detections(dataset):
    gt_json = dataset / "annotations" / "instances_val.json"
    coco = json.loads(gt_json.read_text())
    perfect = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in coco["annotations"]]
    assert bench.coco_scores(gt_json, perfect) == {"map": pytest.approx(1.0), "map50": pytest.approx(1.0)}
    # shifted by a fifth of their width: IoU 2/3 for every box, a match at 4 of COCO's 10 IoU thresholds
    shifted = [{**d, "bbox": [d["bbox"][0] + d["bbox"][2] / 5, *d["bbox"][1:]]} for d in perfect]
    scores = bench.coco_scores(gt_json, shifted)
    assert 0.3 < scores["map"] < 0.5 and scores["map50"] > 0.9
    wrong_class = [{**d, "category_id": 14 if d["category_id"] != 14 else 1} for d in perfect]
    assert bench.coco_scores(gt_json, wrong_class)["map50"] < 0.5
    assert bench.coco_scores(gt_json, []) == {"map": 0.0, "map50": 0.0}


def test_the_single_run_gets_the_epochs_that_fit_the_budget():
    # started at 0, reports at 30, 40, 51 (epochs of ~10.5 s), exited at 55
    fit = bench.fit_epochs(600.0, [30.0, 40.0, 51.0], started=0.0, ended=55.0)
    assert fit["epoch_s"] == 10.5 and fit["startup_s"] == 19.5 and fit["shutdown_s"] == 4.0
    assert fit["epochs"] == int((600 - 19.5 - 4.0) // 10.5) == 54
    assert bench.fit_epochs(10.0, [30.0, 40.0], 0.0, 41.0)["epochs"] == 1  # at least one epoch
    with pytest.raises(bench.BenchError, match="1 epoch"):
        bench.fit_epochs(600.0, [30.0], 0.0, 31.0)


def _arm(map_, map50, epochs=10):
    return {"T_s": 600.0, "wall_s": 610.0, "epochs": epochs, "final": {"epoch": epochs, "map": map_, "map50": map50}}


def test_the_table_gives_ratios_against_the_stronger_yolo_arm():
    record = {"task": "photo", "T_s": 600.0, "T_from": "the sweep's wall time", "arms": {
        "yolo_mosaic": _arm(0.05, 0.20), "single": _arm(0.03, 0.10), "sweep": _arm(0.02, 0.05, 18),
        "yolo_rect": _arm(0.04, 0.16), "single-lr4": _arm(0.06, 0.30)}}
    assert bench.peer_arm(record["arms"]) == "yolo_mosaic"
    table = bench.ratio_table(record)
    lines = table.splitlines()
    assert "ratios against the stronger YOLO arm on the same machine" in lines[0]
    assert [line.split(" | ")[0].strip("| ") for line in lines[3:]] == [
        "sweep", "single", "single-lr4", "yolo_rect", "yolo_mosaic"]
    assert "| sweep | 600 | 610 | 18 | 18 | 0.0200 | 0.0500 | 0.40x | 0.25x | yolo_mosaic |" in lines
    assert "| single-lr4 | 600 | 610 | 10 | 10 | 0.0600 | 0.3000 | 1.20x | 1.50x | yolo_mosaic |" in lines
    ratios = bench._with_ratios(record)["ratios"]
    assert ratios["single"] == {"map": pytest.approx(0.6), "map50": pytest.approx(0.5)}
    assert "yolo_rect" not in ratios
    assert "- | - |" in bench.ratio_table({"task": "dense", "arms": {"sweep": _arm(0.1, 0.2)}}).splitlines()[3]


def test_ratios_pair_arms_measured_on_the_same_machine(tmp_path):
    # Equal wall time means nothing across machines: a neoray arm timed on a CPU twice as fast is compared
    # with the YOLO arm rerun on that CPU (recorded under --peer-tag), never with the slower machine's.
    slow, fast = {"cpu": "Intel Xeon", "cpus": 2}, {"cpu": "AMD EPYC", "cpus": 2}
    arms = {"yolo_rect": {**_arm(0.04, 0.40), "machine": slow}, "single": {**_arm(0.03, 0.20), "machine": slow},
            "single-tiny": {**_arm(0.08, 0.60), "machine": fast}}
    record = {"task": "photo", "T_s": 600.0, "T_from": "--minutes 10", "arms": dict(arms)}
    assert bench.peer_arm(arms, "single-tiny") is None
    assert "| single-tiny | 600 | 610 | 10 | 10 | 0.0800 | 0.6000 | - | - | - |" in bench.ratio_table(record)
    assert "single-tiny" not in bench._with_ratios(dict(record))["ratios"]
    record["arms"]["yolo_rect-epyc"] = {**_arm(0.06, 0.50), "machine": fast}
    ratios = bench._with_ratios(record)
    assert ratios["peers"] == {"single": "yolo_rect", "single-tiny": "yolo_rect-epyc"}
    assert ratios["ratios"]["single-tiny"]["map50"] == pytest.approx(1.2)
    assert ratios["ratios"]["single"]["map50"] == pytest.approx(0.5)
    assert "| single-tiny | 600 | 610 | 10 | 10 | 0.0800 | 0.6000 | 1.33x | 1.20x | yolo_rect-epyc |" in (
        bench.ratio_table(record))
    args = bench.parse_args(["--task", "photo", "--arms", "yolo_rect", "--peer-tag", "epyc"])
    assert bench._arm_name("yolo_rect", args.tag, args.peer_tag) == "yolo_rect-epyc"
    with pytest.raises(SystemExit):
        bench.parse_args(["--task", "photo", "--peer-tag", "a b"])


def test_an_arm_is_compared_with_a_peer_given_the_same_wall_time():
    # A tagged sweep ends when its trials do: one of 200 s is compared with YOLO run for about 200 s, never with
    # a YOLO run of the untagged sweep's 600 s; a single run with the peer of its own T.
    arms = {"yolo_rect": _arm(0.06, 0.60), "single": _arm(0.05, 0.55),
            "sweep-short": {**_arm(0.02, 0.30), "wall_s": 200.0}}
    assert bench.peer_arm(arms, "single") == "yolo_rect"
    assert bench.peer_arm(arms, "sweep-short") is None
    arms["yolo_rect-200s"] = {**_arm(0.03, 0.25), "T_s": 210.0, "wall_s": 215.0}
    assert bench.peer_arm(arms, "sweep-short") == "yolo_rect-200s"
    assert bench.peer_arm(arms, "single") == "yolo_rect"  # the stronger 200 s arm is not the single run's peer
    record = {"task": "dense", "T_s": 600.0, "T_from": "the sweep's wall time", "arms": arms}
    assert bench._with_ratios(record)["ratios"]["sweep-short"]["map50"] == pytest.approx(1.2)


def test_an_arm_is_recorded_without_touching_the_others(tmp_path):
    args = bench.parse_args(["--task", "dense", "--data-dir", str(tmp_path), "--arms", "yolo_rect"])
    rows = [{"trial": "", "epoch": e, "elapsed_s": 10.0 * e, "map": 0.1, "map50": 0.2, "scored_by": "pycocotools"}
            for e in (1, 2)]
    bench._save_arm(args, "yolo_rect", _arm(0.1, 0.2), rows)
    bench._save_arm(args, "single", _arm(0.05, 0.1), rows[:1])
    bench._save_arm(args, "yolo_rect", _arm(0.2, 0.4), rows[1:])  # a rerun replaces its own rows only
    csv_rows = bench._read_csv(tmp_path / "quality_dense.csv")
    assert [(r["arm"], r["epoch"]) for r in csv_rows] == [("single", "1"), ("yolo_rect", "2")]
    record = json.loads((tmp_path / "quality_dense.json").read_text())
    assert record["arms"]["yolo_rect"]["final"]["map50"] == 0.4 and record["peer"] == "yolo_rect"
    assert record["ratios"]["single"]["map50"] == pytest.approx(0.25)


def test_a_recorded_arm_names_no_path_of_the_machine_it_ran_on(tmp_path):
    args = bench.parse_args(["--task", "dense", "--data-dir", str(tmp_path), "--arms", "single"])
    root = bench.REPO_ROOT
    arm = {**_arm(0.1, 0.2), "command": f"{sys.executable} -m neoray.cli train {root / 'neoray/configs/x.yaml'}",
           "config": str(root / "neoray" / "configs" / "x.yaml")}
    bench._save_arm(args, "single", arm, [])
    text = (tmp_path / "quality_dense.json").read_text()
    assert str(root) not in text and sys.executable not in text
    recorded = json.loads(text)["arms"]["single"]
    assert recorded["command"] == "python -m neoray.cli train neoray/configs/x.yaml"
    assert recorded["config"] == "neoray/configs/x.yaml"


def test_the_command_line_orders_the_arms_and_refuses_a_bad_tag(capsys):
    args = bench.parse_args(["--task", "photo", "--arms", "yolo_mosaic", "sweep", "--tag", "mosaic.5"])
    assert args.arms == ["sweep", "yolo_mosaic"] and bench._arm_name("sweep", args.tag) == "sweep-mosaic.5"
    assert bench._arm_name("yolo_mosaic", args.tag) == "yolo_mosaic"  # the peer is never tagged
    with pytest.raises(SystemExit):
        bench.parse_args(["--task", "photo", "--tag", "a/b"])
    assert "--tag" in capsys.readouterr().err


def test_the_sweep_arm_scores_the_best_epochs_checkpoint_or_the_latest_kept(tmp_path):
    history = [{"epoch": e, "evaluated": 1, "score": s, "map": s, "checkpoint_dir_name": f"checkpoint_{e - 1:06d}"}
               for e, s in ((1, 0.1), (2, 0.4), (3, 0.3), (4, 0.35))]
    for name in ("checkpoint_000001", "checkpoint_000002", "checkpoint_000003"):  # Tune kept the last ones
        (tmp_path / name).mkdir()
    assert bench._trial_checkpoint(tmp_path, history) == (tmp_path / "checkpoint_000001", 2)
    (tmp_path / "checkpoint_000001").rmdir()  # the best epoch's checkpoint is gone: the latest kept
    assert bench._trial_checkpoint(tmp_path, history) == (tmp_path / "checkpoint_000003", 2)
    with pytest.raises(bench.BenchError, match="no checkpoint left"):
        bench._trial_checkpoint(tmp_path / "nothing", history)


def test_a_sweep_that_continued_its_best_trial_is_scored_on_the_final_run(tmp_path, monkeypatch):
    """search.trial_epochs: the sweep's model is SWEEP_DIR/final, not the best trial's 4-epoch checkpoint; the
    curve of the arm is the trial's epochs, then the final run's."""
    sweep_dir = tmp_path / "sweep"
    (sweep_dir / "trial_0001").mkdir(parents=True)
    (sweep_dir / "trial_0001" / "result.json").write_text("".join(
        json.dumps({"epoch": e, "evaluated": 1, "score": 0.1 * e, "map": 0.1 * e, "map50": 0.2 * e,
                    "timestamp": 1000 + 10 * e, "checkpoint_dir_name": f"checkpoint_{e - 1:06d}"}) + "\n"
        for e in (1, 2)))
    (sweep_dir / "trials.csv").write_text("trial,status,lr,best_score\ntrial_0001,finished,0.002,0.2\n")
    (sweep_dir / "final").mkdir()
    (sweep_dir / "final" / "metrics.csv").write_text("epoch,map,map50,time\n3,0.5,0.7,1100\n4,0.6,0.8,1120\n")
    scored = []
    monkeypatch.setattr(bench, "_run", lambda cmd, log, env: (1000.0, 1130.0))
    monkeypatch.setattr(bench, "_score_neoray_checkpoint",
                        lambda checkpoint, shards, gt, out: scored.append(checkpoint) or {"epoch": 4, "map50": 0.8})
    args = SimpleNamespace(config="c.yaml", sweep_args="", config_overrides=[])
    ctx = {"task": {"size": (320, 180)}, "shards": {"train": "t", "val": "v"}, "val_json": tmp_path / "v.json"}
    monkeypatch.setattr(bench, "_data_overrides", lambda task, shards: [])
    result = bench.run_sweep_arm(args, ctx, "sweep", tmp_path)
    assert scored == [str(sweep_dir / "final")] and result["continued"] and result["best_trial"] == "trial_0001"
    assert [(r["trial"], r["epoch"]) for r in result["rows"]] == [("trial_0001", 1), ("trial_0001", 2),
                                                                  ("final", 3), ("final", 4)]
    assert result["epochs"] == 4 and result["last"]["map50"] == 0.8 and result["wall_s"] == 130.0


def test_a_failing_arm_command_says_which_and_shows_its_log(tmp_path):
    with pytest.raises(bench.BenchError) as info:
        bench._run([sys.executable, "-c", "import sys; print('the reason'); sys.exit(3)"], tmp_path / "probe.log",
                   bench._child_env())
    assert "probe exited 3" in str(info.value) and "the reason" in str(info.value)


def test_arm_commands_run_this_checkout_on_a_private_ray_instance(monkeypatch):
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    monkeypatch.setenv("OMP_NUM_THREADS", "7")
    env = bench._child_env(OMP_NUM_THREADS=None, YOLO_OFFLINE="1")
    assert "RAY_ADDRESS" not in env and "OMP_NUM_THREADS" not in env and env["YOLO_OFFLINE"] == "1"
    assert env["PYTHONPATH"].split(os.pathsep)[0] == str(REPO_ROOT)
