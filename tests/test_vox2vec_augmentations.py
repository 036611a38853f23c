import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scipy.ndimage import gaussian_filter1d
from scripts.data.preprocessing import preprocessing
from scripts.ssl.vox2vec_augmentations import Vox2VecAugmentations

SPATIAL = (24, 20, 6)
SPAN_HU = 2350.0  # the "ct_wide" data scale: [-1350, 1000] HU -> [0, 1]
OFF = {"blur_or_sharpen_prob": 0.0, "noise_prob": 0.0, "window_prob": 0.0}


def to_data(hu: float) -> float:
    """HU -> the [0, 1] scale of "ct_wide" data."""
    return (hu + 1350.0) / SPAN_HU


def high_frequency_energy(images: torch.Tensor) -> torch.Tensor:
    """Mean squared in-plane finite differences per patch (B,)."""
    return sum(torch.diff(images, dim=axis).square().mean(dim=(1, 2, 3, 4)) for axis in (2, 3))


def test_shape_dtype_device_and_input_untouched():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        images = torch.rand(4, 1, *SPATIAL, dtype=dtype)
        before = images.clone()
        out = Vox2VecAugmentations(blur_or_sharpen_prob=1.0, noise_prob=1.0, window_prob=1.0)(images)
        assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
        assert out.data_ptr() != images.data_ptr() and torch.equal(images, before)
        assert not torch.equal(out, images) and out.min() >= 0 and out.max() <= 1
    meta = MetaTensor(torch.rand(2, 1, *SPATIAL))
    assert type(Vox2VecAugmentations()(meta)) is torch.Tensor


@pytest.mark.parametrize("modality", ["ct_wide", "mri"])
def test_everything_off_is_identity(modality):
    # On ct_wide data the default window [-1350, 1000] HU is the identity; MRI never windows, even with window_prob 1.
    images = torch.rand(3, 1, *SPATIAL)
    window_prob = 1.0 if modality == "mri" else 0.0
    out = Vox2VecAugmentations(modality, **{**OFF, "window_prob": window_prob})(images)
    assert torch.equal(out, images)


def test_blur_smooths_noise_and_sharpen_adds_high_frequencies():
    torch.manual_seed(0)
    images = (0.5 + 0.02 * torch.randn(6, 1, *SPATIAL, dtype=torch.float64)).clamp(0, 1)
    aug = Vox2VecAugmentations(**{**OFF, "blur_or_sharpen_prob": 1.0})
    # Sigmas of 1 voxel (blur) and 0.75 voxels with the authors' weakest alpha (sharpen): mid-range draws.
    params = aug._draw(6, images.device)._replace(sigma=torch.full((6,), 1.0, dtype=torch.float64))
    blurred = aug._apply(images, params._replace(alpha=torch.zeros(6, dtype=torch.float64)))
    assert (blurred.var(dim=(1, 2, 3, 4)) < 0.2 * images.var(dim=(1, 2, 3, 4))).all()
    assert torch.allclose(blurred.mean(dim=(1, 2, 3, 4)), images.mean(dim=(1, 2, 3, 4)), atol=1e-3)
    # The authors' sharpening boosts edges at the scale of its blurs (it damps white noise at the finest scale): a
    # smooth edge gets steeper, with the unsharp mask's overshoot on both sides.
    edge = 0.5 + 0.2 * torch.tanh(torch.linspace(-1, 1, SPATIAL[0], dtype=torch.float64) / 0.15)
    edge = edge.view(1, 1, -1, 1, 1).expand(6, 1, *SPATIAL)
    sharp = params._replace(sigma=torch.full((6,), 0.75, dtype=torch.float64), alpha=torch.full((6,), 10.0))
    sharpened = aug._apply(edge, sharp)
    assert (high_frequency_energy(sharpened) > 1.2 * high_frequency_energy(edge)).all()
    assert sharpened.max() > edge.max() + 1e-3 and sharpened.min() < edge.min() - 1e-3


def test_batched_filters_match_scipy_per_patch():
    # A Y side of 3 voxels is shorter than the widest kernel's radius (6): the boundary must reflect repeatedly.
    torch.manual_seed(1)
    images = torch.rand(8, 1, 17, 3, 4, dtype=torch.float64)
    aug = Vox2VecAugmentations(**{**OFF, "blur_or_sharpen_prob": 1.0})
    params = aug._draw(8, images.device)
    out = aug._apply(images, params)
    assert (params.alpha > 0).any() and (params.alpha == 0).any()  # both blurred and sharpened patches

    def blur(x: np.ndarray, sigma: float) -> np.ndarray:  # in-plane, as the authors' code
        return gaussian_filter1d(gaussian_filter1d(x, sigma, axis=0), sigma, axis=1)

    for i, (sigma, alpha) in enumerate(zip(params.sigma.tolist(), params.alpha.tolist(), strict=True)):
        expected = blur(images[i, 0].numpy(), sigma)
        if alpha > 0:
            expected = expected + alpha * (expected - blur(expected, aug.sharpen_inner_sigma))
        assert np.allclose(out[i, 0].numpy(), np.clip(expected, 0, 1), rtol=0, atol=1e-12)


def test_window_maps_its_bounds_to_0_and_1_and_clips():
    values = torch.tensor([-1350.0, -1300.0, -1200.0, -350.0, 500.0, 800.0, 1000.0], dtype=torch.float64)
    images = ((values + 1350.0) / SPAN_HU).view(1, 1, -1, 1, 1)
    aug = Vox2VecAugmentations(**{**OFF, "window_prob": 1.0}, window_low_hu=(-1200, -1200), window_high_hu=(500, 500))
    out = aug(images).flatten()
    assert torch.allclose(out, torch.tensor([0.0, 0.0, 0.0, 0.5, 1.0, 1.0, 1.0], dtype=torch.float64), atol=1e-12)


def test_random_windows_are_drawn_in_their_hu_ranges():
    torch.manual_seed(0)
    params = Vox2VecAugmentations(window_prob=0.5)._draw(2000, torch.device("cpu"))
    window_hu = params.window * SPAN_HU - 1350.0
    default = (window_hu == torch.tensor([-1350.0, 1000.0], dtype=torch.float64)).all(dim=1)
    assert 0.45 < default.float().mean() < 0.55
    low, high = window_hu[~default].unbind(1)
    assert low.min() >= -1350 and low.max() < -1000 and high.min() >= 300 and high.max() < 1000
    assert low.min() < -1340 and low.max() > -1010 and high.min() < 310 and high.max() > 990


@pytest.mark.parametrize("sigma_hu", [10.0, 30.0])
def test_noise_sigma_is_in_hu_before_the_window(sigma_hu):
    torch.manual_seed(0)
    images = torch.full((4, 1, *SPATIAL), to_data(40.0), dtype=torch.float64)
    aug = Vox2VecAugmentations(**{**OFF, "noise_prob": 1.0}, noise_sigma_hu=sigma_hu)
    # The drawn standard deviations are uniform in [0, sigma_hu] HU, on the data scale.
    drawn = aug._draw(2000, images.device).noise_sigma * SPAN_HU
    assert drawn.max() <= sigma_hu and 0.45 * sigma_hu < drawn.mean() < 0.55 * sigma_hu
    # A fixed standard deviation: std(out - in) is sigma_hu / 2350 on the default window, sigma_hu / 1000 on a
    # 1000 HU wide window (noise added in HU, then windowed).
    params = aug._draw(4, images.device)
    fixed = params._replace(noise_sigma=torch.full((4,), sigma_hu / SPAN_HU, dtype=torch.float64))
    noise = aug._apply(images, fixed) - images
    assert torch.allclose(noise.std(dim=(1, 2, 3, 4)), torch.tensor(sigma_hu / SPAN_HU, dtype=torch.float64), rtol=0.05)
    narrow = torch.tensor([to_data(-460.0), to_data(540.0)], dtype=torch.float64).expand(4, 2)
    windowed = aug._apply(images, fixed._replace(window=narrow)).std(dim=(1, 2, 3, 4))
    assert torch.allclose(windowed, torch.tensor(sigma_hu / 1000.0, dtype=torch.float64), rtol=0.05)


def test_mri_noise_on_the_unit_scale():
    torch.manual_seed(0)
    aug = Vox2VecAugmentations("mri", noise_prob=1.0, mri_noise_sigma=0.05)
    drawn = aug._draw(2000, torch.device("cpu")).noise_sigma
    assert drawn.max() <= 0.05 and 0.045 < 2 * drawn.mean() < 0.055


def test_same_seed_same_output_and_patches_independent():
    aug = Vox2VecAugmentations(blur_or_sharpen_prob=1.0, noise_prob=1.0, window_prob=1.0)
    images = torch.rand(1, 1, *SPATIAL).expand(6, -1, -1, -1, -1)
    torch.manual_seed(3)
    first = aug(images)
    torch.manual_seed(3)
    assert torch.equal(aug(images), first)
    assert not torch.equal(aug(images), first)
    # Identical patches get different augmentations.
    assert all(not torch.equal(first[i], first[j]) for i in range(6) for j in range(i))
    # A patch's output does not depend on the other patches of the batch.
    others = torch.rand(6, 1, *SPATIAL)
    torch.manual_seed(3)
    mixed = aug(torch.cat([images[:1], others[1:]]))
    assert torch.equal(mixed[0], first[0])


def test_ct_wide_preset_scales_hu_to_unit_range(tmp_path):
    # Soft tissue everywhere (the body fills the volume, no crop) with blocks of -3000, -1350, 1000 and 3000 HU.
    hu = np.full((16, 16, 4), 40.0, dtype=np.float32)
    for (x, y), value in zip([(3, 3), (9, 3), (3, 9), (9, 9)], [-1350.0, -3000.0, 1000.0, 3000.0], strict=True):
        hu[x : x + 4, y : y + 4] = value
    path = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(hu, np.diag([1.0, 1.0, 2.0, 1.0])), path)
    image = preprocessing("ct_wide", patch_size=(8, 8, 4))({"image": str(path)})["image"][0]
    assert image.shape == (16, 16, 4)
    centres = [image[x + 2, y + 2, 2].item() for x, y in [(3, 3), (9, 3), (3, 9), (9, 9)]]
    assert centres == pytest.approx([0.0, 0.0, 1.0, 1.0], abs=1e-6)
    assert image[0, 0, 0].item() == pytest.approx(to_data(40.0), abs=1e-6)


def test_modality_errors():
    with pytest.raises(ValueError, match="modality.*ct_wide.*mri.*ct"):
        Vox2VecAugmentations("pet")
    with pytest.raises(ValueError, match="--modality ct_wide"):
        Vox2VecAugmentations("ct")


@pytest.mark.parametrize(
    "bad",
    [
        {"noise_prob": 1.5},
        {"blur_sigma": (0.0, 1.0)},
        {"sharpen_sigma": (1.0, 0.5)},
        {"sharpen_alpha": (-1.0, 1.0)},
        {"noise_sigma_hu": -1.0},
        {"window_low_hu": (-1000.0, 400.0)},
        {"default_window_hu": (1000.0, -1350.0)},
    ],
)
def test_invalid_parameters(bad):
    with pytest.raises(ValueError):
        Vox2VecAugmentations(**bad)
