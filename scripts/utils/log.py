"""Logging through the bundle's ``configs/logging.conf`` for the scripts' own command lines.

``python -m monai.bundle run`` applies that file itself before a workflow starts; ``python -m scripts.<module>``
calls :func:`configure` first, so that both print the same lines to stdout. Modules log with
``logging.getLogger(__name__)``.
"""

from __future__ import annotations

import logging.config
import os
from pathlib import Path

__all__ = ["LOGGING_CONF", "configure"]

LOGGING_CONF = Path(__file__).resolve().parents[2] / "configs" / "logging.conf"


def configure(path: str | os.PathLike = LOGGING_CONF) -> None:
    """Applies the logging file ``path`` (default: the bundle's), keeping loggers that already exist."""
    logging.config.fileConfig(path, disable_existing_loggers=False)
