"""Batches of pretraining: the augmentation a run names, and ``prepare_batch`` that augments each batch on the device
with randomness drawn from the batch's own sample indices."""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from scripts.networks.performance import memory_format
from scripts.ssl.local_augmentations import LocalAugmentations
from scripts.ssl.vox2vec_augmentations import Vox2VecAugmentations
from scripts.utils import distributed
from scripts.utils.randomness import torch_generator

__all__ = ["build_augmentation", "SSLBatch", "batch_generator"]

logger = logging.getLogger(__name__)


def build_augmentation(
    name: str, modality: str, announce: bool = True
) -> LocalAugmentations | Vox2VecAugmentations | None:
    """The pretraining augmentation named by the config key `augmentations`.

    Args:
        name: "local" (DHR's local augmentations), "vox2vec" (blur or sharpen, noise, HU window) or "none".
        modality: the data's preset, which vox2vec's augmentations need ("ct_wide" or "mri").
        announce: log which augmentations the run uses (not when the keys are only checked).
    """
    descriptions = {
        "local": "local (DHR): pixel shuffling, intensity remap, in-painting",
        "vox2vec": "vox2vec's: blur or sharpen, noise, intensity window",
        "none": "none",
    }
    if announce and name in descriptions:  # an ablation must be visible in the run's output
        logger.info(f"augmentations: {descriptions[name]}")
    if name == "local":
        return LocalAugmentations()
    if name == "vox2vec":
        return Vox2VecAugmentations(modality)
    if name == "none":
        return None
    raise ValueError(f"Unknown augmentations={name!r}: the key `augmentations` must be 'local', 'vox2vec' or 'none'.")


class SSLBatch:
    """
    ``prepare_batch`` for ``SupervisedTrainer``: moves voxel-pair batches to the device and augments them there.

    A batch from :class:`scripts.ssl.sampler.VoxelPairSamplerd` holds V volumes x N pairs; both views of all
    P = V * N pairs are stacked into one network input (2P, 1, X, Y, Z), view 1 first, so that one backbone pass serves
    both. Each view is augmented independently, batched, on the training device; the clean views are kept as
    restoration targets.

    The augmentation draws from ``torch_generator(seed, rank, s)`` on the device (`scripts.utils.randomness`), s = the
    batch's first ``sample_index``, so a step's augmentations depend on its samples alone (resumed runs reproduce
    them). A batch without ``sample_index`` uses torch's default generator.

    Args:
        augment: batched augmentation ``(B, 1, X, Y, Z), generator=... -> (B, 1, X, Y, Z)``, or None for none.
        seed: the run's seed.
        channels_last: give the network its inputs in the channels-last 3D memory format (as its weights, see
            `scripts.networks.performance`).

    Returns (when called): ``inputs`` (2P, 1, X, Y, Z); ``targets`` dict with ``clean`` (2P, 1, X, Y, Z) and ``valid``
    (P, K); no positional args; kwargs ``voxels`` (2P, K, 3) and ``valid`` (2P, K) for the network (each view's slots
    are valid where its pair's are).
    """

    def __init__(
        self, augment: Callable[..., torch.Tensor] | None = None, seed: int = 0, channels_last: bool = False
    ) -> None:
        self.augment = augment
        self.seed = seed
        self.memory_format = memory_format(channels_last)

    def __call__(
        self,
        batchdata: dict[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor], tuple, dict[str, torch.Tensor]]:
        def flat(key: str) -> torch.Tensor:  # (V, N, ...) -> (V * N, ...)
            return batchdata[key].flatten(0, 1).to(device=device, non_blocking=non_blocking, **kwargs)

        clean = torch.cat([flat("view1"), flat("view2")])
        voxels = torch.cat([flat("voxels1"), flat("voxels2")])
        if self.augment is None:
            inputs = clean
        elif "sample_index" in batchdata:
            inputs = self.augment(clean, generator=batch_generator(batchdata, self.seed, clean.device))
        else:
            inputs = self.augment(clean)
        valid = flat("valid")
        inputs = inputs.contiguous(memory_format=self.memory_format)
        return inputs, {"clean": clean, "valid": valid}, (), {"voxels": voxels, "valid": torch.cat([valid, valid])}


def batch_generator(
    batchdata: dict[str, torch.Tensor], seed: int, device: torch.device, *stream: int
) -> torch.Generator:
    """``torch_generator(seed, rank, s, *stream)`` on ``device``, s = the batch's first ``sample_index``.

    A step's randomness; ``stream`` (e.g. 1) gives a further, independent generator of the same step.
    """
    first = int(batchdata["sample_index"].reshape(-1)[0])  # the indices stay on the CPU: no device sync
    return torch_generator(seed, distributed.rank(), first, *stream, device=device)
