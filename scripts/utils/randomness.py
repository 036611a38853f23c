"""Randomness: draws as pure functions of (seed, *counters), and the run-wide seeding and determinism switch.

:func:`numpy_rng` and :func:`torch_generator` make a generator from ``(seed, *counters)`` alone, e.g. ``(seed, rank,
sample index)`` for a pretraining step: a resumed run, any ``num_workers`` and any number of ranks draw what an
uninterrupted run draws, with no state to store. Distinct tuples, even of different lengths, never share a stream (the
counters are hashed with BLAKE2b). :func:`set_determinism` seeds the global generators with ``seed + rank`` and chooses
between speed and bitwise reproducibility.
"""

from __future__ import annotations

import hashlib
import os

import monai
import numpy as np
import torch
from scripts.utils.distributed import rank

__all__ = ["numpy_rng", "torch_generator", "set_determinism"]


def _seed_sequence(seed: int, *counters: int) -> np.random.SeedSequence:
    """A SeedSequence whose entropy is the 128-bit hash of ``(seed, *counters)``, each a non-negative 64-bit int."""
    values = (seed, *counters)
    for value in values:
        if not 0 <= int(value) < 2**64:
            raise ValueError(f"seed and counters must be integers in [0, 2**64), got {values}.")
    # Fixed width per value plus the count: the encoding is injective, so only a hash collision could share a stream.
    encoded = np.asarray([len(values), *values], dtype=np.uint64).tobytes()
    return np.random.SeedSequence(int.from_bytes(hashlib.blake2b(encoded, digest_size=16).digest(), "little"))


def numpy_rng(seed: int, *counters: int) -> np.random.Generator:
    """A numpy Generator (PCG64) determined by ``seed`` and ``counters`` alone, e.g. ``numpy_rng(seed, rank, s)``."""
    return np.random.Generator(np.random.PCG64(_seed_sequence(seed, *counters)))


def torch_generator(seed: int, *counters: int, device: torch.device | str | None = None) -> torch.Generator:
    """A torch Generator on ``device`` (default CPU) seeded from ``seed`` and the ``counters`` alone."""
    state = _seed_sequence(seed, *counters).generate_state(1, np.uint64)[0]
    generator = torch.Generator(device=device if device is not None else "cpu")
    generator.manual_seed(int(state) & (2**63 - 1))  # manual_seed takes a signed 64-bit integer
    return generator


def set_determinism(seed: int, deterministic: bool = False) -> None:
    """Seeds every random generator with ``seed + rank`` (so each ``torchrun`` process draws its own volumes, pairs and
    augmentations) and chooses between speed and bitwise reproducibility.

    `deterministic` False (the Model Zoo bundles' choice): cuDNN's autotuner picks the fastest algorithms, and
    PyTorch may use kernels whose result depends on the order of parallel writes (atomic adds on CUDA; on a CPU with
    several threads, which of several writes to one element stays, as in the local augmentations' overlapping blocks).

    `deterministic` True: ``torch.use_deterministic_algorithms(True)``, so every operation either runs a deterministic
    implementation or raises, deterministic cuDNN algorithms without the autotuner, and cuBLAS with a fixed workspace
    (``CUBLAS_WORKSPACE_CONFIG=:4096:8`` unless already set). Given the same hardware, software, thread and process
    counts, a run then computes the same bits each time, and a resumed run those of an uninterrupted one.
    """
    monai.utils.set_determinism(seed=seed + rank())
    if deterministic:
        # Read at the first cuBLAS call, which comes later: this runs in `initialize`, before the network is built.
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(deterministic)
    torch.backends.cudnn.benchmark = not deterministic
    torch.backends.cudnn.deterministic = deterministic
