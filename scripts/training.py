"""Pieces of the self-supervised training step that plug into MONAI's ``SupervisedTrainer``: batches and handlers."""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import MeanDice, from_engine
from torch import nn

from scripts import distributed
from scripts.randomness import torch_generator
from scripts.weights import save_weights

__all__ = [
    "SSLBatch",
    "batch_generator",
    "GradientClipping",
    "NonFiniteLossGuard",
    "ProgressBar",
    "ExportBackbone",
    "latest_checkpoint",
    "per_class_dice",
]

logger = logging.getLogger(__name__)


class SSLBatch:
    """
    ``prepare_batch`` for ``SupervisedTrainer``: moves voxel-pair batches to the device and augments them there.

    A batch from :class:`scripts.sampler.VoxelPairSamplerd` holds V volumes x N pairs; both views of all P = V * N pairs
    are stacked into one network input (2P, 1, X, Y, Z), view 1 first, so that one backbone pass serves both. Each view
    is augmented independently, batched, on the training device; the clean views are kept as restoration targets.

    The augmentation draws from ``torch_generator(seed, rank, s)`` on the device (`scripts.randomness`), s = the batch's
    first ``sample_index``, so a step's augmentations depend on its samples alone (resumed runs reproduce them). A batch
    without ``sample_index`` uses torch's default generator.

    Args:
        augment: batched augmentation ``(B, 1, X, Y, Z), generator=... -> (B, 1, X, Y, Z)``, or None for none.
        seed: the run's seed.

    Returns (when called): ``inputs`` (2P, 1, X, Y, Z); ``targets`` dict with ``clean`` (2P, 1, X, Y, Z) and ``valid``
    (P, K); no positional args; kwargs ``voxels`` (2P, K, 3) for the network.
    """

    def __init__(self, augment: Callable[..., torch.Tensor] | None = None, seed: int = 0) -> None:
        self.augment = augment
        self.seed = seed

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
        return inputs, {"clean": clean, "valid": flat("valid")}, (), {"voxels": voxels}


def batch_generator(
    batchdata: dict[str, torch.Tensor], seed: int, device: torch.device, *stream: int
) -> torch.Generator:
    """``torch_generator(seed, rank, s, *stream)`` on ``device``, s = the batch's first ``sample_index``.

    A step's randomness; ``stream`` (e.g. 1) gives a further, independent generator of the same step.
    """
    first = int(batchdata["sample_index"].reshape(-1)[0])  # the indices stay on the CPU: no device sync
    return torch_generator(seed, distributed.rank(), first, *stream, device=device)


class GradientClipping:
    """Clips the gradient norm after each backward pass (AMP gradients unscaled first): MONAI's trainer can't."""

    def __init__(self, max_norm: float = 1.0) -> None:
        self.max_norm = max_norm

    def attach(self, engine: SupervisedTrainer) -> None:
        engine.add_event_handler(IterationEvents.BACKWARD_COMPLETED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        if engine.scaler is not None:
            engine.scaler.unscale_(engine.optimizer)
        nn.utils.clip_grad_norm_(engine.network.parameters(), self.max_norm)


class NonFiniteLossGuard:
    """
    Stops training with a clear error when the loss is NaN or infinite.

    It checks before the backward pass, so the weights are still those of the last good step and no checkpoint is
    written with broken weights (ignite's ``TerminateOnNan`` checks after the optimiser step and ends "successfully").

    Args:
        checkpoint_dir: where the full-state checkpoints are, for the message.
        loss: the loss function; its per-term values (``terms`` as in ``HybridLoss``), if any, go into the message.
    """

    def __init__(self, checkpoint_dir: str, loss: nn.Module | None = None) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.loss = loss

    def attach(self, engine: SupervisedTrainer) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        loss = engine.state.output["loss"]
        if torch.isfinite(loss).all():
            return
        terms = getattr(self.loss, "terms", {})
        detail = ", ".join(f"{k}={float(v):.4g}" for k, v in terms.items())
        last = latest_checkpoint(self.checkpoint_dir)
        lr = engine.optimizer.param_groups[0]["lr"]
        # the keys that made a NaN certain (e.g. voxels_per_pair 0) are refused before training (scripts.runs)
        raise FloatingPointError(
            f"Non-finite loss ({float(loss)}; {detail}) at iteration {engine.state.iteration}. Training stopped before "
            f"the optimiser step. The last good checkpoint is intact: {last or 'none written yet'}; rerun the same "
            "command to resume from it. If it happens again at the same point, look for volumes with extreme or "
            f"non-finite intensities, or train with a lower --learning_rate (now {lr:g})."
        )


class ProgressBar(_IgniteProgressBar):
    """Ignite's progress bar, attachable from a bundle config (which calls ``attach(engine)`` alone)."""

    def __init__(self, output_transform: Callable | None = None, **kwargs) -> None:
        super().__init__(**kwargs)
        self._output_transform = output_transform

    def attach(self, engine: Engine, *args, **kwargs) -> None:  # type: ignore[override]
        super().attach(engine, output_transform=self._output_transform)


class ExportBackbone:
    """
    Saves the backbone's plain ``state_dict`` and its sidecar (``scripts.weights``) when training completes: the files
    downstream workflows load.

    Only on completion: an interrupted or failed run must not overwrite a good earlier export. Use
    ``python -m scripts.import_weights <full checkpoint> <file>`` to export from an intermediate checkpoint. Only rank 0
    writes.

    Args:
        backbone: the module whose weights are exported; its ``in_channels``, ``base_channels`` and ``num_scales``
            (an FPN3d's) go into the sidecar.
        path: destination file; written atomically, with the sidecar ``<path stem>.json``.
        info: what else the sidecar records: ``modality``, ``patch_size``, ``method``.
    """

    def __init__(self, backbone: nn.Module, path: str, info: Mapping[str, Any] | None = None) -> None:
        self.backbone = backbone
        self.path = Path(path)
        self.info = dict(info or {})

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not distributed.is_main():
            return
        architecture = {k: getattr(self.backbone, k, None) for k in ("in_channels", "base_channels", "num_scales")}
        save_weights(self.backbone.state_dict(), self.path, {"kind": "backbone", **architecture, **self.info})
        logger.info(f"Exported the pretrained backbone to {self.path}")


def latest_checkpoint(checkpoint_dir: str, pattern: str = r"checkpoint_iteration=(\d+)\.pt") -> str | None:
    """The full-state checkpoint with the highest iteration in ``checkpoint_dir``, or None if there is none."""
    found: Sequence[tuple[int, Path]] = [
        (int(m.group(1)), p) for p in Path(checkpoint_dir).glob("*.pt") if (m := re.fullmatch(pattern, p.name))
    ]
    return str(max(found)[1]) if found else None


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
