import pytest
import torch
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from torch import nn

from scripts.losses import HybridLoss
from scripts.training import ExportBackbone, GradientClipping, NonFiniteLossGuard, SSLBatch, latest_checkpoint


def sampler_batch(volumes=2, pairs=3, k=5, patch=(4, 4, 2)):
    return {
        "view1": torch.rand(volumes, pairs, 1, *patch),
        "view2": torch.rand(volumes, pairs, 1, *patch),
        "voxels1": torch.randint(0, 2, (volumes, pairs, k, 3)),
        "voxels2": torch.randint(0, 2, (volumes, pairs, k, 3)),
        "valid": torch.rand(volumes, pairs, k) > 0.5,
    }


def test_ssl_batch_stacks_views_and_augments_only_the_inputs():
    data = sampler_batch()
    inputs, targets, args, kwargs = SSLBatch(lambda x: x + 1)(data, torch.device("cpu"))
    assert inputs.shape == (12, 1, 4, 4, 2) and args == ()
    torch.testing.assert_close(targets["clean"][:6], data["view1"].flatten(0, 1))
    torch.testing.assert_close(targets["clean"][6:], data["view2"].flatten(0, 1))
    torch.testing.assert_close(inputs, targets["clean"] + 1)
    torch.testing.assert_close(kwargs["voxels"][6:], data["voxels2"].flatten(0, 1))
    assert targets["valid"].shape == (6, 5)


@pytest.mark.parametrize("augmentations", ["local", "vox2vec"])
def test_ssl_batch_augments_by_sample_index_without_global_rng(augmentations):
    from scripts.augmentations import build_augmentation

    prepare = SSLBatch(build_augmentation(augmentations, "mri"), seed=3)
    data = sampler_batch(patch=(8, 8, 4))

    def inputs(first: int) -> torch.Tensor:
        batch = {**data, "sample_index": torch.tensor([first, first + 1])}
        state = torch.get_rng_state()
        out = prepare(batch, torch.device("cpu"))[0]
        assert torch.equal(torch.get_rng_state(), state), "torch's global RNG was used"
        return out

    assert torch.equal(inputs(4), inputs(4))
    assert not torch.equal(inputs(4), inputs(6))


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.linear = nn.Linear(2, 1)

    def forward(self, x):
        return self.linear(x)


def trainer(loss_value: float, handlers, lr=0.1):
    net = Tiny()
    batches = [{"image": torch.full((4, 2), 100.0), "label": torch.zeros(4, 1)}]
    return SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=net,
        optimizer=torch.optim.SGD(net.parameters(), lr=lr),
        loss_function=lambda pred, label: (pred - label).pow(2).mean() * loss_value,
        train_handlers=handlers,
        decollate=False,
    )


def test_gradient_clipping_bounds_the_gradient_norm():
    engine = trainer(1.0, [GradientClipping(max_norm=1.0)])
    norms = []
    engine.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda e: norms.append(torch.cat([p.grad.flatten() for p in e.network.parameters()]).norm().item()),
    )
    engine.run()
    assert norms[0] == pytest.approx(1.0, rel=1e-4)


def test_non_finite_loss_stops_before_the_step_and_names_the_checkpoint(tmp_path):
    (tmp_path / "checkpoint_iteration=7.pt").write_bytes(b"")
    loss = HybridLoss()
    loss.terms = {"infonce": torch.tensor(float("nan"))}
    engine = trainer(float("nan"), [NonFiniteLossGuard(str(tmp_path), loss)])
    before = {k: v.clone() for k, v in engine.network.state_dict().items()}
    with pytest.raises(FloatingPointError, match=r"(?s)Non-finite loss.*infonce=nan.*checkpoint_iteration=7\.pt"):
        engine.run()
    for key, value in engine.network.state_dict().items():
        torch.testing.assert_close(value, before[key])


def test_latest_checkpoint_picks_the_highest_iteration(tmp_path):
    assert latest_checkpoint(str(tmp_path)) is None
    for name in ["checkpoint_iteration=90.pt", "checkpoint_iteration=100.pt", "other=500.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert latest_checkpoint(str(tmp_path)).endswith("checkpoint_iteration=100.pt")


def test_export_backbone_writes_a_plain_state_dict_on_completion_only(tmp_path):
    backbone = nn.Conv3d(1, 2, 1)
    target = tmp_path / "models" / "backbone.pt"
    engine = Engine(lambda e, b: None)
    ExportBackbone(backbone, str(target)).attach(engine)

    def fail(engine):
        raise RuntimeError("interrupted")

    failing = Engine(lambda e, b: fail(e))
    ExportBackbone(backbone, str(target)).attach(failing)
    with pytest.raises(RuntimeError):
        failing.run([0])
    assert not target.exists()
    engine.run([0])
    state = torch.load(target, weights_only=True)
    assert state.keys() == backbone.state_dict().keys()


def test_per_class_dice_equals_the_hand_computation():
    from scripts.training import per_class_dice

    label = torch.zeros(2, 4, 4, 1)
    label[0, :2] = 1  # class 1: 8 voxels
    label[1, :, :1] = 1  # class 2: 4 voxels
    pred = torch.zeros_like(label)
    pred[0, :2] = 1  # class 1 exact: Dice 1
    pred[1, :, :2] = 1  # class 2: 8 predicted, 4 overlap: Dice 2*4 / (8 + 4)
    engine = Engine(lambda e, b: [{"pred": pred, "label": label}])
    for name, metric in per_class_dice(2).items():
        metric.attach(engine, name)
    engine.run([0], max_epochs=1)
    assert engine.state.metrics["val_dice_1"] == pytest.approx(1.0)
    assert engine.state.metrics["val_dice_2"] == pytest.approx(8 / 12)
