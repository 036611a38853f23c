"""End to end: pretraining on tiny synthetic volumes, on CPU: the session's shared run (tests/conftest.py, in this
process, as `python -m monai.bundle run pretrain` runs it) and, in the slow tier, the command line itself."""

import json
import re
import subprocess
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import monai_bundle_run, run_workflow
from monai.bundle import ConfigParser
from scripts.networks.fpn3d import FPN3d

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "patch_size": "[16,16,8]",
    "base_channels": "4",
    "num_scales": "3",
    "pairs_per_volume": "2",
    "voxels_per_pair": "32",
    "epoch_length": "3",
    "num_workers": "0",
    "progress": "False",
}


def write_volumes(folder: Path, count: int = 2) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (30, 28, 14)], indexing="ij"))
    for i in range(count):
        body = (grid**2).sum(0) < 0.7
        image = np.where(body, 600 + 100 * rng.random(body.shape), 0).astype(np.float32)
        nib.save(nib.Nifti1Image(image, np.diag([1.5, 1.5, 1.5, 1.0])), folder / f"case_{i}.nii.gz")


def run_pretrain(
    tmp: Path, *extra: str, epochs: int = 2, config: str = "configs/pretrain.yaml"
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run pretrain`` with the tiny keys and this folder's data, outputs, cache and root."""
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "out", "cache_dir": tmp / "cache", "bundle_root": tmp}
    return monai_bundle_run("pretrain", config, {**TINY, **paths, "epochs": epochs}, *extra)


def test_writes_full_state_checkpoint_and_backbone(pretrained):
    tmp = pretrained.folder
    checkpoint = torch.load(tmp / "out/checkpoints/checkpoint_iteration=6.pt", weights_only=False)
    assert {"network", "optimizer", "trainer"} <= checkpoint.keys()
    assert checkpoint["trainer"]["iteration"] == 6
    assert any(k.startswith("projection.projections.") for k in checkpoint["network"])
    backbone = FPN3d(1, 4, 3)
    backbone.load_state_dict(torch.load(tmp / "out/pretrained_backbone.pt", weights_only=True), strict=True)


def test_mlflow_records_each_loss_term_in_sqlite(pretrained):
    from mlflow.tracking import MlflowClient

    tmp = pretrained.folder
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'out/mlruns.db'}")
    runs = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert runs, "no MLflow run recorded"
    metrics = runs[0].data.metrics
    assert {"infonce", "restoration", "train_loss"} <= metrics.keys()
    assert len(client.get_metric_history(runs[0].info.run_id, "infonce")) == 2, "one value per epoch"


def test_mlflow_logs_every_top_level_key_the_executed_config_and_a_run_name(pretrained, tmp_path):
    from mlflow.tracking import MlflowClient

    tmp = pretrained.folder
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp / 'out/mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert run.info.run_name == "dhr"
    params = run.data.params
    assert set(ConfigParser.load_config_file(ROOT / "configs/pretrain.yaml")) <= params.keys()
    assert params["base_channels"] == "4" and params["output_dir"] == str(tmp / "out")
    assert params["patch_size"] == "[16, 16, 8]" and params["projection_width"] == "32"
    artifacts = [a.path for a in client.list_artifacts(run.info.run_id)]
    (config_file,) = [a for a in artifacts if a.startswith("config_") and a.endswith(".json")]
    executed = json.loads(Path(client.download_artifacts(run.info.run_id, config_file, str(tmp_path))).read_text())
    assert executed["output_dir"] == str(tmp / "out") and executed["epochs"] == 2
    assert (tmp / "out/mlruns").is_dir() and not (ROOT / "mlruns").exists(), "artifacts next to the database"


def test_resumes_at_the_saved_iteration(pretrained, tmp_path):
    keys = pretrained.copy(tmp_path)
    log = run_workflow("pretrain", "configs/pretrain.yaml", **{**keys, "epochs": 3}).log
    assert re.search(r"Resuming from .*checkpoint_iteration=6\.pt", log), log[-3000:]
    assert re.search(r"Epoch\[3\] Metrics", log) and not re.search(r"Epoch\[1\] Metrics", log)
    checkpoint = torch.load(tmp_path / "out/checkpoints/checkpoint_iteration=9.pt", weights_only=False)
    assert checkpoint["trainer"]["iteration"] == 9


@pytest.mark.slow
def test_command_line_pretrains_resumes_and_tracks_next_to_the_run(tmp_path):
    """The command line's smoke test: `python -m monai.bundle run pretrain` tracked in MLflow, then resumed."""
    write_volumes(tmp_path / "data")
    result = run_pretrain(tmp_path, "--tracking", "mlflow", epochs=1)
    assert result.returncode == 0, result.stderr[-4000:]
    assert (tmp_path / "out/mlruns.db").is_file() and (tmp_path / "out/mlruns").is_dir()
    assert (tmp_path / "out/pretrained_backbone.pt").is_file() and (tmp_path / "out/pretrained_backbone.json").is_file()
    result = run_pretrain(tmp_path, epochs=2)
    assert result.returncode == 0, result.stderr[-4000:]
    assert re.search(r"Resuming from .*checkpoint_iteration=3\.pt", result.stdout + result.stderr)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "data", "out"], "nothing beside the run's folders"
