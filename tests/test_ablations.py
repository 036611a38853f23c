"""DHR's three improvements as independent switches, and vox2vec as an override of the same workflow."""

import re
from pathlib import Path

import pytest
import torch
from bundle import monai_bundle_run
from monai.bundle import ConfigParser
from test_pretrain_bundle import TINY, run_pretrain, write_volumes

ROOT = Path(__file__).resolve().parents[1]


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
    from mlflow.tracking import MlflowClient

    write_volumes(tmp_path / "data")
    config = "['configs/pretrain.yaml','configs/pretrain_vox2vec.yaml']"
    result = run_pretrain(tmp_path, "--tracking", "mlflow", "--num_scales", "3", config=config, epochs=1)
    assert result.returncode == 0, result.stderr[-4000:]
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'out/mlruns.db'}")
    run = client.search_runs([e.experiment_id for e in client.search_experiments()])[0]
    assert "infonce" in run.data.metrics and "restoration" not in run.data.metrics
    assert (tmp_path / "out/pretrained_backbone.pt").is_file()


def pretrain_once(tmp_path: Path, *switch: str):
    """One iteration of pretraining through MONAI's command line with an ablation switch, as a user types it."""
    write_volumes(tmp_path / "data", count=1)
    paths = {"dataset_dir": tmp_path / "data", "output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache"}
    return monai_bundle_run(
        "pretrain", "configs/pretrain.yaml", {**TINY, **paths, "epochs": 1, "epoch_length": 1}, *switch
    )


@pytest.mark.parametrize(
    "switch, printed, projections, head_input, restoration",
    [
        ([], "trained projections 3 x 32", True, 96, True),
        (["--projection_width", "raw"], "raw levels concatenated (28)", False, 4 + 8 + 16, True),
        (["--freeze_projections", "True"], "frozen random projections 3 x 32", False, 96, True),
        (["--restoration_weight", "0"], "no restoration head", True, 96, False),
        (["--augmentations", "vox2vec"], "augmentations: vox2vec's", True, 96, True),
        (["--augmentations", "none"], "augmentations: none", True, 96, True),
    ],
)
def test_each_switch_works_from_the_command_line(tmp_path, switch, printed, projections, head_input, restoration):
    result = pretrain_once(tmp_path, *switch)
    assert result.returncode == 0, result.stderr[-3000:]
    assert printed in result.stdout
    assert result.stdout.count("INFO - augmentations: ") == 1, "announced once, not also by the key check"
    network = torch.load(tmp_path / "out/checkpoints/checkpoint_iteration=1.pt", weights_only=False)["network"]
    assert any(k.startswith("projection.projections.") for k in network) == projections
    assert network["head.layers.0.weight"].shape[1] == head_input
    assert any(k.startswith("restoration_head.") for k in network) == restoration
    metrics = re.search(r"Epoch\[1\] Metrics -- (.*)", result.stdout + result.stderr).group(1)
    assert ("restoration:" in metrics) == restoration, metrics


def test_none_on_the_command_line_is_refused_not_dropped(tmp_path):
    result = pretrain_once(tmp_path, "--projection_width", "None")
    assert result.returncode != 0
    assert result.stderr.strip().splitlines()[-1].startswith("error: --projection_width None: MONAI's command line")
    assert "--projection_width raw" in result.stderr.strip().splitlines()[-1]
    assert not (tmp_path / "out/checkpoints").exists(), "refused before any work"
