"""What ``--tracking mlflow`` records of a bundle run: every top-level config key, the executed config, a clear name
and any further files.

The configs set ``run_name`` (:func:`pretrain_run_name`, :func:`downstream_run_name`; MONAI keeps a ``run_name`` the
config has) and call :func:`record_config` on their handler lists before running: each ``MLFlowHandler`` then logs the
executed config file as an artifact and its top-level keys as parameters (MONAI writes that file into the output
folder; it is moved to a temporary folder, removed when the process ends). :func:`add_artifacts` adds files or folders
that it uploads when its engine completes. Without tracking there is no such handler and nothing changes.
"""

from __future__ import annotations

import atexit
import json
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path

__all__ = [
    "executed_config",
    "config_params",
    "record_config",
    "add_artifacts",
    "pretrain_run_name",
    "downstream_run_name",
]

# MLflow's longest parameter value (mlflow.utils.validation.MAX_PARAM_VAL_LENGTH); longer ones are cut.
_MAX_PARAM_LENGTH = 6000
# DHR's defaults in configs/pretrain.yaml: a pretraining run is named by the method and what differs from them.
_DHR = {"augmentations": "local", "projection_width": 32, "restoration_weight": 10.0, "freeze_projections": False}


def executed_config(artifacts: Iterable[str | os.PathLike | None], output_dir: str | os.PathLike) -> Path | None:
    """The executed config MONAI saved for this run: an existing file among ``artifacts``, else the file named by
    MONAI's ``<output_dir> + '/config_<time>.json'`` text, in ``output_dir``; None when MONAI saved none."""
    for artifact in artifacts:
        if not artifact:
            continue
        if Path(artifact).is_file():
            return Path(artifact)
        # the text ends with "/config_<time>.json'": its last path component, without the quote, is the file name
        candidate = Path(output_dir) / Path(str(artifact)).name.strip("'\"")
        if candidate.suffix == ".json" and candidate.is_file():
            return candidate
    return None


def config_params(config: Mapping) -> dict[str, str]:
    """Every top-level key of an executed config with its value as written (expressions unevaluated; JSON for lists
    and sections), cut to MLflow's 6000 characters."""
    params = {}
    for key, value in config.items():
        text = value if isinstance(value, str) else json.dumps(value)
        params[key] = text if len(text) <= _MAX_PARAM_LENGTH else text[: _MAX_PARAM_LENGTH - 3] + "..."
    return params


def record_config(handlers: Iterable, output_dir: str | os.PathLike) -> None:
    """With ``--tracking mlflow``: makes each ``MLFlowHandler`` among ``handlers`` log the executed config as an
    artifact and its top-level keys as parameters. Without tracking there is no such handler and nothing changes.

    Call it before the engine runs (the handler logs parameters when the run starts, artifacts when it completes).
    """
    from monai.handlers import MLFlowHandler

    for handler in handlers:
        if not isinstance(handler, MLFlowHandler):
            continue
        config_file = executed_config(handler.artifacts, output_dir)
        if config_file is None:
            continue
        config_file = _out_of_output_dir(config_file, output_dir)
        params = config_params(json.loads(config_file.read_text()))
        params.pop("save_execute_config", None)  # its file name changes with every start: the artifact says it
        # MLflow refuses to change a logged parameter, and the handler continues an unfinished run of the same name
        # (a killed run, resumed, perhaps with a larger --epochs): keep that run's values; each start's config file
        # holds its own.
        logged = _unfinished_run_params(handler)
        params = {k: v for k, v in params.items() if k not in logged}
        handler.experiment_param = {**(handler.experiment_param or {}), **params}
        others = [a for a in handler.artifacts if a and executed_config([a], output_dir) is None]
        handler.artifacts = (*others, str(config_file))


def _out_of_output_dir(config_file: Path, output_dir: str | os.PathLike) -> Path:
    """``config_file`` (MONAI writes it into ``output_dir``) moved, under its name, into a temporary folder removed when
    the process ends: the handler uploads it from there, and the run's folder keeps no stray copy."""
    if config_file.parent.resolve() != Path(output_dir).resolve():
        return config_file  # a file the user named (save_execute_config): left where it is
    folder = tempfile.mkdtemp(prefix="dhr_config_")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return Path(shutil.move(config_file, Path(folder) / config_file.name))


def add_artifacts(handlers: Iterable, *paths: str | os.PathLike) -> None:
    """With ``--tracking mlflow``: makes each ``MLFlowHandler`` among ``handlers`` also upload ``paths`` (files or
    folders) when its engine completes. Without tracking there is no such handler and nothing changes."""
    from monai.handlers import MLFlowHandler

    for handler in handlers:
        if isinstance(handler, MLFlowHandler):
            handler.artifacts = (*handler.artifacts, *map(str, paths))


def _unfinished_run_params(handler) -> dict[str, str]:
    """The parameters of the run ``handler`` will continue when it starts (its own choice, in
    ``MLFlowHandler.start``): the last unfinished run of its name in its experiment; empty when it will create one."""
    from mlflow.entities import RunStatus

    experiment = handler.client.get_experiment_by_name(handler.experiment_name)
    if experiment is None:
        return {}
    finished = RunStatus.to_string(RunStatus.FINISHED)
    runs = [
        run
        for run in handler.client.search_runs([experiment.experiment_id])
        if run.info.status != finished and (run.info.run_name == handler.run_name or not handler.run_name)
    ]
    return runs[-1].data.params if runs else {}


def pretrain_run_name(method: str, backbone: str = "fpn3d", **settings) -> str:
    """``method``, the network unless it is FPN3d, then each ablation setting that differs from DHR's default, e.g.
    ``dhr projection_width=raw`` or ``dhr segresnet``."""
    changed = [f"{key}={value}" for key, value in settings.items() if key in _DHR and value != _DHR[key]]
    return " ".join([method, *([backbone] if backbone != "fpn3d" else []), *changed])


def downstream_run_name(
    warmup_epochs: int | str, pretrained_ckpt: str | None, num_train_cases: int | None, fold: int, prefix: str = ""
) -> str:
    """E.g. ``finetune pretrained_backbone n=4 fold 0`` or ``linear scratch n=all fold 1`` (``warmup_epochs="all"``
    is linear evaluation)."""
    mode = "linear" if warmup_epochs == "all" else "finetune"
    init = Path(pretrained_ckpt).stem if pretrained_ckpt else "scratch"
    return f"{prefix}{mode} {init} n={'all' if num_train_cases is None else num_train_cases} fold {fold}"
