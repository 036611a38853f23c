"""How a network runs on its device: moved there, optionally in the channels-last 3D memory format and compiled.

Both options change how a step computes, not what (up to rounding): they are opt-in keys of the pretraining config
(``channels_last``, ``compile``) and not part of a run's identity. The state dict keeps its keys and layout-free
values, so checkpoints and exported weights load whatever the options.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["memory_format", "place"]


def memory_format(channels_last: bool) -> torch.memory_format:
    """The memory format of 5D tensors (N, C, X, Y, Z): ``channels_last_3d`` (C innermost) or the default."""
    return torch.channels_last_3d if channels_last else torch.contiguous_format


def place(network: nn.Module, device: torch.device, channels_last: bool = False, compile: bool = False) -> nn.Module:
    """Moves `network` to `device`, its 5D weights in :func:`memory_format`; with `compile`, compiles its forward in
    place (``nn.Module.compile``: the module and its state dict keys stay the same, unlike ``torch.compile``'s
    wrapper), traced at the first step.

    Returns:
        `network` itself.
    """
    network.to(device=device, memory_format=memory_format(channels_last))
    if compile:
        network.compile()
    return network
