"""Checks of MONAI's bundle command line, and reading its overrides.

``python -m monai.bundle run`` drops every ``--key None`` override (``ignore_none=True`` in
``monai.bundle.scripts.update_kwargs``) and runs the config's value instead; :func:`refuse_none_overrides`, a step of
every workflow's ``initialize``, stops such a run. Keys that switch something off therefore take a string or a number
(``--projection_width raw``, ``--restoration_weight 0``). :func:`given_keys`, :func:`given_value` and :func:`without`
read and edit a list of overrides.
"""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.utils import errors
from scripts.utils.errors import BundleError

__all__ = [
    "PRESET_NAMES",
    "given_keys",
    "given_value",
    "none_overrides",
    "refuse_none_overrides",
    "weight_file",
    "without",
]

# The modality presets' names, for command lines that answer --help before MONAI is imported: the keys of
# scripts.data.preprocessing.PRESETS (tests/test_first_hour.py keeps them equal).
PRESET_NAMES = ("ct", "ct_wide", "mri")

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
    if not _monai_bundle(argv):
        return
    for key in none_overrides(argv[1:]):
        instead = _INSTEAD.get(key, f"to keep the config's value of {key!r}, leave --{key} out")
        raise BundleError(
            f"--{key} None: MONAI's command line drops overrides whose value is None, so the config's value of "
            f"{key!r} would run instead. {instead[0].upper()}{instead[1:]}."
        )


def _monai_bundle(argv: Sequence[str]) -> bool:
    """Whether ``argv`` is MONAI's bundle command line (``python -m monai.bundle ...``)."""
    return bool(argv) and Path(argv[0]).parts[-3:] == ("monai", "bundle", "__main__.py")


def weight_file(model_file: str, argv: Sequence[str] | None = None) -> str:
    """The weight file whose sidecar builds ``inference.json``'s network: ``model_file``, except under
    ``python -m monai.bundle ckpt_export``, which loads its ``--ckpt_file`` and keeps that key from the config: there
    it is the ``--ckpt_file`` (when given), so that the network is the one its tensors were trained in.

    A programmatic ``monai.bundle.ckpt_export(ckpt_file=...)`` is not seen here: give it ``model_file=`` the same file.

    Args:
        model_file: the config's ``model_file``.
        argv: the command line; default ``sys.argv``.

    Raises:
        BundleError: under ``ckpt_export``, when ``--model_file`` names another file than ``--ckpt_file`` (default
            ``models/model.pt``), the file MONAI loads.
    """
    argv = sys.argv if argv is None else argv
    if not _monai_bundle(argv) or list(argv[1:2]) != ["ckpt_export"]:
        return model_file
    errors.install()  # ckpt_export runs no `initialize`: a BundleError below is then one line, not a traceback
    ckpt_file, given_model = given_value(argv[1:], "ckpt_file"), given_value(argv[1:], "model_file")
    if given_model is not None and Path(given_model).resolve() != Path(ckpt_file or "models/model.pt").resolve():
        raise BundleError(
            f"--model_file {given_model} is not the file ckpt_export loads (--ckpt_file "
            f"{ckpt_file or 'models/model.pt, its default'}): the network would be built from another file's "
            f"sidecar than the weights it loads. Give the file once, as --ckpt_file {given_model}."
        )
    return model_file if ckpt_file is None else ckpt_file


def given_keys(argv: Sequence[str]) -> set[str]:
    """The keys that ``argv`` overrides, as ``--key value`` or ``--key=value``."""
    return {arg[2:].partition("=")[0] for arg in argv if arg.startswith("--")}


def given_value(argv: Sequence[str], key: str) -> str | None:
    """The value that ``argv`` gives ``key`` (the last, if given twice: MONAI's command line takes the last), else
    None."""
    value = None
    for arg, following in zip(argv, [*argv[1:], None], strict=False):  # argv may be empty
        name, sep, inline = arg.partition("=")
        if name == f"--{key}":
            value = inline if sep else following
    return value


def without(argv: Sequence[str], keys: set[str]) -> list[str]:
    """``argv`` without its overrides of ``keys`` (each a ``--key=value`` item or a ``--key value`` pair)."""
    kept, skip = [], False
    for arg in argv:
        name, sep, _ = arg.partition("=")
        if skip:
            skip = False
        elif name.startswith("--") and name[2:] in keys:
            skip = not sep  # its value is the next item
        else:
            kept.append(arg)
    return kept
