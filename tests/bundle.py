"""Runs `python -m monai.bundle run` in a subprocess from the bundle root, as a user would."""

import os
import subprocess
import sys
from collections.abc import Mapping
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def monai_bundle_run(
    run_id: str | None, config: str, keys: Mapping[str, object], *extra: str
) -> subprocess.CompletedProcess:
    """``python -m monai.bundle run [run_id] --config_file config --key value ... *extra``, output captured."""
    cmd = [sys.executable, "-m", "monai.bundle", "run", *([run_id] if run_id else []), "--config_file", config]
    for key, value in keys.items():
        cmd += [f"--{key}", str(value)]
    # one thread: the tensors are tiny, and two threads per process spin-wait on a shared 2-core machine
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.run([*cmd, *extra], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
