"""Handlers that MONAI's ``SupervisedTrainer`` lacks: clipping, a NaN guard, progress, backbone export, bf16 without a
scaler, and MLflow logging at an interval."""

from __future__ import annotations

import logging
import math
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TextIO

import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from monai.engines.utils import IterationEvents
from monai.handlers import MLFlowHandler
from scripts.engine.runs import checkpoints
from scripts.engine.weights import save_weights
from scripts.networks import backbones
from scripts.utils import distributed
from scripts.utils.distributed import all_gather, any_rank, is_main, stop_other_ranks
from scripts.utils.errors import BundleError
from torch import nn
from tqdm import tqdm

__all__ = [
    "log_every",
    "loss_only",
    "BF16WithoutGradScaler",
    "GradientClipping",
    "NonFiniteLossError",
    "NonFiniteLossGuard",
    "dataset_progress",
    "ProgressBar",
    "ExportBackbone",
]

logger = logging.getLogger(__name__)


def log_every(handlers: list, interval: int) -> list:
    """The trainer's handlers, with the per-iteration logging of those that ``--tracking mlflow`` adds (MONAI's
    default ``MLFlowHandler``) done every `interval` iterations and at the end of each epoch, reading the loss from a
    trainer output that is not decollated: reading it every iteration would synchronise host and device each time."""
    for handler in handlers:
        if isinstance(handler, MLFlowHandler) and handler.iteration_log is True:
            handler.iteration_log = _due(interval)
            handler.output_transform = _output_loss
    return handlers


def _output_loss(output: dict | list[dict]) -> torch.Tensor:
    """The loss of a trainer output, decollated (a list of dicts) or not (a dict)."""
    return (output[0] if isinstance(output, list) else output)["loss"]


def loss_only(output: dict | list[dict]) -> dict[str, float]:
    """``output_transform`` for :class:`ProgressBar`: the loss of a trainer output, as a float (a host-device sync)."""
    return {"loss": float(_output_loss(output))}


class BF16WithoutGradScaler:
    """Handler: trains with bf16 autocast but without a ``GradScaler``. bf16 has float32's range, so loss scaling
    has nothing to do, and the scaler's overflow check reads a flag from the device at every step. MONAI's trainer
    autocasts only together with its scaler, so the scaler it creates at the start of a run is swapped for a
    disabled one (a pass-through). Nothing changes without AMP or with float16."""

    def attach(self, engine: SupervisedTrainer) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: SupervisedTrainer) -> None:
        if engine.amp and engine.amp_kwargs.get("dtype") == torch.bfloat16:
            engine.scaler = torch.amp.GradScaler("cuda", enabled=False)


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


class NonFiniteLossError(BundleError, FloatingPointError):
    """The loss became NaN or infinite: a user can lower the learning rate or check the data."""


def _due(interval: int, *more: int | None) -> Callable[[Engine, int], bool]:
    """Event filter: iterations that are multiples of `interval` or of any of `more`, and the last of each epoch."""
    periods = [p for p in (interval, *more) if p]

    def due(engine: Engine, iteration: int) -> bool:
        return any(iteration % p == 0 for p in periods) or iteration % (engine.state.epoch_length or 1) == 0

    return due


class NonFiniteLossGuard:
    """
    Stops training with a clear error when the loss is NaN or infinite, on any rank.

    Each iteration records on the loss's device whether it was finite (no host-device synchronisation); every
    `interval` iterations, at every `checkpoint_interval` and at the end of each epoch the ranks agree in one
    collective whether any iteration since the last check was not (one synchronisation). So a check precedes every
    checkpoint written by a saver attached after the trainer's handlers (as `train#checkpoint_saver` is), and no
    checkpoint or export holds the weights of a non-finite step. Every rank reaches the check at the same iterations,
    so none waits for another. Rank 0 raises the error; the other ranks exit quietly.
    (ignite's ``TerminateOnNan`` reads the loss every iteration and ends the run "successfully".)

    Args:
        checkpoint_dir: where the full-state checkpoints are, for the message.
        loss: the loss function; its per-term values (``terms`` as in ``HybridLoss``), if any, go into the message.
        interval: iterations between checks (``log_interval``).
        checkpoint_interval: iterations between checkpoints; checked then too. None: no extra checks.
    """

    def __init__(
        self,
        checkpoint_dir: str,
        loss: nn.Module | None = None,
        interval: int = 1,
        checkpoint_interval: int | None = None,
    ) -> None:
        self.checkpoint_dir = checkpoint_dir
        self.loss = loss
        self.interval = interval
        self.checkpoint_interval = checkpoint_interval
        self._first_bad: torch.Tensor | None = None  # first non-finite iteration since the last check; 0: none
        self._terms: dict[str, torch.Tensor] = {}  # the loss terms of that iteration

    def attach(self, engine: SupervisedTrainer) -> None:
        engine.add_event_handler(IterationEvents.LOSS_COMPLETED, self.record)
        engine.add_event_handler(
            Events.ITERATION_COMPLETED(event_filter=_due(self.interval, self.checkpoint_interval)), self.check
        )

    def record(self, engine: SupervisedTrainer) -> None:
        """Notes this iteration if its loss is not finite, keeping the first such one; on the device, no sync."""
        loss = engine.state.output["loss"].detach()
        if self._first_bad is None:
            self._first_bad = torch.zeros((), dtype=torch.int64, device=loss.device)
        first = (self._first_bad == 0) & ~torch.isfinite(loss).all()
        self._first_bad = torch.where(first, engine.state.iteration, self._first_bad)
        terms = getattr(self.loss, "terms", {})
        self._terms = {k: torch.where(first, v.float(), self._terms.get(k, v.float())) for k, v in terms.items()}

    def check(self, engine: SupervisedTrainer) -> None:
        """Raises on rank 0 (exits on the others) if any rank saw a non-finite loss since the last check."""
        if self._first_bad is None or not any_rank(self._first_bad > 0):
            return
        # Failure path, on every rank: which rank failed first, and its loss terms then.
        firsts = all_gather(self._first_bad.view(1))
        terms = all_gather(torch.stack(list(self._terms.values())).view(1, -1)) if self._terms else None
        if not is_main():
            stop_other_ranks()
        bad = int(torch.where(firsts > 0, firsts, engine.state.iteration + 1).argmin())  # the earliest
        where = f"at iteration {int(firsts[bad])}" + (f" on rank {bad}" if len(firsts) > 1 else "")
        detail = ""
        if terms is not None:
            detail = "; " + ", ".join(f"{k}={float(v):.4g}" for k, v in zip(self._terms, terms[bad], strict=True))
        last = next(iter(checkpoints(self.checkpoint_dir)), None)
        raise NonFiniteLossError(
            f"Non-finite loss {where}{detail}. Training stopped at iteration {engine.state.iteration}, before any "
            f"checkpoint of the weights after it. The last good checkpoint is intact: {last or 'none written yet'}. "
            "Rerun the same command to resume from it. If it happens again at the same point, look for volumes with "
            "extreme or non-finite intensities, or train with a lower --learning_rate."
        )


def dataset_progress(progress: bool) -> bool:
    """Whether a dataset shows MONAI's caching bar: with ``progress``, on a terminal only, since in a log file tqdm's
    ``\\r`` updates land between the log lines (:class:`ProgressBar` prints plain lines there instead)."""
    return bool(progress) and sys.stderr.isatty()


class ProgressBar:
    """
    Training progress: one bar per epoch on a terminal, periodic plain lines otherwise (a log file gets no ``\\r``).

    The loss terms are read every `interval` iterations only (each read is a host-device synchronisation). The bar
    is closed at the epoch's last iteration, so the epoch's metrics, which ``StatsHandler`` prints when the epoch
    completes, get their own line. Without a terminal a line is printed at a read at most every `plain_every_s`
    seconds, and at the end of each epoch. Own code: ignite's ``ProgressBar`` reads the output every iteration and
    closes only when the epoch has completed.

    Args:
        output_transform: trainer output -> {name: float} to show.
        interval: iterations between reads (``log_interval``).
        plain_every_s: without a terminal, the least number of seconds between two plain lines within an epoch.
        stream: where to write; standard error by default (as tqdm).
    """

    def __init__(
        self,
        output_transform: Callable[[object], dict[str, float]],
        interval: int = 10,
        plain_every_s: float = 30.0,
        stream: TextIO | None = None,
    ) -> None:
        self.output_transform = output_transform
        self.interval = interval
        self.plain_every_s = plain_every_s
        self.stream = stream
        self._bar: tqdm | None = None
        self._last_line = -math.inf

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._open)
        engine.add_event_handler(Events.ITERATION_COMPLETED(event_filter=_due(self.interval)), self._show)
        engine.add_event_handler(Events.COMPLETED, self._close)
        engine.add_event_handler(Events.EXCEPTION_RAISED, self._close)

    def _stream(self) -> TextIO:
        return self.stream or sys.stderr

    def _open(self, engine: Engine) -> None:
        if self._stream().isatty():
            self._close(engine)
            self._bar = tqdm(
                total=engine.state.epoch_length, desc=self._epoch(engine), file=self._stream(), leave=True, ascii=True
            )

    @staticmethod
    def _epoch(engine: Engine) -> str:
        return f"Epoch {engine.state.epoch}/{engine.state.max_epochs}"

    def _show(self, engine: Engine) -> None:
        length = engine.state.epoch_length or 1
        done = (engine.state.iteration - 1) % length + 1
        values = ", ".join(f"{k} {v:.4g}" for k, v in self.output_transform(engine.state.output).items())
        if self._bar is not None:
            self._bar.set_postfix_str(values, refresh=False)
            self._bar.update(done - self._bar.n)
            if done == length:
                self._close(engine)
            return
        now = time.monotonic()
        if done == length or now - self._last_line >= self.plain_every_s:
            self._last_line = now
            print(f"{self._epoch(engine)}, iteration {done}/{length}: {values}", file=self._stream(), flush=True)

    def _close(self, engine: Engine, *args) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


class ExportBackbone:
    """
    Saves the backbone's plain ``state_dict`` and its sidecar (``scripts.engine.weights``) when training completes: the
    files downstream workflows load.

    Only on completion: an interrupted or failed run must not overwrite a good earlier export. Use
    ``python -m scripts.import_weights <full checkpoint> <file>`` to export from an intermediate checkpoint. Only rank 0
    writes.

    Args:
        backbone: the module whose weights are exported: an FPN3d (its ``in_channels``, ``base_channels`` and
            ``num_scales`` go into the sidecar) or a `scripts.networks.backbones.MonaiBackbone` (its MONAI network's
            weights; the class and its arguments go into the sidecar).
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
        # a MONAI backbone exports its network alone: the plain state dict of the class its sidecar names
        weights = getattr(self.backbone, "network", self.backbone).state_dict()
        save_weights(weights, self.path, {"kind": "backbone", **backbones.describe(self.backbone), **self.info})
        logger.info(f"Exported the pretrained backbone to {self.path}")
