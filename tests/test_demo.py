import json
import logging
import sys
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scripts.data.demo import main, prepare_demo
from scripts.data.preprocessing import load_datalist, preprocessing

NUM_SUBJECTS = 3


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    """Prepares the demo dataset once for the module; tests that modify it leave it complete again."""
    root = tmp_path_factory.mktemp("demo")
    return Path(prepare_demo(root, num_subjects=NUM_SUBJECTS))


def _mtimes(root: Path) -> dict[Path, int]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*") if p.is_file()}


def test_demo_files_shapes_and_labels(demo):
    content = json.loads(demo.read_text())
    assert content["modality"] == {"0": "MRI"} and content["numTraining"] == NUM_SUBJECTS
    assert content["labels"] == {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
    assert [item["image"] for item in content["training"]] == [f"./imagesTr/demo_{i:02d}.nii.gz" for i in range(3)]

    images, labels = [], []
    for item in load_datalist(demo.parent):
        image, label = nib.load(item["image"]), nib.load(item["label"])
        assert image.shape == label.shape == (99, 117, 95)  # the 197 x 233 x 189 mm template at 2 mm
        assert image.get_data_dtype() == np.float32 and label.get_data_dtype() == np.uint8
        assert nib.aff2axcodes(image.affine) == ("R", "A", "S")
        assert np.allclose(image.affine, label.affine) and np.allclose(image.header.get_zooms(), 2.0)
        images.append(image.get_fdata(dtype=np.float32))
        labels.append(np.asarray(label.dataobj))
        assert set(np.unique(labels[-1])) == {0, 1, 2, 3}
        assert images[-1].min() >= 0 and images[-1].max() < 300
        # Brain tissue is brighter than CSF, white matter brighter than grey matter (T1 contrast).
        medians = [np.median(images[-1][labels[-1] == k]) for k in range(4)]
        assert medians == sorted(medians)
    for i in range(NUM_SUBJECTS):
        for j in range(i):
            assert (labels[i] != labels[j]).mean() > 0.02
            assert np.abs(images[i] - images[j]).mean() > 5


def test_demo_preprocesses_as_mri(demo):
    item = load_datalist(demo)[0]
    out = preprocessing("mri", patch_size=(32, 32, 32), label_key="label")(item)
    brain = out["label"][0].numpy() > 0
    assert np.allclose(out["image"].pixdim, 1.5)
    body = out["body"][0].numpy().astype(bool)
    # The body mask follows the brain; they differ only at the dim, partial-volume rim of the brain.
    assert body[brain].mean() > 0.97 and brain[body].mean() > 0.97


def test_preparation_says_what_it_is_doing(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    datalist = prepare_demo(tmp_path / "demo", num_subjects=1)
    out = caplog.text
    assert f"preparing the demo dataset in {tmp_path / 'demo'} (once, offline): 1 synthetic brain MRI subjects" in out
    assert f"demo dataset ready: {datalist}" in out


def test_second_call_is_a_no_op(demo, monkeypatch, capsys):
    before = _mtimes(demo.parent)
    assert prepare_demo(demo.parent, num_subjects=NUM_SUBJECTS) == str(demo)
    monkeypatch.setattr(sys, "argv", ["demo", str(demo.parent), "--num-subjects", str(NUM_SUBJECTS)])
    main()
    assert capsys.readouterr().out.strip() == str(demo)
    assert _mtimes(demo.parent) == before


def test_interrupted_preparation_is_redone(demo):
    label_file = demo.parent / "labelsTr" / "demo_01.nii.gz"
    label = np.asarray(nib.load(label_file).dataobj)
    mtime = label_file.stat().st_mtime_ns
    demo.unlink()  # as if the preparation stopped before writing the list
    (demo.parent / "imagesTr" / "demo_02.nii.gz").unlink()

    assert prepare_demo(demo.parent, num_subjects=NUM_SUBJECTS) == str(demo)
    assert demo.is_file() and (demo.parent / "imagesTr" / "demo_02.nii.gz").is_file()
    assert label_file.stat().st_mtime_ns != mtime
    assert np.array_equal(np.asarray(nib.load(label_file).dataobj), label)  # deterministic
    assert not list(demo.parent.rglob(".*"))  # no temporary files left behind
