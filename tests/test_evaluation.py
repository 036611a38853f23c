"""Test-set evaluation (configs/evaluate.yaml on top of train.yaml): metrics on the original grid, files, MLflow."""

import csv
import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import ROOT, run_workflow
from monai.bundle import ConfigParser
from monai.data import MetaTensor
from monai.inferers import SlidingWindowInferer
from scripts.data.splits import labelled_datalist, split_cases
from scripts.engine.evaluation import EvaluationSummary, HausdorffDistanceMM
from scripts.engine.validation import sw_batch_size, windows_that_fit
from scripts.networks.fpn3d import FPN3d
from scripts.networks.segmentation import segmentation_network
from scripts.utils.errors import BundleError

CONFIGS = ["configs/train.yaml", "configs/evaluate.yaml"]
TINY = {"patch_size": [16, 16, 8], "base_channels": 4, "num_scales": 3, "num_classes": 2, "num_workers": 0}
SHAPE = (28, 26, 14)
# Flipped x and y (not RAS) at the MRI preset's 1.5 mm: preprocessing reorients, so the prediction must be flipped
# back, but it does not resample, so hand counts of voxels stay exact.
AFFINE = np.array([[-1.5, 0, 0, 20.0], [0, -1.5, 0, 10.0], [0, 0, 1.5, -5.0], [0, 0, 0, 1]])
PRED_1 = (slice(8, 16), slice(6, 12), slice(3, 9))  # intensity 500: class 1 only
PRED_2 = (slice(16, 22), slice(10, 18), slice(4, 8))  # intensity 700: class 2 only
BOTH = (slice(16, 22), slice(10, 18), slice(8, 11))  # intensity 600: both above 0.5, class 2 more probable
LABEL_1 = (slice(6, 14), slice(6, 12), slice(3, 9))
LABEL_2 = (slice(16, 22), slice(10, 18), slice(4, 10))


class IntensityClassifier(torch.nn.Module):
    """A voxel-wise stand-in for the network: logits from the preprocessed intensity (the image scaled by 1/700)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        def near(value: float) -> torch.Tensor:
            return (x - value / 700).abs() < 0.05

        class_1 = torch.where(near(500) | near(600), 4.0, -4.0)
        class_2 = torch.where(near(700), 4.0, torch.where(near(600), 6.0, -4.0))
        return torch.cat([class_1, class_2], 1)


def write_controlled_cases(folder: Path) -> None:
    """A datalist JSON with 3 training cases (the split needs some) and 2 test cases; intensities encode predictions."""
    image = np.zeros(SHAPE, dtype=np.float32)
    image[2:-2, 2:-2] = 300  # body; the 2-voxel rim is air, cropped away by preprocessing and padded back
    image[PRED_1], image[PRED_2], image[BOTH] = 500, 700, 600
    label = np.zeros(SHAPE, dtype=np.uint8)
    label[LABEL_1], label[LABEL_2] = 1, 2
    folder.mkdir(parents=True)
    items = []
    for i in range(5):
        nib.save(nib.Nifti1Image(image, AFFINE), folder / f"image_{i}.nii.gz")
        nib.save(nib.Nifti1Image(label, AFFINE), folder / f"label_{i}.nii.gz")
        items.append({"image": f"image_{i}.nii.gz", "label": f"label_{i}.nii.gz"})
    (folder / "dataset.json").write_text(json.dumps({"training": items[:3], "test": items[3:]}))


def hand_masks() -> list[tuple[np.ndarray, np.ndarray]]:
    """(prediction, label) masks of classes 1 and 2 by the validation rule: each class's own sigmoid > 0.5, so the
    600-intensity region, above 0.5 for both classes, belongs to both."""
    masks = []
    for pred_region, label_region in ((PRED_1, LABEL_1), (PRED_2, LABEL_2)):
        pred, label = np.zeros(SHAPE, bool), np.zeros(SHAPE, bool)
        pred[pred_region] = pred[BOTH] = True
        label[label_region] = True
        masks.append((pred, label))
    return masks


def hand_dice() -> list[float]:
    return [2 * (pred & label).sum() / (pred.sum() + label.sum()) for pred, label in hand_masks()]


def hand_hd95(spacing: np.ndarray) -> list[float]:
    """HD95 in mm by brute force over surface voxels (mask minus its erosion): the larger of the two directed 95th
    percentiles of the distances from one surface to the nearest voxel of the other."""
    from scipy.ndimage import binary_erosion

    def surface(mask: np.ndarray) -> np.ndarray:
        return np.argwhere(mask & ~binary_erosion(mask)) * spacing

    result = []
    for pred, label in hand_masks():
        a, b = surface(pred), surface(label)
        distances = np.linalg.norm(a[:, None] - b[None], axis=-1)
        result.append(max(np.percentile(distances.min(1), 95), np.percentile(distances.min(0), 95)))
    return result


def test_dice_and_hd95_on_the_original_grid_match_hand_computations(tmp_path):
    write_controlled_cases(tmp_path / "data")
    torch.save(IntensityClassifier().state_dict(), tmp_path / "model.pt")  # no parameters: the strict load passes
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in CONFIGS])
    parser.update(
        {
            "patch_size": [16, 16, 8],
            "num_classes": 2,
            "num_workers": 0,
            "dataset_dir": str(tmp_path / "data"),
            "output_dir": str(tmp_path / "out"),
            "model_file": str(tmp_path / "model.pt"),
            "amp": False,
            "device": "cpu",
            "bundle_root": str(tmp_path),
        }
    )
    parser["network"] = IntensityClassifier()
    parser.get_parsed_content("evaluator").run()

    expected = hand_dice()
    assert expected == pytest.approx([0.6, 576 / 624])  # class 1 also holds the region where both are above 0.5
    out = tmp_path / "out/evaluation"
    with open(out / "dice_raw.csv") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["filename"]).name for r in rows] == ["image_3.nii.gz", "image_4.nii.gz"]
    for row in rows:
        assert [float(row["1"]), float(row["2"])] == pytest.approx(expected, abs=1e-4)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == 2
    assert summary["model_file"] == str(tmp_path / "model.pt")
    assert list(summary["dice_per_class"].values()) == pytest.approx(expected)
    assert summary["mean_dice"] == pytest.approx(np.mean(expected))
    # Class 2's prediction overshoots the label by exactly one 1.5 mm slice: its HD95 is 1.5 mm, not 1 voxel.
    assert summary["hd95_mm_per_class"]["2"] == pytest.approx(1.5)
    assert list(summary["hd95_mm_per_class"].values()) == pytest.approx(hand_hd95(np.full(3, 1.5)), abs=1e-3)
    assert summary["hd95_undefined_per_class"] == {"1": 0, "2": 0}
    assert len(list((out / "overlays").glob("*.png"))) == 2


def test_hd95_is_in_millimetres_from_the_label_affine():
    pred, label = torch.zeros(1, 1, 6, 4, 4), torch.zeros(1, 1, 6, 4, 4)
    pred[0, 0, 0, 0, 0] = label[0, 0, 3, 0, 0] = 1  # 3 voxels apart along x, spacing 2 mm
    affine = torch.diag(torch.tensor([2.0, 1.0, 0.5, 1.0]))
    metric = HausdorffDistanceMM(include_background=True, percentile=95)
    metric([MetaTensor(pred[0])], [MetaTensor(label[0], affine=affine)])
    assert metric.aggregate().item() == pytest.approx(6.0)
    with pytest.raises(TypeError, match="MetaTensor"):
        metric(pred, label)


def test_summary_skips_undefined_values_and_writes_strict_json(tmp_path):
    class Engine:
        class state:  # noqa: N801 - mimics ignite's engine.state
            metrics: dict = {}
            metric_details = {
                "dice": torch.tensor([[0.5, float("nan")], [1.0, 0.25]]),
                "hd95": torch.tensor([[2.0, float("inf")], [4.0, float("nan")]]),
            }

    window = SlidingWindowInferer([16, 16, 8], overlap=0.5, mode="gaussian")
    summary = EvaluationSummary(
        str(tmp_path / "s.json"), "m.pt", {"modality": "ct", "patch_size": [16, 16, 8]}, window
    )(Engine)
    assert summary["preprocessing"] == {"modality": "ct", "patch_size": [16, 16, 8]}
    assert summary["window"] == {"roi_size": [16, 16, 8], "overlap": 0.5, "mode": "gaussian"}
    assert summary["dice_per_class"] == {"1": 0.75, "2": 0.25}
    assert summary["mean_dice"] == pytest.approx(1.75 / 3)
    assert summary["hd95_mm_per_class"] == {"1": 3.0, "2": None}
    assert summary["hd95_undefined_per_class"] == {"1": 0, "2": 2}
    assert Engine.state.metrics["dice_2"] == 0.25 and np.isnan(Engine.state.metrics["hd95_2"])
    assert json.loads((tmp_path / "s.json").read_text()) == summary  # no NaN/Infinity tokens


def run_evaluate(tmp: Path, tracking: str | None = None, **keys):
    args = {**TINY, "num_folds": 2, "dataset_dir": tmp / "data", "output_dir": tmp / "out", "bundle_root": tmp}
    return run_workflow("evaluate", CONFIGS, tracking=tracking, **{**args, **keys})


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    from test_train_bundle import write_cases

    tmp = tmp_path_factory.mktemp("evaluate")
    write_cases(tmp / "data")
    torch.manual_seed(0)
    torch.save(segmentation_network(2, 4, 3).state_dict(), tmp / "model.pt")
    return tmp


def test_evaluate_writes_per_case_csv_summary_overlays_and_logs_to_mlflow(labelled):
    # The study passes its pretrained_ckpt to evaluation too: every weight must still come from model_file.
    torch.save(FPN3d(1, 4, 3).state_dict(), labelled / "backbone.pt")
    model_file, backbone = str(labelled / "model.pt"), str(labelled / "backbone.pt")
    # a model file without a sidecar: its preprocessing must be given (TINY gives the patch size)
    keys = {"model_file": model_file, "pretrained_ckpt": backbone, "modality": "mri"}
    run = run_evaluate(labelled, tracking="mlflow", **keys)
    assert f"Evaluating the trained model {model_file}" in run.log
    assert "from scratch" not in run.log and "loaded from" not in run.log
    # The random model predicts some classes nowhere: undefined values must not make numpy or MONAI warn.
    for warning in ("always_return_as_numpy", "Mean of empty slice", "All-NaN slice", "Degrees of freedom"):
        assert not [w for w in [*run.warnings, run.log] if warning in w], run.warnings
    test_cases = split_cases(labelled_datalist(labelled / "data"), None, 0, 2, 1, 0)["test"]
    out = labelled / "out/evaluation"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["num_cases"] == len(test_cases) and set(summary["dice_per_class"]) == {"1", "2"}
    for name in ("dice", "hd95"):
        with open(out / f"{name}_raw.csv") as f:
            rows = list(csv.DictReader(f))
        assert sorted(r["filename"] for r in rows) == sorted(c["image"] for c in test_cases)
        assert list(rows[0]) == ["filename", *summary["dice_per_class"], "mean"]  # the class labels of summary.json
        with open(out / f"{name}_summary.csv") as f:
            assert [r["class"] for r in csv.DictReader(f)] == [*summary["dice_per_class"], "mean"]
    assert len(list((out / "overlays").glob("*.png"))) == min(3, len(test_cases))

    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{labelled / 'out/mlruns.db'}")
    (run,) = client.search_runs([e.experiment_id for e in client.search_experiments()])
    assert {"dice", "hd95", "dice_1", "dice_2", "hd95_1", "hd95_2"} <= set(run.data.metrics)
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"summary.json", "dice_raw.csv", "hd95_raw.csv"} <= artifacts
    assert any(a.endswith(".png") for a in artifacts)


@pytest.mark.parametrize(("window_gib", "free_gib", "expected"), [(1, 10, 5), (3, 4, 1), (0.01, 70, 32), (8, 4, 1)])
def test_sliding_windows_per_pass_fill_half_the_free_memory(window_gib, free_gib, expected):
    assert windows_that_fit(int(window_gib * 2**30), int(free_gib * 2**30)) == expected


def test_sliding_windows_per_pass_are_given_or_one_on_cpu():
    network = segmentation_network(2, 4, 3)
    assert sw_batch_size(network, [16, 16, 8], torch.device("cpu"), amp=False) == 1
    assert sw_batch_size(network, [16, 16, 8], "cpu", amp=False, given=6) == 6


@pytest.mark.parametrize("given", [0, -2, 1.5, True, "four"])
def test_a_bad_sw_batch_size_is_refused_naming_the_key(given):
    with pytest.raises(BundleError, match=r"sw_batch_size=.*number of windows >= 1"):
        sw_batch_size(segmentation_network(2, 4, 3), [16, 16, 8], "cpu", amp=False, given=given)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="sizes sliding windows to a GPU's free memory")
def test_sliding_windows_per_pass_are_measured_on_the_gpu():
    network = segmentation_network(2, 8, 4).cuda().train()
    size = sw_batch_size(network, [64, 64, 32], torch.device("cuda"), amp=True)
    assert 1 <= size <= 32 and network.training


# evaluate.yaml runs train.yaml's validation inferer
@pytest.mark.parametrize("config", [["configs/train.yaml"], ["configs/inference.json"]])
def test_the_sw_batch_size_key_reaches_the_inferer(config, tmp_path):
    parser = ConfigParser()
    parser.read_config([str(ROOT / c) for c in config])
    parser.update({**TINY, "bundle_root": str(tmp_path), "device": "cpu", "amp": False})
    inferer = "evaluator#inferer" if "inference" in config[0] else "validate#inferer"
    assert parser.get_parsed_content(inferer).sw_batch_size == 1
    parser.update({"sw_batch_size": 3})
    parser.parse()
    assert parser.get_parsed_content(inferer).sw_batch_size == 3
