"""The Model Zoo's unit-test style: every workflow built by MONAI's `ConfigWorkflow` with the bundle's logging and
metadata files and the bundle root on `sys.path`, its properties checked (`check_properties() == []`), then run on
synthetic NIfTI volumes: train, train + evaluate, inference, pretrain. Also the Zoo user's habit of running the default
run id `run` from the command line (slow tier). The bundle root is each test's folder, where the configs' default
outputs then go, instead of the repository."""

import json
import logging
import sys
from pathlib import Path

import pytest
import torch
from bundle import ROOT, monai_bundle_run
from monai.bundle import ConfigWorkflow, create_workflow
from test_train_bundle import TRAIN  # the tiny fine-tuning keys

CONFIGS = ROOT / "configs"
PRETRAIN = {
    "patch_size": [16, 16, 8],
    "base_channels": 4,
    "num_scales": 3,
    "pairs_per_volume": 2,
    "voxels_per_pair": 32,
    "epochs": 1,
    "epoch_length": 2,
    "num_workers": 0,
    "progress": False,
}


def zoo_workflow(config: str | list[str], workflow_type: str, bundle_root: Path, **override) -> ConfigWorkflow:
    """What the Zoo's tests build: a workflow with the bundle's logging and metadata files, initialised; its
    `bundle_root` a temporary folder (the Zoo gives the bundle's folder, where the default outputs would go)."""
    if str(ROOT) not in sys.path:  # the Zoo puts the bundle root on the path so that `scripts` imports
        sys.path.insert(0, str(ROOT))
    files = [str(CONFIGS / c) for c in ([config] if isinstance(config, str) else config)]
    return create_workflow(
        config_file=files,
        workflow_type=workflow_type,
        logging_file=str(CONFIGS / "logging.conf"),
        meta_file=str(CONFIGS / "metadata.json"),
        bundle_root=str(bundle_root),
        **override,
    )


def check_and_run(workflow: ConfigWorkflow) -> None:
    """The Zoo's `check_workflow(workflow, check_properties=True)`: no missing or misnamed property, then a run."""
    assert workflow.check_properties() == []
    workflow.run()
    workflow.finalize()


@pytest.fixture(autouse=True)
def restore_logging():
    """`logging.conf` binds a handler to this test's captured stdout; later tests must not write to it."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """Synthetic MSD folder (5 cases) and a model trained on it by train.yaml's `run`."""
    from test_train_bundle import write_cases

    tmp = tmp_path_factory.mktemp("zoo")
    write_cases(tmp / "data")
    keys = {**TRAIN, "dataset_dir": str(tmp / "data"), "output_dir": str(tmp / "out")}
    root = logging.getLogger()
    handlers = root.handlers[:]
    check_and_run(zoo_workflow("train.yaml", "train", tmp, **keys))
    root.handlers[:] = handlers
    assert (tmp / "out/model.pt").is_file()
    return tmp, keys


def test_train_then_evaluate_as_the_zoo_runs_it(trained):
    tmp, keys = trained
    model = (tmp / "out/model.pt").read_bytes()
    # train.yaml + evaluate.yaml under the default run id `run` evaluates, and trains nothing
    check_and_run(zoo_workflow(["train.yaml", "evaluate.yaml"], "train", tmp, **keys))
    summary = json.loads((tmp / "out/evaluation/summary.json").read_text())
    assert summary["num_cases"] == 1 and set(summary["dice_per_class"]) == {"1", "2"}
    assert (tmp / "out/model.pt").read_bytes() == model


def test_inference_as_the_zoo_runs_it(trained):
    tmp, _ = trained
    keys = {k: TRAIN[k] for k in ("patch_size", "base_channels", "num_scales", "num_classes", "num_workers")}
    workflow = zoo_workflow(
        "inference.json",
        "infer",
        tmp,
        **keys,
        dataset_dir=str(tmp / "data/imagesTr"),
        output_dir=str(tmp / "masks"),
        model_file=str(tmp / "out/model.pt"),
    )
    check_and_run(workflow)
    assert len(list((tmp / "masks").glob("*_seg.nii.gz"))) == 5


def test_pretrain_under_the_default_run_id(tmp_path):
    from test_pretrain_bundle import write_volumes

    write_volumes(tmp_path / "data")
    keys = {**PRETRAIN, "dataset_dir": str(tmp_path / "data"), "output_dir": str(tmp_path / "out")}
    workflow = zoo_workflow("pretrain.yaml", "train", tmp_path, **keys, cache_dir=str(tmp_path / "cache"))
    check_and_run(workflow)
    backbone = torch.load(workflow.parser.get_parsed_content("backbone_file"), weights_only=True)
    assert "first_conv.weight" in backbone


@pytest.mark.slow
def test_command_line_run_id_run_evaluates_train_plus_evaluate(trained, tmp_path):
    """The command line's smoke test of evaluation, under the default run id."""
    tmp, keys = trained
    args = {k: json.dumps(v) for k, v in keys.items() if k not in ("dataset_dir", "output_dir")}
    paths = {"dataset_dir": tmp / "data", "output_dir": tmp / "cli", "model_file": tmp / "out/model.pt"}
    paths |= {"bundle_root": tmp_path}
    result = monai_bundle_run(None, "['configs/train.yaml','configs/evaluate.yaml']", {**args, **paths})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Evaluating" in result.stdout and "Training on" not in result.stdout
    assert (tmp / "cli/evaluation/summary.json").is_file()
