"""The preprocessed-volume cache of pretraining: each volume preprocessed once into memory-mappable arrays.

:func:`prepare_volumes` preprocesses every volume of a datalist once (`scripts.data.preprocessing.preprocessing`);
:func:`open_volume` memory-maps an entry as (1, X, Y, Z) views, so that a batch reads only the boxes it cuts. Layout::

    <cache_dir>/<dataset>-<modality>-<hash>/     one folder per dataset source and transform, shared by runs
        <file name>-<hash>/                      one entry per volume
            image.npy    float16 (Z, X, Y): intensities in [0, 1]
            body.npy     uint8 (Z, X, Y): body mask (1 = body)
            meta.json    shape (X, Y, Z), affine, source file with its size and modification time, ...

The folder's hash covers the dataset's folder, the preset, the patch size (small volumes are padded to it) and
`CACHE_VERSION`; the entry's hash covers the source file's absolute path, size and modification time, so a replaced scan
is preprocessed again and its old entry removed. An entry is written under a temporary name and renamed when complete.
A volume unusable for pretraining (no body voxels, constant intensity) gets an entry with only ``meta.json`` and the
reason, and later runs skip it. Deleting ``cache_dir`` or any folder in it clears it; the next run rebuilds what is
missing. Under ``torchrun`` rank 0 prepares while the others wait, then read; warnings come from rank 0 alone.
"""

from __future__ import annotations

import hashlib
import json
import logging
import mmap
import os
import re
import shutil
import warnings
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from scripts.data.preprocessing import PRESETS, VolumeWarning, preprocessing
from scripts.utils.distributed import is_main
from scripts.utils.errors import BundleError

logger = logging.getLogger(__name__)

__all__ = ["CACHE_VERSION", "cache_folder", "entry_name", "open_volume", "prepare_volumes", "write_entry"]

# Part of every folder's hash: raise it when preprocessing changes what is stored, so old entries are not used.
CACHE_VERSION = 1

_TEMPORARY = re.compile(r"\.tmp-(\d+)-.*")


def _hash(*values: object) -> str:
    return hashlib.blake2b(json.dumps(values, sort_keys=True).encode(), digest_size=6).hexdigest()


def _readable(name: str) -> str:
    """A file or folder name reduced to safe characters, for the human-readable part of a cache name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)[:60] or "volume"


def cache_folder(
    cache_dir: str | os.PathLike,
    datalist: Sequence[dict],
    modality: str,
    patch_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
) -> Path:
    """The folder of one dataset source (the folder holding the datalist's images) and one preprocessing transform."""
    if modality not in PRESETS:
        raise BundleError(f"Unknown modality={modality!r}: the key `modality` must be one of {sorted(PRESETS)}.")
    source = os.path.commonpath([os.path.dirname(os.path.abspath(item["image"])) for item in datalist])
    preset = {**PRESETS[modality], **({"pixdim": list(pixdim)} if pixdim is not None else {})}
    key = _hash(CACHE_VERSION, source, preset, [int(p) for p in patch_size])
    return Path(cache_dir) / f"{_readable(os.path.basename(source))}-{modality}-{key}"


def entry_name(file: str | os.PathLike) -> str:
    """The entry of a source file: its name and a hash of its absolute path, size and modification time."""
    path = os.path.abspath(file)
    stat = os.stat(path)
    stem = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
    return f"{_readable(stem)}-{_hash(path, stat.st_size, stat.st_mtime_ns)}"


def write_entry(folder: Path, name: str, meta: dict, image: np.ndarray | None, body: np.ndarray | None) -> Path:
    """Writes entry ``folder/name`` atomically: ``meta.json`` and, unless None, the (X, Y, Z) arrays stored Z first.

    Args:
        folder: the cache folder.
        name: the entry's name (:func:`entry_name`).
        meta: JSON-serialisable description of the volume.
        image: (X, Y, Z) intensities in [0, 1], stored as float16; None for a skipped volume.
        body: (X, Y, Z) body mask, stored as uint8.

    Returns:
        the entry's path. If another process wrote the same entry meanwhile, its copy is kept (they are equal).
    """
    final = folder / name
    temporary = folder / f".tmp-{os.getpid()}-{name}"
    shutil.rmtree(temporary, ignore_errors=True)
    temporary.mkdir(parents=True)
    if image is not None and body is not None:
        np.save(temporary / "image.npy", np.ascontiguousarray(image.transpose(2, 0, 1), dtype=np.float16))
        np.save(temporary / "body.npy", np.ascontiguousarray(body.transpose(2, 0, 1), dtype=np.uint8))
    (temporary / "meta.json").write_text(json.dumps(meta, indent=1))
    try:
        os.rename(temporary, final)  # atomic; fails if `final` exists
    except OSError:
        if not (final / "meta.json").is_file():
            raise
        shutil.rmtree(temporary, ignore_errors=True)
    return final


def _load(path: Path, in_memory: bool) -> np.ndarray:
    if in_memory:
        return np.load(path)
    array = np.load(path, mmap_mode="r")
    if hasattr(mmap, "MADV_RANDOM") and isinstance(getattr(array, "_mmap", None), mmap.mmap):
        # Boxes are not sequential reads: the kernel's read-around would fetch about 4x the pages a box uses.
        array._mmap.madvise(mmap.MADV_RANDOM)
    return array


def open_volume(entry: str | os.PathLike, in_memory: bool = False) -> dict[str, np.ndarray]:
    """The arrays of a cache entry as (1, X, Y, Z) views: ``image`` float16 in [0, 1], ``body`` uint8.

    Args:
        entry: an entry folder returned by :func:`prepare_volumes`.
        in_memory: read the arrays into memory; otherwise memory-map them, so that indexing reads only what it cuts.
    """
    entry = Path(entry)
    return {key: _load(entry / f"{key}.npy", in_memory).transpose(1, 2, 0)[None] for key in ("image", "body")}


class _Preparation(torch.utils.data.Dataset):
    """Item i: preprocesses volume i into the cache unless its entry exists; returns its status, never the volume."""

    def __init__(
        self, datalist: Sequence[dict], folder: Path, modality: str, patch_size: Sequence[int], pixdim
    ) -> None:
        self.datalist = datalist
        self.folder = folder
        self.modality = modality
        self.transform = preprocessing(modality, patch_size, pixdim=pixdim)

    def __len__(self) -> int:
        return len(self.datalist)

    def __getitem__(self, i: int) -> dict:
        file = self.datalist[i]["image"]
        try:
            name = entry_name(file)
        except OSError as e:
            return {"error": f"{type(e).__name__}: {e}"}
        if (self.folder / name / "meta.json").is_file():
            meta = json.loads((self.folder / name / "meta.json").read_text())
        else:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                try:
                    item = self.transform({"image": file})
                except Exception as e:
                    while e.__cause__ is not None:  # MONAI wraps the reader's error in "applying transform ..."
                        e = e.__cause__
                    return {"error": str(e) if isinstance(e, BundleError) else f"{type(e).__name__}: {e}"}
            image, body = item["image"][0].numpy(), item["body"][0].numpy().astype(bool)
            # Our checks name the file already; anything else raised while preprocessing gets the file's name.
            notes = list(
                dict.fromkeys(
                    str(w.message) if issubclass(w.category, VolumeWarning) else f"{file}: {w.message}" for w in caught
                )
            )
            meta = {
                "source": os.path.abspath(file),
                "size": os.stat(file).st_size,
                "mtime_ns": os.stat(file).st_mtime_ns,
                "modality": self.modality,
                "shape": list(image.shape),
                "affine": item["image"].affine.tolist(),
                "body_voxels": int(body.sum()),
                "warnings": notes,
                "skipped": "",
            }
            if not body.any():
                meta["skipped"] = f"Skipping {file}: no body voxels (the scaled image is below the threshold)."
            elif np.ptp(image[body]) == 0:  # e.g. constant HU: all body after scaling, nothing to learn
                meta["skipped"] = (
                    f"Skipping {file}: its intensity is constant (zero range after the '{self.modality}' preset's "
                    "scaling), so there is nothing to learn from it."
                )
            arrays = (None, None) if meta["skipped"] else (image, body)
            write_entry(self.folder, name, meta, *arrays)
        return {"error": "", "entry": str(self.folder / name), "skipped": meta["skipped"], "warnings": meta["warnings"]}


def _remove_leftovers(folder: Path, datalist: Sequence[dict], entries: set[str]) -> None:
    """Removes temporary folders of dead processes and the old entries of source files that were replaced."""
    sources = {os.path.abspath(item["image"]) for item in datalist}
    for path in folder.iterdir():
        if match := _TEMPORARY.fullmatch(path.name):
            try:
                os.kill(int(match.group(1)), 0)
            except ProcessLookupError:  # its writer is gone (killed): a half entry that was never renamed
                shutil.rmtree(path, ignore_errors=True)
        elif path.name not in entries and (path / "meta.json").is_file():
            replaced = json.loads((path / "meta.json").read_text()).get("source") in sources
            if replaced:  # the same file with another size or modification time: its current entry is in `entries`
                shutil.rmtree(path, ignore_errors=True)


def prepare_volumes(
    datalist: Sequence[dict],
    cache_dir: str | os.PathLike,
    modality: str,
    patch_size: Sequence[int],
    num_workers: int = 0,
    pixdim: Sequence[float] | None = None,
) -> list[str]:
    """Preprocesses every volume of ``datalist`` into the cache once and returns the entries of the usable ones.

    Volumes already in the cache (same file, size and modification time; same transform) are not read again. Every
    volume is checked before any is refused, so that one run reports every bad file.

    Args:
        datalist: ``[{"image": path}, ...]`` (`scripts.data.preprocessing.load_datalist`).
        cache_dir: the cache's root folder (config key ``cache_dir``).
        modality: preset name (`scripts.data.preprocessing.PRESETS`).
        patch_size: (3,) patch size in voxels; smaller volumes are padded to it.
        num_workers: processes for the preprocessing; 0 runs it in this process.
        pixdim: voxel spacing in mm overriding the preset's.

    Raises:
        BundleError: some volumes are missing, unreadable, corrupt, 4D, non-finite or shrink to nothing when resampled
            (`scripts.data.preprocessing.CheckVolumed`; the message names each file and the problem), or no volume is
            usable.

    Returns:
        entry folders (for :func:`open_volume`), in datalist order, without the skipped volumes (each is warned about,
        as are suspicious volumes, see `scripts.data.preprocessing.CheckVolumed`).
    """
    folder = cache_folder(cache_dir, datalist, modality, patch_size, pixdim)
    folder.mkdir(parents=True, exist_ok=True)
    preparation = _Preparation(datalist, folder, modality, patch_size, pixdim)
    # a generator of its own: a loader draws its workers' base seed, which must not move torch's global RNG
    loader = torch.utils.data.DataLoader(
        preparation, batch_size=None, num_workers=num_workers, generator=torch.Generator()
    )
    statuses = list(loader)
    files = [item["image"] for item in datalist]
    # our checks name the file already; a reader's error (e.g. a truncated gzip stream) gets it in front
    errors = [
        s["error"] if str(file) in s["error"] else f"{file}: {s['error']}"
        for file, s in zip(files, statuses, strict=True)
        if s["error"]
    ]
    if errors:
        raise BundleError(
            f"{len(errors)} of {len(files)} volumes cannot be used; fix or remove them from the datalist:\n"
            + "\n".join(errors)
        )
    usable = [s["entry"] for s in statuses if not s["skipped"]]
    if is_main():
        _remove_leftovers(folder, datalist, {Path(s["entry"]).name for s in statuses})
        for s in statuses:
            for message in [*s["warnings"], s["skipped"]]:
                if message:
                    warnings.warn(message, VolumeWarning, stacklevel=1)  # about a file: the caller's line is no help
        skipped = [str(file) for file, s in zip(files, statuses, strict=True) if s["skipped"]]
        note = f" ({len(skipped)} skipped: {', '.join(skipped)}; see the warnings)" if skipped else ""
        logger.info(f"using {len(usable)} of {len(files)} volumes{note}; cache folder {folder}")
    if not usable:
        raise BundleError(
            f"None of the {len(files)} volumes is usable for pretraining (see the warnings above): check the "
            "`modality` preset and the data."
        )
    return usable
