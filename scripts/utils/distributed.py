"""Process rank and world size under ``torchrun``, with single-process values when no process group exists, and the
few collectives the bundle needs (process group set-up, rank-0-first preparation, gathers, a collective flag).

Every function works without a process group (one process: rank 0 of 1), so single-device configs call them too.
"""

from __future__ import annotations

import datetime
import os
import time
from collections.abc import Callable
from typing import TypeVar

import ignite.distributed as idist
import torch
import torch.distributed as dist
from torch import nn

__all__ = [
    "rank",
    "world_size",
    "is_main",
    "local_rank",
    "device",
    "cpu_workers",
    "init_process_group",
    "destroy_process_group",
    "main_first",
    "unwrap",
    "data_parallel",
    "all_gather",
    "all_gather_with_grad",
    "average_",
    "any_rank",
    "stop_other_ranks",
]

T = TypeVar("T")

# Seconds a rank that did not fail waits before it exits, so that the failing rank's message is printed before
# `torchrun` stops the group (it stops every process once one has exited with an error).
OTHER_RANKS_GRACE_S = 10.0
# Seconds a rank waits in a collective for the others (e.g. while rank 0 writes a checkpoint) before the run fails.
# Set explicitly: NCCL's default is 10 minutes. No collective waits for the cache preparation (scripts.data.cache).
COLLECTIVE_TIMEOUT_S = 1800.0


def _initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank in the default process group; 0 without one."""
    return dist.get_rank() if _initialized() else 0


def world_size() -> int:
    """Number of processes in the default process group; 1 without one."""
    return dist.get_world_size() if _initialized() else 1


def is_main() -> bool:
    """Whether this process writes files (checkpoints, exports, logs): rank 0 alone."""
    return rank() == 0


def local_rank() -> int:
    """This process's rank on its machine (``LOCAL_RANK``, set by ``torchrun``); 0 outside ``torchrun``."""
    return int(os.environ.get("LOCAL_RANK", 0))


def device() -> torch.device:
    """The device of this process: GPU ``LOCAL_RANK`` when CUDA is available, else the CPU."""
    return torch.device(f"cuda:{local_rank()}" if torch.cuda.is_available() else "cpu")


def cpu_workers(limit: int = 4) -> int:
    """Data-loader workers per process: at most `limit`, and no more than this process's share of the CPUs it may use
    (the CPUs of its affinity mask divided among the ``LOCAL_WORLD_SIZE`` processes of its machine); 0 loads data in
    the training process itself."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return min(limit, cpus // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))


def init_process_group(timeout_s: float = COLLECTIVE_TIMEOUT_S) -> torch.device:
    """Joins the ``torchrun`` process group (NCCL on CUDA, gloo on CPU) unless joined already, and makes GPU
    ``LOCAL_RANK`` this process's current device.

    Args:
        timeout_s: seconds a collective waits for every rank before it fails.

    Returns:
        this process's device (`device`).
    """
    if not _initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        dist.init_process_group(backend=backend, timeout=datetime.timedelta(seconds=timeout_s))
        # ignite sets up its view of the group (with collectives) on its first call, e.g. a checkpoint saver's on rank
        # 0 alone, which would wait forever for the other ranks: set it up now, on every rank.
        idist.sync()
    if torch.cuda.is_available():
        torch.cuda.set_device(local_rank())
    return device()


def destroy_process_group() -> None:
    """Leaves the process group at the end of a run (``finalize``); nothing without one."""
    if _initialized():
        dist.destroy_process_group()


def stop_other_ranks() -> None:
    """Ends a rank that did not fail itself, after another rank reported a failure it will raise: quietly (the failing
    rank prints the one message), with exit status 1, after a grace period in which ``torchrun`` usually stops it."""
    time.sleep(OTHER_RANKS_GRACE_S)
    raise SystemExit(1)


def main_first(fn: Callable[..., T], *args, **kwargs) -> T:
    """``fn(*args, **kwargs)`` on rank 0 first, then on the other ranks: for short preparation that writes files (the
    demo data) once, which the other ranks then read. The others wait in a collective, so it must end well within
    `COLLECTIVE_TIMEOUT_S`: a dataset's cache is prepared without one (`scripts.data.cache.prepare_volumes`).

    The ranks wait for rank 0 in a collective that carries whether ``fn`` failed there, so a failure on rank 0 ends
    every rank instead of leaving them waiting at a barrier: rank 0 raises the error, the others exit quietly.
    ignite's ``idist.one_rank_first`` waits at a plain barrier, which hangs the others when rank 0 fails.
    """
    if world_size() == 1:
        return fn(*args, **kwargs)
    failed = [False]
    if is_main():
        try:
            result = fn(*args, **kwargs)
        except BaseException:
            dist.broadcast_object_list([True], src=0)
            raise
        dist.broadcast_object_list(failed, src=0)
        return result
    dist.broadcast_object_list(failed, src=0)
    if failed[0]:
        stop_other_ranks()
    return fn(*args, **kwargs)


def unwrap(network: nn.Module) -> nn.Module:
    """The network inside a ``DistributedDataParallel`` wrapper, or `network` itself."""
    return network.module if isinstance(network, nn.parallel.DistributedDataParallel) else network


def data_parallel(module: nn.Module) -> nn.parallel.DistributedDataParallel:
    """`module` (on this process's device) in a ``DistributedDataParallel`` that reduces the gradients of the
    parameters that require one now, and only those: DDP fixes that set when it is built. A collective (it broadcasts
    rank 0's parameters and buffers), so every rank calls it at the same point."""
    device = next(module.parameters()).device
    return nn.parallel.DistributedDataParallel(module, device_ids=[device.index] if device.type == "cuda" else None)


def all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """Every rank's `tensor` (same shape on each), concatenated along dim 0 in rank order; no gradient."""
    if world_size() == 1:
        return tensor
    parts = [torch.empty_like(tensor) for _ in range(world_size())]
    dist.all_gather(parts, tensor.contiguous())
    return torch.cat(parts)


class _AllGatherWithGrad(torch.autograd.Function):
    """All-gather whose backward sums each rank's share of the gradient over all ranks (an all-reduce of the whole
    gradient, then this rank's slice). Own code: torch.distributed.nn's all_gather is deprecated in PyTorch 2.13, and
    its successor (``_functional_collectives``) is private."""

    @staticmethod
    def forward(ctx, tensor: torch.Tensor) -> torch.Tensor:
        return all_gather(tensor)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        dist.all_reduce(grad)
        return grad.chunk(world_size())[rank()]


def all_gather_with_grad(tensor: torch.Tensor) -> torch.Tensor:
    """Like `all_gather`, differentiable: the gradient that reaches this rank's `tensor` is the sum over ranks of the
    gradients of their losses with respect to it (so DDP's averaging of parameter gradients over W ranks turns the sum
    of the ranks' losses divided by W into the loss that is differentiated)."""
    return _AllGatherWithGrad.apply(tensor) if world_size() > 1 else tensor


def average_(tensors: list[torch.Tensor]) -> None:
    """Replaces each floating point tensor by its mean over the ranks, in place, in one collective; no host sync."""
    if world_size() == 1 or not tensors:
        return
    flat = torch.cat([t.flatten() for t in tensors])
    dist.all_reduce(flat)
    flat /= world_size()
    for tensor, mean in zip(tensors, flat.split([t.numel() for t in tensors]), strict=True):
        tensor.copy_(mean.view_as(tensor))


def any_rank(flag: torch.Tensor) -> bool:
    """Whether `flag` (a bool tensor, any shape) holds True on any rank. A collective: every rank must call it at the
    same point. One host-device synchronisation."""
    flag = flag.any().to(torch.int32)
    if world_size() > 1:
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag)
