import logging
import math
import warnings

import pytest
import torch
import torch.distributed as dist
from ignite.engine import Events
from monai.engines import SupervisedTrainer
from scripts.networks.fpn3d import FPN3d
from scripts.networks.segmentation import (
    BackboneWarmup,
    FPNNonLinearHead,
    LinearFPNHead,
    SegmentationNet,
    segmentation_network,
)
from scripts.utils.errors import BundleError
from torch.nn.parallel import DistributedDataParallel


def _script(module):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)  # torch.jit.script is deprecated but still supported
        return torch.jit.script(module)


def _state(module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("head", ["linear", "nonlinear"])
@pytest.mark.parametrize("size", [(8, 8, 4), (9, 6, 5)])
def test_output_shape(head, size):
    net = segmentation_network(3, 2, 3, head=head)
    assert net(torch.rand(2, 1, *size)).shape == (2, 3, *size)


@pytest.mark.parametrize("size", [(2, 2, 2), (3, 2, 1)])
def test_linear_head_matches_hand_computation(size):
    torch.manual_seed(0)
    head = LinearFPNHead([2, 3], 4)
    fine = torch.randn(1, 2, *size)
    coarse = torch.randn(1, 3, *(math.ceil(s / 2) for s in size))  # one voxel for (2, 2, 2)
    out = head([fine, coarse])

    w0, b0 = head.convs[0].weight.flatten(1), head.convs[0].bias
    w1, b1 = head.convs[1].weight.flatten(1), head.convs[1].bias
    expected = torch.empty(1, 4, *size)
    for x in range(size[0]):
        for y in range(size[1]):
            for z in range(size[2]):
                # A voxel reads the coarse cell that contains it.
                expected[0, :, x, y, z] = w0 @ fine[0, :, x, y, z] + b0 + w1 @ coarse[0, :, x // 2, y // 2, z // 2] + b1
    torch.testing.assert_close(out, expected)


def test_nonlinear_head_is_voxelwise():
    torch.manual_seed(0)
    head = FPNNonLinearHead([2, 3], 4).eval()
    fine, coarse = torch.randn(1, 2, 2, 2, 2), torch.randn(1, 3, 1, 1, 1)
    out = head([fine, coarse])
    # Changing one fine voxel changes that output voxel only.
    fine2 = fine.clone()
    fine2[0, :, 1, 0, 1] += 1.0
    changed = (head([fine2, coarse]) != out).any(dim=1)[0]
    assert changed.nonzero().tolist() == [[1, 0, 1]]


def test_nonlinear_head_is_vox2vecs_fpn_nonlinear_head():
    # vox2vec.nn.fpn.FPNNonLinearHead(base_channels=4, num_scales=3, num_classes=2): per-level widths 4, 8, 16,
    # modules stored coarse to fine, residual blocks BN(0) ReLU(1) conv(2) BN(3) ReLU(4) conv(5).
    def block(prefix: str, c: int) -> dict:
        statistics = ("weight", "bias", "running_mean", "running_var")
        shapes = {f"{prefix}.layers.{k}.{n}": (c,) for k in (0, 3) for n in statistics}
        shapes |= {f"{prefix}.layers.{k}.num_batches_tracked": () for k in (0, 3)}
        shapes |= {f"{prefix}.layers.{k}.weight": (c, c, 1, 1, 1) for k in (2, 5)}
        return shapes | {f"{prefix}.layers.{k}.bias": (c,) for k in (2, 5)}

    expected = block("bottom_block", 16) | block("right_blocks.0", 8) | block("right_blocks.1", 4)
    for i, (c_in, c) in enumerate([(16, 8), (8, 4)]):
        expected |= {f"up_blocks.{i}.0.weight": (c, c_in, 1, 1, 1), f"up_blocks.{i}.0.bias": (c,)}
        expected |= {f"skip_blocks.{i}.weight": (c, c, 1, 1, 1), f"skip_blocks.{i}.bias": (c,)}
    expected |= {"final_block.weight": (2, 4, 1, 1, 1), "final_block.bias": (2,)}
    head = segmentation_network(2, 4, 3, head="nonlinear").head
    assert isinstance(head, FPNNonLinearHead)
    assert {k: tuple(v.shape) for k, v in head.state_dict().items()} == expected


def test_freeze_backbone():
    net = segmentation_network(2, 2, 2)
    net.freeze_backbone()
    net.train()
    assert net.backbone_frozen and net.training and net.head.training
    assert not any(m.training for m in net.backbone.modules())
    before = _state(net.backbone)
    net(torch.rand(2, 1, 6, 6, 6)).sum().backward()
    assert _same(before, _state(net.backbone))  # BN running stats and num_batches_tracked unchanged
    assert all(p.grad is None and not p.requires_grad for p in net.backbone.parameters())
    assert all(p.grad is not None for p in net.head.parameters())

    net.freeze_backbone(False)
    assert not net.backbone_frozen and all(m.training for m in net.backbone.modules())
    net(torch.rand(2, 1, 6, 6, 6)).sum().backward()
    assert all(p.requires_grad and p.grad is not None for p in net.backbone.parameters())
    assert not _same(before, _state(net.backbone))  # BN statistics move again
    net.eval()
    assert not any(m.training for m in net.modules())


def _run_trainer(warmup_epochs: int | str, max_epochs: int, pretrained: bool = True, distributed: bool = False):
    """Trains a tiny net with SupervisedTrainer; returns the net and the (backbone, head) states after each epoch, and
    the trainer's network during each epoch."""
    torch.manual_seed(0)
    net = segmentation_network(2, 2, 2)
    data = [{"image": torch.rand(2, 1, 8, 8, 8), "label": (torch.rand(2, 2, 8, 8, 8) > 0.5).float()} for _ in range(2)]
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=max_epochs,
        train_data_loader=data,
        network=net,
        optimizer=torch.optim.Adam(net.parameters(), 1e-2),  # all parameters, frozen ones included
        loss_function=torch.nn.BCEWithLogitsLoss(),
    )
    BackboneWarmup(net, warmup_epochs, pretrained, distributed).attach(trainer)
    states = [(_state(net.backbone), _state(net.head))]
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda _: states.append((_state(net.backbone), _state(net.head))))
    networks = []
    trainer.add_event_handler(Events.EPOCH_COMPLETED, lambda engine: networks.append(engine.network))
    trainer.run()
    return net, states, networks


def test_backbone_warmup_with_supervised_trainer(caplog):
    caplog.set_level(logging.INFO)
    net, states, _ = _run_trainer(warmup_epochs=1, max_epochs=2)
    (backbone0, head0), (backbone1, head1), (backbone2, _) = states
    assert _same(backbone0, backbone1)  # epoch 1: weights and BN buffers untouched although Adam holds them
    assert not _same(head0, head1)
    assert not _same(backbone1, backbone2)  # epoch 2: the same optimizer now trains the backbone
    assert not net.backbone_frozen
    out = caplog.text
    assert "epochs 1-1: backbone frozen (no gradient, BatchNorm in eval mode)" in out
    assert "epoch 2: backbone unfrozen, all parameters train" in out


@pytest.fixture
def process_group(tmp_path):
    """A one-process gloo group, as torchrun would start it."""
    dist.init_process_group("gloo", init_method=(tmp_path / "store").as_uri(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_under_torchrun_each_phase_trains_in_its_own_ddp_without_the_unused_parameter_search(process_group):
    net, states, networks = _run_trainer(warmup_epochs=1, max_epochs=3, distributed=True)
    assert all(isinstance(n, DistributedDataParallel) and not n.find_unused_parameters for n in networks)
    warm_up, first_unfrozen, second_unfrozen = networks
    assert warm_up is not first_unfrozen and first_unfrozen is second_unfrozen  # a new wrapper at the switch only
    # 2 steps an epoch: a wrapper expecting gradients the step does not make would fail at the second one
    assert all(n.module is net for n in networks)
    (backbone0, head0), (backbone1, head1), (backbone2, _), _ = states
    assert _same(backbone0, backbone1) and not _same(head0, head1)
    assert not _same(backbone1, backbone2)


def test_backbone_frozen_throughout(caplog):
    caplog.set_level(logging.INFO)
    net, states, _ = _run_trainer(warmup_epochs=5, max_epochs=2)
    assert _same(states[0][0], states[-1][0])
    assert not _same(states[0][1], states[-1][1])
    out = caplog.text
    assert "epochs 1-2: backbone frozen" in out and "unfrozen" not in out


def test_from_scratch_the_backbone_is_never_frozen(caplog):
    caplog.set_level(logging.INFO)
    net, states, _ = _run_trainer(warmup_epochs=1, max_epochs=2, pretrained=False)
    assert not _same(states[0][0], states[1][0]), "a random backbone trains from epoch 1"
    out = caplog.text
    assert "epoch 1: from scratch, no warm-up" in out and "frozen" not in out


def test_all_keeps_even_a_random_backbone_frozen(caplog):
    caplog.set_level(logging.INFO)
    net, states, _ = _run_trainer(warmup_epochs="all", max_epochs=2, pretrained=False)
    assert _same(states[0][0], states[-1][0]), "linear evaluation of random features: the from-scratch reference"
    assert "epochs 1-2: backbone frozen" in caplog.text


@pytest.mark.parametrize("value", [-1, "some", 1.5])
def test_warmup_epochs_must_be_a_count_or_all(value):
    with pytest.raises(BundleError, match="warmup_epochs"):
        BackboneWarmup(segmentation_network(2, 2, 2), value)


def test_backbone_warmup_resume(caplog):
    caplog.set_level(logging.INFO)

    class State:
        epoch, max_epochs = 3, 5  # resumed after epoch 2: epoch 3 is about to run

    net = segmentation_network(2, 2, 2)
    warmup = BackboneWarmup(net, warmup_epochs=4)
    warmup(type("Engine", (), {"state": State})())
    assert net.backbone_frozen
    assert "epochs 3-4: backbone frozen" in caplog.text
    caplog.clear()
    State.epoch = 5
    warmup(type("Engine", (), {"state": State})())
    assert not net.backbone_frozen
    assert "epoch 5: backbone unfrozen" in caplog.text


def test_pretrained_checkpoint(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    source = FPN3d(1, 4, 3)
    path = tmp_path / "backbone.pt"
    torch.save(source.state_dict(), path)
    net = segmentation_network(2, 4, 3, pretrained_ckpt=str(path))
    assert _same(_state(source), _state(net.backbone))
    assert f"loaded from {path}" in caplog.text
    caplog.clear()
    segmentation_network(2, 4, 3)
    assert (
        "segmentation network" not in caplog.text
    )  # the workflow says what it starts from (train) or loads (evaluation)

    other = tmp_path / "other.pt"
    torch.save(FPN3d(1, 2, 2).state_dict(), other)
    with pytest.raises(ValueError, match="other.pt"):
        segmentation_network(2, 4, 3, pretrained_ckpt=str(other))
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        segmentation_network(2, 4, 3, pretrained_ckpt=str(tmp_path / "missing.pt"))


def test_bad_head():
    with pytest.raises(ValueError, match="head"):
        segmentation_network(2, 2, 2, head="mlp")


@pytest.mark.parametrize("head", ["linear", "nonlinear"])
def test_torchscript_matches_eager(head):
    net = segmentation_network(3, 4, 3, head=head)
    net.freeze_backbone()  # Python-only state must not hinder scripting
    net.eval()
    scripted = _script(net)
    x = torch.rand(1, 1, 9, 6, 5)
    torch.testing.assert_close(scripted(x), net(x))
    scripted.train()  # the scripted network keeps the plain nn.Module train()/eval()
    scripted.eval()
    assert not scripted.training and isinstance(net, SegmentationNet)


def test_probabilities_to_labels_takes_the_most_probable_class_above_the_threshold():
    from scripts.networks.segmentation import probabilities_to_labels

    # voxels: none above 0.5; only class 2; both, class 1 higher; both, class 2 higher
    p = torch.tensor([[0.4, 0.1, 0.9, 0.6], [0.3, 0.7, 0.8, 0.7]]).view(2, 4, 1, 1)
    labels = probabilities_to_labels(p)
    assert labels.shape == (1, 4, 1, 1) and labels.dtype == p.dtype
    assert labels.flatten().tolist() == [0, 2, 1, 2]
