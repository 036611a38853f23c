"""The label-efficiency study's own options and their checks, shared by :mod:`scripts.tools.study` and
:mod:`scripts.tools.compare`; light (no numpy, torch or MONAI), so that both commands answer --help and argument errors
before their heavy imports."""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from scripts.utils.cli import given_keys, none_overrides

__all__ = ["CONFIGS", "OWN_KEYS", "TRAIN", "add_study_arguments", "check_study_arguments"]

TRAIN = "configs/train.yaml"
CONFIGS = {"finetune": [TRAIN], "linear": [TRAIN, "configs/linear_eval.yaml"]}
# Keys the study sets for each run itself: given after '--', they would break the grid.
OWN_KEYS = {"output_dir", "model_file", "num_train_cases", "fold", "pretrained_ckpt", "tracking", "run_name"}
OWN_KEYS |= {"tracking_uri", "experiment_name", "warmup_epochs"}


def add_study_arguments(parser: argparse.ArgumentParser) -> None:
    """The study's options, shared with :mod:`scripts.tools.compare`."""
    parser.add_argument("--modes", nargs="+", default=["linear", "finetune"], choices=sorted(CONFIGS), help="protocols")
    parser.add_argument("--budgets", nargs="+", type=int, default=[1, 2, 4], help="numbers of labelled scans")
    parser.add_argument("--folds", nargs="+", type=int, default=[0, 1, 2], help="test folds (< num_folds, 3)")
    parser.add_argument(
        "--warmup_epochs",
        type=int,
        help="frozen-backbone epochs of the fine-tuning cells; unset: train.yaml's 50 (linear evaluation stays frozen)",
    )
    parser.add_argument("--tracking", choices=["mlflow"], help="one MLflow experiment: a run per cell, table and plot")


def check_study_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """Stops (``parser.error``) on arguments that would fail or mislead only later, in some cell: budgets below 1,
    folds outside ``[0, num_folds)``, a negative warm-up, ``--warmup_epochs`` or a key the study sets after ``--``,
    and ``--key None`` (MONAI's command line would drop it)."""
    if min(args.budgets) < 1:
        parser.error(f"--budgets {' '.join(map(str, args.budgets))}: each budget is a number of labelled scans >= 1")
    num_folds = int(extra[extra.index("--num_folds") + 1]) if "--num_folds" in extra[:-1] else 3  # train.yaml's
    if min(args.folds) < 0 or max(args.folds) >= num_folds:
        parser.error(f"--folds {' '.join(map(str, args.folds))}: each fold must be in 0..{num_folds - 1} (num_folds)")
    if args.warmup_epochs is not None and args.warmup_epochs < 0:
        parser.error(f"--warmup_epochs {args.warmup_epochs}: give a number of epochs >= 0")
    if "--warmup_epochs" in extra:
        parser.error("use the study's own --warmup_epochs: among the run arguments it would unfreeze linear evaluation")
    own = sorted(given_keys(extra) & OWN_KEYS)
    if own:
        parser.error(
            f"{', '.join('--' + k for k in own)}: set by the study for each cell; leave them out of the run args"
        )
    if none := none_overrides(list(extra)):
        parser.error(f"--{none[0]} None: MONAI's command line would drop it and run the config's value")
