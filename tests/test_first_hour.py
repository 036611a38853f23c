"""A user's first hour (issue 20, round 2): commands that name what they need, README commands that leave tracked
files alone, files git ignores, release versions that never go back, and --help before the heavy imports."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from bundle import HELP_LIMIT, ROOT, run_command
from scripts.tools import release
from scripts.utils.errors import BundleError

WRITE_FLAGS = ("--output", "--output_dir", "--filepath")  # the options through which a README command writes


def readme_commands() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", (ROOT / "README.md").read_text(), flags=re.S)
    return [shlex.split(line) for block in blocks for line in block.splitlines() if line.strip()]


def tracked_files() -> set[str]:
    return set(subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split())


def test_readme_commands_write_no_tracked_file():
    tracked = tracked_files()
    written = []
    for words in readme_commands():
        if "verify_metadata" in words:
            continue  # its --filepath is the committed schema, read (downloaded only where missing)
        for flag, value in zip(words, words[1:], strict=False):
            if flag in WRITE_FLAGS:
                written.append(value)
        if words[:3] == ["python", "-m", "scripts.import_weights"]:
            written.append(words[4])  # SOURCE DESTINATION
    assert "runs/demo_backbone.png" in written  # the visualize command
    overwritten = [path for path in written if path in tracked or any(t.startswith(f"{path}/") for t in tracked)]
    assert not overwritten


@pytest.mark.parametrize("path", ["backbones/vox2vec.pt", "backbones/pretrain_latest.json", "runs/demo_backbone.png"])
def test_readme_outputs_are_ignored_by_git(path):
    assert subprocess.run(["git", "check-ignore", "-q", path], cwd=ROOT).returncode == 0


def test_release_refuses_a_lower_version(tmp_path):
    current = json.loads((ROOT / "configs/metadata.json").read_text())["version"]
    major, minor, patch = (int(p) for p in current.split("."))
    lower = f"{major}.{minor}.{patch - 1}" if patch else f"{major}.{minor - 1}.0"
    with pytest.raises(BundleError, match=rf"--version {lower} is lower than this bundle's version {current}"):
        release.release(lower, "https://host", tmp_path / "model.pt", output_dir=tmp_path / "release")
    assert not (tmp_path / "release").exists()


def test_release_names_the_command_that_makes_a_missing_model(tmp_path):
    current = json.loads((ROOT / "configs/metadata.json").read_text())["version"]
    with pytest.raises(BundleError, match=r"no such file.*configs/train.yaml.*runs/train/model.pt"):
        release.release(current, "https://host", tmp_path / "models/model.pt", output_dir=tmp_path / "release")


@pytest.mark.parametrize("config", ["pretrain.yaml", "train.yaml", "inference.json"])
def test_every_workflow_sizes_its_workers_the_same_way(config):
    from monai.bundle import ConfigParser

    parser = ConfigParser()
    parser.read_config(ROOT / "configs" / config)
    assert parser["num_workers"] == "$scripts.utils.distributed.cpu_workers()"


def imported_modules(*args: str) -> tuple[subprocess.CompletedProcess, set[str]]:
    """Runs ``python -X importtime *args`` from the bundle root; the modules it imported (importtime's last column)."""
    cmd = [sys.executable, "-X", "importtime", *args]
    result = run_command(cmd, timeout=HELP_LIMIT)
    modules = {line.rsplit("|", 1)[1].strip() for line in result.stderr.splitlines() if line.startswith("import time:")}
    return result, modules


@pytest.mark.parametrize("args", [["--help"], ["--backbone", "x.pt"]], ids=["help", "argument error"])
def test_visualize_answers_before_torch_and_monai_are_imported(args):
    result, modules = imported_modules("-m", "scripts.visualize", *args)
    assert ("usage: python -m scripts.visualize" in result.stdout) == (args == ["--help"])
    assert result.returncode == (0 if args == ["--help"] else 2)
    assert "torch" not in modules and "monai" not in modules and "numpy" not in modules


def test_the_light_preset_names_are_the_presets():
    from scripts.data.preprocessing import PRESETS
    from scripts.utils.cli import PRESET_NAMES

    assert sorted(PRESET_NAMES) == sorted(PRESETS)


MONAI_MAIN = "/venv/lib/python3.11/site-packages/monai/bundle/__main__.py"  # argv[0] of python -m monai.bundle


def tiny_model(path: Path) -> Path:
    """A fine-tuned model of other settings than inference.json's defaults (4 channels, 3 scales, 2 classes)."""
    import torch
    from scripts.engine.weights import save_weights
    from scripts.networks.segmentation import segmentation_network

    info = {"kind": "segmentation", "in_channels": 1, "base_channels": 4, "num_scales": 3, "num_classes": 2}
    info |= {"head": "linear", "modality": "mri", "patch_size": [16, 16, 8]}
    torch.manual_seed(0)
    save_weights(segmentation_network(2, 4, 3).state_dict(), path, info)
    return path


def test_ckpt_export_builds_the_network_from_the_file_it_loads(tmp_path, monkeypatch):
    """ckpt_export keeps --ckpt_file from the config: inference.json's network must still come from its sidecar."""
    import torch
    from monai.bundle import ckpt_export

    ckpt = str(tiny_model(tmp_path / "runs/train/model.pt"))
    args = {"filepath": str(tmp_path / "model.ts"), "ckpt_file": ckpt}
    args |= {"meta_file": "configs/metadata.json", "config_file": "configs/inference.json"}
    args["bundle_root"] = str(tmp_path)  # its default model_file is not the repository's models/model.pt
    argv = [MONAI_MAIN, "ckpt_export", "network_def", *(w for k, v in args.items() for w in (f"--{k}", v))]
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", argv)
    monkeypatch.setattr(sys, "excepthook", sys.excepthook)
    ckpt_export(net_id="network_def", **args)  # models/model.pt's defaults: 192 size mismatches
    assert tuple(torch.jit.load(args["filepath"])(torch.rand(1, 1, 16, 16, 8)).shape) == (1, 2, 16, 16, 8)


def test_ckpt_export_refuses_a_model_file_that_is_not_the_ckpt_file():
    from scripts.utils.cli import weight_file

    export = [MONAI_MAIN, "ckpt_export", "network_def", "--ckpt_file", "runs/train/model.pt"]
    assert weight_file("models/model.pt", export) == "runs/train/model.pt"
    assert weight_file("runs/train/model.pt", [*export, "--model_file", "runs/train/model.pt"]) == "runs/train/model.pt"
    assert weight_file("models/model.pt", [MONAI_MAIN, "ckpt_export", "network_def"]) == "models/model.pt"
    assert weight_file("x.pt", [MONAI_MAIN, "run", "--ckpt_file", "y.pt"]) == "x.pt"  # inference: model_file
    assert weight_file("x.pt", ["pytest", "ckpt_export", "--ckpt_file", "y.pt"]) == "x.pt"  # not MONAI's command
    with pytest.raises(BundleError, match=r"--model_file other.pt is not the file ckpt_export loads \(--ckpt_file run"):
        weight_file("other.pt", [*export, "--model_file", "other.pt"])
    with pytest.raises(BundleError, match=r"--ckpt_file models/model.pt, its default"):
        weight_file("other.pt", [MONAI_MAIN, "ckpt_export", "--model_file", "other.pt"])


def test_a_missing_model_file_names_the_command_that_makes_one(tmp_path):
    from scripts.data.inference_inputs import require_model

    with pytest.raises(BundleError) as error:
        require_model(str(tmp_path / "models/model.pt"))
    message = str(error.value)
    assert f"model_file {tmp_path / 'models/model.pt'} does not exist" in message
    assert "python -m monai.bundle run --config_file configs/train.yaml" in message
    assert "--model_file runs/train/model.pt" in message


COMMANDS = [
    "scripts.data.cache",
    "scripts.import_weights",
    "scripts.tools.study",
    "scripts.tools.compare",
    "scripts.tools.benchmark",
    "scripts.tools.release",
    "scripts.tools.datasets",
]


@pytest.mark.parametrize("module", COMMANDS)
@pytest.mark.parametrize("args", [["--help"], ["--no_such_option"]], ids=["help", "argument error"])
def test_every_command_answers_before_torch_is_imported(module, args):
    result, modules = imported_modules("-m", module, *args)
    if args == ["--help"]:
        assert result.returncode == 0 and f"usage: python -m {module}" in result.stdout, result.stderr[-2000:]
    else:
        assert result.returncode == 2 and f"usage: python -m {module}" in result.stderr  # and what is wrong
    assert "torch" not in modules and "monai" not in modules


def test_the_study_checks_its_arguments_before_torch_is_imported():
    result, modules = imported_modules("-m", "scripts.tools.study", "--budgets", "0")
    assert result.returncode == 2 and "--budgets 0: each budget is a number of labelled scans >= 1" in result.stderr
    assert "torch" not in modules and "monai" not in modules


def test_tracking_leaves_no_config_file_in_the_output_folder(tmp_path):
    from ignite.engine import Engine
    from mlflow import MlflowClient
    from monai.handlers import MLFlowHandler
    from scripts.utils import tracking

    (tmp_path / "config_20260101_120000.json").write_text(json.dumps({"epochs": 2}))  # as MONAI saves it
    uri = f"sqlite:///{tmp_path / 'mlruns.db'}"
    artifacts = f"{tmp_path} + '/config_20260101_120000.json'"
    handler = MLFlowHandler(tracking_uri=uri, run_name="dhr", artifacts=artifacts, iteration_log=False)
    tracking.record_config([handler], tmp_path)
    assert not list(tmp_path.glob("config_*.json"))
    engine = Engine(lambda engine, batch: None)
    handler.attach(engine)
    engine.run([0], max_epochs=1)
    handler.close()
    client = MlflowClient(tracking_uri=uri)
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert [a.path for a in client.list_artifacts(run.info.run_id)] == ["config_20260101_120000.json"]
    assert run.data.params["epochs"] == "2"


def test_a_logged_fine_tuning_prints_plain_lines_without_bars_or_untrue_resume_lines(tmp_path, capfd):
    from test_train_bundle import train, write_cases

    write_cases(tmp_path / "data")
    log = train(tmp_path, progress=True, log_interval=1).log
    err = capfd.readouterr().err  # not a terminal, as when the output goes to a log file
    assert "Loading dataset" not in err and "\r" not in err  # MONAI's caching bars: on a terminal only
    assert "Epoch 2/2, iteration 2/2: loss " in err  # the progress as plain lines
    assert "Engine run resuming from" not in log  # ignite's, for every engine of a run that does not resume


def test_the_cache_command_defaults_are_pretrainings():
    from monai.bundle import ConfigParser
    from scripts.data.cache import build_parser

    parser = ConfigParser()
    parser.read_config(ROOT / "configs/pretrain.yaml")
    defaults = vars(build_parser().parse_args(["x"]))
    assert (defaults["modality"], defaults["patch_size"]) == (parser["modality"], parser["patch_size"])
    assert parser["cache_dir"] == "$@bundle_root + '/" + defaults["cache_dir"] + "'"
