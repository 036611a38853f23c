"""The few pieces of the evaluation workflow (`configs/evaluate.yaml`) that MONAI does not provide.

Everything else there is MONAI: `SupervisedEvaluator`, `SlidingWindowInferer`, `Invertd`, `MeanDice`, `MetricsSaver`,
`MLFlowHandler`. Metrics are computed on each image's original grid, on foreground channels (C, X, Y, Z), one per class.
"""

from __future__ import annotations

import csv
import json
import logging
import math
import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from ignite.engine import Engine, Events
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import ListedColormap
from matplotlib.figure import Figure
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from monai.metrics import HausdorffDistanceMetric
from monai.transforms import Orientation
from monai.utils import ImageMetaKey, convert_to_numpy, convert_to_tensor

__all__ = ["EvaluationSummary", "HausdorffDistanceMM", "OverlayPlots", "channels_to_labels", "write_metric_csvs"]

logger = logging.getLogger(__name__)

# Class c (1-based) is drawn in colour c - 1 of this list, in overlays and contours alike.
_COLOURS = ["tab:red", "tab:green", "tab:blue", "tab:orange", "tab:purple", "tab:cyan", "tab:olive", "tab:pink"]


class HausdorffDistanceMM(HausdorffDistanceMetric):
    """`HausdorffDistanceMetric` in millimetres, with the spacing read from the label's affine.

    MONAI's `HausdorffDistance` handler calls its metric with `(y_pred, y)` only, so the metric would measure in voxels;
    this subclass fills in ``spacing`` from `y` when the caller gives none. Use it through `IgniteMetricHandler`.

    `y` must be a `MetaTensor` (B, C, X, Y, Z) or a list of (C, X, Y, Z) ones, as loaded by `LoadImaged`.
    """

    def _compute_tensor(self, y_pred: torch.Tensor, y: torch.Tensor, **kwargs: Any) -> torch.Tensor:  # type: ignore[override]
        if kwargs.get("spacing") is None:
            if not isinstance(y, MetaTensor):
                raise TypeError(f"HausdorffDistanceMM needs the label as a MetaTensor with its affine, got {type(y)}.")
            spacing = y.pixdim  # one spacing per batch item when `y` is a collated batch
            kwargs["spacing"] = (
                [convert_to_numpy(s).tolist() for s in spacing] if y.is_batch else convert_to_numpy(spacing).tolist()
            )
        with warnings.catch_warnings():
            # MONAI's own compute_hausdorff_distance passes get_mask_edges the argument it deprecated itself
            # (always_return_as_numpy, removed in MONAI 1.7); nothing a caller passes avoids it, so only it is hidden.
            warnings.filterwarnings("ignore", message=".*always_return_as_numpy", category=FutureWarning)
            return super()._compute_tensor(y_pred, y, **kwargs)


def channels_to_labels(channels: torch.Tensor) -> torch.Tensor:
    """(C, X, Y, Z) binary foreground channels -> (X, Y, Z) label map in 0..C (0 where no channel is set)."""
    background = torch.zeros_like(channels[:1])
    return torch.cat([background, channels]).argmax(0)


def _mean(values: np.ndarray) -> float | None:
    """Mean of the finite values, None (JSON null) when there is none."""
    finite = values[np.isfinite(values)]
    return float(finite.mean()) if finite.size else None


# Columns of the <metric>_summary.csv files: statistics over the cases' finite values (NaN and inf are undefined).
_STATISTICS = {
    "mean": np.mean,
    "median": np.median,
    "max": np.max,
    "min": np.min,
    "90percentile": lambda v: np.percentile(v, 90),
    "std": np.std,
}


def _format(value: float | None) -> str:
    """A CSV cell: 4 decimals; "nan" for an undefined value, "inf" for an infinite one."""
    return "nan" if value is None else f"{value:.4f}"


def write_metric_csvs(
    output_dir: str, name: str, values: np.ndarray, classes: list[str], filenames: list[str] | None = None
) -> None:
    """Writes ``<name>_raw.csv`` (one row per case) and ``<name>_summary.csv`` (one row per class and the mean).

    MONAI's `MetricsSaver` names the class columns ``class0..`` (0-based, unlike `summary.json`) and runs numpy's NaN
    reductions on columns that can be all NaN, which warns; these files use the class labels of `summary.json` and
    leave undefined statistics as ``nan`` without computing them.

    Args:
        output_dir: folder of the files; created.
        name: metric name, the files' prefix.
        values: (N cases, C classes) values; NaN or inf where undefined.
        classes: the C class labels (column names).
        filenames: the N cases' image files (default: their indices).
    """
    Path(output_dir).mkdir(parents=True, exist_ok=True)
    filenames = filenames if filenames is not None else [str(i) for i in range(len(values))]
    case_means = [_mean(row) for row in values]
    with open(Path(output_dir) / f"{name}_raw.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["filename", *classes, "mean"])
        for file, row, mean in zip(filenames, values, case_means, strict=True):
            writer.writerow([file, *(f"{v:.4f}" for v in row), _format(mean)])
    columns = [*(values[:, i] for i in range(len(classes))), np.array(case_means, dtype=float)]
    with open(Path(output_dir) / f"{name}_summary.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["class", *_STATISTICS, "defined"])
        for label, column in zip([*classes, "mean"], columns, strict=True):
            finite = column[np.isfinite(column)]
            stats = [_format(float(op(finite)) if finite.size else None) for op in _STATISTICS.values()]
            writer.writerow([label, *stats, finite.size])


class EvaluationSummary:
    """Ignite handler: writes `summary.json` and the per-case CSVs, and publishes per-class means as scalar metrics.

    Per-class values are only in `engine.state.metric_details`, which `StatsHandler` and `MLFlowHandler` do not log.
    At epoch completion this handler reads the per-case, per-class values ``metric_details[dice_metric]`` and
    ``[hd_metric]`` (each (N cases, C classes)), adds ``<name>_<c>`` (c = 1..C) to ``engine.state.metrics`` and
    writes::

        {"model_file", "preprocessing": {"modality", "patch_size"}, "window": {"roi_size", "overlap", "mode"},
         "num_cases", "mean_dice", "dice_per_class": {"1": ..}, "mean_hd95_mm", "hd95_mm_per_class",
         "hd95_undefined_per_class"}

    and, beside it, ``<metric>_raw.csv`` and ``<metric>_summary.csv`` for both metrics (`write_metric_csvs`) with the
    same class labels as the JSON. Means are over cases (and classes for the overall ones) and skip undefined values:
    Dice is NaN where the label lacks the class; HD95 is NaN or inf where the label or the prediction lacks it, counted
    in ``hd95_undefined_per_class``. Values that are undefined for every case are null. Attach it before
    `MLFlowHandler` so that it sees the per-class metrics. Case file names come from the image's metadata in
    ``engine.state.output``.

    Args:
        output_file: path of the JSON file; its folder is created and holds the CSVs.
        model_file: the evaluated checkpoint, recorded in the summary.
        preprocessing: the preprocessing the cases went through (``modality``, ``patch_size``), recorded.
        inferer: the sliding-window inferer of the evaluator, whose window is recorded.
        dice_metric: name of the Dice metric (with ``save_details``) in the evaluator.
        hd_metric: name of the HD95 metric (with ``save_details``) in the evaluator.
    """

    def __init__(
        self,
        output_file: str,
        model_file: str,
        preprocessing: Mapping[str, Any],
        inferer: SlidingWindowInferer,
        dice_metric: str = "dice",
        hd_metric: str = "hd95",
    ) -> None:
        self.output_file = output_file
        self.model_file = model_file
        self.preprocessing = dict(preprocessing)
        self.window = {"roi_size": list(inferer.roi_size), "overlap": inferer.overlap, "mode": str(inferer.mode)}
        self.dice_metric = dice_metric
        self.hd_metric = hd_metric
        self._filenames: list[str] = []

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self._collect_filenames)
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def _reset(self, _engine: Engine) -> None:
        self._filenames = []

    def _collect_filenames(self, engine: Engine) -> None:
        self._filenames += [str(item["image"].meta.get(ImageMetaKey.FILENAME_OR_OBJ)) for item in engine.state.output]

    def __call__(self, engine: Engine) -> dict:
        # (N cases, C classes), on the CPU whatever the evaluation device
        dice, hd = (
            torch.as_tensor(engine.state.metric_details[k]).detach().cpu().double().numpy()
            for k in (self.dice_metric, self.hd_metric)
        )
        classes = [str(c + 1) for c in range(dice.shape[1])]
        summary = {
            "model_file": os.path.abspath(self.model_file),
            "preprocessing": self.preprocessing,
            "window": self.window,
            "num_cases": int(dice.shape[0]),
            "mean_dice": _mean(dice),
            "dice_per_class": {c: _mean(dice[:, i]) for i, c in enumerate(classes)},
            "mean_hd95_mm": _mean(hd),
            "hd95_mm_per_class": {c: _mean(hd[:, i]) for i, c in enumerate(classes)},
            "hd95_undefined_per_class": {c: int((~np.isfinite(hd[:, i])).sum()) for i, c in enumerate(classes)},
        }
        for c in classes:
            dice_c, hd_c = summary["dice_per_class"][c], summary["hd95_mm_per_class"][c]
            engine.state.metrics[f"{self.dice_metric}_{c}"] = math.nan if dice_c is None else dice_c
            engine.state.metrics[f"{self.hd_metric}_{c}"] = math.nan if hd_c is None else hd_c
        Path(self.output_file).parent.mkdir(parents=True, exist_ok=True)
        Path(self.output_file).write_text(json.dumps(summary, indent=2, allow_nan=False) + "\n")
        filenames = self._filenames if len(self._filenames) == len(dice) else None
        for name, values in ((self.dice_metric, dice), (self.hd_metric, hd)):
            write_metric_csvs(str(Path(self.output_file).parent), name, values, classes, filenames)
        logger.info(
            f"evaluation of {summary['num_cases']} cases: mean Dice {summary['mean_dice']}, "
            f"mean HD95 {summary['mean_hd95_mm']} mm; summary in {self.output_file}"
        )
        return summary


class OverlayPlots:
    """Ignite handler: a PNG per case for the first `num_cases` cases: image | label | prediction on axial slices.

    Each row is an axial slice (after reorienting to RAS), taken at evenly spaced quantiles of the slices holding label
    voxels (of the prediction if the label is empty; the middle slice if both are). Columns: the image; the label as a
    coloured overlay; the prediction as a coloured overlay with the label's contours. Pixels have the voxel aspect.
    Files are ``<output_dir>/<case index>_<image file name>.png``, drawn with matplotlib's Agg canvas (no display).

    Expects ``engine.state.output`` as MONAI engines leave it after post-processing: a list of per-case dicts holding
    the image (1, X, Y, Z) and the label and prediction as binary foreground channels (C, X, Y, Z), all on one grid,
    the image a MetaTensor with its affine and file name.

    Args:
        output_dir: folder of the PNGs; created.
        num_cases: how many cases to draw, in evaluation order.
        num_slices: slices per case.
        image_key, label_key, pred_key: keys of the output dicts.
    """

    def __init__(
        self,
        output_dir: str,
        num_cases: int = 3,
        num_slices: int = 3,
        image_key: str = "image",
        label_key: str = "label",
        pred_key: str = "pred",
    ) -> None:
        self.output_dir = output_dir
        self.num_cases = num_cases
        self.num_slices = num_slices
        self.keys = (image_key, label_key, pred_key)
        self._count = 0

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_STARTED, self._reset)
        engine.add_event_handler(Events.ITERATION_COMPLETED, self)

    def _reset(self, _engine: Engine) -> None:
        self._count = 0

    def __call__(self, engine: Engine) -> None:
        for item in engine.state.output:
            if self._count >= self.num_cases:
                return
            image, label, pred = (item[k] for k in self.keys)
            name = Path(str(image.meta.get(ImageMetaKey.FILENAME_OR_OBJ, "case"))).name.split(".")[0]
            self.save(image, label, pred, os.path.join(self.output_dir, f"{self._count:03d}_{name}.png"), name)
            self._count += 1

    def save(self, image: MetaTensor, label: torch.Tensor, pred: torch.Tensor, path: str, title: str = "") -> None:
        """Draws one case (shapes as in the class docstring) into the PNG `path`."""
        num_classes = label.shape[0]
        planes = [image[:1], channels_to_labels(label)[None], channels_to_labels(pred)[None]]
        stack = torch.cat([convert_to_tensor(p, dtype=torch.float32, device="cpu", track_meta=False) for p in planes])
        stack = Orientation(axcodes="RAS", labels=None)(MetaTensor(stack, affine=image.affine))
        spacing = np.asarray(stack.pixdim, dtype=float)
        volume, label_map, pred_map = (stack[i].numpy() for i in range(3))
        rows = self._slices(label_map if label_map.any() else pred_map)
        low, high = np.percentile(volume, [1, 99.5])
        colours = ListedColormap([_COLOURS[c % len(_COLOURS)] for c in range(num_classes)])

        figure = Figure(figsize=(9, 3 * len(rows)))
        FigureCanvasAgg(figure)  # explicit Agg canvas: no GUI backend, no global pyplot state
        axes = figure.subplots(len(rows), 3, squeeze=False)
        for row, z in zip(axes, rows, strict=True):
            # Transposed with the origin at the bottom: x (R) to the right, y (A) upwards.
            background = volume[:, :, z].T
            shown = {"image": None, "label": label_map[:, :, z].T, "prediction": pred_map[:, :, z].T}
            for ax, (column, overlay) in zip(row, shown.items(), strict=True):
                ax.imshow(background, cmap="gray", vmin=low, vmax=high, origin="lower", aspect=spacing[1] / spacing[0])
                if overlay is not None:
                    masked = np.ma.masked_equal(overlay, 0)
                    ax.imshow(
                        masked,
                        cmap=colours,
                        vmin=0.5,
                        vmax=num_classes + 0.5,
                        alpha=0.5,
                        origin="lower",
                        aspect=spacing[1] / spacing[0],
                        interpolation="nearest",
                    )
                if column == "prediction":
                    for c in range(1, num_classes + 1):
                        mask = shown["label"] == c
                        if mask.any() and not mask.all():  # contour() warns on a constant mask
                            ax.contour(mask, levels=[0.5], colors=[_COLOURS[(c - 1) % len(_COLOURS)]], linewidths=0.8)
                ax.set_title(f"{column}, axial slice {z}", fontsize=8)
                ax.set_axis_off()
        figure.suptitle(title, fontsize=9)
        figure.tight_layout()
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        figure.savefig(path, dpi=80)

    def _slices(self, label_map: np.ndarray) -> list[int]:
        """Axial indices at evenly spaced quantiles of the slices that hold label voxels (the middle one if none)."""
        labelled = np.flatnonzero(label_map.any(axis=(0, 1)))
        if labelled.size == 0:
            return [label_map.shape[2] // 2]
        quantiles = (np.arange(self.num_slices) + 1) / (self.num_slices + 1)
        return sorted({int(labelled[int(q * (labelled.size - 1) + 0.5)]) for q in quantiles})
