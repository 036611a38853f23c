"""vox2vec's per-view augmentations (blur or sharpen, noise, random HU window), batched over patches on the batch's
device."""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from scripts.data.preprocessing import PRESETS
from scripts.ssl.local_augmentations import _check_patches

__all__ = ["Vox2VecAugmentations"]


class _Vox2VecParameters(NamedTuple):
    """Per-patch parameters of `Vox2VecAugmentations`, each a tensor on the batch's device with B rows."""

    sigma: torch.Tensor
    """(B,) float64 in-plane Gaussian sigma in voxels of the blur (or of the sharpening's first blur); 0: unfiltered."""
    alpha: torch.Tensor
    """(B,) sharpening strength of a filtered patch; 0: plain blur."""
    noise_sigma: torch.Tensor
    """(B,) standard deviation of the additive Gaussian noise on the [0, 1] data scale; 0: no noise."""
    window: torch.Tensor
    """(B, 2) window (low, high) on the [0, 1] data scale, mapped to [0, 1]; (0, 1) is the identity."""


# Not MONAI's RandGaussianSmooth/RandGaussianSharpen/RandGaussianNoise/ScaleIntensityRange: they draw and filter one
# sample at a time in the data loader's workers; here all views of a batch are augmented at once on the training device.
class Vox2VecAugmentations:
    """
    vox2vec's per-view intensity augmentations (Goncharov et al., MICCAI 2023; REFERENCE.md §2), applied
    independently to every patch of a batch with batched tensor operations on the batch's device. Per patch, in the
    authors' order:

    1. blur or sharpen (probability `blur_or_sharpen_prob`, then one of the two with probability 1/2), in the axial
       (X, Y) plane only, as in the authors' code (with 1 x 1 x 2 mm voxels, sigma in voxels is sigma in mm):

       - blur: Gaussian with sigma uniform in `blur_sigma` voxels;
       - sharpen: the authors' unsharp mask (MONAI's GaussianSharpen form)
         ``b + alpha * (b - blur(b, sharpen_inner_sigma))`` of ``b = blur(x, s)``, s uniform in `sharpen_sigma`
         voxels, alpha uniform in `sharpen_alpha`. The authors' strength (alpha 10 to 30) is the default: much
         stronger than ``x + (x - blur(x))``, and it is what vox2vec was trained with.

       The Gaussian filters are scipy's ``gaussian_filter1d`` (which the authors use) per axis: kernel truncated at
       ``int(4 * sigma + 0.5)`` voxels, half-sample symmetric ("reflect") boundary.
    2. additive Gaussian noise (probability `noise_prob`) with a standard deviation uniform in [0, `noise_sigma_hu`]
       HU, i.e. divided by the 2350 HU of the "ct_wide" scale; for MRI uniform in [0, `mri_noise_sigma`] on the
       [0, 1] scale.
    3. CT only: a random HU window (probability `window_prob`) with low uniform in `window_low_hu` and high uniform
       in `window_high_hu`, else `default_window_hu`; voxels are clipped to the window and the window is scaled to
       [0, 1]. The data represent [-1350, 1000] HU linearly, so the default window [-1350, 1000] is the identity.
       MRI has no window. Both end with a clamp to [0, 1].

    Blur, sharpening and noise are linear, so applying them to the linearly scaled data equals the authors' order
    (filter in HU, then window and scale). The one difference: the "ct_wide" cache was clipped to [-1350, 1000] HU,
    so a blur or sharpen near denser bone or metal sees 1000 HU where the authors' saw the true value.

    Data must be preprocessed with the "ct_wide" preset (`scripts.data.preprocessing.PRESETS`) for CT, or "mri". DHR's
    "ct" preset
    is refused: a cache clipped to [-175, 250] HU cannot be re-windowed to vox2vec's windows.

    All randomness comes from the `generator` passed to the call (default: torch's default generator of the images'
    device), so the same generator state reproduces the output.

    Args:
        modality: "ct_wide" (CT scaled from [-1350, 1000] HU) or "mri" (intensities in [0, 1], no window).
        blur_or_sharpen_prob: probability that a patch is blurred or sharpened (each half of the time).
        blur_sigma: range [low, high) of the blur's sigma in voxels, low > 0.
        noise_prob: probability that a patch gets additive Gaussian noise.
        noise_sigma_hu: CT: maximal standard deviation of the noise in HU.
        window_prob: CT: probability of a random window rather than `default_window_hu`.
        window_low_hu: CT: range [low, high) of the random window's lower bound in HU.
        window_high_hu: CT: range [low, high) of the random window's upper bound in HU.
        default_window_hu: CT: the window (low, high) in HU of the patches not drawn for a random one.
        mri_noise_sigma: MRI: maximal standard deviation of the noise on the [0, 1] scale.
        sharpen_sigma: range [low, high) of the sharpening's first blur sigma in voxels, low > 0.
        sharpen_inner_sigma: sigma in voxels of the blur whose difference the sharpening amplifies, > 0.
        sharpen_alpha: range [low, high) of the sharpening strength alpha, >= 0.
    """

    MODALITIES: tuple[str, ...] = ("ct_wide", "mri")
    """Accepted `modality` values: the presets whose cached [0, 1] data these augmentations can act on."""
    TRUNCATE: float = 4.0
    """Gaussian kernels are cut at this many sigmas (scipy's default)."""

    def __init__(
        self,
        modality: str = "ct_wide",
        blur_or_sharpen_prob: float = 0.5,
        blur_sigma: tuple[float, float] = (0.25, 1.5),
        noise_prob: float = 0.5,
        noise_sigma_hu: float = 30.0,
        window_prob: float = 0.8,
        window_low_hu: tuple[float, float] = (-1350.0, -1000.0),
        window_high_hu: tuple[float, float] = (300.0, 1000.0),
        default_window_hu: tuple[float, float] = (-1350.0, 1000.0),
        mri_noise_sigma: float = 0.03,
        sharpen_sigma: tuple[float, float] = (0.5, 1.0),
        sharpen_inner_sigma: float = 0.5,
        sharpen_alpha: tuple[float, float] = (10.0, 30.0),
    ) -> None:
        if modality == "ct":
            raise ValueError(
                "Vox2VecAugmentations needs CT preprocessed with the 'ct_wide' preset ([-1350, 1000] HU), got "
                "modality='ct' (DHR's [-175, 250] HU, which cannot be re-windowed): use `--modality ct_wide` for "
                "vox2vec on CT."
            )
        if modality not in self.MODALITIES:
            raise ValueError(
                f"Unknown modality={modality!r}: the key `modality` must be 'ct_wide' or 'mri' ('ct' data, clipped "
                "to [-175, 250] HU, cannot be re-windowed: preprocess CT with 'ct_wide')."
            )
        for name, prob in (
            ("blur_or_sharpen_prob", blur_or_sharpen_prob),
            ("noise_prob", noise_prob),
            ("window_prob", window_prob),
        ):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {prob}.")
        for name, (low, high), minimum in (
            ("blur_sigma", blur_sigma, 0.0),
            ("sharpen_sigma", sharpen_sigma, 0.0),
            ("sharpen_alpha", sharpen_alpha, None),
            ("window_low_hu", window_low_hu, None),
            ("window_high_hu", window_high_hu, None),
        ):
            if low > high or (minimum is not None and low <= minimum):
                bound = "" if minimum is None else f" and low > {minimum}"
                raise ValueError(f"{name} must satisfy low <= high{bound}, got {(low, high)}.")
        if sharpen_alpha[0] < 0 or sharpen_inner_sigma <= 0 or noise_sigma_hu < 0 or mri_noise_sigma < 0:
            raise ValueError(
                "sharpen_alpha and the noise sigmas must be >= 0 and sharpen_inner_sigma > 0, got "
                f"{sharpen_alpha}, {noise_sigma_hu}, {mri_noise_sigma} and {sharpen_inner_sigma}."
            )
        if window_low_hu[1] >= window_high_hu[0] or default_window_hu[0] >= default_window_hu[1]:
            raise ValueError(
                "Every window needs low < high: window_low_hu must lie below window_high_hu and default_window_hu "
                f"must be increasing, got {window_low_hu}, {window_high_hu} and {default_window_hu}."
            )
        self.modality = modality
        self.blur_or_sharpen_prob = blur_or_sharpen_prob
        self.blur_sigma = (float(blur_sigma[0]), float(blur_sigma[1]))
        self.sharpen_sigma = (float(sharpen_sigma[0]), float(sharpen_sigma[1]))
        self.sharpen_inner_sigma = float(sharpen_inner_sigma)
        self.max_sigma = max(self.blur_sigma[1], self.sharpen_sigma[1], self.sharpen_inner_sigma)
        self.sharpen_alpha = (float(sharpen_alpha[0]), float(sharpen_alpha[1]))
        self.noise_prob = noise_prob
        self.window_prob = window_prob
        self.window_low_hu = (float(window_low_hu[0]), float(window_low_hu[1]))
        self.window_high_hu = (float(window_high_hu[0]), float(window_high_hu[1]))
        self.default_window_hu = (float(default_window_hu[0]), float(default_window_hu[1]))
        # The [0, 1] data scale in HU: the "ct_wide" preset's clipping range.
        self.data_range_hu = (float(PRESETS["ct_wide"]["a_min"]), float(PRESETS["ct_wide"]["a_max"]))
        span = self.data_range_hu[1] - self.data_range_hu[0]
        self.max_noise_sigma = noise_sigma_hu / span if modality == "ct_wide" else float(mri_noise_sigma)

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """
        Args:
            images: (B, 1, X, Y, Z) floating point patches with intensities in [0, 1], on any device.
            generator: source of every random draw, on the images' device; None: torch's default generator.

        Returns:
            a new plain (B, 1, X, Y, Z) tensor of the same dtype and device; `images` is not modified.
        """
        _check_patches(images)
        return self._apply(images, self._draw(images.shape[0], images.device, generator), generator)

    def _draw(self, batch: int, device: torch.device, generator: torch.Generator | None = None) -> _Vox2VecParameters:
        """Draw every patch's parameters (all of them, whatever is applied, so that one seed gives one draw)."""
        u = torch.rand(batch, 9, device=device, dtype=torch.float64, generator=generator)
        filtered, sharpened = u[:, 0] < self.blur_or_sharpen_prob, u[:, 1] < 0.5
        blur_sigma = self._uniform(self.blur_sigma, u[:, 2])
        sigma = torch.where(sharpened, self._uniform(self.sharpen_sigma, u[:, 2]), blur_sigma) * filtered
        alpha = self._uniform(self.sharpen_alpha, u[:, 3]) * (filtered & sharpened)
        noise_sigma = self.max_noise_sigma * u[:, 5] * (u[:, 4] < self.noise_prob)
        if self.modality == "mri":
            window = torch.tensor([0.0, 1.0], device=device, dtype=torch.float64).expand(batch, 2)
        else:
            drawn = u[:, 6:7] < self.window_prob
            random = torch.stack(
                (self._uniform(self.window_low_hu, u[:, 7]), self._uniform(self.window_high_hu, u[:, 8])), dim=1
            )
            default = torch.tensor(self.default_window_hu, device=device, dtype=torch.float64)
            window_hu = torch.where(drawn, random, default)
            low, high = self.data_range_hu
            window = (window_hu - low) / (high - low)
        return _Vox2VecParameters(sigma, alpha, noise_sigma, window)

    @staticmethod
    def _uniform(bounds: tuple[float, float], u: torch.Tensor) -> torch.Tensor:
        """Map uniform draws `u` in [0, 1) to [bounds[0], bounds[1])."""
        return bounds[0] + (bounds[1] - bounds[0]) * u

    def _apply(
        self, images: torch.Tensor, params: _Vox2VecParameters, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """Augment (B, 1, X, Y, Z) `images` with the given per-patch parameters into a new tensor of their dtype."""
        # Half-precision inputs are augmented in float32: the filters' sums would lose most of their bits.
        work = torch.promote_types(images.dtype, torch.float32)
        window = params.window.to(work).view(-1, 2, 1, 1, 1)
        scale = 1.0 / (window[:, 1:] - window[:, :1])
        # The window's affine map commutes with the blur and the sharpening (their kernels sum to 1) and only scales
        # the noise, so it is applied first, fused with the copy of the input; its clipping must come last.
        out = torch.addcmul(-window[:, :1] * scale, images.as_subclass(torch.Tensor), scale)
        # Every patch is filtered and noised, those not drawn with sigma 0 (an identity filter, no noise): selecting
        # the drawn ones would need their number on the host (a device sync).
        blurred = self._gaussian_blur(out[:, 0], params.sigma)
        inner = params.sigma.new_full(params.sigma.shape, self.sharpen_inner_sigma)
        detail = blurred - self._gaussian_blur(blurred, inner)
        out = blurred.add_(detail.mul_(params.alpha.to(work).view(-1, 1, 1, 1))).unsqueeze(1)
        sigma = params.noise_sigma.to(work).view(-1, 1, 1, 1, 1) * scale
        out.add_(torch.randn(out.shape, dtype=work, device=out.device, generator=generator).mul_(sigma))
        return out.clamp_(0.0, 1.0).to(images.dtype)

    def _gaussian_blur(self, patches: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """
        Blur each patch in the (X, Y) plane with its own Gaussian, as scipy's ``gaussian_filter1d`` along X then Y.

        Each 1D filter is a product with a per-patch (n, n) matrix that holds the kernel and folds in scipy's
        "reflect" boundary (d c b a | a b c d | d c b a): on a CPU, batched matrix products are about 3x faster than a
        grouped conv3d with per-patch kernels or a sum of shifted copies, and need no padded copy. A GPU with TF32
        matmuls enabled computes them to about 1e-3 relative precision (about 1 HU), below the noise augmentation's.

        Args:
            patches: (M, X, Y, Z) floating point patches.
            sigma: (M,) float64 sigmas in voxels, >= 0 (0: the patch unchanged), at most ``max_sigma``.

        Returns:
            a new (M, X, Y, Z) tensor.
        """
        batch, size_x, size_y, _ = patches.shape
        # One kernel width for all patches, the widest that the sigmas' ranges allow (a width read from the drawn
        # sigmas would be a device sync); each kernel is zero beyond its own scipy truncation radius.
        radius = torch.floor(self.TRUNCATE * sigma + 0.5)
        width = math.floor(self.TRUNCATE * self.max_sigma + 0.5)
        offsets = torch.arange(-width, width + 1, device=sigma.device, dtype=torch.float64)
        gauss = torch.exp(-0.5 * (offsets / sigma[:, None].clamp_min(1e-12)) ** 2)  # sigma 0: 1 at 0, else 0
        kernels = gauss * (offsets.abs() <= radius[:, None])
        kernels = kernels / kernels.sum(dim=1, keepdim=True)
        along_x = self._filter_matrices(kernels, size_x).to(patches.dtype)
        out = torch.bmm(along_x, patches.reshape(batch, size_x, -1)).view_as(patches)
        along_y = self._filter_matrices(kernels, size_y).to(patches.dtype)
        # einsum permutes Y to the front for one bmm: 2x faster than matmul broadcasting the matrices over X.
        return torch.einsum("bij,bxjz->bxiz", along_y, out)

    @staticmethod
    def _filter_matrices(kernels: torch.Tensor, size: int) -> torch.Tensor:
        """
        (M, n, n) matrices A with ``(A @ x)[i] = sum_k kernels[:, k] * x[reflect(i + k - K // 2)]`` for signals of
        length n = `size`, from (M, K) odd, centred kernels; reflect is scipy's half-sample symmetric boundary.
        """
        batch, taps = kernels.shape
        index = torch.arange(size, device=kernels.device)[:, None] + torch.arange(taps, device=kernels.device)
        # Modulo the period 2n, so that kernels wider than the signal reflect as often as needed.
        index = (index - taps // 2).remainder(2 * size)
        index = torch.where(index < size, index, 2 * size - 1 - index)
        matrices = kernels.new_zeros(batch, size, size)
        return matrices.scatter_add_(2, index.expand(batch, -1, -1), kernels[:, None, :].expand(-1, size, -1))
