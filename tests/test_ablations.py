"""DHR's three improvements as independent switches, and vox2vec as an override of the same workflow."""

import re
from pathlib import Path

import pytest
import torch
from bundle import PRETRAIN_TINY, ROOT, monai_bundle_run, run_workflow
from monai.bundle import ConfigParser
from test_pretrain_bundle import TINY, write_volumes


def parts(*files: str, **overrides) -> dict:
    """The network, augmentation and loss that the pretraining config builds with these overrides."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / "configs" / f) for f in ("pretrain.yaml", *files)])
    parser.update({"base_channels": 8, **overrides})
    network = parser.get_parsed_content("network_def")
    return {
        "width": network.projection.out_channels,
        "head": [m.out_features for m in network.head.layers if hasattr(m, "out_features")],
        "restoration_head": network.restoration_head is not None,
        "scales": network.backbone.num_scales,
        "augmentation": type(parser.get_parsed_content("augmentation")).__name__,
        "terms": parser.get_parsed_content("loss").term_names,
    }


DHR = {
    "width": 160,
    "head": [160, 160, 128],
    "restoration_head": True,
    "scales": 5,
    "augmentation": "LocalAugmentations",
    "terms": ["infonce", "restoration"],
}


@pytest.mark.parametrize(
    "overrides, changed",
    [
        ({}, {}),
        ({"projection_width": None}, {"width": 8 + 16 + 32 + 64 + 128, "head": [248, 248, 128]}),
        ({"augmentations": "vox2vec"}, {"augmentation": "Vox2VecAugmentations"}),
        ({"augmentations": "none"}, {"augmentation": "NoneType"}),
        ({"restoration_weight": 0}, {"restoration_head": False, "terms": ["infonce"]}),
    ],
)
def test_each_switch_changes_only_what_it_names(overrides, changed):
    assert parts(**overrides) == {**DHR, **changed}


def test_vox2vec_override_is_the_baseline():
    vox2vec = parts("pretrain_vox2vec.yaml", base_channels=16)
    assert vox2vec == {
        "width": 1008,
        "head": [1008, 1008, 128],
        "restoration_head": False,
        "scales": 6,
        "augmentation": "Vox2VecAugmentations",
        "terms": ["infonce"],
    }


def test_unknown_augmentations_name_the_key():
    with pytest.raises(Exception, match="augmentations"):
        parts(augmentations="strong")


def test_vox2vec_pretrains_end_to_end_and_logs_only_infonce(tmp_path):
    write_volumes(tmp_path / "data")
    keys = {**PRETRAIN_TINY, "num_scales": 3, "epochs": 1, "dataset_dir": tmp_path / "data"}
    keys |= {"output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache", "bundle_root": tmp_path}
    log = run_workflow("pretrain", ["configs/pretrain.yaml", "configs/pretrain_vox2vec.yaml"], **keys).log
    logged = set(re.findall(r"(\w+): [-\d.e]+", re.search(r"Epoch\[1\] Metrics -- (.*)", log).group(1)))
    assert logged == {"infonce"}, logged  # what MLflow's handler logs too (the shared run's test checks it there)
    assert (tmp_path / "out/pretrained_backbone.pt").is_file()


def one_iteration(tmp_path: Path) -> dict:
    """The keys of one iteration of tiny pretraining on one volume, in this folder."""
    write_volumes(tmp_path / "data", count=1)
    paths = {"dataset_dir": tmp_path / "data", "output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache"}
    return {**paths, "bundle_root": tmp_path, "epochs": 1, "epoch_length": 1}


def pretrain_once(tmp_path: Path, *switch: str):
    """One iteration of pretraining through MONAI's command line with an ablation switch, as a user types it."""
    return monai_bundle_run("pretrain", "configs/pretrain.yaml", {**TINY, **one_iteration(tmp_path)}, *switch)


SWITCHES = [
    ({}, "trained projections 3 x 32", True, 96, True),
    ({"projection_width": "raw"}, "raw levels concatenated (28)", False, 4 + 8 + 16, True),
    ({"freeze_projections": True}, "frozen random projections 3 x 32", False, 96, True),
    ({"restoration_weight": 0}, "no restoration head", True, 96, False),
    ({"augmentations": "vox2vec"}, "augmentations: vox2vec's", True, 96, True),
    ({"augmentations": "none"}, "augmentations: none", True, 96, True),
]


def check_switch(tmp_path: Path, log: str, printed: str, projections: bool, head_input: int, restoration: bool):
    assert printed in log
    assert log.count("INFO - augmentations: ") == 1, "announced once, not also by the key check"
    network = torch.load(tmp_path / "out/checkpoints/checkpoint_iteration=1.pt", weights_only=False)["network"]
    assert any(k.startswith("projection.projections.") for k in network) == projections
    assert network["head.layers.0.weight"].shape[1] == head_input
    assert any(k.startswith("restoration_head.") for k in network) == restoration
    metrics = re.search(r"Epoch\[1\] Metrics -- (.*)", log).group(1)
    assert ("restoration:" in metrics) == restoration, metrics


@pytest.mark.parametrize("switch, printed, projections, head_input, restoration", SWITCHES)
def test_each_switch_works_in_a_run(tmp_path, switch, printed, projections, head_input, restoration):
    run = run_workflow("pretrain", "configs/pretrain.yaml", **{**PRETRAIN_TINY, **one_iteration(tmp_path), **switch})
    check_switch(tmp_path, run.log, printed, projections, head_input, restoration)


@pytest.mark.slow
@pytest.mark.parametrize("switch, printed, projections, head_input, restoration", [SWITCHES[1], SWITCHES[2]])
def test_switches_work_from_the_command_line(tmp_path, switch, printed, projections, head_input, restoration):
    """A text value and a boolean as a user types them."""
    result = pretrain_once(tmp_path, *(item for key, value in switch.items() for item in (f"--{key}", str(value))))
    assert result.returncode == 0, result.stderr[-3000:]
    check_switch(tmp_path, result.stdout + result.stderr, printed, projections, head_input, restoration)


@pytest.mark.slow
def test_none_on_the_command_line_is_refused_not_dropped(tmp_path):
    result = pretrain_once(tmp_path, "--projection_width", "None")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --projection_width None: MONAI's command line")
    assert "--projection_width raw" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out/checkpoints").exists(), "refused before any work"
