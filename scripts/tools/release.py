"""Packages the bundle for the MONAI Model Zoo: submission folder, release zip, weight files to upload and unit test.

    python -m scripts.tools.release --version 0.5.1 --base_url https://host/path --model runs/train/model.pt \\
        --backbone runs/pretrain/pretrained_backbone.pt

writes into ``--output_dir`` (default ``release/``):

- ``<name>/``: the submission folder, laid out as the Zoo's ``models/<name>/``: ``configs/``, ``docs/``,
  ``scripts/`` (without ``scripts/tools/``), ``LICENSE``, ``models/`` with the weights' JSON descriptions, and
  ``large_files.yml`` (path, url, sha256 of every weight file). No tests, CI, requirements or tool settings.
- ``<name>_v<version>.zip``: what the Zoo publishes and ``monai.bundle.download`` fetches: the same folder with the
  weights inside ``models/`` and no ``large_files.yml``, written deterministically (sorted entries, fixed times).
- ``<name>_v<version>_<file>.pt``: each weight file under the name ``large_files.yml`` gives it below ``--base_url``.
- ``ci/unit_tests/test_<name>.py``: the bundle's unit test for the Zoo's ``ci/unit_tests/`` (from
  ``tests/zoo/test_dhr_ct_mri_pretraining.py``): every workflow on tiny synthetic volumes.

Upload the zip and the weight files to ``--base_url``; submit the folder as the Zoo's ``models/<name>/`` and the unit
test as its ``ci/unit_tests/test_<name>.py``. The released copy's configs carry the weights' architecture
(``base_channels``, ``num_scales``, ``num_classes``, ``head``; ``modality`` and ``patch_size`` when the weight file's
description records them) as literal defaults, and its metadata carries ``--version`` and network formats that fit
the weights, so the Zoo's checks and ``monai.bundle.load`` work with no overrides. The JSON files it writes are as the
Zoo's pre-commit hooks leave them.
"""

from __future__ import annotations

import argparse
import json
import logging
import re
import shutil
import zipfile
from collections.abc import Mapping
from pathlib import Path

# The Zoo's `<data>_<modality>_<task>` form: the data are any CT or MRI volumes, so the method names them.
DEFAULT_NAME = "dhr_ct_mri_pretraining"


def build_parser() -> argparse.ArgumentParser:
    """The command line; built before torch and MONAI are imported (see the imports below)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.release",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--version", required=True, help="release version, major.minor.patch")
    parser.add_argument("--base_url", required=True, help="where the zip and the weight files will be downloadable")
    parser.add_argument("--model", required=True, type=Path, help="segmentation weights (train.yaml's model_file)")
    parser.add_argument("--backbone", type=Path, help="pretrained backbone weights (pretraining's export)")
    parser.add_argument("--name", default=DEFAULT_NAME, help="bundle name: folder, zip and URL prefix")
    parser.add_argument("--output_dir", default="release", type=Path)
    parser.add_argument("--changelog", help="changelog entry for --version, if configs/metadata.json has none")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer before torch and MONAI are imported

import torch  # noqa: E402
import yaml  # noqa: E402
from scripts.engine import weights  # noqa: E402
from scripts.networks.fpn3d import FPN3d  # noqa: E402
from scripts.networks.segmentation import segmentation_network  # noqa: E402
from scripts.utils import errors, log  # noqa: E402
from scripts.utils.errors import BundleError  # noqa: E402

__all__ = [
    "DEFAULT_NAME",
    "describe_weights",
    "set_yaml_keys",
    "network_formats",
    "write_zip",
    "json_text",
    "release",
    "main",
]

logger = logging.getLogger(__name__)

ROOT = Path(__file__).resolve().parents[2]
SHIPPED = ("configs", "docs", "scripts", "LICENSE")  # what a Zoo bundle holds besides models/ and large_files.yml
NOT_SHIPPED = ROOT / "scripts" / "tools"  # the research and release tools: run from a clone, not needed by a Zoo user
MAX_FILE_BYTES = 1024 * 1024  # the Zoo's pre-commit check-added-large-files (--maxkb=1024)
ZIP_TIME = (2022, 5, 30, 0, 0, 0)  # the time stamp the Zoo's compress_bundle gives every file
UNIT_TEST = ROOT / "tests" / "zoo" / f"test_{DEFAULT_NAME}.py"  # the Zoo's ci/unit_tests/test_<name>.py
DEMO_CLASSES = {"0": "CSF", "1": "grey matter", "2": "white matter"}


def describe_weights(path: Path, kind: str) -> dict:
    """The architecture of the weight file ``path`` (``kind`` "segmentation" or "backbone"), checked by loading it.

    Keys come from the file's description (``scripts.engine.weights.read_info``: the JSON sidecar, else FPN3d tensor
    shapes); for a segmentation file without a description, ``num_classes`` and ``head`` are read from the head's
    tensors.
    The network of ``configs/inference.json`` (segmentation) or ``FPN3d`` (backbone) is then built from these keys
    and must load every tensor strictly.

    Raises:
        BundleError: the file is missing or unreadable, or its tensors do not fit the network described.
    """
    if not path.is_file():
        if kind == "segmentation":
            made_by = (
                "a fine-tuning run writes one: python -m monai.bundle run --config_file configs/train.yaml "
                "--pretrained_ckpt runs/pretrain/pretrained_backbone.pt (then --model runs/train/model.pt)"
            )
        else:
            made_by = (
                "pretraining writes one: python -m monai.bundle run pretrain --config_file configs/pretrain.yaml "
                "(then --backbone runs/pretrain/pretrained_backbone.pt)"
            )
        raise BundleError(
            f"--{'model' if kind == 'segmentation' else 'backbone'} {path}: no such file (no weights are in git; "
            f"{made_by})."
        )
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
        info = {**weights.read_info(path), "kind": kind}
    except Exception as err:  # torch raises several types (pickle, zip, RuntimeError) for unreadable files
        raise BundleError(f"{path}: cannot be read as a plain state dict ({err}).") from err
    if info.get("backbone", "fpn3d") != "fpn3d":
        raise BundleError(
            f"{path}: weights of MONAI's {info['backbone']}; the release packages FPN3d networks, which "
            "configs/inference.json builds. Load MONAI network weights into that network's own Zoo bundle (docs/"
            "README.md, 'Pretrained SegResNet or UNet into a Model Zoo bundle')."
        )
    if not isinstance(state, Mapping) or "base_channels" not in info:
        raise BundleError(f"{path}: holds no FPN3d weights; give the plain state dict a workflow saved.")
    if kind == "segmentation":
        linear = "head.convs.0.weight" in state
        final = state.get("head.convs.0.weight" if linear else "head.final.weight")
        if final is None:
            raise BundleError(
                f"{path}: holds no segmentation head (head.convs.* or head.final.*): give --model a model"
            )
        info.setdefault("num_classes", int(final.shape[0]))
        info.setdefault("head", "linear" if linear else "nonlinear")
        network = segmentation_network(info["num_classes"], info["base_channels"], info["num_scales"], info["head"])
    else:
        network = FPN3d(info.get("in_channels", 1), info["base_channels"], info["num_scales"])
    try:
        network.load_state_dict(state, strict=True)
    except RuntimeError as err:
        raise BundleError(f"{path}: its tensors do not fit the {kind} network {info} ({err}).") from err
    return info


def set_yaml_keys(text: str, values: Mapping[str, object]) -> str:
    """``text`` (a YAML config) with each top-level ``key: value`` line set to the literal ``values[key]``.

    Line by line, so that comments and layout stay; the values are written as JSON, which YAML reads as written. A key
    the file lacks is appended.
    """
    for key, value in values.items():
        line = re.compile(rf"^{re.escape(key)}:[ \t]*(?:'[^'\n]*'|\"[^\"\n]*\"|[^#\n]*?)([ \t]+#[^\n]*)?$", re.M)
        literal = f"{key}: {json.dumps(value)}"
        text, found = line.subn(lambda m, literal=literal: _keep_comment(literal, m), text, count=1)
        if not found:
            text = text.rstrip("\n") + f"\n{literal}  # of the released weights (scripts.tools.release)\n"
    return text


def _keep_comment(literal: str, line: re.Match) -> str:
    """``literal`` followed by the matched line's comment, at the comment's column when there is room."""
    if line.group(1) is None:
        return literal
    comment = line.group(1).lstrip()
    column = line.start(1) - line.start(0) + len(line.group(1)) - len(comment)
    return literal + " " * max(2, column - len(literal)) + comment


def network_formats(metadata: dict, model: Mapping, backbone: Mapping | None) -> None:
    """Sets the metadata's network formats (in place) to the shapes of the released weights.

    The input of an FPN3d with S scales must be divisible by ``2**(S - 1)``; the model has one logit channel per
    foreground class; the backbone returns level i with ``base_channels * 2**i`` channels at stride ``2**i``.
    """
    network = metadata["network_data_format"]
    scale = 2 ** (model["num_scales"] - 1)
    network["inputs"]["image"]["spatial_shape"] = [f"{scale}*n"] * 3
    pred = network["outputs"]["pred"]
    classes = model["num_classes"]
    pred["num_channels"] = classes
    pred["spatial_shape"] = [f"{scale}*n"] * 3
    pred["channel_def"] = DEMO_CLASSES if classes == 3 else {str(c): f"class {c + 1}" for c in range(classes)}
    labels = network["post_processed_outputs"]["pred"]
    labels["value_range"] = [0, classes]
    if classes != 3:
        labels["channel_def"] = {"0": f"label map: 0 background, 1..{classes} the classes of pred's channels 0..."}
    if backbone is None:
        metadata.pop("pretrained_backbone_data_format", None)
        return
    levels = backbone["num_scales"]
    features = metadata["pretrained_backbone_data_format"]
    features["inputs"]["image"]["spatial_shape"] = [f"{2 ** (levels - 1)}*n"] * 3
    template = next(iter(features["outputs"].values()))
    features["outputs"] = {
        f"level{i}": {
            **template,
            "num_channels": backbone["base_channels"] * 2**i,
            "spatial_shape": [f"{2 ** (levels - 1 - i)}*n" if i < levels - 1 else "n"] * 3,
        }
        for i in range(levels)
    }


def write_zip(folder: Path, zip_path: Path) -> None:
    """Zips ``folder`` as ``<folder name>/...`` deterministically: files only, sorted, fixed times, deflate level 9."""
    partial = zip_path.with_name(zip_path.name + ".partial")
    with zipfile.ZipFile(partial, "w", zipfile.ZIP_DEFLATED, compresslevel=9) as archive:
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            entry = zipfile.ZipInfo(str(Path(folder.name) / path.relative_to(folder)), date_time=ZIP_TIME)
            entry.compress_type = zipfile.ZIP_DEFLATED
            entry.external_attr = 0o644 << 16
            archive.writestr(entry, path.read_bytes(), compresslevel=9)
    partial.replace(zip_path)


def _left_out(folder: str, names: list[str]) -> set[str]:
    """What ``shutil.copytree`` leaves out of ``folder``: byte code and `NOT_SHIPPED`."""
    return {n for n in names if n == "__pycache__" or n.endswith(".pyc") or Path(folder, n) == NOT_SHIPPED}


def _copy_bundle(dst: Path) -> None:
    """Copies what a Zoo bundle ships (configs, docs, scripts but its tools, LICENSE) from the repository to ``dst``."""
    for item in SHIPPED:
        source = ROOT / item
        if source.is_dir():
            shutil.copytree(source, dst / item, ignore=_left_out)
        else:
            shutil.copy2(source, dst / item)


def json_text(value: object) -> str:
    """``value`` as the Zoo's pre-commit hook pretty-format-json (``--indent=4 --no-sort-keys``) leaves a JSON file."""
    return json.dumps(value, indent=4) + "\n"


def _version_key(version: str) -> tuple[int, ...]:
    return tuple(int(part) for part in version.split("."))


def release(
    version: str,
    base_url: str,
    model: Path,
    backbone: Path | None = None,
    name: str = DEFAULT_NAME,
    output_dir: str | Path = "release",
    changelog: str | None = None,
) -> dict[str, Path]:
    """Writes the submission folder, the release zip, the weight files to upload and the Zoo unit test; returns their
    paths (``folder``, ``zip``, ``unit_test`` and one per weight file).

    Raises:
        BundleError: a bad version, name or weight file; a version without a changelog entry; a file over the Zoo's
            1 MB limit in the submission folder.
    """
    if not re.fullmatch(r"\d+\.\d+\.\d+", version):
        raise BundleError(f"--version {version}: give major.minor.patch, e.g. 0.3.0 (the Zoo's version numbers).")
    if not re.fullmatch(r"[A-Za-z0-9_]+", name):
        raise BundleError(f"--name {name}: use letters, digits and underscores, e.g. {DEFAULT_NAME}.")
    metadata = json.loads((ROOT / "configs/metadata.json").read_text())
    if _version_key(version) < _version_key(metadata["version"]):
        raise BundleError(
            f"--version {version} is lower than this bundle's version {metadata['version']} (configs/metadata.json): "
            f"a release never goes back; give --version {metadata['version']} or higher."
        )
    if changelog:
        metadata["changelog"] = {version: changelog, **{k: v for k, v in metadata["changelog"].items() if k != version}}
    if version not in metadata["changelog"]:
        raise BundleError(
            f"--version {version} has no entry in configs/metadata.json's changelog (the Zoo requires one): "
            "add it there, or pass --changelog 'what changed'."
        )
    metadata["version"] = version
    files = {"model": describe_weights(Path(model), "segmentation")}
    if backbone is not None:
        files["pretrained_backbone"] = describe_weights(Path(backbone), "backbone")
    sources = {"model": Path(model), "pretrained_backbone": backbone}
    network_formats(metadata, files["model"], files.get("pretrained_backbone"))

    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    staging = output_dir / f".{name}.partial"
    shutil.rmtree(staging, ignore_errors=True)
    _copy_bundle(staging)
    (staging / "configs/metadata.json").write_text(json_text(metadata))

    # The released configs default to the weights they ship: inference to the model, fine-tuning to the backbone.
    keys = ("base_channels", "num_scales", "num_classes", "head", "modality", "patch_size")
    model_keys = {k: files["model"][k] for k in keys if files["model"].get(k) is not None}
    inference = json.loads((staging / "configs/inference.json").read_text())
    inference.update(model_keys)
    (staging / "configs/inference.json").write_text(json_text(inference))
    train_info = files.get("pretrained_backbone", files["model"])
    train_keys = {k: train_info[k] for k in keys[:2] + keys[4:] if train_info.get(k) is not None}
    train_keys.update({k: model_keys[k] for k in ("num_classes", "head")})
    train = staging / "configs/train.yaml"
    train.write_text(set_yaml_keys(train.read_text(), train_keys))
    yaml.safe_load(train.read_text())  # still valid YAML

    (staging / "models").mkdir()
    large_files, uploads = [], {}
    for stem, info in files.items():
        upload = output_dir / f"{name}_v{version}_{stem}.pt"
        shutil.copyfile(sources[stem], upload)
        uploads[stem] = upload
        (staging / f"models/{stem}.json").write_text(json_text(info))
        large_files.append(
            {
                "path": f"models/{stem}.pt",
                "url": f"{base_url.rstrip('/')}/{upload.name}",
                "hash_val": weights.file_digest(upload),
                "hash_type": "sha256",
            }
        )
    for path in staging.rglob("*"):
        if path.is_file() and path.stat().st_size > MAX_FILE_BYTES:
            raise BundleError(f"{path.relative_to(staging)}: over the Zoo's 1 MB per file; keep it out of the bundle.")

    # The zip holds the weights and no large_files.yml, as the Zoo's CI builds it from the submission folder.
    zipped = output_dir / f".{name}.zip.partial" / name
    shutil.rmtree(zipped.parent, ignore_errors=True)
    shutil.copytree(staging, zipped)
    for stem, upload in uploads.items():
        shutil.copyfile(upload, zipped / f"models/{stem}.pt")
    zip_path = output_dir / f"{name}_v{version}.zip"
    write_zip(zipped, zip_path)
    shutil.rmtree(zipped.parent)

    (staging / "large_files.yml").write_text(yaml.safe_dump({"large_files": large_files}, sort_keys=False))
    folder = output_dir / name
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)
    unit_test = output_dir / "ci" / "unit_tests" / f"test_{name}.py"
    unit_test.parent.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(UNIT_TEST, unit_test)
    return {"folder": folder, "zip": zip_path, "unit_test": unit_test, **uploads}


def main(argv: list[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors.install()
    log.configure()
    paths = release(args.version, args.base_url, args.model, args.backbone, args.name, args.output_dir, args.changelog)
    logger.info(f"submission folder (the Zoo's models/{args.name}): {paths.pop('folder')}")
    logger.info(f"unit test (the Zoo's ci/unit_tests/): {paths.pop('unit_test')}")
    logger.info(f"release zip: {paths['zip']}")
    logger.info(f"upload to {args.base_url}: " + ", ".join(str(p) for p in paths.values()))


if __name__ == "__main__":
    main()
