"""A real method comparison whose backbones differ in architecture: each backbone file says what it is."""

import csv
import os

import pytest
import torch
from bundle import ROOT
from scripts.engine.weights import read_info, save_weights
from scripts.networks.fpn3d import FPN3d
from scripts.tools import compare
from test_train_bundle import write_cases

TINY = "--patch_size [16,16,8] --epochs 1 --epoch_length 2 --val_interval 1 --num_folds 5 --num_workers 0"


@pytest.mark.slow
def test_compare_studies_backbones_of_different_architectures(tmp_path, monkeypatch):
    write_cases(tmp_path / "data")
    root = tmp_path / "compare"
    torch.manual_seed(0)
    # What the two pretraining runs export into their folders, so compare skips pretraining: DHR's file with its
    # sidecar, vox2vec's as the authors release it (a plain state dict, described by its shapes).
    info = {"kind": "backbone", "in_channels": 1, "base_channels": 8, "num_scales": 3, "modality": "mri"}
    dhr = compare.pretrain_folder("dhr", root)[0] / "pretrained_backbone.pt"
    save_weights(FPN3d(1, 8, 3).state_dict(), dhr, info | {"patch_size": [16, 16, 8], "method": "dhr"})
    vox2vec = compare.pretrain_folder("vox2vec", root)[0] / "pretrained_backbone.pt"
    vox2vec.parent.mkdir()
    torch.save(FPN3d(1, 4, 4).state_dict(), vox2vec)

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    study_args = f"{TINY} --dataset_dir {tmp_path / 'data'} --num_classes 2 --volumes_per_batch 2 --progress False"
    study_args += f" --bundle_root {tmp_path}"
    compare.main(
        ["--methods", "dhr", "vox2vec", "--output_dir", str(root), "--budgets", "1", "--folds", "0"]
        + ["--modes", "finetune", "--study_args", study_args]  # linear cells through compare: the README walk-through
    )

    with open(root / "study/results.csv") as f:
        rows = list(csv.DictReader(f))
    names = {"scratch": "scratch", dhr.parent.name: "dhr", vox2vec.parent.name: "vox2vec"}
    assert sorted((names[r["init"]], r["mode"]) for r in rows) == [
        (i, "finetune") for i in ("dhr", "scratch", "vox2vec")
    ]
    assert all(0.0 <= float(r["mean_dice"]) <= 1.0 for r in rows)
    # from scratch is the first backbone's (DHR's) network untrained
    for init, size in (("scratch", (8, 3)), (dhr.parent.name, (8, 3)), (vox2vec.parent.name, (4, 4))):
        (model,) = (root / f"study/{init}/finetune").glob("n1_f0_*/model.pt")
        info = read_info(model)
        assert (info["base_channels"], info["num_scales"]) == size, init
