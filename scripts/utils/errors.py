"""Errors a user can cause, reported as one clear message at the end of the output.

A :class:`BundleError` states the file or key, what is wrong and what to do. Once :func:`install` has made
:func:`report` the excepthook, a BundleError that ends the process, however deeply MONAI's config runner wrapped it,
prints only its message, as the last line of stderr (``DHR_TRACEBACK=1`` keeps the full traceback as well). The entry
points install it: the first ``initialize`` step of every workflow config and the ``main`` of every command.
"""

from __future__ import annotations

import os
import sys
import traceback
from types import TracebackType

__all__ = ["BundleError", "InputNotFoundError", "InvalidInputError", "find_bundle_error", "install", "report"]


class BundleError(Exception):
    """A problem the user can fix: the message names the file or key, the problem and the remedy."""

    prefix = "error"  # the word before the message on the last line of stderr


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
    """``sys.excepthook``: a BundleError's message alone (last line of stderr), a bare Ctrl-C as one line too,
    anything else as Python would."""
    cause = find_bundle_error(error)
    interrupted = cause is None and isinstance(error, KeyboardInterrupt)
    if (cause is None and not interrupted) or os.environ.get("DHR_TRACEBACK"):
        traceback.print_exception(kind, error, tb)
    if cause is not None:
        print(f"{cause.prefix}: {cause}", file=sys.stderr, flush=True)
    elif interrupted:
        print("interrupted: stopped by Ctrl-C; rerun the same command to start again.", file=sys.stderr, flush=True)


def install() -> None:
    """Makes :func:`report` the interpreter's hook for uncaught exceptions."""
    sys.excepthook = report
