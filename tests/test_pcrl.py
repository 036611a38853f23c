"""PCRL (scripts/ssl/pcrl.py, configs/pretrain_pcrl.yaml): units on tiny tensors, then the bundle run end to end on
CPU, in this process as `python -m monai.bundle run` runs it (the command line itself in the slow tier)."""

import itertools
import math
import re
import subprocess
from pathlib import Path

import pytest
import torch
from bundle import PRETRAIN_TINY, ROOT, monai_bundle_run, run_workflow
from ignite.handlers import Checkpoint
from monai.bundle import ConfigParser
from scripts.engine.handlers import GradientClipping
from scripts.networks.fpn3d import FPN3d
from scripts.networks.pretrained import extract_backbone_state
from scripts.ssl.local_augmentations import LocalAugmentations
from scripts.ssl.pcrl import (
    PCRLBatch,
    PCRLLoss,
    PCRLNetwork,
    PCRLTrainer,
    apply_transforms,
    random_transforms,
    transform_code,
)
from test_pretrain_bundle import TINY, write_volumes

CONFIGS = ["configs/pretrain.yaml", "configs/pretrain_pcrl.yaml"]
PATCH = (16, 16, 8)
MIXUP_TERMS = {"infonce_mixup", "mse_student_mixup", "mse_hybrid_mixup"}
PLAIN_TERMS = {"infonce", "mse_student", "mse_hybrid"}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tensors here are tiny: one thread is faster, and far faster on a busy machine (no OpenMP spin-waits)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_network(queue_size: int = 16, seed: int = 0) -> PCRLNetwork:
    torch.manual_seed(seed)
    return PCRLNetwork(FPN3d(1, 4, 3), queue_size=queue_size, embedding_dim=8)


def voxel_pair_batch(pairs: int = 3, size=PATCH) -> dict[str, torch.Tensor]:
    """A batch as the sampler collates it for one volume: view1, view2 (1, N, 1, X, Y, Z)."""
    return {f"view{v}": torch.rand(1, pairs, 1, *size) for v in (1, 2)}


def decode_code(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Flips (B, 3) and rotations (B,) back from (B, 7) codes."""
    return codes[:, :3].bool(), codes[:, 3:].argmax(dim=1)


def test_encode_decode_equals_forward():
    backbone = FPN3d(1, 4, 3).eval()
    x = torch.rand(2, 1, 9, 10, 7)
    features = backbone.encode(x)
    expected = [(2, 4 * 2**i, *(math.ceil(s / 2**i) for s in (9, 10, 7))) for i in range(3)]
    assert [tuple(f.shape) for f in features] == expected
    kept = list(features)
    pyramid = backbone.decode(features)
    assert all(a is b for a, b in zip(features, kept, strict=True)), "decode must not modify its input list"
    assert pyramid[-1] is features[-1]
    for a, b in zip(pyramid, backbone(x), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.parametrize("size", [(6, 6, 4), (6, 4, 3)])
def test_transforms_match_explicit_flips_and_rotations(size):
    torch.manual_seed(0)
    images = torch.rand(16, 2, *size)
    flips, rotations = random_transforms(16, size)
    if size[0] != size[1]:
        assert set(rotations.tolist()) <= {0, 2}, "odd rotations would change the shape of non-square patches"
    codes = transform_code(flips, rotations)
    assert codes.shape == (16, 7) and codes[:, 3:].sum(1).eq(1).all()
    out = apply_transforms(images, flips, rotations)
    for b in range(16):
        dims = [d + 1 for d in range(3) if codes[b, d] == 1]  # per-sample tensors are (C, X, Y, Z)
        expected = torch.rot90(images[b].flip(dims), int(codes[b, 3:].argmax()), dims=(1, 2))
        torch.testing.assert_close(out[b], expected, rtol=0, atol=0)


def test_odd_rotation_of_non_square_patch_is_refused():
    with pytest.raises(ValueError, match="X != Y"):
        apply_transforms(torch.rand(2, 1, 6, 4, 3), torch.zeros(2, 3, dtype=torch.bool), torch.tensor([0, 1]))


def test_batch_targets_are_transformed_clean_views_and_mixes_share_partners():
    torch.manual_seed(0)
    pairs = 4
    inputs, targets, args, kwargs = PCRLBatch(augment=None, mixup=True)(voxel_pair_batch(pairs))
    assert args == ()
    flips, rotations = decode_code(kwargs["codes"])
    transformed = apply_transforms(inputs, flips, rotations)
    torch.testing.assert_close(targets["student"], transformed[:pairs])
    torch.testing.assert_close(targets["teacher"], transformed[pairs:])
    alpha, mixed_alpha = kwargs["alpha"], kwargs["mixed_alpha"]
    assert 0.5 <= alpha <= 1 and 0.5 <= mixed_alpha <= 1
    torch.testing.assert_close(targets["hybrid"], alpha * transformed[:pairs] + (1 - alpha) * transformed[pairs:])
    # the mixed views are lam * x + (1 - lam) * x[partner], with one partner and one lam for both views
    mixed, found = kwargs["mixed"], []
    for order in itertools.permutations(range(pairs)):
        partner = torch.tensor([*order, *(i + pairs for i in order)])
        difference = inputs - inputs[partner]
        lam = float(((mixed - inputs[partner]) * difference).sum() / difference.square().sum().clamp_min(1e-12))
        if torch.allclose(mixed, lam * inputs + (1 - lam) * inputs[partner], atol=1e-5):
            found.append((order, lam))
    assert len(found) == 1 and found[0][0] != tuple(range(pairs)) and 0.5 <= found[0][1] <= 1, found
    mixed_transformed = apply_transforms(mixed, flips, rotations)  # clean = inputs here, so the targets are these
    torch.testing.assert_close(targets["student_mixup"], mixed_transformed[:pairs])
    torch.testing.assert_close(
        targets["hybrid_mixup"], mixed_alpha * mixed_transformed[:pairs] + (1 - mixed_alpha) * mixed_transformed[pairs:]
    )
    _, targets, _, kwargs = PCRLBatch(augment=None, mixup=False)(voxel_pair_batch(pairs))
    assert set(targets) == {"student", "teacher", "hybrid"} and "mixed" not in kwargs


def test_batch_draws_everything_from_the_sample_index():
    prepare = PCRLBatch(LocalAugmentations(), mixup=True, seed=1)
    data = voxel_pair_batch(pairs=4)

    def prepared(first: int) -> list[torch.Tensor]:
        state = torch.get_rng_state()
        inputs, targets, _, kwargs = prepare({**data, "sample_index": torch.tensor([first])}, torch.device("cpu"))
        assert torch.equal(torch.get_rng_state(), state), "torch's global RNG was used"
        return [inputs, *targets.values(), kwargs["codes"], torch.tensor([kwargs["alpha"], kwargs["mixed_alpha"]])]

    assert all(torch.equal(a, b) for a, b in zip(prepared(2), prepared(2), strict=True))
    assert not torch.equal(prepared(2)[0], prepared(3)[0])


def test_batch_corrupts_inputs_but_not_targets():
    torch.manual_seed(0)
    batch = voxel_pair_batch(2)
    inputs, targets, _, kwargs = PCRLBatch(LocalAugmentations(), mixup=False)(batch)
    clean = torch.cat([batch["view1"][0], batch["view2"][0]])
    assert not torch.equal(inputs, clean)
    flips, rotations = decode_code(kwargs["codes"])
    torch.testing.assert_close(targets["student"], apply_transforms(clean, flips, rotations)[:2], rtol=0, atol=0)


def test_momentum_update_matches_its_formula():
    network = tiny_network()
    with torch.no_grad():
        for p in network.backbone.parameters():
            p.add_(torch.randn_like(p))
        network.backbone.left_blocks[0].layers[0].layers[0].running_mean.fill_(3.0)
    before = {k: v.clone() for k, v in network.teacher.state_dict().items()}
    network.momentum_update()
    student = network.backbone.state_dict()
    parameters = {name for name, _ in network.teacher.named_parameters()}
    for name, value in network.teacher.state_dict().items():
        if name in parameters:
            torch.testing.assert_close(value, 0.999 * before[name] + 0.001 * student[name])
        else:  # BatchNorm buffers are copied
            torch.testing.assert_close(value, student[name], rtol=0, atol=0)
    assert not any(p.requires_grad for p in network.teacher.parameters())


def test_queue_is_fifo_of_unit_vectors_and_wraps_around():
    network = tiny_network(queue_size=5)
    torch.testing.assert_close(network.queue.norm(dim=1), torch.ones(5))
    first = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    second = torch.nn.functional.normalize(torch.randn(3, 8), dim=1)
    network.enqueue(first)
    assert int(network.queue_ptr) == 3
    torch.testing.assert_close(network.queue[:3], first)
    network.enqueue(second)
    assert int(network.queue_ptr) == 1
    torch.testing.assert_close(network.queue[3:], second[:2])
    torch.testing.assert_close(network.queue[0], second[2])
    torch.testing.assert_close(network.queue[1:3], first[1:])
    with pytest.raises(ValueError, match="queue_size"):
        network.enqueue(torch.randn(6, 8))


def test_forward_gradients_and_one_enqueue_of_plain_keys_per_step():
    network = tiny_network().train()
    inputs, targets, _, kwargs = PCRLBatch(mixup=True)(voxel_pair_batch(pairs=3))
    outputs = network(inputs, **kwargs)
    assert outputs["logits"].shape == (3, 1 + 16) and outputs["logits_mixup"].shape == (3, 1 + 16)
    loss_function = PCRLLoss(mixup=True)
    assert all(outputs[name].shape == targets[name].shape for name in loss_function.reconstruction_names)
    loss = loss_function(outputs, targets)
    assert set(loss_function.terms) == set(loss_function.term_names) == PLAIN_TERMS | MIXUP_TERMS
    loss.backward()
    assert all(p.grad is None for p in network.teacher.parameters())
    assert network.attention[0].weight.grad is not None and network.backbone.up_blocks[0][0].weight.grad is not None
    keys = network._keys.clone()
    torch.testing.assert_close(keys.norm(dim=1), torch.ones(3))
    network.step()
    assert int(network.queue_ptr) == 3
    torch.testing.assert_close(network.queue[:3], keys)
    with pytest.raises(RuntimeError, match="forward"):
        network.step()  # no second enqueue for the same step


def test_teacher_reconstruction_is_an_optional_fifth_term_that_trains_the_decoder_only():
    inputs, targets, _, kwargs = PCRLBatch(mixup=True)(voxel_pair_batch(pairs=2))
    assert "teacher" not in tiny_network()(inputs, **kwargs), "off by default: the authors' four reconstructions"
    torch.manual_seed(0)
    network = PCRLNetwork(FPN3d(1, 4, 3), queue_size=16, embedding_dim=8, teacher_reconstruction=True)
    outputs = network(inputs, **kwargs)
    loss_function = PCRLLoss(mixup=True, teacher_reconstruction=True)
    loss_function(outputs, targets)
    assert set(loss_function.terms) == PLAIN_TERMS | MIXUP_TERMS | {"mse_teacher"}
    torch.nn.functional.mse_loss(outputs["teacher"], targets["teacher"]).backward()
    assert network.backbone.up_blocks[0][0].weight.grad is not None, "the shared decoder learns from it"
    assert network.backbone.first_conv.weight.grad is None, "the student encoder does not"


def test_config_batches_many_volumes_with_one_pair_each_and_the_official_terms():
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in CONFIGS])
    assert parser.get_parsed_content("pairs_per_volume") == 1 and parser.get_parsed_content("volumes_per_batch") == 16
    terms = parser.get_parsed_content("loss").term_names
    assert terms == ["infonce", "infonce_mixup", "mse_student", "mse_hybrid", "mse_student_mixup", "mse_hybrid_mixup"]


def make_trainer(network: PCRLNetwork, epochs: int = 1) -> tuple[PCRLTrainer, dict]:
    optimizer = torch.optim.SGD([p for p in network.parameters() if p.requires_grad], lr=1e-3, momentum=0.9)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=4)
    loader = torch.utils.data.DataLoader([{k: v[0] for k, v in voxel_pair_batch(2).items()} for _ in range(2)])
    trainer = PCRLTrainer(
        device=torch.device("cpu"),
        max_epochs=epochs,
        train_data_loader=loader,
        network=network,
        optimizer=optimizer,
        loss_function=PCRLLoss(),
        prepare_batch=PCRLBatch(),
    )
    return trainer, {"network": network, "optimizer": optimizer, "trainer": trainer, "lr_scheduler": scheduler}


def test_trainer_updates_teacher_and_queue_and_checkpoint_round_trip_restores_them(tmp_path):
    network = tiny_network()
    initial = {k: v.clone() for k, v in network.teacher.state_dict().items()}
    trainer, save_dict = make_trainer(network)
    trainer.run()  # 2 iterations of 2 pairs
    assert int(network.queue_ptr) == 4, "one enqueue of the 2 keys per step"
    assert any(not torch.equal(v, initial[k]) for k, v in network.teacher.state_dict().items())
    torch.save({k: v.state_dict() for k, v in save_dict.items()}, tmp_path / "checkpoint.pt")

    fresh = tiny_network(seed=1)
    assert not torch.equal(fresh.queue, network.queue)
    _, to_load = make_trainer(fresh)
    Checkpoint.load_objects(to_load, torch.load(tmp_path / "checkpoint.pt", weights_only=False))
    for name, value in network.state_dict().items():  # teacher, teacher_head, queue, queue_ptr included
        torch.testing.assert_close(fresh.state_dict()[name], value, rtol=0, atol=0, msg=name)
    assert to_load["trainer"].state.iteration == 2


@pytest.mark.parametrize("pcrl", [False, True])
def test_gradient_clipping_follows_grad_clip(pcrl, tmp_path):
    """DHR clips at 1.0; PCRL's grad_clip null removes the handler."""
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in CONFIGS[: 1 + pcrl]])
    parser["output_dir"] = str(tmp_path)  # TensorBoard's handler makes its folder
    parser["bundle_root"] = str(tmp_path)
    handlers = parser.get_parsed_content("train#handlers", instantiate=True)
    assert any(isinstance(h, GradientClipping) for h in handlers) != pcrl


# PCRL's tiny keys: one pair per volume, 3 volumes a batch (more than the 2 volumes: drawn with replacement)
KEYS = {"pairs_per_volume": 1, "volumes_per_batch": 3, "queue_size": 64}


def run_pcrl(tmp: Path, *extra: str, epochs: int, out: str = "out") -> subprocess.CompletedProcess:
    """``python -m monai.bundle run pretrain`` of PCRL with the tiny keys in this folder."""
    args = {**TINY, **{k: str(v) for k, v in KEYS.items()}, "epochs": str(epochs), **paths(tmp, out)}
    return monai_bundle_run("pretrain", str(CONFIGS).replace(" ", ""), args, *extra)


def paths(tmp: Path, out: str = "out") -> dict:
    return {"dataset_dir": tmp / "data", "output_dir": tmp / out, "cache_dir": tmp / "cache", "bundle_root": tmp}


def pcrl(tmp: Path, epochs: int, out: str = "out", tracking: str | None = None, fails: bool = False, **keys):
    """PCRL's tiny pretraining in this process."""
    keys = {**PRETRAIN_TINY, **KEYS, "epochs": epochs, **paths(tmp, out), **keys}
    return run_workflow("pretrain", CONFIGS, tracking=tracking, fails=fails, **keys)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A 3-epoch run tracked in MLflow, then, without its final checkpoint, the same run resumed at iteration 6."""
    tmp = tmp_path_factory.mktemp("pcrl")
    write_volumes(tmp / "data")
    pcrl(tmp, epochs=3, tracking="mlflow")
    checkpoint = torch.load(tmp / "out/checkpoints/checkpoint_iteration=6.pt", weights_only=False)
    (tmp / "out/checkpoints/checkpoint_iteration=9.pt").unlink()  # as if killed before the last step's checkpoint
    resumed = pcrl(tmp, epochs=3)
    return tmp, checkpoint, resumed.log


def test_checkpoint_holds_teacher_queue_and_schedule(runs):
    _, checkpoint, _ = runs
    assert {"network", "optimizer", "trainer", "lr_scheduler"} <= checkpoint.keys()
    assert checkpoint["trainer"]["iteration"] == 6
    state = checkpoint["network"]
    assert any(k.startswith("teacher.") for k in state) and any(k.startswith("teacher_head.") for k in state)
    assert state["queue"].shape == (64, 128) and int(state["queue_ptr"]) == 6 * 3 % 64  # 3 pairs per step
    torch.testing.assert_close(state["queue"].norm(dim=1), torch.ones(64))
    assert checkpoint["lr_scheduler"]["last_epoch"] == 6


def test_mlflow_records_every_loss_term(runs):
    from mlflow.tracking import MlflowClient

    tmp, _, _ = runs
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'out/mlruns.db'}")
    found = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert len(found) == 1, "only the first run is tracked"
    assert PLAIN_TERMS | MIXUP_TERMS | {"train_loss"} <= found[0].data.metrics.keys()
    assert len(client.get_metric_history(found[0].info.run_id, "mse_hybrid_mixup")) == 3, "one value per epoch"


def test_resumes_at_the_saved_iteration_and_exports_the_student(runs):
    tmp, _, log = runs
    assert re.search(r"Resuming from .*checkpoint_iteration=6\.pt", log), log[-3000:]
    assert re.search(r"Epoch\[3\] Metrics", log) and not re.search(r"Epoch\[1\] Metrics", log)
    checkpoint = torch.load(tmp / "out/checkpoints/checkpoint_iteration=9.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 9
    assert int(checkpoint["network"]["queue_ptr"]) == 9 * 3 % 64
    exported = torch.load(tmp / "out/pretrained_backbone.pt", weights_only=True)
    FPN3d(1, 4, 3).load_state_dict(exported, strict=True)
    student = extract_backbone_state(checkpoint)
    assert exported.keys() == student.keys()
    assert all(torch.equal(exported[k], student[k]) for k in student)
    teacher = checkpoint["network"]["teacher.first_conv.weight"]
    assert not torch.equal(exported["first_conv.weight"], teacher), "the student is exported, not the teacher"


def test_a_longer_run_is_refused_naming_epochs(runs):
    tmp, _, _ = runs
    message = pcrl(tmp, epochs=4, fails=True).message
    assert re.search(r"epochs is 3 there and 4 now", message), message


def test_mixup_off_removes_the_mixup_terms(runs):
    tmp, _, _ = runs
    log = pcrl(tmp, epochs=1, out="no_mixup", mixup=False).log  # its own run: mixup defines the run
    logged = set(re.findall(r"(\w+): [-\d.e]+", re.search(r"Epoch\[1\] Metrics -- (.*)", log).group(1)))
    assert logged == PLAIN_TERMS, logged


@pytest.mark.slow
def test_command_line_pretrains_pcrl_and_refuses_a_longer_run(tmp_path):
    """The command line's smoke test of PCRL: a run, then the same run with more epochs, refused as its last line."""
    write_volumes(tmp_path / "data")
    result = run_pcrl(tmp_path, epochs=1)
    assert result.returncode == 0, result.stderr[-4000:]
    FPN3d(1, 4, 3).load_state_dict(torch.load(tmp_path / "out/pretrained_backbone.pt", weights_only=True))
    result = run_pcrl(tmp_path, epochs=2)
    assert result.returncode != 0
    assert "epochs is 1 there and 2 now" in result.stderr.strip().splitlines()[-1], result.stderr[-2000:]
