"""Downstream segmentation network of DHR (Kats et al., ISBI 2024): a pretrained `FPN3d` backbone plus an FPN head,
the warm-up handler and the loss.

Linear evaluation trains a head on a frozen backbone; fine-tuning freezes the backbone for a warm-up of some epochs
(`BackboneWarmup`), then trains everything. Outputs are per-class logits, trained with `DiceBCELoss` (sigmoid per
class, not softmax).
"""

import logging
from collections.abc import Mapping, Sequence
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from ignite.engine import Engine, Events
from monai.losses import DiceLoss
from scripts.networks.backbones import MonaiBackbone
from scripts.networks.fpn3d import FPN3d, ResBlock3d
from scripts.networks.pretrained import load_backbone, load_pretrained
from scripts.utils.distributed import data_parallel, unwrap
from scripts.utils.errors import BundleError, InvalidInputError
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "LinearFPNHead",
    "FPNNonLinearHead",
    "SegmentationNet",
    "OwnHeadSegmentationNet",
    "default_head",
    "segmentation_network",
    "BackboneWarmup",
    "check_linear_evaluation",
    "probabilities_to_labels",
    "DiceBCELoss",
]


def _to_input_stride(x: Tensor, first_shift: int) -> Tensor:
    """(B, C, X, Y, Z) at stride ``2**first_shift`` -> nearest-upsampled to stride 1 (the input's size: the backbone's
    strides fit it, `scripts.networks.backbones.check_backbone`)."""
    if first_shift == 0:
        return x
    return F.interpolate(x, scale_factor=float(2**first_shift), mode="nearest")


def _upsample_to(x: Tensor, like: Tensor) -> Tensor:
    """Nearest x2 upsampling of (B, C, X, Y, Z), cropped to the spatial size of `like`.

    Ceil-mode pooling in `FPN3d` rounds odd sizes up, so the upsampled map can be one voxel larger than the finer level.
    """
    x = F.interpolate(x, scale_factor=2.0, mode="nearest")
    return x[:, :, : like.shape[2], : like.shape[3], : like.shape[4]]


class LinearFPNHead(nn.Module):
    """The paper's linear FPN head: a 1x1x1 convolution per pyramid level to `num_classes`, upsampled (nearest, x2 per
    level) and summed coarse-to-fine.

    A full-resolution voxel ``v`` therefore gets ``sum_i W_i @ level_i[v // 2**i] + b_i``: a linear function of the
    voxel's multiscale feature vector.

    Args:
        in_channels: channels of each pyramid level, finest first (``FPN3d.out_channels``).
        num_classes: number of output channels.
        first_shift: log2 of the finest level's stride; the logits are upsampled (nearest) from there to the input.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, first_shift: int = 0) -> None:
        super().__init__()
        self.convs = nn.ModuleList([nn.Conv3d(c, num_classes, kernel_size=1) for c in in_channels])
        self.first_shift = first_shift

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        """
        Args:
            pyramid: maps as returned by `FPN3d`, finest first; level ``i`` is (B, C_i, ceil(X/2**i), ...).

        Returns:
            (B, num_classes, X, Y, Z) logits at the finest level's size.
        """
        logits: list[Tensor] = []
        for i, conv in enumerate(self.convs):
            logits.append(conv(pyramid[i]))
        x = logits[-1]
        for i in range(len(logits) - 2, -1, -1):
            x = _upsample_to(x, logits[i]) + logits[i]
        return _to_input_stride(x, self.first_shift)


class FPNNonLinearHead(nn.Module):
    """vox2vec's non-linear probe (``vox2vec.nn.fpn.FPNNonLinearHead``): a U-Net decoder of 1x1x1 convolutions that
    keeps each pyramid level's own width.

    ``x = bottom_block(level_{S-1})``; then for each finer level i (coarse to fine): ``x = up_blocks(x)`` (1x1x1 conv
    from the width of level i+1 to that of level i, nearest x2 upsampling, cropped to level i), ``x += skip_blocks(
    level_i)`` (1x1x1 conv), ``x = right_blocks(x)``; finally ``final_block`` (1x1x1 conv to `num_classes`). Blocks are
    pre-activation residual blocks (BN, ReLU, 1x1x1 conv, BN, ReLU, 1x1x1 conv). Every operation is voxel-wise, so the
    head adds no spatial context beyond the backbone's. Module and parameter names are vox2vec's, so a state dict of
    its head loads with ``strict=True``.

    Args:
        in_channels: channels of each pyramid level, finest first (``FPN3d.out_channels``; vox2vec's
            ``base_channels * 2**i``).
        num_classes: number of output channels.
        first_shift: log2 of the finest level's stride; the logits are upsampled (nearest) from there to the input.
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, first_shift: int = 0) -> None:
        super().__init__()
        self.first_shift = first_shift
        widths = list(in_channels)
        # Stored coarse to fine, the order they run in, as in vox2vec.
        fine_levels = range(len(widths) - 2, -1, -1)
        self.bottom_block = ResBlock3d(widths[-1], kernel_size=1)
        self.up_blocks = nn.ModuleList(
            [
                nn.Sequential(nn.Conv3d(widths[i + 1], widths[i], kernel_size=1), nn.Upsample(scale_factor=2.0))
                for i in fine_levels
            ]
        )
        self.skip_blocks = nn.ModuleList([nn.Conv3d(widths[i], widths[i], kernel_size=1) for i in fine_levels])
        self.right_blocks = nn.ModuleList([ResBlock3d(widths[i], kernel_size=1) for i in fine_levels])
        self.final_block = nn.Conv3d(widths[0], num_classes, kernel_size=1)

    def forward(self, pyramid: list[Tensor]) -> Tensor:
        """
        Args:
            pyramid: maps as returned by `FPN3d`, finest first; level ``i`` is (B, C_i, ceil(X/2**i), ...).

        Returns:
            (B, num_classes, X, Y, Z) logits at the finest level's size.
        """
        x = self.bottom_block(pyramid[-1])
        for i, (up, skip, right) in enumerate(zip(self.up_blocks, self.skip_blocks, self.right_blocks, strict=True)):
            level = pyramid[len(pyramid) - 2 - i]
            x = up(x)[:, :, : level.shape[2], : level.shape[3], : level.shape[4]]  # ceil-mode pooling: crop
            x = right(x + skip(level))
        return _to_input_stride(self.final_block(x), self.first_shift)


class SegmentationNet(nn.Module):
    """A backbone (`FPN3d`, or a MONAI network read at its decoder) + FPN head, returning per-class logits.

    While the backbone is frozen (`freeze_backbone`) its parameters get no gradient and its BatchNorm layers stay in
    eval mode even when ``train()`` is called on the whole network, as MONAI's `SupervisedTrainer` does every
    iteration; so neither weights nor running statistics change. Scripting keeps `forward` only: a scripted network is
    for inference, and its ``train()``/``eval()`` are the plain `nn.Module` ones. (`freeze_backbone` and `train` are
    deliberately not marked ``@torch.jit.unused``/``ignore``: that would copy them onto the script module, where
    ``super().train`` fails and so would ``eval()``.)

    Args:
        backbone: feature pyramid network.
        head: maps the pyramid (finest first) to (B, num_classes, X, Y, Z) logits.
    """

    backbone_frozen: bool

    def __init__(self, backbone: nn.Module, head: nn.Module) -> None:
        super().__init__()
        self.backbone = backbone
        self.head = head
        self.backbone_frozen = False

    def freeze_backbone(self, frozen: bool = True) -> None:
        """Freezes (no gradient, BatchNorm in eval mode) or unfreezes (gradient, BatchNorm follows ``train()``) the
        backbone."""
        self.backbone_frozen = frozen
        self.backbone.requires_grad_(not frozen)
        self.train(self.training)  # re-applies the backbone's BatchNorm mode

    def train(self, mode: bool = True) -> "SegmentationNet":
        """Sets training `mode` like `nn.Module.train`, except that a frozen backbone stays in eval mode."""
        super().train(mode)
        if self.backbone_frozen:
            self.backbone.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        """
        Args:
            x: (B, in_channels, X, Y, Z).

        Returns:
            (B, num_classes, X, Y, Z) logits.
        """
        return self.head(self.backbone(x))


class OwnHeadSegmentationNet(SegmentationNet):
    """A MONAI backbone with its own output layer (``out_channels`` = the classes): the network as its bundle trains
    it. Its "backbone" is everything but that output layer, which stays trainable while the rest is frozen.

    Args:
        backbone: the MONAI network read as a backbone, built with ``out_channels`` = the number of classes.
    """

    def __init__(self, backbone: MonaiBackbone) -> None:
        super().__init__(backbone, nn.Identity())

    def freeze_backbone(self, frozen: bool = True) -> None:
        """As `SegmentationNet.freeze_backbone`, but the output layer keeps its gradient."""
        super().freeze_backbone(frozen)
        for module in self.backbone.output_layers():
            module.requires_grad_(True)

    def train(self, mode: bool = True) -> "OwnHeadSegmentationNet":
        """As `SegmentationNet.train`, but the output layer follows `mode` also while the rest is frozen."""
        super().train(mode)
        for module in self.backbone.output_layers():
            module.train(mode)
        return self

    def forward(self, x: Tensor) -> Tensor:
        """(B, 1, X, Y, Z) -> (B, num_classes, X, Y, Z) logits of the MONAI network."""
        return self.backbone.network(x)


def default_head(backbone: str) -> str:
    """The head of fine-tuning when none is given: FPN3d's linear FPN head; a MONAI network's own output layer."""
    return "linear" if backbone == "fpn3d" else "own"


def segmentation_network(
    num_classes: int,
    base_channels: int = 32,
    num_scales: int = 5,
    head: str | None = None,
    pretrained_ckpt: str | None = None,
    activation_checkpointing: bool = False,
    backbone: str = "fpn3d",
    backbone_args: Mapping[str, Any] | None = None,
) -> SegmentationNet:
    """Builds the segmentation network for one input channel, from scratch or from a pretrained backbone.

    Args:
        num_classes: number of output channels (one sigmoid per class).
        base_channels: channels of the finest pyramid level (FPN3d; DHR 32, vox2vec 16).
        num_scales: number of pyramid levels (FPN3d; DHR 5, vox2vec 6).
        head: ``"linear"`` (`LinearFPNHead`), ``"nonlinear"`` (vox2vec's `FPNNonLinearHead`), or ``"own"`` (a MONAI
            backbone's own output layer, `OwnHeadSegmentationNet`); None: `default_head`.
        pretrained_ckpt: backbone checkpoint in any form `scripts.networks.pretrained.load_backbone` accepts (FPN3d),
            or a MONAI backbone as pretraining exported it; None trains from scratch.
        activation_checkpointing: recompute the backbone's residual stages in the backward pass (`FPN3d`).
        backbone: ``fpn3d``, or MONAI's ``segresnet``, ``dynunet``, ``unet`` (`scripts.networks.backbones`).
        backbone_args: the MONAI network's arguments, as the backbone's sidecar records them.

    Raises:
        ValueError: for an unknown `head`, or a checkpoint that does not fit (the message names the file).
        FileNotFoundError: when `pretrained_ckpt` does not exist.
    """
    head = head or default_head(backbone)
    heads = {"linear", "nonlinear"} if backbone == "fpn3d" else {"linear", "nonlinear", "own"}
    if head not in heads:
        raise InvalidInputError(f"head={head!r} with backbone {backbone}: give one of {', '.join(sorted(heads))}")
    if backbone == "fpn3d":
        network: nn.Module = FPN3d(1, base_channels, num_scales, activation_checkpointing=activation_checkpointing)
        name = f"FPN3d(1, {base_channels}, {num_scales})"
    else:
        args = dict(backbone_args or {})
        if head == "own":  # the output layer gives the logits; DynUNet's deep supervision would add more outputs
            args.update(out_channels=num_classes, **({"deep_supervision": False} if backbone == "dynunet" else {}))
        network = MonaiBackbone(backbone, args)
        name = f"{type(network.network).__name__}"
    if pretrained_ckpt is not None:
        if backbone == "fpn3d":
            load_backbone(pretrained_ckpt, network)
        else:
            load_pretrained(pretrained_ckpt, network)
        # at INFO, which configs/logging.conf prints: the initialisation must be visible in the run's output. (Without a
        # checkpoint, the workflow says what it starts from: random weights to train, or a trained model_file.)
        logger.info(f"segmentation network: {name} backbone loaded from {pretrained_ckpt}")
    if head == "own":
        return OwnHeadSegmentationNet(network)
    shift = getattr(network, "first_shift", 0)
    if head == "linear":
        head_module: nn.Module = LinearFPNHead(network.out_channels, num_classes, shift)
    else:
        head_module = FPNNonLinearHead(network.out_channels, num_classes, shift)
    return SegmentationNet(network, head_module)


class BackboneWarmup:
    """Ignite/MONAI handler: freezes a loaded backbone for the first `warmup_epochs` epochs, then trains everything.

    Epoch ``e`` (1-based) runs with a frozen backbone iff ``e <= warmup_epochs``, decided from ``engine.state.epoch`` at
    every epoch start, so a run resumed from a checkpoint gets the right state. ``warmup_epochs="all"`` keeps the
    backbone frozen throughout (linear evaluation, also of a random backbone: the from-scratch reference). A warm-up
    protects pretrained features from the random head's first gradients, so it applies only to a loaded backbone: from
    scratch (``pretrained=False``) a number of warm-up epochs is ignored and everything trains from epoch 1. The
    learning rate is left unchanged at the switch (the authors' code lowered it by accident). The optimizer may hold
    all parameters from the start: Adam skips parameters whose gradient is None, which frozen ones keep, so it need
    not be re-created at the switch.

    Under ``torchrun`` (``distributed``) the handler also wraps the network in ``DistributedDataParallel``, once per
    phase, as the trainer's network: DDP fixes the parameters it reduces when it is built, so a wrapper over the
    parameters that train in the phase needs no search for unused parameters (``find_unused_parameters``, a walk of
    every step's graph), whereas one over all of them fails at the second step, lacking the frozen ones' gradients.

    Args:
        network: the network whose backbone is frozen (the trainer's network, or its ``DistributedDataParallel``
            wrapper without ``distributed``).
        warmup_epochs: number of epochs with a frozen backbone (0 trains everything from the start), or ``"all"``.
        pretrained: whether the backbone was loaded from a file; False means from scratch.
        distributed: whether to wrap the network in ``DistributedDataParallel`` at the start and at the switch.

    Raises:
        BundleError: naming the key ``warmup_epochs`` when it is neither a number >= 0 nor ``"all"``.
    """

    def __init__(
        self,
        network: SegmentationNet | nn.parallel.DistributedDataParallel,
        warmup_epochs: int | str,
        pretrained: bool = True,
        distributed: bool = False,
    ) -> None:
        if warmup_epochs != "all" and not (isinstance(warmup_epochs, int) and warmup_epochs >= 0):
            raise BundleError(
                f"warmup_epochs={warmup_epochs!r}: give a number of epochs >= 0 with a frozen backbone, or all."
            )
        self.network = network
        self.warmup_epochs = warmup_epochs
        self.pretrained = pretrained
        self.distributed = distributed
        self._frozen: bool | None = None  # state last announced; None before the first epoch

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self)

    def __call__(self, engine: Engine) -> None:
        epoch = engine.state.epoch  # already the epoch about to run at EPOCH_STARTED
        frozen = self.warmup_epochs == "all" or (self.pretrained and epoch <= self.warmup_epochs)
        module = unwrap(self.network)
        module.freeze_backbone(frozen)
        if frozen == self._frozen:
            return
        self._frozen = frozen
        if self.distributed:
            engine.network = module  # the previous phase's wrapper goes, and its gradient hooks with it
            engine.network = data_parallel(module)
        if frozen:
            end = engine.state.max_epochs or epoch
            last = end if self.warmup_epochs == "all" else min(self.warmup_epochs, end)
            logger.info(f"epochs {epoch}-{last}: backbone frozen (no gradient, BatchNorm in eval mode)")
        elif not self.pretrained and self.warmup_epochs:
            logger.info(
                f"epoch {epoch}: from scratch, no warm-up (it applies to a loaded backbone): all parameters train"
            )
        else:
            logger.info(f"epoch {epoch}: backbone unfrozen, all parameters train")


def check_linear_evaluation(warmup_epochs: int | str) -> None:
    """Refuses a number of warm-up epochs in linear evaluation, which keeps the backbone frozen throughout.

    Raises:
        BundleError: naming the key ``warmup_epochs`` and its value.
    """
    if warmup_epochs != "all":
        raise BundleError(
            f"warmup_epochs={warmup_epochs!r} with configs/linear_eval.yaml: linear evaluation keeps the backbone "
            "frozen for the whole run, and a warm-up would unfreeze it. Leave --warmup_epochs out, or fine-tune with "
            "configs/train.yaml alone."
        )


def probabilities_to_labels(probabilities: Tensor, threshold: float = 0.5) -> Tensor:
    """
    Per-class sigmoid probabilities (C, X, Y, Z) -> label map (1, X, Y, Z) in 0..C, same dtype: each voxel gets the most
    probable class among those above `threshold`, 0 (background) where none is.
    """
    # a constant background channel at the threshold in front: argmax then picks it exactly when no class exceeds it
    background = torch.full_like(probabilities[:1], threshold)
    return torch.cat([background, probabilities]).argmax(0, keepdim=True).to(probabilities.dtype)


class DiceBCELoss(nn.Module):
    """
    Per-class sigmoid segmentation loss of the DHR downstream protocol: soft Dice + binary cross-entropy.

    MONAI's ``DiceCELoss`` applies softmax cross-entropy whenever there is more than one channel, so the per-class BCE
    is composed here from ``DiceLoss(sigmoid=True)`` and ``BCEWithLogitsLoss``.

    Args:
        dice_weight: weight of the Dice term.
        bce_weight: weight of the BCE term.
    """

    def __init__(self, dice_weight: float = 1.0, bce_weight: float = 1.0) -> None:
        super().__init__()
        self.dice_weight, self.bce_weight = dice_weight, bce_weight
        self.dice = DiceLoss(sigmoid=True)
        self.bce = nn.BCEWithLogitsLoss()

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """
        Args:
            logits: (B, C, X, Y, Z), one channel per foreground class.
            target: (B, C, X, Y, Z) in {0, 1}, the same classes.

        Returns:
            Scalar loss.
        """
        target = target.to(logits.dtype)
        return self.dice_weight * self.dice(logits, target) + self.bce_weight * self.bce(logits, target)
