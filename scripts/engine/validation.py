"""Validation during downstream training: per-class Dice metrics, and each process's share of the cases under
``torchrun``."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.handlers import MeanDice, from_engine
from scripts.utils import distributed

__all__ = ["per_class_dice", "ValidationShare"]


def per_class_dice(num_classes: int) -> dict[str, MeanDice]:
    """Validation Dice of each foreground class as its own scalar metric ``val_dice_<c>`` (c = 1..num_classes).

    Scalars, rather than one per-class vector, so that stats, TensorBoard and MLflow log every class.
    """

    def channel(c: int) -> Callable:
        def select(output: list[dict]) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
            preds, labels = from_engine(["pred", "label"])(output)
            return [p[c : c + 1] for p in preds], [y[c : c + 1] for y in labels]

        return select

    return {
        f"val_dice_{c + 1}": MeanDice(include_background=True, output_transform=channel(c)) for c in range(num_classes)
    }


class ValidationShare(torch.utils.data.Dataset):
    """
    This process's share of the validation cases under ``torchrun``: cases ``rank, rank + W, ...`` of `dataset`, so that
    each case is validated on exactly one process and counts once in the Dice scores that MONAI's metrics gather over
    the processes, the mean that picks the best checkpoint included. (A ``DistributedSampler`` pads the shares with
    repeats to equal lengths, which counted up to W - 1 cases twice.)

    Shares may differ by one case: validation calls no collective per case, only the metrics' gather at its end. A
    process left without a case (fewer cases than processes) must still take part in that gather: it validates case 0
    with an empty label, whose Dice is NaN for every class (MONAI's ``DiceMetric`` ignores empty ground truth), and
    every mean skips NaN.

    Args:
        dataset: all validation cases, each a dict holding `label_key`.
        label_key: the key of the label.
        rank: this process's rank; None: `scripts.utils.distributed.rank()`.
        world_size: number of processes; None: `scripts.utils.distributed.world_size()`.
    """

    def __init__(
        self,
        dataset: Sequence[Mapping[str, Any]],
        label_key: str = "label",
        rank: int | None = None,
        world_size: int | None = None,
    ) -> None:
        self.dataset = dataset
        self.label_key = label_key
        rank = distributed.rank() if rank is None else rank
        world_size = distributed.world_size() if world_size is None else world_size
        self.indices = list(range(rank, len(dataset), world_size))
        self.blank = not self.indices
        if self.blank:
            self.indices = [0]

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, index: int) -> dict[str, Any]:
        case = dict(self.dataset[self.indices[index]])
        if self.blank:
            case[self.label_key] = torch.zeros_like(case[self.label_key])
        return case
