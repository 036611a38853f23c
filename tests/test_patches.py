"""The downstream patch placement (authors' `sample_patches`): the frequencies of classes and box starts."""

import itertools

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import ClassesToIndicesd
from scipy.stats import chisquare
from scripts.data.patches import RandClassPatchesd


def _volume(shape, voxels: dict[int, tuple], num_classes: int) -> dict:
    """image = each voxel's flat index (a patch's first value says where it was cut), label = `voxels` {class: at}."""
    label = torch.zeros((1, *shape), dtype=torch.uint8)
    for c, position in voxels.items():
        label[(0, *position)] = c
    image = MetaTensor(torch.arange(np.prod(shape), dtype=torch.float64).reshape(1, *shape))
    return ClassesToIndicesd("label", num_classes=num_classes + 1)({"image": image, "label": MetaTensor(label)})


def _starts(transform: RandClassPatchesd, data: dict, calls: int, size) -> np.ndarray:
    """(calls, num_samples, 3) patch starts of `calls` draws (no cropping: many draws stay cheap)."""
    draws = []
    for _ in range(calls):
        transform.randomize(data["label_cls_indices"], data["label"].shape[1:], size)
        draws.append(transform.starts)
    return np.array(draws)


def _assert_uniform(starts: np.ndarray, support: list) -> None:
    counts = dict.fromkeys(support, 0)
    for start in map(tuple, starts.reshape(-1, 3).tolist()):
        assert start in counts, f"{start} is outside the expected support"
        counts[start] += 1
    assert chisquare(list(counts.values())).pvalue > 0.01, counts


def test_a_box_anchored_on_a_voxel_is_uniform_among_the_boxes_that_contain_it():
    size = (6, 6, 4)
    transform = RandClassPatchesd(["image", "label"], "label_cls_indices", size, num_samples=4, prob=1.0)
    transform.set_random_state(0)
    starts = _starts(transform, _volume((20, 20, 10), {1: (3, 17, 5)}, num_classes=1), 1200, size)
    # per axis [max(0, v - p + 1), min(v, X - p)]: x 0..3 (the volume's edge), y 12..14 (its far edge), z 2..5
    _assert_uniform(starts, list(itertools.product(range(4), range(12, 15), range(2, 6))))


def test_without_a_class_present_the_box_is_uniform_over_the_volume():
    size = (6, 6, 4)
    transform = RandClassPatchesd(["image", "label"], "label_cls_indices", size, num_samples=2, prob=1.0)
    transform.set_random_state(0)
    starts = _starts(transform, _volume((9, 8, 6), {}, num_classes=2), 1000, size)
    _assert_uniform(starts, list(itertools.product(range(4), range(3), range(3))))


def test_one_present_class_per_call_and_half_of_the_patches_anchored_on_it():
    # Single voxels of classes 1 and 3 far apart in a large volume; class 2 is absent. A uniform 2x2x2 box holds a
    # given voxel with p = (2 / 63) ** 3 = 3e-5, so a patch holds a class's voxel about only when anchored on it.
    voxels, size, calls = {1: (10, 10, 10), 3: (50, 50, 50)}, np.array([2, 2, 2]), 4000
    transform = RandClassPatchesd(["image", "label"], "label_cls_indices", size, num_samples=2)
    transform.set_random_state(0)
    starts = _starts(transform, _volume((64, 64, 64), voxels, num_classes=3), calls, size)
    holds = np.stack([((starts <= at) & (at < starts + size)).all(2) for at in map(np.array, voxels.values())], 2)
    # the class is drawn uniformly among the present 1 and 3 (p = 1/2 each), then anchored on with p = 0.5
    np.testing.assert_allclose(holds.reshape(-1, 2).mean(0), [0.25, 0.25], atol=0.02)
    # the anchored share is prob: drawing the absent class 2 too (as the authors' code does) would make it 1/3
    np.testing.assert_allclose(holds.any(2).mean(), 0.5, atol=0.02)
    assert not (holds[:, :, 0].any(1) & holds[:, :, 1].any(1)).any(), "one class per call"


def test_outputs_and_determinism():
    data = _volume((12, 12, 8), {1: (5, 5, 4), 2: (1, 1, 1)}, num_classes=2)
    data["note"] = ["kept"]
    transform = RandClassPatchesd(["image", "label"], "label_cls_indices", (4, 4, 4), num_samples=3)
    first = transform.set_random_state(7)(data)
    assert [sorted(p) for p in first] == [["image", "label", "note"]] * 3
    assert all(p["image"].shape == (1, 4, 4, 4) and p["label"].dtype == torch.uint8 for p in first)
    assert [p["label"].meta["patch_index"] for p in first] == [0, 1, 2]
    assert first[0]["note"] == ["kept"] and first[0]["note"] is not data["note"]
    starts = [np.unravel_index(int(p["image"][0, 0, 0, 0]), (12, 12, 8)) for p in first]
    assert np.array_equal(starts, transform.starts), "cut where drawn"
    again = transform.set_random_state(7)(data)
    assert all(torch.equal(a["image"], b["image"]) for a, b in zip(first, again))


def test_a_volume_smaller_than_the_patch_is_refused():
    transform = RandClassPatchesd(["image", "label"], "label_cls_indices", (4, 4, 4))
    with pytest.raises(ValueError, match="size"):
        transform(_volume((3, 4, 4), {}, num_classes=1))
