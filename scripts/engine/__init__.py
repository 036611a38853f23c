"""Engine glue for MONAI's Ignite engines: training handlers, runs and checkpoints, evaluation, weight files."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
