"""Every number is the model's own: a study cell is evaluated with the preprocessing and window it was trained with.

The study trains every cell without validation cases (a budget of n is n scans), so the model file is the final
weights; its sidecar must still say what the model is, or evaluation would fall back to the defaults (MRI, 128 x 128 x
32). Here the backbone is CT with a small patch, and the study arguments name neither.
"""

import json
import os

import pytest
from bundle import ROOT, monai_bundle_run
from scripts.engine.weights import save_weights
from scripts.networks.fpn3d import FPN3d
from scripts.tools import study
from test_train_bundle import TINY, write_cases

PATCH = [16, 16, 8]  # not the default [128, 128, 32]


@pytest.mark.slow
def test_a_ct_study_is_evaluated_with_the_models_own_preprocessing_and_window(tmp_path, monkeypatch):
    write_cases(tmp_path / "data")
    info = {"kind": "backbone", "in_channels": 1, "base_channels": 4, "num_scales": 3, "modality": "ct"}
    save_weights(FPN3d(1, 4, 3).state_dict(), tmp_path / "ct.pt", {**info, "patch_size": PATCH, "method": "dhr"})
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    run_keys = {k: v for k, v in TINY.items() if k not in ("patch_size", "base_channels", "num_scales")}
    run_keys |= {"epochs": "1", "dataset_dir": str(tmp_path / "data"), "bundle_root": str(tmp_path)}
    extra = [item for key, value in run_keys.items() for item in (f"--{key}", value)]
    argv = ["--pretrained", str(tmp_path / "ct.pt"), "--budgets", "1", "--folds", "0", "--modes", "finetune"]
    study.main([*argv, "--output_dir", str(tmp_path / "study"), "--", *extra])

    cells = [next((tmp_path / "study" / init / "finetune").iterdir()) for init in ("scratch", "ct")]
    for cell in cells:
        model = json.loads((cell / "model.json").read_text())
        assert (model["modality"], model["patch_size"], model["selected"]) == ("ct", PATCH, "final"), cell
        summary = json.loads((cell / "evaluation/summary.json").read_text())
        assert summary["preprocessing"] == {"modality": "ct", "patch_size": PATCH}, cell
        assert summary["window"]["roi_size"] == PATCH, cell

    # The study's number is what the model scores when evaluated with its own settings given explicitly.
    pretrained = cells[1]
    keys = {**run_keys, "model_file": pretrained / "model.pt", "output_dir": tmp_path / "again"}
    keys |= {"modality": "ct", "patch_size": "[16,16,8]", "fold": "0"}
    result = monai_bundle_run("evaluate", "['configs/train.yaml','configs/evaluate.yaml']", keys)
    assert result.returncode == 0, result.stderr[-4000:]
    again = json.loads((tmp_path / "again/evaluation/summary.json").read_text())
    study_dice = json.loads((pretrained / "evaluation/summary.json").read_text())["mean_dice"]
    assert again["mean_dice"] == pytest.approx(study_dice, abs=1e-6)
