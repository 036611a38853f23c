"""scripts.tools.release end to end, offline: tiny-trained weights -> submission folder and release zip -> served over
127.0.0.1 -> downloaded and loaded through MONAI's Zoo API in a fresh process from another folder -> the Zoo's checks.

The Model Zoo's own CI script (`ci/verify_bundle.py`) runs when a copy of the model-zoo repository is found at
$MODEL_ZOO_DIR (default /work/model-zoo); CI has none, and there the MONAI checks it is made of run instead. The same
holds for the Zoo's unit-test runner, which runs the release's unit test. The Zoo's pre-commit hooks are applied as
pure-Python equivalents (the hooks of its .pre-commit-config.yaml that look at file contents)."""

import functools
import hashlib
import io
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import textwrap
import threading
import tokenize
import zipfile
from http.server import SimpleHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml
from bundle import ROOT, WORKFLOW_LIMIT, run_command

NAME = "dhr_ct_mri_pretraining"
VERSION = json.loads((ROOT / "configs/metadata.json").read_text())["version"]  # a lower one is refused
MODEL_ZOO = Path(os.environ.get("MODEL_ZOO_DIR", "/work/model-zoo"))
SCHEMA = ROOT / "tests/schema/meta_schema_20240725.json"
# not the configs' defaults (32, 5, 3 classes): the release must record them
ARCHITECTURE = {"base_channels": 4, "num_scales": 3, "num_classes": 2}
TRAIN = {"patch_size": [16, 16, 8], "num_workers": 0, "progress": False, "epochs": 1, "epoch_length": 2}


class QuietHandler(SimpleHTTPRequestHandler):
    def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's signature
        pass


def fresh_python(script: str, cwd: Path) -> subprocess.CompletedProcess:
    """Runs ``script`` in a new interpreter in ``cwd``, without the repository on its path."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", textwrap.dedent(script)]
    return run_command(cmd, timeout=WORKFLOW_LIMIT, cwd=cwd, env=env, what="the Zoo user's script in a fresh process")


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """An HTTP server on 127.0.0.1 serving one folder (the release's upload folder); stopped after the module."""
    folder = tmp_path_factory.mktemp("upload")
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(QuietHandler, directory=str(folder)))
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield folder, f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(timeout=10)


@pytest.fixture(scope="module")
def release(server, pretrained, tmp_path_factory):
    """Fine-tunes a tiny network from the session's shared pretraining (in this process, as the Zoo's tests run
    workflows), then releases both into the served folder."""
    from scripts.tools.release import release as make_release
    from test_train_bundle import write_cases
    from test_zoo_workflows import zoo_workflow

    upload, base_url = server
    tmp = tmp_path_factory.mktemp("release")
    write_cases(tmp / "labelled")
    backbone, model = pretrained.out / "pretrained_backbone.pt", tmp / "model.pt"
    train = {"dataset_dir": str(tmp / "labelled"), "output_dir": str(tmp / "train"), "model_file": str(model)}
    train |= {"pretrained_ckpt": str(backbone), "warmup_epochs": 0, "val_interval": 1, "num_folds": 5}
    handlers = logging.getLogger().handlers[:]
    workflow = zoo_workflow("train.yaml", "train", tmp, **TRAIN, **ARCHITECTURE, **train)
    workflow.run()
    workflow.finalize()
    logging.getLogger().handlers[:] = handlers
    make_release(VERSION, base_url, model, backbone, output_dir=upload)
    return {"upload": upload, "url": base_url, "model": model, "backbone": backbone, "tmp": tmp}


def test_release_holds_what_the_zoo_packages(release):
    upload = release["upload"]
    with zipfile.ZipFile(upload / f"{NAME}_v{VERSION}.zip") as archive:
        names = archive.namelist()
        metadata = json.loads(archive.read(f"{NAME}/configs/metadata.json"))
        inference = json.loads(archive.read(f"{NAME}/configs/inference.json"))
        train = yaml.safe_load(archive.read(f"{NAME}/configs/train.yaml"))
        assert archive.read(f"{NAME}/models/model.pt") == release["model"].read_bytes()
    assert {n.split("/")[1] for n in names} == {"configs", "docs", "scripts", "models", "LICENSE"}
    assert not [n for n in names if "__pycache__" in n or n.endswith("large_files.yml")]
    assert not [n for n in names if n.startswith(f"{NAME}/scripts/tools/")], "the research tools are not shipped"
    assert f"{NAME}/scripts/visualize.py" in names and f"{NAME}/scripts/ssl/sampler.py" in names
    assert {f"{NAME}/models/{f}" for f in ("model.pt", "pretrained_backbone.pt", "model.json")} <= set(names)
    assert metadata["version"] == VERSION and VERSION in metadata["changelog"]
    assert metadata["network_data_format"]["outputs"]["pred"]["num_channels"] == 2
    assert len(metadata["pretrained_backbone_data_format"]["outputs"]) == 3
    # the weights' architecture is the released configs' default, as literals
    for key, value in {**ARCHITECTURE, "head": "linear"}.items():
        assert inference[key] == value and train[key] == value, key

    folder = upload / NAME
    assert sorted(p.name for p in folder.iterdir()) == ["LICENSE", "configs", "docs", "large_files.yml", "models"] + [
        "scripts"
    ]
    assert not list(folder.rglob("*.pt")) and max(p.stat().st_size for p in folder.rglob("*") if p.is_file()) < 2**20
    entries = yaml.safe_load((folder / "large_files.yml").read_text())["large_files"]
    assert [e["path"] for e in entries] == ["models/model.pt", "models/pretrained_backbone.pt"]
    for entry, source in zip(entries, (release["model"], release["backbone"]), strict=True):
        served = upload / entry["url"].rsplit("/", 1)[1]
        assert entry["url"].startswith(release["url"]) and served.read_bytes() == source.read_bytes()
        assert entry["hash_type"] == "sha256" and entry["hash_val"] == hashlib.sha256(served.read_bytes()).hexdigest()


@pytest.mark.slow
def test_download_load_and_check_in_a_fresh_process(release, tmp_path):
    """In a new interpreter in another folder, what a Zoo user runs: download the zip, load the network, the backbone,
    and the backbone into their own network. `scripts` is then the downloaded bundle's: its folder goes on sys.path
    (docs/README.md). Then, from the submission folder's root, what the Zoo's verify_bundle.py is made of: its large
    files download from their URLs with matching hashes; metadata, network shapes, TorchScript export."""
    shutil.copytree(release["upload"] / NAME, tmp_path / "submission" / NAME)
    script = f"""
        import os
        import sys
        import torch
        from monai.bundle import ckpt_export, download, download_large_files, load, verify_metadata, verify_net_in_out

        download(name="{NAME}", url="{release["url"]}/{NAME}_v{VERSION}.zip", bundle_dir="hub")
        sys.path.insert(0, "hub/{NAME}")
        from scripts.networks.fpn3d import FPN3d

        model = torch.load("{release["model"]}", weights_only=True)
        net = load("{NAME}", bundle_dir="hub", workflow_type="inference", device="cpu")
        assert net.state_dict().keys() == model.keys()
        assert all(torch.equal(net.state_dict()[k], v) for k, v in model.items()), "model tensors differ"

        backbone = torch.load("{release["backbone"]}", weights_only=True)
        fpn = load("{NAME}", bundle_dir="hub", model=FPN3d(1, 4, 3), model_file="models/pretrained_backbone.pt",
                   device="cpu")
        assert all(torch.equal(fpn.state_dict()[k], v) for k, v in backbone.items()), "backbone tensors differ"

        own = torch.nn.ModuleDict({{"encoder": FPN3d(1, 4, 3), "classifier": torch.nn.Conv3d(4, 5, 1)}})
        load("{NAME}", bundle_dir="hub", model=own, model_file="models/pretrained_backbone.pt", device="cpu",
             copy_model_args={{"dst_prefix": "encoder."}})
        assert all(torch.equal(own.encoder.state_dict()[k], v) for k, v in backbone.items()), "dst_prefix"
        print("loaded", len(model), "and", len(backbone), "tensors")

        os.chdir("submission/{NAME}")
        download_large_files(bundle_path=".")
        verify_metadata(meta_file="configs/metadata.json", filepath="{SCHEMA}")
        kwargs = dict(meta_file="configs/metadata.json", config_file="configs/inference.json")
        verify_net_in_out(net_id="network_def", **kwargs)
        ckpt_export(net_id="network_def", filepath="models/model.ts", ckpt_file="models/model.pt", **kwargs)
        print("TorchScript output", tuple(torch.jit.load("models/model.ts")(torch.rand(1, 1, 16, 16, 8)).shape))
    """
    result = fresh_python(script, tmp_path)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "loaded" in result.stdout and "TorchScript output (1, 2, 16, 16, 8)" in result.stdout
    assert sorted(p.name for p in (tmp_path / "hub" / NAME).iterdir()) == [
        "LICENSE", "configs", "docs", "models", "scripts"
    ]  # fmt: skip
    submitted = tmp_path / "submission" / NAME / "models"
    assert (submitted / "model.pt").read_bytes() == release["model"].read_bytes()


@pytest.mark.slow
@pytest.mark.skipif(not (MODEL_ZOO / "ci/verify_bundle.py").is_file(), reason=f"no model-zoo copy at {MODEL_ZOO}")
@pytest.mark.parametrize("source, mode", [("zip", "full"), ("submission", "min")])  # full runs min's checks too
def test_model_zoo_verify_bundle(release, tmp_path, source, mode):
    """The Zoo's own ci/verify_bundle.py, run from outside the repository as its CI does after `prepare_schema`."""
    models = tmp_path / "models"
    models.mkdir()
    if source == "zip":
        with zipfile.ZipFile(release["upload"] / f"{NAME}_v{VERSION}.zip") as archive:
            archive.extractall(models)
    else:  # the submission folder: verify_bundle downloads its large files from the served URLs
        shutil.copytree(release["upload"] / NAME, models / NAME)
    (models / "model_info.json").write_text("{}")  # no earlier release of this bundle
    (models / NAME / "eval").mkdir()
    shutil.copy(SCHEMA, models / NAME / "eval/schema.json")
    cmd = [sys.executable, str(MODEL_ZOO / "ci/verify_bundle.py"), "-b", NAME, "-p", str(models), "-m", mode]
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"OMP_NUM_THREADS": "1"}
    result = run_command(cmd, timeout=WORKFLOW_LIMIT, cwd=tmp_path, env=env, what="the Model Zoo's verify_bundle.py")
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert "directory is verified correctly." in result.stdout
    assert "metadata format is verified correctly." in result.stdout
    if mode == "full":
        assert "export weights into TorchScript module successfully." in result.stdout


def pre_commit_problems(root: Path) -> list[str]:
    """What the Zoo's pre-commit hooks (pre-commit-hooks v4.6.0, with the Zoo's arguments) would fix or refuse in the
    files under `root`: end-of-file-fixer, trailing-whitespace, mixed-line-ending, check-docstring-first, check-yaml,
    pretty-format-json (--no-sort-keys --indent=4), check-added-large-files (1024 KB), check-case-conflict,
    check-executables-have-shebangs, detect-private-key."""
    problems, seen = [], {}
    for path in sorted(p for p in root.rglob("*") if p.is_file()):
        name, data = path.relative_to(root).as_posix(), path.read_bytes()
        if name.lower() in seen:
            problems.append(f"{name}: differs only in case from {seen[name.lower()]}")
        seen[name.lower()] = name
        if len(data) > 1024 * 1024:
            problems.append(f"{name}: over 1024 KB")
        if path.stat().st_mode & 0o111 and not data.startswith(b"#!"):
            problems.append(f"{name}: executable without a shebang")
        if any(key in data for key in (b"BEGIN RSA PRIVATE KEY", b"BEGIN OPENSSH PRIVATE KEY", b"BEGIN PRIVATE KEY")):
            problems.append(f"{name}: holds a private key")
        if b"\0" in data or path.suffix in (".pt", ".ts", ".png", ".zip"):
            continue  # binary: the text hooks skip it
        if data and (not data.endswith(b"\n") or data.endswith(b"\n\n")):
            problems.append(f"{name}: does not end with exactly one newline")
        markdown = path.suffix == ".md"
        for number, line in enumerate(data.decode().split("\n"), 1):
            if line != line.rstrip() and not (markdown and line.endswith("  ") and line.strip()):
                problems.append(f"{name}:{number}: trailing whitespace")
        if b"\r" in data:
            problems.append(f"{name}: carriage returns")
        if path.suffix == ".py":
            problems += [f"{name}: {problem}" for problem in docstring_not_first(data)]
        if path.suffix in (".yaml", ".yml"):
            yaml.safe_load(data)  # check-yaml: raises on invalid YAML
        if path.suffix == ".json" and data.decode() != json.dumps(json.loads(data), indent=4) + "\n":
            problems.append(f"{name}: not as pretty-format-json --no-sort-keys --indent=4 writes it")
    return problems


def docstring_not_first(source: bytes) -> list[str]:
    """check-docstring-first: a string at column 0 after code, or a second one, is a misplaced module docstring."""
    docstring = code = None
    for token in tokenize.tokenize(io.BytesIO(source).readline):
        if token.type == tokenize.STRING and token.start[1] == 0:
            if docstring is not None or code is not None:
                return [f"line {token.start[0]}: a module docstring after {'code' if code else 'another'}"]
            docstring = token.start[0]
        elif token.type not in (tokenize.COMMENT, tokenize.ENDMARKER, tokenize.NEWLINE, tokenize.NL, tokenize.ENCODING):
            code = code or token.start[0]
    return []


def test_the_zoo_pre_commit_hooks_pass_on_what_is_submitted(release, tmp_path):
    """The submission folder and the unit test, as they go into the model-zoo repository."""
    upload = release["upload"]
    shutil.copytree(upload / NAME, tmp_path / "models" / NAME)
    shutil.copytree(upload / "ci", tmp_path / "ci")
    assert (tmp_path / f"ci/unit_tests/test_{NAME}.py").is_file()
    assert pre_commit_problems(tmp_path) == []


def test_pre_commit_equivalents_find_what_the_hooks_refuse(tmp_path):
    (tmp_path / "a.py").write_text('import os\n"""late docstring"""\n')
    (tmp_path / "b.json").write_text('{"a": [1, 2]}\n')
    (tmp_path / "c.yaml").write_text("a: 1\n\n")
    (tmp_path / "d.md").write_text("two spaces keep a line break  \nno newline at the end")
    problems = pre_commit_problems(tmp_path)
    assert [p.split(":")[0] for p in problems] == ["a.py", "b.json", "c.yaml", "d.md"], problems


def zoo_unit_test_folder(release, root: Path) -> list[str]:
    """A model-zoo checkout holding only this release (`models/<name>/` from the zip, weights included) and its unit
    test, with the Zoo's `ci/unit_tests/` runner and utils from $MODEL_ZOO_DIR, else a stand-in for `check_workflow`;
    returns the command that runs the test from `root`."""
    with zipfile.ZipFile(release["upload"] / f"{NAME}_v{VERSION}.zip") as archive:
        archive.extractall(root / "models")
    tests = root / "ci/unit_tests"
    shutil.copytree(release["upload"] / "ci/unit_tests", tests)
    if (MODEL_ZOO / "ci/unit_tests/runner.py").is_file():
        for name in ("runner.py", "utils.py"):
            shutil.copy(MODEL_ZOO / "ci/unit_tests" / name, tests / name)
        return [sys.executable, "ci/unit_tests/runner.py", "-b", NAME]
    (tests / "utils.py").write_text(
        textwrap.dedent(
            """
            def check_workflow(workflow, check_properties=False):  # as the Zoo's ci/unit_tests/utils.py
                workflow.initialize()
                if check_properties:
                    assert not workflow.check_properties(), workflow.check_properties()
                workflow.run()
                workflow.finalize()
            """
        )
    )
    return [sys.executable, "-m", "unittest", "-v", f"test_{NAME}"]


@pytest.mark.slow
def test_the_released_unit_test_passes_as_the_zoo_runs_it(release, tmp_path):
    """From the model-zoo root, with that root on PYTHONPATH (as the Zoo's CI sets it) and the test's own folder: a
    process of its own running every workflow (the slow tier)."""
    cmd = zoo_unit_test_folder(release, tmp_path)
    path = os.pathsep.join([str(tmp_path), str(tmp_path / "ci/unit_tests")])
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"} | {"PYTHONPATH": path, "OMP_NUM_THREADS": "1"}
    result = run_command(cmd, timeout=WORKFLOW_LIMIT, cwd=tmp_path, env=env, what="the Zoo's unit test of the release")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-4000:]
    assert "Ran 2 tests" in result.stderr and re.search(r"^OK$", result.stderr, re.M), result.stderr[-2000:]


def test_the_release_examples_name_the_current_version():
    """The README's release command and the model card's download example name configs/metadata.json's version."""
    version = json.loads((ROOT / "configs/metadata.json").read_text())["version"]
    readme = (ROOT / "README.md").read_text()
    assert re.findall(r"python -m scripts\.tools\.release --version (\S+)", readme) == [version]
    assert set(re.findall(rf"{NAME}_v(\d+\.\d+\.\d+)\.zip", readme + (ROOT / "docs/README.md").read_text())) == {
        version
    }


def test_the_model_card_points_only_to_what_the_release_holds():
    """docs/README.md ships alone: every bundle file it names is in the release (no research tools, tests, top-level
    README), and every `scripts.<module>` it names is one the release ships."""
    card = (ROOT / "docs/README.md").read_text()
    for path in re.findall(r"\b((?:configs|docs|scripts|tests|models)/[\w/.-]*\w)", card):
        assert not path.startswith(("scripts/tools", "tests/")), path
        if not path.startswith("models/"):  # weights and their sidecars: written by the release and the workflows
            assert (ROOT / path).exists(), path
    for module in re.findall(r"\bscripts((?:\.\w+)+)", card):
        assert not module.startswith(".tools"), module
    assert not re.search(r"(?<![\w/])README\.md", card.replace("docs/README.md", "")), "the top-level README.md"


def test_a_monai_network_model_is_refused_naming_where_its_weights_go(tmp_path):
    from monai.networks.nets import UNet
    from scripts.engine.weights import save_weights
    from scripts.tools.release import describe_weights
    from scripts.utils.errors import BundleError

    args = {"spatial_dims": 3, "in_channels": 1, "out_channels": 2, "channels": [4, 8], "strides": [2]}
    info = {"kind": "backbone", "in_channels": 1, "backbone": "unet", "backbone_args": args}
    save_weights(UNet(**args).state_dict(), tmp_path / "pretrained_backbone.pt", info)
    with pytest.raises(BundleError, match="weights of MONAI's unet; the release packages FPN3d networks"):
        describe_weights(tmp_path / "pretrained_backbone.pt", "backbone")
