"""Label-efficiency study: test Dice against the number of labelled scans, for several initialisations and protocols.

Usage (from the bundle root)::

    python -m scripts.study --pretrained models/pretrained_backbone.pt --budgets 1 2 4 --folds 0 1 2 \
        [--modes linear finetune] [--output_dir runs/study] [--tracking mlflow] [-- --epochs 20 --epoch_length 50]

Every cell of {from scratch, each pretrained backbone} x {linear evaluation, fine-tuning} x budgets x folds is one
`train` run followed by one `evaluate` run of this bundle, in its own folder
``<output_dir>/<init>/<mode>/n<budget>_f<fold>``
with its log. A budget of n is n labelled scans in all: each cell trains on n cases without validation
(``--num_val_cases 0``) and is evaluated with its final weights. Arguments after ``--`` go to every run (e.g. shorter
schedules). Finished cells (those with an ``evaluation/summary.json``) are not run again, so an interrupted study
resumes. The results go to ``<output_dir>/results.csv`` (one row per cell) and ``<output_dir>/label_efficiency.png``
(mean and spread over folds, as Figure 1 of the DHR paper).
"""

from __future__ import annotations

import argparse
import csv
import functools
import json
import logging
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from scripts import log

logger = logging.getLogger(__name__)

__all__ = ["Cell", "cells", "bundle_run", "run_cell", "run_study", "plot", "main"]

TRAIN = "configs/train.yaml"
CONFIGS = {"finetune": [TRAIN], "linear": [TRAIN, "configs/linear_eval.yaml"]}


@dataclass(frozen=True)
class Cell:
    """One training + evaluation run of the study."""

    init: str  # "scratch" or the name of a pretrained backbone file
    checkpoint: str | None
    mode: str  # "linear" or "finetune"
    budget: int
    fold: int

    def folder(self, root: Path) -> Path:
        return root / self.init / self.mode / f"n{self.budget}_f{self.fold}"


def cells(pretrained: Sequence[str], modes: Sequence[str], budgets: Sequence[int], folds: Sequence[int]) -> list[Cell]:
    """The study's grid; from-scratch runs are always included as the reference. A backbone is named by its file's
    stem, or by its folder's name when stems repeat (``pretrain_dhr/pretrained_backbone.pt`` -> ``pretrain_dhr``)."""
    stems = [Path(p).stem for p in pretrained]
    names = [Path(p).parent.name if stems.count(stem) > 1 else stem for p, stem in zip(pretrained, stems, strict=True)]
    inits = [("scratch", None)] + list(zip(names, pretrained, strict=True))
    return [Cell(i, c, m, b, f) for i, c in inits for m in modes for b in budgets for f in folds]


def bundle_run(run_id: str, configs: list[str], keys: dict[str, str], extra: Sequence[str], log) -> None:
    """Runs ``python -m monai.bundle run <run_id>`` on the config files with ``--key value`` overrides, into ``log``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(configs)]
    for key, value in keys.items():
        cmd += [f"--{key}", value]
    subprocess.run([*cmd, *extra], check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})


def run_cell(cell: Cell, root: Path, extra: Sequence[str] = (), warmup_epochs: int | None = None) -> dict:
    """Trains and evaluates one cell (logging to its folder's ``log.txt``) and returns its ``summary.json``.

    ``warmup_epochs`` applies to fine-tuning only: linear evaluation keeps the backbone frozen throughout."""
    folder = cell.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    keys = {
        "output_dir": str(folder),
        "model_file": str(folder / "model.pt"),
        "num_train_cases": str(cell.budget),
        # A budget of n is n labelled scans in all: none is set aside to pick a checkpoint; the final weights count.
        "num_val_cases": "0",
        "fold": str(cell.fold),
        "pretrained_ckpt": str(cell.checkpoint) if cell.checkpoint else "None",
    }
    if warmup_epochs is not None and cell.mode == "finetune":
        keys["warmup_epochs"] = str(warmup_epochs)
    with open(folder / "log.txt", "a") as log:
        try:
            bundle_run("run", CONFIGS[cell.mode], keys, extra, log)
            bundle_run("evaluate", [*CONFIGS[cell.mode], "configs/evaluate.yaml"], keys, extra, log)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"Study cell {folder} failed; see {folder / 'log.txt'}") from err
    return json.loads((folder / "evaluation" / "summary.json").read_text())


def run_study(
    grid: Sequence[Cell], root: Path, extra: Sequence[str] = (), runner: Callable[..., dict] | None = None
) -> list[dict]:
    """Runs every unfinished cell (with ``runner``, default :func:`run_cell`; finished ones are read back), then writes
    ``results.csv``; returns its rows."""
    runner = runner or run_cell
    rows = []
    for cell in grid:
        summary_file = cell.folder(root) / "evaluation" / "summary.json"
        if summary_file.is_file():
            summary = json.loads(summary_file.read_text())
            logger.info(f"done already: {cell.folder(root)}")
        else:
            logger.info(f"running: {cell.folder(root)}")
            summary = runner(cell, root, extra)
        rows.append(
            {"init": cell.init, "mode": cell.mode, "budget": cell.budget, "fold": cell.fold}
            | {k: v for k, v in summary.items() if isinstance(v, int | float)}
        )
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def plot(rows: Sequence[dict], path: Path, metric: str = "mean_dice") -> None:
    """Test ``metric`` against the number of labelled scans: one line per (init, mode), mean and range over folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for init, mode in dict.fromkeys((r["init"], r["mode"]) for r in rows):
        budgets = sorted({r["budget"] for r in rows if (r["init"], r["mode"]) == (init, mode)})
        values = [[r[metric] for r in rows if (r["init"], r["mode"], r["budget"]) == (init, mode, b)] for b in budgets]
        mean = np.array([np.mean(v) for v in values])
        low, high = np.array([np.min(v) for v in values]), np.array([np.max(v) for v in values])
        (line,) = ax.plot(
            budgets, mean, marker="o", linestyle="--" if mode == "linear" else "-", label=f"{init}, {mode}"
        )
        ax.fill_between(budgets, low, high, color=line.get_color(), alpha=0.15)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("labelled training scans")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.set_title("Label efficiency (mean, min-max over folds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _log_to_mlflow(root: Path, args: argparse.Namespace) -> None:
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{(root / 'mlruns.db').resolve()}")
    mlflow.set_experiment("label_efficiency")
    with mlflow.start_run(run_name="label_efficiency"):
        mlflow.log_params({"pretrained": ",".join(args.pretrained) or "none", "modes": ",".join(args.modes)})
        mlflow.log_params({"budgets": ",".join(map(str, args.budgets)), "folds": ",".join(map(str, args.folds))})
        mlflow.log_artifact(str(root / "results.csv"))
        mlflow.log_artifact(str(root / "label_efficiency.png"))


def main(argv: Sequence[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pretrained", nargs="*", default=[], help="pretrained backbone files to compare")
    parser.add_argument("--modes", nargs="+", default=["linear", "finetune"], choices=sorted(CONFIGS))
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4], help="numbers of labelled scans")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output_dir", default="runs/study")
    parser.add_argument("--tracking", choices=["mlflow"], help="log every run, and the table and plot, to MLflow")
    parser.add_argument(
        "--warmup_epochs", type=int, help="frozen-backbone epochs of fine-tuning (default: the config's)"
    )
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    if "--warmup_epochs" in extra:
        parser.error("give --warmup_epochs before '--': after it, it would also unfreeze the linear evaluation runs")
    for path in args.pretrained:
        if not Path(path).is_file():
            parser.exit(1, f"error: pretrained backbone {path} does not exist\n")

    log.configure()
    root = Path(args.output_dir)
    root.mkdir(parents=True, exist_ok=True)
    if args.tracking:
        extra = [*extra, "--tracking", args.tracking]
    runner = None if args.warmup_epochs is None else functools.partial(run_cell, warmup_epochs=args.warmup_epochs)
    rows = run_study(cells(args.pretrained, args.modes, args.budgets, args.folds), root, extra, runner)
    plot(rows, root / "label_efficiency.png")
    if args.tracking == "mlflow":
        _log_to_mlflow(root, args)
    logger.info(f"results: {root / 'results.csv'}, plot: {root / 'label_efficiency.png'}")


if __name__ == "__main__":
    main()
