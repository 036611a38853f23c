"""The bundle as a whole: metadata, the README's documented keys, pinned requirements."""

import json
import re
import shlex
from pathlib import Path

import jsonschema
from monai.bundle import ConfigParser

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = ROOT / "tests" / "schema" / "meta_schema_20240725.json"
PRETRAIN_KEYS = [
    "dataset_dir", "modality", "patch_size", "pairs_per_volume", "voxels_per_pair", "base_channels", "num_scales",
    "epochs", "epoch_length", "learning_rate", "output_dir", "amp",
]  # fmt: skip


def test_metadata_validates_against_the_monai_schema_offline():
    schema = json.loads(SCHEMA.read_text())  # shipped in the repository: the test runs in a fresh clone
    assert SCHEMA.name == json.loads((ROOT / "configs/metadata.json").read_text())["schema"].rsplit("/", 1)[1]
    jsonschema.validate(json.loads((ROOT / "configs/metadata.json").read_text()), schema)


def test_readme_verify_metadata_command_works_offline(monkeypatch):
    """The README's command, run in this process as `python -m monai.bundle verify_metadata` runs it (the README
    walk-through runs the command itself); it raises on a metadata error or a schema it would have to download."""
    from monai.bundle import verify_metadata

    readme = (ROOT / "README.md").read_text()
    command = re.search(r"^python -m monai\.bundle verify_metadata (.*)$", readme, re.M)
    assert command, "README.md shows no verify_metadata command"
    argv = shlex.split(command.group(1))
    assert len(argv) % 2 == 0 and all(a.startswith("--") for a in argv[::2]), argv
    # the schema file exists, so MONAI checks its hash instead of downloading it; no network is needed
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:9")
    monkeypatch.setenv("HTTP_PROXY", "http://127.0.0.1:9")
    monkeypatch.chdir(ROOT)
    verify_metadata(**{key.removeprefix("--"): value for key, value in zip(argv[::2], argv[1::2])})


def test_metadata_declares_every_runtime_requirement():
    """The Zoo's CI installs `required_packages_version` (on Python 3.10), not requirements.txt: none may be missing."""
    metadata = json.loads((ROOT / "configs/metadata.json").read_text())
    pinned = dict(line.split("==") for line in (ROOT / "requirements.txt").read_text().split())
    declared = {"torch", "monai", *metadata["required_packages_version"]}
    assert set(pinned) - declared == {"jsonschema"}  # for the tests only


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


def test_readme_test_lines_are_what_ci_runs():
    """Both tiers: the README's fast line (with the installation) and its slow line, each a line of .ci/run."""
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## Tests\n", 1)[1].split("\n## ", 1)[0]
    lines = re.findall(r"^.*python -m pytest.*$", section.split("```bash\n", 1)[1].split("```", 1)[0], re.M)
    assert lines[0] == "pip install -r requirements-dev.txt && python -m pytest -q"
    assert lines[1:] == ["python -m pytest -q -m slow -n 0"]
    ci = (ROOT / ".ci/run").read_text().splitlines()
    assert lines[0] in ci and any(line.startswith(lines[1]) for line in ci), "CI runs both tiers"


def test_eval_metrics_are_the_model_cards_demo_comparison():
    """The metadata's numbers are those of the DHR row of the demo comparison in docs/README.md (4 scans)."""
    metrics = json.loads((ROOT / "configs/metadata.json").read_text())["eval_metrics"]
    row = re.search(r"^\| DHR \| \w+ \| (.*) \|$", (ROOT / "docs/README.md").read_text(), re.M)
    linear_1, linear_4, finetune_1, finetune_4 = (float(v) for v in row.group(1).split(" | "))
    assert metrics == {
        "demo_test_mean_dice_finetuned_4_scans": finetune_4,
        "demo_test_mean_dice_linear_4_scans": linear_4,
    }
