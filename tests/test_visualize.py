"""scripts.visualize: a PNG of the image, per-level PCA and query similarity, one column group per backbone."""

import json

import matplotlib.image
import nibabel as nib
import numpy as np
import pytest
import torch
from scripts import visualize
from scripts.engine.handlers import ExportBackbone
from scripts.networks.backbones import MonaiBackbone
from scripts.networks.fpn3d import FPN3d
from scripts.utils.errors import BundleError

# Tiny MONAI backbones: SegResNet's levels at strides 1, 2, 4; UNet's at 2, 4 (it has no full-resolution level).
MONAI = {
    "segresnet": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    "unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
}


@pytest.fixture
def inputs(tmp_path):
    """Two backbones of different architectures (plain state dicts: read from their tensor shapes) and a 24^3 body."""
    torch.manual_seed(0)
    torch.save(FPN3d(1, 4, 2).state_dict(), tmp_path / "small.pt")
    torch.save(FPN3d(1, 4, 3).state_dict(), tmp_path / "deeper.pt")
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, 24)] * 3, indexing="ij"))
    body = (grid**2).sum(0) < 0.7
    image = np.where(body, 300 + 100 * (grid[0] > 0) + 20 * np.random.default_rng(0).random(body.shape), 0)
    nib.save(nib.Nifti1Image(image.astype(np.float32), np.diag([1.5, 1.5, 1.5, 1.0])), tmp_path / "image.nii.gz")
    return tmp_path


def test_writes_one_column_group_per_backbone_with_a_row_per_level(inputs):
    output = inputs / "out/view.png"
    argv = ["--backbone", str(inputs / "small.pt"), str(inputs / "deeper.pt"), "--image", str(inputs / "image.nii.gz")]
    visualize.main([*argv, "--voxel", "12", "10", "12", "--crop", "16", "16", "16", "--output", str(output)])
    rows, columns = 2 + 3, 2 * 3  # image, 3 levels of the deeper backbone, similarity; 3 views per backbone
    height, width = matplotlib.image.imread(output).shape[:2]
    assert (width, height) == (
        round(columns * visualize.PANEL_INCHES * visualize.DPI),
        round((rows * visualize.PANEL_INCHES + 0.4) * visualize.DPI),
    )


def test_similarity_is_one_at_the_query_and_pca_is_rgb_in_range(inputs):
    column = visualize.column(str(inputs / "deeper.pt"), str(inputs / "image.nii.gz"), None, (16, 16, 16), "mri")
    assert column["image"].shape == (16, 16, 16) and len(column["levels"]) == 3
    assert all(rgb.shape == (16, 16, 16, 3) and rgb.min() >= 0 and rgb.max() <= 1 for rgb in column["levels"])
    x, y, z = column["voxel"]
    assert column["similarity"][x, y, z] == pytest.approx(1.0, abs=1e-5)
    assert column["similarity"].min() >= -1 - 1e-5


def test_a_file_without_a_backbone_is_named(inputs):
    torch.save({"head.weight": torch.zeros(2)}, inputs / "head.pt")
    with pytest.raises(BundleError, match="head.pt"):
        visualize.load(inputs / "head.pt")
    (inputs / "head.json").write_text('{"kind": "backbone", "backbone": "vnet"}')
    with pytest.raises(BundleError, match="head.pt: its sidecar names backbone 'vnet'"):
        visualize.load(inputs / "head.pt")


def _export(folder, name):
    """A MONAI backbone's weight file and sidecar, written by the handler that ends pretraining."""
    torch.manual_seed(0)
    path = folder / f"{name}.pt"
    ExportBackbone(MonaiBackbone(name, MONAI[name]), str(path), {"modality": "mri", "method": "dhr"})(None)
    return path


@pytest.mark.parametrize("name", MONAI)
def test_draws_a_monai_backbone_from_the_file_pretraining_exports(inputs, name):
    output = inputs / f"{name}.png"
    argv = ["--backbone", str(_export(inputs, name)), "--image", str(inputs / "image.nii.gz"), "--output", str(output)]
    visualize.main([*argv, "--crop", "16", "16", "16"])
    rows = 2 + len(MonaiBackbone(name, MONAI[name]).out_channels)
    height, width = matplotlib.image.imread(output).shape[:2]
    assert (width, height) == (
        round(3 * visualize.PANEL_INCHES * visualize.DPI),
        round((rows * visualize.PANEL_INCHES + 0.4) * visualize.DPI),
    )


def test_unet_levels_without_a_full_resolution_level_fill_the_window(inputs):
    column = visualize.column(str(_export(inputs, "unet")), str(inputs / "image.nii.gz"), None, (16, 16, 8), "mri")
    assert column["strides"] == [2, 4] and column["name"].endswith("UNet, mri")
    assert all(rgb.shape == (16, 16, 8, 3) for rgb in column["levels"])
    x, y, z = column["voxel"]
    assert column["similarity"].shape == (16, 16, 8)
    assert column["similarity"][x, y, z] == pytest.approx(1.0, abs=1e-5)


def test_a_monai_file_that_does_not_fit_its_sidecar_is_named_with_the_option_that_gave_it(inputs):
    path = _export(inputs, "unet")
    sidecar = json.loads((inputs / "unet.json").read_text())
    sidecar["backbone_args"] = {**sidecar["backbone_args"], "channels": [8, 16, 32]}  # not the file's widths
    (inputs / "unet.json").write_text(json.dumps(sidecar))
    with pytest.raises(BundleError, match=r"^--backbone .*unet\.pt does not fit unet"):
        visualize.load(path)


def test_a_crop_the_monai_backbone_cannot_embed_is_refused_naming_the_option(inputs):
    with pytest.raises(BundleError, match=r"--crop 18 16 12 does not fit UNet: .* give --crop 16 16 12"):
        visualize.column(str(_export(inputs, "unet")), str(inputs / "image.nii.gz"), None, (18, 16, 12), "mri")


def test_similarity_reads_each_level_at_its_stride():
    """A UNet-like pyramid on an 8^3 input: levels at strides 2 and 4, no full-resolution level."""
    torch.manual_seed(0)
    pyramid, query = [torch.randn(6, 4, 4, 4), torch.randn(6, 2, 2, 2)], (5, 2, 7)
    sim = visualize.similarity(pyramid, [2, 4], query, (8, 8, 8))
    assert sim.shape == (8, 8, 8)
    assert sim[query] == pytest.approx(1.0, abs=1e-5)
    assert sim[4, 3, 6] == pytest.approx(1.0, abs=1e-5)  # the same cell at both strides: (2, 1, 3) and (1, 0, 1)
    assert sim[3, 2, 7] < 1 - 1e-3  # another stride-2 cell
