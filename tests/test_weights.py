"""Weight files with sidecars, what a plain state dict tells by its shapes, and settings resolved from them."""

import json
from pathlib import Path

import pytest
import torch
from monai.bundle import ConfigParser
from scripts.engine.weights import read_info, resolve, save_weights, sidecar
from scripts.networks.fpn3d import FPN3d
from scripts.networks.segmentation import segmentation_network
from scripts.utils.errors import BundleError, find_bundle_error

ROOT = Path(__file__).resolve().parents[1]
DEFAULTS = {"modality": "mri", "patch_size": [128, 128, 32], "base_channels": 32, "num_scales": 5, "num_classes": 3}


def test_sidecar_travels_with_the_weights(tmp_path):
    state = FPN3d(1, 4, 3).state_dict()
    info = {"kind": "backbone", "in_channels": 1, "base_channels": 4, "num_scales": 3, "modality": "ct"}
    save_weights(state, tmp_path / "b.pt", info)
    assert json.loads(sidecar(tmp_path / "b.pt").read_text()) == info
    assert read_info(tmp_path / "b.pt") == info
    loaded = torch.load(tmp_path / "b.pt", weights_only=True)  # still a plain state dict
    FPN3d(1, 4, 3).load_state_dict(loaded, strict=True)
    assert not list(tmp_path.glob("*.partial"))


def test_plain_and_wrapped_state_dicts_are_described_by_their_shapes(tmp_path):
    state = FPN3d(1, 8, 4).state_dict()
    for name, content in {
        "plain": state,
        "lightning": {"state_dict": {f"backbone.{k}": v for k, v in state.items()}},
    }.items():
        torch.save(content, tmp_path / f"{name}.pt")
        assert read_info(tmp_path / f"{name}.pt") == {
            "kind": "backbone",
            "in_channels": 1,
            "base_channels": 8,
            "num_scales": 4,
        }


@pytest.mark.parametrize("head", ["linear", "nonlinear"])
def test_a_plain_segmentation_state_dict_tells_its_classes_and_head(head, tmp_path):
    torch.save(segmentation_network(13, 4, 3, head=head).state_dict(), tmp_path / "model.pt")
    assert read_info(tmp_path / "model.pt") == {
        "kind": "segmentation",
        "in_channels": 1,
        "base_channels": 4,
        "num_scales": 3,
        "num_classes": 13,
        "head": head,
    }


def test_settings_come_from_the_given_keys_then_the_file_then_the_defaults(tmp_path):
    info = {"kind": "backbone", "base_channels": 4, "num_scales": 4, "modality": "ct_wide", "patch_size": [16, 16, 8]}
    save_weights(FPN3d(1, 4, 4).state_dict(), tmp_path / "b.pt", info)
    given = {"modality": None, "base_channels": 4, "num_classes": 13}
    assert resolve(tmp_path / "b.pt", "backbone", DEFAULTS, given) == {
        "modality": "ct_wide",
        "patch_size": [16, 16, 8],
        "base_channels": 4,
        "num_scales": 4,
        "num_classes": 13,
    }
    assert resolve(None, "backbone", DEFAULTS, given) == {**DEFAULTS, "base_channels": 4, "num_classes": 13}


def test_a_given_key_that_contradicts_the_file_names_both_values(tmp_path):
    save_weights(FPN3d(1, 4, 4).state_dict(), tmp_path / "b.pt", {"kind": "backbone", "patch_size": [16, 16, 8]})
    with pytest.raises(
        BundleError, match=r"--patch_size \[32, 32, 8\] contradicts pretrained_ckpt .*b.pt .*\[16, 16, 8\]"
    ):
        resolve(tmp_path / "b.pt", "backbone", DEFAULTS, {"patch_size": [32, 32, 8]})
    assert resolve(tmp_path / "b.pt", "backbone", DEFAULTS, {"patch_size": (16, 16, 8)})["patch_size"] == [16, 16, 8]


def test_training_reads_only_the_backbone_keys_of_a_segmentation_model(tmp_path):
    torch.save(segmentation_network(13, 4, 3).state_dict(), tmp_path / "model.pt")
    settings = resolve(tmp_path / "model.pt", "backbone", DEFAULTS, {"num_classes": 2})
    assert (settings["base_channels"], settings["num_scales"], settings["num_classes"]) == (4, 3, 2)
    with pytest.raises(BundleError, match="--num_classes 2 contradicts model_file .*model.pt .*num_classes 13"):
        resolve(tmp_path / "model.pt", "segmentation", DEFAULTS, {"num_classes": 2})


def test_a_backbone_is_refused_as_model_file(tmp_path):
    torch.save(FPN3d(1, 4, 3).state_dict(), tmp_path / "backbone.pt")
    with pytest.raises(BundleError, match="model_file .*backbone.pt is a pretrained backbone.*--pretrained_ckpt"):
        resolve(tmp_path / "backbone.pt", "segmentation", DEFAULTS)


def test_missing_file(tmp_path):
    with pytest.raises(BundleError, match="pretrained_ckpt .*none.pt does not exist"):
        resolve(tmp_path / "none.pt", "backbone", DEFAULTS)
    assert resolve(tmp_path / "none.pt", "segmentation", DEFAULTS, required=False) == DEFAULTS


def _train_config(**keys) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/train.yaml"))
    parser.update(keys)
    return parser


def test_train_yaml_builds_an_authors_vox2vec_shaped_backbone_without_size_keys(tmp_path):
    torch.manual_seed(0)
    state = FPN3d(1, 4, 4).state_dict()  # the authors' release: a plain state dict, no sidecar
    torch.save(state, tmp_path / "vox2vec.pt")
    network = _train_config(pretrained_ckpt=str(tmp_path / "vox2vec.pt")).get_parsed_content("network_def")
    assert (network.backbone.base_channels, network.backbone.num_scales) == (4, 4)
    assert all(torch.equal(network.backbone.state_dict()[k], v) for k, v in state.items())


def test_train_yaml_stops_on_a_size_key_that_contradicts_the_backbone(tmp_path):
    torch.save(FPN3d(1, 4, 4).state_dict(), tmp_path / "vox2vec.pt")
    parser = _train_config(pretrained_ckpt=str(tmp_path / "vox2vec.pt"), num_scales=5)
    with pytest.raises(Exception) as error:
        parser.get_parsed_content("network_def")
    assert "--num_scales 5 contradicts pretrained_ckpt" in str(find_bundle_error(error.value))
    assert "num_scales 4 according to its tensor shapes" in str(find_bundle_error(error.value))
