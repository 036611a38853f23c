"""Dataset converters on small replicas of each release's layout (real folder and file names, label ids and case
numbers; tiny synthetic volumes), the combined pretraining datalist, the per-organ table, and (slow) the recipe of
docs/reproduce.md at tiny sizes: pretraining on the combined datalist, a study on the converted BTCV replica."""

import csv
import json
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from bundle import HELP_LIMIT, ROOT, WORKFLOW_LIMIT, command_env, limit, run_command
from scripts.data.splits import labelled_datalist, split_cases
from scripts.tools import datasets
from scripts.utils.errors import BundleError

SMALL = (8, 8, 4)  # converter tests read headers at most
TRAINABLE = (24, 24, 12)  # at 2 x 2 x 4 mm: 48 x 48 x 24 voxels after the CT preset's 1 x 1 x 2 mm


def ct_case(shape, ids, seed=0):
    """A CT-like volume (air -1000 HU, a soft-tissue ellipsoid body) holding a small blob of each label id."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.85
    label = np.zeros(shape, np.uint8)
    inside = np.argwhere((grid**2).sum(0) < 0.4)
    step = max(1, len(inside) // max(1, len(ids)))
    for k, label_id in enumerate(ids):  # one voxel each, at distinct points inside the body
        label[tuple(inside[k * step])] = label_id
    label[~body] = 0
    image = np.where(body, 40 + 8.0 * label + 10 * rng.standard_normal(shape), -1000).astype(np.int16)
    return image, label


def save(path: Path, array: np.ndarray, spacing=(2.0, 2.0, 4.0)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, np.diag([*spacing, 1.0])), path)


def labelled_case(image_file: Path, label_file: Path, shape, ids, seed=0) -> None:
    image, label = ct_case(shape, ids, seed)
    save(image_file, image)
    save(label_file, label)


def btcv_replica(root: Path, shape=SMALL) -> Path:
    """Synapse syn3193805 Abdomen/RawData: Training/img/img0001.nii.gz ... (0001-0010, 0021-0040), Training/label,
    Testing/img (0061-0080, unlabelled); labels 1..13."""
    raw = root / "Abdomen/RawData"
    for n in sorted(datasets.BTCV_TRAINING):
        labelled_case(raw / f"Training/img/img{n:04d}.nii.gz", raw / f"Training/label/label{n:04d}.nii.gz", shape,
                      range(1, 14), n)  # fmt: skip
    for n in range(61, 81):
        save(raw / f"Testing/img/img{n:04d}.nii.gz", ct_case(SMALL, [], n)[0])
    return root


def flare_labelled_replica(root: Path) -> Path:
    """FLARE22 Training/FLARE22_LabeledCase50/images/FLARE22_Tr_0001_0000.nii.gz, labels/FLARE22_Tr_0001.nii.gz."""
    folder = root / "Training/FLARE22_LabeledCase50"
    for n in range(1, 51):
        labelled_case(folder / f"images/FLARE22_Tr_{n:04d}_0000.nii.gz", folder / f"labels/FLARE22_Tr_{n:04d}.nii.gz",
                      SMALL, range(1, 14), n)  # fmt: skip
    return root


def flare_unlabelled_replica(root: Path, cases=range(1, 2001), shape=SMALL) -> Path:
    """FLARE22 Training/FLARE22_UnlabeledCase1-1000/Case_00001_0000.nii.gz ... and ...1001-2000/."""
    template = root / "template.nii.gz"
    save(template, ct_case(shape, [])[0])
    data = template.read_bytes()
    template.unlink()
    for n in cases:
        folder = root / "Training" / ("FLARE22_UnlabeledCase1-1000" if n <= 1000 else "FLARE22_UnlabeledCase1001-2000")
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"Case_{n:05d}_0000.nii.gz").write_bytes(data)
    return root


# Case numbers of the replica (AMOS's: below 500 CT, 500 and above MRI; 10 labelled MRI cases make 5 folds of 2).
AMOS_CASES = {
    "training": [1, 4, 5, 6, 507, 508, 510, 512, 515, 517],
    "validation": [8, 13, 520, 522, 540, 541],
    "test": [2, 3, 550],
}


def amos_replica(root: Path, shape=SMALL) -> Path:
    """amos22/dataset.json with imagesTr/labelsTr, imagesVa/labelsVa and imagesTs (no labels); labels 0..15."""
    folder = root / "amos22"
    manifest = {"name": "AMOS", "labels": {"0": "background", **dict(enumerate(datasets.AMOS_LABELS, 1))}}
    manifest = json.loads(json.dumps(manifest))  # keys as strings, as in the release's JSON
    for key, (images, labels) in datasets.AMOS_FOLDERS.items():
        manifest[key] = []
        for n in AMOS_CASES[key]:
            entry = {"image": f"./{images}/amos_{n:04d}.nii.gz"}
            if labels:
                entry["label"] = f"./{labels}/amos_{n:04d}.nii.gz"
                labelled_case(folder / images / f"amos_{n:04d}.nii.gz", folder / labels / f"amos_{n:04d}.nii.gz",
                              shape, range(1, 16), n)  # fmt: skip
            else:
                save(folder / images / f"amos_{n:04d}.nii.gz", ct_case(shape, [], n)[0])
            manifest[key].append(entry)
    (folder / "dataset.json").write_text(json.dumps(manifest, indent=2))
    return root


@pytest.fixture(scope="module")
def replicas(tmp_path_factory):
    base = tmp_path_factory.mktemp("releases")
    return {
        "btcv": btcv_replica(base / "btcv"),
        "amos": amos_replica(base / "amos"),
        "flare": flare_unlabelled_replica(flare_labelled_replica(base / "FLARE22")),
    }


def test_btcv_is_the_30_labelled_training_cases_with_their_13_organs(replicas, tmp_path, capsys):
    out = tmp_path / "btcv.json"
    content = datasets.convert("btcv", replicas["btcv"], out)
    numbers = [int(Path(item["image"]).name[3:7]) for item in content["training"]]
    assert numbers == sorted(datasets.BTCV_TRAINING) and len(numbers) == 30
    assert content["num_classes"] == 13 and content["labels"]["10"] == "portal vein and splenic vein"
    raw = replicas["btcv"] / "Abdomen/RawData/Training"
    assert content["training"][0] == {
        "image": str(raw / "img/img0001.nii.gz"),
        "label": str(raw / "label/label0001.nii.gz"),
    }
    assert "test" not in content  # the 20 Testing images have no labels
    data = labelled_datalist(out)
    assert len(data["training"]) == 30
    # DHR: 3 folds of 10 test cases; vox2vec: 5 folds of 6
    assert [len(split_cases(data, None, f, 3, num_val_cases=0)["test"]) for f in range(3)] == [10, 10, 10]
    assert len(split_cases(data, None, 0, 5, num_val_cases=0)["training"]) == 24
    printed = capsys.readouterr().out
    assert "30 labelled" in printed and "20 unlabelled Testing images not listed" in printed
    assert "DHR protocol: --num_folds 3 (test/pool cases per fold: 10/20, 10/20, 10/20)" in printed


def test_amos_mri_keeps_the_images_and_remaps_only_the_labels(replicas, tmp_path):
    out = tmp_path / "amos_mri.json"
    content = datasets.convert("amos_mri", replicas["amos"], out)
    mri = sorted(n for key in ("training", "validation") for n in AMOS_CASES[key] if n >= 500)
    images = [Path(item["image"]) for item in content["training"]]
    assert [int(p.name[5:9]) for p in images] == mri and all(p.parent.parent.name == "amos22" for p in images)
    assert (
        content["num_classes"] == 12
        and content["label_map"] == "dhr"
        and content["labels"]["12"] == "left adrenal gland"
    )
    labels = [Path(item["label"]) for item in content["training"]]
    assert {p.parent for p in labels} == {tmp_path / "amos_mri_labels"}
    source = nib.load(replicas["amos"] / "amos22/labelsTr/amos_0507.nii.gz")
    remapped = nib.load(labels[0])
    values = np.asarray(source.dataobj)
    assert set(np.unique(values)) == set(range(16))
    expected = np.where(values > 12, 0, values)
    assert np.array_equal(np.asarray(remapped.dataobj), expected) and remapped.get_data_dtype() == np.uint8
    assert np.allclose(remapped.affine, source.affine) and remapped.shape == source.shape
    data = labelled_datalist(out)
    assert [len(split_cases(data, None, f, 5, num_val_cases=0)["test"]) for f in range(5)] == [2] * 5
    # converting again keeps the label files (and with them the datalist's digest: the study's finished cells)
    stamps = [p.stat().st_mtime_ns for p in labels]
    datasets.convert("amos_mri", replicas["amos"], out)
    assert [p.stat().st_mtime_ns for p in labels] == stamps

    merged = datasets.convert("amos_mri", replicas["amos"], tmp_path / "merged.json", labels="merged")
    assert (
        merged["num_classes"] == 10 and merged["labels"]["2"] == "kidney" and merged["labels"]["10"] == "adrenal gland"
    )
    data = np.asarray(nib.load(merged["training"][0]["label"]).dataobj)
    assert np.array_equal(data[values == 3], np.full((values == 3).sum(), 2))  # left kidney -> kidney
    assert np.array_equal(data[values == 12], np.full((values == 12).sum(), 10))  # left adrenal -> adrenal gland
    everything = datasets.convert("amos_mri", replicas["amos"], tmp_path / "all.json", labels="all")
    assert everything["num_classes"] == 15
    assert everything["training"][0]["label"] == str(replicas["amos"] / "amos22/labelsTr/amos_0507.nii.gz")


def test_amos_ct_lists_labelled_ct_for_training_and_unlabelled_ct_as_test(replicas, tmp_path):
    content = datasets.convert("amos_ct", replicas["amos"], tmp_path / "amos_ct.json")
    labelled = sorted(n for key in ("training", "validation") for n in AMOS_CASES[key] if n < 500)
    assert [int(Path(i["image"]).name[5:9]) for i in content["training"]] == labelled
    assert [Path(p).name for p in content["test"]] == ["amos_0002.nii.gz", "amos_0003.nii.gz"]
    assert content["num_classes"] == 15


def test_flare22_labelled_and_unlabelled(replicas, tmp_path):
    labelled = datasets.convert("flare22_labelled", replicas["flare"], tmp_path / "l.json")
    assert (
        len(labelled["training"]) == 50 and labelled["num_classes"] == 13 and labelled["labels"]["13"] == "left kidney"
    )
    unlabelled = datasets.convert("flare22_unlabelled", replicas["flare"], tmp_path / "u.json")
    assert len(unlabelled["training"]) == 2000 and "labels" not in unlabelled
    assert all(set(item) == {"image"} for item in unlabelled["training"])
    assert Path(unlabelled["training"][1000]["image"]).parent.name == "FLARE22_UnlabeledCase1001-2000"


def test_combine_joins_images_only_and_names_duplicates_and_missing_files(replicas, tmp_path):
    flare = tmp_path / "flare.json"
    amos = tmp_path / "amos_ct.json"
    datasets.convert("flare22_unlabelled", replicas["flare"], flare)
    datasets.convert("amos_ct", replicas["amos"], amos)
    combined = datasets.combine([flare, amos], tmp_path / "all.json")
    ct = sum(n < 500 for key in AMOS_CASES for n in AMOS_CASES[key])
    assert combined["numTraining"] == 2000 + ct == len(combined["training"])
    assert all(set(item) == {"image"} for item in combined["training"])
    with pytest.raises(BundleError, match="twice") as error:
        datasets.combine([amos, amos], tmp_path / "twice.json")
    assert "amos_0001.nii.gz twice" in str(error.value) and not (tmp_path / "twice.json").exists()
    broken = json.loads(amos.read_text())
    broken["training"][0]["image"] = "gone.nii.gz"
    (tmp_path / "broken.json").write_text(json.dumps(broken))
    with pytest.raises(BundleError, match=r"gone.nii.gz listed in .*broken.json \('training'\) does not exist"):
        datasets.combine([tmp_path / "broken.json", tmp_path / "nothing.json"], tmp_path / "x.json")


def test_a_folder_that_is_not_the_dataset_says_what_was_expected_and_found(replicas, tmp_path):
    with pytest.raises(BundleError) as error:
        datasets.convert("btcv", replicas["amos"], tmp_path / "x.json")
    message = str(error.value)
    assert "is not the BTCV release: expected RawData/Training/img/img0001.nii.gz" in message
    assert f"found in {replicas['amos']}: amos22/" in message
    with pytest.raises(BundleError, match="not the AMOS22 release: expected amos22/dataset.json"):
        datasets.convert("amos_mri", replicas["btcv"], tmp_path / "x.json")
    with pytest.raises(BundleError, match="not the FLARE22 unlabelled release"):
        datasets.convert("flare22_unlabelled", replicas["btcv"], tmp_path / "x.json")
    assert not (tmp_path / "x.json").exists()


def test_every_problem_of_a_release_is_listed_at_once_before_anything_is_written(tmp_path):
    root = btcv_replica(tmp_path / "btcv")
    training = root / "Abdomen/RawData/Training"
    (training / "label/label0003.nii.gz").unlink()  # images without their labels: 29 images, 28 labels
    (training / "label/label0005.nii.gz").unlink()
    (training / "img/img0004.nii.gz").unlink()  # a label without its image
    for kind in ("img", "label"):  # a case the release does not have, and a case missing altogether
        (training / f"{kind}/{kind}0007.nii.gz").rename(training / f"{kind}/{kind}0015.nii.gz")
    (training / "img/img0001.nii").write_bytes(b"")  # case 0001 twice
    (training / "img/scan.nii.gz").write_bytes(b"")  # not named as BTCV names its files
    with pytest.raises(BundleError) as error:
        datasets.convert("btcv", root, tmp_path / "out.json")
    message = str(error.value)
    for part in (
        "8 problem(s), nothing written",
        "29 images but 28 labels",
        "case 0001 twice among the image files",
        "unexpected image file",
        "scan.nii.gz",
        "image " + str(training / "img/img0003.nii.gz") + " has no label",
        "label " + str(training / "label/label0004.nii.gz") + " has no image",
        "case number 0015 is not one of the release's",
        "missing 1 case(s) 0007 (a partial download? --partial accepts it)",
    ):
        assert part in message, (part, message)
    assert not (tmp_path / "out.json").exists()


def test_flare22_unlabelled_case_in_the_wrong_folder_and_a_partial_download(tmp_path):
    root = flare_unlabelled_replica(tmp_path / "flare", cases=[1, 2, 1001])
    misplaced = root / "Training/FLARE22_UnlabeledCase1-1000/Case_01500_0000.nii.gz"
    misplaced.write_bytes((root / "Training/FLARE22_UnlabeledCase1-1000/Case_00001_0000.nii.gz").read_bytes())
    with pytest.raises(BundleError) as error:
        datasets.convert("flare22_unlabelled", root, tmp_path / "u.json")
    assert "case number 01500 in FLARE22_UnlabeledCase1-1000 (which holds 1-1000)" in str(error.value)
    assert "missing 1997 case(s) 00003-01000, 01002-02000" in str(error.value)
    misplaced.unlink()
    with pytest.warns(UserWarning, match="missing 1997 case"):
        content = datasets.convert("flare22_unlabelled", root, tmp_path / "u.json", partial=True)
    assert len(content["training"]) == 3


def test_amos_files_are_checked_against_its_dataset_json(tmp_path):
    root = amos_replica(tmp_path / "amos")
    folder = root / "amos22"
    (folder / "imagesTr/amos_0510.nii.gz").unlink()  # a label without its image
    (folder / "imagesVa/amos_0520.nii.gz").rename(folder / "imagesTr/amos_0520.nii.gz")  # in the wrong folder
    (folder / "labelsVa/amos_0599.nii.gz").write_bytes(b"")  # not a case of dataset.json
    for kind in ("imagesTr", "labelsTr"):
        (folder / kind / "amos_0517.nii.gz").unlink()  # listed, missing
    with pytest.raises(BundleError) as error:
        datasets.convert("amos_mri", root, tmp_path / "amos.json")
    message = str(error.value)
    for part in (
        "amos_0510.nii.gz has no image",
        "imagesTr/amos_0520.nii.gz is in imagesTr/ but dataset.json lists it under 'validation'",
        "amos_0599.nii.gz is not listed in dataset.json",
        "missing 1 MRI case(s) listed in dataset.json: 0517",
    ):
        assert part in message, (part, message)
    # the CT cases are intact: the CT datalist is written
    assert len(datasets.convert("amos_ct", root, tmp_path / "ct.json")["training"]) == 6


def test_a_label_value_outside_the_release_stops_the_remapping_with_nothing_written(tmp_path):
    root = amos_replica(tmp_path / "amos")
    label = root / "amos22/labelsTr/amos_0508.nii.gz"
    save(label, np.full(SMALL, 16, np.uint8))
    with pytest.raises(BundleError, match=r"amos_0508.nii.gz holds the values 16: expected the release's 0..15"):
        datasets.convert("amos_mri", root, tmp_path / "amos.json")
    assert not list((tmp_path / "amos_labels").glob("*.nii.gz")) and not (tmp_path / "amos.json").exists()


def fake_study(root: Path, datalist: Path) -> None:
    """A finished study folder: results.csv and each cell's args.json and evaluation/summary.json."""
    rows = []
    for init in ("scratch", "dhr"):
        for fold in range(2):
            cell = root / init / "finetune" / f"n4_f{fold}_abcd1234"
            (cell / "evaluation").mkdir(parents=True)
            args = {"init": init, "args": ["--dataset_dir", str(datalist), "--epochs", "2"]}
            (cell / "args.json").write_text(json.dumps(args))
            dice = {str(c): 0.1 * fold + c / 100 + (0.2 if init == "dhr" else 0) for c in range(1, 13)}
            summary = {"mean_dice": sum(dice.values()) / 12, "dice_per_class": dice}
            (cell / "evaluation/summary.json").write_text(json.dumps(summary))
            rows.append({"init": init, "preset": "mri", "mode": "finetune", "budget": 4, "fold": fold} | summary)
    with open(root / "results.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, ["init", "preset", "mode", "budget", "fold", "mean_dice"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def test_table_averages_right_and_left_as_the_dhr_authors_tabulate_amos(replicas, tmp_path):
    datalist = tmp_path / "amos_mri.json"
    datasets.convert("amos_mri", replicas["amos"], datalist)
    fake_study(tmp_path / "study", datalist)
    columns, rows = datasets.organ_table(tmp_path / "study", merge_left_right=True)
    organs = columns[columns.index("mean_dice") + 1 :]
    assert organs == ["spleen", "kidney", *datasets.AMOS_LABELS[3:10], "adrenal gland"]  # 10 columns
    dhr = next(r for r in rows if r["init"] == "dhr")
    assert dhr["folds"] == 2 and dhr["kidney"] == "0.275 ± 0.071"  # folds 0.225 and 0.325 (mean of 0.02 and 0.03)
    assert (tmp_path / "study/organ_table.csv").is_file()
    columns, _ = datasets.organ_table(tmp_path / "study")
    assert len(columns) - columns.index("mean_dice") - 1 == 12


def test_the_command_refuses_a_folder_of_another_release_naming_it(tmp_path):
    with pytest.raises(BundleError, match=f"{tmp_path} is not the FLARE22 labelled release: expected"):
        datasets.main(["flare22_labelled", str(tmp_path)])


@pytest.mark.slow
def test_the_command_line_ends_with_one_error_line_naming_the_folder(tmp_path):
    cmd = [sys.executable, "-m", "scripts.tools.datasets", "flare22_labelled", str(tmp_path)]
    result = run_command(cmd, timeout=HELP_LIMIT, env=command_env())
    assert result.returncode != 0
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {tmp_path} is not the FLARE22 labelled release: expected"), result.stderr


@pytest.mark.slow
def test_the_recipe_on_replicas_pretrains_on_the_combined_datalist_and_studies_btcv(tmp_path):
    """docs/reproduce.md at tiny sizes: convert, combine, pretrain (DHR), study on BTCV (3 folds), table."""
    start = time.monotonic()
    btcv_replica(tmp_path / "btcv", TRAINABLE)
    amos_replica(tmp_path / "amos", TRAINABLE)
    flare_unlabelled_replica(tmp_path / "flare", cases=[1, 2, 1001], shape=TRAINABLE)
    lists = tmp_path / "datalists"
    env = command_env()

    def run(*args: str) -> str:
        result = run_command([sys.executable, *args], timeout=WORKFLOW_LIMIT, env=env)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    tool = ("-m", "scripts.tools.datasets")
    run(*tool, "btcv", str(tmp_path / "btcv"), "--output", str(lists / "btcv.json"))
    run(*tool, "amos_ct", str(tmp_path / "amos"), "--output", str(lists / "amos_ct.json"))
    run(*tool, "flare22_unlabelled", str(tmp_path / "flare"), "--partial", "--output", str(lists / "flare.json"))
    run(*tool, "combine", str(lists / "flare.json"), str(lists / "amos_ct.json"), "--output", str(lists / "ct.json"))
    tiny = ["--patch_size", "[16,16,8]", "--base_channels", "4", "--num_scales", "3", "--num_workers", "0"]
    tiny += ["--progress", "False"]
    run("-m", "monai.bundle", "run", "pretrain", "--config_file", "configs/pretrain.yaml",
        "--dataset_dir", str(lists / "ct.json"), "--modality", "ct", "--output_dir", str(tmp_path / "pretrain"),
        "--cache_dir", str(tmp_path / "cache"), "--pairs_per_volume", "2", "--voxels_per_pair", "32",
        "--epochs", "1", "--epoch_length", "2", "--bundle_root", str(tmp_path), *tiny)  # fmt: skip
    backbone = tmp_path / "pretrain/pretrained_backbone.pt"
    assert json.loads(backbone.with_suffix(".json").read_text())["modality"] == "ct"
    # As docs/reproduce.md runs a study on several GPUs: one process per fold into the same folder (cells are
    # separate folders), then the whole study again, which finds every cell finished and writes the table and plot.
    study = ["-m", "scripts.tools.study", "--pretrained", str(backbone), "--budgets", "1", "--modes", "finetune"]
    study += ["--warmup_epochs", "0", "--output_dir", str(tmp_path / "study")]
    runs = ["--", "--dataset_dir", str(lists / "btcv.json"), "--num_classes", "13", "--epochs", "1"]
    runs += ["--epoch_length", "2", "--volumes_per_batch", "2", "--num_workers", "0", "--progress", "False"]
    runs += ["--bundle_root", str(tmp_path)]
    logs = [open(tmp_path / f"fold{fold}.log", "w") for fold in (0, 1)]  # noqa: SIM115
    folds = [
        subprocess.Popen(
            [sys.executable, *study, "--folds", str(fold), *runs],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        for fold, log in zip((0, 1), logs, strict=True)
    ]
    for process, log in zip(folds, logs, strict=True):
        try:
            returncode = process.wait(timeout=limit(WORKFLOW_LIMIT))
        except subprocess.TimeoutExpired:
            for other in folds:
                other.kill()
            pytest.fail(f"timed out: a fold's study after {limit(WORKFLOW_LIMIT):.0f} s: {process.args}", pytrace=False)
        assert returncode == 0, Path(log.name).read_text()[-3000:]
        log.close()
    assembled = run(*study, "--folds", "0", "1", *runs)
    assert "4 cells in" in assembled and "4 finished already" in assembled, assembled
    with open(tmp_path / "study/results.csv") as f:
        rows = list(csv.DictReader(f))
    assert {(r["init"], r["mode"], r["budget"], r["fold"]) for r in rows} == {
        (init, "finetune", "1", fold) for init in ("scratch", "pretrained_backbone") for fold in ("0", "1")
    }
    assert all(0 <= float(r["mean_dice"]) <= 1 and r["num_cases"] == "10" for r in rows)  # 3 folds: 10 test cases
    assert (tmp_path / "study/label_efficiency.png").is_file()
    printed = run(*tool, "table", str(tmp_path / "study"))
    assert "portal vein and splenic vein" in printed
    print(f"recipe on the replicas: {time.monotonic() - start:.0f} s")
