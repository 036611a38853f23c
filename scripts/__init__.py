"""Python components of the DHR bundle, referenced from `configs/*` as `scripts.<package>.<module>.<Name>`.

Subpackages by role: `networks` (backbones, projections, heads, downstream loss), `ssl` (sampler, losses, augmentations,
batch preparation, PCRL), `data` (presets, preprocessing, cache, splits, demo), `engine` (handlers, validation, runs and
checkpoints, evaluation, weight files, workflow messages), `utils` (distributed, randomness, errors, logging, tracking)
and `tools` (research and release tools, not shipped to the Model Zoo). `visualize` and `import_weights` are the
commands a downloaded bundle keeps. Submodules load on first access (``scripts.data.preprocessing`` after
``import scripts``); importing the package has no other effect.
"""

import importlib
from collections.abc import Callable
from types import ModuleType


def lazy_submodules(package: str) -> Callable[[str], ModuleType]:
    """A module ``__getattr__`` for `package` that imports its submodule ``name`` on first access (importing them all
    in ``__init__`` would make ``python -m scripts.<module>`` import that module twice)."""

    def __getattr__(name: str) -> ModuleType:  # noqa: N807  (the module hook PEP 562 names)
        try:
            return importlib.import_module(f".{name}", package)
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from err

    return __getattr__


__getattr__ = lazy_submodules(__name__)
