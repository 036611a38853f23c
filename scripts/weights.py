"""Weight files that say what they are: a plain state dict plus a JSON sidecar with what is needed to use it.

``X.pt`` stays a plain ``state_dict`` (what ``monai.bundle.load`` and the Model Zoo's checks load); ``X.json`` beside
it records the architecture and the preprocessing the weights were trained with, e.g.::

    {"kind": "backbone", "in_channels": 1, "base_channels": 32, "num_scales": 5, "modality": "mri",
     "patch_size": [128, 128, 32], "method": "dhr"}

Segmentation files add ``num_classes`` and ``head``. Files without a sidecar (the authors' releases) are described by
what their tensor shapes tell (:func:`infer_info`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

__all__ = ["sidecar", "save_weights", "infer_info", "read_info"]


def sidecar(path: str | os.PathLike) -> Path:
    """The JSON file describing the weight file ``path``: same folder and stem, suffix ``.json``."""
    return Path(path).with_suffix(".json")


def _replace(path: Path, write) -> None:
    """Writes ``path`` through a temporary file in the same folder and renames it: a crash leaves the old file."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def save_weights(state_dict: Mapping[str, Tensor], path: str | os.PathLike, info: Mapping) -> None:
    """Saves ``state_dict`` to ``path`` and ``info`` to its sidecar, each atomically (sidecar last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda p: torch.save(dict(state_dict), p))
    _replace(sidecar(path), lambda p: p.write_text(json.dumps(dict(info), indent=2) + "\n"))


def infer_info(state_dict: Mapping[str, Tensor], prefix: str = "") -> dict:
    """What the tensor shapes of an FPN3d state dict (keys under ``prefix``) tell: channels and scales.

    ``first_conv.weight`` is (base_channels, in_channels, 3, 3, 3); an FPN3d with S scales has S - 1 ``down_blocks``.
    Returns an empty dict when the state dict holds no FPN3d.
    """
    first = state_dict.get(prefix + "first_conv.weight")
    if first is None:
        return {}
    downs = {k[len(prefix) :].split(".")[1] for k in state_dict if k.startswith(prefix + "down_blocks.")}
    return {"in_channels": int(first.shape[1]), "base_channels": int(first.shape[0]), "num_scales": len(downs) + 1}


def read_info(path: str | os.PathLike) -> dict:
    """The description of the weight file ``path``: its sidecar if there is one, else :func:`infer_info` of its
    tensors (a plain state dict, ``{"state_dict": ...}`` or ``backbone.``-prefixed keys)."""
    meta = sidecar(path)
    if meta.is_file():
        return json.loads(meta.read_text())
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    for prefix in ("", "backbone.", "module."):
        if info := infer_info(state, prefix):
            return info
    return {}
