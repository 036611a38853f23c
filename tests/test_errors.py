"""A BundleError raised inside a bundle run ends the output with its own message, not MONAI's wrapper: the hook in this
process, and (slow tier) `python -m monai.bundle run` in a process of its own."""

import subprocess
import sys
import textwrap

import pytest
from bundle import WORKFLOW_LIMIT, command_env, run_command
from scripts.utils.errors import BundleError, report


def run_config(tmp_path, expression: str) -> subprocess.CompletedProcess:
    config = tmp_path / "c.yaml"
    text = f"""
        imports: ["$import scripts"]
        value: "{expression}"
        run: ["$print(@value)"]
        """
    config.write_text(textwrap.dedent(text))  # apart from the call, which black and ruff format would wrap unlike
    cmd = [sys.executable, "-m", "monai.bundle", "run", "--config_file", str(config)]
    return run_command(cmd, timeout=WORKFLOW_LIMIT, env=command_env())


def wrapped(error: Exception) -> RuntimeError:
    """`error` as MONAI's runner wraps it: the cause of a RuntimeError."""
    try:
        try:
            raise error
        except Exception as cause:
            raise RuntimeError("Failed to evaluate ConfigExpression") from cause
    except RuntimeError as outer:
        return outer


def test_the_hook_prints_a_wrapped_bundle_errors_message_last(capsys, monkeypatch):
    monkeypatch.delenv("DHR_TRACEBACK", raising=False)
    error = wrapped(BundleError("key x: fix it"))
    report(type(error), error, error.__traceback__)
    stderr = capsys.readouterr().err
    assert stderr.strip().splitlines() == ["error: key x: fix it"]
    monkeypatch.setenv("DHR_TRACEBACK", "1")
    report(type(error), error, error.__traceback__)
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and stderr.strip().splitlines()[-1] == "error: key x: fix it"


def test_the_hook_keeps_other_errors_traceback(capsys):
    error = wrapped(ValueError("invalid literal"))
    report(type(error), error, error.__traceback__)
    stderr = capsys.readouterr().err
    assert "Traceback" in stderr and "invalid literal" in stderr and "error: " not in stderr


@pytest.mark.slow
def test_bundle_error_is_the_last_line(tmp_path):
    # a generator's throw() raises from inside an expression, as a config expression can
    result = run_config(tmp_path, "$(_ for _ in ()).throw(scripts.utils.errors.BundleError('key x: fix it'))")
    assert result.returncode != 0
    assert "Failed to evaluate" not in result.stderr
    assert result.stderr.strip().splitlines()[-1] == "error: key x: fix it"


@pytest.mark.slow
def test_other_errors_keep_their_traceback(tmp_path):
    result = run_config(tmp_path, "$int('abc')")
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "invalid literal" in result.stderr
