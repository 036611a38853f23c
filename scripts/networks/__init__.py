"""Networks: the FPN3d backbone, MONAI backbones, multiscale projections and heads, pretrained weights into them, the
downstream segmentation network."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
