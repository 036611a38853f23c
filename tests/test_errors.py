"""A BundleError raised inside a bundle run ends the output with its own message, not MONAI's wrapper."""

import os
import subprocess
import sys
import textwrap

from tests.bundle import ROOT


def run_config(tmp_path, expression: str, **env) -> subprocess.CompletedProcess:
    config = tmp_path / "c.yaml"
    text = f"""
        imports: ["$import scripts"]
        value: "{expression}"
        run: ["$print(@value)"]
        """
    config.write_text(textwrap.dedent(text))  # apart from the call, which black and ruff format would wrap unlike
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **env}
    return subprocess.run(cmd, cwd=ROOT, env=full_env, capture_output=True, text=True, timeout=300)


def test_bundle_error_is_the_last_line(tmp_path):
    # a generator's throw() raises from inside an expression, as a config expression can
    result = run_config(tmp_path, "$(_ for _ in ()).throw(scripts.utils.errors.BundleError('key x: fix it'))")
    assert result.returncode != 0
    assert "Failed to evaluate" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: key x: fix it"


def test_other_errors_keep_their_traceback(tmp_path):
    result = run_config(tmp_path, "$int('abc')")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "invalid literal" in result.stderr
