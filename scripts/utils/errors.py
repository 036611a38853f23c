"""Errors a user can cause, reported as one clear message at the end of the output.

A :class:`BundleError` states the file or key, what is wrong and what to do. Once :func:`install` has made
:func:`report` the excepthook, a BundleError that ends the process, however deeply MONAI's config runner wrapped it,
prints only its message, as the last line of stderr (``DHR_TRACEBACK=1`` keeps the full traceback as well). The entry
points install it: the first ``initialize`` step of every workflow config and the ``main`` of every command.

:func:`out_of_space` turns a write that failed for lack of space (a full disk or quota, or a file-size limit) into an
:class:`OutOfSpaceError` naming the file and the space it needs.
"""

from __future__ import annotations

import contextlib
import errno
import os
import resource
import shutil
import sys
import traceback
from collections.abc import Iterator
from types import TracebackType

__all__ = [
    "BundleError",
    "InputNotFoundError",
    "InvalidInputError",
    "OutOfSpaceError",
    "find_bundle_error",
    "install",
    "out_of_space",
    "report",
]

# errno of a write refused for lack of space: a full disk, a full quota, a file over the file-size limit (ulimit -f).
_NO_SPACE = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


class BundleError(Exception):
    """A problem the user can fix: the message names the file or key, the problem and the remedy."""

    prefix = "error"  # the word before the message on the last line of stderr


class InputNotFoundError(BundleError, FileNotFoundError):
    """A file or folder the user named does not exist; also a FileNotFoundError, for callers that catch one."""


class InvalidInputError(BundleError, ValueError):
    """An input the user gave (a datalist, a key's value) is malformed; also a ValueError, for callers that catch it."""


class OutOfSpaceError(BundleError, OSError):
    """A file could not be written for lack of space; the message names it and the space it needs."""


def _megabytes(size: int) -> str:
    return f"{size / 2**20:,.0f} MB" if size >= 2**20 else f"{size / 2**20:.2f} MB"


def _lack_of_space(error: BaseException, folder: str | os.PathLike, needed: int) -> str:
    """Why ``error``, raised while writing ``needed`` bytes into ``folder``, is a lack of space ('' if it is not).

    The errno is not always kept: torch wraps the OSError of a failed write in a RuntimeError, and numpy reports a
    short write without one. So the chain of errors is searched, and failing that the space left is compared with
    what the write needs."""
    seen, refused = set(), None
    while error is not None and id(error) not in seen and refused is None:
        seen.add(id(error))
        refused = error.errno if isinstance(error, OSError) and error.errno in _NO_SPACE else None
        error = error.__cause__ or error.__context__
    limit = resource.getrlimit(resource.RLIMIT_FSIZE)[0]
    if limit != resource.RLIM_INFINITY and (limit < needed or refused == errno.EFBIG):
        return f"it exceeds this process's file-size limit of {_megabytes(limit)} (ulimit -f)"
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return "no space left" if refused else ""
    return f"{_megabytes(free)} free on its filesystem" if refused or free < needed else ""


@contextlib.contextmanager
def out_of_space(path: str | os.PathLike, needed: int, remedy: str) -> Iterator[None]:
    """Raises an :class:`OutOfSpaceError` in place of an error of the block that writes ``path`` for lack of space;
    other errors pass unchanged. The block removes its partial files itself.

    Args:
        path: the file (or folder) written, for the message.
        needed: about how many bytes it needs.
        remedy: what to do, e.g. "free space and rerun the same command to resume".
    """
    try:
        yield
    except (OSError, RuntimeError) as error:
        folder = os.path.dirname(os.path.abspath(path))
        why = _lack_of_space(error, folder, needed)
        if not why:
            raise
        raise OutOfSpaceError(
            f"Out of space writing {path}: it needs about {_megabytes(needed)} free ({why}); {remedy}"
        ) from error


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
