"""Turns released DHR / vox2vec weights into this bundle's pretrained-backbone file (a plain `FPN3d` state dict).

Usage::

    python -m scripts.import_weights SRC DST [--base_channels 32] [--num_scales 5]

Accepted inputs: a plain `FPN3d` state dict (vox2vec's release), a PyTorch Lightning checkpoint
``{"state_dict": ...}`` (DHR's release), keys prefixed ``backbone.`` (a full pretraining checkpoint; the heads are
dropped), and this bundle's own training checkpoint ``{"network": ...}``. A leading ``module.`` (DataParallel) is
stripped.
"""

import argparse
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from scripts.networks import FPN3d

__all__ = ["extract_backbone_state", "load_backbone", "main"]

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


def load_backbone(path: str, backbone: FPN3d) -> FPN3d:
    """Loads the backbone weights held by the checkpoint at `path` into `backbone` (strictly) and returns it.

    Raises:
        FileNotFoundError: when `path` does not exist.
        ValueError: naming `path`, when the file holds no `FPN3d` weights or they do not fit `backbone`.
    """
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file")
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises several types (pickle, zip, RuntimeError) for unreadable files
        raise ValueError(f"{path}: cannot be read as a weights-only PyTorch checkpoint ({err})") from err
    if not isinstance(checkpoint, Mapping):
        raise ValueError(f"{path}: expected a state dict or a checkpoint dictionary, got {type(checkpoint).__name__}")
    try:
        state = extract_backbone_state(checkpoint)
    except ValueError as err:
        raise ValueError(f"{path}: {err}") from err

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


def main(argv: list[str] | None = None) -> None:
    """Command line entry point; exits with status 1 and a one-line message on a missing or unfitting file."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.import_weights",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", help="released weights or checkpoint (.pt / .ckpt)")
    parser.add_argument("dst", help="output file: the plain FPN3d state dict")
    parser.add_argument("--base_channels", type=int, default=32, help="32 for DHR, 16 for vox2vec")
    parser.add_argument("--num_scales", type=int, default=5, help="5 for DHR, 6 for vox2vec")
    args = parser.parse_args(argv)

    try:
        backbone = load_backbone(args.src, FPN3d(1, args.base_channels, args.num_scales))
    except (FileNotFoundError, ValueError) as err:
        parser.exit(1, f"error: {err}\n")
    state = backbone.state_dict()
    Path(args.dst).parent.mkdir(parents=True, exist_ok=True)
    torch.save(state, args.dst)
    num_parameters = sum(p.numel() for p in backbone.parameters())
    print(
        f"saved {len(state)} tensors ({num_parameters:,} parameters) of FPN3d(1, {args.base_channels}, "
        f"{args.num_scales}) from {args.src} to {args.dst}"
    )


if __name__ == "__main__":
    main()
