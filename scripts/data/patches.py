"""Class-balanced training patches of labelled volumes, placed as in the authors' downstream code."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence
from copy import deepcopy
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection, NdarrayOrTensor
from monai.data import MetaTensor
from monai.transforms import MapTransform, Randomizable, SpatialCrop
from monai.transforms.traits import MultiSampleTrait
from monai.utils import ImageMetaKey, fall_back_tuple

__all__ = ["RandClassPatchesd"]


# Not MONAI's RandCropByLabelClassesd: it centres each box on a voxel (half of them background); the authors' boxes are
# uniform among those containing a voxel of one class, or uniform over the volume.
class RandClassPatchesd(Randomizable, MapTransform, MultiSampleTrait):
    """
    Cuts `num_samples` patches of `spatial_size` voxels from a labelled volume, at the same place in every key, placed
    as the authors' `sample_patches` (vox2vec, `vox2vec/processing/patches.py`) places them:

    1. once per call (per volume), a foreground class is drawn uniformly among the classes present in the volume
       (non-empty entries 1.. of the indices; entry 0, the background, is never drawn);
    2. per patch, independently: with probability `prob` a voxel v is drawn uniformly among that class's indices and
       the box is drawn uniformly among the boxes inside the volume that contain v: along each axis of size X, with
       patch side p, its start is uniform in [max(0, v - p + 1), min(v, X - p)]; otherwise (and always when no class
       is present) the box is uniform over the volume, its start uniform in [0, X - p] along each axis.

    The authors draw the class among all classes, so a class missing from the volume makes all the boxes of that call
    uniform; here only present classes are drawn, so every class present is anchored on with the same probability.

    Args:
        keys: the volumes to cut, each (C, X, Y, Z) on the same grid (the first key's grid is used).
        indices_key: the per-class voxel indices of the volume, as `ClassesToIndicesd` writes them: a list, entry c
            the 1D indices (into the flattened (X, Y, Z) grid) of the voxels of class c, entry 0 the background. A
            subset (`max_samples_per_class`) is fine: v is drawn among the indices given. Removed from the output.
        spatial_size: the patch size (p_x, p_y, p_z); an int is used for every axis, a non-positive side takes the
            volume's. Every volume must be at least this large (the bundle's preprocessing pads it to the patch size).
        num_samples: patches cut per call.
        prob: the probability that a patch is placed on a voxel of the drawn class.
        allow_missing_keys: don't raise an exception if a key is missing.

    Returns:
        a list of `num_samples` dicts: each key's patch (C, p_x, p_y, p_z) (a MetaTensor keeps its metadata, with
        `patch_index` = the patch's position in the list and the crop in its applied operations), every other item
        copied.
    """

    def __init__(
        self,
        keys: KeysCollection,
        indices_key: str,
        spatial_size: Sequence[int] | int,
        num_samples: int = 1,
        prob: float = 0.5,
        allow_missing_keys: bool = False,
    ) -> None:
        MapTransform.__init__(self, keys, allow_missing_keys)
        if num_samples < 1:
            raise ValueError(f"num_samples must be at least 1, got {num_samples}.")
        if not 0.0 <= prob <= 1.0:
            raise ValueError(f"prob must be in [0, 1], got {prob}.")
        self.indices_key = indices_key
        self.spatial_size = spatial_size
        self.num_samples = num_samples
        self.prob = prob
        self.starts: list[np.ndarray] = []

    def randomize(self, indices: Sequence[NdarrayOrTensor], spatial_shape: Sequence[int], size: Sequence[int]) -> None:
        """Draws the class, then each patch's start (one array of `len(spatial_shape)` ints) into `self.starts`."""
        shape, size_ = np.asarray(spatial_shape), np.asarray(size)
        present = [c for c in range(1, len(indices)) if len(indices[c]) > 0]
        voxels = indices[present[self.R.randint(len(present))]] if present else None
        self.starts = []
        for _ in range(self.num_samples):
            low, high = np.zeros_like(shape), shape - size_
            if voxels is not None and self.R.rand() < self.prob:
                anchor = np.asarray(np.unravel_index(int(voxels[self.R.randint(len(voxels))]), tuple(shape)))
                low, high = np.maximum(low, anchor - size_ + 1), np.minimum(high, anchor)
            self.starts.append(self.R.randint(low, high + 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, torch.Tensor]]:
        d = dict(data)
        indices = d.pop(self.indices_key)
        shape = d[self.first_key(d)].shape[1:]
        size = fall_back_tuple(self.spatial_size, shape)
        if any(s < p for s, p in zip(shape, size)):
            raise ValueError(f"Can't cut patches of size {tuple(size)} from a volume of size {tuple(shape)}.")
        self.randomize(indices, shape, size)
        samples: list[dict[Hashable, torch.Tensor]] = []
        for i, start in enumerate(self.starts):
            sample = {key: value if key in self.keys else deepcopy(value) for key, value in d.items()}
            crop = SpatialCrop(roi_start=start, roi_end=start + np.asarray(size))
            for key in self.key_iterator(d):
                sample[key] = crop(d[key])
                if isinstance(sample[key], MetaTensor):
                    sample[key].meta[ImageMetaKey.PATCH_INDEX] = i
            samples.append(sample)
        return samples
