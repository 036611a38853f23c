"""DHR's three improvements as independent switches, and vox2vec as an override of the same workflow."""

from pathlib import Path

import pytest
from monai.bundle import ConfigParser
from test_pretrain_bundle import run_pretrain, write_volumes

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
