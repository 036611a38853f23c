"""Pretrained backbone weights into a network: what fine-tuning, linear evaluation, visualisation and the weight
import read.

An FPN3d is read from a checkpoint in any of these forms: a plain `FPN3d` state dict (vox2vec's release), a PyTorch
Lightning checkpoint ``{"state_dict": ...}`` (DHR's release), keys prefixed ``backbone.`` (a full pretraining
checkpoint; the heads are dropped) or this bundle's own training checkpoint ``{"network": ...}``; a leading
``module.`` (DataParallel) is stripped. A MONAI network (`scripts.networks.backbones.MonaiBackbone`) is read from the
plain state dict pretraining exports, all but its output layer. Every refusal names the file.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

import torch
from scripts.networks.backbones import MonaiBackbone
from scripts.networks.fpn3d import FPN3d
from scripts.utils.errors import BundleError
from torch import Tensor

__all__ = ["extract_backbone_state", "read_checkpoint", "backbone_state", "load_backbone", "load_pretrained"]

_FPN_MODULES = {"first_conv", "left_blocks", "down_blocks", "bottom_block", "up_blocks", "skip_blocks", "right_blocks"}


def _strip(prefix: str, state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    return {k.removeprefix(prefix): v for k, v in state.items()}


def extract_backbone_state(checkpoint: Mapping) -> dict[str, Tensor]:
    """Returns the `FPN3d` state dict held by `checkpoint`, in any of the forms listed in the module docstring.

    Raises:
        ValueError: when no `FPN3d` parameter names are found.
    """
    state = checkpoint
    for container in ("network", "state_dict"):
        if isinstance(state.get(container), Mapping):
            state = state[container]
            break
    state = _strip("module.", state)
    if any(k.startswith("backbone.") for k in state):
        state = _strip("backbone.", {k: v for k, v in state.items() if k.startswith("backbone.")})
    if not any(k.split(".", 1)[0] in _FPN_MODULES for k in state):
        found = ", ".join(list(state)[:5]) or "none"
        raise ValueError(f"no FPN3d weights found (expected keys such as 'first_conv.weight'; found: {found})")
    return state


def read_checkpoint(path: str | os.PathLike) -> Mapping:
    """The dictionary saved at ``path`` (weights only).

    Raises:
        FileNotFoundError: when ``path`` does not exist.
        ValueError: naming ``path``, when it is not a readable PyTorch file holding a dictionary.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (pickle, zip, RuntimeError) for unreadable files
        raise ValueError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({err})") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state dict or a checkpoint dictionary, got {type(checkpoint).__name__}")
    return checkpoint


def backbone_state(path: str | os.PathLike, checkpoint: Mapping) -> dict[str, Tensor]:
    try:
        return extract_backbone_state(checkpoint)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err


def load_backbone(path: str, backbone: FPN3d) -> FPN3d:
    """Loads the backbone weights held by the checkpoint at `path` into `backbone` (strictly) and returns it.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: naming `path`, when the file holds no `FPN3d` weights or they do not fit `backbone`.
    """
    state = backbone_state(path, read_checkpoint(path))

    expected = backbone.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    mismatched = [
        f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state and state[k].shape != v.shape
    ]
    if missing or unexpected or mismatched:
        problems = [
            f"{len(found)} {what} (e.g. {', '.join(found[:3])})"
            for what, found in (("missing", missing), ("unexpected", unexpected), ("shape-mismatched", mismatched))
            if found
        ]
        raise ValueError(
            f"{path}: weights do not fit FPN3d(in_channels={backbone.in_channels}, base_channels="
            f"{backbone.base_channels}, num_scales={backbone.num_scales}): {'; '.join(problems)}. Check "
            "--base_channels/--num_scales (DHR: 32/5, vox2vec: 16/6)."
        )
    backbone.load_state_dict(state, strict=True)
    return backbone


def load_pretrained(path: str, backbone: MonaiBackbone, key: str = "pretrained_ckpt") -> None:
    """Loads the pretrained MONAI network at `path` (a plain state dict, as exported) into `backbone`, all but its
    output layer, which was never trained and may differ in width (``out_channels`` = the classes when fine-tuning).

    Args:
        path: the weight file.
        backbone: the network its sidecar describes.
        key: the option or config key that gave `path`, named in the errors.

    Raises:
        BundleError: naming `key` and `path`, when it does not exist or its tensors do not fit the network.
    """
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError as err:
        raise BundleError(f"{key} {path} does not exist: give the path of an existing weight file") from err
    expected = backbone.network.state_dict()
    body = {k: v for k, v in state.items() if k not in backbone.head_keys(state)}
    wanted = {k: v for k, v in expected.items() if k not in backbone.head_keys(expected)}
    wrong = sorted(set(body) ^ set(wanted)) + [k for k in body if k in wanted and body[k].shape != wanted[k].shape]
    if wrong:
        raise BundleError(
            f"{key} {path} does not fit {backbone.backbone} with arguments {backbone.args} ({len(wrong)} "
            f"tensors differ, e.g. {', '.join(wrong[:3])}): give the file its sidecar, as pretraining wrote it"
        )
    backbone.network.load_state_dict(body, strict=False)
