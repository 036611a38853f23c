# Not MONAI's RandCoarseShuffle/RandHistogramShift/RandCoarseDropout: they loop per sample on CPU, differ in details.
"""DHR's per-view local augmentations (local pixel shuffling, Bezier intensity remap, in-painting), batched over
patches on the batch's device.
"""

from __future__ import annotations

import math

import torch

__all__ = ["LocalAugmentations"]


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

    All randomness comes from the `generator` passed to the call (default: torch's default generator of the images'
    device), so the same generator state reproduces the output where PyTorch runs deterministically (one CPU thread,
    or `torch.use_deterministic_algorithms(True)`); otherwise which of several writes to one voxel stays (overlapping
    blocks) may vary between runs. No step depends on a value read back to the host: the number of drawn patches and
    boxes never sets a tensor's shape, so the augmentations run on a GPU without a device synchronisation.

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

    def __call__(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """
        Args:
            images: (B, 1, X, Y, Z) floating point patches with intensities in [0, 1], on any device.
            generator: source of every random draw, on the images' device; None: torch's default generator.

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
        self._remap_intensities(images.reshape(batch, -1), flat, generator)
        self._shuffle_pixels(flat, spatial, generator)
        self._inpaint(flat, spatial, generator)
        return out

    def _remap_intensities(
        self, images: torch.Tensor, out: torch.Tensor, generator: torch.Generator | None = None
    ) -> None:
        """
        Write the Bezier-remapped `images` (B, N) into `out` (B, N), copying the patches not drawn for the remap.
        """
        batch, voxels = images.shape
        device = images.device
        drawn = (torch.rand(batch, device=device, generator=generator) < self.bezier_prob).unsqueeze(1)
        size = self.LUT_SIZE
        # Half-precision types cannot hold table positions up to LUT_SIZE - 1 exactly: compute those in float32.
        work = torch.promote_types(images.dtype, torch.float32)
        control = torch.rand(batch, 2, 2, device=device, dtype=torch.float64, generator=generator)
        values, slopes = self._bezier_tables(control, work)
        table_start = torch.arange(0, batch * size, size, dtype=torch.int32, device=device).unsqueeze(1)
        # On a CPU, strips of voxels (of all patches) keep the temporaries in cache: about 2x faster than one pass
        # over the batch, whose 4-byte temporaries of the batch's size are allocated afresh (page faults) each call.
        strip = max(1, self.CPU_STRIP // batch) if device.type == "cpu" else voxels
        for first in range(0, voxels, strip):
            # Every patch is remapped and the undrawn ones then take their input back: selecting the drawn ones would
            # need their number on the host (a device sync).
            target, source = out[:, first : first + strip], images[:, first : first + strip]
            pos = torch.clamp(source.to(work), 0.0, 1.0)
            pos.mul_(size - 1)  # intensity in table steps: integer part = table entry, fraction = weight
            index = pos.to(torch.int32).add_(table_start).view(-1)
            pos.frac_().mul_(slopes.index_select(0, index).view_as(pos))
            pos.add_(values.index_select(0, index).view_as(pos))
            target.copy_(torch.where(drawn, pos, source))

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

    def _shuffle_pixels(
        self, out: torch.Tensor, spatial: tuple[int, int, int], generator: torch.Generator | None = None
    ) -> None:
        """Permute the voxels of random blocks within each drawn patch of `out` (B, N), in place."""
        batch, device = out.shape[0], out.device
        drawn = torch.rand(batch, device=device, generator=generator) < self.shuffle_prob
        count = self.shuffle_blocks
        if count == 0:
            return
        block = [max(1, side // self.shuffle_block_divisor) for side in spatial]
        strides = (spatial[1] * spatial[2], spatial[2], 1)
        # int32 where the batch allows: the sort and the gather are faster; index_copy_ needs int64.
        dtype = torch.int32 if out.numel() < 2**31 else torch.int64
        # Flat index of every block's first voxel in the whole (B, N) batch, in every patch: selecting the drawn
        # patches would need their number on the host (a device sync); the undrawn ones' blocks are left in place.
        start = (torch.arange(batch, device=device, dtype=dtype) * out.shape[1]).unsqueeze(1).expand(-1, count).clone()
        for side, size, stride in zip(spatial, block, strides, strict=True):
            shape = (batch, count)
            start += torch.randint(0, side - size + 1, shape, device=device, dtype=dtype, generator=generator) * stride
        # Visiting the blocks in memory order makes the gather and scatter below several times faster on a CPU.
        start = start.view(-1).sort().values
        shuffled_patch = drawn[torch.div(start, out.shape[1], rounding_mode="floor").long()]
        offsets = self._block_offsets(block, strides, device)
        blocks, volume = start.numel(), offsets.numel()
        # Block i (in memory order) takes permutation i % pool; the pool is drawn afresh, so each block's
        # permutation is uniform. Padding `start` to whole rows of the pool lets one broadcast build the indices.
        pool = self.PERMUTATION_POOL if 0 < self.PERMUTATION_POOL < blocks else blocks
        rows = -(-blocks // pool)
        permuted = offsets[torch.rand(pool, volume, device=device, generator=generator).argsort(dim=1)].to(dtype)
        padded = torch.nn.functional.pad(start, (0, rows * pool - blocks))
        source = (padded.view(rows, pool, 1) + permuted).view(-1, volume)[:blocks]
        target = start.long().unsqueeze(1) + offsets
        source = torch.where(shuffled_patch.unsqueeze(1), source, target.to(dtype)).view(-1)
        flat = out.view(-1)
        flat.index_copy_(0, target.view(-1), flat.index_select(0, source))

    @staticmethod
    def _block_offsets(block: list[int], strides: tuple[int, int, int], device: torch.device) -> torch.Tensor:
        """Flat offsets (prod(block),) of a block's voxels from its first voxel, int64."""
        axes = [torch.arange(size, device=device) * stride for size, stride in zip(block, strides, strict=True)]
        return (axes[0][:, None, None] + axes[1][None, :, None] + axes[2][None, None, :]).view(-1)

    def _sample_boxes(
        self, batch: int, spatial: tuple[int, int, int], device: torch.device, generator: torch.Generator | None = None
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Draw the in-painting boxes.

        Returns:
            start (B, K, 3) and size (B, K, 3) in voxels per axis, and present (B, K) bool, K = `inpaint_max_boxes`.
        """
        count = self.inpaint_max_boxes
        drawn = torch.rand(batch, count, device=device, generator=generator) < self.inpaint_box_prob
        present = torch.cummin(drawn.int(), dim=1)
        side = torch.tensor(spatial, device=device)
        low, high = self.inpaint_size
        fraction = low + (high - low) * torch.rand(
            batch, count, 3, device=device, dtype=torch.float64, generator=generator
        )
        size = torch.minimum((fraction * side).long().clamp_(min=1), side)
        start = torch.rand(batch, count, 3, device=device, dtype=torch.float64, generator=generator)
        start = (start * (side - size + 1)).long()
        return torch.minimum(start, side - size), size, present.values.bool()

    def _inpaint(
        self, out: torch.Tensor, spatial: tuple[int, int, int], generator: torch.Generator | None = None
    ) -> None:
        """Fill random boxes of every patch of `out` (B, N) with uniform noise, in place."""
        if self.inpaint_max_boxes == 0:
            return
        batch = out.shape[0]
        start, size, present = self._sample_boxes(batch, spatial, out.device, generator)
        # Every box, present or not, is enumerated on the grid of the largest possible box and marks the voxels within
        # its own size in a mask of the batch: a static-shaped computation (selecting the present boxes or voxels would
        # need their number on the host, a device sync), much smaller than one pass per box over the batch.
        strides = (spatial[1] * spatial[2], spatial[2], 1)
        coords, inside = [], []
        for axis, (side, stride) in enumerate(zip(spatial, strides, strict=True)):
            step = torch.arange(min(side, max(1, math.ceil(self.inpaint_size[1] * side))), device=out.device)
            # (B, K, steps); past the patch's side only where outside the box's own size, so clamped harmlessly
            coords.append((start[..., axis, None] + step).clamp_(max=side - 1) * stride)
            inside.append(step < size[..., axis, None])
        coords[0] += (torch.arange(batch, device=out.device) * out.shape[1]).view(batch, 1, 1)
        index = coords[0][..., :, None, None] + coords[1][..., None, :, None] + coords[2][..., None, None, :]
        inside = inside[0][..., :, None, None] & inside[1][..., None, :, None] & inside[2][..., None, None, :]
        inside &= present[..., None, None, None]
        # The voxels outside every box mark a spare last element, so that every write is the same `True`: the mask
        # does not depend on the order of overlapping writes.
        covered = torch.zeros(out.numel() + 1, dtype=torch.bool, device=out.device)
        covered[torch.where(inside, index, out.numel()).view(-1)] = True
        noise = torch.rand(out.shape, dtype=out.dtype, device=out.device, generator=generator)
        torch.where(covered[:-1].view_as(out), noise, out, out=out)
