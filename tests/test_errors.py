"""A BundleError raised inside a bundle run ends the output with its own message, not MONAI's wrapper, once the entry
point has installed the hook (as every workflow config's first `initialize` step does); importing `scripts` does not.
The hook is checked in this process, and (slow tier) through `python -m monai.bundle run` in a process of its own."""

import ast
import json
import subprocess
import sys
import textwrap

import pytest
import yaml
from bundle import HELP_LIMIT, ROOT, WORKFLOW_LIMIT, command_env, run_command
from scripts.utils.errors import BundleError, report

INSTALL = "$scripts.utils.errors.install()"


def run_config(tmp_path, expression: str) -> subprocess.CompletedProcess:
    config = tmp_path / "c.yaml"
    text = f"""
        imports: ["$import scripts"]
        initialize: ["{INSTALL}"]
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


@pytest.mark.parametrize("config", ["pretrain.yaml", "train.yaml", "inference.json"])
def test_every_workflow_installs_the_hook_first(config):
    """The base configs (the override files keep their `initialize`) install the hook before any other step."""
    text = (ROOT / "configs" / config).read_text()
    initialize = (json.loads(text) if config.endswith(".json") else yaml.safe_load(text))["initialize"]
    assert initialize[0] == INSTALL


def test_no_module_installs_the_hook_when_imported():
    """No statement at a module's top level of `scripts` calls ``install()`` (entry points call it in a function)."""
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        tree = ast.parse(path.read_text())
        calls = [
            node
            for statement in tree.body
            if not isinstance(statement, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef)
            and not (isinstance(statement, ast.If) and "__main__" in ast.unparse(statement.test))
            for node in ast.walk(statement)
            if isinstance(node, ast.Call) and ast.unparse(node.func).endswith("install")
        ]
        assert not calls, f"{path}: {ast.unparse(calls[0])} at import"


@pytest.mark.slow
def test_importing_scripts_leaves_the_excepthook_alone():
    """In a fresh interpreter: this one has run workflows, which install the hook."""
    code = "import sys, scripts.utils.errors, scripts.engine.handlers; print(sys.excepthook is sys.__excepthook__)"
    result = run_command([sys.executable, "-c", code], timeout=HELP_LIMIT, env=command_env())
    assert result.stdout.strip() == "True", result.stderr[-2000:]


def test_every_command_installs_the_hook():
    """Each `python -m scripts.<module>` entry point (a module with a ``main``) installs the hook in ``main``."""
    commands = []
    for path in sorted((ROOT / "scripts").rglob("*.py")):
        tree = ast.parse(path.read_text())
        main = next((n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == "main"), None)
        if main is not None:
            commands.append(path.relative_to(ROOT).as_posix())
            assert "errors.install()" in ast.unparse(main), f"{path}: main() does not install the hook"
    assert "scripts/import_weights.py" in commands and "scripts/tools/release.py" in commands
