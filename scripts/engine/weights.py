"""Weight files that say what they are: a plain state dict plus a JSON sidecar with what is needed to use it.

``X.pt`` stays a plain ``state_dict`` (what ``monai.bundle.load`` and the Model Zoo's checks load); ``X.json`` beside
it records the architecture and the preprocessing the weights were trained with, e.g.::

    {"kind": "backbone", "in_channels": 1, "base_channels": 32, "num_scales": 5, "modality": "mri",
     "patch_size": [128, 128, 32], "method": "dhr"}

Segmentation files add ``num_classes``, ``head`` and ``pretrained_ckpt``. Files without a sidecar (the authors'
releases) are described by what their tensor shapes tell (:func:`infer_info`). Downstream workflows take their keys
from the weights they build on through :func:`resolve`.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from scripts.utils.distributed import is_main
from scripts.utils.errors import BundleError
from torch import Tensor

__all__ = [
    "BACKBONE_KEYS",
    "SEGMENTATION_KEYS",
    "sidecar",
    "write_info",
    "save_weights",
    "infer_info",
    "read_info",
    "matches",
    "resolve",
    "WriteInfo",
]

# What a backbone's description holds beside its kind, and what a segmentation model's adds.
BACKBONE_KEYS = ("in_channels", "base_channels", "num_scales", "modality", "patch_size", "method")
SEGMENTATION_KEYS = (*BACKBONE_KEYS, "num_classes", "head")
# The config key that names the weight file of each kind, for messages.
_FILE_KEY = {"backbone": "pretrained_ckpt", "segmentation": "model_file"}


def sidecar(path: str | os.PathLike) -> Path:
    """The JSON file describing the weight file ``path``: same folder and stem, suffix ``.json``."""
    return Path(path).with_suffix(".json")


def _replace(path: Path, write) -> None:
    """Writes ``path`` through a temporary file in the same folder and renames it: a crash leaves the old file."""
    partial = path.with_name(path.name + ".partial")
    write(partial)
    os.replace(partial, path)


def write_info(path: str | os.PathLike, info: Mapping) -> None:
    """Writes ``info`` to the sidecar of the weight file ``path``, atomically."""
    meta = sidecar(path)
    meta.parent.mkdir(parents=True, exist_ok=True)
    _replace(meta, lambda p: p.write_text(json.dumps(dict(info), indent=2) + "\n"))


def save_weights(state_dict: Mapping[str, Tensor], path: str | os.PathLike, info: Mapping) -> None:
    """Saves ``state_dict`` to ``path`` and ``info`` to its sidecar, each atomically (sidecar last)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda p: torch.save(dict(state_dict), p))
    write_info(path, info)


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


def _infer_head(state_dict: Mapping[str, Tensor]) -> dict:
    """The head of a `scripts.networks.segmentation.SegmentationNet` state dict, from its shapes: the linear head's
    ``head.convs.<i>.weight`` and the non-linear head's ``head.final_block.weight`` are (num_classes, C, 1, 1, 1).
    Empty for any other network (a pretraining network's ``head`` is its projection MLP)."""
    for name, key in (("linear", "head.convs.0.weight"), ("nonlinear", "head.final_block.weight")):
        if key in state_dict:
            return {"kind": "segmentation", "num_classes": int(state_dict[key].shape[0]), "head": name}
    return {}


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (hex), read in 1 MiB blocks: a weight file's content, for identities and releases."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_info(path: str | os.PathLike) -> dict:
    """The description of the weight file ``path``: its sidecar if there is one, else what its tensor shapes tell
    (:func:`infer_info`; ``kind`` and, for a segmentation network, ``num_classes`` and ``head``) of a plain state dict,
    ``{"state_dict": ...}``, ``{"network": ...}`` or ``backbone.``/``module.``-prefixed keys. Empty if it tells
    nothing."""
    meta = sidecar(path)
    if meta.is_file():
        return json.loads(meta.read_text())
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, Mapping):
        return {}
    for container in ("network", "state_dict"):
        if isinstance(state.get(container), Mapping):
            state = state[container]
            break
    for prefix in ("", "backbone.", "module.", "module.backbone."):
        if info := infer_info(state, prefix):
            return {"kind": "backbone", **info, **_infer_head(state)}
    return {}


def matches(a: Any, b: Any) -> bool:
    """Equality that does not tell a JSON list from a tuple: a patch size read from a sidecar equals the given one."""
    if isinstance(a, Sequence) and isinstance(b, Sequence) and not isinstance(a, str | bytes):
        return list(a) == list(b)
    return a == b


def resolve(
    file: str | os.PathLike | None,
    kind: str,
    defaults: Mapping[str, Any],
    given: Mapping[str, Any] | None = None,
    required: bool = True,
) -> dict:
    """The settings of a workflow that builds on the weight file ``file``, each key set in one place.

    For each key of ``defaults``: its value in ``given`` if not None (what the user set), else what ``file``'s
    description (:func:`read_info`) records, else its value in ``defaults``. A given value that contradicts the file
    stops the run, since the weights would not fit or would be used with another preprocessing than they learned.

    Args:
        file: the weight file the workflow builds on; None for none (training from scratch).
        kind: ``"backbone"``: ``file`` initialises the backbone (``pretrained_ckpt``), so only its backbone keys count
            (:data:`BACKBONE_KEYS`), whatever network it came from. ``"segmentation"``: ``file`` is the trained model
            (``model_file``) and all its keys count (:data:`SEGMENTATION_KEYS`); a backbone file is refused.
        defaults: every key to resolve, with its value when neither the user nor the file sets it.
        given: the user's values; None means not set.
        required: False: a ``file`` that does not exist (nor its sidecar) counts as no file, so that a config still
            builds its network before the weights are there (``inference.json`` for the Model Zoo's checks).

    Returns:
        ``{key: value}`` for every key of ``defaults``.

    Raises:
        BundleError: naming the file, when it does not exist (and ``required``), is of the wrong kind, or contradicts
            a given value (both values named).
    """
    if kind not in _FILE_KEY:
        raise ValueError(f"kind must be one of {sorted(_FILE_KEY)}, got {kind!r}")
    given = {k: v for k, v in (given or {}).items() if v is not None}
    recorded: dict = {}
    if file is not None and (required or Path(file).is_file() or sidecar(file).is_file()):
        recorded, source = _described(file, kind)
    settings = {}
    for key, default in defaults.items():
        value = given.get(key, recorded.get(key, default))
        if key in given and recorded.get(key) is not None and not matches(given[key], recorded[key]):
            raise BundleError(
                f"--{key} {given[key]!r} contradicts {_FILE_KEY[kind]} {file} ({key} {recorded[key]!r} according to "
                f"its {source}): leave out --{key} to use the file's value, or give weights made with {key} "
                f"{given[key]!r}"
            )
        settings[key] = list(value) if isinstance(value, tuple) else value
    return settings


def _described(file: str | os.PathLike, kind: str) -> tuple[dict, str]:
    """The keys ``file`` records that count for ``kind`` (see :func:`resolve`), and where they come from."""
    if not Path(file).is_file() and not sidecar(file).is_file():
        raise BundleError(f"{_FILE_KEY[kind]} {file} does not exist: give the path of an existing weight file")
    info = read_info(file)
    source = f"sidecar {sidecar(file)}" if sidecar(file).is_file() else "tensor shapes"
    if kind == "segmentation" and info.get("kind") == "backbone":
        raise BundleError(
            f"model_file {file} is a pretrained backbone, not a trained segmentation model: pass it as "
            "--pretrained_ckpt to train a model (configs/train.yaml), then evaluate or run inference with that "
            "model's file"
        )
    keys = BACKBONE_KEYS if kind == "backbone" else SEGMENTATION_KEYS
    return {k: info[k] for k in keys if info.get(k) is not None}, source


class WriteInfo:
    """Ignite/MONAI handler: writes the sidecar of the weight file ``path`` each time the engine's epoch completes and
    the file exists.

    Attach it after MONAI's `CheckpointSaver` (handlers run in the order they attach): that saver writes the plain
    state dict and has no hook for a sidecar. Its first save of a run always happens at the first validation (any
    score beats none), so the sidecar never describes another run's file for longer than one validation.

    Args:
        path: the weight file described.
        info: its description (see the module docstring).
    """

    def __init__(self, path: str | os.PathLike, info: Mapping) -> None:
        self.path = Path(path)
        self.info = dict(info)

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if self.path.is_file() and is_main():  # rank 0 alone writes files
            write_info(self.path, self.info)
