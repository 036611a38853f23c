"""Benchmark of DHR pretraining: data-pipeline time per batch on one CPU core, and on CUDA the full step time.

Usage (from the bundle root)::

    python -m scripts.benchmark [--repeats 10] [--volume 320 240 200] [--patch 128 128 32] [--pairs 10]
    python -m scripts.benchmark --memory [--patch 128 128 32] [--pairs 10]

``--memory`` prints an estimate of the training memory per configuration instead, without running anything: the
networks run on PyTorch's "meta" device (shapes only), and the tensors their forward pass saves for the backward
pass are summed (`saved_activation_bytes`).

CPU figure: one batch = ``pairs`` voxel pairs sampled from a preprocessed (cached) volume plus DHR's local
augmentations of both views, with one thread, as one DataLoader worker would do it. CUDA figures (when a GPU is
present): sampling on the CPU, then augmentation, forward, loss, backward and the optimiser step of the full DHR network
at the given patch and batch size, with bf16 AMP on and off; patches per second count both views.
"""

import argparse
import contextlib
import io
import statistics
import time
from collections.abc import Callable

import numpy as np
import torch

from scripts.local_augmentations import LocalAugmentations
from scripts.losses import HybridLoss
from scripts.networks import dhr_network
from scripts.sampler import VoxelPairSamplerd
from scripts.segmentation import segmentation_network
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
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--volume", type=int, nargs=3, default=[320, 240, 200])
    parser.add_argument("--patch", type=int, nargs=3, default=[128, 128, 32])
    parser.add_argument("--pairs", type=int, default=10)
    parser.add_argument("--voxels", type=int, default=1024)
    parser.add_argument("--memory", action="store_true", help="print memory estimates instead (nothing is run)")
    args = parser.parse_args()
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
