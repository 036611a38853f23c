"""Weight files with sidecars, what a plain state dict tells by its shapes, and settings resolved from them."""

import json
from pathlib import Path

import pytest
import torch
from ignite.engine import Engine, Events
from monai.bundle import ConfigParser
from scripts.engine.weights import (
    ModelSaver,
    check_test_split,
    read_info,
    remove_weights,
    resolve,
    save_weights,
    sidecar,
)
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


def _train_config(bundle_root, **keys) -> ConfigParser:
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/train.yaml"))
    parser.update({"bundle_root": str(bundle_root), **keys})  # its default outputs under the test's folder
    return parser


def test_train_yaml_builds_an_authors_vox2vec_shaped_backbone_without_size_keys(tmp_path):
    torch.manual_seed(0)
    state = FPN3d(1, 4, 4).state_dict()  # the authors' release: a plain state dict, no sidecar
    torch.save(state, tmp_path / "vox2vec.pt")
    network = _train_config(tmp_path, pretrained_ckpt=str(tmp_path / "vox2vec.pt")).get_parsed_content("network_def")
    assert (network.backbone.base_channels, network.backbone.num_scales) == (4, 4)
    assert all(torch.equal(network.backbone.state_dict()[k], v) for k, v in state.items())


def test_train_yaml_stops_on_a_size_key_that_contradicts_the_backbone(tmp_path):
    torch.save(FPN3d(1, 4, 4).state_dict(), tmp_path / "vox2vec.pt")
    parser = _train_config(tmp_path, pretrained_ckpt=str(tmp_path / "vox2vec.pt"), num_scales=5)
    with pytest.raises(Exception) as error:
        parser.get_parsed_content("network_def")
    assert "--num_scales 5 contradicts pretrained_ckpt" in str(find_bundle_error(error.value))
    assert "num_scales 4 according to its tensor shapes" in str(find_bundle_error(error.value))


def _seg_info(**extra):
    return {"kind": "segmentation", "in_channels": 1, "base_channels": 4, "num_scales": 3, "num_classes": 2} | extra


def test_a_failed_save_leaves_the_earlier_pair_whole(tmp_path, monkeypatch):
    path = tmp_path / "model.pt"
    save_weights(segmentation_network(2, 4, 3).state_dict(), path, _seg_info(modality="ct"))
    before = path.read_bytes()

    def disk_full(obj, f, *args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(torch, "save", disk_full)
    with pytest.raises(OSError):
        save_weights(segmentation_network(2, 4, 3).state_dict(), path, _seg_info(modality="mri"))
    assert path.read_bytes() == before and read_info(path)["modality"] == "ct"
    assert not list(tmp_path.glob("*.partial"))


def test_model_saver_keeps_the_best_validation_or_the_final_weights(tmp_path):
    network = segmentation_network(2, 4, 3)
    path, values, saved = tmp_path / "model.pt", iter([0.2, 0.5, 0.3]), []
    validator = Engine(lambda engine, batch: None)

    @validator.on(Events.EPOCH_COMPLETED)
    def validate(engine):  # as MONAI's evaluators: the key metric of this validation
        engine.state.key_metric_name = "val_mean_dice"
        engine.state.metrics["val_mean_dice"] = next(values)

    ModelSaver(network, path, _seg_info(modality="ct"), best=True).attach(validator)
    validator.add_event_handler(Events.EPOCH_COMPLETED, lambda e: saved.append(read_info(path)["selected"]))
    validator.run([0], max_epochs=3)
    assert [s["value"] for s in saved] == [0.2, 0.5, 0.5], "only a better validation replaces the model"
    assert read_info(path) == _seg_info(modality="ct", selected=saved[-1], epoch=2)

    trainer = Engine(lambda engine, batch: None)
    ModelSaver(network, tmp_path / "final.pt", _seg_info(modality="mri")).attach(trainer)
    trainer.run([0, 1], max_epochs=3)
    assert read_info(tmp_path / "final.pt") == _seg_info(modality="mri", selected="final", epoch=3)
    network.load_state_dict(torch.load(tmp_path / "final.pt", weights_only=True), strict=True)


def test_a_run_removes_the_earlier_runs_model_before_it_writes_its_own(tmp_path):
    path = tmp_path / "model.pt"
    save_weights(segmentation_network(2, 4, 3).state_dict(), path, _seg_info(modality="mri", selected={"value": 1}))
    remove_weights(path)
    assert not path.exists() and not sidecar(path).exists()
    remove_weights(path)  # nothing there: nothing to do


def test_a_segmentation_file_without_its_preprocessing_is_refused(tmp_path):
    torch.save(segmentation_network(2, 4, 3).state_dict(), tmp_path / "model.pt")  # no sidecar
    defaults = {**DEFAULTS, "head": "linear"}
    with pytest.raises(BundleError, match=r"does not record its modality and patch_size .*--modality --patch_size"):
        resolve(tmp_path / "model.pt", "segmentation", defaults)
    given = {"modality": "ct", "patch_size": [16, 16, 8]}
    settings = resolve(tmp_path / "model.pt", "segmentation", defaults, given)
    assert settings["modality"] == "ct" and settings["num_classes"] == 2  # given, and read from the shapes


def test_evaluation_on_another_test_split_than_the_training_is_refused(tmp_path):
    path = tmp_path / "model.pt"
    split = {"fold": 1, "num_folds": 3, "seed": 0, "datalist_sha256": "abc"}
    save_weights(segmentation_network(2, 4, 3).state_dict(), path, _seg_info(modality="ct", **split))
    check_test_split(path, **split)
    with pytest.raises(BundleError, match=r"fold 1 there and 0 here; datalist_sha256 'abc' there and 'def' here"):
        check_test_split(path, **{**split, "fold": 0, "datalist_sha256": "def"})
