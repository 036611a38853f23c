"""Weight files that say what they are: a plain state dict plus a JSON sidecar with what is needed to use it.

``X.pt`` stays a plain ``state_dict`` (what ``monai.bundle.load`` and the Model Zoo's checks load); ``X.json`` beside
it records the architecture and the preprocessing the weights were trained with, e.g.::

    {"kind": "backbone", "in_channels": 1, "base_channels": 32, "num_scales": 5, "modality": "mri",
     "patch_size": [128, 128, 32], "method": "dhr"}

A MONAI backbone (`scripts.networks.backbones`) records ``"backbone": "segresnet"``, ``"class":
"monai.networks.nets.SegResNet"`` and its full arguments ``"backbone_args"`` instead of ``base_channels`` and
``num_scales``; a file without ``backbone`` is an FPN3d.

Segmentation files add ``num_classes``, ``head``, ``pretrained_ckpt``, the test split of their training (``fold``,
``num_folds``, ``seed``, ``datalist_sha256``) and which weights were kept (``selected``, ``epoch``); they are
written by :class:`ModelSaver` alone. Backbones without a sidecar (the authors' releases) are described by what their
tensor shapes tell (:func:`infer_info`); a segmentation file without one needs its preprocessing given, since shapes
cannot tell it. Downstream workflows take their keys from the weights they build on through :func:`resolve`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from ignite.engine import Engine, Events
from scripts.utils.distributed import is_main, unwrap
from scripts.utils.errors import BundleError, out_of_space
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "BACKBONE_KEYS",
    "SEGMENTATION_KEYS",
    "sidecar",
    "tensor_bytes",
    "save_weights",
    "infer_info",
    "read_info",
    "matches",
    "resolve",
    "ModelSaver",
    "remove_weights",
    "check_test_split",
]

# What a backbone's description holds beside its kind, and what a segmentation model's adds.
BACKBONE_KEYS = (
    "in_channels",
    "base_channels",
    "num_scales",
    "backbone",
    "backbone_args",
    "modality",
    "patch_size",
    "method",
)
SEGMENTATION_KEYS = (*BACKBONE_KEYS, "num_classes", "head")
# The config key that names the weight file of each kind, for messages.
_FILE_KEY = {"backbone": "pretrained_ckpt", "segmentation": "model_file"}
# What a trained model must be evaluated and applied with, which its tensor shapes cannot tell.
_PREPROCESSING_KEYS = ("modality", "patch_size")


def sidecar(path: str | os.PathLike) -> Path:
    """The JSON file describing the weight file ``path``: same folder and stem, suffix ``.json``."""
    return Path(path).with_suffix(".json")


def tensor_bytes(state: Any) -> int:
    """Bytes of the tensors in ``state`` (nested dicts, lists and tuples): about the size of its ``torch.save`` file."""
    if isinstance(state, Tensor):
        return state.nbytes
    if isinstance(state, Mapping):
        return sum(tensor_bytes(v) for v in state.values())
    if isinstance(state, list | tuple):
        return sum(tensor_bytes(v) for v in state)
    return 0


def save_weights(state_dict: Mapping[str, Tensor], path: str | os.PathLike, info: Mapping) -> None:
    """Saves ``state_dict`` to ``path`` and ``info`` to its sidecar: both, or neither with a description.

    Both files are written completely under temporary names first. Then the old sidecar is removed, the weights
    renamed into place, and the new sidecar last: a crash at any point leaves the old pair, or weights without a
    sidecar (which the workflows refuse, see :func:`resolve`), or the new pair, never weights described by another
    file's sidecar.

    Raises:
        OutOfSpaceError: no room for the files (the old pair is kept, the partial files removed).
    """
    path, meta = Path(path), sidecar(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partials = path.with_name(path.name + ".partial"), meta.with_name(meta.name + ".partial")
    remedy = f"free space and write it again{'; the earlier ' + path.name + ' is intact' if path.exists() else ''}"
    try:
        with out_of_space(path, tensor_bytes(dict(state_dict)), remedy):
            torch.save(dict(state_dict), partials[0])
            partials[1].write_text(json.dumps(dict(info), indent=2) + "\n")
    except BaseException:
        for partial in partials:
            partial.unlink(missing_ok=True)
        raise
    meta.unlink(missing_ok=True)
    os.replace(partials[0], path)
    os.replace(partials[1], meta)


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
    unknown = [k for k in _PREPROCESSING_KEYS if kind == "segmentation" and recorded and k not in {**recorded, **given}]
    if unknown:
        raise BundleError(
            f"model_file {file} does not record its {' and '.join(unknown)} ({source}), and a default could differ "
            f"from what it was trained with: give {' '.join(f'--{k}' for k in unknown)} as in its training, or use a "
            f"model file written by this bundle (with its sidecar {sidecar(file).name})"
        )
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


class ModelSaver:
    """Ignite handler that writes a workflow's trained model: ``path`` (a plain state dict of ``network``) with its
    sidecar, through :func:`save_weights`, so the weights and their description are always written together.

    Attached to the validation's evaluator with ``best=True``, it saves whenever a validation gives the best key metric
    so far; attached to the trainer with ``best=False``, it saves the final weights when training completes. The
    sidecar records ``selected``: ``{"epoch", "metric", "value"}`` of the validation that picked the weights, or
    ``"final"`` (with ``epoch``). Rank 0 alone writes.

    Args:
        network: the trained network (a DDP wrapper is unwrapped).
        path: the model file, e.g. ``<output_dir>/model.pt``; its sidecar is ``<output_dir>/model.json``.
        info: the description (see the module docstring).
        best: keep the best validation's weights (attach to the evaluator) rather than the final ones (the trainer).
    """

    def __init__(self, network: torch.nn.Module, path: str | os.PathLike, info: Mapping, best: bool = False) -> None:
        self.network = network
        self.path = Path(path)
        self.info = dict(info)
        self.best = best
        self.best_value = -math.inf

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.EPOCH_COMPLETED if self.best else Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        # a validation run's epoch is the trainer's (MONAI's Evaluator.run(global_epoch))
        selected: str | dict = "final"
        if self.best:
            name = engine.state.key_metric_name
            value = float(engine.state.metrics[name])
            if not value > self.best_value:
                return
            self.best_value = value
            selected = {"metric": name, "value": value}
        if is_main():
            info = {**self.info, "selected": selected, "epoch": engine.state.epoch}
            save_weights(unwrap(self.network).state_dict(), self.path, info)


def remove_weights(path: str | os.PathLike) -> None:
    """Removes the weight file ``path`` and its sidecar if they exist (rank 0): a run that will write its own model
    there starts without an earlier run's, so that until its first save it has no model rather than another one."""
    if is_main():
        for file in (sidecar(path), Path(path)):
            if file.is_file():
                logger.info(f"Removing {file}, an earlier run's: this run writes its own model there")
                file.unlink()


def check_test_split(model_file: str | os.PathLike, **split: Any) -> None:
    """Refuses to evaluate ``model_file`` on another test split than the one its training set aside.

    The test cases follow from ``fold``, ``num_folds``, ``seed`` and the labelled datalist (``datalist_sha256``, see
    `scripts.data.splits.datalist_digest`); with other values, some of them would be training cases of the model.
    Keys the model's sidecar does not record are not checked.

    Raises:
        BundleError: naming every differing key with both values.
    """
    recorded = read_info(model_file) if Path(model_file).is_file() else {}
    differences = [
        f"{key} {recorded[key]!r} there and {value!r} here"
        for key, value in split.items()
        if recorded.get(key) is not None and not matches(recorded[key], value)
    ]
    if differences:
        raise BundleError(
            f"model_file {model_file} was trained with another test split than this evaluation's ("
            + "; ".join(differences)
            + "): its test cases would include cases it trained on. Give the data keys of its training run "
            "(--dataset_dir, --fold, --num_folds, --seed) with the same, unchanged labelled data."
        )
