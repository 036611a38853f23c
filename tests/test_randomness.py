import numpy as np
import pytest
import torch
from scripts.utils.randomness import numpy_rng, torch_generator


def test_streams_are_pure_functions_of_seed_and_counters():
    assert numpy_rng(0, 1, 2).integers(2**62) == numpy_rng(0, 1, 2).integers(2**62)
    a = torch.rand(4, generator=torch_generator(5, 0, 7))
    assert torch.equal(a, torch.rand(4, generator=torch_generator(5, 0, 7)))


def test_distinct_counters_never_share_a_stream():
    tuples = [(0,), (0, 0), (1, 23), (12, 3), (0, 1, 23), (1, 0, 0), (0, 0, 1)]
    draws = {tuple(numpy_rng(*t).integers(0, 2**62, 2)) for t in tuples}
    assert len(draws) == len(tuples)
    assert len({torch.rand(2, generator=torch_generator(*t)).tolist().__repr__() for t in tuples}) == len(tuples)


def test_negative_or_huge_counters_are_refused():
    with pytest.raises(ValueError, match="2\\*\\*64"):
        numpy_rng(0, -1)
    with pytest.raises(ValueError):
        torch_generator(2**64)
    assert isinstance(numpy_rng(np.uint64(2**64 - 1)), np.random.Generator)
