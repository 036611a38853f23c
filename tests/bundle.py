"""How the tests run the bundle: a workflow in this process (the fast tier), or a command in a subprocess (the slow
tier's command-line tests), each inside the test's own folders.

Every run is given a ``bundle_root`` under the test's temporary folder: the configs' defaults (``runs/``, ``models/``,
``data/cache``, ``data/demo``, ``eval``) then point there, so a test never reads what a user left in the repository and
never writes there. Wall-clock limits exist only to catch a hang: they are wide, and ``DHR_TEST_TIMEOUT_SCALE``
multiplies them (e.g. 3 on a machine that is busy with something else).
"""

from __future__ import annotations

import io
import logging
import os
import shlex
import signal
import subprocess
import sys
import time
import warnings
from collections.abc import Mapping, Sequence
from contextlib import redirect_stdout
from dataclasses import dataclass, field
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_SCALE = float(os.environ.get("DHR_TEST_TIMEOUT_SCALE", "1"))
# Limits in seconds, before scaling, for a hang only: a tiny workflow command takes about 15 s and a --help about 7 s on
# an idle core; on a loaded machine (README commands and the suite beside each other) they took over 600 s and 120 s.
WORKFLOW_LIMIT = 1800
HELP_LIMIT = 900
# The tiny DHR pretraining keys of the in-process runs: a 4-channel, 3-level FPN3d on 16 x 16 x 8 patches.
PRETRAIN_TINY = {
    "patch_size": [16, 16, 8],
    "base_channels": 4,
    "num_scales": 3,
    "pairs_per_volume": 2,
    "voxels_per_pair": 32,
    "epoch_length": 3,
    "num_workers": 0,
    "progress": False,
}


def limit(seconds: float) -> float:
    """`seconds` scaled by ``DHR_TEST_TIMEOUT_SCALE``."""
    return seconds * TIMEOUT_SCALE


def run_command(
    cmd: Sequence[str],
    *,
    timeout: float,
    cwd: str | os.PathLike = ROOT,
    env: Mapping[str, str] | None = None,
    what: str | None = None,
) -> subprocess.CompletedProcess:
    """Runs `cmd` with its output captured. Past ``limit(timeout)`` seconds the command and every process it started
    (its process group: torchrun's workers too) are killed and the test fails saying that it timed out, what it was
    running and the output so far."""
    seconds = limit(timeout)
    start = time.monotonic()
    process = subprocess.Popen(
        list(map(str, cmd)),
        cwd=cwd,
        env=None if env is None else dict(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    try:
        stdout, stderr = process.communicate(timeout=seconds)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        stdout, stderr = process.communicate()
        pytest.fail(
            f"timed out: still running after {time.monotonic() - start:.0f} s (limit {seconds:.0f} s; "
            f"DHR_TEST_TIMEOUT_SCALE={TIMEOUT_SCALE:g} scales it), killed: {what or shlex.join(map(str, cmd))}\n"
            f"in {cwd}\n--- stdout (end) ---\n{stdout[-3000:]}\n--- stderr (end) ---\n{stderr[-3000:]}",
            pytrace=False,
        )
    finally:
        if process.poll() is None:  # interrupted (Ctrl-C): leave nothing running
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def command_env() -> dict[str, str]:
    """The environment of a command: the bundle root on the path; one thread (the tensors are tiny, and two threads
    per process spin-wait on a shared 2-core machine)."""
    return {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def monai_bundle_run(
    run_id: str | None,
    config: str,
    keys: Mapping[str, object],
    *extra: str,
    nproc: int = 1,
    timeout: float = WORKFLOW_LIMIT,
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [run_id] --config_file config --key value ... *extra`` from the bundle root, as a
    user types it, output captured; with ``nproc > 1`` under ``torchrun --standalone --nproc_per_node=nproc`` (a free
    port: parallel tests don't clash). `keys` must hold ``bundle_root`` (a temporary folder)."""
    assert "bundle_root" in keys, "give bundle_root (a temporary folder): the configs' default outputs go there"
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    run = ["-m", "monai.bundle", "run", *([run_id] if run_id else [])]
    cmd = [sys.executable, *launcher, *run, "--config_file", config]
    for key, value in keys.items():
        cmd += [f"--{key}", str(value)]
    return run_command([*cmd, *extra], timeout=timeout, env=command_env())


def last_error(stderr: str) -> str:
    """What a failed command ends with: from the last line starting with ``error: `` (a message may span lines)."""
    lines = stderr.rstrip().splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("error: ")]
    assert starts, stderr[-3000:]
    return "\n".join(lines[starts[-1] :])


@dataclass
class WorkflowRun:
    """A workflow run in this process: what it logged (as the command line prints it), the warnings it raised, and
    the error it stopped with (None: it finished)."""

    log: str
    warnings: list[str] = field(default_factory=list)
    error: BaseException | None = None
    workflow: object | None = None

    @property
    def message(self) -> str:
        """``error: <message>``, the last line the command line would print for a BundleError."""
        from scripts.utils.errors import find_bundle_error

        cause = find_bundle_error(self.error)
        assert cause is not None, f"the run did not stop with a BundleError: {self.error!r}\n{self.log[-3000:]}"
        return f"error: {cause}"


def run_workflow(
    run_id: str | None,
    configs: str | Sequence[str],
    *,
    fails: bool = False,
    tracking: str | None = None,
    **keys: object,
) -> WorkflowRun:
    """Runs ``configs`` (paths relative to the bundle root) in this process as ``python -m monai.bundle run`` does:
    ``create_workflow`` (initialize), run, finalize; ``keys`` override the configs and must hold ``bundle_root`` (a
    temporary folder). Its INFO log and stdout are captured with the command line's format. A run that raises fails
    the test with its traceback, unless ``fails``: then the run must stop (its error is returned)."""
    from monai.bundle import create_workflow

    assert "bundle_root" in keys, "give bundle_root (a temporary folder): the configs' default outputs go there"
    files = [str(ROOT / c) for c in ([configs] if isinstance(configs, str) else configs)]
    keys = {k: str(v) if isinstance(v, os.PathLike) else v for k, v in keys.items()}
    buffer = io.StringIO()
    handler = logging.StreamHandler(buffer)
    handler.setFormatter(logging.Formatter("%(asctime)s - %(name)s - %(levelname)s - %(message)s"))
    root = logging.getLogger()
    level = root.level
    # the root logger, and MONAI's loggers that print to the stdout of their creation instead of propagating
    loggers = [root, *(x for x in logging.root.manager.loggerDict.values() if getattr(x, "propagate", True) is False)]
    for logger in loggers:
        logger.addHandler(handler)
    root.setLevel(logging.INFO)
    run = WorkflowRun(log="")
    try:
        with warnings.catch_warnings(record=True) as caught, redirect_stdout(buffer):
            warnings.simplefilter("always")
            warnings.filterwarnings("ignore", message="parsing config_file")  # MONAI's note on trusted configs
            try:
                workflow = create_workflow(
                    config_file=files, logging_file=False, run_id=run_id or "run", tracking=tracking, **keys
                )
                run.workflow = workflow
                workflow.run()
                workflow.finalize()
            except Exception as error:  # noqa: BLE001 - returned to the test, or raised below
                run.error = error
        run.warnings = [f"{w.category.__name__}: {w.message}" for w in caught]
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
        root.setLevel(level)
        run.log = buffer.getvalue()
    if run.error is not None and not fails:
        raise run.error
    if fails:
        assert run.error is not None, f"the run did not stop\n{run.log[-3000:]}"
    return run
