"""The embedded default dataset: brain MRI subjects synthesised from the MNI ICBM152 2009a template.

The template ships inside the `nilearn` wheel (see docs/data_license.txt), so the demo needs no network. Each subject
is the T1 template resampled to a coarser grid and warped by its own smooth random deformation, with a bias field and
Rician noise; labels (background, CSF, grey matter, white matter) come from the template's tissue maps, warped alike.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import math
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F
from monai.transforms.utils import create_rotate, create_scale, create_translate
from scripts.utils import errors, log

logger = logging.getLogger(__name__)

__all__ = ["prepare_demo"]

LABELS = {"0": "background", "1": "CSF", "2": "grey matter", "3": "white matter"}
_TEMPLATE = "mni_icbm152_{}_tal_nlin_sym_09a_converted.nii.gz"

# Deformation and appearance ranges: enough variety between subjects for contrastive pretraining while every subject
# stays an anatomically plausible brain.
_MAX_ROTATION_DEG = 5.0
_MAX_SCALING = 0.08
_MAX_TRANSLATION_MM = 4.0
_DISPLACEMENT_STD_MM = 3.0  # on a 5x5x5 control grid, so the displacement varies over ~5 cm
_BIAS_LOG_STD = 0.1  # on a 3x3x3 control grid: a multiplicative field of about +-10-20 %
_NOISE_STD = 3.0  # Rician noise on the template's 0..255 scale


def _template_dir() -> Path:
    """Folder of nilearn's bundled MNI template, found without importing nilearn (slow)."""
    spec = importlib.util.find_spec("nilearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            "The demo dataset is built from the MNI template shipped with nilearn: `pip install nilearn`."
        )
    folder = Path(spec.submodule_search_locations[0]) / "datasets" / "data"
    if not (folder / _TEMPLATE.format("t1")).is_file():
        raise FileNotFoundError(f"The MNI ICBM152 template {folder / _TEMPLATE.format('t1')} is missing from nilearn.")
    return folder


def _is_complete(datalist: Path, params: dict) -> bool:
    """Whether a finished preparation with the same parameters is already there."""
    try:
        content = json.loads(datalist.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    files = [datalist.parent / item[k] for item in content.get("training", []) for k in ("image", "label")]
    return content.get("preparation") == params and all(f.is_file() for f in files)


def _save(array: np.ndarray, affine: np.ndarray, path: Path) -> None:
    """Writes a NIfTI through a temporary file, so readers (or a concurrent preparation) never see a partial one."""
    image = nib.Nifti1Image(array, affine)
    image.set_sform(affine, code="mni")
    image.set_qform(affine, code="mni")
    image.header.set_xyzt_units("mm")
    tmp = path.with_name(f".{os.getpid()}.{path.name}")
    nib.save(image, tmp)
    os.replace(tmp, path)


def _smooth_field(generator: torch.Generator, channels: int, control: int, shape: tuple[int, ...]) -> torch.Tensor:
    """A (channels, *shape) standard-normal field on a control^3 grid, upsampled trilinearly to `shape`."""
    coarse = torch.randn(1, channels, control, control, control, generator=generator)
    return F.interpolate(coarse, size=shape, mode="trilinear", align_corners=True)[0]


def _subject(
    source: torch.Tensor, src_affine: np.ndarray, out_affine: np.ndarray, shape: tuple[int, ...], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """One warped subject.

    Args:
        source: (5, X, Y, Z) template T1 (0..255) and the one-hot label channels 0..3, on the 1 mm template grid.
        src_affine, out_affine: (4, 4) voxel-to-world (mm) affines of the template and of the output grid.
        shape: output grid size (X', Y', Z').
        seed: seed of this subject's deformation, bias field and noise.

    Returns:
        the image (X', Y', Z') float32 on the 0..255 scale and the label (X', Y', Z') uint8.
    """
    g = torch.Generator().manual_seed(seed)
    uniform = (torch.rand(3, 3, generator=g, dtype=torch.float64) * 2 - 1).numpy()  # in [-1, 1)
    angles = uniform[0] * math.radians(_MAX_ROTATION_DEG)
    scales = 1 + uniform[1] * _MAX_SCALING
    shift = uniform[2] * _MAX_TRANSLATION_MM
    # Pull-back, composed in float64 as one affine: output voxel -> output world -> template world (random affine about
    # the centre of the template's field of view) -> template voxel -> grid_sample's [-1, 1] coordinates.
    size = np.array(source.shape[1:])
    centre = src_affine[:3, :3] @ ((size - 1) / 2) + src_affine[:3, 3]
    to_source = create_translate(3, -np.ones(3)) @ create_scale(3, 2 / (size - 1)) @ np.linalg.inv(src_affine)
    warp = create_translate(3, centre + shift) @ create_rotate(3, angles) @ create_scale(3, scales)
    pull = torch.from_numpy(to_source @ warp @ create_translate(3, -centre) @ out_affine).float()
    to_source = torch.from_numpy(to_source).float()
    index = torch.stack(torch.meshgrid(*[torch.arange(n, dtype=torch.float32) for n in shape], indexing="ij"), -1)
    displacement = _smooth_field(g, 3, 5, shape).permute(1, 2, 3, 0) * _DISPLACEMENT_STD_MM  # (X', Y', Z', 3) mm
    grid = index @ pull[:3, :3].T + pull[:3, 3] + displacement @ to_source[:3, :3].T
    # grid_sample orders the coordinates (W, H, D) = (Z, Y, X) for an input laid out (D, H, W) = (X, Y, Z).
    warped = F.grid_sample(source[None], grid.flip(-1)[None], mode="bilinear", align_corners=True)[0]
    bias = torch.exp(_smooth_field(g, 1, 3, shape)[0] * _BIAS_LOG_STD)
    noise = torch.randn(2, *shape, generator=g) * _NOISE_STD
    image = torch.sqrt((warped[0] * bias + noise[0]) ** 2 + noise[1] ** 2)  # magnitude of complex noise: Rician
    # Argmax of the interpolated one-hot labels: majority label under partial volume, smoother than nearest.
    label = warped[1:].movedim(0, -1).contiguous().argmax(-1)  # channels last: a much faster reduction
    return image.numpy().astype(np.float32), label.numpy().astype(np.uint8)


def prepare_demo(root: str | os.PathLike, num_subjects: int = 12, spacing: float = 2.0, seed: int = 0) -> str:
    """Builds (once, without network) an MSD-style demo dataset under `root` and returns the path of its dataset.json.

    Subject i is the MNI ICBM152 2009a T1 template on a `spacing` mm RAS grid, warped by a random affine (rotation up
    to 5 degrees, scaling up to 8 %, shift up to 4 mm) plus a smooth displacement of a few mm, with a smooth
    multiplicative bias field and Rician noise, all drawn from seed `seed + i`. Its label (uint8) is 0 background
    (outside the skull-stripped brain), 1 CSF, 2 grey matter, 3 white matter: the argmax over [1 - gm - wm, gm, wm]
    of the template's tissue probability maps inside the brain, warped with the same deformation.

    Files: `root/imagesTr/demo_XX.nii.gz` (float32, 0..255), `root/labelsTr/demo_XX.nii.gz` and `root/dataset.json`
    (written last and atomically, so an interrupted preparation is redone). A finished preparation with the same
    arguments is returned as is; different arguments rebuild it.
    """
    root = Path(root)
    datalist = root / "dataset.json"
    params = {"num_subjects": num_subjects, "spacing": spacing, "seed": seed}
    if _is_complete(datalist, params):
        return str(datalist)
    datalist.unlink(missing_ok=True)  # a rebuild with other arguments must not leave a stale, valid-looking list
    logger.info(
        f"preparing the demo dataset in {root} (once, offline): {num_subjects} synthetic brain MRI subjects, the MNI "
        f"ICBM152 template warped at {spacing:g} mm with tissue labels"
    )
    folder = _template_dir()
    t1_file = nib.load(folder / _TEMPLATE.format("t1"))
    t1, gm, wm = (
        torch.from_numpy(np.asarray(nib.load(folder / _TEMPLATE.format(k)).dataobj, dtype=np.float32))
        for k in ("t1", "gm", "wm")
    )
    brain = t1 > 0  # the template is skull-stripped
    tissue = torch.stack([(1 - gm / 255 - wm / 255).clamp(min=0), gm / 255, wm / 255], -1).argmax(-1) + 1
    label = torch.where(brain, tissue, 0)
    source = torch.stack([t1, *((label == k).float() for k in range(4))])
    src_affine = t1_file.affine
    out_affine = src_affine @ np.diag([spacing, spacing, spacing, 1.0])
    src_spacing = np.linalg.norm(src_affine[:3, :3], axis=0)
    shape = tuple(math.ceil(n * s / spacing) for n, s in zip(t1.shape, src_spacing, strict=True))

    items = []
    for i in range(num_subjects):
        image, label_i = _subject(source, src_affine, out_affine, shape, seed + i)
        item = {"image": f"./imagesTr/demo_{i:02d}.nii.gz", "label": f"./labelsTr/demo_{i:02d}.nii.gz"}
        for key, array in (("image", image), ("label", label_i)):
            (root / item[key]).parent.mkdir(parents=True, exist_ok=True)
            _save(array, out_affine, root / item[key])
        items.append(item)

    content = {
        "name": "DHR demo brain MRI (MNI ICBM152 2009a)",
        "description": "Synthetic T1 brain MRI subjects: the MNI ICBM152 2009a template (shipped with nilearn), warped "
        "by random smooth deformations, with bias fields and Rician noise; tissue labels from its GM/WM maps.",
        "reference": "Fonov et al., NeuroImage 2011 and 2009 (MNI ICBM152 2009a template)",
        "licence": "See docs/data_license.txt (ICBM template terms: copyright notice required, no warranty)",
        "tensorImageSize": "3D",
        "modality": {"0": "MRI"},
        "labels": LABELS,
        "numTraining": num_subjects,
        "preparation": params,
        "training": items,
    }
    tmp = datalist.with_name(f".{os.getpid()}.dataset.json")
    tmp.write_text(json.dumps(content, indent=2))
    os.replace(tmp, datalist)
    logger.info(f"demo dataset ready: {datalist}")
    return str(datalist)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.data.demo",
        description="Prepare the embedded demo dataset and print its dataset.json path.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("root", nargs="?", default="data/demo", help="output folder")
    parser.add_argument("--num-subjects", type=int, default=12, help="number of subjects")
    parser.add_argument("--spacing", type=float, default=2.0, help="voxel size in mm")
    parser.add_argument("--seed", type=int, default=0, help="subject i is drawn from seed + i")
    args = parser.parse_args()
    errors.install()
    log.configure()
    print(prepare_demo(args.root, args.num_subjects, args.spacing, args.seed))


if __name__ == "__main__":
    main()
