"""Turns released DHR / vox2vec weights, or a checkpoint of this bundle, into a pretrained-backbone file: a plain
`FPN3d` state dict with its ``.json`` sidecar (`scripts.engine.weights`).

Usage::

    python -m scripts.import_weights SRC DST [--modality ct] [--method vox2vec] [--patch_size 128 128 32]
        [--base_channels 16] [--num_scales 6]

The architecture is read from SRC's tensor shapes; ``--base_channels``/``--num_scales`` are only checked against it.
Accepted inputs: every checkpoint form `scripts.networks.pretrained` reads (the authors' releases, a full pretraining
checkpoint, this bundle's training checkpoint), and a checkpoint folder (its newest ``checkpoint_iteration=N.pt``,
looked for in the folder and in its ``checkpoints/``). The modality preset, patch size and method come from SRC's
``.json`` sidecar (a weight file of this bundle) or a bundle checkpoint's run identity (an ``identity`` or ``run``
entry) when it has one, else from the options; what none tells is recorded as null. DST may not be SRC, nor share its
sidecar.
"""

import argparse
import json
import logging
import os
from collections.abc import Mapping, Sequence
from pathlib import Path


def build_parser() -> argparse.ArgumentParser:
    """The command line; built before torch and MONAI are imported (see the imports below)."""
    parser = argparse.ArgumentParser(
        prog="python -m scripts.import_weights",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("src", help="released weights, a checkpoint (.pt / .ckpt) or a checkpoint folder")
    parser.add_argument("dst", help="output file: the plain FPN3d state dict, beside it its .json sidecar")
    parser.add_argument("--base_channels", type=int, help="checked against the file (DHR 32, vox2vec 16)")
    parser.add_argument("--num_scales", type=int, help="checked against the file (DHR 5, vox2vec 6)")
    parser.add_argument("--modality", choices=["ct", "ct_wide", "mri"], help="preset the weights were pretrained with")
    parser.add_argument("--patch_size", type=int, nargs=3, help="pretraining patch size in voxels")
    parser.add_argument("--method", choices=["dhr", "vox2vec", "pcrl"], help="pretraining method")
    return parser


if __name__ == "__main__":
    build_parser().parse_args()  # --help and argument errors answer before torch and MONAI are imported

from scripts.engine.runs import checkpoints  # noqa: E402
from scripts.engine.weights import infer_info, matches, save_weights, sidecar  # noqa: E402
from scripts.networks.fpn3d import FPN3d  # noqa: E402
from scripts.networks.pretrained import backbone_state, read_checkpoint  # noqa: E402
from scripts.utils import errors, log  # noqa: E402
from scripts.utils.errors import BundleError  # noqa: E402

logger = logging.getLogger(__name__)

__all__ = ["checkpoint_file", "import_backbone", "main"]


def checkpoint_file(src: str | os.PathLike) -> Path:
    """``src`` itself if it is a file; for a folder, its newest ``checkpoint_iteration=N.pt``, or that of its
    ``checkpoints/`` subfolder (a pretraining run's output folder).

    Raises:
        BundleError: naming ``src``, when it does not exist or the folder holds no checkpoint.
    """
    src = Path(src)
    if src.is_file():
        return src
    if not src.is_dir():
        raise BundleError(f"{src} does not exist: give a weight file or a checkpoint folder")
    found = checkpoints(src) or checkpoints(src / "checkpoints")
    if not found:
        raise BundleError(f"{src} holds no checkpoint_iteration=N.pt (nor does {src / 'checkpoints'})")
    return found[0]


# What a backbone's sidecar records beyond the architecture, which the tensor shapes tell.
_RUN_KEYS = ("modality", "patch_size", "method")


def _run_identity(checkpoint: Mapping) -> dict:
    """Modality preset, patch size and method recorded in a bundle checkpoint's ``identity`` or ``run`` entry."""
    for entry in ("identity", "run"):
        identity = checkpoint.get(entry)
        if isinstance(identity, Mapping):
            return {k: identity[k] for k in _RUN_KEYS if identity.get(k) is not None}
    return {}


def _sidecar_fields(path: Path) -> dict:
    """Modality preset, patch size and method recorded in the sidecar of a weight file of this bundle (a backbone or a
    segmentation model); empty without a sidecar.

    Raises:
        BundleError: naming the sidecar, when it is not valid JSON.
    """
    meta = sidecar(path)
    if not meta.is_file():
        return {}
    try:
        info = json.loads(meta.read_text())
    except ValueError as err:
        raise BundleError(f"{meta}, the sidecar of {path}, is not valid JSON ({err}): fix or delete it") from err
    return {k: info[k] for k in _RUN_KEYS if info.get(k) is not None}


def _refuse_overwriting(src: Path, dst: Path) -> None:
    """Stops before anything is written when writing ``dst`` would replace ``src`` or its sidecar: the same file (also
    through a symbolic link), or a name sharing the sidecar (``x.pt`` and ``x.pth`` both have ``x.json``)."""
    if dst.resolve() == src.resolve() or sidecar(dst).resolve() == sidecar(src).resolve():
        raise BundleError(
            f"{dst} would overwrite the source {src} or its sidecar {sidecar(src)}: give another destination file"
        )


def import_backbone(src: str | os.PathLike, dst: str | os.PathLike, **given) -> dict:
    """Writes the backbone held by ``src`` (any form of the module docstring) to ``dst`` with its sidecar; returns the
    sidecar's content.

    Args:
        src: weight file, checkpoint or checkpoint folder.
        dst: the plain `FPN3d` state dict to write.
        given: ``base_channels``, ``num_scales`` (checked against the file), ``modality``, ``patch_size``, ``method``
            (checked against ``src``'s sidecar and a run identity in the file, else recorded); None for not given.

    Raises:
        BundleError: when ``src`` holds no readable backbone, contradicts a given value (both values named), or
            ``dst`` would overwrite ``src`` or its sidecar (found before anything is written).
    """
    path = checkpoint_file(src)
    _refuse_overwriting(path, Path(dst))
    try:
        checkpoint = read_checkpoint(path)
        state = backbone_state(path, checkpoint)
    except (FileNotFoundError, ValueError) as err:
        raise BundleError(str(err)) from err
    described = {  # what the file records, by where it is recorded (named in messages)
        f"sidecar {sidecar(path)}": _sidecar_fields(path),
        "run identity": _run_identity(checkpoint),
        "tensor shapes": infer_info(state),
    }
    for source, fields in described.items():
        for key, value in given.items():
            if value is not None and key in fields and not matches(value, fields[key]):
                raise BundleError(
                    f"--{key} {value!r} contradicts {path} ({key} {fields[key]!r} according to its {source}): "
                    f"leave out --{key}"
                )
    recorded = {key: value for fields in described.values() for key, value in fields.items()}
    info = {"kind": "backbone", **dict.fromkeys(_RUN_KEYS)}
    info |= {k: v for k, v in given.items() if v is not None} | recorded
    if info["patch_size"] is not None:
        info["patch_size"] = list(info["patch_size"])
    backbone = FPN3d(info["in_channels"], info["base_channels"], info["num_scales"])
    backbone.load_state_dict(state, strict=True)  # every tensor, shapes as inferred: a broken file fails here
    save_weights(backbone.state_dict(), dst, info)
    return info


def main(argv: Sequence[str] | None = None) -> None:
    """Command line entry point; exits with status 1 and a one-line message on a missing or unfitting file."""
    parser = build_parser()
    args = parser.parse_args(argv)
    errors.install()
    log.configure()

    try:
        info = import_backbone(args.src, args.dst, **{k: v for k, v in vars(args).items() if k not in ("src", "dst")})
    except BundleError as err:
        parser.exit(1, f"error: {err}\n")
    backbone = FPN3d(info["in_channels"], info["base_channels"], info["num_scales"])
    num_parameters = sum(p.numel() for p in backbone.parameters())
    logger.info(
        f"saved {len(backbone.state_dict())} tensors ({num_parameters:,} parameters) of FPN3d({backbone.in_channels}, "
        f"{backbone.base_channels}, {backbone.num_scales}) from {args.src} to {args.dst}"
    )
    logger.info(f"described in {Path(args.dst).with_suffix('.json')}: {info}")


if __name__ == "__main__":
    main()
