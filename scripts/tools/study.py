"""Label-efficiency study: test Dice against the number of labelled scans, for several initialisations and protocols.

Usage (from the bundle root)::

    python -m scripts.tools.study --pretrained runs/pretrain/pretrained_backbone.pt --budgets 1 2 4 --folds 0 1 2 \\
        [--modes linear finetune] [--warmup_epochs N] [--output_dir runs/study] [--tracking mlflow] \\
        [-- --epochs 20 --epoch_length 50]

Every cell of {from scratch, each pretrained backbone} x {linear evaluation, fine-tuning} x budgets x folds is one
`train` run followed by one `evaluate` run of this bundle, in its own folder
``<output_dir>/<init>/<mode>/n<budget>_f<fold>_<digest>`` with its log and ``args.json``. A budget of n is n labelled
scans in all: each cell trains on n cases without validation (``--num_val_cases 0``) and is evaluated with its final
weights. ``args.json`` holds the cell's identity (initialisation and the backbone file's SHA-256, mode, budget, fold,
every argument of its runs, and the SHA-256 of the labelled datalist they read: its files' paths, sizes and modification
times), of which ``<digest>`` is a hash. Arguments after ``--`` go to every run (e.g. shorter schedules). A cell whose
folder holds a readable ``evaluation/summary.json`` is finished and not run again, so an interrupted study resumes (an
unreadable summary is warned about and its cell runs again), while a changed argument, backbone or label file is a new
cell. Study processes may share ``<output_dir>`` (one per GPU, say): each runs a cell under its folder's ``cell.lock``,
and a cell another process is running is left to it until the other cells are done, then read back once that process
ends (run here if it ended without a summary). The results go to ``<output_dir>/results.csv`` (one row per cell:
initialisation, the preprocessing preset of its runs, protocol, budget, fold and test metrics) and
``<output_dir>/label_efficiency.png`` (mean and spread over folds, as Figure 1 of the DHR paper; the legend names each
initialisation's preset). With ``--tracking mlflow`` the study is one
MLflow experiment in ``<output_dir>/mlruns.db``: one run per cell (its training run, named
``<init>/<mode>/n<budget>_f<fold>``, with the test metrics added) and a ``label_efficiency`` run holding the table and
the plot. """

from __future__ import annotations

import argparse
import csv
import hashlib
import json
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from scripts.tools.study_args import CONFIGS, TRAIN, add_study_arguments, check_study_arguments


def parse(argv: Sequence[str]) -> tuple[argparse.ArgumentParser, argparse.Namespace, list[str]]:
    """The study's command line ``argv`` checked: its parser, its arguments and the run arguments after ``--``."""
    argv = list(argv)
    extra = argv[argv.index("--") + 1 :] if "--" in argv else []
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.study",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Cells: (1 from scratch + one per --pretrained file) x modes x budgets x folds, each a training and an "
        "evaluation run; with the defaults 2 x 3 x 3 = 18 cells per initialisation (18 with no --pretrained file, "
        "36 with one). Arguments after '--' go to every run, e.g. -- --epochs 20 --epoch_length 50.",
    )
    parser.add_argument("--pretrained", nargs="*", default=[], help="pretrained backbone files to compare")
    parser.add_argument(
        "--output_dir", default="runs/study", help="cells, results.csv, label_efficiency.png, mlruns.db"
    )
    add_study_arguments(parser)
    args = parser.parse_args(argv[: argv.index("--")] if "--" in argv else argv)
    check_study_arguments(parser, args, extra)
    return parser, args, extra


if __name__ == "__main__":
    parse(sys.argv[1:])  # --help and argument errors answer before numpy and MONAI are imported

import numpy as np  # noqa: E402
from monai.bundle import ConfigParser  # noqa: E402
from scripts.data.demo import prepare_demo  # noqa: E402
from scripts.data.splits import datalist_digest, labelled_datalist  # noqa: E402
from scripts.engine.runs import RunLock  # noqa: E402
from scripts.engine.weights import file_digest, read_info  # noqa: E402
from scripts.utils import errors, log  # noqa: E402
from scripts.utils.cli import given_keys, given_value  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "Cell",
    "Tracking",
    "cells",
    "datalist_sha256",
    "bundle_run",
    "run_cell",
    "run_study",
    "plot",
    "add_study_arguments",
    "check_study_arguments",
    "study",
    "main",
]

BUNDLE = Path(__file__).resolve().parents[2]  # where the study reads train.yaml's keys, wherever it is started from


def args_digest(identity: dict) -> str:
    """First 8 hex digits of the SHA-256 of ``identity`` as canonical JSON: a folder-name suffix."""
    return hashlib.sha256(json.dumps(identity, sort_keys=True).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class Cell:
    """One training + evaluation run of the study, identified by all that defines it."""

    init: str  # "scratch" or the name of a pretrained backbone file
    checkpoint: str | None
    mode: str  # "linear" or "finetune"
    budget: int
    fold: int
    args: tuple[str, ...] = ()  # every other argument of its runs: the warm-up, the arguments after '--'
    checkpoint_sha256: str | None = None  # the backbone's content: a new file under the same name is a new cell
    datalist_sha256: str | None = None  # the labelled data's files: corrected labels are new cells
    preset: str | None = None  # the preprocessing preset (modality) of its runs, for the table

    @property
    def name(self) -> str:
        """``<init>/<mode>/n<budget>_f<fold>``: the MLflow run name."""
        return f"{self.init}/{self.mode}/n{self.budget}_f{self.fold}"

    def identity(self) -> dict:
        return {**asdict(self), "args": list(self.args)}

    def folder(self, root: Path) -> Path:
        return root / self.init / self.mode / f"n{self.budget}_f{self.fold}_{args_digest(self.identity())}"


def cells(
    pretrained: Sequence[str],
    modes: Sequence[str],
    budgets: Sequence[int],
    folds: Sequence[int],
    extra: Sequence[str] = (),
    warmup_epochs: int | None = None,
    datalist_sha256: str | None = None,
) -> list[Cell]:
    """The study's grid; from-scratch runs are always included as the reference.

    Args:
        pretrained: backbone files; each is read once for its SHA-256.
        modes, budgets, folds: the grid's axes.
        extra: arguments of every run.
        warmup_epochs: frozen-backbone epochs of the fine-tuning cells (None: the config's); linear evaluation keeps
            the backbone frozen throughout, so its cells do not get it.
        datalist_sha256: the labelled data of the runs (:func:`datalist_sha256`); None: not recorded.
    """
    # a backbone is named by its file's stem, or by its folder when stems repeat (pretrain_dhr/pretrained_backbone.pt)
    stems = [Path(p).stem for p in pretrained]
    names = [Path(p).parent.name if stems.count(stem) > 1 else stem for p, stem in zip(pretrained, stems, strict=True)]
    inits = [("scratch", None, None)] + [(n, p, file_digest(p)) for n, p in zip(names, pretrained, strict=True)]
    warmup = () if warmup_epochs is None else ("--warmup_epochs", str(warmup_epochs))
    scratch = scratch_args(pretrained[0], extra) if pretrained else ()
    # the preset the runs resolve: as given, else as the backbone records it, else train.yaml's default
    default = ConfigParser.load_config_file(BUNDLE / TRAIN)["settings"]["defaults"]["modality"]
    grid = []
    for init, checkpoint, digest in inits:
        recorded = read_info(checkpoint).get("modality") if checkpoint else None
        for mode in modes:
            args = (*extra, *(scratch if checkpoint is None else ()), *(warmup if mode == "finetune" else ()))
            preset = given_value(args, "modality") or recorded or default
            for budget in budgets:
                grid += [Cell(init, checkpoint, mode, budget, f, args, digest, datalist_sha256, preset) for f in folds]
    return grid


def scratch_args(backbone: str, extra: Sequence[str]) -> tuple[str, ...]:
    """The reference trained from scratch is the first backbone's network and preprocessing, untrained: its
    ``base_channels``, ``num_scales`` (FPN3d) or ``backbone`` and ``backbone_args`` (a MONAI network), ``modality`` and
    ``patch_size`` (as its weight file records them), unless the run arguments ``extra`` set them."""
    given = given_keys(extra)
    info = read_info(backbone)
    names = ("base_channels", "num_scales", "backbone", "backbone_args", "modality", "patch_size")
    keys = [k for k in names if info.get(k) and k not in given]
    text = {k: info[k] if isinstance(info[k], str) else json.dumps(info[k]).replace(" ", "") for k in keys}
    return tuple(item for k in keys for item in (f"--{k}", text[k]))


def labelled_data(extra: Sequence[str]) -> str:
    """The labelled data that runs with the arguments ``extra`` read, found as ``configs/train.yaml`` finds it: their
    ``--dataset_dir``, else the demo data in its ``demo_dir`` (with their ``--demo_dir`` or ``--bundle_root``),
    prepared here if it is not there yet."""
    config = ConfigParser()
    config.read_config(BUNDLE / TRAIN)
    keys = ("bundle_root", "dataset_dir", "demo_dir")
    config.update({key: value for key in keys if (value := given_value(extra, key)) is not None})
    return config.get_parsed_content("dataset_dir") or prepare_demo(config.get_parsed_content("demo_dir"))


def datalist_sha256(extra: Sequence[str]) -> str:
    """The digest of the labelled datalist of runs with the arguments ``extra`` (:func:`labelled_data`; its files'
    paths, sizes and modification times: :func:`scripts.data.splits.datalist_digest`). Computed once per study, it is
    part of every cell's identity, so cells run before the labels were corrected are not taken for finished.

    Raises:
        BundleError: the data cannot be read as a labelled datalist (named).
    """
    return datalist_digest(labelled_datalist(labelled_data(extra)))


@dataclass(frozen=True)
class Tracking:
    """Where a study's MLflow records go: one experiment in one SQLite database."""

    database: Path
    experiment: str

    @property
    def uri(self) -> str:
        return f"sqlite:///{self.database.resolve()}"

    def client(self):
        """An ``MlflowClient`` and the experiment's id, creating the experiment with its artifacts beside the database
        (MLflow's own default would be ``./mlruns`` in the working directory)."""
        from mlflow import MlflowClient

        client = MlflowClient(tracking_uri=self.uri)
        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is not None:
            return client, experiment.experiment_id
        artifacts = (self.database.resolve().parent / "mlruns").as_uri()
        return client, client.create_experiment(self.experiment, artifact_location=artifacts)

    def run_args(self, run_name: str) -> list[str]:
        """Bundle-run arguments that log the run into this experiment under ``run_name``."""
        return ["--tracking", "mlflow", "--tracking_uri", self.uri, "--experiment_name", self.experiment] + [
            "--run_name",
            run_name,
        ]


def end_runs_with_this_process() -> None:
    """Makes SIGTERM (``kill``, a scheduler's stop) end this process as Ctrl+C does: ``subprocess.run`` then kills the
    bundle run it waits for, instead of leaving it to train on, unseen, holding its folder's lock."""
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))


def bundle_run(run_id: str, configs: list[str], keys: dict[str, str], extra: Sequence[str], log) -> None:
    """Runs ``python -m monai.bundle run <run_id>`` on the config files with ``--key value`` overrides, into ``log``."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", run_id, "--config_file", str(configs)]
    for key, value in keys.items():
        cmd += [f"--{key}", value]
    subprocess.run([*cmd, *extra], check=True, stdout=log, stderr=subprocess.STDOUT, env={**os.environ})


def run_cell(cell: Cell, root: Path, tracking: Tracking | None = None) -> dict:
    """Trains and evaluates one cell (logging to its folder's ``log.txt``, its identity in ``args.json``) and returns
    its ``summary.json``. With ``tracking``, the training run is the cell's MLflow run, and the test metrics
    (``test_<name>``) and the evaluation files are added to it."""
    folder = cell.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "args.json").write_text(json.dumps(cell.identity(), indent=2) + "\n")
    keys = {
        "output_dir": str(folder),
        "model_file": str(folder / "model.pt"),
        "num_train_cases": str(cell.budget),
        # A budget of n is n labelled scans in all: none is set aside to pick a checkpoint; the final weights count.
        "num_val_cases": "0",
        "fold": str(cell.fold),
    }
    if cell.checkpoint:  # from scratch: left out, as MONAI's command line cannot carry None
        keys["pretrained_ckpt"] = str(cell.checkpoint)
    track = tracking.run_args(cell.name) if tracking else []
    with open(folder / "log.txt", "a") as log_file:
        try:
            bundle_run("run", CONFIGS[cell.mode], keys, [*cell.args, *track], log_file)
            bundle_run("evaluate", [*CONFIGS[cell.mode], "configs/evaluate.yaml"], keys, cell.args, log_file)
        except subprocess.CalledProcessError as err:
            raise RuntimeError(f"Study cell {folder} failed; see {folder / 'log.txt'}") from err
    summary = json.loads((folder / "evaluation" / "summary.json").read_text())
    if tracking:
        _log_cell(tracking, cell.name, summary, folder)
    return summary


def _log_cell(tracking: Tracking, run_name: str, summary: dict, folder: Path) -> None:
    """Adds the test metrics and the evaluation files to the cell's (training) run."""
    client, experiment_id = tracking.client()
    runs = client.search_runs([experiment_id], filter_string=f"attributes.run_name = '{run_name}'")
    if not runs:
        return
    run_id = runs[0].info.run_id  # newest first
    for key, value in summary.items():
        if isinstance(value, int | float):
            client.log_metric(run_id, f"test_{key}", value)
    client.log_artifact(run_id, str(folder / "args.json"))
    client.log_artifacts(run_id, str(folder / "evaluation"), "evaluation")


def read_summary(folder: Path) -> dict | None:
    """The ``evaluation/summary.json`` of the cell in ``folder``, or None if the cell is unfinished: no summary, or one
    that cannot be read (empty, or cut short by a crash or a full disk), which is warned about, naming it, as the cell
    then runs again."""
    file = folder / "evaluation" / "summary.json"
    if not file.is_file():
        return None
    try:
        summary = json.loads(file.read_text())
        problem = "" if isinstance(summary, dict) else "not a JSON object"
    except (OSError, ValueError) as err:  # ValueError: invalid JSON or text
        problem = f"{type(err).__name__}: {err}"
    if not problem:
        return summary
    logger.warning(f"unreadable {file} ({problem}): its cell runs again")
    return None


def warn_of_other_data(grid: Sequence[Cell], root: Path) -> None:
    """Warns when cell folders in ``root`` were run on other labelled data than the cells of ``grid`` (their
    ``args.json`` records another ``datalist_sha256``, or none): the labels changed, so those results are not reused."""
    current = {cell.datalist_sha256 for cell in grid}
    if None in current:
        return
    other = 0
    for file in root.glob("*/*/*/args.json"):
        try:
            other += json.loads(file.read_text()).get("datalist_sha256") not in current
        except (OSError, ValueError, AttributeError):  # not a cell's args.json: not the study's to judge
            continue
    if other:
        logger.warning(
            f"{other} cell folder(s) in {root} were run on other labelled data (their args.json records another "
            "datalist_sha256, or none): the data changed since, so their results are not reused"
        )


def run_study(
    grid: Sequence[Cell],
    root: Path,
    runner: Callable[..., dict] | None = None,
    tracking: Tracking | None = None,
    poll_s: float = 5.0,
) -> list[dict]:
    """Runs every unfinished cell (with ``runner``, default :func:`run_cell`; finished ones are read back), then writes
    ``results.csv``, one row per cell in ``grid``'s order; returns its rows.

    Study processes may share ``root``: each holds a cell's ``cell.lock`` (:class:`RunLock`) while it runs the cell. A
    cell another process holds is left to it until every other cell is done, then its lock is waited for (tried every
    ``poll_s`` seconds) and its summary read back, or, if that process ended without one, the cell is run here.
    """
    runner = runner or run_cell
    warn_of_other_data(grid, root)
    summaries = {cell: read_summary(cell.folder(root)) for cell in grid}
    done = sum(summary is not None for summary in summaries.values())
    logger.info(f"study: {len(grid)} cells in {root}, {done} finished already")
    deferred = []
    for cell in grid:
        if summaries[cell] is not None:
            logger.info(f"done already: {cell.folder(root)}")
            continue
        summaries[cell] = _run_locked(cell, root, runner, tracking)
        if summaries[cell] is None:
            deferred.append(cell)
    for cell in deferred:
        summaries[cell] = _run_locked(cell, root, runner, tracking, poll_s)
    rows = [
        {"init": cell.init, "preset": cell.preset, "mode": cell.mode, "budget": cell.budget, "fold": cell.fold}
        | {k: v for k, v in summaries[cell].items() if isinstance(v, int | float)}
        for cell in grid
    ]
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    return rows


def _run_locked(
    cell: Cell, root: Path, runner: Callable[..., dict], tracking: Tracking | None, poll_s: float | None = None
) -> dict | None:
    """The summary of ``cell``, read back if it is finished, else run with ``runner``, under its folder's
    ``cell.lock``. While another process holds that lock: with ``poll_s`` None, returns None (deferred), else waits for
    it, trying every ``poll_s`` seconds."""
    folder = cell.folder(root)
    folder.mkdir(parents=True, exist_ok=True)
    lock = RunLock(folder / "cell.lock")
    holder = lock.try_acquire()
    if holder is not None and poll_s is None:
        logger.info(f"deferred: {folder}: another process (PID {holder}) runs it; back to it after the other cells")
        return None
    if holder is not None:
        logger.info(f"waiting for {folder}: another process (PID {holder}) runs it")
    while holder is not None:
        time.sleep(poll_s)
        holder = lock.try_acquire()
    try:
        # read under the lock: another process may have finished the cell since this one last looked
        summary = read_summary(folder)
        if summary is not None:
            logger.info(f"done already: {folder}")
            return summary
        logger.info(f"running: {folder}")
        return runner(cell, root, tracking)
    finally:
        lock.release()


def plot(rows: Sequence[dict], path: Path, metric: str = "mean_dice") -> None:
    """Test ``metric`` against the number of labelled scans: one line per (init, mode), labelled with the init's preset,
    mean and range over folds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = label_efficiency_figure(rows, metric)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def label_efficiency_figure(rows: Sequence[dict], metric: str = "mean_dice"):
    """The figure of :func:`plot` (a matplotlib ``Figure``)."""
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4))
    inits = list(dict.fromkeys(r["init"] for r in rows))
    for init, preset, mode in dict.fromkeys((r["init"], r["preset"], r["mode"]) for r in rows):
        budgets = sorted({r["budget"] for r in rows if (r["init"], r["mode"]) == (init, mode)})
        values = [[r[metric] for r in rows if (r["init"], r["mode"], r["budget"]) == (init, mode, b)] for b in budgets]
        mean = np.array([np.mean(v) for v in values])
        low, high = np.array([np.min(v) for v in values]), np.array([np.max(v) for v in values])
        colour = f"C{inits.index(init) % 10}"  # one colour per initialisation, one line style per protocol
        style = "--" if mode == "linear" else "-"
        ax.plot(budgets, mean, marker="o", color=colour, linestyle=style, label=f"{init} ({preset}), {mode}")
        ax.fill_between(budgets, low, high, color=colour, alpha=0.15)
    ax.set_xscale("log", base=2)
    all_budgets = sorted({r["budget"] for r in rows})
    ax.set_xticks(all_budgets, [str(b) for b in all_budgets])  # the budgets themselves, not powers of 2
    ax.xaxis.set_minor_locator(plt.NullLocator())
    ax.ticklabel_format(axis="y", useOffset=False)  # Dice values as they are, never "+7.1e-1" above the axis
    ax.set_xlabel("labelled training scans")
    ax.set_ylabel(f"test {metric.replace('_', ' ')}")
    ax.set_title("Label efficiency (mean, min-max over folds)")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the axes: it hides no line
    fig.tight_layout()
    return fig


def _log_summary(tracking: Tracking, root: Path, args: argparse.Namespace, extra: Sequence[str]) -> None:
    """The study's own MLflow run: its arguments, the table and the plot."""
    client, experiment_id = tracking.client()
    run_id = client.create_run(experiment_id, run_name="label_efficiency").info.run_id
    params = {"pretrained": ",".join(args.pretrained) or "none", "modes": ",".join(args.modes)}
    params |= {"budgets": ",".join(map(str, args.budgets)), "folds": ",".join(map(str, args.folds))}
    params |= {"warmup_epochs": str(args.warmup_epochs), "args": shlex.join(extra)}
    for key, value in params.items():
        client.log_param(run_id, key, value)
    client.log_artifact(run_id, str(root / "results.csv"))
    client.log_artifact(run_id, str(root / "label_efficiency.png"))
    client.set_terminated(run_id)


def study(
    args: argparse.Namespace, root: Path, datalist: str, extra: Sequence[str] = (), tracking: Tracking | None = None
) -> list[dict]:
    """Runs the study of already validated ``args`` (``pretrained``, ``modes``, ``budgets``, ``folds``,
    ``warmup_epochs``) on the labelled data whose :func:`datalist_sha256` is ``datalist`` into ``root``: cells, table,
    plot and, with ``tracking``, the MLflow records."""
    root.mkdir(parents=True, exist_ok=True)
    grid = cells(args.pretrained, args.modes, args.budgets, args.folds, extra, args.warmup_epochs, datalist)
    rows = run_study(grid, root, tracking=tracking)
    plot(rows, root / "label_efficiency.png")
    if tracking:
        _log_summary(tracking, root, args, extra)
    logger.info(f"results: {root / 'results.csv'}, plot: {root / 'label_efficiency.png'}")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    end_runs_with_this_process()
    parser, args, extra = parse(sys.argv[1:] if argv is None else argv)
    for path in args.pretrained:
        if not Path(path).is_file():
            parser.exit(1, f"error: pretrained backbone {path} does not exist\n")

    errors.install()
    log.configure()
    datalist = datalist_sha256(extra)  # before the first cell: unreadable data stops the study here
    root = Path(args.output_dir)
    tracking = Tracking(root / "mlruns.db", "label_efficiency") if args.tracking == "mlflow" else None
    study(args, root, datalist, extra, tracking)


if __name__ == "__main__":
    main()
