"""What the whole suite shares: one thread per process, the check that the suite left the repository as it found it,
and one tiny pretraining that several files read (computed once per session, also across pytest-xdist's workers)."""

from __future__ import annotations

import os

# Before torch is imported: the tensors are tiny, and two threads per process spin-wait on a shared 2-core machine.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
from bundle import PRETRAIN_TINY, ROOT, run_workflow  # noqa: E402

# Not the repository's content: tools' caches, bytecode, virtual environments.
UNWATCHED = {".git", ".venv", "venv", "__pycache__", ".pytest_cache", ".ruff_cache", ".mypy_cache", "node_modules"}


def tracked_files(root: Path = ROOT) -> set[str]:
    """The files git tracks (a person may edit them while the suite runs); none outside a git checkout."""
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, text=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        return set()
    return set(filter(None, listed.stdout.split("\0"))) if listed.returncode == 0 else set()


def repository_state(root: Path = ROOT) -> dict[str, tuple[int, int] | None]:
    """(size, mtime) of every file and None for every folder under `root` that git does not track, `UNWATCHED`
    folders left out: where the bundle's default outputs go (models/, runs/, data/, eval/, mlruns/, ...)."""
    tracked = tracked_files(root)
    state: dict[str, tuple[int, int] | None] = {}
    for folder, dirs, files in os.walk(root):
        dirs[:] = [d for d in dirs if d not in UNWATCHED and not d.startswith(".venv")]
        relative = os.path.relpath(folder, root)
        state[relative] = None
        for name in files:
            path = os.path.normpath(os.path.join(relative, name))
            if path in tracked:
                continue
            try:
                stat = os.lstat(os.path.join(root, path))
            except FileNotFoundError:  # removed while walking
                continue
            state[path] = (stat.st_size, stat.st_mtime_ns)
    return state


def _is_worker(config: pytest.Config) -> bool:
    return hasattr(config, "workerinput")


def pytest_sessionstart(session: pytest.Session) -> None:
    if not _is_worker(session.config):
        session.config.stash[_BEFORE] = repository_state()


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """A test must read and write only its own temporary folders: a file the session created, changed or removed in
    the repository (e.g. under models/, runs/, data/; files git tracks are left to whoever edits them) fails the
    session, named in the summary."""
    before = session.config.stash.get(_BEFORE, None)
    if before is None:
        return
    after = repository_state()
    changed = sorted(p for p in before.keys() | after.keys() if before.get(p, 0) != after.get(p, 0))
    session.config.stash[_CHANGED] = changed
    if changed and exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.NO_TESTS_COLLECTED):
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter, exitstatus: int, config: pytest.Config) -> None:
    changed = config.stash.get(_CHANGED, [])
    if changed:
        terminalreporter.section("files the tests changed in the repository", sep="=", red=True, bold=True)
        terminalreporter.line(f"A test must read and write only its own temporary folders; under {ROOT}:")
        for path in changed[:50]:
            terminalreporter.line(f"  {path}")
        if len(changed) > 50:
            terminalreporter.line(f"  ... and {len(changed) - 50} more")


_BEFORE = pytest.StashKey[dict]()
_CHANGED = pytest.StashKey[list]()


@pytest.fixture(autouse=True)
def restore_logging_and_excepthook():
    """The scripts' command lines run in this process apply configs/logging.conf, which binds a handler to the test's
    captured stdout: later tests must not write to it. Workflows and commands install the bundle's excepthook."""
    root = logging.getLogger()
    handlers, level, hook = root.handlers[:], root.level, sys.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook = hook


# ---- the shared tiny pretraining


@dataclass(frozen=True)
class Pretraining:
    """A finished tiny DHR pretraining, shared by the tests: read it, never write into it (copy it with `copy`).

    2 volumes in `data`, 2 epochs x 3 iterations, a checkpoint every 2 iterations (the newest two kept: 4 and 6),
    tracked in MLflow (`out/mlruns.db`); `keys` are the keys it ran with and `log` what it logged."""

    folder: Path
    keys: dict
    log: str

    @property
    def data(self) -> Path:
        return self.folder / "data"

    @property
    def out(self) -> Path:
        return self.folder / "out"

    def copy(self, destination: Path) -> dict:
        """Copies the run's output folder and cache under `destination` and returns the keys that continue it there
        (the same dataset_dir, as the run's identity holds it)."""
        shutil.copytree(self.out, destination / "out", ignore=shutil.ignore_patterns("run.lock"))
        shutil.copytree(self.folder / "cache", destination / "cache")
        paths = {"output_dir": destination / "out", "cache_dir": destination / "cache", "bundle_root": destination}
        return {**self.keys, **paths}


def _shared_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """This session's folder shared by pytest-xdist's workers (the parent of each worker's own), else its own."""
    base = tmp_path_factory.getbasetemp()
    return base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base


@pytest.fixture(scope="session")
def pretrained(tmp_path_factory) -> Pretraining:
    """The tiny pretraining, run once per session in this process (the first worker to ask runs it, the others wait
    and read it)."""
    from filelock import FileLock
    from test_pretrain_bundle import write_volumes

    folder = _shared_folder(tmp_path_factory) / "shared_pretraining"
    folder.mkdir(exist_ok=True)
    keys = {**PRETRAIN_TINY, "epochs": 2, "checkpoint_interval": 2}
    keys |= {"dataset_dir": folder / "data", "output_dir": folder / "out", "cache_dir": folder / "cache"}
    keys |= {"bundle_root": folder}
    with FileLock(str(folder) + ".lock"):
        if not (folder / "log.txt").is_file():
            for item in ("data", "out", "cache"):
                shutil.rmtree(folder / item, ignore_errors=True)  # what a failed attempt left
            write_volumes(folder / "data")
            run = run_workflow("pretrain", "configs/pretrain.yaml", tracking="mlflow", **keys)
            (folder / "log.txt").write_text(run.log)  # last: the run is complete
    return Pretraining(folder, keys, (folder / "log.txt").read_text())
