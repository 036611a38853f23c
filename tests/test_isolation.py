"""Issue 21: the suite passes in a clone that has been used, and on a busy machine.

- A clone whose models/, runs/ and data/ hold what the README's commands leave there (a model with other classes, runs
  of other architectures, a cache and a demo folder) runs a set of representative tests, each kind of default path
  among them, in a pytest of its own: they pass, and leave those folders as they were (slow tier: a pytest of its own;
  in every session, fast tier included, tests/conftest.py reports any file a test writes into the repository).
- Beside a busy loop on every core, the command-line --help tests and a command-line workflow test pass: the limits on
  a command's time catch a hang, not a slow machine.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import bundle
import pytest
import torch
from bundle import ROOT, WORKFLOW_LIMIT, run_command
from scripts.engine.weights import save_weights
from scripts.networks.fpn3d import FPN3d
from scripts.networks.segmentation import segmentation_network
from test_readme_walkthrough import clone

# One test per way a test could reach a default path: a config parsed here (models/model.pt through the inference
# settings, runs/train through train.yaml), MONAI's API from the bundle root, Zoo-style and ConfigWorkflow runs
# (data/cache), the study's demo data (data/demo), the shared pretraining and a run resumed in this process.
REPRESENTATIVE = [
    "tests/test_inference.py::test_network_def_returns_one_tensor_and_is_scriptable",
    "tests/test_inference.py::test_verify_net_in_out_passes_with_the_proposed_metadata",
    "tests/test_weights.py::test_train_yaml_builds_an_authors_vox2vec_shaped_backbone_without_size_keys",
    "tests/test_evaluation.py::test_dice_and_hd95_on_the_original_grid_match_hand_computations",
    "tests/test_zoo_workflows.py::test_pretrain_under_the_default_run_id",
    "tests/test_training.py::test_deterministic_true_trains_every_method_with_deterministic_algorithms_only[dhr]",
    "tests/test_study.py::test_without_dataset_dir_the_cells_are_on_the_demo_data_where_the_runs_find_it",
    "tests/test_pretrain_bundle.py::test_resumes_at_the_saved_iteration",
]
USED = ("models", "runs", "data", "eval", "mlruns")  # where the README's commands write, by default


def test_a_command_past_its_limit_is_killed_with_what_it_started_and_said_to_have_timed_out(tmp_path, monkeypatch):
    """A limit of 100 s scaled by DHR_TEST_TIMEOUT_SCALE=0.02: the command and its child are killed after 2 s, and the
    failure says that it timed out, what it ran and what it printed."""
    monkeypatch.setattr(bundle, "TIMEOUT_SCALE", 0.02)
    script = "import subprocess, sys, time; child = subprocess.Popen(['sleep', '60']); print(child.pid, flush=True)"
    script += "; time.sleep(60)"
    start = time.monotonic()
    with pytest.raises(pytest.fail.Exception) as failure:
        run_command([sys.executable, "-c", script], timeout=100, what="a sleeping script")
    assert time.monotonic() - start < 30
    message = str(failure.value)
    assert message.startswith("timed out: ") and "a sleeping script" in message and "limit 2 s" in message, message
    child = int(message.split("--- stdout (end) ---\n")[1].split()[0])
    deadline = time.monotonic() + 10
    while alive(child) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not alive(child), "the command's child outlived it"


def alive(pid: int) -> bool:
    """Whether the process runs (a killed one not yet reaped is a zombie, state Z)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def plant_readme_outputs(repo: Path) -> None:
    """What a user's clone holds after the README's commands, each unlike what the tests use: a trained model with 5
    classes on another patch size, pretraining and training runs of other architectures (the newest checkpoint
    unreadable), cache entries, a half-prepared demo folder, MLflow's default store and inference masks."""
    torch.manual_seed(0)
    info = {"kind": "segmentation", "in_channels": 1, "base_channels": 8, "num_scales": 4, "num_classes": 5}
    info |= {"head": "linear", "modality": "ct", "patch_size": [32, 32, 16]}
    save_weights(segmentation_network(5, 8, 4).state_dict(), repo / "models/model.pt", info)
    backbone = {"kind": "backbone", "in_channels": 1, "base_channels": 8, "num_scales": 4, "modality": "ct"}
    save_weights(FPN3d(1, 8, 4).state_dict(), repo / "models/pretrained_backbone.pt", backbone | {"method": "dhr"})
    for run in ("pretrain", "pretrain_vox2vec", "train", "linear_eval"):
        folder = repo / "runs" / run
        (folder / "checkpoints").mkdir(parents=True)
        (folder / "run.json").write_text(json.dumps({"method": "dhr", "base_channels": 8, "num_scales": 4}))
        (folder / "run.lock").write_text("4242\n")
        (folder / "checkpoints/checkpoint_iteration=2.pt").write_bytes(b"not a checkpoint")
        torch.save(segmentation_network(7, 8, 4).state_dict(), folder / "model.pt")
    entry = repo / "data/cache/data-mri-0123456789ab/case_0.nii.gz-0123456789ab"
    entry.mkdir(parents=True)
    (entry / "meta.json").write_text("{not json")
    (repo / "data/demo/imagesTr").mkdir(parents=True)
    (repo / "data/demo/dataset.json").write_text("{not json")
    (repo / "mlruns/0").mkdir(parents=True)
    (repo / "mlruns/0/meta.yaml").write_text("junk: [")
    (repo / "eval").mkdir()
    (repo / "eval/demo_00_seg.nii.gz").write_bytes(b"junk")


def state(repo: Path) -> dict[str, tuple[int, int]]:
    return {
        str(p.relative_to(repo)): (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in USED
        for p in (repo / folder).rglob("*")
    }


@pytest.mark.slow
def test_representative_tests_pass_in_a_used_clone_and_leave_its_outputs_alone(tmp_path):
    repo = tmp_path / "clone"
    clone(repo)
    plant_readme_outputs(repo)
    before = state(repo)
    cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "", "-W", "ignore"]
    cmd += ["--basetemp", str(tmp_path / "basetemp"), *REPRESENTATIVE]
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTEST_XDIST_WORKER")}
    result = run_command(cmd, timeout=WORKFLOW_LIMIT, cwd=repo, env=env, what="the representative tests in a clone")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert f"{len(REPRESENTATIVE)} passed" in result.stdout, result.stdout[-3000:]
    after = state(repo)
    assert after == before, sorted(p for p in before.keys() | after.keys() if before.get(p) != after.get(p))


@pytest.mark.slow
def test_command_line_tests_pass_beside_a_busy_loop_on_every_core(tmp_path):
    """The limits are sized for a machine busy with something else: every core spinning beside the tests."""
    loops = [
        subprocess.Popen([sys.executable, "-c", "while True: pass"], stdout=subprocess.DEVNULL)
        for _ in range(os.cpu_count() or 2)
    ]
    try:
        cmd = [sys.executable, "-m", "pytest", "-q", "-n", "0", "-p", "no:cacheprovider", "-m", "slow", "-W", "ignore"]
        cmd += ["--basetemp", str(tmp_path / "basetemp"), "tests/test_study.py::test_help_from_the_command_line"]
        cmd += ["tests/test_pretrain_bundle.py::test_command_line_pretrains_resumes_and_tracks_next_to_the_run"]
        env = {k: v for k, v in os.environ.items() if k != "PYTEST_XDIST_WORKER"}
        result = run_command(cmd, timeout=3 * WORKFLOW_LIMIT, cwd=ROOT, env=env, what="the tests beside busy loops")
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert "6 passed" in result.stdout, result.stdout[-3000:]
