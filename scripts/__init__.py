"""Python components of the DHR bundle, referenced from `configs/*.yaml` as `scripts.<package>.<module>.<Name>`.

Subpackages group the modules by role: `networks` (backbones, projections, heads), `ssl` (sampler, losses,
augmentations, PCRL), `data` (presets, preprocessing, cache, splits, demo), `engine` (handlers, runs and checkpoints,
evaluation, weight files), `utils` (distributed, randomness, errors, logging, tracking) and `tools` (the research and
release tools, not shipped to the Model Zoo). `visualize` and `import_weights` are the user commands a downloaded
bundle keeps.

Submodules load on first use (``scripts.data.preprocessing`` after ``import scripts``), so that
``python -m scripts.<module>`` does not import the module twice. Importing the package changes nothing else: the entry
points (each workflow config's first ``initialize`` step, each command's ``main``) install the hook that reports a
user error as one clear line (`scripts.utils.errors.install`).
"""

import importlib
from collections.abc import Callable
from types import ModuleType


def lazy_submodules(package: str) -> Callable[[str], ModuleType]:
    """A module ``__getattr__`` for `package` that imports its submodule ``name`` on first access."""

    def __getattr__(name: str) -> ModuleType:  # noqa: N807  (the module hook PEP 562 names)
        try:
            return importlib.import_module(f".{name}", package)
        except ModuleNotFoundError as err:
            if err.name != f"{package}.{name}":
                raise
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from err

    return __getattr__


__getattr__ = lazy_submodules(__name__)
