import math

import numpy as np
import pytest
import torch
from bundle import ROOT
from ignite.engine import Engine, Events
from monai.engines import SupervisedTrainer
from scripts.engine.handlers import ExportBackbone, GradientClipping, NonFiniteLossGuard, loss_only
from scripts.engine.runs import checkpoints
from scripts.ssl.batch import SSLBatch
from scripts.ssl.losses import HybridLoss
from torch import nn


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
    torch.testing.assert_close(kwargs["valid"], targets["valid"].repeat(2, 1))  # the network's view of the slots


@pytest.mark.parametrize("augmentations", ["local", "vox2vec"])
def test_ssl_batch_augments_by_sample_index_without_global_rng(augmentations):
    from scripts.ssl.batch import build_augmentation

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


def test_non_finite_loss_stops_before_a_checkpoint_and_names_the_last_one(tmp_path):
    from monai.handlers import CheckpointSaver

    (tmp_path / "checkpoint_iteration=7.pt").write_bytes(b"")
    loss = HybridLoss()
    loss.terms = {"infonce": torch.tensor(float("nan"))}
    engine = trainer(float("nan"), [NonFiniteLossGuard(str(tmp_path), loss, interval=10, checkpoint_interval=1)])
    CheckpointSaver(str(tmp_path), {"network": engine.network}, epoch_level=False, save_interval=1).attach(engine)
    with pytest.raises(FloatingPointError, match=r"(?s)Non-finite loss at iteration 1; infonce=nan.*iteration=7\.pt"):
        engine.run()
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_iteration=7.pt"], "no checkpoint after a NaN step"


def test_checkpoints_are_newest_first(tmp_path):
    assert checkpoints(tmp_path) == []
    for name in ["checkpoint_iteration=90.pt", "checkpoint_iteration=100.pt", "other=500.pt"]:
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in checkpoints(tmp_path)] == ["checkpoint_iteration=100.pt", "checkpoint_iteration=90.pt"]


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
    from scripts.engine.validation import per_class_dice

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


# What copies a tensor's value to the host: on a GPU each call is a host-device synchronisation.
HOST_READS = ("item", "tolist", "cpu", "numpy", "__float__", "__int__", "__bool__")


def test_a_pretraining_step_reads_the_device_once_at_most_except_every_log_interval(tmp_path, monkeypatch):
    """pretrain.yaml's trainer with every handler (progress, TensorBoard, stats, NaN check, checkpoints, export and
    --tracking mlflow's): host reads of tensors per iteration, from its start to the next batch's fetch."""
    from monai.bundle import ConfigWorkflow
    from test_pretrain_bundle import write_volumes

    write_volumes(tmp_path / "data", count=1)
    workflow = ConfigWorkflow(
        str(ROOT / "configs/pretrain.yaml"),
        logging_file=False,
        run_id="pretrain",
        tracking="mlflow",
        **{"patch_size": [16, 16, 8], "base_channels": 4, "num_scales": 3, "pairs_per_volume": 2},
        **{"voxels_per_pair": 32, "epochs": 1, "epoch_length": 8, "log_interval": 4, "num_workers": 0},
        **{"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "bundle_root": str(tmp_path)},
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    step = [0]  # the iteration running; 0 while a batch is loaded (in DataLoader workers in a real run)
    trainer.add_event_handler(Events.GET_BATCH_STARTED, lambda _: step.__setitem__(0, 0))
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda e: step.__setitem__(0, e.state.iteration))
    reads: dict[int, int] = {}
    optimizer = workflow.parser.get_parsed_content("optimizer")

    def host_counter(tensor) -> bool:  # Adam keeps its step counts on the host on purpose: reading them is free
        return any(tensor is state.get("step") for state in optimizer.state.values())

    def counted(original):
        def read(tensor, *args, **kwargs):
            if step[0] and not host_counter(tensor):
                reads[step[0]] = reads.get(step[0], 0) + 1
            return original(tensor, *args, **kwargs)

        return read

    for name in HOST_READS:
        monkeypatch.setattr(torch.Tensor, name, counted(getattr(torch.Tensor, name)))
    workflow.run()
    monkeypatch.undo()
    workflow.finalize()
    logged = {4, 8}  # every log_interval, and the epoch's end
    assert all(reads.get(i, 0) <= 1 for i in range(1, 9) if i not in logged), reads
    assert all(reads[i] > 1 for i in logged), f"the count sees the log steps' reads: {reads}"


# Operations whose output shape depends on tensor values: on a GPU each makes the host wait for the device.
DATA_DEPENDENT_SHAPES = {"nonzero", "masked_select", "unique", "_unique2", "unique_consecutive", "unique_dim"}


@pytest.mark.parametrize("method", ["dhr", "vox2vec", "pcrl"])
def test_no_op_of_a_pretraining_step_has_a_data_dependent_shape(tmp_path, method):
    """Every aten operation of each method's step (augmentation, forward, loss, backward, optimiser; the batch fetch
    aside), seen through a dispatch mode: the implicit syncs that counting host reads cannot see (a boolean mask
    index calls nonzero)."""
    from monai.bundle import ConfigWorkflow
    from test_pretrain_bundle import write_volumes
    from torch.utils._python_dispatch import TorchDispatchMode

    write_volumes(tmp_path / "data", count=1)
    overrides = {"vox2vec": ["configs/pretrain_vox2vec.yaml"], "pcrl": ["configs/pretrain_pcrl.yaml"]}
    workflow = ConfigWorkflow(
        [str(ROOT / c) for c in ["configs/pretrain.yaml", *overrides.get(method, [])]],
        logging_file=False,
        run_id="pretrain",
        **{"patch_size": [16, 16, 8], "base_channels": 4, "num_scales": 3, "pairs_per_volume": 2},
        **{"voxels_per_pair": 32, "epochs": 1, "epoch_length": 2, "num_workers": 0, "progress": False},
        **{"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "bundle_root": str(tmp_path)},
    )
    workflow.initialize()
    trainer = workflow.parser.get_parsed_content("train#trainer")
    in_step, found = [False], set()
    trainer.add_event_handler(Events.ITERATION_STARTED, lambda _: in_step.__setitem__(0, True))
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: in_step.__setitem__(0, False))

    class Record(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func._schema.name.split("::")[-1]
            indices = args[1] if func in (torch.ops.aten.index.Tensor, torch.ops.aten.index_put_.default) else ()
            if any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices):
                name = f"{name} with a boolean mask"
            if in_step[0] and (name in DATA_DEPENDENT_SHAPES or "boolean" in name):
                found.add(name)
            return func(*args, **(kwargs or {}))

    with Record():
        workflow.run()
    workflow.finalize()
    assert trainer.state.iteration == 2
    assert not found, f"data-dependent shapes in the step: {sorted(found)}"


@pytest.fixture
def restore_determinism(monkeypatch):
    """Restores what `set_determinism` changes process-wide: deterministic mode, cuDNN flags, cuBLAS variable."""
    monkeypatch.setenv("CUBLAS_WORKSPACE_CONFIG", "")  # recorded as absent (or its value), so the teardown restores it
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG")
    state = (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
    cudnn = (torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic)
    yield
    torch.use_deterministic_algorithms(state[0], warn_only=state[1])
    torch.backends.cudnn.benchmark, torch.backends.cudnn.deterministic = cudnn


@pytest.mark.parametrize("method", ["dhr", "vox2vec", "pcrl"])
def test_deterministic_true_trains_every_method_with_deterministic_algorithms_only(
    tmp_path, method, restore_determinism
):
    """A step of each method with `torch.use_deterministic_algorithms(True)` (not warn-only): every operation of the
    sampler, augmentations, network and loss has a deterministic implementation here (an op without one raises)."""
    import os

    from monai.bundle import ConfigWorkflow
    from test_pretrain_bundle import write_volumes

    write_volumes(tmp_path / "data", count=1)
    overrides = {"vox2vec": ["configs/pretrain_vox2vec.yaml"], "pcrl": ["configs/pretrain_pcrl.yaml"]}
    keys = {
        "patch_size": [16, 16, 8],
        "base_channels": 4,
        "num_scales": 3,
        "pairs_per_volume": 2,
        "voxels_per_pair": 32,
    }
    keys |= {"epochs": 1, "epoch_length": 1, "num_workers": 0, "progress": False, "deterministic": True}
    if method == "pcrl":
        keys |= {"volumes_per_batch": 2, "queue_size": 16}
    workflow = ConfigWorkflow(
        [str(ROOT / c) for c in ("configs/pretrain.yaml", *overrides.get(method, []))],
        logging_file=False,
        run_id="pretrain",
        **keys,
        **{"dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out"), "bundle_root": str(tmp_path)},
    )
    workflow.initialize()
    modes = []
    trainer = workflow.parser.get_parsed_content("train#trainer")
    trainer.add_event_handler(
        Events.ITERATION_COMPLETED,
        lambda _: modes.append(
            (torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled())
        ),
    )
    workflow.run()
    workflow.finalize()
    assert modes == [(True, False)]
    assert torch.backends.cudnn.deterministic and not torch.backends.cudnn.benchmark
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # cuBLAS's deterministic workspace, for CUDA


def test_a_tiny_pretraining_brings_infonce_below_chance():
    """60 Adam steps of the real step (sampler, SSLBatch, pretraining network, InfoNCE) on a textured volume, fresh
    pairs every step: the InfoNCE falls clearly, and below log(2M - 1), the loss of embeddings that tell nothing apart.
    (Telling the 4 pairs apart is enough for that; that voxels1 and voxels2 meet the same voxel is test_sampler's.)"""
    from scripts.networks.fpn3d import dhr_network
    from scripts.ssl.sampler import VoxelPairSamplerd

    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    shape = (32, 32, 16)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.8
    volume = {"image": np.where(body, rng.random(shape), 0).astype(np.float32)[None], "body": body[None]}
    sampler = VoxelPairSamplerd((16, 16, 8), num_pairs=4, voxels_per_pair=16)
    batches = [{k: v[None] for k, v in sampler(volume, rng=rng).items()} for _ in range(60)]
    network = dhr_network(4, 3, projection_width=16, embedding_dim=16, restoration=False)
    loss = HybridLoss(restoration_weight=0)
    trainer = SupervisedTrainer(
        device=torch.device("cpu"),
        max_epochs=1,
        train_data_loader=batches,
        network=network,
        optimizer=torch.optim.Adam(network.parameters(), lr=0.003),
        loss_function=loss,
        prepare_batch=SSLBatch(),  # no augmentation: the views differ by their boxes alone
        decollate=False,
    )
    infonce = []
    trainer.add_event_handler(Events.ITERATION_COMPLETED, lambda _: infonce.append(float(loss.terms["infonce"])))
    trainer.run()
    chance = sum(math.log(2 * int(b["valid"].sum()) - 1) for b in batches[-5:]) / 5
    first, last = sum(infonce[:5]) / 5, sum(infonce[-5:]) / 5
    assert last < first - 0.5 and last < chance - 0.25, (first, last, chance)


def test_loss_only_reads_a_decollated_or_a_plain_output():
    assert loss_only([{"loss": torch.tensor(1.5)}]) == loss_only({"loss": torch.tensor(1.5)}) == {"loss": 1.5}
