# Not MONAI's RandCoarseShuffle/RandHistogramShift/RandCoarseDropout: they loop per sample on CPU, differ in details.
"""
Per-view augmentations, batched over patches on the batch's device: DHR's local augmentations (local pixel shuffling,
Bezier intensity remap, in-painting) and vox2vec's (blur or sharpen, noise, random HU window).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch

from scripts.data import PRESETS

__all__ = ["LocalAugmentations", "Vox2VecAugmentations", "build_augmentation"]


def _check_patches(images: torch.Tensor) -> None:
    """Both augmentations take a batch of single-channel 3D patches (B, 1, X, Y, Z) of floating point intensities."""
    if images.ndim != 5 or images.shape[1] != 1 or not images.is_floating_point():
        raise ValueError(
            f"images must be a floating point (B, 1, X, Y, Z) tensor, got {images.dtype} {tuple(images.shape)}."
        )


class LocalAugmentations:
    """
    DHR's local augmentations (Kats et al., ISBI 2024), applied independently to every patch of a batch with batched
    tensor operations on the batch's device. Per patch, in this order:

    1. local pixel shuffling (probability `shuffle_prob`): `shuffle_blocks` blocks with side
       ``max(1, patch side // shuffle_block_divisor)`` per axis (6x6x1 voxels for a 128x128x32 patch), each at a
       uniformly random position fully inside the patch; the voxels of each block are permuted randomly.
       Blocks may overlap, as in the reference code; a voxel covered by several blocks keeps the value written by
       one of them, so the patch's multiset of values is preserved only where blocks do not overlap.
    2. non-linear intensity remap (probability `bezier_prob`): a cubic Bezier curve through (0, 0) and (1, 1) with
       two control points uniform in [0, 1]^2, which is a monotone map of [0, 1]. It is tabulated per patch on
       `LUT_SIZE` equally spaced intensities and applied by linear interpolation; inputs are clamped to [0, 1].
    3. in-painting: up to `inpaint_max_boxes` boxes, box k existing only if k independent uniform draws are all below
       `inpaint_box_prob` (a truncated geometric number of boxes); each box has a side per axis of
       ``max(1, floor(u * patch side))`` voxels, u uniform in [inpaint_size[0], inpaint_size[1]), lies uniformly
       fully inside the patch, and its voxels are replaced by uniform noise in [0, 1).

    The shuffling and the remap commute (one moves values within a patch, the other maps every value of the patch by
    the same function), so the remap is done first, fused with the copy of the input.

    For speed, each block's permutation is drawn uniformly from a pool of `PERMUTATION_POOL` random permutations drawn
    afresh at every call: every block's permutation is still uniform over all permutations, but two blocks of a batch
    share one with probability 1 / `PERMUTATION_POOL` (independent argsorts per block cost more than everything else
    together on a CPU). Setting `PERMUTATION_POOL` to 0 draws an independent permutation per block.

    All randomness comes from torch's default generator of the images' device, so `torch.manual_seed` reproduces the
    output where PyTorch runs deterministically (one CPU thread, or `torch.use_deterministic_algorithms(True)`);
    otherwise which of several writes to one voxel stays (overlapping blocks or boxes) may vary between runs.

    Args:
        shuffle_prob: probability that a patch gets local pixel shuffling.
        shuffle_blocks: number of shuffled blocks per patch.
        shuffle_block_divisor: block side per axis is the patch side divided (floor) by this, at least 1 voxel.
        bezier_prob: probability that a patch gets the Bezier intensity remap.
        inpaint_max_boxes: maximal number of in-painted boxes per patch.
        inpaint_box_prob: probability of drawing each further box (given that all earlier ones were drawn).
        inpaint_size: range [low, high) of a box side as a fraction of the patch side, per axis.
    """

    LUT_SIZE: int = 1024
    """Number of equally spaced intensities in [0, 1] at which each patch's Bezier curve is tabulated."""
    CURVE_SAMPLES: int = 4096
    """Number of curve parameters t in [0, 1] sampled to invert x(t) when tabulating the Bezier curve."""
    PERMUTATION_POOL: int = 1024
    """Number of random permutations per call that the shuffling blocks draw from; 0: one per block."""
    CPU_STRIP: int = 1 << 18
    """Voxels (over all patches) remapped at a time on a CPU, so that the temporaries stay in cache."""

    def __init__(
        self,
        shuffle_prob: float = 0.8,
        shuffle_blocks: int = 5000,
        shuffle_block_divisor: int = 20,
        bezier_prob: float = 0.9,
        inpaint_max_boxes: int = 30,
        inpaint_box_prob: float = 0.95,
        inpaint_size: tuple[float, float] = (0.1, 0.2),
    ) -> None:
        for name, prob in (
            ("shuffle_prob", shuffle_prob),
            ("bezier_prob", bezier_prob),
            ("inpaint_box_prob", inpaint_box_prob),
        ):
            if not 0.0 <= prob <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {prob}.")
        if shuffle_blocks < 0 or inpaint_max_boxes < 0:
            raise ValueError(
                f"shuffle_blocks and inpaint_max_boxes must be >= 0, got {shuffle_blocks} and {inpaint_max_boxes}."
            )
        if shuffle_block_divisor < 1:
            raise ValueError(f"shuffle_block_divisor must be >= 1, got {shuffle_block_divisor}.")
        low, high = inpaint_size
        if not 0.0 <= low <= high <= 1.0:
            raise ValueError(f"inpaint_size must satisfy 0 <= low <= high <= 1, got {inpaint_size}.")
        self.shuffle_prob = shuffle_prob
        self.shuffle_blocks = shuffle_blocks
        self.shuffle_block_divisor = shuffle_block_divisor
        self.bezier_prob = bezier_prob
        self.inpaint_max_boxes = inpaint_max_boxes
        self.inpaint_box_prob = inpaint_box_prob
        self.inpaint_size = (float(low), float(high))

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: (B, 1, X, Y, Z) floating point patches with intensities in [0, 1], on any device.

        Returns:
            a new plain (B, 1, X, Y, Z) tensor of the same dtype and device; `images` is not modified.
        """
        _check_patches(images)
        # Plain tensor ops: a subclass (e.g. MetaTensor) would only add overhead to each of the many small ops below.
        images = images.as_subclass(torch.Tensor)
        batch, spatial = images.shape[0], tuple(images.shape[2:])
        out = torch.empty(images.shape, dtype=images.dtype, device=images.device)
        if images.numel() == 0:
            return out
        flat = out.view(batch, -1)
        self._remap_intensities(images.reshape(batch, -1), flat)
        self._shuffle_pixels(flat, spatial)
        self._inpaint(flat, spatial)
        return out

    def _remap_intensities(self, images: torch.Tensor, out: torch.Tensor) -> None:
        """
        Write the Bezier-remapped `images` (B, N) into `out` (B, N), copying the patches not drawn for the remap.
        """
        batch, voxels = images.shape
        device = images.device
        drawn = torch.rand(batch, device=device) < self.bezier_prob
        skipped = torch.nonzero(~drawn).squeeze(1)
        if skipped.numel() == batch:
            out.copy_(images)
            return
        size = self.LUT_SIZE
        # Half-precision types cannot hold table positions up to LUT_SIZE - 1 exactly: compute those in float32.
        work = torch.promote_types(images.dtype, torch.float32)
        control = torch.rand(batch, 2, 2, device=device, dtype=torch.float64)
        values, slopes = self._bezier_tables(control, work)
        table_start = torch.arange(0, batch * size, size, dtype=torch.int32, device=device).unsqueeze(1)
        # On a CPU, strips of voxels (of all patches) keep the temporaries in cache: about 2x faster than one pass
        # over the batch, whose 4-byte temporaries of the batch's size are allocated afresh (page faults) each call.
        strip = max(1, self.CPU_STRIP // batch) if device.type == "cpu" else voxels
        for first in range(0, voxels, strip):
            # Every patch is remapped (fewer passes than gathering the drawn ones); skipped ones are restored below.
            target = out[:, first : first + strip]
            pos = images[:, first : first + strip].to(work)
            pos = torch.clamp(pos, 0.0, 1.0, out=target if work == target.dtype else None)
            pos.mul_(size - 1)  # intensity in table steps: integer part = table entry, fraction = weight
            index = pos.to(torch.int32).add_(table_start).view(-1)
            pos.frac_().mul_(slopes.index_select(0, index).view_as(pos))
            pos.add_(values.index_select(0, index).view_as(pos))
            if pos is not target:
                target.copy_(pos)
        if skipped.numel() > 0:
            out.index_copy_(0, skipped, images.index_select(0, skipped))

    def _bezier_tables(self, control: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """
        Tabulate per patch the cubic Bezier curve with end points (0, 0), (1, 1) and the given control points, on
        `LUT_SIZE` equally spaced intensities.

        Args:
            control: (B, 2, 2) control points in [0, 1]^2, indexed (patch, point, x / y), float64.
            dtype: dtype of the returned tables.

        Returns:
            values and slopes, each flattened (B * LUT_SIZE,): the curve at intensity i / (LUT_SIZE - 1) of patch b is
            ``values[b * LUT_SIZE + i]``, and ``slopes`` holds the difference to the next entry (0 for the last one).
        """
        batch, device = control.shape[0], control.device
        # Float64 so that the sampled x(t), y(t) stay monotone where the curve is nearly flat.
        t = torch.linspace(0.0, 1.0, self.CURVE_SAMPLES, device=device, dtype=torch.float64)
        # Bernstein weights of the two control points; the end points (0, 0) and (1, 1) add t^3.
        weights = torch.stack((3 * (1 - t) ** 2 * t, 3 * (1 - t) * t**2))
        curve = torch.einsum("bpc,pt->bct", control, weights) + t**3  # (B, 2, T): x(t), y(t)
        # With end points (0, 0), (1, 1) and control points in [0, 1]^2, x(t) and y(t) are non-decreasing in t;
        # cummax only removes rounding noise so that searchsorted gets sorted input.
        curve = torch.cummax(curve, dim=2).values
        x, y = curve[:, 0].contiguous(), curve[:, 1]
        grid = torch.linspace(0.0, 1.0, self.LUT_SIZE, device=device, dtype=torch.float64).expand(batch, -1)
        right = torch.searchsorted(x, grid.contiguous()).clamp_(1, self.CURVE_SAMPLES - 1)
        left = right - 1
        x0, x1 = x.gather(1, left), x.gather(1, right)
        weight = ((grid - x0) / (x1 - x0).clamp_min(torch.finfo(torch.float64).tiny)).clamp_(0.0, 1.0)
        values = torch.lerp(y.gather(1, left), y.gather(1, right), weight)
        slopes = torch.diff(values, dim=1, append=values[:, -1:])
        return values.to(dtype).view(-1), slopes.to(dtype).view(-1)

    def _shuffle_pixels(self, out: torch.Tensor, spatial: tuple[int, int, int]) -> None:
        """Permute the voxels of random blocks within each drawn patch of `out` (B, N), in place."""
        batch, device = out.shape[0], out.device
        drawn = torch.nonzero(torch.rand(batch, device=device) < self.shuffle_prob).squeeze(1)
        count = self.shuffle_blocks
        if drawn.numel() == 0 or count == 0:
            return
        block = [max(1, side // self.shuffle_block_divisor) for side in spatial]
        strides = (spatial[1] * spatial[2], spatial[2], 1)
        # int32 where the batch allows: the sort and the gather are faster; index_copy_ needs int64.
        dtype = torch.int32 if out.numel() < 2**31 else torch.int64
        # Flat index of every block's first voxel in the whole (B, N) batch.
        start = (drawn.to(dtype) * out.shape[1]).unsqueeze(1).expand(-1, count).clone()
        for side, size, stride in zip(spatial, block, strides, strict=True):
            start += torch.randint(0, side - size + 1, (drawn.numel(), count), device=device, dtype=dtype) * stride
        # Visiting the blocks in memory order makes the gather and scatter below several times faster on a CPU.
        start = start.view(-1).sort().values
        offsets = self._block_offsets(block, strides, device)
        blocks, volume = start.numel(), offsets.numel()
        # Block i (in memory order) takes permutation i % pool; the pool is drawn afresh, so each block's
        # permutation is uniform. Padding `start` to whole rows of the pool lets one broadcast build the indices.
        pool = self.PERMUTATION_POOL if 0 < self.PERMUTATION_POOL < blocks else blocks
        rows = -(-blocks // pool)
        permuted = offsets[torch.rand(pool, volume, device=device).argsort(dim=1)].to(dtype)
        padded = torch.nn.functional.pad(start, (0, rows * pool - blocks))
        source = (padded.view(rows, pool, 1) + permuted).view(-1)[: blocks * volume]
        flat = out.view(-1)
        shuffled = flat.index_select(0, source)
        flat.index_copy_(0, (start.long().unsqueeze(1) + offsets).view(-1), shuffled)

    @staticmethod
    def _block_offsets(block: list[int], strides: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Flat offsets (prod(block),) of a block's voxels from its first voxel, int64."""
        axes = [torch.arange(size, device=device) * stride for size, stride in zip(block, strides, strict=True)]
        return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]).view(-1)

    def _sample_boxes(
        self, batch: int, spatial: tuple[int, int, int], device: torch.device
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Draw the in-painting boxes.

        Returns:
            start (B, K, 3) and size (B, K, 3) in voxels per axis, and present (B, K) bool, K = `inpaint_max_boxes`.
        """
        count = self.inpaint_max_boxes
        present = torch.cummin((torch.rand(batch, count, device=device) < self.inpaint_box_prob).int(), dim=1)
        side = torch.tensor(spatial, device=device)
        low, high = self.inpaint_size
        fraction = low + (high - low) * torch.rand(batch, count, 3, device=device, dtype=torch.float64)
        size = torch.minimum((fraction * side).long().clamp_(min=1), side)
        start = (torch.rand(batch, count, 3, device=device, dtype=torch.float64) * (side - size + 1)).long()
        return torch.minimum(start, side - size), size, present.values.bool()

    def _inpaint(self, out: torch.Tensor, spatial: tuple[int, int, int]) -> None:
        """Fill random boxes of every patch of `out` (B, N) with uniform noise, in place."""
        if self.inpaint_max_boxes == 0:
            return
        start, size, present = self._sample_boxes(out.shape[0], spatial, out.device)
        patch, box = torch.nonzero(present, as_tuple=True)
        if patch.numel() == 0:
            return
        start, size = start[patch, box], size[patch, box]  # (M, 3) for the M present boxes
        # Each box is enumerated on the grid of the largest possible box and the voxels beyond its own size are
        # dropped: cheaper than a dense (B, X, Y, Z) union mask, since the boxes cover a few percent of the batch.
        strides = (spatial[1] * spatial[2], spatial[2], 1)
        coords, inside = [], []
        for axis, (side, stride) in enumerate(zip(spatial, strides, strict=True)):
            step = torch.arange(min(side, max(1, math.ceil(self.inpaint_size[1] * side))), device=out.device)
            coords.append((start[:, axis, None] + step) * stride)
            inside.append(step < size[:, axis, None])
        coords[0] += (patch * out.shape[1]).unsqueeze(1)
        index = coords[0][:, :, None, None] + coords[1][:, None, :, None] + coords[2][:, None, None, :]
        inside = inside[0][:, :, None, None] & inside[1][:, None, :, None] & inside[2][:, None, None, :]
        index = index.masked_select(inside)
        # Overlapping boxes write one voxel more than once; every write is uniform noise, so any one may stay.
        out.view(-1).index_copy_(0, index, torch.rand(index.numel(), dtype=out.dtype, device=out.device))


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

    Data must be preprocessed with the "ct_wide" preset (`scripts.data.PRESETS`) for CT, or "mri". DHR's "ct" preset
    is refused: a cache clipped to [-175, 250] HU cannot be re-windowed to vox2vec's windows.

    All randomness comes from torch's default generator of the images' device, so `torch.manual_seed` reproduces the
    output.

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

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """
        Args:
            images: (B, 1, X, Y, Z) floating point patches with intensities in [0, 1], on any device.

        Returns:
            a new plain (B, 1, X, Y, Z) tensor of the same dtype and device; `images` is not modified.
        """
        _check_patches(images)
        return self._apply(images, self._draw(images.shape[0], images.device))

    def _draw(self, batch: int, device: torch.device) -> _Vox2VecParameters:
        """Draw every patch's parameters (all of them, whatever is applied, so that one seed gives one draw)."""
        u = torch.rand(batch, 9, device=device, dtype=torch.float64)
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

    def _apply(self, images: torch.Tensor, params: _Vox2VecParameters) -> torch.Tensor:
        """Augment (B, 1, X, Y, Z) `images` with the given per-patch parameters into a new tensor of their dtype."""
        # Half-precision inputs are augmented in float32: the filters' sums would lose most of their bits.
        work = torch.promote_types(images.dtype, torch.float32)
        window = params.window.to(work).view(-1, 2, 1, 1, 1)
        scale = 1.0 / (window[:, 1:] - window[:, :1])
        # The window's affine map commutes with the blur and the sharpening (their kernels sum to 1) and only scales
        # the noise, so it is applied first, fused with the copy of the input; its clipping must come last.
        out = torch.addcmul(-window[:, :1] * scale, images.as_subclass(torch.Tensor), scale)
        filtered = torch.nonzero(params.sigma > 0).squeeze(1)
        if filtered.numel() > 0:
            blurred = self._gaussian_blur(out.index_select(0, filtered)[:, 0], params.sigma[filtered])
            alpha = params.alpha[filtered]
            sharpened = torch.nonzero(alpha > 0).squeeze(1)
            if sharpened.numel() > 0:
                base = blurred.index_select(0, sharpened)
                inner = params.sigma.new_full((len(sharpened),), self.sharpen_inner_sigma)
                detail = base - self._gaussian_blur(base, inner)
                blurred.index_add_(0, sharpened, detail.mul_(alpha[sharpened].to(work).view(-1, 1, 1, 1)))
            out.index_copy_(0, filtered, blurred.unsqueeze(1))
        noisy = torch.nonzero(params.noise_sigma > 0).squeeze(1)
        if noisy.numel() > 0:
            sigma = params.noise_sigma[noisy].to(work).view(-1, 1, 1, 1, 1) * scale[noisy]
            noise = torch.randn((noisy.numel(), *out.shape[1:]), dtype=work, device=out.device)
            out.index_add_(0, noisy, noise.mul_(sigma))
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
            sigma: (M,) float64 sigmas in voxels, > 0.

        Returns:
            a new (M, X, Y, Z) tensor.
        """
        batch, size_x, size_y, _ = patches.shape
        # One kernel width for all patches (the widest); each kernel is zero beyond its own scipy truncation radius.
        radius = torch.floor(self.TRUNCATE * sigma + 0.5)
        width = int(radius.max())
        offsets = torch.arange(-width, width + 1, device=sigma.device, dtype=torch.float64)
        kernels = torch.exp(-0.5 * (offsets / sigma[:, None]) ** 2) * (offsets.abs() <= radius[:, None])
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


def build_augmentation(name: str, modality: str) -> LocalAugmentations | Vox2VecAugmentations | None:
    """The pretraining augmentation named by the config key `augmentations`.

    Args:
        name: "local" (DHR's local augmentations), "vox2vec" (blur or sharpen, noise, HU window) or "none".
        modality: the data's preset, which vox2vec's augmentations need ("ct_wide" or "mri").
    """
    descriptions = {
        "local": "local (DHR): pixel shuffling, intensity remap, in-painting",
        "vox2vec": "vox2vec's: blur or sharpen, noise, intensity window",
        "none": "none",
    }
    if name in descriptions:
        # print, not logging: the engine loggers are silent in bundle runs, and an ablation must be visible.
        print(f"augmentations: {descriptions[name]}")
    if name == "local":
        return LocalAugmentations()
    if name == "vox2vec":
        return Vox2VecAugmentations(modality)
    if name == "none":
        return None
    raise ValueError(f"Unknown augmentations={name!r}: the key `augmentations` must be 'local', 'vox2vec' or 'none'.")
