"""Random draws as pure functions of (seed, *counters), so that a pretraining step's randomness has no state.

Every random draw of a pretraining step comes from a generator made here from ``(seed, rank, sample index)``: a resumed
run, any ``num_workers`` and any number of ranks then draw exactly what an uninterrupted run draws, with nothing to
store in a checkpoint. The counters are hashed (BLAKE2b of their fixed-width encoding) into the generator's seed, so
distinct tuples, even of different lengths, never share a stream (``(1, 23)`` and ``(12, 3)`` differ; so do ``(0,)``
and ``(0, 0)``).
"""

from __future__ import annotations

import hashlib

import numpy as np
import torch

__all__ = ["numpy_rng", "torch_generator"]


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
