"""Benchmark of DHR pretraining: data-pipeline time per batch on one CPU core, and on CUDA the full step time.

Usage (from the bundle root)::

    python -m scripts.tools.benchmark [--repeats 10] [--volume 320 240 200] [--patch 128 128 32] [--pairs 10]
    python -m scripts.tools.benchmark --memory [--patch 128 128 32] [--pairs 10]
    python -m scripts.tools.benchmark --step [--patch 128 128 32] [--pairs 10] [--base_channels 32] [--num_scales 5]

``--memory`` prints an estimate of the training memory per configuration instead, without running anything: the
networks run on PyTorch's "meta" device (shapes only), and the tensors their forward pass saves for the backward
pass are summed (`saved_activation_bytes`).

CPU figures, one thread, as one DataLoader worker does it: one batch = ``pairs`` voxel pairs of one volume read from the
on-disk cache (`scripts.data.cache`, memory-mapped) by `VoxelPairDataset`, side by side for two layouts of the cached
arrays, the same boxes from each: ``chunked`` (the cache's, chunks of ``--chunk`` voxels read in runs requested
together) and ``z-first`` (the layout before it: whole (Z, X, Y) ``.npy`` arrays, read by 4 KiB page faults):

- loading and sampling, with the volume's pages in the OS page cache (warm) and evicted before each batch (cold:
  ``posix_fadvise(DONTNEED)``);
- bytes read per batch: the cache files' pages that are in the page cache after a cold batch (``mincore``; Linux), i.e.
  what the batch made the OS read, read-ahead included; beside it the bytes of the boxes themselves and of the float32
  volume (what a whole-volume cache read per batch);
- read requests per batch that the disk completed and their mean size (``/sys/dev/block/*/stat``, the whole disk's:
  other processes' reads count too);
- DHR's local augmentations of both views (`SSLBatch`), separately.

``--step`` prints one table of the training step instead, on the GPU if there is one, else on the CPU (one thread):
sampling once, then per step augmentation, forward, loss, backward, gradient clipping and the optimiser step of DHR at
the given sizes, for the device's default configuration (bf16 AMP on CUDA, none on a CPU) and with one option changed
at a time: AMP, activation checkpointing, channels-last, torch.compile (its compilation is in warm-up steps, not
timed). Columns: median seconds per step, patches per second (both views), peak memory (CUDA's allocator; not measured
on a CPU), and host syncs per step: on CUDA the synchronisations ``torch.cuda.set_sync_debug_mode`` reports in one
step; on a CPU the operations of one step (the optimiser's own bookkeeping aside) that would make a GPU's host wait:
reads of a value (``item``) and data-dependent shapes (``nonzero``, ``masked_select``, ...).
"""

import argparse
import contextlib
import ctypes
import io
import logging
import mmap
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line; built before numpy, torch and MONAI are imported (see the imports below)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.tools.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions (the median is printed)")
    parser.add_argument("--volume", type=int, nargs=3, default=[320, 240, 200], help="synthetic volume size (voxels)")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 32], help="patch size (voxels)")
    parser.add_argument("--pairs", type=int, default=10, help="voxel pairs per batch")
    parser.add_argument("--voxels", type=int, default=1024, help="matched voxels per pair")
    parser.add_argument("--chunk", type=int, nargs=3, default=None, help="chunk (voxels); default: the cache's")
    parser.add_argument("--cache_dir", default=None, help="where the benchmark's cache entry goes (a disk, not tmpfs)")
    parser.add_argument("--memory", action="store_true", help="print memory estimates instead (nothing is run)")
    parser.add_argument("--step", action="store_true", help="print the training step's table instead (GPU or CPU)")
    parser.add_argument("--base_channels", type=int, default=32, help="--step: FPN3d's channels of the finest level")
    parser.add_argument("--num_scales", type=int, default=5, help="--step: FPN3d's pyramid levels")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer before numpy, torch and MONAI are imported

import numpy as np  # noqa: E402
import torch  # noqa: E402
from scripts.data.cache import CHUNK, write_entry  # noqa: E402
from scripts.networks.fpn3d import dhr_network  # noqa: E402
from scripts.networks.performance import place  # noqa: E402
from scripts.networks.segmentation import segmentation_network  # noqa: E402
from scripts.ssl.batch import SSLBatch  # noqa: E402
from scripts.ssl.local_augmentations import LocalAugmentations  # noqa: E402
from scripts.ssl.losses import HybridLoss  # noqa: E402
from scripts.ssl.sampler import VoxelPairDataset, VoxelPairSamplerd  # noqa: E402
from scripts.utils import errors, log  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

logger = logging.getLogger(__name__)


def synthetic_volume(shape: tuple[int, int, int], seed: int = 0) -> dict[str, torch.Tensor]:
    """A preprocessed-looking volume: textured ellipsoid body in [0, 1] and its body mask, each (1, X, Y, Z)."""
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s, dtype=np.float32) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.9
    image = np.where(body, 0.4 + 0.5 * rng.random(shape, dtype=np.float32), 0.0).astype(np.float32)
    return {"image": torch.from_numpy(image)[None], "body": torch.from_numpy(body)[None]}


def median_seconds(fn: Callable[[], object], repeats: int, sync: bool = False) -> float:
    """Median wall time of ``fn`` over ``repeats`` calls after one warm-up call."""
    times = []
    for i in range(repeats + 1):
        start = time.perf_counter()
        fn()
        if sync:
            torch.cuda.synchronize()
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def _evict(files: list[Path]) -> None:
    """Drops the files' clean pages from the OS page cache (Linux), so the next read comes from the disk."""
    for file in files:
        fd = os.open(file, os.O_RDONLY)
        try:
            os.fsync(fd)
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _cached_bytes(file: Path) -> int:
    """Bytes of ``file`` that are in the OS page cache (``mincore`` over a fresh read-only mapping; Linux)."""
    size, page = os.path.getsize(file), mmap.PAGESIZE
    libc = ctypes.CDLL(None, use_errno=True)
    libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p]
    with open(file, "rb") as f, mmap.mmap(f.fileno(), size, prot=mmap.PROT_READ) as mapped:
        address = np.frombuffer(mapped, np.uint8).ctypes.data
        pages = np.zeros((size + page - 1) // page, dtype=np.uint8)
        if libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), pages.ctypes.data) != 0:
            raise OSError(ctypes.get_errno(), "mincore failed")
        return int((pages & 1).sum()) * page


def _disk_reads(file: Path) -> np.ndarray | None:
    """(read requests completed, bytes read) so far by the disk holding ``file`` (Linux), None where unknown."""
    device = os.stat(file).st_dev
    stat = Path(f"/sys/dev/block/{os.major(device)}:{os.minor(device)}/stat")
    if not stat.exists():
        return None
    fields = stat.read_text().split()
    return np.array([int(fields[0]), int(fields[2]) * 512])  # sectors are 512 bytes in this file


def _write_z_first(folder: Path, image: np.ndarray, body: np.ndarray) -> list[Path]:
    """The cache's arrays in the layout before chunks: (Z, X, Y) float16 image and uint8 mask as ``.npy`` files."""
    folder.mkdir()
    for key, array, dtype in (("image", image, np.float16), ("body", body, np.uint8)):
        np.save(folder / f"{key}.npy", np.ascontiguousarray(array.transpose(2, 0, 1), dtype=dtype))
    return [folder / "image.npy", folder / "body.npy"]


class _ZFirstDataset(VoxelPairDataset):
    """`VoxelPairDataset` over `_write_z_first`'s entries, opened as the cache opened them: memory-mapped, without
    read-around (``MADV_RANDOM``), so that each page a box touches is one 4 KiB read."""

    def _volume(self, index: int) -> dict[str, np.ndarray]:
        if index not in self._open:
            self._open[index] = {}
            for key in ("image", "body"):
                array = np.load(Path(self.volumes[index]) / f"{key}.npy", mmap_mode="r")
                array._mmap.madvise(mmap.MADV_RANDOM)
                self._open[index][key] = array.transpose(1, 2, 0)[None]
        return self._open[index]


def cpu_pipeline(
    volume: dict, sampler: VoxelPairSamplerd, repeats: int, folder: Path, chunk: tuple[int, int, int] = CHUNK
) -> dict[str, dict[str, float]]:
    """Per batch on one CPU thread, for each layout of the cache (``chunked``, ``z-first``): loading + sampling from the
    on-disk cache cold and warm, bytes and requests read from the disk; and the augmentation of a batch."""
    torch.set_num_threads(1)
    image, body = volume["image"][0].numpy(), volume["body"][0].numpy()
    chunked = write_entry(folder, "chunked", {}, image, body, chunk=chunk)
    layouts = {
        "chunked": (VoxelPairDataset, chunked, [chunked / "image.bin", chunked / "body.bin"]),
        "z-first": (_ZFirstDataset, folder / "z-first", _write_z_first(folder / "z-first", image, body)),
    }
    results = {name: {} for name in layouts}
    if sys.platform == "linux":  # first: pages mapped by a live dataset could not be evicted
        cold = {name: {"s": [], "mb": [], "requests": [], "request_kib": []} for name in layouts}
        for s in range(repeats):
            for name, (dataset_class, entry, files) in layouts.items():  # interleaved: the same load on both
                _evict(files)
                fresh = dataset_class([str(entry)], sampler, seed=0, cache="disk", rank=0, world_size=1)
                before = _disk_reads(files[0])
                start = time.perf_counter()
                fresh[s]
                cold[name]["s"].append(time.perf_counter() - start)
                cold[name]["mb"].append(sum(_cached_bytes(f) for f in files) / 2**20)
                if before is not None:
                    requests, read = _disk_reads(files[0]) - before
                    cold[name]["requests"].append(requests)
                    cold[name]["request_kib"].append(read / max(requests, 1) / 2**10)
                del fresh
        for name, values in cold.items():
            results[name] |= {f"cold_{key}": statistics.median(v) for key, v in values.items() if v}
    for name, (dataset_class, entry, _) in layouts.items():
        dataset = dataset_class([str(entry)], sampler, seed=0, cache="disk", rank=0, world_size=1)
        samples = iter(range(10**9))  # a new sample index per batch: other boxes each time
        results[name]["warm_s"] = median_seconds(lambda: dataset[next(samples)], repeats)  # noqa: B023
    prepare = SSLBatch(LocalAugmentations(), seed=0)
    batch = {k: v[None] for k, v in dataset[0].items()}  # one volume per batch, as collated
    results["all"] = {
        "box_mb": 2 * sampler.num_pairs * int(np.prod(sampler.patch_size)) * 2 / 2**20,  # float16 boxes
        "float32_volume_mb": image.size * 4 / 2**20,
        "augmentation_s": median_seconds(lambda: prepare(batch, torch.device("cpu")), repeats),
    }
    return results


# Operations that make a GPU's host wait: a value read back, or an output shape that depends on the values.
_HOST_WAITS = {"_local_scalar_dense", "nonzero", "masked_select", "unique", "_unique2", "unique_consecutive"}


class _HostWaits(TorchDispatchMode):
    """Counts the operations of :data:`_HOST_WAITS` run while it is active (any device)."""

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func._schema.name.split("::")[-1] in _HOST_WAITS
        return func(*args, **(kwargs or {}))


_OPTIONS = {
    "amp": "bf16 AMP",
    "activation_checkpointing": "activation checkpointing",
    "channels_last": "channels-last",
    "compile": "torch.compile",
}


def step_table(
    volume: dict, sampler: VoxelPairSamplerd, repeats: int, base_channels: int, num_scales: int
) -> tuple[str, list[dict[str, object]]]:
    """The DHR training step on the GPU (else the CPU) in the device's default configuration and with one option
    changed at a time (see the module docstring).

    Returns:
        the device's name, and one row per configuration: ``configuration``, ``step_s``, ``patches_per_s``,
        ``peak_memory_gib`` (None on a CPU), ``host_syncs``.
    """
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    default = {"amp": cuda, "activation_checkpointing": False, "channels_last": False, "compile": False}
    configurations = {"default": default}
    for option in [o for o in _OPTIONS if cuda or o != "amp"]:  # AMP: CUDA only
        configurations[f"{_OPTIONS[option]} {'off' if default[option] else 'on'}"] = {
            **default,
            option: not default[option],
        }
    batch = {k: v[None] for k, v in sampler(volume).items()}
    patches = 2 * batch["view1"].shape[1]
    rows = []
    for name, options in configurations.items():
        torch.manual_seed(0)
        network = dhr_network(base_channels, num_scales, activation_checkpointing=options["activation_checkpointing"])
        network = place(network, device, options["channels_last"], options["compile"])
        optimizer = torch.optim.Adam(network.parameters(), lr=3e-4)
        loss_function = HybridLoss()
        prepare = SSLBatch(LocalAugmentations(), channels_last=options["channels_last"])

        def step(count: _HostWaits | None = None) -> None:
            with count or contextlib.nullcontext():
                inputs, targets, _, kwargs = prepare(batch, device, non_blocking=True)
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=options["amp"]):
                    loss = loss_function(network(inputs, **kwargs), targets)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
            optimizer.step()  # Adam reads its step counts, kept on the host on purpose: not a device sync

        for _ in range(2):  # warm-up: compilation, cuDNN's choices, the allocator's pools
            step()
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                torch.cuda.set_sync_debug_mode("warn")
                step()
                torch.cuda.set_sync_debug_mode("default")
            syncs = sum("synchroniz" in str(w.message) for w in caught)
        else:
            count = _HostWaits()
            step(count)
            syncs = count.count
        seconds = median_seconds(step, repeats, sync=cuda)
        rows.append(
            {
                "configuration": name,
                "step_s": seconds,
                "patches_per_s": patches / seconds,
                "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None,
                "host_syncs": syncs,
            }
        )
    return (torch.cuda.get_device_name() if cuda else "CPU, 1 thread"), rows


def saved_activation_bytes(network: torch.nn.Module, *inputs: torch.Tensor, **kwargs: torch.Tensor) -> int:
    """Bytes of the distinct tensors (parameters excluded) that a training forward of `network` saves for its backward
    pass; run it on the "meta" device to count without computing."""
    parameters = {p.untyped_storage()._cdata for p in network.parameters()}
    saved: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage._cdata not in parameters:
            saved[storage._cdata] = storage.nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        network.train()(*inputs, **kwargs)
    return sum(saved.values())


def memory_estimates(patch: tuple[int, int, int], pairs: int, voxels: int) -> list[dict[str, object]]:
    """Estimated training memory in GiB of DHR and vox2vec pretraining and of fine-tuning, fp32 and bf16, with and
    without activation checkpointing: saved activations + weights, gradients and Adam's two moments (16 bytes per
    parameter) + the InfoNCE's (2N)^2 float32 logits (N = pairs * voxels; pretraining) + with checkpointing, the
    activations of the largest residual stage while it is recomputed. bf16 casts the whole network to bf16 (what
    autocast does to the activations). Transient buffers of the backward pass and allocator fragmentation are not
    included. Fine-tuning: 2 * pairs patches per batch (the paper's 10 patches for 5 pairs)."""
    rows = []
    networks = {
        "DHR pretraining (FPN3d 32/5)": (lambda c: dhr_network(activation_checkpointing=c), 2 * pairs, True),
        "vox2vec pretraining (FPN3d 16/6)": (
            lambda c: dhr_network(16, 6, None, restoration=False, activation_checkpointing=c),
            2 * pairs,
            True,
        ),
        "fine-tuning (FPN3d 32/5 + linear head)": (
            lambda c: segmentation_network(13, activation_checkpointing=c),
            pairs,
            False,
        ),
    }
    for name, (build, batch, contrastive) in networks.items():
        for dtype in (torch.float32, torch.bfloat16):
            for checkpointing in (False, True):
                # stdout: segmentation_network prints what it built
                with torch.device("meta"), contextlib.redirect_stdout(io.StringIO()):
                    network = build(checkpointing).to(dtype)
                    images = torch.zeros(batch, 1, *patch, dtype=dtype)
                    kwargs = {"voxels": torch.zeros(batch, voxels, 3, dtype=torch.long)} if contrastive else {}
                    activations = saved_activation_bytes(network, images, **kwargs)
                    recompute = 0
                    if checkpointing:
                        backbone = network.backbone
                        first = backbone.left_blocks[0] if backbone.num_scales > 1 else backbone.bottom_block
                        first.checkpointing = False
                        stage_input = torch.zeros(batch, backbone.base_channels, *patch, dtype=dtype)
                        recompute = saved_activation_bytes(first, stage_input)
                parameters = sum(p.numel() for p in network.parameters())
                logits = 4 * (2 * pairs * voxels) ** 2 if contrastive else 0
                total = activations + recompute + 16 * parameters + logits
                rows.append(
                    {
                        "configuration": name,
                        "precision": "bf16" if dtype == torch.bfloat16 else "fp32",
                        "checkpointing": checkpointing,
                        "activations_gib": activations / 2**30,
                        "total_gib": total / 2**30,
                    }
                )
    return rows


def main() -> None:
    parser = build_parser()
    args = parser.parse_args()
    errors.install()
    log.configure()
    if args.memory:
        print(f"{args.pairs} pairs of {tuple(args.patch)} patches, {args.voxels} voxels/pair; estimates in GiB")
        print("| configuration | precision | activation checkpointing | saved activations | estimated peak |")
        print("| --- | --- | --- | --- | --- |")
        for row in memory_estimates(tuple(args.patch), args.pairs, args.voxels):
            print(
                f"| {row['configuration']} | {row['precision']} | {'on' if row['checkpointing'] else 'off'} "
                f"| {row['activations_gib']:.1f} | {row['total_gib']:.1f} |"
            )
        return

    torch.manual_seed(0)
    volume = synthetic_volume(tuple(args.volume))
    sampler = VoxelPairSamplerd(args.patch, args.pairs, args.voxels)
    sampler.set_random_state(0)
    if args.step:
        if not torch.cuda.is_available():
            torch.set_num_threads(1)  # as the CPU figures above: one core's time
        device, rows = step_table(volume, sampler, args.repeats, args.base_channels, args.num_scales)
        print(
            f"{device}: DHR step, FPN3d {args.base_channels}/{args.num_scales}, {args.pairs} pairs of "
            f"{tuple(args.patch)} patches, {args.voxels} voxels/pair; median of {args.repeats} steps"
        )
        print("| configuration | s per step | patches per s | peak memory GiB | host syncs per step |")
        print("| --- | --- | --- | --- | --- |")
        for r in rows:
            memory = "not measured" if r["peak_memory_gib"] is None else f"{r['peak_memory_gib']:.2f}"
            print(
                f"| {r['configuration']} | {r['step_s']:.3f} | {r['patches_per_s']:.1f} | {memory} "
                f"| {r['host_syncs']} |"
            )
        return
    logger.info(
        f"volume {tuple(args.volume)}, {args.pairs} pairs of {tuple(args.patch)} patches, {args.voxels} voxels/pair"
    )
    chunk = CHUNK if args.chunk is None else tuple(args.chunk)
    with tempfile.TemporaryDirectory(dir=args.cache_dir) as folder:
        results = cpu_pipeline(volume, sampler, args.repeats, Path(folder), chunk)
    for key, value in results.pop("all").items():
        logger.info(f"cpu (1 thread) {key}: {value:.3f}")
    print(f"cpu (1 thread), loading and sampling per batch, median of {args.repeats}; chunk {chunk}")
    print("| layout | cold s | warm s | MB read from disk | disk read requests | KiB per request |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name, r in results.items():
        keys = ("cold_s", "warm_s", "cold_mb", "cold_requests", "cold_request_kib")
        cells = [r.get(key, float("nan")) for key in keys]
        print(f"| {name} | {cells[0]:.3f} | {cells[1]:.3f} | {cells[2]:.1f} | {cells[3]:.0f} | {cells[4]:.0f} |")
    logger.info("the training step's table: python -m scripts.tools.benchmark --step")


if __name__ == "__main__":
    main()
