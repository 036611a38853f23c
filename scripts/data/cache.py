"""The preprocessed-volume cache of pretraining: each volume preprocessed once into memory-mappable arrays.

:func:`prepare_volumes` preprocesses every volume of a datalist once (`scripts.data.preprocessing.preprocessing`);
:func:`open_volume` memory-maps an entry as (1, X, Y, Z) views, so that a batch reads only the boxes it cuts. Layout::

    <cache_dir>/<dataset>-<modality>-<hash>/     one folder per dataset source and transform, shared by runs
        <file name>-<hash>/                      one entry per volume
            image.npy    float16 (Z, X, Y): intensities in [0, 1]
            body.npy     uint8 (Z, X, Y): body mask (1 = body)
            meta.json    shape (X, Y, Z), affine, source file with its size and modification time, ...

The folder's hash covers the dataset's folder, the preset, the patch size (small volumes are padded to it), MONAI's
version and the code that makes an entry (:func:`definition_digest`), so a changed transform never reads old entries;
the entry's hash covers the source file's absolute path, size and modification time, so a replaced scan is
preprocessed again and its old entry removed. An entry is written under a temporary name that carries the host and the
process (``.tmp-<host>-<pid>-<name>``) and renamed when complete; a temporary left by a killed writer is removed by a
later run on the same host once it is an hour old (another host's writer may be alive: the cache can be on a
filesystem that several machines share). An entry whose files do not match its ``meta.json`` (a cut or missing array,
a broken ``meta.json``) is warned about by name and built again. A volume unusable for pretraining (no body voxels,
constant intensity) gets an entry with only ``meta.json`` and the reason, and later runs skip it. Deleting
``cache_dir`` or any folder in it clears it; the next run rebuilds what is missing.

Under ``torchrun`` rank 0 prepares while the other ranks poll the cache folder until every entry is there: no rank
waits in a collective, whose timeout a long preparation would exceed. ``python -m scripts.data.cache`` prepares a
dataset ahead of training, on all the CPUs, with a progress bar; stopped, it resumes where it was.
"""

import argparse


def build_parser() -> argparse.ArgumentParser:
    """The command line; built before torch and MONAI are imported (see the imports below)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.data.cache",
        description="Prepare the preprocessed-volume cache of a dataset ahead of pretraining (resumable).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("dataset_dir", help="datalist JSON, folder with dataset.json, or folder of NIfTI files")
    parser.add_argument("--modality", choices=["ct", "ct_wide", "mri"], default="mri", help="as pretraining's")
    parser.add_argument("--patch_size", type=int, nargs=3, default=[128, 128, 32], help="as pretraining's")
    parser.add_argument("--cache_dir", default="data/cache", help="as pretraining's cache_dir")
    parser.add_argument("--num_workers", type=int, help="preprocessing processes; default: every CPU of this process")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer before torch and MONAI are imported

import ast  # noqa: E402
import contextlib  # noqa: E402
import hashlib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import logging  # noqa: E402
import mmap  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
import shutil  # noqa: E402
import socket  # noqa: E402
import textwrap  # noqa: E402
import time  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402

import monai  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
from scripts.data import preprocessing as _preprocessing  # noqa: E402
from scripts.data.preprocessing import PRESETS, VolumeWarning, load_datalist, preprocessing  # noqa: E402
from scripts.utils import errors, log  # noqa: E402
from scripts.utils.distributed import is_main  # noqa: E402
from scripts.utils.errors import BundleError, OutOfSpaceError, out_of_space  # noqa: E402
from tqdm import tqdm  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = [
    "CacheWarning",
    "definition_digest",
    "cache_folder",
    "entry_name",
    "read_entry",
    "open_volume",
    "prepare_volumes",
    "wait_for_entries",
    "write_entry",
    "main",
]

# A temporary entry of this host older than this many seconds is a killed writer's: writing an entry takes seconds.
STALE_S = 3600.0
# A rank waiting for rank 0's entries gives up after this many seconds without a new one (one volume takes seconds).
STALL_S = 1800.0
POLL_S = 2.0

_HOST = re.sub(r"[^A-Za-z0-9_.]+", "_", socket.gethostname())[:60] or "host"
_TEMPORARY = re.compile(r"\.tmp-([A-Za-z0-9_.]+)-(\d+)-.*")
_ARRAYS = {"image": np.float16, "body": np.uint8}


class CacheWarning(UserWarning):
    """A damaged cache entry, built again; the message names it."""


def _hash(*values: object) -> str:
    return hashlib.blake2b(json.dumps(values, sort_keys=True).encode(), digest_size=6).hexdigest()


def _readable(name: str) -> str:
    """A file or folder name reduced to safe characters, for the human-readable part of a cache name."""
    return re.sub(r"[^A-Za-z0-9_.]+", "_", name)[:60] or "volume"


def _code(obj: object) -> str:
    """The source of a function or class without its docstrings and comments (editing those changes nothing)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(obj)))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.ClassDef) and ast.get_docstring(node) is not None:
            node.body = node.body[1:] or [ast.Pass()]
    return ast.unparse(tree)


def definition_digest() -> str:
    """A digest of the code that makes an entry: the preprocessing transform and its checks, and how an entry is
    computed and stored. Part of every folder's key, so that a changed transform writes a new folder instead of
    reading entries it would not have made (tests/test_cache.py pins it)."""
    code = (
        _preprocessing.preprocessing,
        _preprocessing.CheckVolumed,
        _preprocessing.BodyMaskd,
        _Preparation,
        write_entry,
        read_entry,
    )
    return _hash(*map(_code, code))


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
    key = _hash(definition_digest(), monai.__version__, source, preset, [int(p) for p in patch_size])
    return Path(cache_dir) / f"{_readable(os.path.basename(source))}-{modality}-{key}"


def entry_name(file: str | os.PathLike) -> str:
    """The entry of a source file: its name and a hash of its absolute path, size and modification time."""
    path = os.path.abspath(file)
    stat = os.stat(path)
    stem = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
    return f"{_readable(stem)}-{_hash(path, stat.st_size, stat.st_mtime_ns)}"


def _temporary(folder: Path, name: str) -> Path:
    """A name no other process, on this host or another, uses for the same entry."""
    return folder / f".tmp-{_HOST}-{os.getpid()}-{name}"


def write_entry(folder: Path, name: str, meta: dict, image: np.ndarray | None, body: np.ndarray | None) -> Path:
    """Writes entry ``folder/name`` atomically: ``meta.json`` and, unless None, the (X, Y, Z) arrays stored Z first.

    Args:
        folder: the cache folder.
        name: the entry's name (:func:`entry_name`).
        meta: JSON-serialisable description of the volume; with arrays, its ``shape`` is their (X, Y, Z) shape.
        image: (X, Y, Z) intensities in [0, 1], stored as float16; None for a skipped volume.
        body: (X, Y, Z) body mask, stored as uint8.

    Returns:
        the entry's path. If another process wrote the same entry meanwhile, its copy is kept (they are equal).

    Raises:
        OutOfSpaceError: no room for it (nothing of it is left).
    """
    final = folder / name
    temporary = _temporary(folder, name)
    shutil.rmtree(temporary, ignore_errors=True)
    needed = 0 if image is None else image.size * 3  # float16 image + uint8 mask
    try:
        with out_of_space(final, needed, "free space and rerun the same command: it goes on where it stopped"):
            temporary.mkdir(parents=True)
            if image is not None and body is not None:
                for key, array in (("image", image), ("body", body)):
                    stored = np.ascontiguousarray(array.transpose(2, 0, 1), dtype=_ARRAYS[key])
                    np.save(temporary / f"{key}.npy", stored)
            (temporary / "meta.json").write_text(json.dumps(meta, indent=1))
    except BaseException:
        shutil.rmtree(temporary, ignore_errors=True)
        raise
    try:
        os.rename(temporary, final)  # atomic; fails if `final` exists
    except OSError:
        shutil.rmtree(temporary, ignore_errors=True)
        if not (final / "meta.json").is_file():
            raise
    return final


def read_entry(entry: Path) -> dict:
    """The ``meta.json`` of a complete entry, after checking that its arrays are whole and of its shape.

    Reads the arrays' headers and sizes only. Raises ValueError saying what is wrong: ``meta.json`` missing or
    unreadable, an array missing, of another shape or type than ``meta.json`` says, or shorter or longer than its
    header says (a cut file)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        x, y, z = meta["shape"] if not meta.get("skipped") else (0, 0, 0)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"meta.json is missing or unreadable ({type(e).__name__}: {e})") from e
    if meta.get("skipped"):
        return meta
    for key, dtype in _ARRAYS.items():
        file = entry / f"{key}.npy"
        try:
            with open(file, "rb") as f:
                version = np.lib.format.read_magic(f)  # np.save writes version 1.0 unless the header is huge
                header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, fortran, stored = header(f)
                size = f.tell() + int(np.prod(shape)) * stored.itemsize
                actual = os.fstat(f.fileno()).st_size
        except (OSError, ValueError) as e:
            raise ValueError(f"{file.name} is missing or unreadable ({type(e).__name__}: {e})") from e
        if tuple(shape) != (z, x, y) or stored != dtype or fortran:
            raise ValueError(f"{file.name} holds {stored} {tuple(shape)}, meta.json says {np.dtype(dtype)} {(z, x, y)}")
        if actual != size:
            raise ValueError(f"{file.name} has {actual} bytes, its header says {size}")
    return meta


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

    Raises:
        BundleError: the entry was damaged after it was prepared; the message names it.
    """
    entry = Path(entry)
    try:
        return {key: _load(entry / f"{key}.npy", in_memory).transpose(1, 2, 0)[None] for key in _ARRAYS}
    except (OSError, ValueError) as e:
        raise BundleError(
            f"Cache entry {entry} is damaged ({type(e).__name__}: {e}): rerun the same command; the next run "
            "builds it again."
        ) from e


class _Preparation(torch.utils.data.Dataset):
    """Item i: preprocesses volume i into the cache unless its entry exists whole; returns its status, never the
    volume. A damaged entry is set aside and built again (``damaged`` names it)."""

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
        entry, damaged = self.folder / name, ""
        if entry.exists():
            try:
                meta = read_entry(entry)
                return self._status(entry, meta, built=False, damaged="")
            except ValueError as e:
                damaged = f"Cache entry {entry} of {file} is damaged ({e}): building it again."
                aside = _temporary(self.folder, name)
                shutil.rmtree(aside, ignore_errors=True)
                with contextlib.suppress(OSError):  # another process set it aside first
                    os.rename(entry, aside)  # out of the way at once: no reader opens it half removed
                shutil.rmtree(aside, ignore_errors=True)
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
        try:
            entry = write_entry(self.folder, name, meta, *arrays)
        except OutOfSpaceError as e:  # raised by the caller: a loader's worker would turn it into a traceback
            return {"error": "", "out_of_space": str(e)}
        return self._status(entry, meta, built=True, damaged=damaged)

    @staticmethod
    def _status(entry: Path, meta: dict, built: bool, damaged: str) -> dict:
        return {
            "error": "",
            "entry": str(entry),
            "skipped": meta["skipped"],
            "warnings": meta["warnings"],
            "built": built,
            "damaged": damaged,
        }


def _remove_leftovers(folder: Path, datalist: Sequence[dict], entries: set[str]) -> None:
    """Removes this host's temporaries older than `STALE_S` (their writers were killed) and the old entries of source
    files that were replaced. Another host's temporaries are left alone: their writers may be running. Whatever
    another process removed or changed meanwhile is skipped."""
    sources = {os.path.abspath(item["image"]) for item in datalist}
    for path in folder.iterdir():
        try:
            if match := _TEMPORARY.fullmatch(path.name):
                if match.group(1) == _HOST and time.time() - path.stat().st_mtime > STALE_S:
                    shutil.rmtree(path, ignore_errors=True)
            elif path.name not in entries and (path / "meta.json").is_file():
                source = json.loads((path / "meta.json").read_text()).get("source")
                if source in sources:  # the same file with another size or modification time: a replaced scan
                    shutil.rmtree(path, ignore_errors=True)
        except (OSError, ValueError):
            continue


def wait_for_entries(datalist: Sequence[dict], folder: Path, stall_s: float = STALL_S) -> list[dict]:
    """Waits until every volume of `datalist` has a whole entry in `folder` (written by rank 0), polling the folder
    every `POLL_S` seconds: the wait of the ranks other than 0, outside any collective, for as long as entries keep
    coming.

    Returns:
        the ``meta.json`` of each entry, in datalist order, with its path under ``entry``.

    Raises:
        BundleError: no new entry appeared for `stall_s` seconds (rank 0 stopped, or writes another folder).
    """
    names = [entry_name(item["image"]) for item in datalist]
    metas: dict[int, dict] = {}
    last = time.monotonic()
    while len(metas) < len(names):
        for i, name in enumerate(names):
            if i not in metas and (folder / name).exists():
                try:
                    metas[i] = {**read_entry(folder / name), "entry": str(folder / name)}
                    last = time.monotonic()
                except ValueError:
                    pass  # being built again by rank 0
        if len(metas) < len(names):
            if time.monotonic() - last > stall_s:
                raise BundleError(
                    f"Waited {stall_s:.0f} s for rank 0 to add an entry to the cache folder {folder} "
                    f"({len(metas)} of {len(names)} there): check rank 0's output, and that cache_dir is on a "
                    "filesystem every machine shares, with the same code and MONAI version on each."
                )
            time.sleep(POLL_S)
    return [metas[i] for i in range(len(names))]


def prepare_volumes(
    datalist: Sequence[dict],
    cache_dir: str | os.PathLike,
    modality: str,
    patch_size: Sequence[int],
    num_workers: int = 0,
    pixdim: Sequence[float] | None = None,
    progress: bool = False,
) -> list[str]:
    """Preprocesses every volume of ``datalist`` into the cache once and returns the entries of the usable ones.

    Volumes already in the cache (same file, size and modification time; same transform) are not read again. Every
    volume is checked before any is refused, so that one run reports every bad file. Under ``torchrun`` rank 0
    prepares and the other ranks wait for its entries on disk (:func:`wait_for_entries`).

    Args:
        datalist: ``[{"image": path}, ...]`` (`scripts.data.preprocessing.load_datalist`).
        cache_dir: the cache's root folder (config key ``cache_dir``).
        modality: preset name (`scripts.data.preprocessing.PRESETS`).
        patch_size: (3,) patch size in voxels; smaller volumes are padded to it.
        num_workers: processes for the preprocessing; 0 runs it in this process.
        pixdim: voxel spacing in mm overriding the preset's.
        progress: show a progress bar on a terminal.

    Raises:
        BundleError: some volumes are missing, unreadable, corrupt, 4D, non-finite or shrink to nothing when resampled
            (`scripts.data.preprocessing.CheckVolumed`; the message names each file and the problem), or no volume is
            usable.
        OutOfSpaceError: no room for an entry (the entries written so far are kept).

    Returns:
        entry folders (for :func:`open_volume`), in datalist order, without the skipped volumes (each is warned about,
        as are suspicious volumes, see `scripts.data.preprocessing.CheckVolumed`).
    """
    folder = cache_folder(cache_dir, datalist, modality, patch_size, pixdim)
    if not is_main():
        return [meta["entry"] for meta in wait_for_entries(datalist, folder) if not meta["skipped"]]
    folder.mkdir(parents=True, exist_ok=True)
    preparation = _Preparation(datalist, folder, modality, patch_size, pixdim)
    # a generator of its own: a loader draws its workers' base seed, which must not move torch's global RNG
    loader = torch.utils.data.DataLoader(
        preparation, batch_size=None, num_workers=num_workers, generator=torch.Generator()
    )
    start = time.monotonic()
    # disable=None: a bar on a terminal only, no carriage returns in a log file
    statuses = list(tqdm(loader, total=len(datalist), desc="cache", unit="volume", disable=None if progress else True))
    seconds = time.monotonic() - start
    if full := [s["out_of_space"] for s in statuses if "out_of_space" in s]:
        raise OutOfSpaceError(full[0])
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
    _remove_leftovers(folder, datalist, {Path(s["entry"]).name for s in statuses})
    for s in statuses:
        if s["damaged"]:
            warnings.warn(s["damaged"], CacheWarning, stacklevel=1)
        for message in [*s["warnings"], s["skipped"]]:
            if message:
                warnings.warn(message, VolumeWarning, stacklevel=1)  # about a file: the caller's line is no help
    built = sum(s["built"] for s in statuses)
    if built:
        rate = 60 * built / max(seconds, 1e-9)
        logger.info(f"preprocessed {built} volumes in {seconds:.1f} s ({rate:.1f} per minute, {num_workers} workers)")
    skipped = [str(file) for file, s in zip(files, statuses, strict=True) if s["skipped"]]
    note = f" ({len(skipped)} skipped: {', '.join(skipped)}; see the warnings)" if skipped else ""
    logger.info(f"using {len(usable)} of {len(files)} volumes{note}; cache folder {folder}")
    if not usable:
        raise BundleError(
            f"None of the {len(files)} volumes is usable for pretraining (see the warnings above): check the "
            "`modality` preset and the data."
        )
    return usable


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point: prepares the cache of a dataset as pretraining would, on every CPU by default."""
    args = build_parser().parse_args(argv)
    errors.install()
    log.configure()
    workers = len(os.sched_getaffinity(0)) if args.num_workers is None else args.num_workers
    datalist = load_datalist(args.dataset_dir)
    prepare_volumes(datalist, args.cache_dir, args.modality, args.patch_size, workers, progress=True)


if __name__ == "__main__":
    main()
