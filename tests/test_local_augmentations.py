import math

import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from scripts.ssl.local_augmentations import LocalAugmentations

SPATIAL = (20, 16, 10)
DIVISOR = 4  # blocks of 5x4x2 voxels in a 20x16x10 patch
BLOCK = (5, 4, 2)
OFF = {"shuffle_prob": 0.0, "bezier_prob": 0.0, "inpaint_max_boxes": 0}


def coordinate_patches(batch: int) -> torch.Tensor:
    """Patches whose voxel values are their flat index in the batch: distinct and exact in float32."""
    return torch.arange(batch * math.prod(SPATIAL), dtype=torch.float32).reshape(batch, 1, *SPATIAL)


def shuffler(**kwargs) -> LocalAugmentations:
    return LocalAugmentations(**{**OFF, "shuffle_prob": 1.0, "shuffle_block_divisor": DIVISOR, **kwargs})


def test_shape_dtype_device_and_input_untouched():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
        images = torch.rand(3, 1, *SPATIAL, dtype=dtype)
        before = images.clone()
        out = LocalAugmentations(shuffle_block_divisor=DIVISOR)(images)
        assert out.shape == images.shape and out.dtype == dtype and out.device == images.device
        assert out.data_ptr() != images.data_ptr()
        assert torch.equal(images, before)
        assert not torch.equal(out, images)


def test_meta_tensor_input():
    images = MetaTensor(torch.rand(2, 1, *SPATIAL))
    before = images.as_subclass(torch.Tensor).clone()
    out = LocalAugmentations(shuffle_block_divisor=DIVISOR)(images)
    assert type(out) is torch.Tensor and out.shape == images.shape
    assert torch.equal(images.as_subclass(torch.Tensor), before)


def test_everything_off_is_identity():
    images = torch.rand(4, 1, *SPATIAL)
    assert torch.equal(LocalAugmentations(**OFF)(images), images)


@pytest.mark.parametrize(
    "bad",
    [
        {"shuffle_prob": 1.5},
        {"bezier_prob": -0.1},
        {"inpaint_box_prob": 2.0},
        {"shuffle_blocks": -1},
        {"inpaint_max_boxes": -1},
        {"shuffle_block_divisor": 0},
        {"inpaint_size": (0.3, 0.2)},
        {"inpaint_size": (0.1, 1.5)},
    ],
)
def test_invalid_arguments(bad):
    with pytest.raises(ValueError):
        LocalAugmentations(**bad)


def test_invalid_images():
    augment = LocalAugmentations()
    for images in (torch.rand(2, 2, *SPATIAL), torch.rand(2, *SPATIAL), torch.ones(2, 1, *SPATIAL, dtype=torch.int64)):
        with pytest.raises(ValueError):
            augment(images)


@pytest.mark.parametrize("pool", [0, 3, 1024])
def test_single_block_shuffle_permutes_one_block(pool):
    augment = shuffler(shuffle_blocks=1)
    augment.PERMUTATION_POOL = pool
    images = coordinate_patches(16)
    out = augment(images)
    changed_patches = 0
    for before, after in zip(images[:, 0], out[:, 0], strict=True):
        assert torch.equal(before.flatten().sort().values, after.flatten().sort().values)
        changed = torch.nonzero(before != after)
        if changed.numel():
            changed_patches += 1
            extent = changed.max(0).values - changed.min(0).values + 1
            assert (extent <= torch.tensor(BLOCK)).all()
    # A random permutation of 40 voxels is the identity with probability 1 / 40!.
    assert changed_patches == 16


@pytest.mark.parametrize("pool", [0, 1024])
def test_many_blocks_move_values_only_within_a_block(pool):
    augment = shuffler(shuffle_blocks=60)
    augment.PERMUTATION_POOL = pool
    images = coordinate_patches(6)
    out = augment(images)
    # Each voxel's value names the voxel it came from: same patch, less than a block side away on every axis.
    source = np.stack(np.unravel_index(out.flatten().long().numpy(), (6, *SPATIAL)), axis=1)
    target = np.stack(np.unravel_index(np.arange(out.numel()), (6, *SPATIAL)), axis=1)
    assert (source[:, 0] == target[:, 0]).all()
    assert (np.abs(source[:, 1:] - target[:, 1:]) < np.array(BLOCK)).all()
    moved = (out != images).flatten(1).float().mean(1)
    assert (moved > 0.2).all()  # 60 blocks of 40 voxels cover much of a 3200-voxel patch


def test_shuffle_probability_and_block_count():
    images = coordinate_patches(400)
    out = shuffler(shuffle_prob=0.5, shuffle_blocks=1)(images)
    changed = (out != images).flatten(1).any(1).sum().item()
    assert abs(changed - 200) < 50  # binomial(400, 0.5): sd 10
    # Block side = patch side // divisor, at least 1: 1x1x1 blocks cannot change anything.
    out = shuffler(shuffle_block_divisor=100, shuffle_blocks=50)(images[:4])
    assert torch.equal(out, images[:4])


def reference_bezier(control: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """y at the intensities `grid` of the cubic Bezier curve (0,0), control[0], control[1], (1,1), densely sampled."""
    t = np.linspace(0.0, 1.0, 400_001)[:, None]
    points = (1 - t) ** 3 * 0 + 3 * (1 - t) ** 2 * t * control[0] + 3 * (1 - t) * t**2 * control[1] + t**3 * 1.0
    return np.interp(grid, points[:, 0], points[:, 1])


def test_bezier_tables_match_the_curve():
    augment = LocalAugmentations()
    controls = [[[0.2, 0.7], [0.6, 0.1]], [[0.0, 1.0], [0.0, 1.0]], [[1.0, 0.0], [1.0, 0.0]], [[1.0, 0.0], [0.0, 1.0]]]
    controls += torch.rand(6, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(3)).tolist()
    control = torch.tensor(controls, dtype=torch.float64)
    values, slopes = augment._bezier_tables(control, torch.float64)
    size = augment.LUT_SIZE
    values, slopes = values.view(-1, size).numpy(), slopes.view(-1, size).numpy()
    grid = np.linspace(0.0, 1.0, size)
    for table, step, points in zip(values, slopes, control.numpy(), strict=True):
        np.testing.assert_allclose(table, reference_bezier(points, grid), atol=2e-4)
        np.testing.assert_allclose(step[:-1], np.diff(table), atol=1e-12)
        assert step[-1] == 0 and table[0] == 0 and table[-1] == pytest.approx(1.0)
        assert (np.diff(table) >= 0).all()


def test_bezier_remap_interpolates_the_table_and_is_monotone():
    torch.manual_seed(1)
    augment = LocalAugmentations(**{**OFF, "bezier_prob": 1.0})
    augment.CPU_STRIP = 1000  # several strips, the last one shorter
    tables = []
    compute_tables = augment._bezier_tables
    augment._bezier_tables = lambda *args: tables.append(compute_tables(*args)) or tables[-1]
    images = torch.rand(5, 1, *SPATIAL)
    images[:, 0, 0, 0, :3] = torch.tensor([0.0, 1.0, 0.5])
    images[:, 0, 1, 0, :2] = torch.tensor([-0.5, 1.5])  # clamped for the lookup
    out = augment(images)
    grid = np.linspace(0.0, 1.0, augment.LUT_SIZE)
    values = tables[0][0].view(5, -1).numpy()
    for before, after, table in zip(images.flatten(1).numpy(), out.flatten(1).numpy(), values, strict=True):
        np.testing.assert_allclose(after, np.interp(np.clip(before, 0, 1), grid, table), atol=1e-6)
        assert (np.diff(after[np.argsort(before, kind="stable")]) >= 0).all()
        assert after.min() >= 0 and after.max() <= 1
    assert torch.allclose(out[:, 0, 0, 0, :2], torch.tensor([0.0, 1.0]), atol=1e-6)
    assert torch.allclose(out[:, 0, 1, 0, :2], torch.tensor([0.0, 1.0]), atol=1e-6)
    # Independent curves per patch: the remapped value of 0.5 differs between patches.
    assert out[:, 0, 0, 0, 2].unique().numel() == 5


def test_bezier_strips_do_not_change_the_result():
    images = torch.rand(7, 1, *SPATIAL)
    outputs = []
    for strip in (1, 333, 1 << 30):
        augment = LocalAugmentations(**{**OFF, "bezier_prob": 1.0})
        augment.CPU_STRIP = strip
        torch.manual_seed(5)
        outputs.append(augment(images))
    assert torch.equal(outputs[0], outputs[1]) and torch.equal(outputs[0], outputs[2])


def test_bezier_probability_leaves_other_patches_exact():
    torch.manual_seed(2)
    images = torch.rand(400, 1, 4, 4, 4)
    out = LocalAugmentations(**{**OFF, "bezier_prob": 0.3})(images)
    unchanged = (out == images).flatten(1).all(1)
    assert abs(unchanged.sum().item() - 280) < 46  # binomial(400, 0.7): sd 9.2


def inpainter(**kwargs) -> LocalAugmentations:
    return LocalAugmentations(**{**OFF, "inpaint_max_boxes": 30, **kwargs})


def test_box_sampling_statistics():
    torch.manual_seed(3)
    augment = inpainter(inpaint_box_prob=0.9, inpaint_size=(0.1, 0.5))
    spatial = (40, 30, 8)
    start, size, present = augment._sample_boxes(5000, spatial, torch.device("cpu"))
    assert start.shape == size.shape == (5000, 30, 3) and present.shape == (5000, 30)
    # Box k exists only if boxes 1..k-1 do: a truncated geometric count.
    assert (present[:, 1:] <= present[:, :-1]).all()
    expected = sum(0.9**k for k in range(1, 31))
    counts = present.sum(1).double()
    assert abs(counts.mean().item() - expected) < 5 * counts.std().item() / math.sqrt(5000)
    side = torch.tensor(spatial)
    lowest = torch.clamp(torch.floor(0.1 * side), min=1).long()
    assert (size >= lowest).all() and (size <= torch.clamp(0.5 * side, min=1)).all()
    assert (start >= 0).all() and (start + size <= side).all()
    # Positions cover the whole patch: some boxes touch each border.
    assert (start.flatten(0, 1).min(0).values == 0).all()
    assert ((start + size).flatten(0, 1).max(0).values == side).all()


def test_inpainting_fills_exactly_the_sampled_boxes_with_noise():
    augment = inpainter()
    images = torch.full((6, 1, *SPATIAL), 2.0)
    out = images.clone().view(6, -1)
    torch.manual_seed(4)
    augment._inpaint(out, SPATIAL)
    torch.manual_seed(4)
    start, size, present = augment._sample_boxes(6, SPATIAL, torch.device("cpu"))
    expected = torch.zeros(6, *SPATIAL, dtype=torch.bool)
    for patch, box in present.nonzero().tolist():
        (x, y, z), (sx, sy, sz) = start[patch, box].tolist(), size[patch, box].tolist()
        expected[patch, x : x + sx, y : y + sy, z : z + sz] = True
    out = out.view(6, *SPATIAL)
    assert torch.equal(out != 2.0, expected)
    assert expected.any()
    assert (out[expected] >= 0).all() and (out[expected] < 1).all()
    assert out[expected].std() > 0.2  # uniform noise, not a constant


def test_single_box_end_to_end():
    torch.manual_seed(6)
    images = torch.full((20, 1, *SPATIAL), 2.0)
    out = inpainter(inpaint_max_boxes=1, inpaint_box_prob=1.0, inpaint_size=(0.25, 0.5))(images)
    for after in out[:, 0]:
        changed = torch.nonzero(after != 2.0)
        low, high = changed.min(0).values, changed.max(0).values + 1
        box = after[low[0] : high[0], low[1] : high[1], low[2] : high[2]]
        assert changed.shape[0] == box.numel()  # the changed voxels fill their bounding box
        assert (box >= 0).all() and (box < 1).all()
        sides = (high - low).double() / torch.tensor(SPATIAL)
        assert (sides >= 0.2).all() and (sides < 0.5).all()  # floor(u * side) with u in [0.25, 0.5)
    assert torch.equal(inpainter(inpaint_box_prob=0.0)(images), images)


def test_independent_draws_per_patch_and_reproducible():
    images = torch.rand(1, 1, *SPATIAL).expand(8, -1, -1, -1, -1)
    augment = LocalAugmentations(shuffle_block_divisor=DIVISOR)
    # Overlapping blocks and boxes write some voxels more than once; which write stays is fixed only when PyTorch
    # runs deterministically (several CPU threads may race).
    deterministic = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        torch.manual_seed(7)
        first = augment(images)
        torch.manual_seed(7)
        assert torch.equal(augment(images), first)
        assert not torch.equal(augment(images), first)
    finally:
        torch.use_deterministic_algorithms(deterministic, warn_only=warn_only)
    flat = first.flatten(1)
    for i in range(8):
        for j in range(i):
            assert not torch.equal(flat[i], flat[j])
