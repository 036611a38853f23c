"""The bundle's unit test in the MONAI Model Zoo's format: `scripts.tools.release` writes it as the Zoo's
`ci/unit_tests/test_<bundle>.py`, which `ci/unit_tests/runner.py -b <bundle>` runs from the model-zoo root, with the
bundle in `models/<bundle>/`. Each workflow runs on tiny synthetic NIfTI volumes on the CPU, as the Zoo's tests do:
pretraining; fine-tuning, then evaluation of the model it trained, then inference with that model."""

import os
import shutil
import sys
import tempfile
import unittest

import nibabel as nib
import numpy as np
from monai.bundle import ConfigWorkflow
from utils import check_workflow

BUNDLE = os.path.splitext(os.path.basename(__file__))[0].removeprefix("test_")
BUNDLE_ROOT = os.path.join("models", BUNDLE)
# tiny and fast; the architecture and preprocessing keys are given, so they override the released weights' values
TINY = {
    "bundle_root": BUNDLE_ROOT,
    "patch_size": [16, 16, 8],
    "base_channels": 4,
    "num_scales": 3,
    "modality": "mri",
    "num_workers": 0,
}
PRETRAIN = {**TINY, "pairs_per_volume": 2, "voxels_per_pair": 32, "epochs": 1, "epoch_length": 2, "progress": False}
DOWNSTREAM = {**TINY, "num_classes": 2, "head": "linear"}
TRAIN = {**DOWNSTREAM, "num_folds": 5, "epochs": 1, "epoch_length": 2, "val_interval": 1, "progress": False}


def test_order(test_name1, test_name2):
    """The runner's order of the tests: pretraining first, then the downstream workflows."""
    return ("pretrain" not in test_name1) - ("pretrain" not in test_name2)


def workflow(config_files, workflow_type, **override):
    """A bundle workflow as the Zoo's tests build one: the bundle's configs, logging file and metadata."""
    configs = [os.path.join(BUNDLE_ROOT, "configs", name) for name in config_files]
    return ConfigWorkflow(
        workflow_type=workflow_type,
        config_file=configs if len(configs) > 1 else configs[0],
        logging_file=os.path.join(BUNDLE_ROOT, "configs/logging.conf"),
        meta_file=os.path.join(BUNDLE_ROOT, "configs/metadata.json"),
        **override,
    )


class TestDHRBundle(unittest.TestCase):
    def setUp(self):
        if BUNDLE_ROOT not in sys.path:  # the bundle's Python code is its `scripts` package
            sys.path.insert(0, BUNDLE_ROOT)
        self.tmp = tempfile.mkdtemp()
        self.images = os.path.join(self.tmp, "data", "imagesTr")
        labels = os.path.join(self.tmp, "data", "labelsTr")
        os.makedirs(self.images)
        os.makedirs(labels)
        rng = np.random.default_rng(0)
        grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (28, 26, 14)], indexing="ij"))
        for i in range(5):  # a bright ellipsoid body holding two labelled blobs
            label = np.zeros(grid.shape[1:], dtype=np.uint8)
            label[((grid - np.array([0.3, 0, 0])[:, None, None, None]) ** 2).sum(0) < 0.08] = 1
            label[((grid + np.array([0.3, 0, 0])[:, None, None, None]) ** 2).sum(0) < 0.08] = 2
            body = (grid**2).sum(0) < 0.8
            image = np.where(body, 300 + 200.0 * label + 50 * rng.random(body.shape), 0).astype(np.float32)
            affine = np.diag([1.5, 1.5, 1.5, 1.0])
            nib.save(nib.Nifti1Image(image, affine), os.path.join(self.images, f"case_{i}.nii.gz"))
            nib.save(nib.Nifti1Image(label, affine), os.path.join(labels, f"case_{i}.nii.gz"))

    def tearDown(self):
        shutil.rmtree(self.tmp)

    def test_pretrain_config(self):
        output_dir, cache_dir = os.path.join(self.tmp, "pretrain"), os.path.join(self.tmp, "cache")
        keys = {**PRETRAIN, "dataset_dir": self.images, "output_dir": output_dir, "cache_dir": cache_dir}
        check_workflow(workflow(["pretrain.yaml"], "train", **keys), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(output_dir, "pretrained_backbone.pt")))

    def test_train_evaluate_infer_configs(self):
        output_dir = os.path.join(self.tmp, "train")
        keys = {**TRAIN, "dataset_dir": os.path.join(self.tmp, "data"), "output_dir": output_dir}
        check_workflow(workflow(["train.yaml"], "train", **keys), check_properties=True)
        model_file = os.path.join(output_dir, "model.pt")
        self.assertTrue(os.path.isfile(model_file))
        # train.yaml + evaluate.yaml evaluates the model just trained on the test split of the same keys
        check_workflow(workflow(["train.yaml", "evaluate.yaml"], "train", **keys), check_properties=True)
        self.assertTrue(os.path.isfile(os.path.join(output_dir, "evaluation", "summary.json")))
        masks = os.path.join(self.tmp, "masks")
        keys = {**DOWNSTREAM, "dataset_dir": self.images, "output_dir": masks, "model_file": model_file}
        check_workflow(workflow(["inference.json"], "infer", **keys), check_properties=True)
        self.assertEqual(len([f for f in os.listdir(masks) if f.endswith("_seg.nii.gz")]), 5)


if __name__ == "__main__":
    loader = unittest.TestLoader()
    loader.sortTestMethodsUsing = test_order
    unittest.main(testLoader=loader)
