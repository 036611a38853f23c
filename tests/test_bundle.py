"""The bundle as a whole: metadata, the README's documented keys, pinned requirements."""

import json
import re
from pathlib import Path

import jsonschema
import pytest
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT.parent / "shared" / "schema" / "meta_schema_20240725.json"
PRETRAIN_KEYS = [
    "dataset_dir", "modality", "patch_size", "pairs_per_volume", "voxels_per_pair", "base_channels", "num_scales",
    "epochs", "epoch_length", "learning_rate", "output_dir", "amp",
]  # fmt: skip


@pytest.mark.skipif(not SCHEMA.is_file(), reason=f"MONAI metadata schema not found at {SCHEMA}")
def test_metadata_validates_against_the_monai_schema_offline():
    schema = json.loads(SCHEMA.read_text())
    jsonschema.validate(json.loads((ROOT / "configs/metadata.json").read_text()), schema)


def test_top_level_metadata_is_an_identical_copy():
    assert (ROOT / "metadata.json").read_bytes() == (ROOT / "configs/metadata.json").read_bytes()


def test_pretrain_config_has_the_documented_command_line_keys():
    parser = ConfigParser()
    parser.read_config(ROOT / "configs/pretrain.yaml")
    readme = (ROOT / "README.md").read_text()
    for key in PRETRAIN_KEYS:
        assert key in parser, f"configs/pretrain.yaml lacks top-level key {key}"
        assert re.search(rf"`{key}`", readme), f"README.md does not document --{key}"
    assert "pretrain" in parser, "run id `pretrain` is missing"


def test_requirements_pin_the_cpu_torch_and_monai_1_6():
    requirements = (ROOT / "requirements.txt").read_text().split()
    assert "torch==2.13.0" in requirements
    assert any(re.fullmatch(r"monai==1\.6\.\d+", r) for r in requirements)


def test_readme_test_line_is_what_ci_runs():
    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci/run").read_text()
    test_line = re.search(r"^pip install -r requirements-dev\.txt && python -m pytest.*$", readme, re.M)
    assert test_line and test_line.group(0) in ci
