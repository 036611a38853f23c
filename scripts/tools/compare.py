"""Compare pretraining methods on your data: same data, same number of steps, then one label-efficiency study.

Usage (from the bundle root)::

    python -m scripts.tools.compare --methods dhr vox2vec pcrl [--output_dir runs/compare] [--budgets 1 2 4] [--folds 0
    1 2]
        [--modes linear finetune] [--warmup_epochs N] [--tracking mlflow]
        [--pretrain_args "--epochs 100 --dataset_dir /data/ct"]
        [--study_args "--epochs 50 --dataset_dir /data/labelled"]

Each method is pretrained with its config (``configs/pretrain.yaml`` plus its override file) and the same
``--pretrain_args`` into ``<output_dir>/pretrain_<method>_<digest>``, whose ``args.json`` holds the run's identity (the
method, its configs and the arguments; ``<digest>`` is a hash of it) and which receives the backbone
``pretrained_backbone.pt`` with its ``.json`` sidecar (architecture and preprocessing preset, see
`scripts.engine.weights`), so
methods of different sizes compare in one study. A method whose backbone exists for the same identity is not pretrained
again, an interrupted pretraining resumes, and changed arguments pretrain anew in a new folder. Then every backbone, and
training from scratch, goes through :mod:`scripts.tools.study` (``<output_dir>/study``, every study option accepted):
one
table and one plot, methods side by side. Every argument is checked before the first pretraining starts. With
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

from scripts.tools import study
from scripts.utils import log
from scripts.utils.cli import given_keys, none_overrides

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "pretrain_folder", "pretrain", "main"]

METHODS = {
    "dhr": ["configs/pretrain.yaml"],
    "vox2vec": ["configs/pretrain.yaml", "configs/pretrain_vox2vec.yaml"],
    "pcrl": ["configs/pretrain.yaml", "configs/pretrain_pcrl.yaml"],
}
# Keys the comparison sets for each pretraining itself.
OWN_KEYS = {"output_dir", "backbone_file", "progress", "tracking", "tracking_uri", "experiment_name"}


def pretrain_folder(method: str, root: Path, extra: Sequence[str] = ()) -> tuple[Path, dict]:
    """The folder of ``method``'s pretraining with the arguments ``extra``, and the identity that names it."""
    identity = {"method": method, "configs": METHODS[method], "args": list(extra)}
    return root / f"pretrain_{method}_{study.args_digest(identity)}", identity


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
    logger.info(f"pretraining {method} into {folder}{differs}")
    with open(folder / "log.txt", "a") as log_file:
        try:
            study.bundle_run("pretrain", METHODS[method], keys, [*extra, *track], log_file)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"Pretraining {method} failed; see {folder / 'log.txt'}") from err
    return backbone


def main(argv: Sequence[str] | None = None) -> None:
    study.end_runs_with_this_process()
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.compare",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Runs: one pretraining per method, then (1 from scratch + one per method) x modes x budgets x folds "
        "study cells, each a training and an evaluation run; with the defaults 3 pretrainings and "
        "(1 + 3) x 2 x 3 x 3 = 72 cells.",
    )
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS), help="methods")
    parser.add_argument("--output_dir", default="runs/compare", help="pretrainings, study/, mlruns.db")
    study.add_study_arguments(parser)
    quoted = "quoted (default: %(default)r)"
    parser.add_argument("--pretrain_args", default="", help=f"arguments of every pretraining, {quoted}")
    parser.add_argument("--study_args", default="", help=f"arguments of every study run, {quoted}")
    args = parser.parse_args(argv)
    log.configure()
    try:
        pretrain_args, study_args = shlex.split(args.pretrain_args), shlex.split(args.study_args)
    except ValueError as err:
        parser.error(f"--pretrain_args/--study_args: {err}")
    study.check_study_arguments(parser, args, study_args)
    own = sorted(given_keys(pretrain_args) & OWN_KEYS)
    if own:
        parser.error(f"{', '.join('--' + k for k in own)} in --pretrain_args: set by the comparison for each method")
    if none := none_overrides(pretrain_args):
        parser.error(f"--{none[0]} None in --pretrain_args: MONAI's command line would drop it")

    datalist = study.datalist_sha256(study_args)  # before the first pretraining: unreadable data stops here

    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    tracking = study.Tracking(root / "mlruns.db", "method_comparison") if args.tracking == "mlflow" else None
    args.pretrained = [str(pretrain(m, root, pretrain_args, tracking)) for m in args.methods]
    study.study(args, root / "study", datalist, study_args, tracking)


if __name__ == "__main__":
    sys.exit(main())
