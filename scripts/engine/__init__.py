"""Engine glue for MONAI's Ignite engines: handlers, validation, runs and checkpoints, evaluation, weight files and
the workflows' messages."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
