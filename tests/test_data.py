import json
import logging
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy import ndimage
from scripts.data.preprocessing import PRESETS, BodyMaskd, load_datalist, preprocessing

# LPS-oriented, anisotropic input grid: preprocessing must reorient and resample it.
SPACING = (0.8, 0.8, 3.0)
AFFINE = np.diag([-SPACING[0], -SPACING[1], SPACING[2], 1.0])
AFFINE[:3, 3] = (20.0, 15.0, -10.0)


def _save(array: np.ndarray, path: Path, affine: np.ndarray = AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _phantom(shape=(60, 50, 10)) -> tuple[np.ndarray, np.ndarray]:
    """A CT-like (HU) elliptic body with a bone and a dark lung inside, air around; label 1 body, 2 lung."""
    x, y = np.meshgrid(*(np.linspace(-1, 1, n) for n in shape[:2]), indexing="ij")
    body = (x / 0.6) ** 2 + (y / 0.5) ** 2 < 1
    lung = ((x - 0.2) / 0.2) ** 2 + (y / 0.2) ** 2 < 1
    hu = np.where(body, 40.0, -1000.0)
    hu = np.where(lung, -850.0, hu)
    hu = np.where(((x + 0.3) / 0.1) ** 2 + (y / 0.1) ** 2 < 1, 700.0, hu)
    label = body.astype(np.uint8) + lung
    return np.repeat(hu[..., None], shape[2], -1).astype(np.float32), np.repeat(label[..., None], shape[2], -1)


def _case(tmp_path: Path, name: str = "case") -> dict:
    hu, label = _phantom()
    return {
        "image": _save(hu, tmp_path / f"{name}_image.nii.gz"),
        "label": _save(label, tmp_path / f"{name}_label.nii.gz"),
    }


# load_datalist


def test_datalist_from_json_resolves_relative_paths(tmp_path):
    for name in ("img/a.nii.gz", "lbl/a.nii.gz", "img/b.nii.gz"):
        _save(np.zeros((2, 2, 2), np.float32), tmp_path / "ds" / name)
    listing = {
        "training": [{"image": "img/a.nii.gz", "label": "./lbl/a.nii.gz"}],
        "validation": [{"image": "img/b.nii.gz"}],
    }
    (tmp_path / "ds" / "list.json").write_text(json.dumps(listing))
    items = load_datalist(str(tmp_path / "ds" / "list.json"))
    assert items == [{"image": str(tmp_path / "ds/img/a.nii.gz"), "label": str(tmp_path / "ds/lbl/a.nii.gz")}]
    assert load_datalist(tmp_path / "ds" / "list.json", key="validation") == [
        {"image": str(tmp_path / "ds/img/b.nii.gz")}
    ]
    # A folder with dataset.json reads the JSON rather than scanning for NIfTI files.
    (tmp_path / "ds" / "list.json").rename(tmp_path / "ds" / "dataset.json")
    assert load_datalist(str(tmp_path / "ds")) == items


def test_datalist_from_nifti_folder_is_recursive_and_sorted(tmp_path):
    for name in ("b.nii.gz", "sub/a.nii", "sub/deeper/c.nii.gz", "notes.txt", "d.nii.gz.bak"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    expected = sorted(str(tmp_path / n) for n in ("b.nii.gz", "sub/a.nii", "sub/deeper/c.nii.gz"))
    assert load_datalist(str(tmp_path)) == [{"image": e} for e in expected]


def test_datalist_from_nifti_folder_follows_links_without_looping(tmp_path, caplog):
    dataset, elsewhere = tmp_path / "dataset", tmp_path / "elsewhere"
    for name in ("dataset/own.nii.gz", "elsewhere/sub/linked.nii", "elsewhere/file.nii.gz"):
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).touch()
    (dataset / "more").symlink_to(elsewhere / "sub", target_is_directory=True)
    (dataset / "loop").symlink_to(dataset, target_is_directory=True)  # a link to an ancestor
    (dataset / "file.nii.gz").symlink_to(elsewhere / "file.nii.gz")
    (dataset / "broken.nii.gz").symlink_to(tmp_path / "deleted.nii.gz")
    caplog.set_level(logging.INFO, logger="scripts")
    expected = [str(dataset / n) for n in ("file.nii.gz", "more/linked.nii", "own.nii.gz")]
    assert load_datalist(dataset) == [{"image": e} for e in expected]
    assert f"found 3 volumes in {dataset} (left out 1 broken link(s): {dataset / 'broken.nii.gz'})" in caplog.messages


def test_datalist_errors_name_the_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=re.escape(str(missing))):
        load_datalist(str(missing))
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "readme.txt").touch()
    with pytest.raises(FileNotFoundError, match=re.escape(str(empty))):
        load_datalist(str(empty))
    no_key = tmp_path / "no_key.json"
    no_key.write_text(json.dumps({"training": [{"image": "a.nii.gz"}]}))
    with pytest.raises(ValueError, match=rf"{re.escape(str(no_key))}.*'validation'"):
        load_datalist(str(no_key), key="validation")
    broken = tmp_path / "broken.json"
    broken.write_text("{not json")
    with pytest.raises(ValueError, match=re.escape(str(broken))):
        load_datalist(str(broken))
    listed = tmp_path / "listed.json"
    listed.write_text(json.dumps({"training": [{"image": "gone.nii.gz"}]}))
    with pytest.raises(FileNotFoundError, match=re.escape(str(tmp_path / "gone.nii.gz"))):
        load_datalist(str(listed))


# BodyMaskd


def test_body_mask_keeps_enclosed_dark_regions_and_drops_air():
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in (40, 40, 12)), indexing="ij")
    body = (x / 0.8) ** 2 + (y / 0.6) ** 2 < 1
    lung = ((x - 0.3) / 0.2) ** 2 + (y / 0.2) ** 2 + (z / 0.5) ** 2 < 1  # enclosed in 3D
    tube = ((x + 0.3) / 0.15) ** 2 + (y / 0.15) ** 2 < 1  # runs through both z faces, enclosed in-plane
    image = np.where(body, 0.8, 0.0)
    image[lung | tube] = 0.05
    # In slice 0 the tube opens to the air: only that slice's part becomes air (in-plane connectivity only).
    channel = (np.abs(y) < 0.05) & (x < -0.3) & (z == z.min())
    image[channel] = 0.0
    img = MetaTensor(torch.from_numpy(image[None]).float(), affine=torch.diag(torch.tensor([2.0, 2.0, 3.0, 1.0])))

    out = BodyMaskd("image")({"image": img})["body"]

    assert isinstance(out, MetaTensor) and out.dtype == torch.uint8 and out.shape == img.shape
    assert torch.equal(out.affine, img.affine)
    mask = out[0].numpy().astype(bool)
    expected = body & ~channel
    expected[..., 0] &= ~tube[..., 0]
    assert np.array_equal(mask, expected)


# preprocessing


@pytest.mark.parametrize("modality", ["ct", "mri"])
def test_preprocessing_reorients_resamples_scales_and_crops(tmp_path, modality):
    case = _case(tmp_path)
    out = preprocessing(modality, patch_size=(8, 8, 4), label_key="label")(case)
    image, body, label = out["image"], out["body"], out["label"]

    assert nib.aff2axcodes(image.affine.numpy()) == ("R", "A", "S")
    assert np.allclose(image.pixdim, PRESETS[modality]["pixdim"])
    assert image.dtype == torch.float32 and image.min() == 0 and image.max() == pytest.approx(1)  # bone clipped
    if modality == "ct":  # soft tissue (40 HU) in the [-175, 250] HU window
        assert np.median(image[label == 1]) == pytest.approx(215 / 425)
    assert image.shape == body.shape == label.shape and torch.equal(image.affine, label.affine)
    # Cropped to the body's bounding box: the body reaches every face; the lung is inside the body.
    mask = body[0].numpy().astype(bool)
    for axis in range(3):
        profile = mask.any(axis=tuple(a for a in range(3) if a != axis))
        assert profile[0] and profile[-1]
    # The body follows the phantom's outline up to one voxel of partial volume, lung included.
    inside = label[0].numpy() > 0
    assert mask[ndimage.binary_erosion(inside)].all() and not mask[~ndimage.binary_dilation(inside)].any()
    # The physical extent survives the resampling: 48 x 40 mm ellipse axes of 0.6 and 0.5 of the field of view.
    assert np.allclose(np.array(mask.shape[:2]) * image.pixdim[:2].numpy(), (28.8, 20.0), atol=3)


def test_preprocessing_pads_small_volumes_and_keeps_world_positions(tmp_path):
    case = _case(tmp_path)
    out = preprocessing("ct", patch_size=(64, 64, 32), label_key="label")(case)
    assert out["image"].shape == out["body"].shape == out["label"].shape == (1, 64, 64, 32)
    # The lung's centre stays at the same world position through orientation, spacing, crop and pad.
    source = nib.load(case["label"])
    lung = np.argwhere(np.asarray(source.dataobj) == 2).mean(0)
    lung_out = np.argwhere(out["label"][0].numpy() == 2).mean(0)
    world_in = source.affine @ np.append(lung, 1)
    world_out = out["label"].affine.numpy() @ np.append(lung_out, 1)
    assert np.allclose(world_in, world_out, atol=1.5)


def test_preprocessing_pixdim_overrides_preset(tmp_path):
    out = preprocessing("ct", patch_size=(4, 4, 4), pixdim=(2.0, 2.5, 3.0))(_case(tmp_path))
    assert np.allclose(out["image"].pixdim, (2.0, 2.5, 3.0))


def test_preprocessing_presets_and_unknown_modality():
    assert tuple(PRESETS["ct"]["pixdim"]) == (1.0, 1.0, 2.0) and tuple(PRESETS["mri"]["pixdim"]) == (1.5, 1.5, 1.5)
    with pytest.raises(ValueError, match="modality.*ct.*mri"):
        preprocessing("pet", patch_size=(8, 8, 8))


def test_mri_body_mask_drops_a_bright_speck_in_the_air(tmp_path):
    hu, _ = _phantom()
    clean = preprocessing("mri", patch_size=(8, 8, 4))({"image": _save(hu, tmp_path / "clean.nii.gz")})
    hu[2:4, 2:4, 4:6] = hu.max()  # a bright speck in the corner, far from the body
    out = preprocessing("mri", patch_size=(8, 8, 4))({"image": _save(hu, tmp_path / "speck.nii.gz")})
    # not body, and the crop to the body's bounding box is not stretched to reach it
    assert out["image"].shape == clean["image"].shape
    assert torch.equal(out["body"], clean["body"])


def test_foreground_channels_drop_the_background():
    from scripts.data.preprocessing import ForegroundChannelsd

    label = torch.tensor([0, 1, 2, 2, 0]).view(1, 5, 1, 1)
    out = ForegroundChannelsd("label", num_classes=2)({"label": label})["label"]
    assert out.shape == (2, 5, 1, 1) and out.dtype == torch.float32
    assert out[:, :, 0, 0].tolist() == [[0, 1, 0, 0, 0], [0, 0, 1, 1, 0]]
