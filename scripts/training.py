"""Pieces of the self-supervised training step that plug into MONAI's ``SupervisedTrainer``: batches and handlers."""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from ignite.engine import Engine, Events
from ignite.handlers import ProgressBar as _IgniteProgressBar
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import MeanDice, from_engine
from torch import nn

from scripts.local_augmentations import LocalAugmentations
from scripts.vox2vec_augmentations import Vox2VecAugmentations

__all__ = [
    "build_augmentation",
    "SSLBatch",
    "GradientClipping",
    "NonFiniteLossGuard",
    "ProgressBar",
    "ExportBackbone",
    "latest_checkpoint",
    "per_class_dice",
]


def build_augmentation(name: str, modality: str) -> LocalAugmentations | Vox2VecAugmentations | None:
    """The pretraining augmentation named by the config key `augmentations`.

    Args:
        name: "local" (DHR's local augmentations), "vox2vec" (blur or sharpen, noise, HU window) or "none".
        modality: the data's preset, which vox2vec's augmentations need ("ct_wide" or "mri").
    """
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

    A batch from :class:`scripts.sampler.VoxelPairSamplerd` holds V volumes x N pairs; both views of all P = V * N pairs
    are stacked into one network input (2P, 1, X, Y, Z), view 1 first, so that one backbone pass serves both. Each view
    is augmented independently, batched, on the training device; the clean views are kept as restoration targets.

    Args:
        augment: batched augmentation ``(B, 1, X, Y, Z) -> (B, 1, X, Y, Z)``, or None for none.

    Returns (when called): ``inputs`` (2P, 1, X, Y, Z); ``targets`` dict with ``clean`` (2P, 1, X, Y, Z) and ``valid``
    (P, K); no positional args; kwargs ``voxels`` (2P, K, 3) for the network.
    """

    def __init__(self, augment: Callable[[torch.Tensor], torch.Tensor] | None = None) -> None:
        self.augment = augment

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
        inputs = self.augment(clean) if self.augment is not None else clean
        return inputs, {"clean": clean, "valid": flat("valid")}, (), {"voxels": voxels}


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
        raise FloatingPointError(
            f"Non-finite loss ({float(loss)}; {detail}) at iteration {engine.state.iteration}. Training stopped before "
            f"the optimiser step. The last good checkpoint is intact: {last or 'none written yet'}. Rerun the same "
            "command to resume from it, with a lower --learning_rate, or check the input data."
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
    Saves the backbone's plain ``state_dict`` when training completes: the file downstream workflows load.

    Only on completion: an interrupted or failed run must not overwrite a good earlier export. Use
    ``python -m scripts.import_weights <full checkpoint> <file>`` to export from an intermediate checkpoint.

    Args:
        backbone: the module whose weights are exported.
        path: destination file; written atomically.
    """

    def __init__(self, backbone: nn.Module, path: str) -> None:
        self.backbone = backbone
        self.path = Path(path)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(self.backbone.state_dict(), partial)
        os.replace(partial, self.path)
        print(f"Exported the pretrained backbone to {self.path}")  # the engine logger is silent in bundle runs


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
