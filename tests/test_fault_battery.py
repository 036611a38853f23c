"""Issue 10's battery of faults and bad inputs: each case, its input, and the message a user reads last.

Every row of `CASES` writes its input under a fresh folder, runs a workflow on it and expects the run to stop with a
`scripts.utils.errors.BundleError` whose message holds `expected`. That message is what a user reads as the last line of
stderr, ``error: <message>`` (the excepthook of `scripts.utils.errors`, tested in tests/test_errors.py): rows marked
`CLI`
check exactly that through ``python -m monai.bundle run`` (the slow tier); the others run the same workflow in this
process (``monai.bundle.create_workflow``: initialize, run, finalize, as the command line does), which is ~50x cheaper.
`COVERED_ELSEWHERE` lists the cases of the battery whose test needs more than a message (a killed process, a resumed
run, a second run, warnings on a cache entry) and names that test.
"""

from __future__ import annotations

import fcntl
import importlib
import json
import os
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import ROOT, last_error, monai_bundle_run
from monai.bundle import create_workflow
from scripts.data.splits import labelled_datalist, split_cases
from scripts.engine.weights import save_weights
from scripts.networks.fpn3d import FPN3d
from scripts.networks.segmentation import segmentation_network
from scripts.utils.errors import find_bundle_error
from test_pretrain_bundle import write_volumes
from test_train_bundle import write_cases

# Workflow: (config files, run id). Each gets its tiny keys; a row's keys override them.
WORKFLOWS = {
    "pretrain": (["configs/pretrain.yaml"], "pretrain"),
    "train": (["configs/train.yaml"], "run"),
    "linear_eval": (["configs/train.yaml", "configs/linear_eval.yaml"], "run"),
    "evaluate": (["configs/train.yaml", "configs/evaluate.yaml"], "evaluate"),
    "inference": (["configs/inference.json"], "run"),
}
NETWORK = {"patch_size": [16, 16, 8], "base_channels": 4, "num_scales": 3, "num_workers": 0}
TINY = {
    "pretrain": {**NETWORK, "pairs_per_volume": 2, "voxels_per_pair": 32, "epochs": 1, "epoch_length": 1},
    # 3 cases, 3 folds, no validation: fold 0 tests one case and trains on the other two
    "train": {**NETWORK, "num_classes": 2, "num_folds": 3, "num_val_cases": 0, "epochs": 1, "epoch_length": 1},
    # the rows' models are plain state dicts: their preprocessing is given (shapes cannot tell it)
    "evaluate": {**NETWORK, "num_folds": 3, "modality": "mri"},
    "inference": {**NETWORK, "modality": "mri"},
}
TINY["linear_eval"] = TINY["train"]
CLI = True  # the row runs through `python -m monai.bundle run` and checks the last line of stderr


@dataclass
class Case:
    id: str
    item: int  # the item of issue 10 that asked for it; 15 for the rows of issue 15
    workflow: str
    make: Callable[[Path], dict]  # writes the input under the folder, returns the row's keys
    expected: str  # part of the BundleError's message, the last line of stderr
    cli: bool = False
    after: Callable[[Path], None] | None = None  # checks what the failed run left behind


# ---- inputs
def image(path: Path, array: np.ndarray, spacing: tuple[float, float, float] = (1.5, 1.5, 1.5)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)
    return path


def body(shape: tuple[int, ...] = (30, 28, 14)) -> np.ndarray:
    """An MRI-like ellipsoid body (600-700) in air (0)."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    inside = (grid**2).sum(0) < 0.7
    return np.where(inside, 600 + 100 * np.random.default_rng(0).random(shape), 0).astype(np.float32)


def truncate(path: Path) -> Path:
    """Cuts the end of the gzip stream: the header still reads, the data do not."""
    path.write_bytes(path.read_bytes()[:-200])
    return path


def volumes(tmp: Path, extra: Callable[[Path], object] | None = None) -> dict:
    """One good pretraining volume in `data/`, and what `extra` adds there."""
    write_volumes(tmp / "data", count=1)
    if extra is not None:
        extra(tmp / "data")
    return {"dataset_dir": tmp / "data"}


def labelled(tmp: Path, extra: Callable[[Path], object] | None = None, **keys) -> dict:
    """Three labelled cases in `data/` (imagesTr/labelsTr), and what `extra` does to them."""
    write_cases(tmp / "data", count=3)
    if extra is not None:
        extra(tmp)
    return {"dataset_dir": tmp / "data", **keys}


def split(tmp: Path, key: str) -> dict:
    """The one `key` ("training" or "test") case of fold 0 with the row's 3 folds and no validation."""
    return split_cases(labelled_datalist(tmp / "data"), None, 0, 3, 0, 0)[key][0]


def training_image(tmp: Path) -> Path:
    return Path(split(tmp, "training")["image"])


def training_label(tmp: Path) -> Path:
    return Path(split(tmp, "training")["label"])


def held_out_image(tmp: Path) -> Path:
    return Path(split(tmp, "test")["image"])


def model(tmp: Path, base_channels: int = 4, name: str = "model.pt") -> Path:
    """A segmentation model's plain state dict (2 classes, 3 scales): its shapes tell what it is."""
    torch.manual_seed(0)
    torch.save(segmentation_network(2, base_channels, 3).state_dict(), tmp / name)
    return tmp / name


def backbone(tmp: Path, base_channels: int = 4) -> Path:
    torch.manual_seed(0)
    torch.save(FPN3d(1, base_channels, 3).state_dict(), tmp / "backbone.pt")
    return tmp / "backbone.pt"


def images(tmp: Path, extra: Callable[[Path], object] | None = None, **keys) -> dict:
    """Two scans to segment in `images/`, a model, and what `extra` adds to `images/`."""
    for name in ("a", "b"):
        image(tmp / f"images/{name}.nii.gz", body((28, 26, 14)))
    if extra is not None:
        extra(tmp / "images")
    return {"dataset_dir": tmp / "images", "model_file": model(tmp), **keys}


def another_run(tmp: Path) -> dict:
    """A finished run with base_channels 8 in `out/`: its checkpoint belongs to another architecture."""
    keys = volumes(tmp)
    assert run_in_process("pretrain", tmp, {**keys, "base_channels": 8}) is None
    return keys


def locked(tmp: Path, data: Callable[[Path], dict] = volumes) -> dict:
    """`out/run.lock` held as another process holds it: an flock on its own open file, with that PID inside."""
    (tmp / "out").mkdir()
    fd = os.open(tmp / "out/run.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # flock conflicts between open files, also of one process
    os.write(fd, b"4242\n")
    return data(tmp)


def model_of_fold(tmp: Path, fold: int) -> Path:
    """A trained model whose sidecar records that its training tested on fold `fold` of the rows' 3 folds."""
    info = {"kind": "segmentation", "in_channels": 1, "base_channels": 4, "num_scales": 3, "num_classes": 2}
    info |= {"head": "linear", "modality": "mri", "patch_size": [16, 16, 8], "fold": fold, "num_folds": 3, "seed": 0}
    save_weights(segmentation_network(2, 4, 3).state_dict(), tmp / "model.pt", info)
    return tmp / "model.pt"


def unwritable(tmp: Path, keys: dict) -> dict:
    (tmp / "file").write_text("")  # a file where a folder of output_dir would be
    return {**keys, "output_dir": tmp / "file/out"}


def nan_volume(folder: Path) -> None:
    array = body()
    array[5, 5, 5] = np.nan
    image(folder / "nan.nii.gz", array)


def labels_set(tmp: Path, array: np.ndarray, files: list[Path]) -> None:
    for file in files:
        image(file, array)


def value_above_classes(tmp: Path) -> None:
    file = training_label(tmp)
    array = np.asarray(nib.load(file).dataobj).copy()
    array[0, 0, 0] = 5
    image(file, array)


def four_d(path: Path) -> None:
    image(path, np.stack([np.asarray(nib.load(path).dataobj)] * 3, -1))


# ---- checks of what a failed run left
def nothing_trained(tmp: Path) -> None:
    assert not (tmp / "out/model.pt").exists(), "the fault was found only after training"


def readable_ones_segmented(tmp: Path) -> None:
    assert sorted(p.name for p in (tmp / "out").glob("*_seg.nii.gz")) == ["a_seg.nii.gz", "b_seg.nii.gz"]


CASES = [
    # -- 7: pretraining keys, checked in `initialize` before any data is read
    Case(
        "pretrain patch_size of 2 values",
        7,
        "pretrain",
        lambda t: volumes(t) | {"patch_size": [16, 16]},
        'patch_size=[16, 16] must be 3 positive integers (voxels along x, y, z), e.g. --patch_size "[128,128,32]".',
        CLI,
    ),
    Case(
        "pretrain patch_size with a 0",
        7,
        "pretrain",
        lambda t: volumes(t) | {"patch_size": [16, 16, 0]},
        "patch_size=[16, 16, 0] must be 3 positive integers",
    ),
    *(
        Case(
            f"pretrain {key} 0",
            7,
            "pretrain",
            lambda t, key=key: volumes(t) | {key: 0},
            f"{key}=0 must be an integer >= 1: set --{key} to 1 or more.",
        )
        for key in ("pairs_per_volume", "voxels_per_pair", "epoch_length", "epochs", "checkpoint_interval")
    ),
    Case(
        "pretrain unknown modality",
        7,
        "pretrain",
        lambda t: volumes(t) | {"modality": "xray"},
        "modality='xray' is not a preset: use --modality one of ['ct', 'ct_wide', 'mri'].",
    ),
    Case(
        "pretrain vox2vec augmentations on the ct preset",
        7,
        "pretrain",
        lambda t: volumes(t) | {"augmentations": "vox2vec", "modality": "ct"},
        "Vox2VecAugmentations needs CT preprocessed with the 'ct_wide' preset",
    ),
    Case(
        "pretrain output_dir cannot be written",
        7,
        "pretrain",
        lambda t: unwritable(t, volumes(t)),
        "/file/out' cannot be written (Not a directory): give a folder you can write to with --output_dir.",
    ),
    Case(
        "pretrain checkpoint of another architecture in output_dir",
        7,
        "pretrain",
        another_run,
        "holds checkpoints of another run (checkpoint_iteration=1.pt): base_channels is 8 there and 4 now.",
    ),
    Case(
        "pretrain dataset_dir that does not exist",
        8,
        "pretrain",
        lambda t: {"dataset_dir": t / "nowhere"},
        "nowhere does not exist: give a datalist JSON or a NIfTI folder.",
    ),
    Case(
        "pretrain dataset_dir without NIfTI files",
        8,
        "pretrain",
        lambda t: (t / "empty").mkdir() or {"dataset_dir": t / "empty"},
        "No NIfTI files (*.nii, *.nii.gz) and no dataset.json found in ",
    ),
    # -- 9: two runs in one output_dir
    Case(
        "pretrain output_dir in use by another run",
        9,
        "pretrain",
        locked,
        "is in use by another run (PID 4242; lock file",
        after=lambda t: (not (t / "out/checkpoints").exists()) or pytest.fail("the second run touched the first's"),
    ),
    # -- 3, 4, 8, 10: bad pretraining files, all named at once before any training
    Case(
        "pretrain corrupt file",
        8,
        "pretrain",
        lambda t: volumes(t, lambda d: (d / "bad.nii.gz").write_bytes(np.random.default_rng(0).bytes(1000))),
        "1 of 2 volumes cannot be used; fix or remove them from the datalist:\n",
    ),
    Case(
        "pretrain truncated file",
        8,
        "pretrain",
        lambda t: volumes(t, lambda d: truncate(image(d / "bad.nii.gz", body()))),
        "bad.nii.gz: ",
    ),
    Case("pretrain NaN voxel", 8, "pretrain", lambda t: volumes(t, nan_volume), "nan.nii.gz holds non-finite values"),
    Case(
        "pretrain 4D image",
        3,
        "pretrain",
        lambda t: volumes(t, lambda d: image(d / "series.nii.gz", np.stack([body()] * 3, -1))),
        "series.nii.gz is a 4D image holding 3 volumes: a 3D volume is required.",
    ),
    Case(
        "pretrain 2D image",
        8,
        "pretrain",
        lambda t: volumes(t, lambda d: image(d / "flat.nii.gz", body((30, 28)))),
        "flat.nii.gz: a 3D volume is required, got an image of shape",
    ),
    Case(
        "pretrain volume that shrinks to nothing",
        10,
        "pretrain",
        lambda t: volumes(t, lambda d: image(d / "tiny.nii.gz", body((30, 28, 10)), (0.01, 0.01, 0.01))),
        "tiny.nii.gz shrinks to nothing when resampled to (1.5, 1.5, 1.5) mm: it spans 0.3 mm along axis 0",
    ),
    Case(
        "pretrain only a constant volume (ct)",
        4,
        "pretrain",
        lambda t: (
            {"dataset_dir": image(t / "data/flat.nii.gz", np.full((30, 28, 14), 40.0, np.float32)).parent}
            | {"modality": "ct"}
        ),
        "None of the 1 volumes is usable for pretraining (see the warnings above)",
    ),
    # -- 7, 8: downstream training: keys, weights, and every file read before training
    Case(
        "train truncated label",
        8,
        "train",
        lambda t: labelled(t, lambda t: truncate(training_label(t))),
        "1 label problem(s) in 2 items; fix the data or `num_classes`: cannot read label ",
        CLI,
        nothing_trained,
    ),
    Case(
        "train truncated image",
        8,
        "train",
        lambda t: labelled(t, lambda t: truncate(training_image(t))),
        "cannot read image ",
        after=nothing_trained,
    ),
    Case(
        "train 2D image",
        8,
        "train",
        lambda t: labelled(t, lambda t: image(training_image(t), np.ones((28, 26), np.float32))),
        "has shape (28, 26): a 3D volume is required",
        after=nothing_trained,
    ),
    Case(
        "train 4D image",
        3,
        "train",
        lambda t: labelled(t, lambda t: four_d(training_image(t))),
        "is a 4D image holding 3 volumes: a 3D volume is required",
        after=nothing_trained,
    ),
    Case(
        "train all-background labels",
        8,
        "train",
        lambda t: labelled(
            t, lambda t: labels_set(t, np.zeros((28, 26, 14), np.uint8), sorted((t / "data/labelsTr").iterdir()))
        ),
        "every training label is all background (0), so no class can be learnt: ",
        after=nothing_trained,
    ),
    Case(
        "train label value above num_classes",
        8,
        "train",
        lambda t: labelled(t, value_above_classes),
        "has 1 unexpected value(s) [5]: expected integers 0..2 (background 0 plus `num_classes`=2 foreground classes)",
        after=nothing_trained,
    ),
    Case(
        "train label and image of different shapes",
        8,
        "train",
        lambda t: labelled(t, lambda t: image(training_label(t), np.zeros((20, 26, 14), np.uint8))),
        "have different shapes: (20, 26, 14) vs (28, 26, 14)",
        after=nothing_trained,
    ),
    Case(
        "train missing pretrained_ckpt",
        8,
        "train",
        lambda t: labelled(t, pretrained_ckpt=t / "nowhere.pt"),
        "nowhere.pt does not exist: give the path of an existing weight file",
    ),
    Case(
        "train backbone of another architecture",
        7,
        "train",
        lambda t: labelled(t, pretrained_ckpt=backbone(t, base_channels=8)),
        "--base_channels 4 contradicts pretrained_ckpt ",
    ),
    Case(
        "train fold out of range",
        7,
        "train",
        lambda t: labelled(t, fold=5),
        "fold=5 is not in [0, num_folds=3): set `fold` or `num_folds`.",
    ),
    Case(
        "train budget above the cases",
        7,
        "train",
        lambda t: labelled(t, num_train_cases=9),
        "num_train_cases=9 but only 2 cases are available in fold 0",
    ),
    Case(
        "train num_classes 0",
        7,
        "train",
        lambda t: labelled(t, num_classes=0),
        "num_classes=0: segmentation needs at least one foreground class.",
    ),
    *(
        Case(
            f"train {key} {value}",
            7,
            "train",
            lambda t, key=key, value=value: labelled(t, **{key: value}),
            f"{key}={value!r} must be ",
        )
        for key, value in (
            ("patch_size", [16, 16]),
            ("epoch_length", 0),
            ("epochs", 0),
            ("val_interval", 0),
            ("volumes_per_batch", 0),
            ("patches_per_volume", 0),
        )
    ),
    Case(
        "train unknown modality",
        7,
        "train",
        lambda t: labelled(t, modality="xray"),
        "Unknown modality='xray': the key `modality` must be one of ['ct', 'ct_wide', 'mri'].",
    ),
    Case(
        "train output_dir cannot be written",
        7,
        "train",
        lambda t: unwritable(t, labelled(t)),
        "/file/out' cannot be written (Not a directory): give a folder you can write to with --output_dir.",
    ),
    Case(
        "train dataset_dir that does not exist",
        8,
        "train",
        lambda t: {"dataset_dir": t / "nowhere"},
        "Labelled dataset ",
    ),
    Case(
        "linear_eval truncated image",
        8,
        "linear_eval",
        lambda t: labelled(t, lambda t: truncate(training_image(t))),
        "cannot read image ",
        after=nothing_trained,
    ),
    Case(
        "linear_eval with a warm-up",
        7,
        "linear_eval",
        lambda t: labelled(t, warmup_epochs=1),
        "warmup_epochs=1 with configs/linear_eval.yaml",
    ),
    # -- 7, 8: evaluation
    Case(
        "evaluate truncated test image",
        8,
        "evaluate",
        lambda t: labelled(t, lambda t: truncate(held_out_image(t)), model_file=model(t)),
        "1 label problem(s) in 1 items; fix the data or `num_classes`: cannot read image ",
    ),
    Case(
        "evaluate 2D test image",
        8,
        "evaluate",
        lambda t: labelled(t, lambda t: image(held_out_image(t), np.ones((28, 26), np.float32)), model_file=model(t)),
        "has shape (28, 26): a 3D volume is required",
    ),
    Case(
        "evaluate missing model_file",
        7,
        "evaluate",
        lambda t: labelled(t, model_file=t / "nowhere.pt"),
        "nowhere.pt does not exist: give the path of an existing weight file",
    ),
    Case(
        "evaluate num_classes that contradicts model_file",
        7,
        "evaluate",
        lambda t: labelled(t, model_file=model(t), num_classes=3),
        "--num_classes 3 contradicts model_file ",
    ),
    Case(
        "evaluate backbone as model_file",
        7,
        "evaluate",
        lambda t: labelled(t, model_file=backbone(t)),
        "backbone.pt is a pretrained backbone, not a trained segmentation model: pass it as --pretrained_ckpt",
    ),
    Case(
        "evaluate model of another architecture",
        7,
        "evaluate",
        lambda t: labelled(t, model_file=model(t, base_channels=8)),
        "--base_channels 4 contradicts model_file ",
    ),
    Case(
        "evaluate output_dir cannot be written",
        7,
        "evaluate",
        lambda t: unwritable(t, labelled(t, model_file=model(t))),
        "/file/out/evaluation' cannot be written (Not a directory)",
    ),
    # -- 8, 5: inference segments every readable file and reports the others at the end
    Case(
        "inference truncated and 2D inputs among readable ones",
        8,
        "inference",
        lambda t: images(
            t,
            lambda d: (truncate(image(d / "cut.nii.gz", body())), image(d / "flat.nii.gz", body((28, 26)))),
            output_dir=t / "out",
        ),
        "2 input file(s) were not segmented; fix or remove them and run again: cannot read image ",
        CLI,
        readable_ones_segmented,
    ),
    Case(
        "inference 4D input before the readable ones",
        3,
        "inference",
        lambda t: images(
            t, lambda d: image(d / "0_series.nii.gz", np.stack([body((28, 26, 14))] * 3, -1)), output_dir=t / "out"
        ),
        "1 input file(s) were not segmented; fix or remove them and run again: image ",
        after=readable_ones_segmented,
    ),
    Case(
        "inference output_dir cannot be written",
        7,
        "inference",
        lambda t: unwritable(t, images(t)),
        "/file/out' cannot be written (Not a directory)",
    ),
    Case(
        "inference dataset_dir that does not exist",
        8,
        "inference",
        lambda t: {"dataset_dir": t / "nowhere", "model_file": model(t)},
        "nowhere does not exist: give a datalist JSON or a NIfTI folder.",
    ),
    Case(
        "inference backbone as model_file",
        7,
        "inference",
        lambda t: images(t, model_file=backbone(t)),
        "backbone.pt is a pretrained backbone, not a trained segmentation model",
    ),
    # -- 15: a model is evaluated with its own preprocessing and test split; one downstream run per folder
    Case(
        "evaluate model_file that does not record its preprocessing",
        15,
        "evaluate",
        lambda t: labelled(t, model_file=model(t), modality=None),
        "does not record its modality (tensor shapes), and a default could differ from what it was trained with: "
        "give --modality as in its training",
    ),
    Case(
        "evaluate on another fold than the model's training",
        15,
        "evaluate",
        lambda t: labelled(t, model_file=model_of_fold(t, fold=1)),
        "was trained with another test split than this evaluation's (fold 1 there and 0 here): its test cases would "
        "include cases it trained on",
    ),
    Case(
        "train output_dir in use by another run",
        15,
        "train",
        lambda t: locked(t, labelled),
        "is in use by another run (PID 4242; lock file",
        after=nothing_trained,
    ),
    Case(
        "evaluate while another run holds output_dir",
        15,
        "evaluate",
        lambda t: locked(t, lambda t: labelled(t, model_file=model(t))),
        "is in use by another run (PID 4242; lock file",
    ),
    Case(
        "inference num_classes that contradicts model_file",
        7,
        "inference",
        lambda t: images(t, num_classes=3),
        "--num_classes 3 contradicts model_file ",
    ),
    Case(
        "inference missing model_file",
        7,
        "inference",
        lambda t: images(t, model_file=t / "nowhere.pt"),
        "nowhere.pt does not exist: give a trained model with --model_file",
    ),
    Case(
        "inference folder of its own masks only",
        5,
        "inference",
        lambda t: {"dataset_dir": image(t / "images/a_seg.nii.gz", body()).parent, "model_file": model(t)},
        "are masks this bundle writes (*_seg.nii[.gz] or under output_dir ",
    ),
]

# Cases of the battery whose test needs more than one failed run's message: (case, issue 10 item, test).
COVERED_ELSEWHERE = [
    (
        "killed while a checkpoint is written: the previous one is kept, the rerun resumes",
        1,
        "test_runs.py::test_a_kill_while_a_checkpoint_is_written_keeps_the_previous_one",
    ),
    (
        "newest checkpoint corrupt: named, renamed *.corrupt, the next older one resumed",
        1,
        "test_runs.py::test_checkpoints_restore_random_states_and_fall_back_past_a_corrupt_one",
    ),
    (
        "a run with other keys in output_dir: each differing key named",
        7,
        "test_runs.py::test_a_run_with_other_keys_is_refused_naming_them",
    ),
    (
        "replaced scan at the same path: preprocessed again, old entry removed",
        2,
        "test_cache.py::test_cache_is_shared_and_a_replaced_scan_is_preprocessed_again",
    ),
    (
        "constant volume (ct) and one without body: skipped with a warning naming it",
        4,
        "test_cache.py::test_empty_and_constant_volumes_are_skipped_with_a_warning",
    ),
    (
        "100 mm slices (resampling grows >8x): a warning naming the file",
        10,
        "test_cache.py::test_suspicious_resampling_is_warned_about_by_name",
    ),
    (
        "several bad pretraining files: all named in one error, with or without workers",
        8,
        "test_cache.py::test_every_bad_file_is_named_at_once",
    ),
    (
        "inference twice into its own input folder: its masks are left out",
        5,
        "test_inference.py::test_a_second_run_into_the_input_folder_does_not_segment_its_own_masks",
    ),
    (
        "--key None on the command line: refused instead of silently dropped",
        7,
        "test_ablations.py::test_none_on_the_command_line_is_refused_not_dropped",
    ),
    (
        "a BundleError ends stderr as one line; other errors keep their traceback",
        6,
        "test_errors.py::test_bundle_error_is_the_last_line",
    ),
]


def keys_for(workflow: str, tmp: Path, row_keys: dict) -> dict:
    """The tiny keys, this folder's outputs and cache (bundle_root too: nothing lands in the repository), the row's."""
    paths = {"bundle_root": tmp, "output_dir": tmp / "out", "cache_dir": tmp / "cache"}
    return {**TINY[workflow], **paths, **row_keys}


def run_in_process(workflow: str, tmp: Path, row_keys: dict) -> str | None:
    """Runs the workflow as ``monai.bundle run`` does; returns the line ``error: ...`` it would end with, or None."""
    configs, run_id = WORKFLOWS[workflow]
    keys = {k: str(v) if isinstance(v, Path) else v for k, v in keys_for(workflow, tmp, row_keys).items()}
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # MONAI's notes on trusted configs, volume warnings: not under test here
            workflow_ = create_workflow(
                config_file=[str(ROOT / c) for c in configs], logging_file=False, run_id=run_id, **keys
            )
            workflow_.run()
            workflow_.finalize()
    except Exception as error:
        cause = find_bundle_error(error)
        if cause is None:
            raise  # not a message a user can act on: the row fails with the traceback
        return f"error: {cause}"
    return None


def run_cli(workflow: str, tmp: Path, row_keys: dict) -> str | None:
    """Runs ``python -m monai.bundle run`` and returns stderr from its last line starting with ``error: ``."""
    configs, run_id = WORKFLOWS[workflow]
    config = configs[0] if len(configs) == 1 else json.dumps(configs, separators=(",", ":"))
    keys = {
        k: json.dumps(v, separators=(",", ":")) if isinstance(v, list) else v
        for k, v in keys_for(workflow, tmp, row_keys).items()
    }
    result = monai_bundle_run(run_id, config, keys)
    return None if result.returncode == 0 else last_error(result.stderr)  # a message may span lines (one per file)


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=[pytest.mark.slow] * c.cli) for c in CASES])
def test_fault_ends_the_run_with_a_message_that_says_what_to_fix(case, tmp_path):
    keys = case.make(tmp_path)
    error = (run_cli if case.cli else run_in_process)(case.workflow, tmp_path, keys)
    assert error is not None, "the run did not stop"
    assert case.expected in error, error
    if case.after is not None:
        case.after(tmp_path)


@pytest.mark.parametrize("case, item, test", COVERED_ELSEWHERE, ids=[c[0] for c in COVERED_ELSEWHERE])
def test_cases_covered_elsewhere_name_existing_tests(case, item, test):
    module, name = test.split("::")
    assert callable(getattr(importlib.import_module(module.removesuffix(".py")), name, None)), test
