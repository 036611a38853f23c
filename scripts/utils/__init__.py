"""Infrastructure: distributed helpers, randomness, user errors, command-line checks, logging, tracking."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
