"""See what a pretrained backbone learned: its voxel embeddings on one image, as a PNG.

Usage (from the bundle root)::

    python -m scripts.visualize --backbone FILE [FILE ...] --image NIFTI [--voxel X Y Z] [--output PNG]
        [--modality mri] [--crop 96 96 64]

For each backbone (one column group each, side by side) the figure shows three orthogonal slices through a query voxel:
the preprocessed image; per pyramid level, the first three principal components of the voxel embeddings as RGB (voxels
that look alike to the network get alike colours); and the cosine similarity of every voxel's multiscale embedding to
the query voxel's (the mean over levels of the per-level cosine, so every scale counts equally, as in DHR's balanced
vectors). A network that learned nothing shows noise or plain intensity; a useful one shows anatomy at the fine levels,
regions at the coarse ones, and lights up tissue like the query's.

Any backbone file the bundle writes is taken, its architecture read from the file
(``scripts.engine.weights.read_info``): an FPN3d from its sidecar or its tensor shapes, a MONAI network
(``scripts.networks.backbones``: SegResNet, DynUNet, UNet) from its sidecar's ``backbone`` and ``backbone_args``. Each
PCA row is labelled with its level's stride, since a UNet has no full-resolution level (its level i is at stride
2^(i+1)). The preprocessing is the bundle's (``scripts.data.preprocessing.preprocessing``) with the file's modality
preset when it records one, else ``--modality``. The network sees one crop of the preprocessed volume, ``--crop`` voxels
centred on the query voxel (the whole volume when smaller; padded to the crop size when the volume is), so that the demo
backbone takes seconds on a CPU; for a MONAI network each side must be a multiple of its coarsest level's stride.
"""

from __future__ import annotations

import argparse
import logging
from collections.abc import Sequence
from pathlib import Path

from scripts.utils.cli import PRESET_NAMES


def build_parser() -> argparse.ArgumentParser:
    """The command line; built before torch and MONAI are imported (see the end of the imports)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.visualize",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    required = {"required": True, "default": argparse.SUPPRESS}  # no "(default: None)" in --help
    parser.add_argument("--backbone", nargs="+", help="backbone weight files, one column group each", **required)
    parser.add_argument("--image", help="a NIfTI volume", **required)
    parser.add_argument(
        "--voxel", nargs=3, type=int, help="query voxel: indices in the input image; unset: the centre of the body"
    )
    parser.add_argument("--output", default="runs/visualization.png", help="PNG file to write")
    parser.add_argument("--modality", default="mri", choices=PRESET_NAMES, help="preset when the file records none")
    parser.add_argument(
        "--crop",
        nargs=3,
        type=int,
        default=[96, 96, 64],
        help="voxels embedded around the query (MONAI backbones: multiples of the coarsest stride)",
    )
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer before torch and MONAI are imported

import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from scripts.data.preprocessing import PRESETS, preprocessing  # noqa: E402, F401
from scripts.engine.weights import read_info  # noqa: E402
from scripts.networks.backbones import BACKBONES, MonaiBackbone  # noqa: E402
from scripts.networks.fpn3d import FPN3d  # noqa: E402
from scripts.networks.pretrained import load_backbone, load_pretrained  # noqa: E402
from scripts.utils import errors, log  # noqa: E402
from scripts.utils.errors import BundleError  # noqa: E402
from torch import Tensor  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["load", "check_crop", "level_strides", "embed", "pca_rgb", "similarity", "figure", "main"]

PANEL_INCHES = 1.6  # side of one slice panel
DPI = 100
VIEWS = ("axial", "coronal", "sagittal")


def load(path: str | Path) -> tuple[FPN3d | MonaiBackbone, dict]:
    """The backbone of a weight file, built from what the file says it is, in eval mode, and that description: an
    FPN3d, or a MONAI network (`scripts.networks.backbones.MonaiBackbone`) as its sidecar's ``backbone`` and
    ``backbone_args`` record, loaded as fine-tuning loads it."""
    info = read_info(path)
    name = info.get("backbone", "fpn3d")
    if name != "fpn3d":
        if name not in BACKBONES:
            raise BundleError(
                f"{path}: its sidecar names backbone {name!r}, none of the bundle's ({', '.join(BACKBONES)})"
            )
        backbone = MonaiBackbone(name, info.get("backbone_args"))
        load_pretrained(str(path), backbone, key="--backbone")
        return backbone.eval(), info
    if "base_channels" not in info or "num_scales" not in info:
        raise BundleError(
            f"{path}: holds no backbone (no JSON sidecar naming one, and no FPN3d 'first_conv.weight' tensor)"
        )
    backbone = FPN3d(info.get("in_channels", 1), info["base_channels"], info["num_scales"])
    return load_backbone(str(path), backbone).eval(), info


def check_crop(backbone: FPN3d | MonaiBackbone, crop: Sequence[int]) -> None:
    """Refuses a ``--crop`` (voxels) that the backbone cannot embed: a MONAI network's decoder joins each level to its
    skip connection, so every side must be a multiple of its coarsest stride (FPN3d pools in ceil mode: any size).

    Raises:
        BundleError: naming ``--crop`` and the nearest sizes that fit.
    """
    if not isinstance(backbone, MonaiBackbone):
        return
    factor = level_strides(backbone)[-1]
    if any(s % factor for s in crop):
        nearest = [max(factor, round(s / factor) * factor) for s in crop]
        raise BundleError(
            f"--crop {' '.join(map(str, crop))} does not fit {type(backbone.network).__name__}: its coarsest level has "
            f"stride {factor}, so every side must be a multiple of {factor}; give --crop {' '.join(map(str, nearest))}"
        )


def crop_around(volume: Tensor, centre: Sequence[int], size: Sequence[int]) -> tuple[Tensor, list[int]]:
    """The ``size`` window of ``volume`` (C, X, Y, Z) centred on ``centre`` as far as the volume allows, and its
    start corner."""
    starts = [min(max(c - s // 2, 0), max(n - s, 0)) for c, s, n in zip(centre, size, volume.shape[1:], strict=True)]
    window = tuple(slice(a, a + s) for a, s in zip(starts, size, strict=True))
    return volume[(slice(None), *window)], starts


def level_strides(backbone: FPN3d | MonaiBackbone) -> list[int]:
    """The stride (input voxels per cell, in every axis) of each pyramid level, finest first: ``2 ** (first_shift +
    i)``, with ``first_shift`` as `scripts.networks.backbones.MonaiBackbone` records it (FPN3d: 0, its finest level
    is the input's)."""
    return [2 ** (getattr(backbone, "first_shift", 0) + i) for i in range(len(backbone.out_channels))]


@torch.no_grad()
def embed(backbone: FPN3d | MonaiBackbone, image: Tensor) -> list[Tensor]:
    """(1, X, Y, Z) image -> the pyramid of (C_i, ceil(X / s_i), ...) voxel embeddings, finest first, float32, where
    ``s_i`` is level i's stride (`level_strides`)."""
    return [level[0].float() for level in backbone(image[None].float())]


def _upsample(level: Tensor, stride: int, size: Sequence[int]) -> Tensor:
    """(C, X_i, Y_i, Z_i) at ``stride`` -> (C, X, Y, Z): each voxel ``v`` reads ``v // stride``, as in pretraining."""
    up = level.repeat_interleave(stride, 1).repeat_interleave(stride, 2).repeat_interleave(stride, 3)
    return up[:, : size[0], : size[1], : size[2]]


def pca_rgb(level: Tensor, stride: int, size: Sequence[int]) -> np.ndarray:
    """The first three principal components of a level's voxel embeddings (C, X_i, Y_i, Z_i) at ``stride``, each
    scaled to [0, 1] between its 1st and 99th percentile, as an (X, Y, Z, 3) RGB volume at the full resolution
    ``size``."""
    flat = level.flatten(1)
    flat = flat - flat.mean(dim=1, keepdim=True)
    _, vectors = torch.linalg.eigh(flat @ flat.T)  # ascending eigenvalues of the (C, C) scatter matrix
    components = vectors[:, -3:].flip(1).T @ flat  # (k <= 3, N), largest first
    low, high = torch.quantile(components, 0.01, dim=1, keepdim=True), torch.quantile(components, 0.99, dim=1)[:, None]
    components = ((components - low) / (high - low).clamp(min=1e-8)).clamp(0, 1)
    rgb = torch.zeros(3, flat.shape[1])
    rgb[: components.shape[0]] = components
    return _upsample(rgb.view(3, *level.shape[1:]), stride, size).permute(1, 2, 3, 0).numpy()


def similarity(pyramid: list[Tensor], strides: Sequence[int], query: Sequence[int], size: Sequence[int]) -> np.ndarray:
    """Cosine similarity to the ``query`` voxel (an index of the (X, Y, Z) = ``size`` input), the mean over levels of
    each level's cosine between every voxel and the query's cell ``query // s_i`` (``s_i`` = ``strides[i]``): an
    (X, Y, Z) volume in [-1, 1]."""
    total = torch.zeros(tuple(size))
    for level, stride in zip(pyramid, strides, strict=True):
        unit = F.normalize(level, dim=0)
        q = unit[:, query[0] // stride, query[1] // stride, query[2] // stride]
        total += _upsample(torch.einsum("cxyz,c->xyz", unit, q)[None], stride, size)[0]
    return (total / len(pyramid)).numpy()


def _slices(volume: np.ndarray, voxel: Sequence[int]) -> list[np.ndarray]:
    """Axial, coronal and sagittal slices through ``voxel`` of an (X, Y, Z[, 3]) RAS volume, rows = vertical axis."""
    x, y, z = voxel
    return [np.swapaxes(s, 0, 1) for s in (volume[:, :, z], volume[:, y, :], volume[x, :, :])]


def figure(columns: list[dict]):
    """The figure: per column group (``name``, ``image`` (X, Y, Z), ``levels`` [(X, Y, Z, 3)] with their ``strides``
    (voxels), ``similarity`` (X, Y, Z), ``voxel``, ``spacing`` (mm)), rows image, one PCA row per level, similarity;
    three views each."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 2 + max(len(c["levels"]) for c in columns)
    fig, axes = plt.subplots(
        rows, 3 * len(columns), figsize=(3 * len(columns) * PANEL_INCHES, rows * PANEL_INCHES + 0.4), squeeze=False
    )
    for ax in axes.flat:
        ax.set_axis_off()
    for g, column in enumerate(columns):
        sx, sy, sz = column["spacing"]
        aspects = (sy / sx, sz / sx, sz / sy)  # vertical / horizontal voxel size of each view
        x, y, z = column["voxel"]
        marks = ((x, y), (x, z), (y, z))  # the query voxel in each view (horizontal, vertical)
        panels = [("image", column["image"], {"cmap": "gray"})]
        panels += [
            (f"level {i} PCA, stride {stride}", rgb, {})
            for i, (rgb, stride) in enumerate(zip(column["levels"], column["strides"], strict=True))
        ]
        panels += [("similarity", column["similarity"], {"cmap": "magma", "vmin": -1, "vmax": 1})]
        for r, (label, volume, style) in enumerate(panels):
            row = r if label != "similarity" else rows - 1
            for v, (view, slice_) in enumerate(zip(VIEWS, _slices(volume, column["voxel"]), strict=True)):
                ax = axes[row, 3 * g + v]
                ax.imshow(slice_, origin="lower", aspect=aspects[v], interpolation="nearest", **style)
                if label in ("image", "similarity"):
                    ax.plot(*marks[v], marker="+", color="cyan", markersize=8)
                if v == 0:
                    ax.set_axis_on()
                    ax.set_xticks([])
                    ax.set_yticks([])
                    ax.set_ylabel(label, fontsize=7)
                if r == 0:
                    ax.set_title(f"{column['name']}\n{view}" if v == 1 else view, fontsize=7)
    fig.subplots_adjust(left=0.04, right=0.99, bottom=0.01, top=1 - 0.45 / (rows * PANEL_INCHES + 0.4), wspace=0.05)
    return fig


def column(path: str, image_file: str, voxel: Sequence[int] | None, crop: Sequence[int], modality: str) -> dict:
    """One backbone's column group: load, preprocess, crop around the query, embed, reduce."""
    backbone, info = load(path)
    check_crop(backbone, crop)
    modality = info.get("modality") or modality
    data = preprocessing(modality, crop)({"image": image_file})
    image = data["image"]
    if voxel is None:  # the centre of the body crop
        centre = [n // 2 for n in image.shape[1:]]
    else:  # the input's voxel index -> world (mm) -> the preprocessed grid
        world = nib.load(image_file).affine @ np.array([*voxel, 1.0])
        index = np.linalg.solve(image.affine.numpy(), world)[:3]
        centre = [int(np.clip(round(i), 0, n - 1)) for i, n in zip(index, image.shape[1:], strict=True)]
    window, starts = crop_around(image.as_tensor(), centre, crop)
    query = [c - s for c, s in zip(centre, starts, strict=True)]
    pyramid = embed(backbone, window)
    strides = level_strides(backbone)
    size = window.shape[1:]
    if isinstance(backbone, MonaiBackbone):
        architecture = type(backbone.network).__name__
    else:
        architecture = f"FPN3d {info['base_channels']}/{info['num_scales']}"
    name = f"{Path(path).name}: {architecture}, {modality}"
    return {
        "name": name,
        "image": window[0].numpy(),
        "levels": [pca_rgb(level, stride, size) for level, stride in zip(pyramid, strides, strict=True)],
        "strides": strides,
        "similarity": similarity(pyramid, strides, query, size),
        "voxel": query,
        "spacing": PRESETS[modality]["pixdim"],
    }


def main(argv: Sequence[str] | None = None) -> None:
    parser = build_parser()
    args = parser.parse_args(argv)
    errors.install()
    log.configure()
    for path in [*args.backbone, args.image]:
        if not Path(path).is_file():
            parser.exit(1, f"error: {path}: no such file\n")

    with torch.no_grad():
        columns = [column(path, args.image, args.voxel, args.crop, args.modality) for path in args.backbone]
    import matplotlib.pyplot as plt

    fig = figure(columns)
    output = Path(args.output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=DPI)
    plt.close(fig)
    logger.info(f"written: {output}")


if __name__ == "__main__":
    main()
