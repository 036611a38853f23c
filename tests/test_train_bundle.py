"""End to end: fine-tuning and linear evaluation through `python -m monai.bundle run` on tiny labelled volumes."""

import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import monai_bundle_run

from scripts.networks import FPN3d
from scripts.segmentation import segmentation_network

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "patch_size": "[16,16,8]",
    "base_channels": "4",
    "num_scales": "3",
    "num_classes": "2",
    "num_folds": "5",
    "epochs": "2",
    "epoch_length": "2",
    "val_interval": "1",
    "volumes_per_batch": "2",
    "num_workers": "0",
    "progress": "False",
}


def write_cases(folder: Path, count: int = 5) -> None:
    """MSD-style imagesTr/labelsTr: a bright ellipsoid body holding two labelled blobs."""
    (folder / "imagesTr").mkdir(parents=True)
    (folder / "labelsTr").mkdir()
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (28, 26, 14)], indexing="ij"))
    for i in range(count):
        body = (grid**2).sum(0) < 0.8
        label = np.zeros(body.shape, dtype=np.uint8)
        label[((grid - np.array([0.3, 0, 0])[:, None, None, None]) ** 2).sum(0) < 0.08] = 1
        label[((grid + np.array([0.3, 0, 0])[:, None, None, None]) ** 2).sum(0) < 0.08] = 2
        image = np.where(body, 300 + 200 * label.astype(np.float32) + 50 * rng.random(body.shape), 0).astype(np.float32)
        affine = np.diag([1.5, 1.5, 1.5, 1.0])
        nib.save(nib.Nifti1Image(image, affine), folder / f"imagesTr/case_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), folder / f"labelsTr/case_{i}.nii.gz")


def run_bundle(tmp: Path, *extra: str, config="configs/train.yaml", **keys: str) -> subprocess.CompletedProcess:
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "out", "models_dir": tmp / "models"}
    return monai_bundle_run(None, config, {**TINY, **paths, **keys}, *extra)


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    write_cases(tmp / "data")
    torch.manual_seed(0)
    torch.save(FPN3d(1, 4, 3).state_dict(), tmp / "backbone.pt")
    return tmp


def trained_model(tmp: Path, name: str):
    net = segmentation_network(2, 4, 3)
    net.load_state_dict(torch.load(tmp / "models" / name, weights_only=True), strict=True)
    return net


def test_fine_tuning_freezes_the_backbone_for_the_warm_up_then_trains_it(labelled):
    # validating only after epoch 2 makes model.pt (the best validation checkpoint) hold the post-warm-up weights
    checkpoint = str(labelled / "backbone.pt")
    result = run_bundle(
        labelled, "--tracking", "mlflow", pretrained_ckpt=checkpoint, warmup_epochs="1", val_interval="2"
    )
    assert result.returncode == 0, result.stderr[-4000:]
    assert "epochs 1-1: backbone frozen" in result.stdout and "epoch 2: backbone unfrozen" in result.stdout
    pretrained = torch.load(labelled / "backbone.pt", weights_only=True)
    tuned = trained_model(labelled, "model.pt").backbone.state_dict()
    changed = [k for k in pretrained if not torch.equal(pretrained[k], tuned[k])]
    assert changed, "the backbone trains after the warm-up"

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{labelled / 'out/mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    metrics = set().union(*(run.data.metrics for run in runs))
    assert {"val_mean_dice", "val_dice_1", "val_dice_2", "train_loss"} <= metrics
    (run,) = runs
    assert run.info.run_name == "finetune backbone n=all fold 0"
    assert run.data.params["warmup_epochs"] == "1" and run.data.params["pretrained_ckpt"].endswith("backbone.pt")


def test_linear_evaluation_leaves_the_backbone_bitwise_unchanged(labelled):
    result = run_bundle(
        labelled,
        config="['configs/train.yaml','configs/linear_eval.yaml']",
        pretrained_ckpt=str(labelled / "backbone.pt"),
        output_dir=str(labelled / "linear"),
    )
    assert result.returncode == 0, result.stderr[-4000:]
    pretrained = torch.load(labelled / "backbone.pt", weights_only=True)
    probed = trained_model(labelled, "linear_eval_model.pt")
    for key, value in probed.backbone.state_dict().items():
        assert torch.equal(value, pretrained[key]), key


def test_linear_evaluation_refuses_a_warm_up(labelled):
    config = "['configs/train.yaml','configs/linear_eval.yaml']"
    result = run_bundle(labelled, config=config, warmup_epochs="1", output_dir=str(labelled / "linear_warmup"))
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("error: warmup_epochs=1 with configs/linear_eval.yaml"), last


def test_labels_beyond_num_classes_stop_with_the_file_name(labelled):
    result = run_bundle(labelled, num_classes="1", output_dir=str(labelled / "bad"))
    assert result.returncode != 0
    assert "labelsTr/case_" in result.stderr and "num_classes" in result.stderr


def test_missing_pretrained_file_is_named(labelled):
    result = run_bundle(labelled, pretrained_ckpt=str(labelled / "nowhere.pt"), output_dir=str(labelled / "bad2"))
    assert result.returncode != 0
    assert "nowhere.pt" in result.stderr
