"""Losses of voxel-level contrastive pretraining: symmetric InfoNCE over matched voxels, plus DHR's restoration term."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from ignite.metrics import Average, Metric
from scripts.utils.distributed import all_gather, all_gather_with_grad, rank, world_size
from torch import nn

__all__ = ["info_nce", "HybridLoss", "loss_term_metrics", "loss_and_terms"]


def info_nce(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: float = 0.1,
    valid: torch.Tensor | None = None,
    gather: bool = False,
) -> torch.Tensor:
    """
    Symmetric InfoNCE (SimCLR's NT-Xent) for the positive pairs ``(z1[i], z2[i])`` with ``valid[i]``.

    Each of the 2M embeddings of the M valid pairs is an anchor whose positive is its partner and whose negatives are
    all other 2M - 2 valid embeddings of both views; the loss is the mean over all 2M anchors, i.e. the average of both
    directions. Written with one (2N, 2N) matrix product and logsumexp: MONAI's ``ContrastiveLoss`` builds a
    (2N, 2N, D) tensor, which cannot hold the ~10k voxels of a DHR batch. Invalid rows are masked rather than removed,
    so that shapes do not depend on the data (no host-device synchronisation).

    With ``gather`` (under ``torchrun``) the negatives are the valid embeddings of every rank, gathered with their
    gradient; each rank's anchors are its own. The loss returned on each rank is then its anchors' share of the loss
    over all ranks' anchors, times the number of ranks W: DDP averages the gradients over ranks, so the network gets
    the gradient of the loss computed in one process on all ranks' embeddings.

    Args:
        z1: (N, D) unit-norm embeddings of view 1.
        z2: (N, D) unit-norm embeddings of view 2, row i matched with row i of ``z1``.
        temperature: softmax temperature (0.1 in DHR and vox2vec).
        valid: (N,) bool, the rows that hold a matched pair; None: all.
        gather: take the negatives from all ranks.

    Returns:
        Scalar loss in nats, computed in float32 whatever the input dtype (AMP).
    """
    rows = z1.shape[0]
    if valid is None:
        valid = torch.ones(rows, dtype=torch.bool, device=z1.device)
    # autocast would run the matrix product in bf16 even on float32 inputs; ~10k-way softmaxes need float32
    with torch.autocast(z1.device.type, enabled=False):
        z = torch.cat([z1, z2]).float()  # (2N, D): this rank's anchors
        mask = valid.repeat(2)
        keys, key_mask = (all_gather_with_grad(z), all_gather(mask)) if gather else (z, mask)
        logits = z @ keys.T / temperature  # (2N, 2N) or (2N, W * 2N): keys of rank r start at column r * 2N
        logits.masked_fill_(~key_mask, float("-inf"))  # invalid slots are no negatives
        own = rank() * 2 * rows if gather else 0
        logits[:, own : own + 2 * rows].fill_diagonal_(float("-inf"))  # an embedding is not its own negative
        positives = (z1.float() * z2.float()).sum(-1).repeat(2) / temperature
        per_anchor = torch.where(mask, torch.logsumexp(logits, dim=1) - positives, 0.0)
        if not gather:
            return per_anchor.sum() / mask.sum()
        return per_anchor.sum() * world_size() / key_mask.sum()


class HybridLoss(nn.Module):
    """
    DHR's hybrid loss: ``infonce_weight * InfoNCE(matched voxels) + restoration_weight * MSE(restoration, clean view)``.

    The InfoNCE runs over all valid matched voxels of the batch (negatives from every pair of the batch; with
    `gather_negatives` under ``torchrun``, from the batches of all ranks, see `info_nce`). The
    restoration term compares the network's restoration of each augmented view with its clean view, averaged over
    voxels and views. With ``restoration_weight=0`` it is neither computed nor logged (vox2vec). The detached value of
    each term from the last call is kept in :attr:`terms` so that handlers can log them separately.

    Args:
        temperature: InfoNCE temperature.
        infonce_weight: weight of the contrastive term.
        restoration_weight: weight of the restoration term (10 in DHR; 0 disables it).
        gather_negatives: take the InfoNCE negatives from all ranks' batches (the reference's are per GPU batch).
    """

    def __init__(
        self,
        temperature: float = 0.1,
        infonce_weight: float = 1.0,
        restoration_weight: float = 10.0,
        gather_negatives: bool = False,
    ) -> None:
        super().__init__()
        self.temperature = temperature
        self.infonce_weight = infonce_weight
        self.restoration_weight = restoration_weight
        self.gather_negatives = gather_negatives
        self.terms: dict[str, torch.Tensor] = {}

    @property
    def term_names(self) -> list[str]:
        return ["infonce", "restoration"] if self.restoration_weight > 0 else ["infonce"]

    def forward(self, pred: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> torch.Tensor:
        """
        Args:
            pred: ``embeddings`` (2P, K, D), rows [0, P) from view 1 and [P, 2P) from view 2 of the same P pairs;
                ``restoration`` (2P, 1, X, Y, Z) when the restoration term is on.
            target: ``valid`` (P, K) bool mask of matched voxels; ``clean`` (2P, 1, X, Y, Z) un-augmented views.

        Returns:
            Scalar total loss.
        """
        embeddings, valid = pred["embeddings"], target["valid"]
        num_pairs = valid.shape[0]
        view1, view2 = embeddings[:num_pairs].flatten(0, 1), embeddings[num_pairs:].flatten(0, 1)
        infonce = info_nce(view1, view2, self.temperature, valid.flatten(), self.gather_negatives)
        self.terms = {"infonce": infonce.detach()}
        total = self.infonce_weight * infonce
        if self.restoration_weight > 0:
            if "restoration" not in pred:
                raise ValueError(
                    "restoration_weight > 0 but the network has no restoration head; "
                    "enable it in the network or set restoration_weight to 0."
                )
            restoration = F.mse_loss(pred["restoration"].float(), target["clean"].float())
            self.terms["restoration"] = restoration.detach()
            total = total + self.restoration_weight * restoration
        return total


def loss_term_metrics(loss: HybridLoss, device: torch.device | str = "cpu") -> dict[str, Metric]:
    """Epoch means of each loss term as Ignite metrics, so they reach ``engine.state.metrics`` (stats, MLflow).

    The sums accumulate on `device`, the loss's: no per-iteration copy to the host. Under ``torchrun`` the means are
    over all ranks (ignite all-reduces them at the epoch's end)."""
    return {
        name: Average(output_transform=lambda _, name=name: loss.terms[name], device=device) for name in loss.term_names
    }


def loss_and_terms(loss: HybridLoss):
    """``output_transform`` for loggers: the total loss and each term of the last iteration, as floats.

    Reads the total from the trainer's output, a dict or, when the trainer decollates, a list of dicts. Each call
    copies the values to the host (a synchronisation on a GPU): call it every ``log_interval`` iterations only."""

    def transform(output: dict | list[dict]) -> dict[str, float]:
        first = output[0] if isinstance(output, list) else output
        return {"loss": first["loss"].item(), **{k: v.item() for k, v in loss.terms.items()}}

    return transform
