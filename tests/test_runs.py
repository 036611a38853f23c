"""One run per output folder: key checks, run identity, lock, atomic checkpoints and resume (scripts/engine/runs.py)."""

import json
import os
import random
import sys

import numpy as np
import pytest
import torch
from bundle import ROOT, WORKFLOW_LIMIT, command_env, run_command, run_workflow
from ignite.engine import Engine, Events
from scripts.engine.runs import CheckpointLoader, CheckpointSaver, RunFolder, checkpoints
from test_pretrain_bundle import TINY, run_pretrain, write_volumes
from torch import nn

# Runs the bundle like `python -m monai.bundle`, with a torch.save that dies halfway through writing the checkpoint of
# iteration 6: half the bytes reach the file, then SIGKILL, as a crash, kill or full disk would leave it.
KILL_DURING_SAVE = """
import io, os, runpy, signal, sys, torch
real_save = torch.save
def save(obj, f, *args, **kwargs):
    if "checkpoint_iteration=6.pt" in str(getattr(f, "name", f)):
        buffer = io.BytesIO()
        real_save(obj, buffer, *args, **kwargs)
        file = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        file.write(buffer.getvalue()[: buffer.tell() // 2])
        file.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    return real_save(obj, f, *args, **kwargs)
torch.save = save
sys.argv = ["monai.bundle", *sys.argv[1:]]
runpy.run_module("monai.bundle", run_name="__main__", alter_sys=True)
"""


def names(folder):
    return sorted(p.name for p in checkpoints(folder))


def pretrain(keys: dict, **changes):
    return run_workflow("pretrain", "configs/pretrain.yaml", **{**keys, **changes})


@pytest.fixture
def base(pretrained):
    """The session's finished 2-epoch DHR run (6 iterations), checkpointed every 2 iterations (the newest two kept)."""
    return pretrained.folder


def test_final_iteration_is_checkpointed_with_identity_and_random_states(base):
    assert names(base / "out/checkpoints") == ["checkpoint_iteration=4.pt", "checkpoint_iteration=6.pt"]
    checkpoint = torch.load(base / "out/checkpoints/checkpoint_iteration=6.pt", weights_only=True)
    assert checkpoint["trainer"]["iteration"] == 6
    identity = checkpoint["run"]
    assert identity == json.loads((base / "out/run.json").read_text())
    assert identity["method"] == "dhr" and identity["patch_size"] == [16, 16, 8] and identity["epoch_length"] == 3
    assert "epochs" not in identity and "num_workers" not in identity
    assert {"torch", "numpy", "python"} <= checkpoint["rng"].keys()


def test_backbone_and_sidecar_are_written_with_the_run(base):
    from scripts.engine.weights import read_info

    info = read_info(base / "out/pretrained_backbone.pt")
    assert info == {
        "kind": "backbone",
        "in_channels": 1,
        "base_channels": 4,
        "num_scales": 3,
        "modality": "mri",
        "patch_size": [16, 16, 8],
        "method": "dhr",
    }
    assert not (base / "models").exists()


@pytest.mark.parametrize(
    "key, value, named",
    [
        ("epoch_length", 4, "epoch_length is 3 there and 4 now"),
        ("augmentations", "vox2vec", 'augmentations is "local" there and "vox2vec" now'),
        ("amp", True, "amp is false there and true now"),
        ("gather_negatives", True, "gather_negatives is false there and true now"),
    ],
)
def test_a_run_with_other_keys_is_refused_naming_them(pretrained, tmp_path, key, value, named):
    keys = pretrained.copy(tmp_path)
    before = {p.name: p.stat().st_mtime_ns for p in checkpoints(tmp_path / "out/checkpoints")}
    line = pretrain(keys, epochs=3, **{key: value}, fails=True).message
    assert named in line and "--output_dir" in line and "--resume False" in line, line
    assert {p.name: p.stat().st_mtime_ns for p in checkpoints(tmp_path / "out/checkpoints")} == before


@pytest.mark.parametrize("override", [None, "configs/pretrain_pcrl.yaml"])
def test_the_identity_holds_every_key_that_changes_a_step(override):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in ("configs/pretrain.yaml", *([override] if override else []))])
    identity = parser.get_parsed_content("run_identity")
    assert identity["world_size"] == 1 and identity["device"] == "cpu"  # no process group; this machine's device
    assert {"amp", "gather_negatives", "augmentations", "learning_rate", "seed", "epoch_length"} <= identity.keys()
    assert not {"num_workers", "cache", "activation_checkpointing", "log_interval", "output_dir"} & identity.keys()
    if override:
        assert {"momentum", "queue_size", "pcrl_temperature", "mixup", "teacher_reconstruction"} <= identity.keys()


def test_resume_false_sets_the_old_run_aside(pretrained, tmp_path):
    keys = pretrained.copy(tmp_path) | {"checkpoint_interval": 4}  # one epoch: only its final checkpoint
    fresh = pretrain(keys, resume=False, epochs=1)
    assert "Resuming" not in fresh.log
    assert names(tmp_path / "out/checkpoints") == ["checkpoint_iteration=3.pt"]
    assert names(tmp_path / "out/checkpoints_old") == ["checkpoint_iteration=4.pt", "checkpoint_iteration=6.pt"]
    assert (tmp_path / "out/checkpoints_old/run.json").is_file()
    rerun = pretrain(keys, epochs=1)
    assert f"Run complete: {tmp_path}/out/checkpoints/checkpoint_iteration=3.pt holds all 3 iterations" in rerun.log, (
        rerun.log[-2000:]
    )


@pytest.mark.slow
def test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one(tmp_path):
    """A real SIGKILL halfway through a save: a process of its own, through the command line."""
    write_volumes(tmp_path / "data")
    keys = {**TINY, "dataset_dir": tmp_path / "data", "output_dir": tmp_path / "out", "epochs": 2}
    keys |= {"cache_dir": tmp_path / "cache", "bundle_root": tmp_path}
    cmd = [sys.executable, "-c", KILL_DURING_SAVE, "run", "pretrain", "--config_file", "configs/pretrain.yaml"]
    cmd += [item for key, value in keys.items() for item in (f"--{key}", str(value))]
    killed = run_command(cmd, timeout=WORKFLOW_LIMIT, env=command_env(), what="pretraining killed while it saves")
    assert killed.returncode == -9, killed.stderr[-4000:]
    folder = tmp_path / "out/checkpoints"
    assert names(folder) == ["checkpoint_iteration=3.pt"], os.listdir(folder)
    assert (folder / "checkpoint_iteration=6.pt.partial").is_file(), "the save was not interrupted"
    assert torch.load(folder / "checkpoint_iteration=3.pt", weights_only=True)["trainer"]["iteration"] == 3

    rerun = run_pretrain(tmp_path, epochs=2)  # the killed run's lock is taken over
    assert rerun.returncode == 0, rerun.stderr[-4000:]
    assert "checkpoint_iteration=3.pt (iteration 3 of 6)" in rerun.stdout
    assert names(folder) == ["checkpoint_iteration=3.pt", "checkpoint_iteration=6.pt"]
    assert not list(folder.glob("*.partial"))


def test_checkpoints_restore_random_states_and_fall_back_past_a_corrupt_one(tmp_path):
    def engine_and_objects():
        network = nn.Linear(2, 1)
        optimizer = torch.optim.SGD(network.parameters(), lr=0.1)
        engine = Engine(lambda e, b: optimizer.step())
        return engine, {"network": network, "optimizer": optimizer, "trainer": engine}

    identity = {"method": "dhr", "patch_size": (16, 16, 8)}
    engine, objects = engine_and_objects()
    run = RunFolder(tmp_path, identity)
    run.start()
    CheckpointSaver(run, objects, save_interval=2).attach(engine)
    states = {}
    engine.add_event_handler(Events.ITERATION_COMPLETED, lambda e: states.setdefault(e.state.iteration, torch.rand(3)))
    engine.run(range(3), max_epochs=2)  # 6 iterations: saved at 2, 4 and 6; the newest two kept
    assert names(tmp_path / "checkpoints") == ["checkpoint_iteration=4.pt", "checkpoint_iteration=6.pt"]
    newest = tmp_path / "checkpoints/checkpoint_iteration=6.pt"
    newest.write_bytes(newest.read_bytes()[:100])

    torch.manual_seed(123), np.random.seed(123), random.seed(123)
    resumed = RunFolder(tmp_path, identity)
    with pytest.warns(UserWarning, match="checkpoint_iteration=6.pt cannot be loaded"):
        resumed.start()
    assert resumed.resume_path.name == "checkpoint_iteration=4.pt"
    assert (tmp_path / "checkpoints/checkpoint_iteration=6.pt.corrupt").is_file()
    engine, objects = engine_and_objects()
    CheckpointLoader(resumed, objects).attach(engine)
    draws = []
    engine.add_event_handler(Events.STARTED, lambda e: draws.append(torch.rand(3)))
    engine.run(range(3), max_epochs=3)
    assert engine.state.iteration == 9
    # the states saved at iteration 4 (before that iteration's draw) are restored: the first draw repeats it
    torch.testing.assert_close(draws[0], states[4])
