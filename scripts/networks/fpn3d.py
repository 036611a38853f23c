"""Networks of DHR (Kats et al., ISBI 2024) and its baseline vox2vec (Goncharov et al., MICCAI 2023).

`FPN3d` reproduces the authors' backbone module for module, so their released weights load with `strict=True`.
"""

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from scripts.networks.backbones import MonaiBackbone
from scripts.utils.errors import BundleError
from torch import Tensor
from torch.utils.checkpoint import checkpoint

logger = logging.getLogger(__name__)

__all__ = [
    "ResBlock3d",
    "ResStage",
    "FPN3d",
    "MultiscaleProjection",
    "MaskedBatchNorm1d",
    "ProjectionHead",
    "VoxelEmbeddingNet",
    "dhr_network",
]


class ResBlock3d(nn.Module):
    """Pre-activation residual block: ``x + conv(relu(bn(conv(relu(bn(x))))))``, cubic convolutions of odd size.

    Args:
        channels: number of input and output channels.
        kernel_size: edge of the convolutions, in voxels: 3 in the backbone, 1 in vox2vec's non-linear probe.
    """

    def __init__(self, channels: int, kernel_size: int = 3) -> None:
        super().__init__()
        padding = kernel_size // 2
        # Inplace ReLUs are safe: each follows a BatchNorm whose output is a fresh tensor.
        self.layers = nn.Sequential(
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, kernel_size, padding=padding),
            nn.BatchNorm3d(channels),
            nn.ReLU(inplace=True),
            nn.Conv3d(channels, channels, kernel_size, padding=padding),
        )

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
        return x + self.layers(x)


class ResStage(nn.Module):
    """A stack of `num_blocks` residual blocks of constant width (the authors' ``StackMoreLayers``).

    With `checkpointing`, training keeps only the stage's input for the backward pass and recomputes the blocks there
    (activation checkpointing: less memory, about a third more compute). The recomputation leaves the BatchNorm
    running statistics as they were, so they are updated once per step, as without checkpointing.

    Args:
        channels: number of input and output channels.
        num_blocks: number of residual blocks.
        checkpointing: recompute the blocks in the backward pass instead of keeping their activations.
    """

    checkpointing: bool

    def __init__(self, channels: int, num_blocks: int = 2, checkpointing: bool = False) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[ResBlock3d(channels) for _ in range(num_blocks)])
        self.checkpointing = checkpointing

    def forward(self, x: Tensor) -> Tensor:
        """(B, C, X, Y, Z) -> (B, C, X, Y, Z)."""
        if self.checkpointing and self.training and torch.is_grad_enabled():
            return self._checkpointed(x)
        return self.layers(x)

    @torch.jit.unused
    def _checkpointed(self, x: Tensor) -> Tensor:
        return checkpoint(self.layers, x, use_reentrant=False, context_fn=self._contexts)

    def _contexts(self) -> tuple[AbstractContextManager, AbstractContextManager]:
        """Contexts of the forward pass and of its recomputation (`torch.utils.checkpoint`'s ``context_fn``)."""
        return nullcontext(), _running_stats_kept(self.layers)


@contextmanager
def _running_stats_kept(module: nn.Module) -> Iterator[None]:
    """Within the context, BatchNorm layers of `module` normalise with batch statistics as in training but leave their
    running statistics and batch counters unchanged (momentum 0)."""
    norms = [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
    saved = [(m.momentum, m.num_batches_tracked.clone()) for m in norms]
    for m in norms:
        m.momentum = 0.0
    try:
        yield
    finally:
        for m, (momentum, count) in zip(norms, saved, strict=True):
            m.momentum = momentum
            m.num_batches_tracked.copy_(count)


class FPN3d(nn.Module):
    """U-Net-shaped 3D feature pyramid network; returns the decoder feature map of every scale.

    Level ``i`` of the output has ``base_channels * 2**i`` channels and stride ``2**i``. Pooling uses ceil mode, so any
    input size works: level ``i`` of an ``X`` voxels wide input is ``ceil(X / 2**i)`` wide.

    Args:
        in_channels: number of input channels.
        base_channels: number of channels of the finest level.
        num_scales: number of pyramid levels.
        num_blocks: residual blocks per stage.
        activation_checkpointing: recompute each `ResStage` in the backward pass instead of keeping its activations.
    """

    # Declared here for TorchScript, which is also why this module avoids `from __future__ import annotations`.
    out_channels: list[int]

    def __init__(
        self,
        in_channels: int = 1,
        base_channels: int = 32,
        num_scales: int = 5,
        num_blocks: int = 2,
        activation_checkpointing: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.base_channels = base_channels
        self.num_scales = num_scales
        self.out_channels = [base_channels * 2**i for i in range(num_scales)]

        fine = self.out_channels[:-1]
        self.first_conv = nn.Conv3d(in_channels, base_channels, kernel_size=3, padding=1)
        self.left_blocks = nn.ModuleList([ResStage(c, num_blocks, activation_checkpointing) for c in fine])
        self.down_blocks = nn.ModuleList(
            [
                nn.Sequential(nn.MaxPool3d(kernel_size=2, ceil_mode=True), nn.Conv3d(c, 2 * c, kernel_size=1))
                for c in fine
            ]
        )
        self.bottom_block = ResStage(self.out_channels[-1], num_blocks, activation_checkpointing)
        self.up_blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv3d(2 * c, c, kernel_size=1), nn.Upsample(scale_factor=2, mode="nearest"))
                for c in reversed(fine)
            ]
        )
        self.skip_blocks = nn.ModuleList([nn.Conv3d(c, c, kernel_size=1) for c in reversed(fine)])
        self.right_blocks = nn.ModuleList([ResStage(c, num_blocks, activation_checkpointing) for c in reversed(fine)])

    def forward(self, x: Tensor) -> list[Tensor]:
        """
        Args:
            x: (B, in_channels, X, Y, Z).

        Returns:
            `num_scales` maps, finest first; level ``i`` is (B, base_channels * 2**i, ceil(X/2**i), ceil(Y/2**i),
            ceil(Z/2**i)).
        """
        return self.decode(self.encode(x))

    def encode(self, x: Tensor) -> list[Tensor]:
        """The encoder half, for methods that work on encoder features (PCRL mixes and gates them).

        Args:
            x: (B, in_channels, X, Y, Z).

        Returns:
            `num_scales` maps: the skip features of levels ``0 .. num_scales - 2`` (fine to coarse), then the
            bottleneck; map ``i`` is (B, base_channels * 2**i, ceil(X/2**i), ceil(Y/2**i), ceil(Z/2**i)).
        """
        x = self.first_conv(x)
        features: list[Tensor] = []
        for left, down in zip(self.left_blocks, self.down_blocks, strict=True):
            x = left(x)
            features.append(x)
            x = down(x)
        features.append(self.bottom_block(x))
        return features

    def decode(self, features: list[Tensor]) -> list[Tensor]:
        """The decoder half: the feature pyramid from encoder features as returned by `encode` (not modified).

        Args:
            features: `num_scales` maps, shaped as returned by `encode`.

        Returns:
            `num_scales` maps, finest first, of the shapes of `features`; the coarsest is the bottleneck itself.
        """
        x = features[-1]
        pyramid: list[Tensor] = [x]
        level = len(features) - 2  # the skip features are consumed coarse to fine
        for up, skip, right in zip(self.up_blocks, self.skip_blocks, self.right_blocks, strict=True):
            fmap = features[level]
            # Ceil-mode pooling rounds odd sizes up, so the upsampled map can be one voxel larger than the skip.
            x = up(x)[:, :, : fmap.shape[2], : fmap.shape[3], : fmap.shape[4]]
            x = right(x + skip(fmap))
            pyramid.insert(0, x)
            level -= 1
        return pyramid


class MultiscaleProjection(nn.Module):
    """Reads every pyramid level at matched full-resolution voxels and projects each level to a common width.

    A voxel at full-resolution index ``v`` reads level ``i`` at ``v // 2**i``, the coarse cell that contains it.
    With an integer `width` every level gets its own linear projection to `width` channels (DHR's hierarchically
    balanced vectors); with ``width=None`` the raw levels are concatenated (vox2vec).

    Args:
        in_channels: channels of each pyramid level, finest first (``FPN3d.out_channels``).
        width: channels per level after projection, or None for raw concatenation.
        frozen: keep the projections at a fixed random initialisation, as the authors' code effectively did (their
            projections sat in a plain Python list). They then get no gradient and are left out of the state dict,
            and are re-created identically from `seed`.
        seed: seed of the frozen projections' initialisation; unused when `frozen` is False.
        first_shift: log2 of the finest level's stride (0 for FPN3d; 1 for a backbone whose finest level is at stride
            2, `scripts.networks.backbones.MonaiBackbone`): level ``i`` is read at ``v // 2**(first_shift + i)``.
    """

    def __init__(
        self,
        in_channels: Sequence[int],
        width: int | None = 32,
        frozen: bool = False,
        seed: int = 0,
        first_shift: int = 0,
    ) -> None:
        super().__init__()
        self.in_channels = list(in_channels)
        self.first_shift = first_shift
        self.width = width
        self.frozen = frozen
        # A Linear on the gathered vectors equals a 1x1x1 conv followed by gathering, at a fraction of the cost.
        self.projections = nn.ModuleList([] if width is None else [nn.Linear(c, width) for c in self.in_channels])
        self.out_channels = sum(self.in_channels) if width is None else width * len(self.in_channels)
        if frozen:
            self._freeze(seed)

    def _freeze(self, seed: int) -> None:
        """Re-draws the projections from `seed` (PyTorch's default Linear init) as non-persistent buffers."""
        generator = torch.Generator().manual_seed(seed)
        for linear in self.projections:
            bound = linear.in_features**-0.5
            weight = torch.empty_like(linear.weight).uniform_(-bound, bound, generator=generator)
            bias = torch.empty_like(linear.bias).uniform_(-bound, bound, generator=generator)
            del linear.weight, linear.bias
            linear.register_buffer("weight", weight, persistent=False)
            linear.register_buffer("bias", bias, persistent=False)

    def forward(self, pyramid: list[Tensor], voxels: Tensor) -> Tensor:
        """
        Args:
            pyramid: maps as returned by `FPN3d`, finest first; level ``i`` is (B, C_i, X_i, Y_i, Z_i).
            voxels: (B, K, 3) integer indices into the full-resolution input.

        Returns:
            (B, K, out_channels) feature vectors, levels concatenated finest first.
        """
        features = []
        for i, fmap in enumerate(pyramid):
            b, c = fmap.shape[:2]
            x, y, z = (voxels.long() >> (self.first_shift + i)).unbind(-1)
            index = (x * fmap.shape[3] + y) * fmap.shape[4] + z  # (B, K) into the flattened spatial dims
            gathered = fmap.flatten(2).gather(2, index.unsqueeze(1).expand(b, c, -1)).transpose(1, 2)
            features.append(gathered if self.width is None else self.projections[i](gathered))
        return torch.cat(features, dim=-1)


class MaskedBatchNorm1d(nn.BatchNorm1d):
    """`nn.BatchNorm1d` whose training statistics span the rows marked valid only, both those it normalises with and
    those it tracks; the same parameters and buffers, so state dicts are interchangeable.

    The rows are weighted, not selected, so shapes stay static and nothing waits for the device. Without `valid`, and
    whenever the running statistics normalise (eval mode), it is `nn.BatchNorm1d`.
    """

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """
        Args:
            x: (N, C) rows.
            valid: (N,) bool, the rows that make the statistics; None: all. Rows outside it are normalised too, with
                the statistics of the valid ones.

        Returns:
            (N, C), the dtype of `x`.
        """
        if valid is None or not (self.training or self.running_mean is None):
            return super().forward(x)
        rows = x.to(torch.promote_types(x.dtype, torch.float32))  # statistics in float32 at least, as under AMP
        inside = valid[:, None]
        count = valid.sum().clamp(min=1)
        mean = torch.where(inside, rows, 0).sum(0) / count
        var = torch.where(inside, (rows - mean).square(), 0).sum(0) / count  # biased, as BatchNorm normalises with
        if self.track_running_stats:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                momentum = 1 / self.num_batches_tracked if self.momentum is None else self.momentum
                self.running_mean.lerp_(mean, momentum)
                self.running_var.lerp_(var * count / (count - 1).clamp(min=1), momentum)  # unbiased, as BatchNorm
        y = (rows - mean) * torch.rsqrt(var + self.eps)
        if self.affine:
            y = y * self.weight + self.bias
        return y.to(x.dtype)


class ProjectionHead(nn.Module):
    """MLP with two hidden BatchNorm-ReLU layers, followed by L2 normalisation.

    Given which rows are valid (the sampler pads each pair's matched voxels to a fixed count), the head sees those rows
    only: padded rows enter as zeros, leave as zeros, and the BatchNorm statistics span the valid rows alone. Otherwise
    the padded slots, which all read voxel (0, 0, 0) of their view, would weigh on the batch statistics.

    Args:
        in_channels: input vector length.
        hidden_channels: hidden layer width.
        out_channels: embedding length.
    """

    def __init__(self, in_channels: int, hidden_channels: int, out_channels: int = 128) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(in_channels, hidden_channels),
            MaskedBatchNorm1d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, hidden_channels),
            MaskedBatchNorm1d(hidden_channels),
            nn.ReLU(inplace=True),
            nn.Linear(hidden_channels, out_channels),
        )

    def forward(self, x: Tensor, valid: Tensor | None = None) -> Tensor:
        """
        Args:
            x: (B, K, in_channels) vectors.
            valid: (B, K) bool, the rows that hold a matched voxel; None: all.

        Returns:
            (B, K, out_channels): unit vectors at the valid rows, zeros elsewhere. In training the BatchNorm statistics
            span all valid rows of the batch.
        """
        rows = x.flatten(0, 1)
        mask = None if valid is None else valid.flatten()
        if mask is not None:
            rows = torch.where(mask[:, None], rows, 0)  # no value of a padded row reaches a layer (nor a gradient)
        for layer in self.layers:
            rows = layer(rows, mask) if isinstance(layer, MaskedBatchNorm1d) else layer(rows)
        y = F.normalize(rows, dim=-1)
        if mask is not None:
            y = torch.where(mask[:, None], y, 0)
        return y.unflatten(0, x.shape[:2])


class VoxelEmbeddingNet(nn.Module):
    """Pretraining network: backbone + multiscale projection + projection head (+ restoration head).

    Args:
        backbone: feature pyramid network.
        projection: reads the pyramid at the sampled voxels.
        head: maps the projected vectors to embeddings.
        restoration: add a 1x1x1 conv from the finest level to one channel, for DHR's restoration loss; a finest level
            coarser than the input (``projection.first_shift`` > 0) is restored there and upsampled (nearest).
    """

    def __init__(
        self, backbone: nn.Module, projection: MultiscaleProjection, head: ProjectionHead, restoration: bool = True
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.projection = projection
        self.head = head
        self.restoration_head = nn.Conv3d(backbone.out_channels[0], 1, kernel_size=1) if restoration else None

    def forward(self, images: Tensor, voxels: Tensor, valid: Tensor | None = None) -> dict[str, Tensor]:
        """
        Args:
            images: (B, 1, X, Y, Z).
            voxels: (B, K, 3) integer indices of the voxels to embed.
            valid: (B, K) bool, which of the K slots hold a voxel (the others are padding); None: all.

        Returns:
            ``"embeddings"``: (B, K, D) unit vectors (zeros at invalid slots), and with restoration
            ``"restoration"``: (B, 1, X, Y, Z), linear (no activation).
        """
        pyramid = self.backbone(images)
        outputs = {"embeddings": self.head(self.projection(pyramid, voxels), valid)}
        if self.restoration_head is not None:
            restored = self.restoration_head(pyramid[0])
            if self.projection.first_shift:
                restored = F.interpolate(restored, scale_factor=2.0**self.projection.first_shift, mode="nearest")
            outputs["restoration"] = restored
        return outputs


def dhr_network(
    base_channels: int = 32,
    num_scales: int = 5,
    projection_width: int | str | None = 32,
    head_hidden: int | None = None,
    embedding_dim: int = 128,
    restoration: bool = True,
    freeze_projections: bool = False,
    seed: int = 0,
    activation_checkpointing: bool = False,
    backbone: str = "fpn3d",
    backbone_args: Mapping[str, Any] | None = None,
) -> VoxelEmbeddingNet:
    """Builds the pretraining network for one input channel.

    The defaults give DHR (FPN3d 32/5, 5 x 32 = 160 -> 160 -> 160 -> 128, restoration head); vox2vec is
    ``dhr_network(16, 6, projection_width="raw", restoration=False)`` (1008 -> 1008 -> 1008 -> 128). Another
    `backbone` is read at its decoder levels as FPN3d's pyramid is (`scripts.networks.backbones.MonaiBackbone`).

    Args:
        base_channels: channels of the finest pyramid level (FPN3d).
        num_scales: number of pyramid levels (FPN3d).
        projection_width: channels per level after projection, or ``"raw"`` (or None) for raw concatenation. The
            config key takes ``raw`` because MONAI's command line drops a ``None`` value (`scripts.utils.cli`).
        head_hidden: hidden width of the projection head; None means the projection's output width.
        embedding_dim: embedding length.
        restoration: add the restoration head.
        freeze_projections: keep the per-level projections fixed at their seeded random initialisation.
        seed: seed of the frozen projections.
        activation_checkpointing: recompute the backbone's residual stages in the backward pass (`FPN3d`).
        backbone: ``fpn3d``, or MONAI's ``segresnet``, ``dynunet``, ``unet`` (`scripts.networks.backbones`).
        backbone_args: the MONAI network's arguments (None for FPN3d).
    """
    if projection_width == "raw":
        projection_width = None
    if projection_width is not None and not (isinstance(projection_width, int) and projection_width > 0):
        raise BundleError(
            f"projection_width={projection_width!r}: give a positive number of channels per level, or raw to "
            "concatenate the raw pyramid levels (vox2vec)."
        )
    if backbone == "fpn3d":
        network: nn.Module = FPN3d(1, base_channels, num_scales, activation_checkpointing=activation_checkpointing)
        name = f"FPN3d(1, {base_channels}, {num_scales})"
    else:
        network = MonaiBackbone(backbone, backbone_args)
        for layer in network.output_layers():  # not read: without a gradient, DDP would wait for one at every step
            layer.requires_grad_(False)
        name = f"{type(network.network).__name__}({network.args}) read at {len(network.out_channels)} decoder levels"
    shift = getattr(network, "first_shift", 0)
    projection = MultiscaleProjection(network.out_channels, projection_width, freeze_projections, seed, shift)
    hidden = projection.out_channels if head_hidden is None else head_hidden
    head = ProjectionHead(projection.out_channels, hidden, embedding_dim)
    levels = len(network.out_channels)
    if projection_width is None:
        vectors = f"raw levels concatenated ({projection.out_channels})"
    else:
        state = "frozen random" if freeze_projections else "trained"
        vectors = f"{state} projections {levels} x {projection_width}"
    # at INFO, which configs/logging.conf prints: what an ablation built must be visible in the run's output
    logger.info(
        f"pretraining network: {name}, {vectors} -> head {hidden}-{hidden}-"
        f"{embedding_dim}, {'with' if restoration else 'no'} restoration head"
    )
    return VoxelEmbeddingNet(network, projection, head, restoration)
