"""One rank of tests/test_distributed.py's gathered-InfoNCE test, in a module light enough for spawned processes."""

import os

import torch
import torch.distributed as dist
from scripts.ssl.losses import info_nce


def gathered_info_nce(rank: int, port: int, z1, z2, valid, folder: str) -> None:
    """Rank `rank` of 2 holds rows [5 * rank, 5 * rank + 5); writes its loss and gradients to ``folder/rank<r>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)
    rows = slice(rank * 5, rank * 5 + 5)
    a, b = z1[rows].clone().requires_grad_(), z2[rows].clone().requires_grad_()
    loss = info_nce(a, b, 0.1, valid[rows], gather=True)
    (loss / 2).backward()  # DDP averages the ranks' gradients
    torch.save({"loss": loss.detach(), "grad1": a.grad, "grad2": b.grad}, f"{folder}/rank{rank}.pt")
    dist.destroy_process_group()
