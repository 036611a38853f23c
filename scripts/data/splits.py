"""Labelled datalists, label-budget / k-fold splits and label checks for linear evaluation and fine-tuning.

Few-label experiments train on 1, 2, 4, 8, ... scans of each of k folds. The splits here are deterministic and nested
(a larger budget adds cases to a smaller one's), so the budgets of one fold differ only in how many labels they use and
never leak a test case into training or validation.
"""

from __future__ import annotations

import hashlib
import json
import os
import warnings
from pathlib import Path

import nibabel as nib
import numpy as np
from monai.utils import ensure_tuple
from scripts.data.preprocessing import _NIFTI_SUFFIXES, load_datalist
from scripts.utils.errors import BundleError, InputNotFoundError, InvalidInputError

__all__ = ["check_labels", "datalist_digest", "labelled_datalist", "split_cases"]

_KEYS = ("training", "validation", "test")
_AFFINE_TOL_MM = 1e-3
_MAX_VALUES_SHOWN = 10  # a float label resampled with interpolation can hold millions of distinct values


def _case_id(item: dict) -> tuple[str, ...]:
    """A case is identified by its image path(s), normalised so that `a/./b` and `a/b` are the same case."""
    return tuple(os.path.abspath(os.path.expanduser(str(f))) for f in ensure_tuple(item["image"]))


def _first(files: str | list[str]) -> str:
    """The file whose header stands for an image or label given as one path or a list of per-channel paths."""
    return str(ensure_tuple(files)[0])


def _check_disjoint(datalist: dict[str, list[dict]], where: str) -> None:
    """Raises if a case appears twice, within one list or across lists: it would be trained on and tested on."""
    seen: dict[tuple[str, ...], str] = {}
    clashes = []
    for key in _KEYS:
        for item in datalist.get(key) or []:
            case = _case_id(item)
            if case in seen:
                clashes.append(f"{', '.join(case)} (in '{seen[case]}' and '{key}')")
            else:
                seen[case] = key
    if clashes:
        raise InvalidInputError(
            f"The datalist {where} lists {len(clashes)} image(s) more than once, which would leak cases between "
            "training, validation and test; list each case once:\n" + "\n".join(clashes)
        )


def _nifti_files(folder: Path) -> dict[str, Path]:
    """NIfTI files of a folder by name, without hidden files (MSD archives carry macOS `._*` resource forks)."""
    return {
        p.name: p.absolute()
        for p in folder.iterdir()
        if p.is_file() and p.name.endswith(_NIFTI_SUFFIXES) and not p.name.startswith(".")
    }


def _pair_folder(images_dir: Path, labels_dir: Path) -> list[dict]:
    """Items of an MSD-style images/labels folder pair, matched by file name, sorted by name."""
    images, labels = _nifti_files(images_dir), _nifti_files(labels_dir)
    problems = [f"image {images[n]} has no label {labels_dir / n}" for n in sorted(images) if n not in labels]
    problems += [f"label {labels[n]} has no image {images_dir / n}" for n in sorted(labels) if n not in images]
    if problems:
        raise InputNotFoundError(
            f"Images and labels of {images_dir.parent} do not match by file name:\n" + "\n".join(problems)
        )
    return [{"image": str(images[n]), "label": str(labels[n])} for n in sorted(images)]


def _require_labels(items: list[dict], key: str, where: str) -> None:
    missing = [str(item["image"]) for item in items if "label" not in item]
    if missing:
        raise InvalidInputError(
            f"{len(missing)} item(s) of '{key}' in {where} have no 'label'; labelled data needs one per image:\n"
            + "\n".join(missing)
        )


def labelled_datalist(source: str | os.PathLike) -> dict[str, list[dict]]:
    """Reads labelled data as `{"training": [...], "validation": [...], "test": [...]}` of `{"image", "label"}` items.

    Args:
        source: (a) an MSD-style datalist JSON with a `training` list and optional `validation` / `test` lists
            (relative paths resolved against the JSON's folder), (b) a folder holding such a `dataset.json`, or (c) an
            MSD-style folder with `imagesTr/` and `labelsTr/` (optional `imagesTs/` with `labelsTs/`), images matched to
            labels by file name and sorted by it.

    Missing lists are `[]`. Paths are absolute. Unlabelled test images, which MSD releases ship (a JSON `test` list of
    plain paths, or `imagesTs/` without `labelsTs/`), cannot be evaluated: they are skipped with a warning, so the test
    sets come from k folds of `training` (see `split_cases`).

    Raises:
        FileNotFoundError: `source` or a listed file does not exist, an image has no label or a label no image (both
            named), or the folder has neither `dataset.json` nor `imagesTr/` + `labelsTr/`.
        ValueError: invalid JSON, no training cases, an item without "label", or a case listed twice.
    """
    path = Path(source).expanduser().absolute()
    if not path.exists():
        raise InputNotFoundError(
            f"Labelled dataset {path} does not exist: give a datalist JSON or an MSD-style folder."
        )
    if path.is_dir() and not (path / "dataset.json").is_file():
        if not ((path / "imagesTr").is_dir() and (path / "labelsTr").is_dir()):
            raise InputNotFoundError(
                f"{path} has neither a dataset.json nor imagesTr/ and labelsTr/ folders: labelled data needs either."
            )
        result = {"training": _pair_folder(path / "imagesTr", path / "labelsTr"), "validation": [], "test": []}
        if not result["training"]:
            raise InvalidInputError(f"No labelled cases (*.nii, *.nii.gz) in {path / 'imagesTr'}.")
        if (path / "labelsTs").is_dir():
            result["test"] = _pair_folder(path / "imagesTs", path / "labelsTs")
        elif (path / "imagesTs").is_dir() and _nifti_files(path / "imagesTs"):
            warnings.warn(f"Ignoring {path / 'imagesTs'}: there is no labelsTs/ to evaluate it with.", stacklevel=2)
        return result

    json_file = path / "dataset.json" if path.is_dir() else path
    result = {"training": load_datalist(json_file, "training")}  # raises on invalid JSON and on no training cases
    content = json.loads(json_file.read_text())
    for key in ("validation", "test"):
        listed = content.get(key)
        if key == "test" and listed and all(isinstance(i, str) for i in listed):
            # MSD's own dataset.json lists its test images without labels (the labels are withheld).
            warnings.warn(f"Ignoring the unlabelled 'test' list of {json_file}: no labels to test on.", stacklevel=2)
            listed = None
        result[key] = load_datalist(json_file, key) if listed else []
    for key in _KEYS:
        _require_labels(result[key], key, str(json_file))
    _check_disjoint(result, str(json_file))
    return result


def datalist_digest(datalist: dict[str, list[dict]]) -> str:
    """SHA-256 (hex) of a labelled datalist as the runs see it: every list's image and label paths with each file's
    size and modification time, so a corrected or replaced label gives another digest while reading no voxel."""

    def stamp(file: str) -> list:
        stat = os.stat(file)
        return [os.path.abspath(file), stat.st_size, stat.st_mtime_ns]

    described = {
        key: [{k: [stamp(str(f)) for f in ensure_tuple(item[k])] for k in ("image", "label")} for item in items]
        for key, items in sorted(datalist.items())
    }
    return hashlib.sha256(json.dumps(described, sort_keys=True).encode()).hexdigest()


def split_cases(
    datalist: dict[str, list[dict]],
    num_train_cases: int | None = None,
    fold: int = 0,
    num_folds: int = 3,
    num_val_cases: int = 1,
    seed: int = 0,
) -> dict[str, list[dict]]:
    """Deterministic label-budget and fold selection.

    The `training` cases are shuffled once by `np.random.default_rng(seed)` and cut into `num_folds` near-equal
    consecutive folds. Then:

    - test: without a `test` list in the datalist, fold `fold` is the test set and the other folds, in shuffled order,
      are the pool; with one, that list is the test set and the pool is every shuffled case, starting at fold `fold`
      (a rotation), so that each fold draws its budgets from a different part of `training`;
    - validation: none when `num_val_cases` is 0; else the datalist's `validation` list if non-empty (outside the
      budget), else the first `num_val_cases` cases of the pool (inside the budget);
    - training: the rest of the first `num_train_cases` cases of the pool (None or 0: all of the pool).

    A budget is therefore the number of labelled scans used in all: training plus the validation cases taken from the
    pool. For one fold and seed the budgets are nested (the 4-case set contains the 2-case set) and share their
    validation cases. The result depends on the order of `training` (sorted by file name for folders, as listed for
    JSON).

    Args:
        datalist: `{"training": [...], "validation": [...], "test": [...]}` as `labelled_datalist` returns.
        num_train_cases: label budget: how many labelled cases to use, validation cases from the pool included.
        fold: which fold is the test set (or where the pool starts, with a `test` list), in `[0, num_folds)`.
        num_folds: number of folds of `training` (at least 2 without a `test` list).
        num_val_cases: validation cases; 0 turns validation off (the workflows then keep the final weights).
        seed: seed of the shuffle.

    Returns:
        `{"training", "validation", "test"}` lists of (copied) items that share no case.

    Raises:
        BundleError: a bad `fold`, `num_folds`, `num_val_cases` or `num_train_cases` (named with the cases available),
            too few cases for the folds.
        ValueError: a case listed twice in `datalist`.
    """
    _check_disjoint(datalist, "passed to split_cases")
    cases = list(datalist.get("training") or [])
    user_val, user_test = list(datalist.get("validation") or []), list(datalist.get("test") or [])
    if not 0 <= fold < num_folds:
        raise BundleError(f"fold={fold} is not in [0, num_folds={num_folds}): set `fold` or `num_folds`.")
    if num_val_cases < 0 or (num_train_cases is not None and num_train_cases < 0):
        raise BundleError(f"num_val_cases={num_val_cases} and num_train_cases={num_train_cases} must not be negative.")
    if not cases:
        raise BundleError("The datalist has no 'training' cases to split.")
    if not user_test and num_folds < 2:
        raise BundleError(f"num_folds={num_folds}: k-fold testing needs at least 2 folds (or a 'test' list).")
    if len(cases) < num_folds and (fold > 0 or not user_test):
        raise BundleError(
            f"{len(cases)} 'training' cases are too few for num_folds={num_folds}: lower `num_folds`."
            + (" (With a 'test' list, folds choose where the budgets start in 'training'.)" if user_test else "")
        )

    order = np.random.default_rng(seed).permutation(len(cases))
    shuffled = [cases[i] for i in order]
    bounds = np.linspace(0, len(cases), num_folds + 1).round().astype(int)  # fold sizes differ by at most 1
    start, stop = bounds[fold], bounds[fold + 1]
    if user_test:
        test, pool = user_test, shuffled[start:] + shuffled[:start]
    else:
        test, pool = shuffled[start:stop], shuffled[:start] + shuffled[stop:]
    if num_train_cases and num_train_cases > len(pool):
        raise BundleError(
            f"num_train_cases={num_train_cases} but only {len(pool)} cases are available in fold {fold} of "
            f"num_folds={num_folds} ({len(cases)} 'training' cases, {len(test)} test): lower the budget."
        )
    budget = pool[:num_train_cases] if num_train_cases else pool

    if num_val_cases == 0:
        validation, training = [], budget
    elif user_val:
        validation, training = user_val, budget
    elif num_val_cases >= len(budget):
        raise BundleError(
            f"num_train_cases={num_train_cases or len(budget)} labelled cases leave none for training once "
            f"num_val_cases={num_val_cases} of them validate (fold {fold}): set `num_val_cases` 0 to train on all of "
            "them and keep the final weights, or give a larger budget."
        )
    else:
        validation, training = budget[:num_val_cases], budget[num_val_cases:]
    return {k: [dict(i) for i in v] for k, v in (("training", training), ("validation", validation), ("test", test))}


def read_volume(file: str, kind: str = "image") -> tuple[nib.spatialimages.SpatialImage | None, np.ndarray | None, str]:
    """Reads a NIfTI file in full (a truncated file fails only when its data are read) and checks that it is one 3D
    volume.

    Args:
        file: path of the file.
        kind: what the file is ("image", "label"), for the message.

    Returns:
        `(image, data, problem)`: the nibabel image and its data array, and "" when the file is usable; otherwise
        None, None and one line naming the file and what is wrong with it.
    """
    try:
        volume = nib.load(file)
        data = np.asanyarray(volume.dataobj)
    except Exception as e:  # missing, corrupt or truncated: one more problem to report with the others
        return None, None, f"cannot read {kind} {file}: {type(e).__name__}: {e}"
    # (X, Y, Z), perhaps with trailing singleton dimensions; a single slice (X, Y, 1) is a 2D image too.
    if len(volume.shape) < 3 or min(volume.shape[:3]) < 2:
        return None, None, f"{kind} {file} has shape {volume.shape}: a 3D volume is required"
    volumes = int(np.prod(volume.shape[3:]))
    if (
        volumes > 1
    ):  # preprocessing (`scripts.data.preprocessing.CheckVolumed`) would refuse it later, after other files' work
        return None, None, f"{kind} {file} is a 4D image holding {volumes} volumes: a 3D volume is required"
    return volume, data, ""


def _label_problems(item: dict, num_classes: int) -> tuple[list[str], bool]:
    """What is wrong with one item (empty if nothing), and whether its label has foreground voxels.

    Reads every image file and the label in full, so that truncated files are found before any training."""
    problems, image = [], None
    for file in ensure_tuple(item["image"]):
        image_or_none, _, problem = read_volume(str(file), "image")
        problems += [problem] if problem else []
        if str(file) == _first(item["image"]):
            image = image_or_none
    label, data, problem = read_volume(_first(item["label"]), "label")
    problems += [problem] if problem else []
    if image is None or label is None:
        return problems, False
    image_file, label_file = _first(item["image"]), _first(item["label"])
    # A multi-channel image is (X, Y, Z, C); a label may carry trailing singleton dimensions.
    if label.shape[:3] != image.shape[:3] or any(s != 1 for s in label.shape[3:]):
        problems.append(
            f"label {label_file} and image {image_file} have different shapes: {label.shape} vs {image.shape}"
        )
    difference = np.abs(label.affine - image.affine).max()
    if difference > _AFFINE_TOL_MM:
        problems.append(
            f"label {label_file} and image {image_file} have different affines (up to {difference:.4g} mm apart): "
            f"{np.array2string(label.affine, precision=4)} vs {np.array2string(image.affine, precision=4)}"
        )
    bad = (data < 0) | (data > num_classes)
    if not np.issubdtype(data.dtype, np.integer):
        bad |= data != np.round(data)  # also catches NaN
    if bad.any():
        values = np.unique(data[bad])  # only the few bad voxels are sorted
        shown = ", ".join(f"{v:g}" for v in values[:_MAX_VALUES_SHOWN])
        shown += ", ..." if len(values) > _MAX_VALUES_SHOWN else ""
        problems.append(
            f"label {label_file} has {len(values)} unexpected value(s) [{shown}]: expected integers 0..{num_classes} "
            f"(background 0 plus `num_classes`={num_classes} foreground classes)"
        )
    return problems, bool((data >= 1).any())


def check_labels(items: list[dict], num_classes: int, require_foreground: bool = False) -> None:
    """Checks labelled items before training or evaluation, reading the NIfTI files with nibabel.

    Every image and label must be readable in full and 3D; each label must have its image's spatial shape and affine
    (within 1e-3 mm) and hold only the integers `0..num_classes` (background 0 plus `num_classes` foreground classes).

    Args:
        items: `{"image", "label"}` datalist items (each a path or a list of per-channel paths; the first is compared
            with the label).
        num_classes: number of foreground classes.
        require_foreground: also fail when no label of `items` has a foreground voxel (training cannot learn a class).

    Raises:
        BundleError: one error listing every problem of every item, naming the files (both, for a shape or affine
            mismatch) and, for unexpected values, the values and the key `num_classes`.
    """
    if num_classes < 1:
        raise BundleError(f"num_classes={num_classes}: segmentation needs at least one foreground class.")
    missing = [str(item.get("image")) for item in items if "label" not in item]
    problems = [f"image {image} has no 'label' in its datalist item" for image in missing]
    any_foreground = False
    for item in items:
        if "label" in item:
            item_problems, foreground = _label_problems(item, num_classes)
            problems += item_problems
            any_foreground |= foreground
    if require_foreground and items and not problems and not any_foreground:
        labels = ", ".join(_first(item["label"]) for item in items)
        problems.append(f"every training label is all background (0), so no class can be learnt: {labels}")
    if problems:
        # one line: a BundleError ends stderr as the single line "error: <message>"
        raise BundleError(
            f"{len(problems)} label problem(s) in {len(items)} items; fix the data or `num_classes`: "
            + "; ".join(problems)
        )
