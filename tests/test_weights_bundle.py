"""End to end: a trained model says what it is, so evaluation and inference need none of the training's keys."""

import json

import nibabel as nib
import pytest
import torch
from bundle import run_workflow
from scripts.data.splits import datalist_digest, labelled_datalist
from scripts.engine.weights import read_info, sidecar
from scripts.networks.fpn3d import FPN3d
from test_train_bundle import write_cases

# Only run-length and data keys: the network and preprocessing keys come from the weights.
SHORT = {"epochs": 1, "epoch_length": 2, "val_interval": 1, "num_workers": 0, "progress": False}
SPLIT = {"num_folds": 5}  # a data key: evaluation must pick the same test cases


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A model fine-tuned from an authors'-style vox2vec-shaped backbone (plain FPN3d 4/4, no sidecar), with
    non-default classes, modality and patch size; FPN3d 4/4 also differs from the defaults 32/5."""
    tmp = tmp_path_factory.mktemp("weights")
    write_cases(tmp / "data")
    torch.manual_seed(0)
    torch.save(FPN3d(1, 4, 4).state_dict(), tmp / "vox2vec.pt")
    keys = {"num_classes": 2, "modality": "ct", "patch_size": [16, 16, 8], "volumes_per_batch": 2}
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "train", "pretrained_ckpt": tmp / "vox2vec.pt"}
    run_workflow(None, "configs/train.yaml", **SHORT, **SPLIT, **keys, **paths, bundle_root=tmp)
    return tmp


def test_the_model_file_carries_its_description(trained):
    model = trained / "train/model.pt"
    info = read_info(model)
    assert info["epoch"] == 1 and 0 <= info["selected"]["value"] <= 1  # SHORT: one epoch, validated once
    assert (
        json.loads(sidecar(model).read_text())
        == read_info(model)
        == {
            "kind": "segmentation",
            "in_channels": 1,
            "base_channels": 4,
            "num_scales": 4,
            "modality": "ct",
            "patch_size": [16, 16, 8],
            "num_classes": 2,
            "head": "linear",
            "method": None,
            "pretrained_ckpt": str(trained / "vox2vec.pt"),
            # the test split of its training, which evaluation checks, and which weights these are
            "fold": 0,
            "num_folds": 5,
            "seed": 0,
            "num_train_cases": None,
            "datalist_sha256": datalist_digest(labelled_datalist(trained / "data")),
            "selected": {"metric": "val_mean_dice", "value": info["selected"]["value"]},
            "epoch": info["epoch"],
        }
    )


def test_evaluate_reads_the_model_file(trained):
    keys = {"dataset_dir": trained / "data", "output_dir": trained / "train", "num_workers": 0, **SPLIT}
    run_workflow("evaluate", ["configs/train.yaml", "configs/evaluate.yaml"], **keys, bundle_root=trained)
    summary = json.loads((trained / "train/evaluation/summary.json").read_text())
    assert set(summary["dice_per_class"]) == {"1", "2"}


def test_inference_reads_the_model_file(trained):
    images = trained / "data/imagesTr"
    keys = {"dataset_dir": images, "output_dir": trained / "masks", "model_file": trained / "train/model.pt"}
    run_workflow(None, "configs/inference.json", **keys, num_workers=0, bundle_root=trained)
    masks = sorted((trained / "masks").glob("*_seg.nii.gz"))
    assert len(masks) == 5
    assert nib.load(masks[0]).shape == nib.load(images / "case_0.nii.gz").shape
