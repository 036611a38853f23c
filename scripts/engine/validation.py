"""Validation during downstream training: per-class Dice metrics, each process's share of the cases under
``torchrun``, and the number of sliding windows per forward pass that validation, evaluation and inference run."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from monai.handlers import MeanDice, from_engine
from scripts.utils import distributed
from scripts.utils.errors import BundleError
from torch import nn

__all__ = ["per_class_dice", "ValidationShare", "sw_batch_size", "windows_that_fit"]

# At most this many windows per forward pass: beyond a batch that fills the device, more windows only add memory.
MAX_SW_BATCH_SIZE = 32


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


def sw_batch_size(
    network: nn.Module,
    roi_size: Sequence[int],
    device: torch.device | str,
    amp: bool,
    given: int | None = None,
    in_channels: int = 1,
) -> int:
    """Windows per forward pass of the sliding-window inferer: ``given``, else sized to the device.

    On CUDA, one window's forward pass (no gradient, bfloat16 under ``amp``, as the evaluators run it) is measured and
    as many windows are batched as fit in half the memory free now (:func:`windows_that_fit`); the other half is left
    to the stitched output of a whole volume and to training's cached blocks. On CPU: 1, as a batch of windows is no
    faster per window there (FPN3d 32/5, 64x64x32 windows, one thread: 1.14 s a window alone, 1.17 s in a batch of 4)
    and takes that many times the memory.

    Args:
        network: the segmentation network on ``device``, input (B, in_channels, *roi_size); left in its mode.
        roi_size: the window's size in voxels.
        device: where the inferer runs.
        amp: whether the evaluators run under bfloat16 autocast.
        given: the ``sw_batch_size`` key; None sizes it.
        in_channels: the network's input channels.

    Raises:
        BundleError: naming the key ``sw_batch_size`` when ``given`` is not a number >= 1.
    """
    if given is not None:
        if isinstance(given, bool) or not isinstance(given, int) or given < 1:
            raise BundleError(f"sw_batch_size={given!r}: give a number of windows >= 1, or leave it out to size it.")
        return given
    device = torch.device(device)
    if device.type != "cuda":
        return 1
    training = network.training
    network.eval()
    torch.cuda.synchronize(device)
    before = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
        network(torch.zeros(1, in_channels, *roi_size, device=device))
    window_bytes = torch.cuda.max_memory_allocated(device) - before
    network.train(training)
    free_bytes, _ = torch.cuda.mem_get_info(device)
    cached_bytes = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)  # reusable, not "free"
    return windows_that_fit(window_bytes, free_bytes + cached_bytes)


def windows_that_fit(window_bytes: int, free_bytes: int, share: float = 0.5) -> int:
    """How many windows of ``window_bytes`` each (a forward pass's peak memory) fit in ``share`` of ``free_bytes``:
    at least 1, at most ``MAX_SW_BATCH_SIZE``."""
    return max(1, min(MAX_SW_BATCH_SIZE, int(share * free_bytes) // max(window_bytes, 1)))
