"""Runs `python -m monai.bundle run` in a subprocess from the bundle root, as a user would."""

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def monai_bundle_run(
    run_id: str | None, config: str, keys: Mapping[str, object], *extra: str, nproc: int = 1
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [run_id] --config_file config --key value ... *extra``, output captured; with
    ``nproc > 1`` under ``torchrun --standalone --nproc_per_node=nproc`` (a free port: parallel tests don't clash)."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}"] if nproc > 1 else []
    run = ["-m", "monai.bundle", "run", *([run_id] if run_id else [])]
    cmd = [sys.executable, *launcher, *run, "--config_file", config]
    for key, value in keys.items():
        cmd += [f"--{key}", str(value)]
    # one thread: the tensors are tiny, and two threads per process spin-wait on a shared 2-core machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
