"""Python components of the DHR bundle, referenced from `configs/*.yaml` as `scripts.<module>.<Name>`."""

from . import augmentations, data, demo, import_weights, losses, networks, pcrl, sampler, segmentation, splits, training

__all__ = [
    "augmentations",
    "data",
    "demo",
    "import_weights",
    "losses",
    "networks",
    "pcrl",
    "sampler",
    "segmentation",
    "splits",
    "training",
]
