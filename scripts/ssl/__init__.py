"""Self-supervised pretraining: the voxel-pair sampler, losses, augmentations, batch preparation and PCRL."""

from scripts import lazy_submodules

__getattr__ = lazy_submodules(__name__)
