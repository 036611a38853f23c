"""Voxel-pair sampler: overlapping patch pairs of one volume and the voxels they share (DHR / vox2vec positives)."""

from __future__ import annotations

from collections.abc import Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable

__all__ = ["VoxelPairSamplerd"]


class VoxelPairSamplerd(Randomizable, MapTransform):
    """
    Draws ``num_pairs`` pairs of overlapping patches from one preprocessed volume, with the voxels both patches contain.

    For each pair an anchor voxel is drawn uniformly inside the body mask; each of the two patch boxes is then drawn
    independently and uniformly among the boxes of ``patch_size`` that contain the anchor, so the two views differ by an
    integer translation only. Matched voxels are body voxels inside both boxes: at most ``voxels_per_pair`` of them,
    drawn without replacement. Outputs have fixed shapes so that volumes collate into batches; a pair with fewer matched
    voxels marks the unused slots invalid.

    Input (after :func:`scripts.data.preprocessing`): ``image`` (1, X, Y, Z) float and ``body`` (1, X, Y, Z) mask, each
    spatial size at least ``patch_size``. Output (N = num_pairs, K = voxels_per_pair, P = patch_size):

    - ``view1``, ``view2``: (N, 1, *P) float32 patches;
    - ``voxels1``, ``voxels2``: (N, K, 3) int64 indices of the matched voxels within each view's patch;
    - ``valid``: (N, K) bool, which of the K slots hold a matched voxel.

    Args:
        patch_size: patch size in voxels, (3,).
        num_pairs: patch pairs drawn per volume (N).
        voxels_per_pair: matched voxels kept per pair (K).
        keys: the image key and the body-mask key.
    """

    def __init__(
        self,
        patch_size: Sequence[int],
        num_pairs: int = 10,
        voxels_per_pair: int = 1024,
        keys: KeysCollection = ("image", "body"),
    ) -> None:
        MapTransform.__init__(self, keys)
        if len(self.keys) != 2:
            raise ValueError(f"keys must name the image and its body mask, got {self.keys}.")
        self.patch_size = np.asarray(patch_size, dtype=np.int64)
        self.num_pairs = num_pairs
        self.voxels_per_pair = voxels_per_pair

    def randomize(self, data: None = None) -> None:
        # a numpy Generator per volume: its choice() draws K of n without replacement in O(K), unlike RandomState's
        self._rng = np.random.default_rng(self.R.randint(2**31))

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[str, torch.Tensor]:
        image_key, body_key = self.keys
        image = torch.as_tensor(data[image_key])[0]
        body = np.asarray(torch.as_tensor(data[body_key])[0].bool())
        shape = np.asarray(body.shape)
        if np.any(shape < self.patch_size):
            raise ValueError(
                f"Volume of shape {tuple(shape)} is smaller than patch_size {tuple(self.patch_size)}; "
                "pad it first (scripts.data.preprocessing does)."
            )
        self.randomize()
        n, k, p = self.num_pairs, self.voxels_per_pair, self.patch_size
        anchors = self._anchors(body, n)
        # per axis, the boxes containing anchor a start in [max(0, a - p + 1), min(a, S - p)]
        low, high = np.maximum(anchors - p + 1, 0), np.minimum(anchors, shape - p)
        starts = self._rng.integers(low[None], high[None] + 1, size=(2, n, 3))

        voxels = torch.zeros(2, n, k, 3, dtype=torch.int64)
        valid = torch.zeros(n, k, dtype=torch.bool)
        for i in range(n):
            lo, hi = starts[:, i].max(0), starts[:, i].min(0) + p
            matched = np.argwhere(body[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]]) + lo
            if len(matched) > k:
                matched = matched[self._rng.choice(len(matched), k, replace=False)]
            valid[i, : len(matched)] = True
            voxels[:, i, : len(matched)] = torch.from_numpy(matched[None] - starts[:, i, None])

        views = [
            torch.stack([image[x : x + p[0], y : y + p[1], z : z + p[2]] for x, y, z in starts[v]])[:, None].float()
            for v in range(2)
        ]
        return {"view1": views[0], "view2": views[1], "voxels1": voxels[0], "voxels2": voxels[1], "valid": valid}

    def _anchors(self, body: np.ndarray, n: int) -> np.ndarray:
        """``n`` voxel indices (n, 3) drawn uniformly inside ``body``."""
        # the body fills much of its cropped bounding box: rejection sampling is exact and avoids argwhere on the volume
        found = np.empty((0, 3), dtype=np.int64)
        for _ in range(16):
            candidates = self._rng.integers(0, body.shape, size=(8 * n, 3))
            found = np.concatenate([found, candidates[body[tuple(candidates.T)]]])
            if len(found) >= n:
                return found[:n]
        inside = np.argwhere(body)
        if len(inside) == 0:
            raise ValueError("The body mask is empty: no anchor voxel can be drawn.")
        return inside[self._rng.integers(0, len(inside), size=n)]
