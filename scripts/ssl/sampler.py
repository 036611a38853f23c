"""Voxel-pair sampler: overlapping patch pairs of one volume and the voxels they share (DHR / vox2vec positives).

`VoxelPairSamplerd` cuts the pairs from one volume; `VoxelPairDataset` is pretraining's dataset: item ``s`` (the global
sample index) is a volume and its pairs, both drawn from ``numpy_rng(seed, rank, s)``; `SampleIndexSampler` feeds it
``s = iteration * volumes_per_batch, ...`` so that a resumed run continues the sequence of an uninterrupted one.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Hashable, Iterator, Mapping, Sequence

import numpy as np
import torch
from ignite.engine import Engine, Events
from monai.config import KeysCollection
from monai.transforms import MapTransform, Randomizable
from scripts.data.cache import ChunkedVolume, open_volume
from scripts.utils import distributed
from scripts.utils.errors import BundleError
from scripts.utils.randomness import numpy_rng

__all__ = ["VoxelPairSamplerd", "VoxelPairDataset", "SampleIndexSampler"]


class VoxelPairSamplerd(Randomizable, MapTransform):
    """
    Draws ``num_pairs`` pairs of overlapping patches from one preprocessed volume, with the voxels both patches contain.

    For each pair an anchor voxel is drawn uniformly inside the body mask; each of the two patch boxes is then drawn
    independently and uniformly among the boxes of ``patch_size`` that contain the anchor, so the two views differ by an
    integer translation only. Matched voxels are body voxels inside both boxes: at most ``voxels_per_pair`` of them,
    drawn without replacement. Outputs have fixed shapes so that volumes collate into batches; a pair with fewer matched
    voxels marks the unused slots invalid.

    Input (after :func:`scripts.data.preprocessing.preprocessing`): ``image`` (1, X, Y, Z) float and ``body``
    (1, X, Y, Z) mask (nonzero = body), each spatial size at least ``patch_size``, tensors or numpy arrays; or a cache
    entry's (X, Y, Z) `scripts.data.cache.ChunkedVolume` of each (:func:`scripts.data.cache.open_volume`), of which
    only the chunks of the boxes cut and of the anchor candidates are read, the boxes' all requested at once. Output
    (N = num_pairs, K = voxels_per_pair, P = patch_size):

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

    def randomize(self, data: None = None) -> np.random.Generator:
        # a numpy Generator per volume: its choice() draws K of n without replacement in O(K), unlike RandomState's
        return np.random.default_rng(self.R.randint(2**31))

    def __call__(
        self, data: Mapping[Hashable, torch.Tensor | np.ndarray], rng: np.random.Generator | None = None
    ) -> dict[str, torch.Tensor]:
        """
        Args:
            data: ``image`` and ``body`` as described above.
            rng: source of every random draw; None: one seeded from this transform's state (`set_random_state`).
        """
        image_key, body_key = self.keys
        image, body = _spatial(data[image_key]), _spatial(data[body_key])
        shape = np.asarray(body.shape)
        if np.any(shape < self.patch_size):
            raise ValueError(
                f"Volume of shape {tuple(shape)} is smaller than patch_size {tuple(self.patch_size)}; "
                "pad it first (scripts.data.preprocessing.preprocessing does)."
            )
        rng = self.randomize() if rng is None else rng
        n, k, p = self.num_pairs, self.voxels_per_pair, self.patch_size
        anchors = self._anchors(body, n, rng)
        # per axis, the boxes containing anchor a start in [max(0, a - p + 1), min(a, S - p)]
        low, high = np.maximum(anchors - p + 1, 0), np.minimum(anchors, shape - p)
        starts = rng.integers(low[None], high[None] + 1, size=(2, n, 3))
        overlaps = starts.max(0), starts.min(0) + p  # (n, 3) each: the box both views of a pair contain
        if isinstance(image, ChunkedVolume):  # the disk serves requests issued together in parallel
            body.prefetch(*overlaps)
            image.prefetch(starts.reshape(-1, 3), starts.reshape(-1, 3) + p)

        voxels = torch.zeros(2, n, k, 3, dtype=torch.int64)
        valid = torch.zeros(n, k, dtype=torch.bool)
        for i in range(n):
            lo, hi = overlaps[0][i], overlaps[1][i]
            matched = self._matched(body[lo[0] : hi[0], lo[1] : hi[1], lo[2] : hi[2]], k, rng) + lo
            valid[i, : len(matched)] = True
            voxels[:, i, : len(matched)] = torch.from_numpy(matched[None] - starts[:, i, None])

        # one float32 conversion per box, straight from the (possibly memory-mapped, float16) volume
        views = np.empty((2, n, 1, *p), dtype=np.float32)
        for v, i in np.ndindex(2, n):
            x, y, z = starts[v, i]
            views[v, i, 0] = image[x : x + p[0], y : y + p[1], z : z + p[2]]
        views = torch.from_numpy(views)
        return {"view1": views[0], "view2": views[1], "voxels1": voxels[0], "voxels2": voxels[1], "valid": valid}

    @staticmethod
    def _matched(body: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
        """At most ``k`` body voxels (m, 3) of the box ``body``, drawn uniformly without replacement."""
        # The first k body voxels of a random order of the box's voxels are a uniform draw without replacement; 4k
        # candidates nearly always hold k body voxels, and checking them costs far less than argwhere on the box.
        candidates = rng.choice(body.size, min(body.size, 4 * k), replace=False)
        position = np.stack(np.unravel_index(candidates, body.shape), axis=1)
        inside = position[body[tuple(position.T)] != 0]
        if len(inside) >= k or len(candidates) == body.size:
            return inside[:k]
        matched = np.argwhere(body)  # few body voxels in the box: take them all, or k of them
        return matched[rng.choice(len(matched), k, replace=False)] if len(matched) > k else matched

    @staticmethod
    def _anchors(body: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
        """``n`` voxel indices (n, 3) drawn uniformly inside ``body``."""
        # the body fills much of its cropped bounding box: rejection sampling is exact and reads a few voxels only
        found = np.empty((0, 3), dtype=np.int64)
        for _ in range(16):
            candidates = rng.integers(0, body.shape, size=(8 * n, 3))
            found = np.concatenate([found, candidates[body[tuple(candidates.T)] != 0]])
            if len(found) >= n:
                return found[:n]
        inside = np.argwhere(np.asarray(body))
        if len(inside) == 0:
            raise ValueError("The body mask is empty: no anchor voxel can be drawn.")
        return inside[rng.integers(0, len(inside), size=n)]


def _spatial(array: torch.Tensor | np.ndarray | ChunkedVolume) -> np.ndarray | ChunkedVolume:
    """The (X, Y, Z) array of a (1, X, Y, Z) CPU tensor (MetaTensor included) or array, a numpy view that reads or
    copies nothing; a ChunkedVolume as it is."""
    if isinstance(array, ChunkedVolume):
        return array
    return (array.detach().as_subclass(torch.Tensor).numpy() if isinstance(array, torch.Tensor) else array)[0]


class VoxelPairDataset(torch.utils.data.Dataset):
    """
    Pretraining samples by global sample index: item ``s`` is one volume's voxel pairs, drawn by ``sampler``.

    Everything random about item ``s`` (which volume, anchors, boxes, matched voxels) comes from
    ``numpy_rng(seed, rank, s)`` (`scripts.utils.randomness`), so an item is the same whichever worker loads it and
    whenever,
    in a resumed run too. Each rank draws among its own share of the volumes (rank r: volumes r, r + world_size, ...)
    when there are at least as many volumes as ranks, otherwise among all. Any ``s >= 0`` is an index: the dataset has
    no length; `SampleIndexSampler` says which indices a run uses.

    Args:
        volumes: cache entries (:func:`scripts.data.cache.prepare_volumes`).
        sampler: the voxel-pair transform applied to the chosen volume.
        seed: the run's seed.
        cache: "disk" (memory-mapped: a batch reads only its boxes; the OS keeps what is read often in its page cache)
            or "memory" (every volume read into memory here, once; shared with forked workers).
        max_open: with "disk", the most volumes each process keeps memory-mapped (two maps each), the least recently
            used closed first: a process may hold at most ``vm.max_map_count`` maps (65,530 by default).
        rank: this process's rank; None: `scripts.utils.distributed.rank()`.
        world_size: number of ranks; None: `scripts.utils.distributed.world_size()`.

    Returns (item ``s``): the sampler's output (``view1``, ``view2`` (N, 1, *P) float32, ``voxels1``, ``voxels2``
    (N, K, 3) int64, ``valid`` (N, K) bool), plus ``sample_index`` (s, int64) and ``volume_index`` (position of the
    volume in ``volumes``, int64).
    """

    CACHE_MODES = ("disk", "memory")

    def __init__(
        self,
        volumes: Sequence[str],
        sampler: VoxelPairSamplerd,
        seed: int = 0,
        cache: str = "disk",
        rank: int | None = None,
        world_size: int | None = None,
        max_open: int = 1024,
    ) -> None:
        if cache not in self.CACHE_MODES:
            raise BundleError(f"cache={cache!r}: the key `cache` must be 'disk' or 'memory'.")
        self.volumes = list(volumes)
        self.sampler = sampler
        self.seed = seed
        self.in_memory = cache == "memory"
        self.max_open = max_open
        self.rank = distributed.rank() if rank is None else rank
        world_size = distributed.world_size() if world_size is None else world_size
        own = range(self.rank, len(self.volumes), world_size) if len(self.volumes) >= world_size else None
        self.choices = list(own) if own is not None else list(range(len(self.volumes)))
        # disk: opened on first use in each process; memory: read here, so forked workers share the pages
        self._open: OrderedDict[int, dict[str, np.ndarray]] = OrderedDict()
        if self.in_memory:
            for index in self.choices:
                self._open[index] = open_volume(self.volumes[index], in_memory=True)

    def __getstate__(self) -> dict:
        # A worker started by pickling (spawn, forkserver) maps the volumes itself: memory maps do not pickle.
        return {**self.__dict__, "_open": OrderedDict() if not self.in_memory else self._open}

    def _volume(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._open:
            self._open[index] = open_volume(self.volumes[index], in_memory=self.in_memory)
            if not self.in_memory and len(self._open) > self.max_open:
                self._open.popitem(last=False)  # its maps close with the last reference to them
        self._open.move_to_end(index)
        return self._open[index]

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        rng = numpy_rng(self.seed, self.rank, index)
        volume = self.choices[int(rng.integers(len(self.choices)))]
        out = self.sampler(self._volume(volume), rng=rng)
        out["sample_index"] = torch.tensor(index, dtype=torch.int64)
        out["volume_index"] = torch.tensor(volume, dtype=torch.int64)
        return out


class SampleIndexSampler(torch.utils.data.Sampler[int]):
    """
    Yields the global sample indices ``start, start + 1, ...`` without end, for `VoxelPairDataset`.

    Attached to the trainer (a handler: ``attach(engine)``), it sets ``start = iteration * samples_per_iteration`` at
    each epoch start (after a checkpoint was loaded at ``STARTED``), before ignite asks the data loader for an iterator:
    a resumed run continues the sequence where the interrupted one stopped, and one step's batch holds samples
    ``iteration * V .. iteration * V + V - 1`` (V = `samples_per_iteration`, the loader's batch size). The trainer
    needs an ``epoch_length``, as this sampler has no length.

    Args:
        samples_per_iteration: samples per batch (the config's ``volumes_per_batch``).
    """

    def __init__(self, samples_per_iteration: int) -> None:
        self.samples_per_iteration = samples_per_iteration
        self.start = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._follow)

    def _follow(self, engine: Engine) -> None:
        self.start = engine.state.iteration * self.samples_per_iteration

    def __iter__(self) -> Iterator[int]:
        return itertools.count(self.start)
