import copy
import json
import math
import warnings

import pytest
import torch
from authors_layout import authors_state, fpn3d_layout
from scripts.networks.fpn3d import FPN3d, MaskedBatchNorm1d, MultiscaleProjection, ProjectionHead, dhr_network
from scripts.ssl.batch import SSLBatch


@pytest.fixture(scope="module")
def dhr_backbone() -> FPN3d:
    return FPN3d(1, 32, 5)


@pytest.mark.parametrize("size", [(16, 16, 8), (9, 10, 7)])
def test_pyramid_shapes(size):
    backbone = FPN3d(2, 4, 3)
    pyramid = backbone(torch.rand(2, 2, *size))
    assert backbone.out_channels == [4, 8, 16]
    assert [tuple(p.shape) for p in pyramid] == [(2, 4 * 2**i, *(math.ceil(s / 2**i) for s in size)) for i in range(3)]


def test_dhr_backbone_has_the_authors_names_and_shapes(dhr_backbone):
    """278 entries for base 32 / 5 scales, each named and shaped as in the authors' code (tests/authors_layout.py,
    written from their layout, not from FPN3d), so their released weights load with strict=True."""
    state = {name: tuple(tensor.shape) for name, tensor in dhr_backbone.state_dict().items()}
    assert len(state) == 278
    assert state == fpn3d_layout(1, 32, 5)
    assert sum(p.numel() for p in dhr_backbone.parameters()) == 47_567_872  # the paper's 47.6 M
    spot_checks = {
        "first_conv.weight": (32, 1, 3, 3, 3),
        "left_blocks.0.layers.1.layers.3.running_mean": (32,),
        "left_blocks.3.layers.0.layers.0.num_batches_tracked": (),
        "down_blocks.0.1.weight": (64, 32, 1, 1, 1),
        "up_blocks.0.0.weight": (256, 512, 1, 1, 1),
        "skip_blocks.0.bias": (256,),
        "right_blocks.3.layers.1.layers.5.weight": (32, 32, 3, 3, 3),
        "bottom_block.layers.0.layers.2.weight": (512, 512, 3, 3, 3),
    }
    assert {k: state[k] for k in spot_checks} == spot_checks


def test_vox2vec_backbone_has_the_authors_names_and_shapes():
    backbone = FPN3d(1, 16, 6)
    assert {name: tuple(tensor.shape) for name, tensor in backbone.state_dict().items()} == fpn3d_layout(1, 16, 6)
    assert sum(p.numel() for p in backbone.parameters()) == 47_624_448  # the paper's 47.6 M


def test_weights_in_the_authors_layout_load_strictly():
    state = authors_state(1, 8, 3)
    backbone = FPN3d(1, 8, 3)
    backbone.load_state_dict(state, strict=True)
    assert all(torch.equal(backbone.state_dict()[k], v) for k, v in state.items())


def test_torchscript_matches_eager():
    backbone = FPN3d(1, 8, 3).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated but still supported
        scripted = torch.jit.script(backbone)
    x = torch.rand(1, 1, 9, 6, 5)
    for eager, script in zip(backbone(x), scripted(x), strict=True):
        torch.testing.assert_close(eager, script)


def _pyramid_and_voxels(size=(9, 10, 7), channels=(3, 4, 5), batch=2, k=20):
    torch.manual_seed(0)
    pyramid = [
        torch.randn(batch, c, *(math.ceil(s / 2**i) for s in size), requires_grad=True) for i, c in enumerate(channels)
    ]
    voxels = torch.stack([torch.randint(0, s, (batch, k)) for s in size], dim=-1)
    return pyramid, voxels


def _naive_gather(pyramid, voxels):
    """(B, K, sum C_i): a per-voxel loop reading level i at index >> i."""
    return torch.stack(
        [
            torch.stack(
                [torch.cat([p[b, :, x >> i, y >> i, z >> i] for i, p in enumerate(pyramid)]) for x, y, z in voxels[b]]
            )
            for b in range(voxels.shape[0])
        ]
    )


def test_raw_concatenation_gathers_the_containing_cells():
    pyramid, voxels = _pyramid_and_voxels()
    projection = MultiscaleProjection([3, 4, 5], width=None)
    assert projection.out_channels == 12
    assert len(projection.projections) == 0
    torch.testing.assert_close(projection(pyramid, voxels), _naive_gather(pyramid, voxels))


def test_projection_applies_one_linear_per_level():
    pyramid, voxels = _pyramid_and_voxels()
    projection = MultiscaleProjection([3, 4, 5], width=2)
    assert projection.out_channels == 6
    naive = _naive_gather(pyramid, voxels).split([3, 4, 5], dim=-1)
    expected = torch.cat([linear(v) for linear, v in zip(projection.projections, naive, strict=True)], dim=-1)
    torch.testing.assert_close(projection(pyramid, voxels), expected)


def _train_step(network):
    images = torch.rand(2, 1, 8, 8, 6)
    voxels = torch.stack([torch.randint(0, s, (2, 16)) for s in (8, 8, 6)], dim=-1)
    outputs = network(images, voxels)
    (outputs["embeddings"].sum() + outputs["restoration"].square().mean()).backward()
    return outputs


def test_trainable_projections_get_gradients_and_are_saved():
    network = dhr_network(4, 3, projection_width=4)
    _train_step(network)
    for linear in network.projection.projections:
        assert linear.weight.grad is not None and linear.weight.grad.abs().sum() > 0
    keys = network.state_dict().keys()
    assert {f"projection.projections.{i}.{p}" for i in range(3) for p in ("weight", "bias")} <= keys


def test_frozen_projections_are_fixed_unsaved_buffers():
    network = dhr_network(4, 3, projection_width=4, freeze_projections=True, seed=3)
    _train_step(network)
    projections = network.projection.projections
    assert not any(p.requires_grad for p in projections.parameters())
    assert all(linear.weight.grad is None for linear in projections)
    assert not any(k.startswith("projection.") for k in network.state_dict())
    network.load_state_dict(dhr_network(4, 3, 4, freeze_projections=True, seed=3).state_dict(), strict=True)

    same = MultiscaleProjection([4, 8, 16], 4, frozen=True, seed=3)
    other = MultiscaleProjection([4, 8, 16], 4, frozen=True, seed=4)
    for a, b, c in zip(projections, same.projections, other.projections, strict=True):
        assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
        assert not torch.equal(a.weight, c.weight)

    network.to(torch.float64)
    assert all(linear.weight.dtype == torch.float64 for linear in projections)


def test_outputs():
    network = dhr_network(4, 3, projection_width=4, embedding_dim=6)
    outputs = _train_step(network)
    assert outputs["embeddings"].shape == (2, 16, 6)
    torch.testing.assert_close(outputs["embeddings"].norm(dim=-1), torch.ones(2, 16))
    assert outputs["restoration"].shape == (2, 1, 8, 8, 6)
    without = dhr_network(4, 3, restoration=False)
    assert without.restoration_head is None
    assert without(torch.rand(2, 1, 8, 8, 6), torch.zeros(2, 3, 3, dtype=torch.long)).keys() == {"embeddings"}


def test_factory_widths():
    dhr = dhr_network()
    assert [dhr.projection.out_channels, dhr.head.layers[0].out_features] == [160, 160]
    vox2vec = dhr_network(16, 6, projection_width=None, restoration=False)
    assert [vox2vec.projection.out_channels, vox2vec.head.layers[0].out_features] == [1008, 1008]


def test_activation_checkpointing_gives_the_same_gradients_and_statistics():
    torch.manual_seed(0)
    plain = FPN3d(1, 4, 3)
    checkpointed = FPN3d(1, 4, 3, activation_checkpointing=True)
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.rand(2, 1, 16, 16, 8)
    for net in (plain, checkpointed):
        sum(level.square().mean() for level in net(x)).backward()
    for (name, a), b in zip(plain.named_parameters(), checkpointed.parameters(), strict=True):
        torch.testing.assert_close(a.grad, b.grad, msg=name)
    for (name, a), b in zip(plain.state_dict().items(), checkpointed.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)  # BatchNorm statistics updated once, not again in the recompute


@pytest.mark.parametrize("momentum", [0.1, None])
def test_masked_batch_norm_is_batch_norm_of_the_valid_rows(momentum):
    torch.manual_seed(0)
    x = torch.randn(12, 5, dtype=torch.float64)
    valid = torch.tensor([1, 1, 0, 1, 0, 1, 1, 1, 0, 1, 1, 0], dtype=torch.bool)
    x[~valid] = float("inf")
    masked = MaskedBatchNorm1d(5, momentum=momentum).double()
    plain = torch.nn.BatchNorm1d(5, momentum=momentum).double()
    with torch.no_grad():
        plain.weight.uniform_(0.5, 2), plain.bias.uniform_(-1, 1)
    masked.load_state_dict(plain.state_dict())
    for _ in range(2):  # twice: the cumulative average (momentum None) counts the batches
        torch.testing.assert_close(masked(x, valid)[valid], plain(x[valid]))
    for (name, a), b in zip(masked.state_dict().items(), plain.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)
    masked.eval(), plain.eval()
    torch.testing.assert_close(masked(x[valid], valid[valid]), plain(x[valid]))


def test_padded_rows_reach_neither_the_head_output_nor_its_gradients():
    torch.manual_seed(0)
    head = ProjectionHead(6, 8, 4)
    x = torch.randn(2, 5, 6).requires_grad_()
    valid = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        x[~valid] = float("inf")
    out = head(x, valid)
    assert torch.equal(out[~valid], torch.zeros(2, 4))
    torch.testing.assert_close(out[valid].norm(dim=-1), torch.ones(8))
    out.sum().backward()
    assert all(torch.isfinite(p.grad).all() for p in head.parameters())
    assert torch.isfinite(x.grad).all() and not x.grad[~valid].any()


def test_padded_voxel_slots_change_neither_the_valid_embeddings_nor_the_head_statistics():
    """A training step's embeddings of the matched voxels, and the head's BatchNorm statistics, are those of the same
    batch without its padded slots, even where the voxel the padding points at, (0, 0, 0), is extreme."""
    torch.manual_seed(0)
    network = dhr_network(4, 3, projection_width=4)
    reference = copy.deepcopy(network)
    views = torch.rand(2, 1, 3, 1, 8, 8, 6)
    views[..., 0, 0, 0] = 1000.0
    valid = torch.rand(1, 3, 10) > 0.4
    voxels = torch.stack([torch.randint(0, s, (2, 1, 3, 10)) for s in (8, 8, 6)], dim=-1)
    voxels[:, ~valid] = 0  # the sampler's padding
    batch = {"view1": views[0], "view2": views[1], "voxels1": voxels[0], "voxels2": voxels[1], "valid": valid}
    inputs, targets, _, kwargs = SSLBatch()(batch, torch.device("cpu"))
    rows = targets["valid"].repeat(2, 1)  # (2P, K): both views of each pair

    embeddings = network(inputs, **kwargs)["embeddings"][rows]
    features = reference.projection(reference.backbone(inputs), kwargs["voxels"])
    torch.testing.assert_close(embeddings, reference.head(features[rows][None])[0])
    for (name, a), b in zip(network.head.state_dict().items(), reference.head.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, msg=name)


def _dhr_step(network, batch, channels_last: bool) -> tuple[dict, dict]:
    """One DHR forward and backward on `batch`: the outputs and the gradients."""
    inputs, targets, _, kwargs = SSLBatch(None, 0, channels_last)(batch, torch.device("cpu"))
    out = network(inputs, **kwargs)
    (out["embeddings"].square().mean() + out["restoration"].mean()).backward()
    grads = {name: p.grad for name, p in network.named_parameters() if p.grad is not None}
    return {k: v.detach() for k, v in out.items() if isinstance(v, torch.Tensor)}, grads


def _voxel_batch(size=(16, 16, 8), pairs=2, k=16) -> dict:
    views = torch.rand(2, 1, pairs, 1, *size)
    voxels = torch.stack([torch.randint(0, s, (2, 1, pairs, k)) for s in size], dim=-1)
    valid = torch.ones(1, pairs, k, dtype=torch.bool)
    return {"view1": views[0], "view2": views[1], "voxels1": voxels[0], "voxels2": voxels[1], "valid": valid}


def test_channels_last_computes_the_same_step_with_weights_and_inputs_in_that_format():
    from scripts.networks.performance import place

    torch.manual_seed(0)
    plain = dhr_network(4, 3, projection_width=4)
    fast = place(copy.deepcopy(plain), torch.device("cpu"), channels_last=True)
    conv = next(m for m in fast.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    batch = _voxel_batch()
    (out_a, grads_a), (out_b, grads_b) = _dhr_step(plain, batch, False), _dhr_step(fast, batch, True)
    assert out_a.keys() == out_b.keys() and grads_a.keys() == grads_b.keys()
    for key in out_a:
        torch.testing.assert_close(out_a[key], out_b[key], atol=1e-4, rtol=1e-3, msg=key)
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], atol=1e-4, rtol=1e-3, msg=key)
    assert plain.state_dict().keys() == fast.state_dict().keys()


@pytest.mark.slow
def test_compile_computes_the_same_step_and_keeps_the_state_dict_keys():
    """torch.compile (inductor, a C++ compiler on CPU): about a minute to compile even this tiny network."""
    from scripts.networks.performance import place

    torch.manual_seed(0)
    plain = dhr_network(4, 3, projection_width=4)
    compiled = place(copy.deepcopy(plain), torch.device("cpu"), compile=True)
    batch = _voxel_batch()
    (out_a, grads_a), (out_b, grads_b) = _dhr_step(plain, batch, False), _dhr_step(compiled, batch, False)
    for key in out_a:
        torch.testing.assert_close(out_a[key], out_b[key], atol=1e-4, rtol=1e-3, msg=key)
    for key in grads_a:
        torch.testing.assert_close(grads_a[key], grads_b[key], atol=1e-4, rtol=1e-3, msg=key)
    assert plain.state_dict().keys() == compiled.state_dict().keys()


def test_the_channels_last_key_trains_a_pretraining_in_that_format(tmp_path):
    from bundle import PRETRAIN_TINY, run_workflow
    from test_pretrain_bundle import write_volumes

    write_volumes(tmp_path / "data", count=1)
    paths = {"dataset_dir": tmp_path / "data", "output_dir": tmp_path / "out", "bundle_root": tmp_path}
    run = run_workflow("pretrain", "configs/pretrain.yaml", **PRETRAIN_TINY, **paths, epochs=1, channels_last=True)
    network = run.workflow.parser.get_parsed_content("network")
    conv = next(m for m in network.modules() if isinstance(m, torch.nn.Conv3d))
    assert conv.weight.is_contiguous(memory_format=torch.channels_last_3d)
    assert (tmp_path / "out/pretrained_backbone.pt").is_file()
    assert "channels_last" not in json.loads((tmp_path / "out/run.json").read_text())  # the same values, faster
