"""Multi-process training on CPU (gloo): 2 ranks under torchrun, tiny settings; and the gathered InfoNCE and validation
between 2 spawned processes. All in the slow tier: each process starts its own interpreter and torch (~30 s a test)."""

import json
import os
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from bundle import monai_bundle_run
from info_nce_worker import gathered_info_nce
from monai.metrics import DiceMetric
from scripts.networks.fpn3d import FPN3d
from scripts.ssl.losses import info_nce
from test_pretrain_bundle import TINY, write_volumes
from test_train_bundle import TINY as TRAIN_TINY
from test_train_bundle import write_cases
from validation_worker import gathered_mean_dice

pytestmark = pytest.mark.slow
PROBE = "tests/configs/rank_probe.yaml"
MULTI = "configs/multi_gpu_pretrain.yaml"


def pretrain(tmp: Path, *configs: str, epochs: int, **keys: str):
    config = str(["configs/pretrain.yaml", *configs, MULTI, PROBE])
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "out", "cache_dir": tmp / "cache", "bundle_root": tmp}
    result = monai_bundle_run("pretrain", config, {**TINY, **paths, "epochs": epochs, **keys}, nproc=2)
    return result, [torch.load(tmp / f"out/probe/rank{r}.pt", weights_only=True) for r in range(2)]


def assert_same(first: dict, second: dict) -> None:
    assert first.keys() == second.keys()
    for key in first:
        torch.testing.assert_close(first[key], second[key], rtol=0, atol=0, msg=key)


@pytest.fixture(scope="module")
def dhr(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("ddp")
    write_volumes(tmp / "data", count=3)
    result, ranks = pretrain(tmp, epochs=2)
    assert result.returncode == 0, result.stderr[-4000:]
    return tmp, ranks


def test_dhr_ranks_draw_their_own_data_and_end_with_the_same_weights(dhr):
    tmp, ranks = dhr
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 6
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"]), "the ranks drew the same patches"
    assert_same(ranks[0]["parameters"], ranks[1]["parameters"])
    # rank 0 alone writes: the single-process set of files, each once, nothing half-written
    checkpoints = sorted(p.name for p in (tmp / "out/checkpoints").iterdir())
    assert checkpoints[-1] == "checkpoint_iteration=6.pt" and all(name.endswith(".pt") for name in checkpoints)
    exports = sorted(p.name for p in (tmp / "out").glob("pretrained_backbone*"))
    assert exports == ["pretrained_backbone.json", "pretrained_backbone.pt"]
    exported = torch.load(tmp / "out/pretrained_backbone.pt", weights_only=True)
    FPN3d(1, 4, 3).load_state_dict(exported)  # no DDP "module." prefix
    rank0 = {**ranks[0]["parameters"], **ranks[0]["buffers"]}
    assert_same(exported, {k.removeprefix("backbone."): v for k, v in rank0.items() if k.startswith("backbone.")})


def test_a_resumed_two_process_run_continues_from_the_saved_iteration(dhr):
    tmp, _ = dhr
    result, ranks = pretrain(tmp, epochs=3)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "checkpoint_iteration=6.pt" in result.stdout
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 9 and len(ranks[0]["batches"]) == 3
    saved = {p.name for p in (tmp / "out/checkpoints").iterdir()}  # the older one stays (as in a 1-process resume)
    assert saved == {"checkpoint_iteration=6.pt", "checkpoint_iteration=9.pt"}


def test_a_resume_on_another_number_of_processes_is_refused_naming_it(dhr):
    tmp, _ = dhr
    assert json.loads((tmp / "out/run.json").read_text())["world_size"] == 2
    before = sorted(p.name for p in (tmp / "out/checkpoints").iterdir())
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "out", "cache_dir": tmp / "cache", "bundle_root": tmp}
    result = monai_bundle_run("pretrain", "configs/pretrain.yaml", {**TINY, **paths, "epochs": 4})  # one process
    assert result.returncode != 0
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("error: ") and "world_size is 2 there and 1 now" in line, line
    assert sorted(p.name for p in (tmp / "out/checkpoints").iterdir()) == before


def test_a_non_finite_loss_on_one_rank_stops_both_with_one_message(dhr):
    tmp, _ = dhr
    keys = {"output_dir": tmp / "nan", "cache_dir": tmp / "cache", "nan_rank": 1, "nan_iteration": 2}
    keys |= {"log_interval": 2, "augmentations": "none", "bundle_root": tmp}
    config = str(["configs/pretrain.yaml", MULTI, PROBE])
    result = monai_bundle_run("pretrain", config, {**TINY, "dataset_dir": tmp / "data", **keys, "epochs": 1}, nproc=2)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if "error: " in line]  # torchrun prefixes "[rank0]: "
    assert len(errors) == 1 and "Non-finite loss at iteration 2 on rank 1" in errors[0], result.stderr[-3000:]
    assert not (tmp / "nan/checkpoints").exists() or not any((tmp / "nan/checkpoints").iterdir())


def test_ranks_wait_for_a_cache_preparation_longer_than_the_collective_timeout(tmp_path):
    write_volumes(tmp_path / "data", count=2)
    keys = {"collective_timeout_s": 5, "rank0_delay_s": 20}  # a collective waiting for the preparation would fail
    result, ranks = pretrain(tmp_path, "tests/configs/slow_rank0.yaml", epochs=1, **keys)
    assert result.returncode == 0, result.stderr[-4000:]
    assert ranks[0]["iteration"] == ranks[1]["iteration"] == 3


def test_pcrl_ranks_share_queue_teacher_and_weights(tmp_path):
    write_volumes(tmp_path / "data", count=2)
    # one volume x 2 pairs per rank and step (PCRL's default is 16 x 1): 2 keys per rank, as counted below
    result, ranks = pretrain(tmp_path, "configs/pretrain_pcrl.yaml", epochs=1, queue_size=16, volumes_per_batch=1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])
    assert_same(ranks[0]["parameters"], ranks[1]["parameters"])
    assert_same(ranks[0]["buffers"], ranks[1]["buffers"])  # queue, pointer, teacher and BatchNorm statistics
    assert int(ranks[0]["buffers"]["queue_ptr"]) == 3 * 2 * 2 % 16, "3 steps x 2 ranks x 2 keys enqueued"
    assert len(list((tmp_path / "out/checkpoints").iterdir())) == 1


def test_a_monai_backbone_pretrains_on_two_ranks(tmp_path):
    """SegResNet's output layer, which DHR does not read, gets no gradient: DDP must not wait for one."""
    write_volumes(tmp_path / "data", count=2)
    args = "{'init_filters':8,'blocks_down':[1,1,1],'blocks_up':[1,1]}"
    result, ranks = pretrain(tmp_path, epochs=1, backbone="segresnet", backbone_args=args)
    assert result.returncode == 0, result.stderr[-4000:]
    assert_same(ranks[0]["parameters"], ranks[1]["parameters"])
    assert (tmp_path / "out/pretrained_backbone.pt").is_file()


def test_fine_tuning_on_two_ranks(tmp_path):
    write_cases(tmp_path / "data")
    # the warm-up applies to a loaded backbone
    backbone = FPN3d(1, int(TRAIN_TINY["base_channels"]), int(TRAIN_TINY["num_scales"]))
    torch.save(backbone.state_dict(), tmp_path / "backbone.pt")
    keys = {**TRAIN_TINY, "dataset_dir": tmp_path / "data", "output_dir": tmp_path / "out", "bundle_root": tmp_path}
    keys.update(warmup_epochs=1, num_val_cases=1, pretrained_ckpt=tmp_path / "backbone.pt")
    config = "['configs/train.yaml','configs/multi_gpu_train.yaml','tests/configs/rank_probe.yaml']"
    result = monai_bundle_run(None, config, keys, nproc=2)
    assert result.returncode == 0, result.stderr[-4000:]
    ranks = [torch.load(tmp_path / f"out/probe/rank{r}.pt", weights_only=True) for r in range(2)]
    assert not set(ranks[0]["batches"]) & set(ranks[1]["batches"])
    assert_same(ranks[0]["parameters"], ranks[1]["parameters"])
    assert sorted(p.name for p in (tmp_path / "out").glob("model.*")) == ["model.json", "model.pt"]
    assert result.stdout.count("epoch 2: backbone unfrozen") == 2  # both ranks, warm-up over DDP
    assert [r["find_unused_parameters"] for r in ranks] == [False, False]
    loaded = {f"backbone.{k}": v for k, v in backbone.named_parameters()}
    assert all(not torch.equal(ranks[0]["parameters"][k], v) for k, v in loaded.items()), "the backbone trained"


def test_gathered_info_nce_and_gradients_equal_one_process_on_all_embeddings(tmp_path):
    torch.manual_seed(0)
    z1 = torch.nn.functional.normalize(torch.randn(10, 8), dim=1)
    z2 = torch.nn.functional.normalize(z1 + 0.3 * torch.randn(10, 8), dim=1)
    valid = torch.tensor([1, 1, 0, 1, 1, 1, 1, 1, 0, 1], dtype=torch.bool)
    port = 20000 + os.getpid() % 20000
    mp.spawn(gathered_info_nce, args=(port, z1, z2, valid, str(tmp_path)), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in range(2)]
    a, b = z1.clone().requires_grad_(), z2.clone().requires_grad_()
    expected = info_nce(a, b, 0.1, valid)
    expected.backward()
    torch.testing.assert_close((ranks[0]["loss"] + ranks[1]["loss"]) / 2, expected.detach())
    torch.testing.assert_close(torch.cat([r["grad1"] for r in ranks]), a.grad)
    torch.testing.assert_close(torch.cat([r["grad2"] for r in ranks]), b.grad)
    torch.testing.assert_close(info_nce(z1[valid], z2[valid], 0.1), expected.detach())  # masking = removing


def test_validation_on_two_ranks_counts_each_case_once(tmp_path):
    label = torch.zeros(2, 4, 4, 2)
    label[:, :2] = 1
    predictions = (label, torch.zeros_like(label), torch.ones_like(label))  # Dice 1, 0 and 2/3 in both classes
    cases = [{"pred": prediction, "label": label} for prediction in predictions]

    def mean_dice(cases: list[dict]) -> float:
        return DiceMetric()([c["pred"] for c in cases], [c["label"] for c in cases]).nanmean(1).mean().item()

    assert mean_dice(cases) == pytest.approx(5 / 9) and mean_dice([*cases, cases[0]]) == pytest.approx(2 / 3)
    # three cases: 2 + 1 per rank; one case: rank 1 has none of its own
    port = 20000 + os.getpid() % 20000
    mp.spawn(gathered_mean_dice, args=(port, [cases, cases[:1]], str(tmp_path)), nprocs=2)
    for rank in range(2):
        gathered = torch.load(tmp_path / f"rank{rank}.pt", weights_only=True)
        assert gathered == pytest.approx([mean_dice(cases), mean_dice(cases[:1])]), f"rank {rank}"
