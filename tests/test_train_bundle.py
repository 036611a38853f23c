"""End to end: fine-tuning and linear evaluation on tiny labelled volumes, in this process as `python -m monai.bundle
run` runs them; in the slow tier, through the command line itself."""

import json
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import ROOT, monai_bundle_run, run_workflow
from scripts.networks.fpn3d import FPN3d
from scripts.networks.segmentation import segmentation_network

TRAIN = {
    "patch_size": [16, 16, 8],
    "base_channels": 4,
    "num_scales": 3,
    "num_classes": 2,
    "num_folds": 5,
    "epochs": 2,
    "epoch_length": 2,
    "val_interval": 1,
    "volumes_per_batch": 2,
    "num_workers": 0,
    "progress": False,
}
TINY = {key: str(value).replace(" ", "") for key, value in TRAIN.items()}  # as typed on the command line
LINEAR = ["configs/train.yaml", "configs/linear_eval.yaml"]


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
    """``python -m monai.bundle run`` with the tiny keys and this folder's data, outputs and root."""
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "out", "bundle_root": tmp}
    return monai_bundle_run(None, config, {**TINY, **paths, **keys}, *extra)


def train(tmp: Path, configs="configs/train.yaml", tracking: str | None = None, **keys):
    """The tiny training in this process with this folder's data, outputs and root."""
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "out", "bundle_root": tmp}
    return run_workflow(None, configs, tracking=tracking, **{**TRAIN, **paths, **keys})


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("train")
    write_cases(tmp / "data")
    torch.manual_seed(0)
    torch.save(FPN3d(1, 4, 3).state_dict(), tmp / "backbone.pt")
    return tmp


def trained_model(path: Path):
    net = segmentation_network(2, 4, 3)
    net.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return net


def test_fine_tuning_freezes_the_backbone_for_the_warm_up_then_trains_it(labelled):
    # validating only after epoch 2 makes model.pt (the best validation checkpoint) hold the post-warm-up weights
    checkpoint = str(labelled / "backbone.pt")
    log = train(labelled, tracking="mlflow", pretrained_ckpt=checkpoint, warmup_epochs=1, val_interval=2).log
    assert "epochs 1-1: backbone frozen" in log and "epoch 2: backbone unfrozen" in log
    pretrained = torch.load(labelled / "backbone.pt", weights_only=True)
    tuned = trained_model(labelled / "out/model.pt").backbone.state_dict()
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
    train(labelled, LINEAR, pretrained_ckpt=str(labelled / "backbone.pt"), output_dir=str(labelled / "linear"))
    pretrained = torch.load(labelled / "backbone.pt", weights_only=True)
    probed = trained_model(labelled / "linear/model.pt")
    for key, value in probed.backbone.state_dict().items():
        assert torch.equal(value, pretrained[key]), key


@pytest.mark.slow
@pytest.mark.parametrize("configs", ["configs/train.yaml", str(LINEAR).replace(" ", "")])
def test_command_line_fine_tunes_and_probes(tmp_path, configs):
    """The command line's smoke test of fine-tuning (with a warm-up) and of linear evaluation."""
    write_cases(tmp_path / "data")
    torch.save(FPN3d(1, 4, 3).state_dict(), tmp_path / "backbone.pt")
    keys = {"pretrained_ckpt": tmp_path / "backbone.pt", "epochs": "1"}
    result = run_bundle(tmp_path, config=configs, **keys, **({} if "linear" in configs else {"warmup_epochs": "1"}))
    assert result.returncode == 0, result.stderr[-4000:]
    assert "backbone frozen" in result.stdout
    assert sorted(p.name for p in (tmp_path / "out").glob("model.*")) == ["model.json", "model.pt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["backbone.pt", "data", "out"], "nothing beside the run"


def test_patches_are_class_balanced_from_labelled_volumes_cached_in_memory(tmp_path):
    from monai.bundle import ConfigParser
    from monai.utils import set_determinism

    # One volume: a large organ (class 1, 16 x 16 x 8 voxels) and a tiny one (class 2, 2 x 2 x 2) far apart.
    shape, affine = (48, 48, 24), np.diag([1.5, 1.5, 1.5, 1.0])
    image = np.zeros(shape, np.float32)
    image[2:-2, 2:-2, 2:-2] = 300 + 50 * np.random.default_rng(0).random((44, 44, 20))
    label = np.zeros(shape, np.uint8)
    label[6:22, 6:22, 4:12], label[38:40, 38:40, 16:18] = 1, 2
    (tmp_path / "data").mkdir()
    for name in ("training", "test"):
        nib.save(nib.Nifti1Image(image, affine), tmp_path / f"data/{name}_img.nii.gz")
        nib.save(nib.Nifti1Image(label, affine), tmp_path / f"data/{name}_lab.nii.gz")
    datalist = {k: [{"image": f"{k}_img.nii.gz", "label": f"{k}_lab.nii.gz"}] for k in ("training", "test")}
    (tmp_path / "data/dataset.json").write_text(json.dumps(datalist))

    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/train.yaml"))
    keys = {"patch_size": [8, 8, 4], "num_classes": 2, "num_val_cases": 0, "num_workers": 0, "progress": False}
    parser.update({**keys, "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")})
    parser["bundle_root"] = str(tmp_path)
    volumes, patches = parser.get_parsed_content("train#volumes"), parser.get_parsed_content("train#dataset")
    assert volumes[0] is volumes[0], "the deterministic part is computed once and held in memory"
    assert volumes[0]["label"].dtype == torch.uint8

    set_determinism(seed=0)
    draws = [patch["label"] for _ in range(200) for patch in patches[0]]  # (2, 8, 8, 4) foreground channels each
    contains = torch.stack([channels.flatten(1).amax(1) for channels in draws]).mean(0)  # per class
    # Each class is anchored on in 1/4 of the patches (drawn for 1/2 of the volumes, then p = 0.5); by foreground
    # voxels (RandCropByPosNegLabeld) the tiny organ would get 8 / 2056 of the foreground half, under 1% of them.
    assert contains[1] > 0.18, f"tiny organ in {contains[1]:.1%} of the patches"
    assert contains[1] > 0.5 * contains[0], f"large organ {contains[0]:.1%}, tiny organ {contains[1]:.1%}"
    # A box is uniform among those holding the anchor voxel, so the tiny organ lies anywhere in the patch; a box
    # centred on one of its 8 voxels (RandCropByLabelClassesd: 12 places here, with background-centred boxes) does not.
    places = {tuple(torch.nonzero(channels[1])[0].tolist()) for channels in draws if channels[1].any()}
    assert len(places) > 30, f"the tiny organ at {len(places)} places in the patches"
