"""What the downstream workflows tell the user when they start and end, called from the configs' ``run`` and
``finalize`` steps."""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence

__all__ = ["training_started", "evaluation_started", "inference_started", "inference_finished"]

logger = logging.getLogger(__name__)


def training_started(split: Mapping[str, Sequence], pretrained_ckpt: str | None) -> None:
    """The cases that train and validate (`split` of `scripts.data.splits.split_cases`), and a random initialisation
    when there is no `pretrained_ckpt` (a loaded backbone is announced where it is loaded)."""
    training, validation = len(split["training"]), len(split["validation"])
    without = "" if validation else " (no validation: model_file will hold the final weights)"
    logger.info(f"Training on {training} cases; validating on {validation}{without}")
    if pretrained_ckpt is None:
        logger.info("segmentation network: backbone from scratch (random initialisation)")


def evaluation_started(model_file: str, cases: Sequence) -> None:
    """The model evaluated and the number of test cases."""
    logger.info(f"Evaluating the trained model {model_file} on {len(cases)} test cases")


def inference_started(images: Sequence, model_file: str) -> None:
    """The number of images to segment and the model."""
    logger.info(f"Segmenting {len(images)} images with the trained model {model_file}")


def inference_finished(output_dir: str | os.PathLike) -> None:
    """Where the label maps are."""
    logger.info(f"Label maps (0 background, 1..num_classes) written to {os.path.abspath(output_dir)}")
