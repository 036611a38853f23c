"""The preprocessed-volume cache of pretraining: each volume preprocessed once into memory-mappable arrays.

:func:`prepare_volumes` preprocesses every volume of a datalist once (`scripts.data.preprocessing.preprocessing`);
:func:`open_volume` memory-maps an entry as :class:`ChunkedVolume` arrays, so that a batch reads only the chunks of the
boxes it cuts, in a few large reads. Layout::

    <cache_dir>/<dataset>-<modality>-<hash>/     one folder per dataset source and transform, shared by runs
        folder.json                              what the hash covers (below)
        <file name>-<hash>/                      one entry per volume
            image.bin    float16 chunks (GZ, GX, GY, cx, cy, cz): intensities in [0, 1]
            body.bin     uint8 chunks (GZ, GX, GY, cx, cy, cz): body mask (1 = body)
            meta.json    shape (X, Y, Z), chunk (cx, cy, cz), affine, source file with its size and modification time

The arrays are raw C-order bytes (no header): the (X, Y, Z) volume, zero-padded to whole chunks of `CHUNK` voxels, cut
into a (GX, GY, GZ) grid of chunks stored Z, X, Y; a chunk's voxels are contiguous, and so are the chunks of a box
along Y (:class:`ChunkedVolume`).

The folder's hash covers the dataset's folder, the preset, the patch size (small volumes are padded to it), MONAI's
version and the code that makes an entry (:func:`definition_digest`), so a changed transform never reads old entries
(the folders another version made for the same data are named in a warning, with their size, for the user to delete);
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
    "ChunkedVolume",
    "definition_digest",
    "folder_description",
    "cache_folder",
    "superseded_folders",
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
_FOLDER_FILE = "folder.json"
# (X, Y, Z) voxels of a chunk: 4 KiB of float16, one page. A 128 x 128 x 32 box then reads about 1.5x its bytes (whole
# pages of (Z, X, Y) arrays: 1.9x) in about 45 runs of 9 chunks; larger chunks read more bytes in fewer runs.
CHUNK = (16, 16, 8)


class CacheWarning(UserWarning):
    """A damaged cache entry, built again, or cache folders no run of this version reads; the message names them."""


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
        _chunks,
        write_entry,
        read_entry,
    )
    return _hash(*map(_code, code), CHUNK, {key: np.dtype(dtype).str for key, dtype in _ARRAYS.items()})


def folder_description(
    datalist: Sequence[dict], modality: str, patch_size: Sequence[int], pixdim: Sequence[float] | None = None
) -> dict:
    """What a cache folder's name is a hash of: the dataset source (the folder holding the datalist's images), the
    preset, the patch size, the code that makes an entry and MONAI's version. Written to its ``folder.json``."""
    if modality not in PRESETS:
        raise BundleError(f"Unknown modality={modality!r}: the key `modality` must be one of {sorted(PRESETS)}.")
    source = os.path.commonpath([os.path.dirname(os.path.abspath(item["image"])) for item in datalist])
    preset = {**PRESETS[modality], **({"pixdim": list(pixdim)} if pixdim is not None else {})}
    return {
        "source": source,
        "modality": modality,
        "preset": preset,
        "patch_size": [int(p) for p in patch_size],
        "definition": definition_digest(),
        "monai": monai.__version__,
    }


def cache_folder(
    cache_dir: str | os.PathLike,
    datalist: Sequence[dict],
    modality: str,
    patch_size: Sequence[int],
    pixdim: Sequence[float] | None = None,
) -> Path:
    """The folder of one dataset source and one preprocessing transform (:func:`folder_description`)."""
    return _folder(cache_dir, folder_description(datalist, modality, patch_size, pixdim))


def _folder(cache_dir: str | os.PathLike, d: dict) -> Path:
    key = _hash(d["definition"], d["monai"], d["source"], d["preset"], d["patch_size"])
    return Path(cache_dir) / f"{_readable(os.path.basename(d['source']))}-{d['modality']}-{key}"


def _describe(folder: Path, description: dict) -> None:
    """Writes ``folder.json`` once (atomically: other hosts may read it)."""
    file = folder / _FOLDER_FILE
    if file.is_file():
        return
    temporary = _temporary(folder, _FOLDER_FILE)
    temporary.write_text(json.dumps(description, indent=2) + "\n")
    os.replace(temporary, file)


def superseded_folders(folder: Path, description: dict) -> list[Path]:
    """The other folders of ``folder``'s cache directory made for the same dataset source, preset and patch size by
    another version of the entry-making code or of MONAI (their ``folder.json`` says so): no run of this version reads
    them."""
    same = ("source", "preset", "patch_size")
    description = json.loads(json.dumps(description))  # as theirs reads back: tuples become lists
    found = []
    for other in sorted(folder.parent.glob(f"*/{_FOLDER_FILE}")):
        try:
            theirs = json.loads(other.read_text())
        except (OSError, ValueError):  # being written, or not ours: not for this check to judge
            continue
        if other.parent != folder and all(theirs.get(k) == description[k] for k in same):
            found.append(other.parent)
    return found


def _size(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())


def entry_name(file: str | os.PathLike) -> str:
    """The entry of a source file: its name and a hash of its absolute path, size and modification time."""
    path = os.path.abspath(file)
    stat = os.stat(path)
    stem = re.sub(r"\.nii(\.gz)?$", "", os.path.basename(path))
    return f"{_readable(stem)}-{_hash(path, stat.st_size, stat.st_mtime_ns)}"


def _temporary(folder: Path, name: str) -> Path:
    """A name no other process, on this host or another, uses for the same entry."""
    return folder / f".tmp-{_HOST}-{os.getpid()}-{name}"


def _grid(shape: Sequence[int], chunk: Sequence[int]) -> tuple[int, int, int]:
    """Chunks per axis (GX, GY, GZ) of an (X, Y, Z) volume cut into ``chunk`` voxels, the last ones zero-padded."""
    return tuple(-(-int(s) // int(c)) for s, c in zip(shape, chunk, strict=True))


def _chunks(volume: np.ndarray, chunk: Sequence[int]) -> np.ndarray:
    """The (X, Y, Z) `volume` as its (GZ, GX, GY, cx, cy, cz) chunks, zero-padded to whole chunks (a copy)."""
    (gx, gy, gz), (cx, cy, cz) = _grid(volume.shape, chunk), chunk
    padded = np.zeros((gx * cx, gy * cy, gz * cz), dtype=volume.dtype)
    padded[: volume.shape[0], : volume.shape[1], : volume.shape[2]] = volume
    return np.ascontiguousarray(padded.reshape(gx, cx, gy, cy, gz, cz).transpose(4, 0, 2, 1, 3, 5))


def write_entry(
    folder: Path, name: str, meta: dict, image: np.ndarray | None, body: np.ndarray | None, chunk: Sequence[int] = CHUNK
) -> Path:
    """Writes entry ``folder/name`` atomically: ``meta.json`` and, unless None, the (X, Y, Z) arrays as chunks.

    Args:
        folder: the cache folder.
        name: the entry's name (:func:`entry_name`).
        meta: JSON-serialisable description of the volume; with arrays, ``shape`` (X, Y, Z) and ``chunk`` are set here.
        image: (X, Y, Z) intensities in [0, 1], stored as float16; None for a skipped volume.
        body: (X, Y, Z) body mask, stored as uint8.
        chunk: (cx, cy, cz) voxels per chunk.

    Returns:
        the entry's path. If another process wrote the same entry meanwhile, its copy is kept (they are equal).

    Raises:
        OutOfSpaceError: no room for it (nothing of it is left).
    """
    final = folder / name
    temporary = _temporary(folder, name)
    shutil.rmtree(temporary, ignore_errors=True)
    if image is not None:
        meta = {**meta, "shape": list(image.shape), "chunk": [int(c) for c in chunk]}
    needed = 0 if image is None else int(np.prod(_grid(image.shape, chunk))) * int(np.prod(chunk)) * 3  # f16 + u8
    try:
        with out_of_space(final, needed, "free space and rerun the same command: it goes on where it stopped"):
            temporary.mkdir(parents=True)
            if image is not None and body is not None:
                for key, array in (("image", image), ("body", body)):
                    _chunks(np.asarray(array, dtype=_ARRAYS[key]), chunk).tofile(temporary / f"{key}.bin")
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
    """The ``meta.json`` of a complete entry, after checking that its arrays are whole.

    Reads the arrays' sizes only. Raises ValueError saying what is wrong: ``meta.json`` missing or unreadable, an array
    missing, or shorter or longer than the chunks of the shape ``meta.json`` gives (a cut file)."""
    try:
        meta = json.loads((entry / "meta.json").read_text())
        if meta.get("skipped"):
            return meta
        grid = _grid(meta["shape"], meta["chunk"])
        voxels = int(np.prod(grid)) * int(np.prod(meta["chunk"]))
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"meta.json is missing or unreadable ({type(e).__name__}: {e})") from e
    for key, dtype in _ARRAYS.items():
        file = entry / f"{key}.bin"
        try:
            actual = file.stat().st_size
        except OSError as e:
            raise ValueError(f"{file.name} is missing or unreadable ({type(e).__name__}: {e})") from e
        if actual != voxels * np.dtype(dtype).itemsize:
            raise ValueError(
                f"{file.name} has {actual} bytes, meta.json says {voxels * np.dtype(dtype).itemsize} "
                f"({np.dtype(dtype)} chunks {meta['chunk']} of shape {meta['shape']})"
            )
    return meta


class ChunkedVolume:
    """An (X, Y, Z) array of a cache entry, stored as chunks (see the module's layout) and indexed as numpy indexes.

    Indexing reads whole chunks: a box of slices (``volume[x0:x1, y0:y1, z0:z1]``, step 1) returns an (x1 - x0,
    y1 - y0, z1 - z0) array; three integer arrays (``volume[xs, ys, zs]``) return the voxels at those indices;
    ``np.asarray(volume)`` returns the whole (X, Y, Z) array. Memory-mapped, it asks the OS for all the chunks an
    access needs before it copies any (`prefetch`), so that they come from the disk in large reads issued together
    rather than as one 4 KiB page fault after another.

    Args:
        chunks: (GZ, GX, GY, cx, cy, cz) chunks: a view of ``mapped`` or an array in memory.
        shape: (X, Y, Z) shape of the volume (the chunks may be padded beyond it).
        mapped: the memory map under ``chunks``, whose first byte is the first chunk's; None in memory.
    """

    ndim = 3

    def __init__(self, chunks: np.ndarray, shape: Sequence[int], mapped: mmap.mmap | None = None) -> None:
        self.chunks = chunks
        self.shape = tuple(int(s) for s in shape)
        self.dtype = chunks.dtype
        self.chunk = np.asarray(chunks.shape[3:])
        self.mapped = mapped

    def prefetch(self, starts: np.ndarray, stops: np.ndarray) -> None:
        """Asks the OS to read, in the background, the chunks of the boxes ``[starts, stops)`` ((m, 3) voxel indices)
        that are not in its page cache yet: one request per run of chunks contiguous along Y (no-op in memory)."""
        if self.mapped is None or not hasattr(mmap, "MADV_WILLNEED"):  # in memory, or an OS without madvise
            return
        low, high = np.asarray(starts) // self.chunk, -(-np.asarray(stops) // self.chunk)
        z_step, x_step, y_step = self.chunks.strides[:3]  # bytes from one chunk to the next along Z, X, Y
        for (x0, y0, z0), (x1, y1, z1) in zip(low.tolist(), high.tolist(), strict=True):
            rows = (np.arange(z0, z1)[:, None] * z_step + np.arange(x0, x1)[None] * x_step).ravel()
            begins = (rows + y0 * y_step) // mmap.PAGESIZE * mmap.PAGESIZE  # madvise takes whole pages
            for begin, end in zip(begins.tolist(), (rows + y1 * y_step).tolist(), strict=True):
                self.mapped.madvise(mmap.MADV_WILLNEED, begin, end - begin)

    def _box(self, start: np.ndarray, stop: np.ndarray) -> np.ndarray:
        low, high = start // self.chunk, -(-stop // self.chunk)
        self.prefetch(start[None], stop[None])
        block = self.chunks[low[2] : high[2], low[0] : high[0], low[1] : high[1]]  # (nz, nx, ny, cx, cy, cz)
        nz, nx, ny = block.shape[:3]
        # one copy that reads the chunks and puts their voxels in (X, Y, Z) order; the box is a view of it
        block = block.transpose(1, 3, 2, 4, 0, 5).reshape(nx * self.chunk[0], ny * self.chunk[1], nz * self.chunk[2])
        offset, size = start - low * self.chunk, stop - start
        return block[offset[0] : offset[0] + size[0], offset[1] : offset[1] + size[1], offset[2] : offset[2] + size[2]]

    def _points(self, x: np.ndarray, y: np.ndarray, z: np.ndarray) -> np.ndarray:
        points = np.stack(np.broadcast_arrays(x, y, z), axis=-1).reshape(-1, 3)
        self.prefetch(points, points + 1)
        (gx, gy, gz), (ix, iy, iz) = np.divmod(points.T, self.chunk[:, None])
        return self.chunks[gz, gx, gy, ix, iy, iz].reshape(np.broadcast(x, y, z).shape)

    def __getitem__(self, index: tuple) -> np.ndarray:
        if not (isinstance(index, tuple) and len(index) == 3):
            raise IndexError(f"a ChunkedVolume takes 3 indices (X, Y, Z), got {index!r}")
        if all(isinstance(i, slice) for i in index):
            bounds = [i.indices(s) for i, s in zip(index, self.shape, strict=True)]
            if any(step != 1 for _, _, step in bounds):
                raise IndexError(f"a ChunkedVolume's slices take no step, got {index!r}")
            start = np.array([b[0] for b in bounds])
            return self._box(start, np.maximum(start, [b[1] for b in bounds]))
        points = [np.asarray(i) for i in index]
        if not all(np.issubdtype(p.dtype, np.integer) for p in points):
            raise IndexError(f"a ChunkedVolume takes 3 slices or 3 integer arrays, got {index!r}")
        for p, s in zip(points, self.shape, strict=True):
            if p.size and (p.min() < 0 or p.max() >= s):
                raise IndexError(f"indices out of bounds for a ChunkedVolume of shape {self.shape}")
        return self._points(*points)

    def __array__(self, dtype: np.dtype | None = None, copy: bool | None = None) -> np.ndarray:
        whole = np.ascontiguousarray(self._box(np.zeros(3, dtype=np.int64), np.asarray(self.shape)))
        return whole if dtype is None else whole.astype(dtype, copy=False)


def _load(file: Path, dtype: type, shape: Sequence[int], chunk: Sequence[int], in_memory: bool) -> ChunkedVolume:
    gx, gy, gz = _grid(shape, chunk)
    if in_memory:
        return ChunkedVolume(np.fromfile(file, dtype=dtype).reshape(gz, gx, gy, *chunk), shape)
    with open(file, "rb") as f:
        mapped = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)  # valid after the file is closed
    if hasattr(mmap, "MADV_RANDOM"):
        # A page fault outside the prefetched chunks must not read around it: read-around is 128 KiB of neighbours.
        mapped.madvise(mmap.MADV_RANDOM)
    return ChunkedVolume(np.frombuffer(mapped, dtype=dtype).reshape(gz, gx, gy, *chunk), shape, mapped)


def open_volume(entry: str | os.PathLike, in_memory: bool = False) -> dict[str, ChunkedVolume]:
    """The arrays of a cache entry as (X, Y, Z) :class:`ChunkedVolume`: ``image`` float16 in [0, 1], ``body`` uint8.

    Args:
        entry: an entry folder returned by :func:`prepare_volumes`.
        in_memory: read the chunks into memory; otherwise memory-map them, so that indexing reads only its chunks.

    Raises:
        BundleError: the entry was damaged after it was prepared; the message names it.
    """
    entry = Path(entry)
    try:
        meta = json.loads((entry / "meta.json").read_text())
        return {
            key: _load(entry / f"{key}.bin", dtype, meta["shape"], meta["chunk"], in_memory)
            for key, dtype in _ARRAYS.items()
        }
    except (OSError, ValueError, KeyError, TypeError) as e:
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
                    shutil.rmtree(path, ignore_errors=True) if path.is_dir() else path.unlink(missing_ok=True)
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
                    continue  # being built again by rank 0: read at a later poll
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
    description = folder_description(datalist, modality, patch_size, pixdim)
    folder = _folder(cache_dir, description)
    if not is_main():
        return [meta["entry"] for meta in wait_for_entries(datalist, folder) if not meta["skipped"]]
    folder.mkdir(parents=True, exist_ok=True)
    _describe(folder, description)
    if superseded := superseded_folders(folder, description):
        gigabytes = sum(map(_size, superseded)) / 1e9
        warnings.warn(
            f"{len(superseded)} cache folder(s) of this dataset, preset and patch size were made by another version "
            f"of the preprocessing or of MONAI, which this one never reads ({gigabytes:.1f} GB): "
            f"{', '.join(map(str, superseded))}. Delete them unless a run of that version still needs them.",
            CacheWarning,
            stacklevel=2,
        )
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
