"""Compare pretraining methods on your data: same data, same number of steps, then one label-efficiency study.

Usage (from the bundle root)::

    python -m scripts.compare --methods dhr vox2vec pcrl [--output_dir runs/compare] [--budgets 1 2 4] [--folds 0 1 2]
        [--modes linear finetune] [--tracking mlflow] [--pretrain_args "--epochs 100 --dataset_dir /data/ct"]
        [--study_args "--epochs 50 --dataset_dir /data/labelled"]

Each method is pretrained with its config (``configs/pretrain.yaml`` plus its override file) and the same
``--pretrain_args`` into ``<output_dir>/pretrain_<method>``, which exports ``pretrained_backbone.pt`` there; a method
whose backbone exists is not pretrained again, and an interrupted pretraining resumes. Then every backbone, and training
from scratch, goes through :mod:`scripts.study` (``<output_dir>/study``): one table and one plot, methods side by side.
Each backbone brings its own architecture and preprocessing preset (its ``.json`` sidecar, see `scripts.weights`), so
methods of different sizes compare in one study.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

from scripts import log, study

logger = logging.getLogger(__name__)

__all__ = ["METHODS", "pretrain", "main"]

METHODS = {
    "dhr": ["configs/pretrain.yaml"],
    "vox2vec": ["configs/pretrain.yaml", "configs/pretrain_vox2vec.yaml"],
    "pcrl": ["configs/pretrain.yaml", "configs/pretrain_pcrl.yaml"],
}


def pretrain(method: str, root: Path, extra: Sequence[str] = ()) -> Path:
    """Pretrains one method (unless its backbone exists) and returns the backbone file."""
    folder = root / f"pretrain_{method}"
    backbone = folder / "pretrained_backbone.pt"  # where pretraining exports it
    if backbone.is_file():
        logger.info(f"done already: {backbone}")
        return backbone
    folder.mkdir(parents=True, exist_ok=True)
    keys = {"output_dir": str(folder), "progress": "False"}
    logger.info(f"pretraining {method} into {folder}")
    with open(folder / "log.txt", "a") as log:
        try:
            study.bundle_run("pretrain", METHODS[method], keys, extra, log)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"Pretraining {method} failed; see {folder / 'log.txt'}") from err
    return backbone


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--output_dir", default="runs/compare")
    parser.add_argument("--modes", nargs="+", default=["linear", "finetune"], choices=sorted(study.CONFIGS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4])
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--tracking", choices=["mlflow"], help="track every run, the table and the plot in MLflow")
    parser.add_argument("--pretrain_args", default="", help="arguments for every pretraining run, quoted")
    parser.add_argument("--study_args", default="", help="arguments for every downstream run, quoted")
    args = parser.parse_args(argv)
    log.configure()

    root = Path(args.output_dir)
    tracking = ["--tracking", args.tracking] if args.tracking else []
    backbones = [str(pretrain(m, root, [*shlex.split(args.pretrain_args), *tracking])) for m in args.methods]
    study.main(
        ["--pretrained", *backbones, "--modes", *args.modes, "--budgets", *map(str, args.budgets)]
        + ["--folds", *map(str, args.folds), "--output_dir", str(root / "study"), *tracking]
        + ["--", *shlex.split(args.study_args)]
    )


if __name__ == "__main__":
    sys.exit(main())
