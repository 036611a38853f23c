import json
import os
import re
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.data.splits import check_labels, datalist_digest, labelled_datalist, split_cases
from scripts.utils.errors import BundleError

AFFINE = np.diag([2.0, 2.0, 3.0, 1.0])
SHAPE = (4, 5, 3)


def _save(path: Path, array: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    array = np.zeros(SHAPE, np.uint8) if array is None else array
    nib.save(nib.Nifti1Image(array, affine), path)
    return str(path)


def _msd_folder(root: Path, names: list[str], images: str = "imagesTr", labels: str = "labelsTr") -> None:
    for name in names:
        _save(root / images / name, np.ones(SHAPE, np.float32))
        _save(root / labels / name)


def _cases(n: int) -> list[dict]:
    """Datalist items that split_cases never opens."""
    return [{"image": f"/data/img_{i:02d}.nii.gz", "label": f"/data/lab_{i:02d}.nii.gz"} for i in range(n)]


def _images(items: list[dict]) -> set[str]:
    return {item["image"] for item in items}


# labelled_datalist


def test_labelled_datalist_json(tmp_path):
    _msd_folder(tmp_path, [f"c{i}.nii.gz" for i in range(4)])
    item = lambda i: {"image": f"./imagesTr/c{i}.nii.gz", "label": f"labelsTr/c{i}.nii.gz"}  # noqa: E731
    (tmp_path / "train_only.json").write_text(json.dumps({"training": [item(0), item(1)]}))
    result = labelled_datalist(tmp_path / "train_only.json")
    assert result["validation"] == result["test"] == []
    assert result["training"][1] == {
        "image": str(tmp_path / "imagesTr" / "c1.nii.gz"),
        "label": str(tmp_path / "labelsTr" / "c1.nii.gz"),
    }

    content = {"training": [item(0), item(1)], "validation": [item(2)], "test": [item(3)]}
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    for source in (tmp_path / "dataset.json", tmp_path):  # the JSON, or the folder holding it
        result = labelled_datalist(str(source))
        assert [len(result[k]) for k in ("training", "validation", "test")] == [2, 1, 1]
        assert result["test"][0]["label"] == str(tmp_path / "labelsTr" / "c3.nii.gz")

    # MSD's own dataset.json lists its test images as plain, unlabelled paths: skipped, not an error.
    content["test"] = ["./imagesTr/c3.nii.gz"]
    (tmp_path / "dataset.json").write_text(json.dumps(content))
    with pytest.warns(UserWarning, match="unlabelled 'test'"):
        assert labelled_datalist(tmp_path)["test"] == []


def test_labelled_datalist_msd_folder(tmp_path):
    _msd_folder(tmp_path, ["b.nii.gz", "a.nii.gz"])
    _msd_folder(tmp_path, ["t.nii"], "imagesTs", "labelsTs")
    (tmp_path / "imagesTr" / "._a.nii.gz").write_bytes(b"macOS resource fork")  # shipped in MSD archives
    result = labelled_datalist(tmp_path)
    assert result["training"] == [
        {"image": str(tmp_path / "imagesTr" / n), "label": str(tmp_path / "labelsTr" / n)}
        for n in ("a.nii.gz", "b.nii.gz")
    ]
    assert result["validation"] == []
    assert result["test"] == [
        {"image": str(tmp_path / "imagesTs" / "t.nii"), "label": str(tmp_path / "labelsTs" / "t.nii")}
    ]


def test_labelled_datalist_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        labelled_datalist(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="neither a dataset.json nor imagesTr"):
        labelled_datalist(tmp_path)

    _msd_folder(tmp_path, ["a.nii.gz"])
    _save(tmp_path / "imagesTr" / "b.nii.gz")
    with pytest.raises(FileNotFoundError) as error:
        labelled_datalist(tmp_path)
    assert str(tmp_path / "imagesTr" / "b.nii.gz") in str(error.value)
    assert str(tmp_path / "labelsTr" / "b.nii.gz") in str(error.value)

    (tmp_path / "imagesTr" / "b.nii.gz").unlink()
    _save(tmp_path / "imagesTs" / "t.nii.gz")
    with pytest.warns(UserWarning, match="no labelsTs"):
        assert labelled_datalist(tmp_path)["test"] == []

    image, label = str(tmp_path / "imagesTr" / "a.nii.gz"), str(tmp_path / "labelsTr" / "a.nii.gz")
    for content, message in [
        ({"training": [{"image": image}]}, "'training'.*no 'label'"),
        ({"training": [{"image": image, "label": label}], "test": [{"image": image}]}, "'test'.*no 'label'"),
        ({"training": [{"image": image, "label": label}], "validation": [{"image": image, "label": label}]}, "once"),
        ({"training": []}, "no non-empty list under the key 'training'"),
    ]:
        (tmp_path / "list.json").write_text(json.dumps(content))
        with pytest.raises(ValueError, match=message) as error:
            labelled_datalist(tmp_path / "list.json")
        assert str(tmp_path / "list.json") in str(error.value)


# split_cases


@pytest.mark.parametrize("n, num_folds", [(12, 3), (10, 4)])
def test_split_cases_folds_partition_without_leakage(n, num_folds):
    cases = _cases(n)
    for seed in (0, 1):
        tested = []
        for fold in range(num_folds):
            previous = set()
            for budget in (2, 3, 5, None):
                split = split_cases({"training": cases}, budget, fold, num_folds, num_val_cases=1, seed=seed)
                train, val, test = (_images(split[k]) for k in ("training", "validation", "test"))
                assert not (train & test or val & test or train & val)
                assert len(val) == 1 and len(train) + len(val) == (budget or n - len(test))
                assert train | val | test <= _images(cases)
                assert previous <= train  # nested budgets
                previous = train
            assert len(test) in (n // num_folds, -(-n // num_folds))  # near-equal folds
            tested += split["test"]
        assert sorted(i["image"] for i in tested) == sorted(_images(cases))  # each case tested exactly once


def test_split_cases_is_deterministic():
    cases = {"training": _cases(12)}
    assert split_cases(cases, 2, 1, seed=3) == split_cases(cases, 2, 1, seed=3)
    assert split_cases(cases, 2, 1, seed=3) != split_cases(cases, 2, 1, seed=4)
    assert split_cases(cases, 0) == split_cases(cases, None)  # 0 and None both mean all


def test_a_budget_counts_every_labelled_case_validation_included():
    cases = {"training": _cases(12)}
    for budget in (1, 2, 4):
        split = split_cases(cases, budget, num_val_cases=0)
        assert len(split["training"]) == budget and split["validation"] == []
    for budget in (2, 4):
        split = split_cases(cases, budget, num_val_cases=1)
        assert len(split["training"]) + len(split["validation"]) == budget
    # Validation cases come first in the pool: every budget of a fold validates on the same case.
    assert split_cases(cases, 2)["validation"] == split_cases(cases, 4)["validation"]
    with pytest.raises(BundleError, match="num_train_cases=1 labelled cases leave none for training.*num_val_cases"):
        split_cases(cases, 1, num_val_cases=1)
    # The datalist's own validation list is used as given, outside the budget; num_val_cases=0 switches it off.
    extra = _cases(14)[12:]
    assert split_cases({**cases, "validation": extra}, 2)["validation"] == extra
    assert split_cases({**cases, "validation": extra}, 2, num_val_cases=0)["validation"] == []


def test_with_a_test_list_each_fold_draws_its_budgets_from_another_part_of_training():
    cases = _cases(9)
    datalist = {"training": cases[:6], "test": cases[6:]}
    splits = [split_cases(datalist, 2, fold, num_folds=3, num_val_cases=0, seed=5) for fold in range(3)]
    assert all(split["test"] == cases[6:] for split in splits)
    pools = [_images(split["training"]) for split in splits]
    assert pools[0] | pools[1] | pools[2] == _images(cases[:6])  # 3 disjoint pairs: every case trains in one fold
    # Nested within a fold.
    assert _images(split_cases(datalist, 1, 2, num_val_cases=0, seed=5)["training"]) <= pools[2]
    with pytest.raises(BundleError, match="too few for num_folds=7"):
        split_cases(datalist, 1, 1, num_folds=7)


def test_split_cases_user_lists():
    cases = _cases(9)
    datalist = {"training": cases[:6], "validation": cases[6:7], "test": cases[7:]}
    for fold in range(3):
        split = split_cases(datalist, 4, fold, num_val_cases=3, seed=fold)
        assert split["test"] == cases[7:] and split["validation"] == cases[6:7]
        assert len(split["training"]) == 4 and _images(split["training"]) <= _images(cases[:6])
    split = split_cases({"training": cases[:6], "test": cases[7:]}, num_val_cases=2)
    assert split["test"] == cases[7:] and len(split["validation"]) == 2 and len(split["training"]) == 4
    assert not _images(split["validation"]) & _images(split["training"])

    overlapping = {"training": cases[:6], "test": [dict(cases[5])]}
    with pytest.raises(ValueError, match=re.escape(cases[5]["image"])):
        split_cases(overlapping)
    with pytest.raises(ValueError, match="more than once"):
        split_cases({"training": cases[:3] + cases[:1]})


def test_split_cases_errors():
    cases = {"training": _cases(12)}
    with pytest.raises(BundleError, match=re.escape("fold=3 is not in [0, num_folds=3)")):
        split_cases(cases, fold=3)
    with pytest.raises(BundleError, match="fold=-1"):
        split_cases(cases, fold=-1)
    # 12 cases, 3 folds: 4 test, 8 left for the budget.
    with pytest.raises(BundleError, match="num_train_cases=9 but only 8 cases are available"):
        split_cases(cases, 9)
    with pytest.raises(BundleError, match="too few for num_folds=5"):
        split_cases({"training": _cases(4)}, num_folds=5)
    with pytest.raises(BundleError, match="num_val_cases=9"):
        split_cases(cases, num_val_cases=9)


# check_labels


def _pair(tmp_path: Path, name: str, label: np.ndarray | None = None, affine: np.ndarray = AFFINE) -> dict:
    return {
        "image": _save(tmp_path / f"{name}_img.nii.gz", np.ones(SHAPE, np.float32)),
        "label": _save(tmp_path / f"{name}_lab.nii.gz", label, affine),
    }


def test_check_labels(tmp_path):
    valid = np.arange(np.prod(SHAPE)).reshape(SHAPE) % 4
    check_labels([_pair(tmp_path, "ok", valid.astype(np.uint8)), _pair(tmp_path, "float", valid.astype(np.float32))], 3)

    shifted = AFFINE.copy()
    shifted[0, 3] = 0.01
    tiny = AFFINE + 1e-5  # float32 header round-off stays within the tolerance
    check_labels([_pair(tmp_path, "tiny", affine=tiny)], 3)

    bad = {
        "shape": _pair(tmp_path, "shape", np.zeros((4, 5, 2), np.uint8)),
        "affine": _pair(tmp_path, "affine", affine=shifted),
        "classes": _pair(tmp_path, "classes", valid.astype(np.int16) + 2),
        "fraction": _pair(tmp_path, "fraction", np.full(SHAPE, 0.5, np.float32)),
    }
    for kind, item in bad.items():
        with pytest.raises(BundleError) as error:
            check_labels([item], 3)
        message = str(error.value)
        assert item["label"] in message
        if kind in ("shape", "affine"):
            assert item["image"] in message and f"different {kind}s" in message
        else:
            assert "`num_classes`=3" in message
    with pytest.raises(BundleError, match=r"2 unexpected value\(s\) \[4, 5\]"):
        check_labels([bad["classes"]], 3)
    with pytest.raises(BundleError, match=r"\[0.5\]"):
        check_labels([bad["fraction"]], 3)

    # All problems of all items in one error.
    with pytest.raises(BundleError, match="^4 label problem") as error:
        check_labels([_pair(tmp_path, "ok", valid.astype(np.uint8)), *bad.values()], 3)
    assert all(item["label"] in str(error.value) for item in bad.values())


def test_check_labels_reads_every_file_in_full_and_needs_3d_volumes_and_some_foreground(tmp_path):
    valid = (np.arange(np.prod(SHAPE)).reshape(SHAPE) % 4).astype(np.uint8)
    truncated = _pair(tmp_path, "truncated", valid)
    data = Path(truncated["image"]).read_bytes()
    Path(truncated["image"]).write_bytes(data[: len(data) // 2])  # the header reads; the data do not
    flat = {"image": _save(tmp_path / "flat_img.nii.gz", np.ones((4, 5), np.float32)), "label": truncated["label"]}
    with pytest.raises(BundleError) as error:
        check_labels([truncated, flat], 3)
    message = str(error.value)
    assert f"cannot read image {truncated['image']}" in message
    assert f"image {flat['image']} has shape (4, 5): a 3D volume is required" in message

    empty = [_pair(tmp_path, f"empty{i}") for i in range(2)]
    check_labels(empty, 3)  # all-background test or validation labels are legal
    with pytest.raises(BundleError, match="all background") as error:
        check_labels(empty, 3, require_foreground=True)
    assert all(item["label"] in str(error.value) for item in empty)
    check_labels([*empty, _pair(tmp_path, "some", valid)], 3, require_foreground=True)


def test_datalist_digest_changes_when_a_label_is_replaced_and_only_then(tmp_path):
    _msd_folder(tmp_path, [f"c{i}.nii.gz" for i in range(4)])
    first = datalist_digest(labelled_datalist(tmp_path))
    assert datalist_digest(labelled_datalist(tmp_path)) == first, "the same files give the same digest"
    label = tmp_path / "labelsTr" / "c0.nii.gz"
    corrected = np.zeros(SHAPE, np.uint8)
    corrected[0, 0, 0] = 1
    _save(label, corrected)
    os.utime(label, ns=(0, 10**9))  # a distinct time, whatever the file system's resolution
    assert datalist_digest(labelled_datalist(tmp_path)) != first
