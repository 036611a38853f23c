"""Datalists, modality presets and the deterministic preprocessing shared by every workflow.

Pretraining, linear evaluation, fine-tuning and inference all read volumes through `preprocessing`, so a volume is
oriented, resampled, scaled and cropped the same way everywhere (REFERENCE.md §1, "Optimisation and preprocessing").
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor, load_decathlon_datalist
from monai.transforms import (
    Compose,
    CropForegroundd,
    EnsureTyped,
    LoadImaged,
    MapTransform,
    Orientationd,
    ScaleIntensityRanged,
    ScaleIntensityRangePercentilesd,
    Spacingd,
    SpatialPadd,
)
from monai.utils import convert_to_dst_type, convert_to_numpy, ensure_tuple
from scipy import ndimage
from scripts.utils.distributed import is_main
from scripts.utils.errors import BundleError, InputNotFoundError, InvalidInputError

logger = logging.getLogger(__name__)

__all__ = [
    "PRESETS",
    "MAX_GROWTH",
    "VolumeWarning",
    "CheckVolumed",
    "BodyMaskd",
    "ForegroundChannelsd",
    "load_datalist",
    "preprocessing",
]

# Intensities end up in [0, 1] for both modalities: the body-mask threshold and the local augmentations assume it.
PRESETS: dict[str, dict] = {
    # Clip to the [a_min, a_max] HU window, then scale it linearly to [0, 1].
    "ct": {"axcodes": "RAS", "pixdim": (1.0, 1.0, 2.0), "a_min": -175.0, "a_max": 250.0},
    # vox2vec's intensity range (REFERENCE.md §2): its random HU window (`Vox2VecAugmentations`) is applied to the
    # cached [0, 1] data, so the cache must keep every HU value a window can show; "ct" would have clipped them.
    # The body-mask threshold 0.3 then sits at -1350 + 0.3 * 2350 = -645 HU: still below soft tissue, above air.
    "ct_wide": {"axcodes": "RAS", "pixdim": (1.0, 1.0, 2.0), "a_min": -1350.0, "a_max": 1000.0},
    # Clip to the [lower, upper] percentiles of the volume's own intensities, then scale them to [0, 1].
    "mri": {"axcodes": "RAS", "pixdim": (1.5, 1.5, 1.5), "lower": 1.0, "upper": 99.99},
}

_NIFTI_SUFFIXES = (".nii", ".nii.gz")

# Resampling that enlarges a volume more than this many times along an axis is warned about (e.g. 100 mm slices).
MAX_GROWTH = 8.0


class VolumeWarning(UserWarning):
    """A usable but suspicious input volume (or one skipped); the message names the file."""


def _scan_nifti(folder: Path) -> list[str]:
    """The NIfTI files below ``folder``, sorted, following symbolic links to folders and files (a dataset is often
    assembled from links). Each real folder is read once, so a link to an ancestor (a loop) or a second link to a
    folder adds nothing. Paths keep the links' names: inference mirrors them under its output folder. Logs how many
    volumes were found, and names the broken links among them (left out)."""
    found, seen = [], set()
    for root, folders, files in os.walk(folder, followlinks=True):
        real = os.path.realpath(root)
        if real in seen:
            folders.clear()  # do not descend: in place, so that os.walk skips them
            continue
        seen.add(real)
        folders.sort()  # the first of two links to one folder is the one kept, whatever the file system's order
        found += [os.path.join(root, name) for name in files if name.endswith(_NIFTI_SUFFIXES)]
    images = sorted(file for file in found if os.path.isfile(file))
    broken = sorted(set(found) - set(images))
    note = f" (left out {len(broken)} broken link(s): {', '.join(broken)})" if broken else ""
    if is_main():
        logger.info(f"found {len(images)} volumes in {folder}{note}")
    return images


def load_datalist(source: str | os.PathLike, key: str = "training") -> list[dict]:
    """Reads a list of volumes as `[{"image": path, ...}, ...]` with absolute paths.

    Args:
        source: an MSD-style datalist JSON file, a folder containing `dataset.json`, or a plain folder of NIfTI files
            (`*.nii`, `*.nii.gz`, searched recursively through symbolic links, sorted by path), which becomes
            `[{"image": path}, ...]`.
        key: the list to read from a JSON datalist (e.g. "training", "validation", "test").

    Relative paths in a JSON datalist are resolved against the JSON file's folder.

    Raises:
        FileNotFoundError: `source`, or a file listed in the datalist, does not exist, or a folder holds no NIfTI.
        ValueError: the JSON is invalid, has no non-empty list under `key`, or an item has no "image".
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise InputNotFoundError(f"Dataset source {path} does not exist: give a datalist JSON or a NIfTI folder.")
    if path.is_dir():
        if (path / "dataset.json").is_file():
            path = path / "dataset.json"
        else:
            images = _scan_nifti(path)
            if not images:
                raise InputNotFoundError(
                    f"No NIfTI files (*.nii, *.nii.gz) and no dataset.json found in {path}: "
                    "point to a folder holding the volumes or to a datalist JSON."
                )
            return [{"image": image} for image in images]
    try:
        content = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InvalidInputError(f"Datalist {path} is not valid JSON ({e}): fix or regenerate it.") from e
    if not isinstance(content, dict) or not isinstance(content.get(key), list) or not content[key]:
        found = sorted(content) if isinstance(content, dict) else type(content).__name__
        raise InvalidInputError(f"Datalist {path} has no non-empty list under the key '{key}' (found: {found}).")
    items = load_decathlon_datalist(path, is_segmentation=True, data_list_key=key)
    for i, item in enumerate(items):
        if "image" not in item:
            raise InvalidInputError(f"Item {i} of '{key}' in {path} has no 'image' entry: {item}.")
        for name in ("image", "label"):
            for file in ensure_tuple(item.get(name, ())):
                if not os.path.exists(file):
                    raise InputNotFoundError(f"The {name} {file} listed in {path} ('{key}' item {i}) does not exist.")
    return items


class CheckVolumed(MapTransform):
    """Checks a loaded, channel-first image before resampling; the messages name its file.

    - A 4D image (several volumes, e.g. a time series) or a 2D image is refused with a `BundleError`: every workflow
      needs one 3D volume per file. Taking the first volume silently would train on a part of the data without saying.
    - An image with NaN or infinite values is refused.
    - A volume that resampling to `pixdim` would shrink to less than one voxel along an axis is refused.
    - A volume that resampling would enlarge more than `MAX_GROWTH` times along an axis (e.g. 100 mm slices resampled
      to 1.5 mm) gets a `VolumeWarning`: it is usable, but its header's spacing is probably wrong.

    Args:
        keys: the image key; the image is a (C, X, Y, Z) MetaTensor oriented like `pixdim`.
        pixdim: the spacing (mm) the volume is resampled to next.
    """

    def __init__(self, keys: KeysCollection, pixdim: Sequence[float]) -> None:
        super().__init__(keys)
        self.pixdim = np.asarray(pixdim, dtype=np.float64)

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            image = d[key]
            file = image.meta.get("filename_or_obj", "<in memory>") if isinstance(image, MetaTensor) else "<in memory>"
            if image.ndim != 4:
                raise BundleError(f"{file}: a 3D volume is required, got an image of shape {tuple(image.shape[1:])}.")
            if image.shape[0] != 1:
                raise BundleError(
                    f"{file} is a 4D image holding {image.shape[0]} volumes: a 3D volume is required. Split it into "
                    "one file per volume (and list the ones to use), or remove it from the dataset."
                )
            if not torch.isfinite(image).all():
                raise BundleError(f"{file} holds non-finite values (NaN or inf): fix it or remove it from the dataset.")
            spacing = np.asarray(image.pixdim, dtype=np.float64) if isinstance(image, MetaTensor) else self.pixdim
            extent = np.asarray(image.shape[1:]) * spacing
            target = tuple(self.pixdim.tolist())  # plain floats: numpy 2 would print np.float64(1.5)
            for axis in range(3):
                if extent[axis] < self.pixdim[axis]:
                    raise BundleError(
                        f"{file} shrinks to nothing when resampled to {target} mm: it spans "
                        f"{extent[axis]:.3g} mm along axis {axis}, less than one voxel. Check the voxel size in its "
                        "header, or remove it from the dataset."
                    )
                growth = spacing[axis] / self.pixdim[axis]
                if growth > MAX_GROWTH:
                    warnings.warn(
                        f"{file}: resampling to {target} mm enlarges it {growth:.0f}x along axis {axis} "
                        f"(its voxels are {spacing[axis]:.3g} mm there); check the voxel size in its header.",
                        VolumeWarning,
                        stacklevel=1,  # about the file, not the code: the caller's line would add nothing
                    )
        return d


class BodyMaskd(MapTransform):
    """Adds the body mask of a [0, 1]-scaled image: everything but the dark voxels connected to the in-plane border.

    Voxels below `threshold` are flood-filled from the x/y faces of each axial slice, with 4-connectivity inside the
    slice only; the body is the complement. Dark regions enclosed in-plane (lungs, bowel gas, ventricles) thus stay in
    the body even where they reach the z faces of the volume (a 3D hole filling would flood them) or join outside air
    in another slice (the authors' CT code floods in 3D from the in-plane border and would drop them).

    Bright specks in the air (noise, ghosting, a marker) would count as body, stretch the crop to the body's bounding
    box and host anchors; so, as the authors' MRI code does, small connected components (26-connected) are dropped:
    those with fewer voxels than `min_component_fraction` of the largest one. Separate large parts (two legs, arms
    beside an abdominal field of view) stay.

    Args:
        keys: the image key; the image is (1, X, Y, Z) with intensities in [0, 1].
        body_key: where to store the mask: a (1, X, Y, Z) uint8 tensor (1 = body) with the image's metadata.
        threshold: intensity below which a voxel may be air.
        min_component_fraction: components smaller than this fraction of the largest are not body; 0 keeps all.
    """

    # In-plane face connectivity: components never join across axial slices.
    _STRUCTURE = np.zeros((3, 3, 3), dtype=bool)
    _STRUCTURE[:, :, 1] = ndimage.generate_binary_structure(2, 1)

    def __init__(
        self,
        keys: KeysCollection = "image",
        body_key: str = "body",
        threshold: float = 0.3,
        min_component_fraction: float = 0.01,
    ) -> None:
        super().__init__(keys)
        self.body_key = body_key
        self.threshold = threshold
        self.min_component_fraction = min_component_fraction

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            dark = convert_to_numpy(d[key])[0] < self.threshold
            labels, num = ndimage.label(dark, structure=self._STRUCTURE)
            on_border = np.zeros(num + 1, dtype=bool)
            on_border[np.concatenate([labels[[0, -1]].ravel(), labels[:, [0, -1]].ravel()])] = True
            on_border[0] = False  # label 0 = bright voxels
            body = ~on_border[labels]
            parts, num = ndimage.label(body, structure=np.ones((3, 3, 3), dtype=bool))
            if num > 1:
                sizes = np.bincount(parts.ravel())
                sizes[0] = 0  # label 0 = not body
                body = (sizes >= self.min_component_fraction * sizes.max())[parts]
            d[self.body_key] = convert_to_dst_type(body[None], d[key], dtype=torch.uint8)[0]
        return d


class ForegroundChannelsd(MapTransform):
    """
    Turns a label map (1, X, Y, Z) with values 0..num_classes into (num_classes, X, Y, Z) float 0/1 channels, one per
    foreground class, for per-class sigmoid outputs. MONAI's ``AsDiscreted(to_onehot=...)`` keeps a background channel.

    Args:
        keys: label keys.
        num_classes: number of foreground classes.
    """

    def __init__(self, keys: KeysCollection, num_classes: int) -> None:
        super().__init__(keys)
        self.num_classes = num_classes

    def __call__(self, data: Mapping[Hashable, torch.Tensor]) -> dict[Hashable, torch.Tensor]:
        d = dict(data)
        for key in self.key_iterator(d):
            classes = torch.arange(1, self.num_classes + 1, device=d[key].device).view(-1, 1, 1, 1)
            d[key] = (d[key] == classes).float()
        return d


def preprocessing(
    modality: str,
    patch_size: Sequence[int],
    image_key: str = "image",
    label_key: str | None = None,
    pixdim: Sequence[float] | None = None,
) -> Compose:
    """Deterministic, invertible preprocessing of a datalist item.

    Loads the image (and label), orients to RAS, checks it (`CheckVolumed`: one 3D volume, sensible spacing),
    resamples to the preset spacing (bilinear image, nearest label), clips and scales intensities to [0, 1] by the
    preset, adds the `body` mask, crops image, body and label to the body's bounding box and pads them to at least
    `patch_size` (a small volume is padded with 0, not dropped).

    Args:
        modality: a key of `PRESETS`: "ct" (DHR's [-175, 250] HU), "ct_wide" (vox2vec's [-1350, 1000] HU) or "mri".
        patch_size: minimum spatial size (X, Y, Z) in voxels after cropping.
        image_key: datalist key of the image.
        label_key: datalist key of the label, or None for unlabelled data.
        pixdim: voxel spacing in mm, overriding the preset's.

    Returns:
        a Compose producing `image` (1, X, Y, Z) float32 in [0, 1], `body` (1, X, Y, Z) uint8 and, with `label_key`,
        the label (1, X, Y, Z) on the same grid.
    """
    if modality not in PRESETS:
        raise InvalidInputError(f"Unknown modality={modality!r}: the key `modality` must be one of {sorted(PRESETS)}.")
    preset = PRESETS[modality]
    keys = [image_key] + ([label_key] if label_key else [])
    spacing = preset["pixdim"] if pixdim is None else pixdim
    if "a_min" in preset:  # a fixed HU range (CT presets)
        scale = ScaleIntensityRanged(image_key, preset["a_min"], preset["a_max"], b_min=0.0, b_max=1.0, clip=True)
    else:
        scale = ScaleIntensityRangePercentilesd(
            image_key, preset["lower"], preset["upper"], b_min=0.0, b_max=1.0, clip=True, relative=False
        )
    return Compose(
        [
            LoadImaged(keys, ensure_channel_first=True, image_only=True),
            Orientationd(keys, axcodes=preset["axcodes"], labels=None),
            CheckVolumed(image_key, pixdim=spacing),
            Spacingd(keys, pixdim=spacing, mode=["bilinear", "nearest"][: len(keys)]),
            scale,
            BodyMaskd(image_key, body_key="body"),
            CropForegroundd([*keys, "body"], source_key="body"),
            SpatialPadd([*keys, "body"], spatial_size=patch_size),
            EnsureTyped(image_key, dtype=torch.float32),
        ]
    )
