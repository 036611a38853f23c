"""Research and release tools (study, compare, benchmark, release): run from a clone, not shipped to the Zoo."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
