"""configs/inference.json: masks on the input's grid, monai.bundle.load, verify_net_in_out, TorchScript."""

import json
import re
import shutil
from pathlib import Path

import jsonschema
import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import ROOT, monai_bundle_run, run_workflow
from monai.bundle import ConfigParser, verify_net_in_out
from scripts.data.inference_inputs import mask_root, segmentation_inputs
from scripts.networks.segmentation import segmentation_network
from scripts.utils.errors import BundleError

SCHEMA = ROOT / "tests" / "schema" / "meta_schema_20240725.json"
# the models here are plain state dicts: their preprocessing is given, as their shapes cannot tell it
TINY = {
    "patch_size": [16, 16, 8],
    "modality": "mri",
    "base_channels": 4,
    "num_scales": 3,
    "num_classes": 2,
    "num_workers": 0,
}
SHAPE = (20, 26, 14)
# Axes permuted and flipped (neither RAS nor axis-aligned with it) and anisotropic: preprocessing reorients and
# resamples to the 1.5 mm MRI preset, so masks only come back onto this grid if the inversion is right.
AFFINE = np.array([[0, -2.0, 0, 30], [-1.2, 0, 0, 20], [0, 0, 3.0, -10], [0, 0, 0, 1]])
# The network_data_format configs/metadata.json needs for the segmentation network (proposed to the bundle's lead).
NETWORK_DATA_FORMAT = {
    "inputs": {
        "image": {
            "type": "image",
            "format": "magnitude",
            "modality": "CT or MR",
            "num_channels": 1,
            "spatial_shape": ["16*n", "16*n", "16*n"],
            "dtype": "float32",
            "value_range": [0, 1],
            "is_patch_data": True,
            "channel_def": {"0": "image"},
        }
    },
    "outputs": {
        "pred": {
            "type": "image",
            "format": "segmentation",
            "num_channels": 3,
            "spatial_shape": ["16*n", "16*n", "16*n"],
            "dtype": "float32",
            "value_range": [],
            "is_patch_data": True,
            "channel_def": {"0": "CSF", "1": "grey matter", "2": "white matter"},
        }
    },
}


def write_images(folder: Path) -> tuple[np.ndarray, np.ndarray]:
    """Two images on the non-RAS grid: an ellipsoid body (300) holding, off-centre, a structure of class 1 (500) around
    a core of class 2 (700), nested so that resampling blurs each boundary only between neighbouring classes. A flipped
    or transposed mask would miss them. Returns the class 1 and class 2 masks."""
    folder.mkdir(parents=True)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    body = (grid**2).sum(0) < 0.9
    distance = (((grid - np.array([0.35, -0.3, 0.15])[:, None, None, None]) / 0.45) ** 2).sum(0)
    core, shell = distance < 0.3, (distance >= 0.3) & (distance < 1)
    image = np.where(body, 300.0, 0.0) + 200 * shell + 400 * core
    nib.save(nib.Nifti1Image(image.astype(np.float32), AFFINE), folder / "first.nii.gz")
    nib.save(nib.Nifti1Image(image.astype(np.int16), AFFINE), folder / "second.nii")  # plain .nii, integer type
    return shell, core


class ThresholdClassifier(torch.nn.Module):
    """Voxel-wise stand-in for the network on [0, 1]-scaled images (700 -> 1.0, 500 -> 0.71, 300 -> 0.43): class 1
    between the midpoints 0.57 and 0.86, class 2 above 0.86."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([40 * torch.minimum(x - 0.57, 0.86 - x), 40 * (x - 0.86)], 1)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("inference")
    blobs = write_images(tmp / "images")
    torch.manual_seed(0)
    torch.save(segmentation_network(2, 4, 3).state_dict(), tmp / "model.pt")
    return tmp, blobs


def check_masks(tmp: Path, out: Path) -> None:
    """Each input's mask is on the input's grid: shape, affine, uint8 labels 0..2."""
    for name in ("first.nii.gz", "second.nii"):
        source = nib.load(tmp / "images" / name)
        mask = nib.load(out / (name.split(".")[0] + "_seg.nii.gz"))
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)
        assert mask.get_data_dtype() == np.uint8
        assert set(np.unique(np.asarray(mask.dataobj))) <= {0, 1, 2}


def test_a_run_writes_masks_with_the_input_shape_and_affine(images, tmp_path):
    tmp, _ = images
    keys = {"dataset_dir": tmp / "images", "output_dir": tmp_path / "out", "model_file": tmp / "model.pt"}
    log = run_workflow(None, "configs/inference.json", **TINY, **keys, bundle_root=tmp_path).log
    assert f"Segmenting 2 images with the trained model {tmp / 'model.pt'}" in log
    assert "from scratch" not in log
    check_masks(tmp, tmp_path / "out")


@pytest.mark.slow
def test_command_line_writes_masks_with_the_input_shape_and_affine(images, tmp_path):
    """The command line's smoke test of inference."""
    tmp, _ = images
    keys = {**TINY, "dataset_dir": tmp / "images", "output_dir": tmp_path / "out", "model_file": tmp / "model.pt"}
    keys = {k: str(v).replace(" ", "") for k, v in {**keys, "bundle_root": tmp_path}.items()}
    result = monai_bundle_run(None, "configs/inference.json", keys)
    assert result.returncode == 0, result.stderr[-4000:]
    assert f"Segmenting 2 images with the trained model {tmp / 'model.pt'}" in result.stdout
    check_masks(tmp, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"], "nothing beside the run's folder"


def test_masks_land_on_the_structures_of_the_input_grid(images, tmp_path):
    tmp, (shell, core) = images
    torch.save(ThresholdClassifier().state_dict(), tmp_path / "empty.pt")  # no parameters: the strict load passes
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/inference.json"))
    parser.update(
        {
            **TINY,
            "dataset_dir": str(tmp / "images"),
            "output_dir": str(tmp_path),
            "model_file": str(tmp_path / "empty.pt"),
            "amp": False,
            "device": "cpu",
            "bundle_root": str(tmp_path),
        }
    )
    parser["network"] = ThresholdClassifier()
    parser.get_parsed_content("evaluator").run()
    mask = np.asarray(nib.load(tmp_path / "first_seg.nii.gz").dataobj)
    for c, blob in ((1, shell), (2, core)):
        dice = 2 * ((mask == c) & blob).sum() / ((mask == c).sum() + blob.sum())
        assert dice > 0.85, f"class {c}: Dice {dice:.3f} with the structure it was predicted from"


def test_same_named_scans_in_two_sub_folders_get_a_mask_each_on_their_own_grid(images, tmp_path):
    tmp, _ = images
    scan = nib.load(tmp / "images" / "first.nii.gz")
    sources = {"a": scan, "b": scan.slicer[2:, :, 3:]}  # another shape and origin
    for folder, source in sources.items():
        (tmp_path / "in" / folder).mkdir(parents=True)
        nib.save(source, tmp_path / "in" / folder / "scan.nii.gz")
    torch.save(ThresholdClassifier().state_dict(), tmp_path / "empty.pt")
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/inference.json"))
    keys = {
        "dataset_dir": str(tmp_path / "in"),
        "output_dir": str(tmp_path / "out"),
        "model_file": str(tmp_path / "empty.pt"),
    }
    parser.update({**TINY, **keys, "amp": False, "device": "cpu", "bundle_root": str(tmp_path)})
    parser["network"] = ThresholdClassifier()
    parser.get_parsed_content("evaluator").run()
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in (tmp_path / "out").rglob("*.nii.gz")) == [
        "a/scan_seg.nii.gz",
        "b/scan_seg.nii.gz",
    ]
    for folder, source in sources.items():
        mask = nib.load(tmp_path / "out" / folder / "scan_seg.nii.gz")
        assert mask.shape == source.shape
        np.testing.assert_allclose(mask.affine, source.affine, atol=1e-5)


def test_inputs_that_would_share_a_mask_are_refused_before_any_is_read(tmp_path):
    for name in ("scans/scan.nii", "scans/scan.nii.gz", "other/x/scan.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()  # not NIfTI: reading one would fail
    out = tmp_path / "out"
    clash = f"{tmp_path / 'scans/scan.nii'} and {tmp_path / 'scans/scan.nii.gz'} -> {out / 'scan_seg.nii.gz'}"
    with pytest.raises(BundleError, match=re.escape(clash)):
        segmentation_inputs(str(tmp_path / "scans"), "test", str(out))
    # a datalist's same-named images in different folders: mirrored below the folder they have in common
    listed = [{"image": "scans/scan.nii.gz"}, {"image": "other/x/scan.nii.gz"}]
    (tmp_path / "list.json").write_text(json.dumps({"test": listed}))
    items = segmentation_inputs(str(tmp_path / "list.json"), "test", str(out))
    assert mask_root(str(tmp_path / "list.json"), items) == str(tmp_path)


def test_bundle_load_returns_network_def_with_the_saved_weights(images, tmp_path):
    tmp, _ = images
    bundle = tmp_path / "dhr_bundle"
    for folder in ("configs", "scripts"):
        shutil.copytree(ROOT / folder, bundle / folder, ignore=shutil.ignore_patterns("__pycache__"))
    (bundle / "models").mkdir()
    shutil.copy(tmp / "model.pt", bundle / "models/model.pt")
    before = sorted(p.name for p in bundle.iterdir())

    import monai.bundle

    net = monai.bundle.load(
        name="dhr_bundle",
        bundle_dir=tmp_path,
        workflow_type="inference",
        device="cpu",
        net_override={"base_channels": 4, "num_scales": 3, "num_classes": 2},
    )
    saved = torch.load(tmp / "model.pt", weights_only=True)
    loaded = net.state_dict()
    assert loaded.keys() == saved.keys()
    for key, value in saved.items():
        assert torch.equal(loaded[key], value), key
    assert sorted(p.name for p in bundle.iterdir()) == before  # loading wrote nothing (no demo data, no outputs)


def test_verify_net_in_out_passes_with_the_proposed_metadata(tmp_path, monkeypatch):
    metadata = json.loads((ROOT / "configs/metadata.json").read_text())
    metadata["network_data_format"] = NETWORK_DATA_FORMAT
    if SCHEMA.is_file():
        jsonschema.validate(metadata, json.loads(SCHEMA.read_text()))
    (tmp_path / "metadata.json").write_text(json.dumps(metadata))
    monkeypatch.chdir(ROOT)
    # What `python -m monai.bundle verify_net_in_out --net_id network_def --meta_file ... --config_file ...` runs;
    # it raises if the output's channels or dtype differ from the metadata. The bundle root is this test's folder:
    # the network is the default one, whatever models/model.pt a user has put in the repository.
    verify_net_in_out(
        net_id="network_def",
        meta_file=str(tmp_path / "metadata.json"),
        config_file="configs/inference.json",
        device="cpu",
        bundle_root=str(tmp_path),
    )


def test_network_def_returns_one_tensor_and_is_scriptable(tmp_path):
    parser = ConfigParser()
    parser.read_config(str(ROOT / "configs/inference.json"))
    parser.update({k: v for k, v in TINY.items() if k in ("base_channels", "num_scales", "num_classes")})
    parser["bundle_root"] = str(tmp_path)  # the default model_file (models/model.pt) is not the repository's
    net = parser.get_parsed_content("network_def").eval()
    x = torch.rand(1, 1, 16, 16, 8)
    with torch.no_grad():
        out = net(x)
        scripted = torch.jit.script(net)(x)
    assert isinstance(out, torch.Tensor) and out.shape == (1, 2, 16, 16, 8)
    torch.testing.assert_close(scripted, out)


def _infer(images: Path, output_dir: Path, model_file: Path, bundle_root: Path):
    keys = {"dataset_dir": images, "output_dir": output_dir, "model_file": model_file, "bundle_root": bundle_root}
    return run_workflow(None, "configs/inference.json", **TINY, **keys)


@pytest.mark.parametrize("output", [".", "masks"])
def test_a_second_run_into_the_input_folder_does_not_segment_its_own_masks(images, tmp_path, output):
    tmp, _ = images
    shutil.copytree(tmp / "images", tmp_path / "images")
    for run in range(2):
        log = _infer(tmp_path / "images", tmp_path / "images" / output, tmp / "model.pt", tmp_path).log
        assert "Segmenting 2 images" in log, f"run {run + 1}"
    written = sorted(p.name for p in (tmp_path / "images" / output).glob("*_seg.nii.gz"))
    assert written == ["first_seg.nii.gz", "second_seg.nii.gz"]
