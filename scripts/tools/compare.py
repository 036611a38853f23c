"""Compare pretraining methods on your data: same data, same number of steps, then one label-efficiency study.

Usage (from the bundle root)::

    python -m scripts.tools.compare --methods dhr vox2vec pcrl [--output_dir runs/compare] [--budgets 1 2 4]
        [--folds 0 1 2] [--modes linear finetune] [--warmup_epochs N] [--tracking mlflow]
        [--pretrain_args "--epochs 100 --dataset_dir /data/ct --modality ct"]
        [--method_args vox2vec="--epochs 200"]
        [--backbones fpn3d segresnet dynunet] [--backbone_args segresnet="{'init_filters': 16}"]
        [--study_args "--epochs 50 --dataset_dir /data/labelled"]

Each method is pretrained with its config (``configs/pretrain.yaml`` plus its override file) and the same
``--pretrain_args``, in its paper's preprocessing: on CT (``--modality ct``) vox2vec gets ``ct_wide``, the HU range of
its random window, where DHR and PCRL keep ``ct`` (:data:`PAPER_PRESETS`); ``--method_args METHOD="..."`` adds one
method's own arguments, which replace the common ones of the keys they set. ``--backbones`` pretrains each method
(PCRL: FPN3d only) on each network named (the ``backbone`` key; ``--backbone_args NAME="{...}"`` its MONAI arguments).
Each goes into ``<output_dir>/pretrain_<method>_<digest>`` (``pretrain_<method>_<backbone>_<digest>`` for a MONAI
network), whose ``args.json`` holds the run's identity (the method, its configs and
its arguments; ``<digest>`` is a hash of it) and which receives the backbone ``pretrained_backbone.pt`` with its
``.json`` sidecar (architecture and preprocessing preset, see `scripts.engine.weights`), so methods of different sizes
and presets compare in one study. A method whose backbone exists for the same identity is not pretrained again, an
interrupted pretraining resumes, and changed arguments pretrain anew in a new folder. Then every backbone, and training
from scratch, goes through :mod:`scripts.tools.study` (``<output_dir>/study``, every study option accepted): one table
(each row with the preset its runs used: the backbone's; from scratch, the first method's) and one plot, methods side by
side. Every argument, and the labelled data of the study, is checked before the first pretraining starts. With
``--tracking mlflow`` the comparison is one MLflow experiment in ``<output_dir>/mlruns.db``: a run per pretraining and
per study cell, and the study's table and plot."""

from __future__ import annotations

import argparse
import json
import logging
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts.tools.study_args import add_study_arguments, check_study_arguments
from scripts.utils.cli import given_keys, given_value, none_overrides, without

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "PAPER_PRESETS", "method_args", "backbone_runs", "pretrain_folder", "pretrain", "main"]

METHODS = {
    "dhr": ["configs/pretrain.yaml"],
    "vox2vec": ["configs/pretrain.yaml", "configs/pretrain_vox2vec.yaml"],
    "pcrl": ["configs/pretrain.yaml", "configs/pretrain_pcrl.yaml"],
}
# A method's own preset for the data's modality where its paper preprocesses it otherwise than the one given: vox2vec
# scales CT from [-1350, 1000] HU, the range its random HU window picks from (REFERENCE.md §2), where DHR and PCRL clip
# CT to [-175, 250] HU ("ct"); its augmentations refuse "ct" data, which no window can widen again.
PAPER_PRESETS = {"vox2vec": {"ct": "ct_wide"}}
# Keys the comparison sets for each pretraining itself.
OWN_KEYS = {"output_dir", "backbone_file", "progress", "tracking", "tracking_uri", "experiment_name"}
# Keys that --backbones and --backbone_args set.
BACKBONE_KEYS = {"backbone", "backbone_args"}


def build_parser() -> argparse.ArgumentParser:
    """The command line; built before the study's numpy and MONAI are imported (see the imports below)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Runs: one pretraining per method, then (1 from scratch + one per method) x modes x budgets x folds "
        "study cells, each a training and an evaluation run; with the defaults 3 pretrainings and "
        "(1 + 3) x 2 x 3 x 3 = 72 cells; each backbone of --backbones multiplies the methods.",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods")
    parser.add_argument("--output_dir", default="runs/compare", help="pretrainings, study/, mlruns.db")
    add_study_arguments(parser)
    quoted = "quoted (default: %(default)r)"
    parser.add_argument(
        "--pretrain_args",
        default="",
        help=f"arguments of every pretraining, {quoted}; --modality ct gives vox2vec its paper's preset, ct_wide "
        "([-1350, 1000] HU), and DHR and PCRL theirs, ct",
    )
    parser.add_argument(
        "--method_args",
        nargs="+",
        default=[],
        metavar="METHOD=ARGS",
        help="one method's own pretraining arguments, quoted, after --pretrain_args (replacing the keys they set), "
        "e.g. --method_args vox2vec='--epochs 200' pcrl='--learning_rate 0.01'",
    )
    parser.add_argument(
        "--backbones",
        nargs="+",
        default=["fpn3d"],
        metavar="NAME",
        help="the networks each method pretrains (the `backbone` key: fpn3d, or MONAI's segresnet, dynunet, unet); "
        "PCRL pretrains fpn3d only",
    )
    parser.add_argument(
        "--backbone_args",
        nargs="+",
        default=[],
        metavar="NAME=ARGS",
        help="a MONAI network's own arguments (its `backbone_args`), quoted, e.g. "
        "--backbone_args segresnet=\"{'init_filters': 8}\"",
    )
    parser.add_argument("--study_args", default="", help=f"arguments of every study run, {quoted}")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer before numpy and MONAI are imported

from scripts.tools import study  # noqa: E402
from scripts.utils import errors, log  # noqa: E402


def method_args(method: str, common: Sequence[str], own: Sequence[str] = ()) -> list[str]:
    """The arguments of ``method``'s pretraining: ``common`` (``--pretrain_args``) with its ``--modality`` turned into
    the method's own preset (:data:`PAPER_PRESETS`), then ``own`` (the method's ``--method_args``), which replace the
    common arguments of the keys they set."""
    preset = PAPER_PRESETS.get(method, {}).get(given_value(common, "modality"))
    args = [*without(common, {"modality"}), "--modality", preset] if preset else list(common)
    return [*without(args, given_keys(own)), *own]


def parse_named(parser: argparse.ArgumentParser, option: str, items: Sequence[str], names: Sequence[str]) -> dict:
    """``{name: text}`` of the items ``NAME=TEXT`` of ``option`` (``--method_args``, ``--backbone_args``); stops
    (``parser.error``) on an item that is not one, names what is not in ``names`` (it would never run) or repeats a
    name."""
    placeholder, among = ("METHOD", "--methods") if option == "--method_args" else ("NAME", "the MONAI --backbones")
    named = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or name not in names:
            choices = " ".join(names) or "none given"
            parser.error(f"{option} {item}: give {placeholder}=ARGS, {placeholder} one of {among} ({choices})")
        if name in named:
            parser.error(f"{option}: {name} given twice; put all its arguments in one quoted string")
        named[name] = text
    return named


def parse_method_args(parser: argparse.ArgumentParser, items: Sequence[str], methods: Sequence[str]) -> dict:
    """``{method: [argument, ...]}`` of the ``--method_args`` items ``METHOD=ARGS`` (see :func:`parse_named`)."""
    own = {}
    for method, text in parse_named(parser, "--method_args", items, methods).items():
        try:
            own[method] = shlex.split(text)
        except ValueError as err:
            parser.error(f"--method_args {method}={text}: {err}")
    return own


def backbone_runs(parser: argparse.ArgumentParser, args: argparse.Namespace) -> dict[str, list[str]]:
    """``{backbone: [argument, ...]}``: the pretraining arguments that select each network of ``--backbones`` (none
    for FPN3d, the config's default, so that its runs keep their folders); stops (``parser.error``) on an unknown
    name, PCRL with a MONAI network, or ``--backbone_args`` of a network that takes none."""
    from scripts.networks.backbones import BACKBONES  # here: it imports torch and MONAI's networks

    unknown = [b for b in args.backbones if b not in BACKBONES]
    if unknown:
        parser.error(f"--backbones {' '.join(unknown)}: give one of {' '.join(BACKBONES)}")
    monai = [b for b in args.backbones if b != "fpn3d"]
    if "pcrl" in args.methods and monai:
        parser.error(f"--backbones {' '.join(monai)} with --methods pcrl: PCRL pretrains fpn3d only")
    own = parse_named(parser, "--backbone_args", args.backbone_args, monai)
    return {
        b: [] if b == "fpn3d" else ["--backbone", b, *(["--backbone_args", own[b]] if b in own else [])]
        for b in dict.fromkeys(args.backbones)
    }


def pretrain_folder(method: str, root: Path, extra: Sequence[str] = ()) -> tuple[Path, dict]:
    """The folder of ``method``'s pretraining with the arguments ``extra``, and the identity that names it."""
    identity = {"method": method, "configs": METHODS[method], "args": list(extra)}
    backbone = given_value(extra, "backbone")
    name = method if backbone in (None, "fpn3d") else f"{method}_{backbone}"
    return root / f"pretrain_{name}_{study.args_digest(identity)}", identity


def pretrain(method: str, root: Path, extra: Sequence[str] = (), tracking: study.Tracking | None = None) -> Path:
    """Pretrains one method (unless its backbone exists for the same arguments) and returns the backbone file."""
    folder, identity = pretrain_folder(method, root, extra)
    backbone = folder / "pretrained_backbone.pt"  # where pretraining exports it
    if backbone.is_file():
        logger.info(f"done already: {backbone}")
        return backbone
    others = sorted(p for p in root.glob(f"pretrain_{method}_*") if p != folder)
    differs = f" (other arguments than {', '.join(map(str, others))}: see args.json there)" if others else ""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(identity, indent=2) + "\n")
    keys = {"output_dir": str(folder), "progress": "False"}
    track = []
    if tracking:  # the run name is the config's own: the method and any ablation
        track = ["--tracking", "mlflow", "--tracking_uri", tracking.uri, "--experiment_name", tracking.experiment]
    logger.info(f"pretraining {method} into {folder} with {shlex.join(extra) or 'its config'}{differs}")
    with open(folder / "log.txt", "a") as log_file:
        try:
            study.bundle_run("pretrain", METHODS[method], keys, [*extra, *track], log_file)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"Pretraining {method} failed; see {folder / 'log.txt'}") from err
    return backbone


def main(argv: Sequence[str] | None = None) -> None:
    study.end_runs_with_this_process()
    parser = build_parser()
    args = parser.parse_args(argv)
    errors.install()
    log.configure()
    try:
        pretrain_args, study_args = shlex.split(args.pretrain_args), shlex.split(args.study_args)
    except ValueError as err:
        parser.error(f"--pretrain_args/--study_args: {err}")
    check_study_arguments(parser, args, study_args)
    if "modality" in given_keys(study_args):
        parser.error(
            "--modality in --study_args: each backbone's runs take the preset it was pretrained with (from scratch: "
            "the first method's); set it in --pretrain_args or --method_args"
        )
    own_args = parse_method_args(parser, args.method_args, args.methods)
    networks = backbone_runs(parser, args)
    sources = {"--pretrain_args": pretrain_args} | {f"--method_args {m}": a for m, a in own_args.items()}
    for where, given in sources.items():
        own = sorted(given_keys(given) & OWN_KEYS)
        if own:
            parser.error(f"{', '.join('--' + k for k in own)} in {where}: set by the comparison for each method")
        if backbone := sorted(given_keys(given) & BACKBONE_KEYS):
            parser.error(f"--{backbone[0]} in {where}: give the networks with --backbones (and --backbone_args)")
        if none := none_overrides(given):
            parser.error(f"--{none[0]} None in {where}: MONAI's command line would drop it")

    datalist = study.datalist_sha256(study_args)  # before the first pretraining: unreadable data stops here

    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tracking = study.Tracking(root / "mlruns.db", "method_comparison") if args.tracking == "mlflow" else None
    runs = [
        (m, [*method_args(m, pretrain_args, own_args.get(m, ())), *network])
        for network in networks.values()
        for m in args.methods
    ]
    args.pretrained = [str(pretrain(m, root, extra, tracking)) for m, extra in runs]
    study.study(args, root / "study", datalist, study_args, tracking)


if __name__ == "__main__":
    sys.exit(main())
