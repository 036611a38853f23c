"""Errors a user can cause, reported as one clear message at the end of the output.

MONAI's bundle runner wraps every exception raised while a config expression is evaluated in
``RuntimeError: Failed to evaluate ConfigExpression``, so the cause would sit in the middle of a long traceback. A
:class:`BundleError` states the file or key, what is wrong and what to do; when one ends a run (however deeply it is
wrapped), :func:`report` prints only its message, as the last line of stderr. ``DHR_TRACEBACK=1`` keeps the full
traceback as well. Importing :mod:`scripts` installs the hook.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

__all__ = ["BundleError", "InputNotFoundError", "InvalidInputError", "find_bundle_error", "install", "report"]


class BundleError(Exception):
    """A problem the user can fix: the message names the file or key, the problem and the remedy."""


class InputNotFoundError(BundleError, FileNotFoundError):
    """A file or folder the user named does not exist; also a FileNotFoundError, for callers that catch one."""


class InvalidInputError(BundleError, ValueError):
    """An input the user gave (a datalist, a key's value) is malformed; also a ValueError, for callers that catch it."""


def find_bundle_error(error: BaseException | None) -> BundleError | None:
    """The first :class:`BundleError` in the chain of causes and contexts of ``error``, or None."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, BundleError):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None


def report(kind: type[BaseException], error: BaseException, tb: TracebackType | None) -> None:
    """``sys.excepthook``: a BundleError's message alone (last line of stderr), anything else as Python would."""
    cause = find_bundle_error(error)
    if cause is None or os.environ.get("DHR_TRACEBACK"):
        traceback.print_exception(kind, error, tb)
    if cause is not None:
        print(f"error: {cause}", file=sys.stderr, flush=True)


def install() -> None:
    """Makes :func:`report` the interpreter's hook for uncaught exceptions."""
    sys.excepthook = report
