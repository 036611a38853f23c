"""Python components of the DHR bundle, referenced from `configs/*.yaml` as `scripts.<module>.<Name>`.

Submodules load on first use (``scripts.data`` after ``import scripts``), so that ``python -m scripts.<module>`` does
not import the module twice. Importing the package installs the hook that reports a user error as one clear line.
"""

import importlib
from types import ModuleType

from . import errors

errors.install()


def __getattr__(name: str) -> ModuleType:
    try:
        return importlib.import_module(f".{name}", __name__)
    except ModuleNotFoundError as err:
        if err.name != f"{__name__}.{name}":
            raise
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}") from err
