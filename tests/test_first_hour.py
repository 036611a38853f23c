"""A user's first hour (issue 20, round 2): commands that name what they need, README commands that leave tracked
files alone, files git ignores, release versions that never go back, and --help before the heavy imports."""

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from scripts.tools import release
from scripts.utils.errors import BundleError

ROOT = Path(__file__).resolve().parents[1]
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
    result = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300)
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
