"""Networks: the FPN3d backbone, multiscale projections and heads, the downstream segmentation network."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
