"""Datalists of the public datasets of the DHR and vox2vec papers, from their official release layouts; no download.

Usage (from the bundle root; each dataset is downloaded by the user, under its licence, from the page in
:data:`DATASETS` and docs/reproduce.md)::

    python -m scripts.tools.datasets btcv /data/btcv                  # Synapse RawData: Training/img, Training/label
    python -m scripts.tools.datasets amos_mri /data/amos22 [--labels dhr|all|merged]
    python -m scripts.tools.datasets amos_ct /data/amos22             # pretraining images (labels kept, unused there)
    python -m scripts.tools.datasets flare22_labelled /data/FLARE22
    python -m scripts.tools.datasets flare22_unlabelled /data/FLARE22
    python -m scripts.tools.datasets combine data/datalists/flare22_unlabelled.json data/datalists/amos_ct.json \
        --output data/datalists/ct_pretraining.json
    python -m scripts.tools.datasets table runs/study_amos_mri [--merge_left_right]

A converter recognises the release's folders and file names (:data:`DATASETS` says which), checks them and writes an
MSD-style datalist (``{"training": [{"image", "label"}], ...}`` with absolute paths, plus ``labels``, ``num_classes``,
``label_map`` and the source page) to ``--output`` (default ``data/datalists/<name>[_<labels>].json``). Every problem
(a folder that is not the named dataset, an image without its label or a label without its image, a case number the
release does not have, a case found twice, a case of the release that is missing) is found first and reported together
in one error, before anything is written.

A label map other than ``all`` is applied by writing remapped label files (uint8, the source's header and affine) into
``<output>_labels/`` beside the datalist, rewritten only when their source label (path, size, modification time) or the
map changed (``manifest.json`` there records both); images are never rewritten. AMOS's maps: ``dhr`` (default for
``amos_mri``) keeps labels 1..12 and sets 13..15 to background; ``merged`` also merges right and left kidney, and right
and left adrenal gland (10 classes); ``all`` keeps the 15 classes. Why these maps, and the authors' tabulation that
``table --merge_left_right`` follows: docs/reproduce.md, "Label maps".

``combine`` joins datalists into one pretraining datalist: the images of their ``training``, ``validation`` and
``test`` lists, without labels; a missing file or an image listed twice is an error, all of them named at once.

``table`` writes a study's per-organ test Dice, mean and standard deviation over folds for each initialisation,
protocol and budget (``organ_table.csv`` in the study folder, and a Markdown table on stdout), from the
``evaluation/summary.json`` of each row of its ``results.csv``; the organ names come from the datalist the study read.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import re
import statistics
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
from scripts.utils import errors
from scripts.utils.errors import BundleError, InputNotFoundError, InvalidInputError

__all__ = ["DATASETS", "LabelMap", "Dataset", "Found", "convert", "combine", "organ_table", "main"]

NIFTI = (".nii.gz", ".nii")

# Source label ids of each release (0 is background).
BTCV_LABELS = (  # Synapse syn3193805 wiki 217789; the vox2vec and DHR code's BTCV_LABELS
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "portal vein and splenic vein",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
)
AMOS_LABELS = (  # amos22/dataset.json "labels" 1..15
    "spleen",
    "right kidney",
    "left kidney",
    "gallbladder",
    "esophagus",
    "liver",
    "stomach",
    "aorta",
    "inferior vena cava",
    "pancreas",
    "right adrenal gland",
    "left adrenal gland",
    "duodenum",
    "bladder",
    "prostate/uterus",
)
FLARE22_LABELS = (  # FLARE22 labels 1..13
    "liver",
    "right kidney",
    "spleen",
    "pancreas",
    "aorta",
    "inferior vena cava",
    "right adrenal gland",
    "left adrenal gland",
    "gallbladder",
    "esophagus",
    "stomach",
    "duodenum",
    "left kidney",
)


@dataclass(frozen=True)
class LabelMap:
    """Foreground classes after the map, and the new value of each source value 0..K (None: the files as released)."""

    classes: tuple[str, ...]
    lookup: tuple[int, ...] | None
    note: str


def identity(labels: tuple[str, ...], note: str = "the release's labels, files used as they are") -> LabelMap:
    return LabelMap(labels, None, note)


AMOS_DHR = LabelMap(
    AMOS_LABELS[:12],
    tuple(range(13)) + (0, 0, 0),
    "labels 1..12 (spleen .. left adrenal gland) as released; duodenum, bladder, prostate/uterus (13..15) set to "
    "background, as the DHR authors' downstream code uses labels 1..12 only",
)
_MERGED = ("spleen", "kidney", "gallbladder", "esophagus", "liver", "stomach", "aorta", "inferior vena cava")
AMOS_MERGED = LabelMap(
    (*_MERGED, "pancreas", "adrenal gland"),
    (0, 1, 2, 2, 3, 4, 5, 6, 7, 8, 9, 10, 10, 0, 0, 0),
    "right and left kidney one class, right and left adrenal gland one class, 13..15 background: 10 classes trained "
    "as such (the DHR authors instead train 12 and average the two sides' Dice: `table --merge_left_right`)",
)


@dataclass
class Found:
    """What a scanner found: labelled ``(case, image, label)``, unlabelled ``(case, image)``, the problems (one line
    each), the missing expected cases (listed as number ranges) and notes for the summary."""

    labelled: list[tuple[int, Path, Path]] = field(default_factory=list)
    unlabelled: list[tuple[int, Path]] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    where: Path | None = None


@dataclass(frozen=True)
class Protocol:
    """A paper's downstream protocol on a dataset: its folds and label budgets (``None``: every pool case)."""

    paper: str
    num_folds: int
    budgets: tuple[int | None, ...]
    source: str


@dataclass(frozen=True)
class Dataset:
    name: str
    title: str
    modality: str  # the bundle's preprocessing preset for DHR and PCRL (vox2vec: ct_wide on CT)
    page: str
    layout: str  # the release's layout, for the docs and for the message when a folder is not it
    scan: Callable[[Path], Found]
    label_maps: dict[str, LabelMap] = field(default_factory=dict)
    default_map: str = "all"
    protocols: tuple[Protocol, ...] = ()


def _ranges(numbers: Iterable[int], width: int = 4) -> str:
    """``1-3, 7`` for [1, 2, 3, 7], zero-padded to ``width`` digits."""
    numbers = sorted(set(numbers))
    parts, start = [], None
    for i, n in enumerate(numbers):
        start = n if start is None else start
        if i + 1 == len(numbers) or numbers[i + 1] != n + 1:
            parts.append(f"{start:0{width}d}" if start == n else f"{start:0{width}d}-{n:0{width}d}")
            start = None
    return ", ".join(parts)


def _listing(folder: Path, limit: int = 12) -> str:
    """What a folder holds, for a message: its first entries (folders with '/'), hidden ones left out."""
    if not folder.is_dir():
        return "not a folder" if folder.exists() else "nothing (it does not exist)"
    entries = sorted(p.name + ("/" if p.is_dir() else "") for p in folder.iterdir() if not p.name.startswith("."))
    more = f", ... ({len(entries)} entries)" if len(entries) > limit else ""
    return (", ".join(entries[:limit]) + more) if entries else "an empty folder"


def _nifti_files(folder: Path) -> list[Path]:
    """NIfTI files of a folder (not hidden: macOS ``._*`` forks), sorted by name; none if it does not exist."""
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.name.endswith(NIFTI) and not p.name.startswith(".") and p.is_file())


def _locate(root: Path, candidates: Sequence[str], marker: str) -> Path | None:
    """The first ``root / candidate`` that holds ``marker`` (a relative path), or None."""
    for candidate in candidates:
        if (root / candidate / marker).exists():
            return root / candidate
    return None


def _not_the_dataset(name: str, root: Path, layout: str, hint: str = "") -> BundleError:
    return InvalidInputError(
        f"{root} is not the {name} release: expected {layout}; found in {root}: {_listing(root)}.{hint} "
        "Download and unpack the release as its page says (docs/reproduce.md)."
    )


def _match(files: Sequence[Path], pattern: str, what: str, found: Found, width: int = 4) -> dict[int, Path]:
    """Case number -> file for the files whose names match ``pattern`` (one group: the number); files that do not
    match, and a case number found twice (e.g. ``.nii`` beside ``.nii.gz``), are problems."""
    cases: dict[int, Path] = {}
    regex = re.compile(pattern)
    for file in files:
        m = regex.fullmatch(file.name)
        if m is None:
            found.problems.append(f"unexpected {what} file {file} (not named as the release names them: {pattern})")
            continue
        case = int(m.group(1))
        if case in cases:
            found.problems.append(f"case {case:0{width}d} twice among the {what} files: {cases[case]} and {file}")
            continue
        cases[case] = file
    return cases


def _pair(
    images: dict[int, Path], labels: dict[int, Path], expected: set[int] | None, found: Found, width: int = 4
) -> None:
    """Pairs images with labels by case number into ``found.labelled``; lists images without a label, labels without
    an image, case numbers outside ``expected`` and expected cases with neither (``found.missing``)."""
    if len(images) != len(labels):
        found.problems.append(f"{len(images)} images but {len(labels)} labels")
    for case in sorted(set(images) - set(labels)):
        found.problems.append(f"image {images[case]} has no label")
    for case in sorted(set(labels) - set(images)):
        found.problems.append(f"label {labels[case]} has no image")
    if expected is not None:
        for case in sorted((set(images) | set(labels)) - expected):
            files = ", ".join(str(f[case]) for f in (images, labels) if case in f)
            found.problems.append(f"case number {case:0{width}d} is not one of the release's ({files})")
        absent = expected - set(images) - set(labels)
        if absent:
            found.missing.append(f"{len(absent)} case(s) {_ranges(absent, width)}")
    for case in sorted(set(images) & set(labels)):
        if expected is None or case in expected:
            found.labelled.append((case, images[case], labels[case]))


# --- BTCV ------------------------------------------------------------------------------------------------------------
BTCV_TRAINING = set(range(1, 11)) | set(range(21, 41))  # the 30 labelled cases of RawData/Training
BTCV_LAYOUT = (
    "RawData/Training/img/img0001.nii.gz and RawData/Training/label/label0001.nii.gz (cases 0001-0010, 0021-0040)"
)


def scan_btcv(root: Path) -> Found:
    """Synapse syn3193805 "Abdomen" RawData: ``Training/img/imgNNNN.nii.gz`` with ``Training/label/labelNNNN.nii.gz``
    (30 cases: 0001-0010 and 0021-0040); ``Testing/img`` (20 unlabelled cases, 0061-0080) is not listed. ``root`` is
    the folder holding ``Training/``, or ``RawData/`` or ``Abdomen/RawData/`` above it."""
    where = _locate(root, (".", "RawData", "Abdomen/RawData"), "Training/img")
    if where is None:
        zips = [z for z in (root / "RawData.zip", root / "Abdomen/RawData.zip") if z.is_file()]
        hint = f" ({zips[0]} is there: unzip it first.)" if zips else ""
        raise _not_the_dataset("BTCV", root, BTCV_LAYOUT, hint)
    found = Found(where=where)
    images = _match(_nifti_files(where / "Training/img"), r"img(\d{4})\.nii(?:\.gz)?", "image", found)
    labels = _match(_nifti_files(where / "Training/label"), r"label(\d{4})\.nii(?:\.gz)?", "label", found)
    if not (where / "Training/label").is_dir():
        found.problems.append(
            f"no label folder {where / 'Training/label'}: BTCV's labels come in RawData/Training/label"
        )
    _pair(images, labels, BTCV_TRAINING, found)
    testing = _nifti_files(where / "Testing/img")
    if testing:
        found.notes.append(f"{len(testing)} unlabelled Testing images not listed (no labels to evaluate them with)")
    return found


# --- FLARE22 ---------------------------------------------------------------------------------------------------------
FLARE_LABELLED_LAYOUT = (
    "Training/FLARE22_LabeledCase50/images/FLARE22_Tr_0001_0000.nii.gz and .../labels/FLARE22_Tr_0001.nii.gz "
    "(cases 0001-0050)"
)
FLARE_UNLABELLED_LAYOUT = (
    "Training/FLARE22_UnlabeledCase1-1000/Case_00001_0000.nii.gz ... and "
    "Training/FLARE22_UnlabeledCase1001-2000/Case_01001_0000.nii.gz ... (cases 00001-02000)"
)


def scan_flare22_labelled(root: Path) -> Found:
    """FLARE22's 50 labelled training cases: ``FLARE22_LabeledCase50/images/FLARE22_Tr_NNNN_0000.nii.gz`` with
    ``labels/FLARE22_Tr_NNNN.nii.gz`` (0001-0050). ``root`` is that folder, ``Training/`` or the release folder."""
    candidates = (".", "FLARE22_LabeledCase50", "Training/FLARE22_LabeledCase50")
    where = _locate(root, candidates, "images")
    if where is None or not any(p.name.startswith("FLARE22_Tr_") for p in _nifti_files(where / "images")):
        zips = [p for c in candidates for p in (root / c).glob("images.zip")]
        hint = f" ({zips[0]} is there: unzip images.zip and labels.zip in its folder.)" if zips else ""
        raise _not_the_dataset("FLARE22 labelled", root, FLARE_LABELLED_LAYOUT, hint)
    found = Found(where=where)
    images = _match(_nifti_files(where / "images"), r"FLARE22_Tr_(\d{4})_0000\.nii(?:\.gz)?", "image", found)
    labels = _match(_nifti_files(where / "labels"), r"FLARE22_Tr_(\d{4})\.nii(?:\.gz)?", "label", found)
    _pair(images, labels, set(range(1, 51)), found)
    return found


def scan_flare22_unlabelled(root: Path) -> Found:
    """FLARE22's 2000 unlabelled training cases: ``FLARE22_UnlabeledCase1-1000/Case_NNNNN_0000.nii.gz`` and
    ``FLARE22_UnlabeledCase1001-2000/``; each folder's name gives the case numbers it holds. ``root`` is the folder
    holding them, or the release folder with ``Training/``."""
    folders: dict[Path, tuple[int, int]] = {}
    where = root
    for candidate in (root, root / "Training"):
        if candidate.is_dir():
            for folder in sorted(candidate.iterdir()):
                m = re.fullmatch(r"FLARE(?:22)?_UnlabeledCase(\d+)-(\d+)", folder.name)
                if m and folder.is_dir():
                    folders[folder] = (int(m.group(1)), int(m.group(2)))
                    where = candidate
    if not folders:
        zips = sorted(p.name for c in (root, root / "Training") for p in c.glob("*Unlabeled*.zip"))
        hint = f" ({', '.join(zips)} there: unzip them first.)" if zips else ""
        raise _not_the_dataset("FLARE22 unlabelled", root, FLARE_UNLABELLED_LAYOUT, hint)
    found = Found(where=where)
    seen: dict[int, Path] = {}
    for folder, (first, last) in folders.items():
        for case, file in _match(_nifti_files(folder), r"Case_(\d{5})_0000\.nii(?:\.gz)?", "image", found, 5).items():
            if not first <= case <= last:
                found.problems.append(f"case number {case:05d} in {folder.name} (which holds {first}-{last}): {file}")
            elif case in seen:
                found.problems.append(f"case {case:05d} twice: {seen[case]} and {file}")
            else:
                seen[case] = file
    expected = set(range(1, 2001))
    for case in sorted(set(seen) - expected):
        found.problems.append(f"case number {case:05d} is not one of the release's (00001-02000): {seen.pop(case)}")
    absent = expected - set(seen)
    if absent:
        found.missing.append(f"{len(absent)} case(s) {_ranges(absent, 5)}")
    found.unlabelled = sorted(seen.items())
    return found


# --- AMOS22 ----------------------------------------------------------------------------------------------------------
AMOS_LAYOUT = (
    "amos22/dataset.json with imagesTr/ labelsTr/ imagesVa/ labelsVa/ imagesTs/ holding amos_NNNN.nii.gz "
    "(case numbers below 500 are CT, 500 and above MRI)"
)
AMOS_FOLDERS = {
    "training": ("imagesTr", "labelsTr"),
    "validation": ("imagesVa", "labelsVa"),
    "test": ("imagesTs", None),
}


def _amos_case(entry: object) -> int | None:
    """The case number of a dataset.json entry (``{"image": "./imagesTr/amos_0001.nii.gz", ...}`` or a path)."""
    path = entry.get("image") if isinstance(entry, dict) else entry
    m = re.fullmatch(r"amos_(\d{4})\.nii(?:\.gz)?", Path(str(path)).name) if path else None
    return int(m.group(1)) if m else None


def scan_amos(root: Path, modality: str) -> Found:
    """AMOS22 (amos22.zip): ``dataset.json`` lists the cases of ``training`` (imagesTr/labelsTr), ``validation``
    (imagesVa/labelsVa) and ``test`` (imagesTs, no labels). Labelled = training + validation, unlabelled = test; CT are
    the case numbers below 500, MRI 500 and above (AMOS's readme). Only ``modality``'s cases are kept and checked
    against dataset.json: a listed case without its files, a file dataset.json does not list, a case in two lists."""
    where = _locate(root, (".", "amos22"), "dataset.json")
    if where is None or not (where / "imagesTr").is_dir():
        raise _not_the_dataset("AMOS22", root, AMOS_LAYOUT)
    found = Found(where=where)
    try:
        manifest = json.loads((where / "dataset.json").read_text())
    except (OSError, ValueError) as err:
        raise InvalidInputError(
            f"{where / 'dataset.json'} cannot be read as JSON ({err}): unpack amos22.zip again."
        ) from err
    labels = manifest.get("labels") if isinstance(manifest, dict) else None
    if isinstance(labels, dict) and {str(k) for k in labels} != {str(i) for i in range(16)}:
        found.problems.append(
            f"{where / 'dataset.json'} has the labels {sorted(labels, key=str)}: expected AMOS's 0..15 "
            "(background and 15 organs)"
        )
    keep = (lambda case: case < 500) if modality == "ct" else (lambda case: case >= 500)
    listed: dict[int, str] = {}
    for key in AMOS_FOLDERS:
        entries = manifest.get(key) if isinstance(manifest, dict) else None
        if not isinstance(entries, list):
            found.problems.append(f"{where / 'dataset.json'} has no '{key}' list")
            continue
        for entry in entries:
            case = _amos_case(entry)
            if case is None:
                found.problems.append(
                    f"{where / 'dataset.json'} '{key}' entry {entry!r} does not name amos_NNNN.nii.gz"
                )
            elif case in listed:
                found.problems.append(f"case amos_{case:04d} listed twice in dataset.json ('{listed[case]}', '{key}')")
            else:
                listed[case] = key
    files: dict[tuple[str, int], Path] = {}
    for key, folders in AMOS_FOLDERS.items():
        for kind, folder in zip(("image", "label"), folders, strict=True):
            if folder is None:
                continue
            for case, file in _match(_nifti_files(where / folder), r"amos_(\d{4})\.nii(?:\.gz)?", kind, found).items():
                if not keep(case):
                    continue
                if case not in listed:
                    found.problems.append(f"{file} is not listed in dataset.json: not a case of the release")
                elif listed[case] != key:
                    found.problems.append(f"{file} is in {folder}/ but dataset.json lists it under '{listed[case]}'")
                elif (kind, case) in files:
                    found.problems.append(f"case amos_{case:04d} twice: {files[kind, case]} and {file}")
                else:
                    files[kind, case] = file
    absent = []
    for case, key in sorted(listed.items()):
        if not keep(case):
            continue
        image, label = files.get(("image", case)), files.get(("label", case))
        if key == "test":
            if image is None:
                absent.append(case)
            else:
                found.unlabelled.append((case, image))
        elif image is None and label is None:
            absent.append(case)
        elif label is None:
            found.problems.append(f"image {image} has no label (expected {where / AMOS_FOLDERS[key][1] / image.name})")
        elif image is None:
            found.problems.append(f"label {label} has no image (expected {where / AMOS_FOLDERS[key][0] / label.name})")
        else:
            found.labelled.append((case, image, label))
    if absent:
        found.missing.append(f"{len(absent)} {modality.upper()} case(s) listed in dataset.json: {_ranges(absent)}")
    if modality == "mri" and found.unlabelled:
        found.notes.append(f"{len(found.unlabelled)} unlabelled MRI test images (imagesTs) not listed")
        found.unlabelled = []
    return found


DHR_CODE = "the DHR authors' code, github.com/multimodallearning/hierarchical-dense-ssl"
DATASETS: dict[str, Dataset] = {
    d.name: d
    for d in (
        Dataset(
            "btcv",
            "BTCV (Multi-Atlas Labeling Beyond the Cranial Vault, Abdomen), 30 labelled CT",
            "ct",
            "https://www.synapse.org/#!Synapse:syn3193805/wiki/217789",
            BTCV_LAYOUT,
            scan_btcv,
            {"all": identity(BTCV_LABELS)},
            protocols=(
                Protocol("DHR", 3, (None,), f"3 folds, every pool case (splits/btcv_fold0..2_tr20.json in {DHR_CODE})"),
                Protocol("vox2vec", 5, (None,), "5 folds (KFold(5), github.com/mishgon/vox2vec vox2vec/eval/btcv.py)"),
            ),
        ),
        Dataset(
            "amos_mri",
            "AMOS22 MRI, labelled (imagesTr + imagesVa, case numbers 500 and above)",
            "mri",
            "https://zenodo.org/record/7262581 (challenge: https://amos22.grand-challenge.org)",
            AMOS_LAYOUT,
            lambda root: scan_amos(root, "mri"),
            {"dhr": AMOS_DHR, "merged": AMOS_MERGED, "all": identity(AMOS_LABELS)},
            "dhr",
            (
                Protocol(
                    "DHR",
                    5,
                    (4, 8, None),
                    f"5 folds; 4, 8 or all scans (splits/amos_mri_[4_|8_]fold0..4 in {DHR_CODE})",
                ),
            ),
        ),
        Dataset(
            "amos_ct",
            "AMOS22 CT (case numbers below 500): labelled imagesTr + imagesVa, unlabelled imagesTs as 'test'",
            "ct",
            "https://zenodo.org/record/7262581 (challenge: https://amos22.grand-challenge.org)",
            AMOS_LAYOUT,
            lambda root: scan_amos(root, "ct"),
            {"all": identity(AMOS_LABELS), "dhr": AMOS_DHR, "merged": AMOS_MERGED},
        ),
        Dataset(
            "flare22_labelled",
            "FLARE22 labelled training cases (50 CT)",
            "ct",
            "https://flare22.grand-challenge.org/Dataset/",
            FLARE_LABELLED_LAYOUT,
            scan_flare22_labelled,
            {"all": identity(FLARE22_LABELS)},
        ),
        Dataset(
            "flare22_unlabelled",
            "FLARE22 unlabelled training cases (2000 CT), for pretraining",
            "ct",
            "https://flare22.grand-challenge.org/Dataset/",
            FLARE_UNLABELLED_LAYOUT,
            scan_flare22_unlabelled,
        ),
    )
}


# --- writing ---------------------------------------------------------------------------------------------------------
def _write_json(path: Path, content: dict) -> None:
    """Writes ``content`` to ``path`` whole or not at all (a temporary file renamed into place)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)


def _stamp(file: Path) -> dict:
    stat = file.stat()
    return {"source": str(file), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def remap_labels(cases: Sequence[tuple[int, Path, Path]], label_map: LabelMap, folder: Path) -> list[Path]:
    """Writes each case's label through ``label_map.lookup`` into ``folder`` (uint8, the source's header and affine)
    and returns the written files, in the order of ``cases``. Files whose source and map are those recorded in
    ``folder/manifest.json`` are kept as they are. New files are written to ``folder/.staging`` first, and moved into
    place only when every label was read and holds known values; otherwise nothing changes and the error names every
    bad label."""
    lookup = np.asarray(label_map.lookup, dtype=np.uint8)
    manifest_file = folder / "manifest.json"
    try:
        manifest = json.loads(manifest_file.read_text())
    except (OSError, ValueError):
        manifest = {}
    same_map = manifest.get("lookup") == list(label_map.lookup)
    recorded = manifest.get("files", {}) if same_map else {}
    staging = folder / ".staging"
    outputs, todo, problems = [], [], []
    for _, _, label in cases:
        name = label.name if label.name.endswith(".nii.gz") else label.name + ".gz"
        outputs.append(folder / name)
        if not (recorded.get(name) == _stamp(label) and (folder / name).is_file()):
            todo.append((label, name))
    if todo:
        staging.mkdir(parents=True, exist_ok=True)
        for leftover in staging.iterdir():  # of a converter that was killed
            leftover.unlink()
    for label, name in todo:
        try:
            source = nib.load(label)
            data = np.asanyarray(source.dataobj)
        except Exception as err:  # a corrupt or truncated file: one more problem, reported with the others
            problems.append(f"cannot read label {label}: {type(err).__name__}: {err}")
            continue
        values = np.unique(data)
        unknown = [f"{v:g}" for v in values if v != np.round(v) or not 0 <= v < len(lookup)]
        if unknown:
            shown = ", ".join(unknown[:10]) + (", ..." if len(unknown) > 10 else "")
            problems.append(f"label {label} holds the values {shown}: expected the release's 0..{len(lookup) - 1}")
            continue
        mapped = lookup[data.astype(np.int64)]
        image = nib.Nifti1Image(mapped, source.affine, source.header)
        image.set_data_dtype(np.uint8)
        image.header.set_slope_inter(1, 0)
        nib.save(image, staging / name)
    if problems:
        for file in staging.glob("*"):
            file.unlink()
        raise InvalidInputError(f"{len(problems)} label problem(s), no label file written: " + "; ".join(problems))
    files = {name: stamp for name, stamp in recorded.items() if (folder / name).is_file()}
    for label, name in todo:
        os.replace(staging / name, folder / name)
        files[name] = _stamp(label)
    if staging.is_dir():
        staging.rmdir()
    _write_json(manifest_file, {"lookup": list(label_map.lookup), "files": files})
    return outputs


def _fold_sizes(datalist: dict, num_folds: int) -> list[tuple[int, int]]:
    """``(test, pool)`` case counts of each fold as the bundle's `split_cases` cuts them."""
    from scripts.data.splits import split_cases  # MONAI and torch: not for --help (tests/test_first_hour.py)

    sizes = []
    for fold in range(num_folds):
        split = split_cases(datalist, None, fold, num_folds, num_val_cases=0)
        sizes.append((len(split["test"]), len(split["training"])))
    return sizes


def default_output(name: str, labels: str) -> Path:
    dataset = DATASETS[name]
    suffix = "" if labels == dataset.default_map or not dataset.label_maps else f"_{labels}"
    return Path("data/datalists") / f"{name}{suffix}.json"


def convert(
    name: str,
    root: str | os.PathLike,
    output: str | os.PathLike | None = None,
    labels: str | None = None,
    partial: bool = False,
) -> dict:
    """Scans ``root`` as the release of dataset ``name`` and writes its datalist to ``output``; returns it.

    Args:
        name: a key of :data:`DATASETS`.
        root: where the user unpacked the release.
        output: the datalist JSON (default ``data/datalists/<name>[_<labels>].json``); remapped labels go to
            ``<output without .json>_labels/``.
        labels: a label map of the dataset (default: its ``default_map``).
        partial: accept a release with expected cases missing (a partial download): warned about instead.

    Raises:
        BundleError: ``root`` missing or not the release (what was expected and found), an unknown label map, or the
            problems found (every one, in one message); nothing is written then.
    """
    dataset = DATASETS[name]
    root = Path(root).expanduser().absolute()
    if not root.is_dir():
        raise InputNotFoundError(f"{name}: {root} is not a folder: give the folder where the release was unpacked.")
    labels = labels or dataset.default_map
    if dataset.label_maps and labels not in dataset.label_maps:
        raise InvalidInputError(f"--labels {labels}: {name} has the label maps {', '.join(dataset.label_maps)}.")
    if not dataset.label_maps and labels != "all":
        raise InvalidInputError(f"--labels {labels}: {name} has no labels to map.")
    found = dataset.scan(root)
    problems = list(found.problems)
    if found.missing and not partial:
        problems += [f"missing {m} (a partial download? --partial accepts it)" for m in found.missing]
    if not found.labelled and not found.unlabelled:
        problems.append("no case found")
    if problems:
        raise InvalidInputError(
            f"{name} at {found.where or root}: {len(problems)} problem(s), nothing written: " + "; ".join(problems)
        )
    for missing in found.missing:
        warnings.warn(f"{name} at {found.where}: missing {missing}; converting the cases that are there", stacklevel=2)
    output = Path(output) if output else default_output(name, labels)
    output = output.expanduser().absolute()
    label_map = dataset.label_maps.get(labels)
    label_files = [label for _, _, label in found.labelled]
    if label_map is not None and label_map.lookup is not None and found.labelled:
        label_files = remap_labels(
            found.labelled, label_map, output.with_name(output.name.removesuffix(".json") + "_labels")
        )
    content: dict = {
        "name": dataset.title,
        "dataset": name,
        "reference": dataset.page,
        "licence": f"see {dataset.page}; not redistributed by this bundle",
        "source": str(found.where),
        "modality": {"0": "CT" if dataset.modality == "ct" else "MRI"},
    }
    if label_map is not None:
        content |= {
            "labels": {"0": "background", **{str(i): c for i, c in enumerate(label_map.classes, 1)}},
            "num_classes": len(label_map.classes),
            "label_map": labels,
            "label_map_note": label_map.note,
        }
    training = [
        {"image": str(image), "label": str(label)}
        for (_, image, _), label in zip(found.labelled, label_files, strict=True)
    ]
    training += [{"image": str(image)} for _, image in found.unlabelled] if not found.labelled else []
    content["numTraining"] = len(training)
    content["training"] = training
    if found.labelled and found.unlabelled:
        content["test"] = [str(image) for _, image in found.unlabelled]  # MSD style: unlabelled test images
    _write_json(output, content)

    print(f"{name}: {dataset.title}")
    print(f"  found in {found.where}: {len(found.labelled)} labelled, {len(found.unlabelled)} unlabelled cases")
    for note in found.notes:
        print(f"  {note}")
    if label_map is not None:
        classes = ", ".join(f"{i} {c}" for i, c in enumerate(label_map.classes, 1))
        print(f"  classes ({len(label_map.classes)}, --labels {labels}): {classes}")
        if label_map.lookup is not None:
            print(f"  remapped labels in {Path(label_files[0]).parent}")
    print(f"  wrote {output}")
    for protocol in dataset.protocols:
        if len(training) < protocol.num_folds:
            print(f"  {protocol.paper} protocol: {protocol.num_folds} folds, too few cases ({protocol.source})")
            continue
        sizes = _fold_sizes(content, protocol.num_folds)
        folds = ", ".join(f"{test}/{pool}" for test, pool in sizes)
        every = f"all (--budgets {min(pool for _, pool in sizes)})"
        budgets = " ".join(every if b is None else str(b) for b in protocol.budgets)
        print(
            f"  {protocol.paper} protocol: --num_folds {protocol.num_folds} (test/pool cases per fold: {folds}), "
            f"budgets {budgets}; --num_classes {content['num_classes']} ({protocol.source})"
        )
    if dataset.protocols:
        wide = " (vox2vec: ct_wide)" if dataset.modality == "ct" else ""
        print(f"  preprocessing preset: {dataset.modality}{wide}; a pretrained backbone brings its own")
    return content


# --- combine ---------------------------------------------------------------------------------------------------------
def combine(sources: Sequence[str | os.PathLike], output: str | os.PathLike) -> dict:
    """Joins the images of datalists ``sources`` (their ``training``, ``validation`` and ``test`` lists, items or
    plain paths, relative paths read from each JSON's folder) into one pretraining datalist ``{"training":
    [{"image"}]}`` at ``output``; returns it.

    Raises:
        BundleError: a source that is missing or not a datalist, listed files that do not exist, an image listed twice
            (in one datalist or across them): all named in one message, before anything is written.
    """
    if not sources:
        raise InvalidInputError("combine: give the datalists to combine, e.g. flare22_unlabelled.json amos_ct.json.")
    problems, images, counts = [], {}, {}
    for source in sources:
        path = Path(source).expanduser().absolute()
        try:
            content = json.loads(path.read_text())
        except (OSError, ValueError) as err:
            problems.append(f"cannot read datalist {path}: {type(err).__name__}: {err}")
            continue
        if not isinstance(content, dict) or not any(isinstance(content.get(k), list) for k in AMOS_FOLDERS):
            problems.append(f"{path} is not a datalist: no 'training', 'validation' or 'test' list")
            continue
        counts[str(path)] = 0
        for key in AMOS_FOLDERS:
            for i, item in enumerate(content.get(key) or []):
                image = item.get("image") if isinstance(item, dict) else item
                if not isinstance(image, str):
                    problems.append(f"{path} '{key}' item {i} has no single image path: {item!r}")
                    continue
                file = os.path.normpath(path.parent / Path(image).expanduser())
                if file in images:
                    problems.append(f"image {file} twice: in {images[file]} and in {path} ('{key}')")
                    continue
                images[file] = f"{path} ('{key}')"
                counts[str(path)] += 1
                if not os.path.isfile(file):
                    problems.append(f"image {file} listed in {path} ('{key}') does not exist")
    if problems:
        raise InvalidInputError(f"combine: {len(problems)} problem(s), nothing written: " + "; ".join(problems))
    output = Path(output).expanduser().absolute()
    content = {
        "name": "pretraining datalist combined by scripts.tools.datasets",
        "sources": counts,
        "numTraining": len(images),
        "training": [{"image": file} for file in images],
    }
    _write_json(output, content)
    for source, count in counts.items():
        print(f"  {count} images from {source}")
    print(f"combine: {len(images)} images, wrote {output}")
    return content


# --- per-organ table -------------------------------------------------------------------------------------------------
def _cell_summary(root: Path, row: dict) -> dict:
    """The ``evaluation/summary.json`` behind a ``results.csv`` row: the finished cell folder of its initialisation,
    protocol, budget and fold (when a study folder holds several, e.g. after changed arguments, the one whose
    mean Dice is the row's)."""
    pattern = f"{row['init']}/{row['mode']}/n{row['budget']}_f{row['fold']}_*/evaluation/summary.json"
    summaries = [json.loads(file.read_text()) | {"_file": str(file)} for file in sorted(root.glob(pattern))]
    if len(summaries) > 1:
        value = float(row["mean_dice"]) if row.get("mean_dice") not in (None, "") else None
        summaries = [s for s in summaries if s.get("mean_dice") == value]
    if len(summaries) != 1:
        raise InvalidInputError(
            f"table: {len(summaries)} cell folders of {root} match the results.csv row {row} ({pattern}): "
            "give the study folder whose results.csv this is"
        )
    return summaries[0]


def _study_classes(summary: dict, cell: Path) -> list[str]:
    """Class names of a cell's labelled data: the ``labels`` of the datalist its runs read (``--dataset_dir`` in its
    ``args.json``), else the class numbers."""
    numbers = sorted(summary.get("dice_per_class", {}), key=int)
    try:
        args = json.loads((cell / "args.json").read_text()).get("args", [])
        datalist = json.loads(Path(args[args.index("--dataset_dir") + 1]).read_text())
        names = datalist["labels"]
        return [names[n] for n in numbers]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return numbers


def _merge_sides(dice: dict) -> dict:
    """Each "right X" with a "left X" becomes "X", the mean of the two sides' Dice (those not None), where "right X"
    was; the other classes stay as they are, in their order."""
    merged = {}
    for name, value in dice.items():
        if name.startswith("left ") and "right " + name.removeprefix("left ") in dice:
            continue
        if name.startswith("right ") and "left " + name.removeprefix("right ") in dice:
            sides = [v for v in (value, dice["left " + name.removeprefix("right ")]) if v is not None]
            merged[name.removeprefix("right ")] = sum(sides) / len(sides) if sides else None
        else:
            merged[name] = value
    return merged


def organ_table(study_dir: str | os.PathLike, merge_left_right: bool = False, output: str | os.PathLike | None = None):
    """Per-organ test Dice of a study (see the module's doc); returns ``(columns, rows)`` of the table written to
    ``output`` (default ``<study_dir>/organ_table.csv``). ``merge_left_right`` averages the Dice of each "right X"
    and "left X" class into one column "X" (per cell, then over folds), as the DHR authors tabulate AMOS."""
    root = Path(study_dir).expanduser().absolute()
    results = root / "results.csv"
    if not results.is_file():
        raise InputNotFoundError(f"table: {results} does not exist: give the --output_dir of a finished study.")
    with open(results, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise InvalidInputError(f"table: {results} has no rows.")
    per_cell, names = [], None
    for row in rows:
        summary = _cell_summary(root, row)
        names = names or _study_classes(summary, Path(summary["_file"]).parents[1])
        dice = dict(
            zip(names, (summary["dice_per_class"][n] for n in sorted(summary["dice_per_class"], key=int)), strict=True)
        )
        if merge_left_right:
            dice = _merge_sides(dice)
        per_cell.append((row, summary.get("mean_dice"), dice))
    organs = list(per_cell[0][2])
    groups: dict[tuple, list] = {}
    for row, mean, dice in per_cell:
        groups.setdefault((row["init"], row.get("preset", ""), row["mode"], int(row["budget"])), []).append(
            (mean, dice)
        )

    def stats(values: list) -> str:
        values = [v for v in values if v is not None]
        if not values:
            return ""
        spread = statistics.stdev(values) if len(values) > 1 else 0.0
        return f"{statistics.fmean(values):.3f} ± {spread:.3f}"

    columns = ["init", "preset", "mode", "budget", "folds", "mean_dice", *organs]
    table = []
    for (init, preset, mode, budget), cells in groups.items():
        table.append(
            {"init": init, "preset": preset, "mode": mode, "budget": budget, "folds": len(cells)}
            | {"mean_dice": stats([m for m, _ in cells])}
            | {organ: stats([d.get(organ) for _, d in cells]) for organ in organs}
        )
    output = Path(output) if output else root / "organ_table.csv"
    with open(output, "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(table)
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for line in table:
        print("| " + " | ".join(str(line[c]) for c in columns) + " |")
    print(f"table: mean ± standard deviation over folds; wrote {output}")
    return columns, table


# --- command line ----------------------------------------------------------------------------------------------------
def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.datasets",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        epilog="Each dataset is downloaded by you, under its licence, from its page (docs/reproduce.md); nothing is "
        "downloaded here. The layouts: " + "; ".join(f"{d.name}: {d.layout}" for d in DATASETS.values()),
    )
    commands = parser.add_subparsers(
        dest="command", required=True, metavar="{" + ",".join([*DATASETS, "combine", "table"]) + "}"
    )
    for dataset in DATASETS.values():
        sub = commands.add_parser(
            dataset.name,
            help=dataset.title,
            description=f"{dataset.title}. Expects {dataset.layout}. Download: {dataset.page}",
            formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        )
        sub.add_argument("root", help="the folder where the release was unpacked")
        sub.add_argument("--output", help="datalist JSON (default: data/datalists/<name>[_<labels>].json)")
        if dataset.label_maps:
            notes = "; ".join(f"{k}: {len(m.classes)} classes, {m.note}" for k, m in dataset.label_maps.items())
            sub.add_argument("--labels", default=dataset.default_map, choices=list(dataset.label_maps), help=notes)
        sub.add_argument("--partial", action="store_true", help="accept a release with cases missing (warned)")
    sub = commands.add_parser("combine", help="join datalists into one pretraining datalist (images only)")
    sub.add_argument("sources", nargs="+", help="datalist JSON files")
    sub.add_argument("--output", required=True, help="the combined datalist JSON")
    sub = commands.add_parser("table", help="per-organ test Dice of a study, mean and spread over folds")
    sub.add_argument("study_dir", help="the study's --output_dir (holding results.csv)")
    sub.add_argument("--merge_left_right", action="store_true", help="average right and left organs into one column")
    sub.add_argument("--output", help="CSV (default: <study_dir>/organ_table.csv)")
    args = parser.parse_args(argv)
    errors.install()
    if args.command == "combine":
        combine(args.sources, args.output)
    elif args.command == "table":
        organ_table(args.study_dir, args.merge_left_right, args.output)
    else:
        convert(args.command, args.root, args.output, getattr(args, "labels", None), args.partial)


if __name__ == "__main__":
    main()
