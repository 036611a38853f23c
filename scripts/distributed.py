"""Process rank and world size under ``torchrun``, with single-process values when no process group exists."""

import torch.distributed as dist

__all__ = ["rank", "world_size", "is_main"]


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes in the default process group; 1 without one."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """Whether this process writes files (checkpoints, exports, logs): rank 0 alone."""
    return rank() == 0
