"""The method comparison: same pretraining arguments for each method, then one study with all backbones."""

import csv
from pathlib import Path

from test_study import fake_runner

from scripts import compare, study


def test_compare_pretrains_each_method_once_then_studies_all_backbones(tmp_path, monkeypatch):
    runs = []

    def fake_bundle_run(run_id, configs, keys, extra, log):
        runs.append((run_id, configs, list(extra)))
        open(Path(keys["output_dir"]) / "pretrained_backbone.pt", "wb").close()

    monkeypatch.setattr(study, "bundle_run", fake_bundle_run)
    monkeypatch.setattr(study, "run_cell", fake_runner([]))
    argv = ["--output_dir", str(tmp_path), "--budgets", "1", "2", "--folds", "0", "--modes", "finetune"]
    compare.main([*argv, "--pretrain_args", "--epochs 7 --dataset_dir /data"])

    assert [r[1][-1] for r in runs] == [
        "configs/pretrain.yaml",
        "configs/pretrain_vox2vec.yaml",
        "configs/pretrain_pcrl.yaml",
    ]
    assert all(r[0] == "pretrain" and r[2] == ["--epochs", "7", "--dataset_dir", "/data"] for r in runs)
    with open(tmp_path / "study/results.csv") as f:
        inits = {row["init"] for row in csv.DictReader(f)}
    assert inits == {"scratch", "pretrain_dhr", "pretrain_vox2vec", "pretrain_pcrl"}
    assert (tmp_path / "study/label_efficiency.png").is_file()

    runs.clear()
    compare.main(argv)
    assert runs == [], "methods whose backbone exists are not pretrained again"
