"""PCRL, preservational contrastive representation learning (Zhou et al., ICCV 2021), on the bundle's FPN3d backbone.

`PCRLBatch` prepares a step from the voxel-pair sampler's pairs (the two views are PCRL's two crops): corrupted views,
random flip/rotation transformations, mixing weights, mixup partners and the reconstruction targets. `PCRLNetwork` holds
the student (the trained `FPN3d`), its momentum teacher, the shared decoder with transformation-conditioned attention
and the queue of negatives; `PCRLLoss` is the mean of the InfoNCE terms plus the mean of the reconstruction MSEs;
`PCRLTrainer` moves the teacher and fills the queue after each optimiser step. `configs/pretrain_pcrl.yaml` wires them
over `configs/pretrain.yaml`. The terms of a step and the deviations from the authors' code: docs/README.md, "Other
methods".
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from monai.engines import SupervisedTrainer
from scripts.networks.fpn3d import FPN3d
from scripts.ssl.batch import batch_generator
from scripts.utils.distributed import all_gather, average_, unwrap
from torch import Tensor, nn

__all__ = [
    "CODE_SIZE",
    "random_transforms",
    "transform_code",
    "apply_transforms",
    "PCRLBatch",
    "PCRLNetwork",
    "PCRLLoss",
    "PCRLTrainer",
]

# Length of a transformation code: 3 flip bits (X, Y, Z), then a one-hot of the in-plane rotation k in 0..3.
CODE_SIZE = 7


def random_transforms(
    batch: int,
    spatial_size: Sequence[int],
    device: torch.device | str | None = None,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """
    Draws a random `T` per patch: each axis flipped with probability 1/2, then an in-plane (X-Y) rotation by k * 90
    degrees, k uniform in 0..3. When X != Y only k in {0, 2} keeps the patch shape, so k is drawn from those.

    Args:
        batch: number of patches B.
        spatial_size: (X, Y, Z) of the patches.
        device: where the returned tensors live.
        generator: source of the draws, on `device`; None: torch's default generator.

    Returns:
        flips (B, 3) bool, per axis X, Y, Z; rotations (B,) int64, k.
    """
    flips = torch.rand(batch, 3, device=device, generator=generator) < 0.5
    if spatial_size[0] == spatial_size[1]:
        rotations = torch.randint(0, 4, (batch,), device=device, generator=generator)
    else:
        rotations = 2 * torch.randint(0, 2, (batch,), device=device, generator=generator)
    return flips, rotations


def transform_code(flips: Tensor, rotations: Tensor) -> Tensor:
    """The 7-d code of each `T` that conditions the decoder: (B, 3) flips, (B,) rotations -> (B, 7) float32."""
    return torch.cat([flips.float(), F.one_hot(rotations, 4).float()], dim=1)


def apply_transforms(images: Tensor, flips: Tensor, rotations: Tensor) -> Tensor:
    """
    Applies each patch's `T`: flips first, then ``torch.rot90(patch, k, dims=(X, Y))``.

    Batched without per-patch loops: each candidate flip or rotation is computed for the whole batch and selected per
    patch (a few copies of a batch of patches are cheap next to a network pass).

    Args:
        images: (B, C, X, Y, Z).
        flips: (B, 3) bool, per axis X, Y, Z.
        rotations: (B,) int64, k in 0..3; even when X != Y.

    Returns:
        (B, C, X, Y, Z), a new tensor.
    """
    if images.ndim != 5:
        raise ValueError(f"images must be (B, C, X, Y, Z), got shape {tuple(images.shape)}.")
    square = images.shape[2] == images.shape[3]
    if not square and bool((rotations % 2 == 1).any()):
        raise ValueError(f"odd 90-degree rotations change the shape of {tuple(images.shape[2:])} patches (X != Y).")
    out = images
    for axis in range(3):
        out = torch.where(flips[:, axis].view(-1, 1, 1, 1, 1), out.flip(axis + 2), out)
    rotated = out
    for k in (1, 2, 3) if square else (2,):
        rotated = torch.where((rotations == k).view(-1, 1, 1, 1, 1), torch.rot90(out, k, dims=(2, 3)), rotated)
    return rotated


def _folded_uniform(generator: torch.Generator | None = None) -> float:
    """``max(a, 1 - a)`` for ``a ~ Beta(1, 1)``, i.e. uniform in [0.5, 1]: PCRL's mixing weights (the first input
    dominates). Drawn on the CPU (a Python float is needed) from `generator`, else torch's default CPU generator."""
    a = torch.rand((), generator=generator).item()
    return max(a, 1.0 - a)


class PCRLBatch:
    """
    ``prepare_batch`` for `PCRLTrainer`: moves voxel-pair batches to the device, corrupts the views there and builds
    the reconstruction targets and the random transformations (all randomness of a step is drawn here, so the
    network's forward is a deterministic function of its arguments).

    A batch from :class:`scripts.ssl.sampler.VoxelPairSamplerd` holds V volumes x N pairs; the P = V * N pairs give
    clean views ``c1, c2`` (P, 1, X, Y, Z) each. The terms they serve: docs/README.md, "Other methods".

    Randomness as in `scripts.ssl.batch.SSLBatch`: every draw (corruption, transformations, mixing weights, mixup
    partners) comes from ``torch_generator(seed, rank, s)`` on the device, s = the batch's first ``sample_index``, and
    the mixing weights from ``torch_generator(seed, rank, s, 1)`` on the CPU; a batch without ``sample_index`` uses
    torch's default generators.

    Args:
        augment: batched corruption ``(B, 1, X, Y, Z), generator=... -> (B, 1, X, Y, Z)``, or None for none.
        mixup: add the input-mixup pass.
        seed: the run's seed.

    Returns (when called):
        ``inputs`` (2P, 1, X, Y, Z): corrupted views, view 1 first;
        ``targets``: ``student``, ``teacher``, ``hybrid`` and with mixup ``student_mixup``, ``hybrid_mixup``, each
        (P, 1, X, Y, Z);
        no positional args;
        kwargs for `PCRLNetwork`: ``codes`` (2P, 7), ``alpha`` float, and with mixup ``mixed`` (2P, 1, X, Y, Z) and
        ``mixed_alpha`` float.
    """

    def __init__(self, augment: Callable[..., Tensor] | None = None, mixup: bool = True, seed: int = 0) -> None:
        self.augment = augment
        self.mixup = mixup
        self.seed = seed

    def __call__(
        self,
        batchdata: dict[str, Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs,
    ) -> tuple[Tensor, dict[str, Tensor], tuple, dict]:
        def flat(key: str) -> Tensor:  # (V, N, ...) -> (V * N, ...), a plain tensor: no metadata to track here
            view = batchdata[key].flatten(0, 1).as_subclass(Tensor)
            return view.to(device=device, non_blocking=non_blocking, **kwargs)

        clean = torch.cat([flat("view1"), flat("view2")])
        pairs = clean.shape[0] // 2
        seeded = "sample_index" in batchdata
        generator = batch_generator(batchdata, self.seed, clean.device) if seeded else None
        # the mixing weights are Python floats: drawn on the CPU (no device sync), from a stream of their own
        cpu_generator = batch_generator(batchdata, self.seed, torch.device("cpu"), 1) if seeded else None
        if self.augment is None:
            inputs = clean
        else:
            inputs = self.augment(clean, generator=generator) if seeded else self.augment(clean)
        flips, rotations = random_transforms(2 * pairs, clean.shape[2:], clean.device, generator)
        target = apply_transforms(clean, flips, rotations)
        alpha = _folded_uniform(cpu_generator)
        targets = {
            "student": target[:pairs],
            "teacher": target[pairs:],
            "hybrid": alpha * target[:pairs] + (1 - alpha) * target[pairs:],
        }
        network_kwargs = {"codes": transform_code(flips, rotations), "alpha": alpha}
        if self.mixup:
            # One partner per pair, the same in both views, so that mixed view 1 and mixed view 2 still match.
            partner = torch.randperm(pairs, device=clean.device, generator=generator)
            partner = torch.cat([partner, partner + pairs])
            lam = _folded_uniform(cpu_generator)
            # T is linear and per patch, so T_i(lam * c_i + (1 - lam) * c_j) is the target of the mixed patch i.
            mixed_target = apply_transforms(lam * clean + (1 - lam) * clean[partner], flips, rotations)
            mixed_alpha = _folded_uniform(cpu_generator)
            targets["student_mixup"] = mixed_target[:pairs]
            targets["hybrid_mixup"] = mixed_alpha * mixed_target[:pairs] + (1 - mixed_alpha) * mixed_target[pairs:]
            network_kwargs.update(mixed=lam * inputs + (1 - lam) * inputs[partner], mixed_alpha=mixed_alpha)
        return inputs, targets, (), network_kwargs


def _gate(features: list[Tensor], gate: Tensor) -> list[Tensor]:
    """Multiplies the bottleneck's channels (B, C, ...) by ``gate`` (B, C); the skip features stay as they are."""
    return [*features[:-1], features[-1] * gate.view(*gate.shape, 1, 1, 1)]


def _mix(first: list[Tensor], second: list[Tensor], alpha: float) -> list[Tensor]:
    """``alpha * first + (1 - alpha) * second`` at every encoder level: the hybrid encoder's features."""
    return [alpha * a + (1 - alpha) * b for a, b in zip(first, second, strict=True)]


class PCRLNetwork(nn.Module):
    """
    PCRL's pretraining network around a student `FPN3d`: the momentum teacher (an EMA copy of the backbone, no
    gradient), MoCo projection heads, the transformation-conditioned attention, the restoration head and the queue.

    The teacher, its head, the ``queue`` (K, D) of unit vectors and its ``queue_ptr`` (the next row to overwrite) are
    part of the state dict, so checkpoints of this module resume exactly. Call :meth:`step` after each optimiser step.
    Under ``torchrun`` (DDP, which must not broadcast buffers at each forward: ``forward_sync_buffers=False``),
    `step` enqueues the keys of all ranks and averages the student's BatchNorm statistics over the ranks before the
    teacher copies them, so every rank holds the same queue and the same teacher.

    Args:
        backbone: the student; its encoder and decoder are used separately (`FPN3d.encode`, `FPN3d.decode`), and it is
            what gets exported.
        queue_size: number of negatives K.
        embedding_dim: length D of the contrastive embeddings.
        temperature: InfoNCE temperature.
        momentum: EMA momentum m of the teacher: ``teacher = m * teacher + (1 - m) * student``.
        attention_hidden: hidden width of the attention MLP (7 -> hidden -> bottleneck channels).
        teacher_reconstruction: also decode the teacher branch (output ``teacher``), an extra term not in PCRL.
    """

    def __init__(
        self,
        backbone: FPN3d,
        queue_size: int = 16384,
        embedding_dim: int = 128,
        temperature: float = 0.2,
        momentum: float = 0.999,
        attention_hidden: int = 256,
        teacher_reconstruction: bool = False,
    ) -> None:
        super().__init__()
        self.backbone = backbone
        self.teacher_reconstruction = teacher_reconstruction
        self.temperature = temperature
        self.momentum = momentum
        bottleneck = backbone.out_channels[-1]
        self.head = nn.Sequential(
            nn.Linear(bottleneck, bottleneck), nn.ReLU(inplace=True), nn.Linear(bottleneck, embedding_dim)
        )
        # The teacher starts as an exact copy (the authors' momentum update with m = 0) and is never optimised.
        self.teacher = copy.deepcopy(backbone).requires_grad_(False)
        self.teacher_head = copy.deepcopy(self.head).requires_grad_(False)
        self.attention = nn.Sequential(
            nn.Linear(CODE_SIZE, attention_hidden),
            nn.ReLU(inplace=True),
            nn.Linear(attention_hidden, bottleneck),
            nn.Sigmoid(),
        )
        self.restoration_head = nn.Conv3d(backbone.out_channels[0], 1, kernel_size=1)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, embedding_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))
        self._keys: Tensor | None = None  # this step's keys, enqueued by `step` once the optimiser has stepped

    def forward(
        self, images: Tensor, codes: Tensor, alpha: float, mixed: Tensor | None = None, mixed_alpha: float = 0.5
    ) -> dict[str, Tensor]:
        """
        Args:
            images: (2P, 1, X, Y, Z) corrupted views, the P views 1 then their P views 2.
            codes: (2P, 7) transformation codes of the views (`transform_code`).
            alpha: hybrid mixing weight of the student features, in [0.5, 1].
            mixed: (2P, 1, X, Y, Z) input-mixed views for the mixup pass, or None to skip it.
            mixed_alpha: hybrid mixing weight of the mixup pass.

        Returns:
            ``logits`` (P, 1 + K): InfoNCE logits (positive first, already divided by the temperature, float32);
            ``student``, ``hybrid`` (and with `teacher_reconstruction` ``teacher``): (P, 1, X, Y, Z) reconstructions;
            with ``mixed`` also
            ``logits_mixup``, ``student_mixup`` and ``hybrid_mixup``.
        """
        pairs = images.shape[0] // 2
        gates = self.attention(codes)
        student, teacher, keys = self._encode(images[:pairs], images[pairs:])
        student_gated, teacher_gated = _gate(student, gates[:pairs]), _gate(teacher, gates[pairs:])
        outputs = {
            "logits": self._logits(self._embed(self.head, student[-1]), keys),
            "student": self._reconstruct(student_gated),
            "hybrid": self._reconstruct(_mix(student_gated, teacher_gated, alpha)),
        }
        if self.teacher_reconstruction:
            outputs["teacher"] = self._reconstruct(teacher_gated)
        if self.training:
            self._keys = keys
        if mixed is not None:
            student, teacher, mixed_keys = self._encode(mixed[:pairs], mixed[pairs:])
            student_gated, teacher_gated = _gate(student, gates[:pairs]), _gate(teacher, gates[pairs:])
            outputs["logits_mixup"] = self._logits(self._embed(self.head, student[-1]), mixed_keys)
            outputs["student_mixup"] = self._reconstruct(student_gated)
            outputs["hybrid_mixup"] = self._reconstruct(_mix(student_gated, teacher_gated, mixed_alpha))
        return outputs

    def _encode(self, queries: Tensor, keys: Tensor) -> tuple[list[Tensor], list[Tensor], Tensor]:
        """Student features of `queries`, teacher features of `keys` and the teacher's key embeddings (P, D)."""
        student = self.backbone.encode(queries)
        with torch.no_grad():
            teacher = self.teacher.encode(keys)
            embeddings = self._embed(self.teacher_head, teacher[-1])
        return student, teacher, embeddings

    @staticmethod
    def _embed(head: nn.Module, bottleneck: Tensor) -> Tensor:
        """(B, C, X, Y, Z) bottleneck -> global average pool -> MLP -> (B, D) float32 unit vectors."""
        return F.normalize(head(bottleneck.mean(dim=(2, 3, 4))).float(), dim=1)

    def _logits(self, queries: Tensor, keys: Tensor) -> Tensor:
        """(P, D) queries and their positive keys -> (P, 1 + K) logits against [key, queue]."""
        # float32 even under AMP: autocast would run the matmul in half precision, coarse for cosines / 0.2.
        with torch.autocast(queries.device.type, enabled=False):
            positive = (queries * keys).sum(dim=1, keepdim=True)
            negative = queries @ self.queue.clone().T  # a copy, so a later enqueue cannot touch the autograd graph
            return torch.cat([positive, negative], dim=1) / self.temperature

    def _reconstruct(self, features: list[Tensor]) -> Tensor:
        """Encoder features -> shared decoder (the student's) -> finest level -> 1x1x1 conv: (B, 1, X, Y, Z)."""
        return self.restoration_head(self.backbone.decode(features)[0])

    @torch.no_grad()
    def momentum_update(self) -> None:
        """``teacher = m * teacher + (1 - m) * student`` for the parameters; BatchNorm statistics are copied, after
        averaging the student's over the ranks (identical students, so identical teachers)."""
        average_([b for b in [*self.backbone.buffers(), *self.head.buffers()] if b.is_floating_point()])
        for student, teacher in ((self.backbone, self.teacher), (self.head, self.teacher_head)):
            # One fused kernel per group instead of one per tensor: this runs after every optimiser step.
            torch._foreach_lerp_(list(teacher.parameters()), list(student.parameters()), 1.0 - self.momentum)
            for target, source in zip(teacher.buffers(), student.buffers(), strict=True):
                target.copy_(source)

    @torch.no_grad()
    def enqueue(self, keys: Tensor) -> None:
        """Writes `keys` (B, D) unit vectors over the oldest B rows of the queue (FIFO, wrapping around)."""
        size = self.queue.shape[0]
        if keys.shape[0] > size:
            raise ValueError(f"cannot enqueue {keys.shape[0]} keys into a queue of {size}; raise queue_size.")
        rows = (self.queue_ptr + torch.arange(keys.shape[0], device=self.queue.device)) % size
        self.queue.index_copy_(0, rows, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + keys.shape[0]) % size)

    def step(self) -> None:
        """After an optimiser step: moves the teacher towards the student, then enqueues the last training forward's
        keys, once (those of all ranks, in rank order, under ``torchrun``).

        Raises:
            RuntimeError: when no training forward happened since the last call.
        """
        if self._keys is None:
            raise RuntimeError("PCRLNetwork.step() needs a forward pass in training mode first.")
        self.momentum_update()
        self.enqueue(all_gather(self._keys))
        self._keys = None


class PCRLLoss(nn.Module):
    """
    PCRL's loss: mean of the InfoNCE terms + mean of the reconstruction MSEs (1:1, as in the paper); the reconstruction
    terms are the authors' four (``student``, ``hybrid`` and their mixup versions) unless `teacher_reconstruction`.

    InfoNCE is the cross-entropy of each query's logits with the positive (index 0). The detached value of each term
    of the last call is kept in :attr:`terms` (as in `scripts.ssl.losses.HybridLoss`) for logging.

    Args:
        mixup: whether the input-mixup terms are expected (``infonce_mixup``, ``mse_student_mixup``,
            ``mse_hybrid_mixup``).
        teacher_reconstruction: whether the extra ``teacher`` reconstruction term is expected (``mse_teacher``).
    """

    def __init__(self, mixup: bool = True, teacher_reconstruction: bool = False) -> None:
        super().__init__()
        self.mixup = mixup
        self.teacher_reconstruction = teacher_reconstruction
        self.terms: dict[str, Tensor] = {}

    @property
    def contrastive_names(self) -> list[str]:
        return ["logits", "logits_mixup"] if self.mixup else ["logits"]

    @property
    def reconstruction_names(self) -> list[str]:
        names = ["student", "teacher", "hybrid"] if self.teacher_reconstruction else ["student", "hybrid"]
        return [*names, "student_mixup", "hybrid_mixup"] if self.mixup else names

    @property
    def term_names(self) -> list[str]:
        infonce = [name.replace("logits", "infonce") for name in self.contrastive_names]
        return infonce + [f"mse_{name}" for name in self.reconstruction_names]

    def forward(self, pred: dict[str, Tensor], target: dict[str, Tensor]) -> Tensor:
        """
        Args:
            pred: as returned by `PCRLNetwork`: ``logits*`` (P, 1 + K) and reconstructions (P, 1, X, Y, Z).
            target: as built by `PCRLBatch`: the reconstruction targets (P, 1, X, Y, Z), same names.

        Returns:
            Scalar total loss, float32.
        """
        infonce = [self._infonce(pred[name]) for name in self.contrastive_names]
        mse = [F.mse_loss(pred[name].float(), target[name].float()) for name in self.reconstruction_names]
        self.terms = {name: term.detach() for name, term in zip(self.term_names, infonce + mse, strict=True)}
        return torch.stack(infonce).mean() + torch.stack(mse).mean()

    @staticmethod
    def _infonce(logits: Tensor) -> Tensor:
        positive = torch.zeros(logits.shape[0], dtype=torch.long, device=logits.device)
        return F.cross_entropy(logits.float(), positive)


class PCRLTrainer(SupervisedTrainer):
    """
    MONAI's ``SupervisedTrainer`` plus PCRL's per-step update: after each optimiser step (and before any
    ``ITERATION_COMPLETED`` handler, such as the checkpoint saver), the network's teacher moves towards the student
    and this step's keys are enqueued, once (`PCRLNetwork.step`). Takes the same arguments; ``network`` must be a
    `PCRLNetwork` (or its ``DistributedDataParallel`` wrapper) and gradient accumulation is not supported (the update
    belongs to every optimiser step).
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.accumulation_steps != 1:
            raise ValueError(f"PCRLTrainer needs accumulation_steps=1, got {self.accumulation_steps}.")

    def _iteration(self, engine: SupervisedTrainer, batchdata: dict[str, Tensor]) -> dict:
        output = super()._iteration(engine, batchdata)
        unwrap(engine.network).step()
        return output
