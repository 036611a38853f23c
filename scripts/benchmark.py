"""Benchmark of DHR pretraining: data-pipeline time per batch on one CPU core, and on CUDA the full step time.

Usage (from the bundle root)::

    python -m scripts.benchmark [--repeats 10] [--volume 320 240 200] [--patch 128 128 32] [--pairs 10]

CPU figure: one batch = ``pairs`` voxel pairs sampled from a preprocessed (cached) volume plus DHR's local
augmentations of both views, with one thread, as one DataLoader worker would do it. CUDA figures (when a GPU is
present): sampling on the CPU, then augmentation, forward, loss, backward and the optimiser step of the full DHR network
at the given patch and batch size, with bf16 AMP on and off; patches per second count both views.
"""

import argparse
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from scripts.augmentations import LocalAugmentations
from scripts.losses import HybridLoss
from scripts.networks import dhr_network
from scripts.sampler import VoxelPairSamplerd
from scripts.training import SSLBatch


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


def cpu_pipeline(volume: dict, sampler: VoxelPairSamplerd, repeats: int) -> dict[str, float]:
    """Seconds per batch on one CPU thread: sampling alone, and sampling + augmentation of both views."""
    torch.set_num_threads(1)
    prepare = SSLBatch(LocalAugmentations())
    collate = lambda: {k: v[None] for k, v in sampler(volume).items()}  # noqa: E731 - one volume per batch
    sampling = median_seconds(lambda: sampler(volume), repeats)
    total = median_seconds(lambda: prepare(collate(), torch.device("cpu")), repeats)
    return {"sampling_s": sampling, "sampling_and_augmentation_s": total}


def cuda_step(volume: dict, sampler: VoxelPairSamplerd, repeats: int, amp: bool) -> dict[str, float]:
    """Full training step of DHR on CUDA: seconds per step, patches per second, peak memory in GiB."""
    device = torch.device("cuda")
    network = dhr_network().to(device)
    optimizer = torch.optim.Adam(network.parameters(), lr=3e-4)
    loss_function = HybridLoss()
    prepare = SSLBatch(LocalAugmentations())
    batch = {k: v[None] for k, v in sampler(volume).items()}

    def step() -> None:
        inputs, targets, _, kwargs = prepare(batch, device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=amp):
            loss = loss_function(network(inputs, **kwargs), targets)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(network.parameters(), 1.0)
        optimizer.step()

    torch.cuda.reset_peak_memory_stats()
    seconds = median_seconds(step, repeats, sync=True)
    patches = 2 * batch["view1"].shape[1]
    return {
        "step_s": seconds,
        "patches_per_s": patches / seconds,
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m scripts.benchmark",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--repeats", type=int, default=10, help="timed repetitions (the median is printed)")
    parser.add_argument("--volume", type=int, nargs=3, default=[320, 240, 200], help="synthetic volume size (voxels)")
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 32], help="patch size (voxels)")
    parser.add_argument("--pairs", type=int, default=10, help="voxel pairs per batch")
    parser.add_argument("--voxels", type=int, default=1024, help="matched voxels per pair")
    args = parser.parse_args()

    torch.manual_seed(0)
    volume = synthetic_volume(tuple(args.volume))
    sampler = VoxelPairSamplerd(args.patch, args.pairs, args.voxels)
    sampler.set_random_state(0)
    print(f"volume {tuple(args.volume)}, {args.pairs} pairs of {tuple(args.patch)} patches, {args.voxels} voxels/pair")
    for key, value in cpu_pipeline(volume, sampler, args.repeats).items():
        print(f"cpu (1 thread) {key}: {value:.3f}")
    if torch.cuda.is_available():
        print(f"cuda device: {torch.cuda.get_device_name()}")
        for amp in (True, False):
            for key, value in cuda_step(volume, sampler, args.repeats, amp).items():
                print(f"cuda amp={'bf16' if amp else 'off'} {key}: {value:.3f}")
    else:
        print("cuda: not available, step time not measured")


if __name__ == "__main__":
    main()
