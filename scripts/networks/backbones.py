"""MONAI's U-shaped networks as DHR backbones: each read at its decoder stages, as `FPN3d` is.

`MonaiBackbone` builds ``monai.networks.nets.<Name>(**args)`` unchanged and returns the feature maps of its decoder
stages (forward hooks), finest first, so the multiscale projections, the sampler, the losses and the downstream heads
work on it as on FPN3d's pyramid. Its ``network`` is exactly the MONAI network, so the exported state dict loads with
``strict=True`` wherever MONAI's class is built with the same arguments (the Model Zoo's bundles). The network's own
output layer (its "head") is not read in pretraining: it is exported untrained and fine-tuning starts it afresh.

Level ``i`` of every supported network has stride ``2 ** (first_shift + i)`` in every axis: SegResNet and DynUNet
(strides ``[1, 2, 2, ...]``) have a full-resolution level (``first_shift`` 0); MONAI's UNet has none besides its
output, so its finest decoder level is at stride 2 (``first_shift`` 1).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Mapping, Sequence
from functools import partial
from typing import Any

import monai.networks.nets as nets
import torch.nn as nn
from monai.networks.layers.simplelayers import SkipConnection
from scripts.utils.errors import BundleError
from torch import Tensor

__all__ = ["BACKBONES", "MonaiBackbone", "network_args", "run_identity", "sidecar_info", "check_backbone", "describe"]

# The values of the `backbone` key: FPN3d (this bundle's) and MONAI's networks by their class.
BACKBONES = {"fpn3d": None, "segresnet": nets.SegResNet, "dynunet": nets.DynUNet, "unet": nets.UNet}
# What the bundle fixes (3D, one input channel) and the defaults of arguments MONAI requires. `out_channels` is the
# output layer's width, which pretraining does not read: give the target bundle's value so its loader takes the file.
_FIXED = {"spatial_dims": 3, "in_channels": 1}
_DEFAULTS = {
    "segresnet": {"out_channels": 1},
    "dynunet": {
        "out_channels": 1,
        "kernel_size": [3, 3, 3, 3, 3],
        "strides": [1, 2, 2, 2, 2],
        "upsample_kernel_size": [2, 2, 2, 2],
    },
    "unet": {"out_channels": 1, "channels": [16, 32, 64, 128, 256], "strides": [2, 2, 2, 2], "num_res_units": 2},
}
# The output layer of each network, by state dict prefix: not pretrained, and replaced when fine-tuning.
HEADS = {
    "segresnet": ("conv_final.",),
    "dynunet": ("output_block.", "deep_supervision_heads."),
    "unet": ("model.2.",),  # UNet's top up-sampling path: its transposed conv writes the output channels
}


def network_args(backbone: str, args: Mapping[str, Any] | None) -> dict:
    """The full arguments of MONAI's network `backbone`: the bundle's fixed ones, the defaults, then `args`."""
    return {**_FIXED, **_DEFAULTS[backbone], **dict(args or {})}


def _pow2(x: Any) -> int | None:
    """The stride of an isotropic stride value (an int or a list of equal ints), else None."""
    values = set(x) if isinstance(x, Sequence) and not isinstance(x, str) else {x}
    return values.pop() if len(values) == 1 and isinstance(next(iter(values)), int) else None


def _levels(backbone: str, args: Mapping[str, Any]) -> tuple[list[int], int]:
    """Channels of the decoder levels (finest first) and the finest level's log2 stride, from the arguments alone.

    Raises:
        BundleError: naming the argument, when the network's decoder does not return to the finest stride in steps of 2.
    """
    if backbone == "segresnet":
        down = list(args.get("blocks_down", (1, 2, 2, 4)))
        up = list(args.get("blocks_up", (1, 1, 1)))
        if len(up) != len(down) - 1:
            raise BundleError(
                f"backbone_args blocks_up={up}: SegResNet's decoder needs one stage per down-sampling to return to "
                f"full resolution, len(blocks_down) - 1 = {len(down) - 1}; give e.g. blocks_up={[1] * (len(down) - 1)}"
            )
        width = args.get("init_filters", 8)
        return [width * 2**i for i in range(len(down))], 0
    strides = [_pow2(s) for s in args["strides"]]
    if backbone == "unet":
        if strides != [2] * len(strides):
            raise BundleError(
                f"backbone_args strides={list(args['strides'])}: DHR reads UNet's decoder at strides 2, 4, 8, ..., so "
                f"every stride must be 2; give strides={[2] * len(strides)}"
            )
        channels = list(args["channels"])
        return [*channels[: len(strides) - 1], channels[-1]], 1
    valid = [1] + [2] * (len(strides) - 1)
    if strides != valid:
        raise BundleError(
            f"backbone_args strides={list(args['strides'])}: DHR reads DynUNet's decoder at strides 1, 2, 4, ..., so "
            f"the strides must be 1, then 2 at every level; give strides={valid}"
        )
    filters = args.get("filters") or [min(2 ** (5 + i), 320) for i in range(len(strides))]
    return list(filters[: len(strides)]), 0


def run_identity(backbone: str, args: Mapping[str, Any] | None) -> dict:
    """The keys a MONAI backbone adds to a pretraining run's identity; none for FPN3d, so that the runs made before
    the switch existed keep theirs and resume."""
    return {} if backbone == "fpn3d" else {"backbone": backbone, "backbone_args": network_args(backbone, args)}


def sidecar_info(info: Mapping[str, Any]) -> dict:
    """`info` (a weight file's description) without ``backbone`` and ``backbone_args`` for FPN3d, whose files describe
    it by ``base_channels`` and ``num_scales`` as they did before the switch existed."""
    if info.get("backbone", "fpn3d") == "fpn3d":
        return {k: v for k, v in info.items() if k not in ("backbone", "backbone_args")}
    return dict(info)


def check_backbone(
    backbone: str, args: Mapping[str, Any] | None, patch_size: Sequence[int], method: str | None = None
) -> None:
    """Refuses, before any work, a backbone DHR cannot read or whose strides do not fit `patch_size` (voxels).

    Args:
        backbone: the ``backbone`` key.
        args: the ``backbone_args`` key.
        patch_size: the ``patch_size`` key.
        method: the pretraining method; PCRL works on FPN3d's encoder and decoder apart, so it takes FPN3d only.

    Raises:
        BundleError: naming the key (``backbone``, ``backbone_args`` or ``patch_size``) and the nearest valid value.
    """
    if backbone not in BACKBONES:
        raise BundleError(f"backbone={backbone!r}: give one of {', '.join(BACKBONES)} (U-shaped networks DHR reads)")
    if method == "pcrl" and backbone != "fpn3d":
        raise BundleError(f"backbone={backbone!r} with PCRL: PCRL mixes FPN3d's encoder features; use --backbone fpn3d")
    if backbone == "fpn3d":
        if args:
            raise BundleError(
                f"backbone_args={dict(args)} with backbone fpn3d: FPN3d takes --base_channels and --num_scales; "
                "leave out --backbone_args, or give a MONAI backbone (segresnet, dynunet, unet)"
            )
        return  # ceil-mode pooling: any patch size
    if not isinstance(args or {}, Mapping):
        raise BundleError(f"backbone_args={args!r}: give a dictionary of {BACKBONES[backbone].__name__}'s arguments")
    full = network_args(backbone, args)
    accepted = set(inspect.signature(BACKBONES[backbone]).parameters)
    unknown = sorted(set(full) - accepted)
    if unknown:
        raise BundleError(
            f"backbone_args {unknown}: not arguments of monai.networks.nets.{BACKBONES[backbone].__name__} "
            f"(it takes {', '.join(sorted(accepted))})"
        )
    for key, value in _FIXED.items():
        if full[key] != value:
            raise BundleError(f"backbone_args {key}={full[key]!r}: the bundle's volumes need {key}={value}; omit it")
    channels, shift = _levels(backbone, full)
    factor = 2 ** (shift + len(channels) - 1)
    if any(s % factor for s in patch_size):
        nearest = [max(factor, round(s / factor) * factor) for s in patch_size]
        raise BundleError(
            f"patch_size {list(patch_size)} does not fit {backbone} with backbone_args {dict(args or {})}: its "
            f"coarsest level has stride {factor}, so every side must be a multiple of {factor}; give --patch_size "
            f"{json.dumps(nearest).replace(' ', '')}"
        )


def _keep(features: dict[int, Tensor], index: int, module: nn.Module, inputs: Any, output: Tensor) -> None:
    features[index] = output


class MonaiBackbone(nn.Module):
    """MONAI's network `backbone` built with `args`, returning its decoder's feature maps, finest first.

    Args:
        backbone: ``segresnet``, ``dynunet`` or ``unet``.
        args: arguments of the MONAI class beyond the bundle's fixed ones (3D, one input channel) and defaults.

    Attributes:
        network: the MONAI network itself (its state dict is what the bundle exports).
        out_channels: channels of each level, finest first.
        first_shift: log2 of the finest level's stride; level ``i`` has stride ``2 ** (first_shift + i)``.
    """

    def __init__(self, backbone: str, args: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.backbone = backbone
        self.args = network_args(backbone, args)
        try:
            self.network = BACKBONES[backbone](**self.args)
        except (ValueError, TypeError, AssertionError) as err:
            raise BundleError(f"backbone_args {dict(args or {})}: MONAI's {backbone} refuses them ({err})") from err
        self.out_channels, self.first_shift = _levels(backbone, self.args)
        # A plain list: the stages are the network's own modules, already in its state dict.
        self.stages: list[nn.Module] = self._decoder_stages()

    def _decoder_stages(self) -> list[nn.Module]:
        """The modules whose outputs are the decoder levels, finest first."""
        net = self.network
        if self.backbone == "segresnet":
            return [*reversed(net.up_layers), net.down_layers[-1]]
        if self.backbone == "dynunet":
            return [*reversed(net.upsamples), net.bottleneck]
        ups, block = [], net.model  # UNet nests (down, SkipConnection(inner), up) down to its bottom layer
        while isinstance(block, nn.Sequential) and len(block) == 3 and isinstance(block[1], SkipConnection):
            ups.append(block[2])
            block = block[1].submodule
        return [*ups[1:], block]  # ups[0] is the output layer

    def output_layers(self) -> list[nn.Module]:
        """The network's output layer(s): what `HEADS` names."""
        net = self.network
        if self.backbone == "segresnet":
            return [net.conv_final]
        if self.backbone == "dynunet":
            return [net.output_block, *getattr(net, "deep_supervision_heads", [])]
        return [net.model[2]]

    def head_keys(self, state: Mapping[str, Any]) -> list[str]:
        """The keys of `state` (a state dict of `network`) that belong to the network's output layer."""
        return [k for k in state if k.startswith(HEADS[self.backbone])]

    def forward(self, x: Tensor) -> list[Tensor]:
        """
        Args:
            x: (B, 1, X, Y, Z), each side a multiple of the coarsest stride (`check_backbone`).

        Returns:
            the decoder's maps, finest first; level ``i`` is (B, out_channels[i], X / s_i, Y / s_i, Z / s_i) with
            ``s_i = 2 ** (first_shift + i)``.
        """
        features: dict[int, Tensor] = {}
        handles = [stage.register_forward_hook(partial(_keep, features, i)) for i, stage in enumerate(self.stages)]
        try:
            self.network(x)  # the output layer's result is not needed: the hooks keep the decoder's maps
        finally:
            for handle in handles:
                handle.remove()
        return [features[i] for i in range(len(self.stages))]


def describe(backbone: nn.Module) -> dict:
    """What a backbone's sidecar records of its architecture: FPN3d's channels and scales, or MONAI's class and its
    full arguments (``backbone``, ``class``, ``backbone_args``)."""
    if isinstance(backbone, MonaiBackbone):
        cls = BACKBONES[backbone.backbone]
        return {
            "in_channels": 1,
            "backbone": backbone.backbone,
            "class": f"monai.networks.nets.{cls.__name__}",
            "backbone_args": backbone.args,
        }
    return {k: getattr(backbone, k, None) for k in ("in_channels", "base_channels", "num_scales")}
