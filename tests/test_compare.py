"""The method comparison: same pretraining arguments for each method, then one study with all backbones."""

import csv
import json
from pathlib import Path

import pytest
from scripts.engine.weights import save_weights
from scripts.tools import compare, study
from scripts.utils.cli import given_value
from test_study import fake_demo, fake_runner


@pytest.fixture
def pretrainings(monkeypatch, tmp_path_factory):
    """Replaces each pretraining by writing its backbone file and sidecar, each study cell by a summary and the demo
    data by tiny cases; returns the runs."""
    runs = []
    fake_demo(monkeypatch, tmp_path_factory.mktemp("demo") / "data")

    def fake_bundle_run(run_id, configs, keys, extra, log):
        runs.append((run_id, configs, list(extra)))
        info = {"kind": "backbone", "modality": given_value(extra, "modality") or "mri"}  # pretrain.yaml's default
        save_weights({}, Path(keys["output_dir"]) / "pretrained_backbone.pt", info)

    monkeypatch.setattr(study, "bundle_run", fake_bundle_run)
    monkeypatch.setattr(study, "run_cell", fake_runner([]))
    return runs


ARGV = ["--budgets", "1", "2", "--folds", "0", "--modes", "finetune"]


def test_compare_pretrains_each_method_once_then_studies_all_backbones(tmp_path, pretrainings):
    argv = [*ARGV, "--output_dir", str(tmp_path)]
    compare.main([*argv, "--pretrain_args", "--epochs 7 --dataset_dir /data"])

    assert [r[1][-1] for r in pretrainings] == [
        "configs/pretrain.yaml",
        "configs/pretrain_vox2vec.yaml",
        "configs/pretrain_pcrl.yaml",
    ]
    assert all(r[0] == "pretrain" and r[2] == ["--epochs", "7", "--dataset_dir", "/data"] for r in pretrainings)
    with open(tmp_path / "study/results.csv") as f:
        inits = {row["init"] for row in csv.DictReader(f)}
    assert {init.rsplit("_", 1)[0] for init in inits} == {
        "scratch",
        "pretrain_dhr",
        "pretrain_vox2vec",
        "pretrain_pcrl",
    }
    assert (tmp_path / "study/label_efficiency.png").is_file()

    pretrainings.clear()
    compare.main([*argv, "--pretrain_args", "--epochs 7 --dataset_dir /data"])
    assert pretrainings == [], "methods whose backbone exists for the same arguments are not pretrained again"


def test_on_ct_each_method_pretrains_with_its_papers_preset_and_the_table_says_it(tmp_path, pretrainings):
    compare.main([*ARGV, "--output_dir", str(tmp_path), "--pretrain_args", "--modality ct --epochs 7"])
    presets = {configs[-1].removeprefix("configs/"): given_value(args, "modality") for _, configs, args in pretrainings}
    assert presets == {"pretrain.yaml": "ct", "pretrain_vox2vec.yaml": "ct_wide", "pretrain_pcrl.yaml": "ct"}
    assert all(given_value(args, "epochs") == "7" for _, _, args in pretrainings)
    with open(tmp_path / "study/results.csv") as f:
        table = {row["init"].rsplit("_", 1)[0]: row["preset"] for row in csv.DictReader(f)}
    assert table == {"scratch": "ct", "pretrain_dhr": "ct", "pretrain_vox2vec": "ct_wide", "pretrain_pcrl": "ct"}


def test_method_args_are_one_methods_own_after_the_common_ones(tmp_path, pretrainings):
    own = ["vox2vec=--epochs 10 --modality mri", "pcrl=--learning_rate 0.01"]
    argv = [*ARGV, "--output_dir", str(tmp_path), "--pretrain_args", "--epochs 7 --modality ct", "--method_args", *own]
    compare.main(argv)
    assert [args for _, _, args in pretrainings] == [
        ["--epochs", "7", "--modality", "ct"],
        ["--epochs", "10", "--modality", "mri"],
        ["--epochs", "7", "--modality", "ct", "--learning_rate", "0.01"],
    ]


def test_changed_pretraining_arguments_pretrain_anew(tmp_path, pretrainings, capsys):
    argv = [*ARGV, "--methods", "dhr", "--output_dir", str(tmp_path)]
    compare.main([*argv, "--pretrain_args", "--epochs 2"])
    compare.main([*argv, "--pretrain_args", "--epochs 20"])
    assert [r[2] for r in pretrainings] == [["--epochs", "2"], ["--epochs", "20"]]
    folders = sorted(tmp_path.glob("pretrain_dhr_*"))
    assert [json.loads((f / "args.json").read_text())["args"] for f in folders] in (
        [["--epochs", "2"], ["--epochs", "20"]],
        [["--epochs", "20"], ["--epochs", "2"]],
    )
    assert "other arguments than" in capsys.readouterr().out


def test_compare_takes_the_study_options(tmp_path, pretrainings, monkeypatch):
    cells = []
    monkeypatch.setattr(study, "run_cell", fake_runner(cells))
    compare.main([*ARGV, "--methods", "dhr", "--warmup_epochs", "2", "--output_dir", str(tmp_path)])
    # from scratch also takes the backbone's preset
    assert {cell.args for cell in cells} == {("--warmup_epochs", "2"), ("--modality", "mri", "--warmup_epochs", "2")}


def test_backbones_pretrain_each_method_on_each_network_in_folders_named_by_it(tmp_path, pretrainings):
    argv = [*ARGV, "--methods", "dhr", "vox2vec", "--output_dir", str(tmp_path), "--pretrain_args", "--epochs 7"]
    compare.main([*argv, "--backbones", "fpn3d", "segresnet", "--backbone_args", "segresnet={'init_filters': 8}"])
    assert [args for _, _, args in pretrainings] == [
        ["--epochs", "7"],
        ["--epochs", "7"],
        ["--epochs", "7", "--backbone", "segresnet", "--backbone_args", "{'init_filters': 8}"],
        ["--epochs", "7", "--backbone", "segresnet", "--backbone_args", "{'init_filters': 8}"],
    ]
    folders = {p.name.rsplit("_", 1)[0] for p in tmp_path.glob("pretrain_*")}
    assert folders == {"pretrain_dhr", "pretrain_vox2vec", "pretrain_dhr_segresnet", "pretrain_vox2vec_segresnet"}
    with open(tmp_path / "study/results.csv") as f:
        assert len({row["init"] for row in csv.DictReader(f)}) == 5  # from scratch and the four backbones


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "0"], "--budgets 0"),
        (["--folds", "0", "4"], "--folds 0 4"),
        (["--warmup_epochs", "-2"], "--warmup_epochs -2"),
        (["--study_args", "--warmup_epochs 3"], "the study's own --warmup_epochs"),
        (["--study_args", "--dataset_dir None"], "--dataset_dir None"),
        (["--pretrain_args", "--output_dir elsewhere"], "--output_dir in --pretrain_args"),
        (["--pretrain_args", "--projection_width None"], "--projection_width None"),
        (["--pretrain_args", "--epochs '7"], "--pretrain_args"),
        (["--study_args", "--modality ct"], "--modality in --study_args"),
        (["--method_args", "dhr"], "METHOD=ARGS"),
        (["--methods", "dhr", "--method_args", "pcrl=--epochs 2"], "METHOD one of --methods (dhr)"),
        (["--method_args", "dhr=--epochs 2", "dhr=--seed 1"], "dhr given twice"),
        (["--method_args", "vox2vec=--output_dir x"], "--output_dir in --method_args vox2vec"),
        (["--method_args", "pcrl=--momentum None"], "--momentum None in --method_args pcrl"),
        (["--backbones", "resnet"], "--backbones resnet: give one of fpn3d segresnet dynunet unet"),
        (["--backbones", "unet"], "--backbones unet with --methods pcrl: PCRL pretrains fpn3d only"),
        (["--methods", "dhr", "--backbone_args", "fpn3d={}"], "NAME one of the MONAI --backbones (none given)"),
        (["--methods", "dhr", "--pretrain_args", "--backbone unet"], "--backbone in --pretrain_args: give the"),
    ],
)
def test_every_argument_is_checked_before_any_pretraining(tmp_path, pretrainings, capsys, argv, message):
    with pytest.raises(SystemExit):
        compare.main(["--output_dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err
    assert pretrainings == [] and not list(tmp_path.glob("pretrain_*"))
