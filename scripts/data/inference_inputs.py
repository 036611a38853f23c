"""Input selection and bad-file reporting for `configs/inference.json`.

Inference segments every usable image and reports the unusable ones together at the end, so that one bad scan in a
folder of hundreds neither stops the others nor goes unnoticed.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from monai.data import FolderLayout
from monai.utils import ensure_tuple
from scripts.data.preprocessing import load_datalist
from scripts.data.splits import read_volume
from scripts.utils.errors import BundleError

logger = logging.getLogger(__name__)

__all__ = ["check_inputs", "mask_root", "report_problems", "require_model", "segmentation_inputs"]


def require_model(model_file: str) -> None:
    """Stops the run before any image is read when ``model_file`` does not exist. (The config builds its network
    without the file, for the Model Zoo's checks; segmenting would fail at the first image, with a bare traceback.)

    Raises:
        BundleError: naming the file and the key.
    """
    if not Path(model_file).is_file():
        raise BundleError(
            f"model_file {model_file} does not exist: give a trained model with --model_file. Fine-tuning writes "
            "one: python -m monai.bundle run --config_file configs/train.yaml (add --pretrained_ckpt with a pretrained "
            "backbone) writes runs/train/model.pt; then add --model_file runs/train/model.pt to this command. "
            "(models/model.pt, the default, is a release's model: a clone has none.)"
        )


def segmentation_inputs(source: str, datalist_key: str, output_dir: str, postfix: str = "seg") -> list[dict]:
    """The datalist items to segment: those of `source` but the masks this bundle writes.

    A second run into the input folder, or into a folder below it, would otherwise segment its own masks
    (``scan_seg_seg.nii.gz``). Left out are files named ``*_<postfix>.nii[.gz]`` and, when `output_dir` lies inside
    the input folder, every file under `output_dir`. The items left out are counted in a printed line.

    Each mask is written to ``output_dir/<sub-folders>/<name>_<postfix>.nii.gz``, its input's sub-folders below
    :func:`mask_root`. Inputs that would still share a mask (``scan.nii`` beside ``scan.nii.gz``, an image listed twice)
    are refused here, before any image is read: one mask would overwrite the other.

    Args:
        source: what `scripts.data.preprocessing.load_datalist` reads: a NIfTI folder, a folder with `dataset.json` or
        a datalist.
        datalist_key: the list to read from a JSON datalist.
        output_dir: where the masks are written.
        postfix: the masks' name postfix (`SaveImaged`'s ``output_postfix``).

    Raises:
        BundleError: nothing is left to segment, or two inputs would share a mask (naming both).
    """
    items = load_datalist(source, datalist_key)
    output = Path(output_dir).expanduser().absolute()
    source_dir = Path(source).expanduser().absolute()
    source_dir = source_dir if source_dir.is_dir() else source_dir.parent
    below = not source_dir.is_relative_to(output)  # output_dir is a separate folder, perhaps inside the inputs

    def is_output(file: str) -> bool:
        path = Path(file).expanduser().absolute()
        return (below and path.is_relative_to(output)) or path.name.endswith((f"_{postfix}.nii.gz", f"_{postfix}.nii"))

    kept = [item for item in items if not any(is_output(str(f)) for f in ensure_tuple(item["image"]))]
    if len(kept) < len(items):
        left_out = len(items) - len(kept)
        logger.info(
            f"Leaving out {left_out} file(s) that are this bundle's masks (*_{postfix}.nii[.gz] or under {output})"
        )
    if not kept:
        raise BundleError(
            f"No images to segment in {source}: all {len(items)} files are masks this bundle writes "
            f"(*_{postfix}.nii[.gz] or under output_dir {output}); point `dataset_dir` at the scans."
        )
    # SaveImaged's own naming, so that what is checked is what will be written
    layout = FolderLayout(output_dir, postfix=postfix, extension=".nii.gz", data_root_dir=mask_root(source, kept))
    inputs_of: dict[str, list[str]] = {}
    for item in kept:
        image = _image(item)
        inputs_of.setdefault(str(layout.filename(subject=image)), []).append(image)
    clashes = [f"{' and '.join(images)} -> {mask}" for mask, images in inputs_of.items() if len(images) > 1]
    if clashes:
        raise BundleError(
            f"{len(clashes)} mask(s) would be written for more than one input, and all but the last lost: "
            f"{'; '.join(clashes)}. Rename the inputs (e.g. scan.nii beside scan.nii.gz) or list each image once."
        )
    return kept


def _image(item: dict) -> str:
    """The file whose name and folder a mask takes (SaveImaged reads the first of several)."""
    return str(ensure_tuple(item["image"])[0])


def mask_root(source: str, items: list[dict]) -> str:
    """The folder whose sub-folders the masks mirror under ``output_dir`` (`SaveImaged`'s ``data_root_dir``), so that
    ``a/scan.nii.gz`` and ``b/scan.nii.gz`` get masks of their own, each named after its input: a scanned NIfTI folder
    itself, or, for a datalist (whose images may lie anywhere), the folder its images have in common.

    Args:
        source: the `dataset_dir` the items were read from (see :func:`segmentation_inputs`).
        items: the datalist items to segment.
    """
    folder = Path(source).expanduser()
    if folder.is_dir() and not (folder / "dataset.json").is_file():
        return str(folder)
    return os.path.commonpath([os.path.dirname(os.path.abspath(_image(item))) for item in items])


def check_inputs(items: list[dict]) -> dict[str, list]:
    """Reads every image in full and sorts the items into usable ones and problems (truncated, unreadable, 2D).

    Returns:
        ``{"usable": [items], "problems": [one line per bad file, naming it]}``.
    """
    usable, problems = [], []
    for item in items:
        found = [read_volume(str(f), "image")[2] for f in ensure_tuple(item["image"])]
        found = [p for p in found if p]
        problems += found
        if not found:
            usable.append(item)
    return {"usable": usable, "problems": problems}


def report_problems(problems: list[str]) -> None:
    """Ends the run with every unusable input named, after the usable ones were segmented.

    Raises:
        BundleError: when there is any problem; the message lists them (one line, as BundleError messages are).
    """
    if problems:
        raise BundleError(
            f"{len(problems)} input file(s) were not segmented; fix or remove them and run again: "
            + "; ".join(problems)
        )
