"""The parameter names and shapes of the authors' FPN3d (DHR's and vox2vec's code), written out from their layout
(/work/shared/REFERENCE.md, sections 1 and 4), not read from this bundle's `FPN3d`: what their released weights hold.

- ``first_conv``: the 3x3x3 stem, ``in_channels`` -> ``base``.
- ``left_blocks.<i>`` (fine to coarse, levels 0..scales-2), ``bottom_block`` (the coarsest level) and
  ``right_blocks.<i>`` (coarse to fine, levels scales-2..0): two residual blocks ``layers.<j>``, each the sequence
  ``layers.<k>`` = BN(0), ReLU(1), conv3(2), BN(3), ReLU(4), conv3(5) at the level's width ``base * 2**level``.
- ``down_blocks.<i>``: max-pool (0), then a 1x1x1 conv (1) doubling the channels into level i + 1.
- ``up_blocks.<i>`` (coarse to fine): a 1x1x1 conv (0) halving the channels, then the upsampling (1).
- ``skip_blocks.<i>`` (coarse to fine): the 1x1x1 conv on the skip connection, at the level's width.
Convolutions carry a bias; BatchNorm carries weight, bias, running_mean, running_var, num_batches_tracked.
"""

from __future__ import annotations

import torch

BATCH_NORM = ("weight", "bias", "running_mean", "running_var", "num_batches_tracked")


def _stage(prefix: str, channels: int) -> dict[str, tuple[int, ...]]:
    """Two pre-activation residual blocks of constant width."""
    entries: dict[str, tuple[int, ...]] = {}
    for block in range(2):
        for index in (0, 2, 3, 5):  # the ReLUs (1, 4) hold nothing
            name = f"{prefix}.layers.{block}.layers.{index}"
            if index in (0, 3):
                entries |= {f"{name}.{p}": () if p == "num_batches_tracked" else (channels,) for p in BATCH_NORM}
            else:
                entries |= {f"{name}.weight": (channels, channels, 3, 3, 3), f"{name}.bias": (channels,)}
    return entries


def fpn3d_layout(in_channels: int, base: int, scales: int) -> dict[str, tuple[int, ...]]:
    """Name -> shape of every entry of the authors' FPN3d state dict."""
    width = [base * 2**level for level in range(scales)]
    entries = {"first_conv.weight": (base, in_channels, 3, 3, 3), "first_conv.bias": (base,)}
    for i in range(scales - 1):
        entries |= _stage(f"left_blocks.{i}", width[i])
        entries |= {f"down_blocks.{i}.1.weight": (width[i + 1], width[i], 1, 1, 1)}
        entries |= {f"down_blocks.{i}.1.bias": (width[i + 1],)}
    entries |= _stage("bottom_block", width[-1])
    for i in range(scales - 1):
        level = scales - 2 - i
        entries |= {f"up_blocks.{i}.0.weight": (width[level], width[level + 1], 1, 1, 1)}
        entries |= {f"up_blocks.{i}.0.bias": (width[level],)}
        entries |= {f"skip_blocks.{i}.weight": (width[level], width[level], 1, 1, 1)}
        entries |= {f"skip_blocks.{i}.bias": (width[level],)}
        entries |= _stage(f"right_blocks.{i}", width[level])
    return entries


def authors_state(in_channels: int, base: int, scales: int, seed: int = 0) -> dict[str, torch.Tensor]:
    """A state dict as the authors' code saves one, of random values: float tensors of the layout's shapes (running
    variances positive), integer batch counts."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for name, shape in fpn3d_layout(in_channels, base, scales).items():
        if name.endswith("num_batches_tracked"):
            state[name] = torch.tensor(int(torch.randint(1, 1000, (), generator=generator)))
        elif name.endswith("running_var"):
            state[name] = torch.rand(shape, generator=generator) + 0.5
        else:
            state[name] = torch.randn(shape, generator=generator)
    return state
