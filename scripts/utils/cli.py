"""What MONAI's bundle command line would silently get wrong, stopped before any work.

``python -m monai.bundle run`` drops every ``--key None`` override (``monai.bundle.scripts.update_kwargs`` with
``ignore_none=True``), so the config's own value runs instead, without a word: ``--projection_width None`` used to
pretrain plain DHR. Keys that switch something off therefore take a string or a number on the command line
(``--projection_width raw``, ``--restoration_weight 0``), and :func:`refuse_none_overrides`, the first step of every
workflow's ``initialize``, stops a run that was given ``--key None``.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.utils.errors import BundleError

__all__ = ["none_overrides", "refuse_none_overrides"]

# What to type instead of None, for the keys whose None means something other than their default.
_INSTEAD = {"projection_width": "--projection_width raw concatenates the raw pyramid levels (vox2vec)"}


def none_overrides(argv: Sequence[str]) -> list[str]:
    """The keys given the value ``None`` in ``argv``, as ``--key None`` or ``--key=None``."""
    keys = []
    for arg, following in zip(argv, [*argv[1:], ""], strict=False):  # argv may be empty
        if not arg.startswith("--"):
            continue
        key, sep, value = arg[2:].partition("=")
        if (value if sep else following) == "None":
            keys.append(key)
    return keys


def refuse_none_overrides(argv: Sequence[str] | None = None) -> None:
    """Raises a BundleError when ``python -m monai.bundle`` was given ``--key None`` (it would drop it silently).

    Args:
        argv: the command line; default ``sys.argv``. Only MONAI's bundle command line (``argv[0]`` is
            ``monai/bundle/__main__.py``) is checked: a Python caller's overrides reach the config as they are.
    """
    argv = sys.argv if argv is None else argv
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
        return
    for key in none_overrides(argv[1:]):
        instead = _INSTEAD.get(key, f"to keep the config's value of {key!r}, leave --{key} out")
        raise BundleError(
            f"--{key} None: MONAI's command line drops overrides whose value is None, so the config's value of "
            f"{key!r} would run instead. {instead[0].upper()}{instead[1:]}."
        )
