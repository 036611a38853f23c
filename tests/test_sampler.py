import os

import numpy as np
import pytest
import torch
from scripts.ssl.sampler import VoxelPairSamplerd

SHAPE = (40, 36, 20)
PATCH = (16, 12, 8)


def coordinate_volume(body: np.ndarray) -> dict[str, torch.Tensor]:
    """An image whose value at each voxel is its linear index (exact in float32 for small volumes)."""
    image = torch.arange(int(np.prod(SHAPE)), dtype=torch.float32).reshape(1, *SHAPE)
    return {"image": image, "body": torch.from_numpy(body)[None]}


def ellipsoid_body() -> np.ndarray:
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in SHAPE], indexing="ij"))
    return (grid**2).sum(0) < 0.8


def sample(data, seed=0, **kwargs):
    sampler = VoxelPairSamplerd(PATCH, **{"num_pairs": 6, "voxels_per_pair": 64, **kwargs})
    sampler.set_random_state(seed)
    return sampler(data)


def test_shapes_are_fixed():
    out = sample(coordinate_volume(ellipsoid_body()))
    assert out["view1"].shape == out["view2"].shape == (6, 1, *PATCH)
    assert out["voxels1"].shape == out["voxels2"].shape == (6, 64, 3)
    assert out["valid"].shape == (6, 64) and out["valid"].dtype == torch.bool
    assert out["voxels1"].dtype == torch.int64 and out["view1"].dtype == torch.float32


def test_matched_voxels_are_the_same_body_voxels_in_both_views():
    body = ellipsoid_body()
    out = sample(coordinate_volume(body), num_pairs=8, voxels_per_pair=200)
    for i in range(8):
        valid = out["valid"][i]
        assert valid.any(), "the anchor itself is always a matched voxel"
        v1, v2 = out["voxels1"][i][valid], out["voxels2"][i][valid]
        assert (v1 >= 0).all() and (v1 < torch.tensor(PATCH)).all()
        assert (v2 >= 0).all() and (v2 < torch.tensor(PATCH)).all()
        at1 = out["view1"][i, 0][tuple(v1.T)]
        at2 = out["view2"][i, 0][tuple(v2.T)]
        torch.testing.assert_close(at1, at2, rtol=0, atol=0)
        absolute = np.stack(np.unravel_index(at1.long().numpy(), SHAPE), axis=1)
        assert body[tuple(absolute.T)].all(), "matched voxels lie inside the body"
        assert len(np.unique(at1.numpy())) == len(at1), "drawn without replacement"


def test_views_are_translated_patches_of_the_volume():
    out = sample(coordinate_volume(ellipsoid_body()))
    image = np.arange(int(np.prod(SHAPE))).reshape(SHAPE)
    for view in (out["view1"], out["view2"]):
        for patch in view[:, 0].long().numpy():
            start = np.unravel_index(patch[0, 0, 0], SHAPE)
            expected = image[tuple(slice(s, s + p) for s, p in zip(start, PATCH, strict=True))]
            np.testing.assert_array_equal(patch, expected)


# End to end: the sampler's pairs through SSLBatch (no augmentation) to what the network reads at voxels1 and voxels2


def network_batch(out: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """One volume's pairs as a training step sees them: inputs (2P, 1, *PATCH), valid (P, K), the network's kwargs."""
    from scripts.ssl.batch import SSLBatch

    inputs, targets, _, kwargs = SSLBatch()({k: v[None] for k, v in out.items()}, torch.device("cpu"))
    return inputs, targets["valid"], kwargs


def test_different_overlapping_boxes_read_the_same_image_voxel_at_voxels1_and_voxels2():
    from scripts.networks.fpn3d import MultiscaleProjection

    out = sample(coordinate_volume(ellipsoid_body()), num_pairs=8)
    assert not torch.equal(out["view1"], out["view2"]), "the boxes differ"
    inputs, valid, kwargs = network_batch(out)
    identity = MultiscaleProjection([1], width=None)  # an identity "network": the image itself at each voxel
    values = identity([inputs], kwargs["voxels"])[..., 0]  # (2P, K)
    torch.testing.assert_close(values[:8][valid], values[8:][valid], rtol=0, atol=0)


def test_identical_boxes_give_identical_embeddings_at_voxels1_and_voxels2_in_eval_mode():
    from scripts.networks.fpn3d import dhr_network

    torch.manual_seed(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in PATCH], indexing="ij"))
    # a volume of the patch's size holds one box only, so both views of every pair are that box
    data = {"image": torch.rand(1, *PATCH), "body": torch.from_numpy((grid**2).sum(0) < 0.8)[None]}
    out = sample(data, num_pairs=3)
    assert torch.equal(out["view1"], out["view2"])
    inputs, valid, kwargs = network_batch(out)
    network = dhr_network(4, 3, projection_width=4, embedding_dim=8).eval()
    with torch.no_grad():
        embeddings = network(inputs, **kwargs)["embeddings"]  # (2P, K, D)
    assert valid.any()
    torch.testing.assert_close(embeddings[:3][valid], embeddings[3:][valid])


def test_caps_voxels_and_marks_short_pairs_invalid():
    body = np.zeros(SHAPE, dtype=bool)
    body[20, 18, 10] = True  # a single body voxel: each pair matches exactly that one
    out = sample(coordinate_volume(body), voxels_per_pair=32)
    assert out["valid"].sum(1).tolist() == [1] * 6
    full = sample(coordinate_volume(np.ones(SHAPE, dtype=bool)), voxels_per_pair=32)
    assert full["valid"].all()


def test_same_seed_same_pairs_and_different_seed_different_pairs():
    data = coordinate_volume(ellipsoid_body())
    a, b, c = sample(data, seed=3), sample(data, seed=3), sample(data, seed=4)
    for key in a:
        torch.testing.assert_close(a[key], b[key])
    assert not torch.equal(a["view1"], c["view1"])


def test_views_of_a_pair_are_independent_boxes_around_one_anchor():
    out = sample(coordinate_volume(np.ones(SHAPE, dtype=bool)), num_pairs=50)
    shifts = out["view1"][:, 0, 0, 0, 0] - out["view2"][:, 0, 0, 0, 0]
    assert (shifts != 0).float().mean() > 0.9, "the two boxes are drawn independently"


def test_volume_smaller_than_patch_is_rejected_with_advice():
    small = {"image": torch.zeros(1, 8, 8, 8), "body": torch.ones(1, 8, 8, 8, dtype=torch.bool)}
    with pytest.raises(ValueError, match="smaller than patch_size"):
        sample(small)


# VoxelPairDataset and SampleIndexSampler: items are pure functions of (seed, rank, sample index)


def cached_volumes(tmp_path, count=3):
    """`count` cache entries of textured ellipsoids, each with its own intensity offset."""
    from scripts.data.cache import write_entry

    rng = np.random.default_rng(0)
    body = ellipsoid_body()
    entries = []
    for i in range(count):
        image = np.where(body, 0.3 + 0.1 * i + 0.05 * rng.random(SHAPE), 0.0)
        entries.append(str(write_entry(tmp_path, f"v{i}", {"shape": list(SHAPE)}, image, body)))
    return entries


@pytest.mark.parametrize("in_memory", [False, True])
def test_pairs_from_a_cache_entry_equal_pairs_from_its_array(tmp_path, in_memory):
    """The chunked entry changes nothing the sampler draws: views, voxels and validity equal those cut from the
    (1, X, Y, Z) array (the float16 values the entry holds) with the same random stream."""
    from scripts.data.cache import open_volume, write_entry

    rng = np.random.default_rng(0)
    body = ellipsoid_body()
    image = np.where(body, 0.3 + 0.6 * rng.random(SHAPE), 0.0).astype(np.float16)
    entry = write_entry(tmp_path, "v", {}, image, body, chunk=(8, 8, 4))
    arrays = {"image": torch.from_numpy(image)[None], "body": torch.from_numpy(body)[None]}
    sampler = VoxelPairSamplerd(PATCH, num_pairs=6, voxels_per_pair=64)
    for seed in range(3):
        expected = sampler(arrays, rng=np.random.default_rng(seed))
        out = sampler(open_volume(entry, in_memory=in_memory), rng=np.random.default_rng(seed))
        for key in expected:
            assert torch.equal(out[key], expected[key]), key


def dataset(entries, **kwargs):
    from scripts.ssl.sampler import VoxelPairDataset

    return VoxelPairDataset(entries, VoxelPairSamplerd(PATCH, num_pairs=4, voxels_per_pair=32), **kwargs)


def test_items_are_equal_for_equal_indices_and_differ_between_indices(tmp_path):
    entries = cached_volumes(tmp_path)
    a, b = dataset(entries, seed=1), dataset(entries, seed=1, cache="memory")
    for s in (0, 7, 123456789):
        first, again = a[s], b[s]
        assert int(first["sample_index"]) == s
        for key in first:
            assert torch.equal(first[key], again[key]), key
    assert not torch.equal(a[0]["view1"], a[1]["view1"])
    assert not torch.equal(a[0]["view1"], dataset(entries, seed=2)[0]["view1"])
    assert len({int(a[s]["volume_index"]) for s in range(30)}) == 3, "every volume is drawn"


def test_a_pickled_dataset_maps_its_volumes_again(tmp_path):
    """As a DataLoader worker started by spawn or forkserver gets it: the same items, from its own maps."""
    import pickle

    disk = dataset(cached_volumes(tmp_path), seed=1)
    first = disk[0]  # maps a volume, which does not pickle
    for key, value in pickle.loads(pickle.dumps(disk))[0].items():
        assert torch.equal(value, first[key]), key


def test_ranks_draw_their_own_volumes_and_streams(tmp_path):
    entries = cached_volumes(tmp_path, count=4)
    drawn = [{int(dataset(entries, rank=r, world_size=2)[s]["volume_index"]) for s in range(20)} for r in (0, 1)]
    assert drawn == [{0, 2}, {1, 3}]
    single = cached_volumes(tmp_path / "one", count=1)
    other = dataset(single, rank=1, world_size=2)[0]
    assert not torch.equal(dataset(single, rank=0, world_size=2)[0]["view1"], other["view1"])


def test_unknown_cache_mode_names_the_key(tmp_path):
    from scripts.utils.errors import BundleError

    with pytest.raises(BundleError, match="`cache` must be 'disk' or 'memory'"):
        dataset(cached_volumes(tmp_path, count=1), cache="ram")


def test_index_sampler_continues_from_the_engine_iteration():
    from ignite.engine import Engine, Events
    from scripts.ssl.sampler import SampleIndexSampler

    sampler = SampleIndexSampler(samples_per_iteration=3)
    engine = Engine(lambda e, b: None)
    sampler.attach(engine)
    engine.state.iteration = 5  # as a loaded checkpoint leaves it before the first epoch starts
    engine.fire_event(Events.EPOCH_STARTED)
    assert list(zip(range(4), sampler, strict=False)) == [(0, 15), (1, 16), (2, 17), (3, 18)]


def _maps_of(folder) -> int:
    """Memory maps of files under `folder` open in this process."""
    with open("/proc/self/maps") as f:
        return sum(str(folder) in line for line in f)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs Linux's /proc")
def test_disk_cache_keeps_a_bounded_number_of_volumes_mapped(tmp_path):
    entries = cached_volumes(tmp_path, count=12)
    bounded, unbounded = dataset(entries, max_open=4), dataset(entries)
    for s in range(60):  # every volume drawn, most several times
        first, again = bounded[s], unbounded[s]
        for key in first:
            assert torch.equal(first[key], again[key]), key
    assert len({int(unbounded[s]["volume_index"]) for s in range(60)}) == 12
    del unbounded
    assert _maps_of(tmp_path) == 2 * 4, "two maps (image, body) for each of the 4 most recently used volumes"
