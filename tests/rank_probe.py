"""Test-only handler, stacked on a workflow by tests/configs/rank_probe.yaml: what each rank drew and ended with."""

import hashlib
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from scripts.utils.distributed import rank, unwrap
from torch import nn


class RankProbe:
    """Records a hash of every batch this rank drew and, at the end, writes ``<folder>/rank<r>.pt`` with the hashes,
    the final iteration, the network's parameters and buffers and whether the trainer's DDP wrapper searched for
    unused parameters. With ``nan_rank`` set, that rank's input batch of
    iteration ``nan_iteration`` is made NaN (to test the non-finite check across ranks)."""

    def __init__(self, network: nn.Module, folder: str, nan_rank: int = -1, nan_iteration: int = 0) -> None:
        self.network = network
        self.folder = Path(folder)
        self.nan_rank, self.nan_iteration = nan_rank, nan_iteration
        self.batches: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_STARTED, self.started)
        engine.add_event_handler(Events.COMPLETED, self.completed)

    def started(self, engine: Engine) -> None:
        batch = engine.state.batch
        first = batch[0] if isinstance(batch, list) else batch
        image = first["view1" if "view1" in first else "image"]
        self.batches.append(hashlib.sha1(image.numpy().tobytes()).hexdigest())
        if rank() == self.nan_rank and engine.state.iteration == self.nan_iteration:
            image.fill_(float("nan"))

    def completed(self, engine: Engine) -> None:
        module = unwrap(self.network)
        self.folder.mkdir(parents=True, exist_ok=True)
        torch.save(
            {
                "batches": self.batches,
                "iteration": engine.state.iteration,
                "find_unused_parameters": engine.network.find_unused_parameters,
                "parameters": {k: v.detach().clone() for k, v in module.named_parameters()},
                "buffers": {k: v.clone() for k, v in module.named_buffers()},
            },
            self.folder / f"rank{rank()}.pt",
        )
