"""Key checks before any work, and one pretraining run per output folder: identity, lock, atomic full-state
checkpoints and resume.

A run is defined by its identity, the config keys that change what a step computes (``run_identity`` in
``configs/pretrain.yaml``). It is written to ``<output_dir>/run.json`` and into every checkpoint, and a run resumes only
checkpoints of an equal identity. Layout of ``<output_dir>``::

    run.json                            the identity of the run whose checkpoints are in checkpoints/
    run.lock                            held (flock) by the process running in this folder; its PID inside
    checkpoints/checkpoint_iteration=N.pt  full state, the newest two kept
    checkpoints_old/                    the previous run's checkpoints and run.json, set aside by --resume False

A checkpoint holds the state dicts, the global random states and the identity; it is written under a temporary name,
flushed and renamed, and only then are older ones deleted. Every workflow runs its engine through
:func:`run_stoppable`, so that Ctrl-C or SIGTERM ends it with one line saying what was saved and what to run next.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import random
import re
import shlex
import shutil
import signal
import sys
import tempfile
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from ignite.engine import Engine, Events
from ignite.handlers import Checkpoint
from scripts.engine.weights import sidecar, tensor_bytes
from scripts.utils.distributed import is_main, unwrap, world_size
from scripts.utils.errors import BundleError, out_of_space

logger = logging.getLogger(__name__)

__all__ = [
    "check_keys",
    "resolved",
    "checkpoints",
    "rng_states",
    "set_rng_states",
    "RunLock",
    "lock_output_dir",
    "unlock_output_dir",
    "RunInterruptedError",
    "run_stoppable",
    "run_downstream",
    "RunFolder",
    "CheckpointSaver",
    "CheckpointLoader",
]

_CHECKPOINT = re.compile(r"checkpoint_iteration=(\d+)\.pt")
_POSITIVE = (
    "pairs_per_volume",
    "voxels_per_pair",
    "volumes_per_batch",
    "epoch_length",
    "epochs",
    "checkpoint_interval",
    "val_interval",
    "patches_per_volume",
)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_keys(keys: Mapping[str, Any]) -> None:
    """Checks the keys present in ``keys`` before any work, naming key, value and remedy (every workflow).

    Checked: ``patch_size`` (3 positive integers), the counts in ``_POSITIVE`` (integers >= 1), ``modality`` (a preset
    of ``scripts.data.preprocessing.PRESETS``), ``augmentations`` (what ``scripts.ssl.batch.build_augmentation``
    accepts with this modality) and ``output_dir`` (a folder that can be created and written).

    Raises:
        BundleError: at the first bad key.
    """
    from scripts.data import preprocessing  # here, not at import: both import MONAI's transforms
    from scripts.ssl import batch

    if "patch_size" in keys:
        size = keys["patch_size"]
        if not (isinstance(size, (list, tuple)) and len(size) == 3 and all(_is_int(s) and s > 0 for s in size)):
            raise BundleError(
                f"patch_size={size!r} must be 3 positive integers (voxels along x, y, z), e.g. --patch_size "
                '"[128,128,32]".'
            )
    for key in _POSITIVE:
        if key in keys and not (_is_int(keys[key]) and keys[key] >= 1):
            raise BundleError(f"{key}={keys[key]!r} must be an integer >= 1: set --{key} to 1 or more.")
    if "modality" in keys and keys["modality"] not in preprocessing.PRESETS:
        presets = sorted(preprocessing.PRESETS)
        raise BundleError(f"modality={keys['modality']!r} is not a preset: use --modality one of {presets}.")
    if "augmentations" in keys:
        try:
            batch.build_augmentation(keys["augmentations"], keys.get("modality"), announce=False)
        except ValueError as err:
            raise BundleError(str(err)) from err
    if "output_dir" in keys:
        folder = Path(keys["output_dir"])
        try:
            folder.mkdir(parents=True, exist_ok=True)
            tempfile.TemporaryFile(dir=folder).close()  # a file written and removed: the folder is writable
        except OSError as err:
            raise BundleError(
                f"output_dir={str(folder)!r} cannot be written ({err.strerror}): give a folder you can write to with "
                "--output_dir."
            ) from err


def resolved(path: str | os.PathLike | None) -> str | None:
    """``path`` made absolute (None stays None): ``data`` and ``./data`` name the same dataset in an identity."""
    return None if path is None else str(Path(path).resolve())


def checkpoints(folder: str | os.PathLike) -> list[Path]:
    """The full-state checkpoints ``checkpoint_iteration=N.pt`` in ``folder``, newest (highest N) first."""
    found = [(int(m.group(1)), p) for p in Path(folder).glob("*.pt") if (m := _CHECKPOINT.fullmatch(p.name))]
    return [p for _, p in sorted(found, reverse=True)]


def rng_states() -> dict[str, Any]:
    """The global random states (torch CPU and CUDA, numpy, python) as tensors and plain types (weights-only)."""
    _, keys, pos, has_gauss, gauss = np.random.get_state()
    states = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": pos, "has_gauss": has_gauss, "gauss": gauss},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: Mapping[str, Any]) -> None:
    """Restores what :func:`rng_states` returned (CUDA states only where this machine has the same GPU count)."""
    torch.set_rng_state(states["torch"])
    numpy = states["numpy"]
    keys = numpy["keys"].numpy().astype(np.uint32)
    np.random.set_state(("MT19937", keys, numpy["pos"], numpy["has_gauss"], numpy["gauss"]))
    random.setstate(states["python"])
    cuda = states.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


class RunLock:
    """
    An exclusive lock on an output folder: ``flock`` on ``<output_dir>/run.lock``, which holds the holder's PID.

    The kernel drops the lock when the holder exits, however it ends, so a lock file left by a killed run (a dead PID)
    is simply taken over. A run that ends removes it (:meth:`release`), only while it still holds the flock; a process
    that opened the file just before checks, once it holds the flock, that the path still names that file.
    """

    _held: ClassVar[dict[Path, int]] = {}  # descriptors of the locks this process holds: closing one releases it

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path).resolve()

    def acquire(self) -> None:
        """Takes the lock for the life of this process (again: nothing to do).

        Raises:
            BundleError: naming the holder's PID when another process holds it.
        """
        holder = self.try_acquire()
        if holder is not None:
            raise BundleError(
                f"{self.path.parent} is in use by another run (PID {holder}; lock file {self.path}): wait for it to "
                "end or stop it, or run this one in its own folder with --output_dir <new folder>."
            )

    def try_acquire(self) -> str | None:
        """Takes the lock for the life of this process if no other process holds it (again: nothing to do).

        Returns:
            None when this process holds the lock, else the holder's PID as its lock file says ("unknown" before the
            holder has written it).
        """
        if self.path in self._held:
            return None
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            return holder
        try:
            same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same_file = False
        if not same_file:  # the holder removed the file between our open and flock: lock the new one
            os.close(fd)
            return self.try_acquire()
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        self._held[self.path] = fd
        return None

    def release(self) -> None:
        """Removes the lock file and drops the lock (not held: nothing to do). The file is removed while the flock is
        still held, so no other process holds it then; one that opened it just before finds, once it has the flock,
        that the path no longer names its file and locks a new one (:meth:`acquire`)."""
        fd = self._held.pop(self.path, None)
        if fd is None:
            return
        try:
            self.path.unlink(missing_ok=True)
        finally:
            os.close(fd)


def unlock_output_dir(output_dir: str | os.PathLike) -> None:
    """Releases and removes the :class:`RunLock` that :func:`lock_output_dir` took (at the end of a workflow)."""
    RunLock(Path(output_dir) / "run.lock").release()


def lock_output_dir(output_dir: str | os.PathLike) -> None:
    """Takes the :class:`RunLock` of a downstream workflow's ``output_dir`` (rank 0): a second run into the same folder
    is refused instead of writing another model beside this one's description."""
    if is_main():
        Path(output_dir).mkdir(parents=True, exist_ok=True)
        RunLock(Path(output_dir) / "run.lock").acquire()


def _jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so identities compare equal after a round trip."""
    return json.loads(json.dumps(value))


def _differences(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    missing = object()
    keys = [*new, *(k for k in old if k not in new)]

    def show(value: Any) -> str:
        return "absent" if value is missing else json.dumps(value)

    return [
        f"{k} is {show(old.get(k, missing))} there and {show(new.get(k, missing))} now"
        for k in keys
        if old.get(k, missing) != new.get(k, missing)
    ]


class RunInterruptedError(BundleError):
    """A run stopped by Ctrl-C or SIGTERM: its message says what was saved and how to resume (one line)."""

    prefix = "interrupted"


def resume_command() -> str:
    """The command that resumes this run: this process's command line, without ``--resume`` (``False`` would set the
    checkpoints aside); ``the same command`` where the process is not ``python -m monai.bundle``."""
    argv = sys.argv
    if not argv or Path(argv[0]).parts[-3:] != ("monai", "bundle", "__main__.py"):
        return "the same command"
    from scripts.utils.cli import without

    return "python -m monai.bundle " + shlex.join(without(argv[1:], {"resume"}))


class _QuietResume(logging.Filter):
    """Drops ignite's ``Engine run resuming from iteration 0 ...``: MONAI's engines hold a state before they run, so
    ignite says so for every run, before the checkpoint is applied; :class:`RunFolder` says where a run resumes."""

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith("Engine run resuming from")


_QUIET_RESUME = _QuietResume()


def run_stoppable(engine: Engine) -> int | None:
    """Runs ``engine`` so that Ctrl-C or SIGTERM stops it instead of raising through ignite and MONAI's tracebacks,
    without ignite's ``Engine run resuming from iteration 0`` lines (see :class:`_QuietResume`).

    In a 1-process run the signal stops the engine after the current iteration, without firing ``EPOCH_COMPLETED`` or
    ``COMPLETED`` (no validation, export or final save of a half-finished run); under torchrun it stops at once, as
    other ranks may be waiting inside a collective. A second Ctrl-C stops at once too.

    Returns:
        The signal that stopped the run, or None when it ran to its end.
    """
    stopped: list[int] = []

    def stop(signum: int, frame: Any) -> None:
        stopped.append(signum)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        if world_size() > 1:
            raise KeyboardInterrupt
        engine.should_terminate = "skip_completed"  # ignite's terminate(skip_completed=True), unlogged

    for name in list(logging.root.manager.loggerDict):  # the engine's, and those of the evaluators it runs
        if name.startswith("ignite.engine.engine."):
            logging.getLogger(name).addFilter(_QUIET_RESUME)
    previous = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    for s in previous:
        signal.signal(s, stop)
    try:
        engine.run()
    except KeyboardInterrupt:
        return stopped[0] if stopped else signal.SIGINT
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
    return stopped[0] if stopped else None


def _signal_name(signum: int) -> str:
    return "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name


def run_downstream(engine: Engine, output_dir: str | os.PathLike, model_file: str | os.PathLike | None = None) -> None:
    """Runs a downstream workflow's engine (its last step, see :func:`run_stoppable`), then removes the lock that
    :func:`lock_output_dir` took.

    Ctrl-C or SIGTERM ends the workflow with a :class:`RunInterruptedError` saying what it leaves: for training (with
    ``model_file``, the file it writes), the model of the best validation so far or that none was saved; for an
    evaluation or inference, how many of the cases were done. Downstream runs do not resume: the message says to rerun.

    Raises:
        RunInterruptedError: on Ctrl-C or SIGTERM.
    """
    try:
        stopped = run_stoppable(engine)
    finally:
        unlock_output_dir(output_dir)
    if stopped is None:
        return
    state = engine.state
    if model_file is None:
        done = f"stopped after {state.iteration} of {state.epoch_length} cases"  # 1-process workflows
        raise RunInterruptedError(f"{_signal_name(stopped)}: {done}. Rerun {resume_command()} to do them all.")
    path = Path(model_file)
    info = json.loads(sidecar(path).read_text()) if path.is_file() and sidecar(path).is_file() else {}
    selected = info.get("selected")
    if isinstance(selected, dict):
        saved = (
            f"{path} holds the best validation so far (epoch {info['epoch']}, {selected['metric']} "
            f"{selected['value']:.4f})"
        )
    else:
        saved = f"no model was saved ({path} is written at each best validation, or at the end without validation)"
    raise RunInterruptedError(
        f"{_signal_name(stopped)}: training stopped in epoch {state.epoch}; {saved}. Training does not resume: "
        f"rerun {resume_command()} to train again."
    )


class RunFolder:
    """
    The output folder of one pretraining run: lock, identity, and which checkpoint (if any) the run resumes.

    :meth:`start` runs first in the workflow (``initialize``), before any data or network work: it takes the lock, then
    - with ``resume``: loads the newest checkpoint that loads (a newer one that fails is reported by name, renamed
      ``<name>.corrupt`` and skipped) and refuses to continue when its identity differs from this run's, naming each
      differing key with both values and the two ways out, or when ``epochs`` is shorter than what it already ran;
    - without: moves the checkpoints and ``run.json`` of an earlier run to ``checkpoints_old/`` (replacing what was
      there), so that a later plain rerun cannot resume the earlier run;
    and writes ``run.json``. Only rank 0 takes the lock and writes; every rank loads the checkpoint.

    Args:
        output_dir: the run's folder.
        identity: the keys that define the run (JSON-serialisable values).
        resume: continue from the newest checkpoint in ``checkpoint_dir``, if any.
        epochs: the run's length, to refuse a checkpoint that already ran further.
        checkpoint_dir: where the checkpoints are; default ``<output_dir>/checkpoints``.
    """

    def __init__(
        self,
        output_dir: str | os.PathLike,
        identity: Mapping[str, Any],
        resume: bool = True,
        epochs: int | None = None,
        checkpoint_dir: str | os.PathLike | None = None,
    ) -> None:
        self.output_dir = Path(output_dir)
        self.checkpoint_dir = Path(checkpoint_dir) if checkpoint_dir is not None else self.output_dir / "checkpoints"
        self.identity = _jsonable(dict(identity))
        self.resume = resume
        self.epochs = epochs
        self.resume_path: Path | None = None
        self.resume_state: dict[str, Any] | None = None  # loaded here, applied by CheckpointLoader at STARTED
        self.complete = False  # the newest checkpoint holds every iteration of `epochs`: nothing to run

    def start(self) -> None:
        """Lock, set aside or check the earlier run, write ``run.json`` (see the class docstring)."""
        if is_main():
            self.output_dir.mkdir(parents=True, exist_ok=True)
            RunLock(self.output_dir / "run.lock").acquire()
            for partial in self.checkpoint_dir.glob("*.partial"):  # left by a save that was killed
                partial.unlink()
        if self.resume:
            self._load_newest()
        elif is_main():
            self._set_aside()
        target = self.output_dir / "run.json"
        text = json.dumps(self.identity, indent=2) + "\n"
        if is_main() and not (target.is_file() and target.read_text() == text):
            target.with_name("run.json.partial").write_text(text)
            os.replace(target.with_name("run.json.partial"), target)

    def train(self, trainer: Engine) -> None:
        """Runs ``trainer`` (the workflow's last step), then removes the lock.

        A complete run (see :meth:`start`) says so and changes nothing. Ctrl-C or SIGTERM stops a 1-process run after
        the current iteration, without the backbone export; then, as under torchrun at once, the run ends with a
        :class:`RunInterruptedError` naming the newest checkpoint, its iteration and the command that resumes it.

        Raises:
            RunInterruptedError: on Ctrl-C or SIGTERM.
        """
        try:
            if self.complete:
                return
            stopped = run_stoppable(trainer)
            if stopped is not None:
                raise RunInterruptedError(self._interrupted(stopped))
        finally:
            if is_main():
                RunLock(self.output_dir / "run.lock").release()

    def _interrupted(self, signum: int) -> str:
        name = _signal_name(signum)
        found = checkpoints(self.checkpoint_dir)
        if found:
            iteration = int(_CHECKPOINT.fullmatch(found[0].name).group(1))
            saved = f"the newest checkpoint is {found[0]} (iteration {iteration})"
        else:
            saved = "no checkpoint was saved yet"
        return f"{name}: run stopped; {saved}. Resume with: {resume_command()}"

    def _set_aside(self) -> None:
        found = checkpoints(self.checkpoint_dir)
        if not found:
            return
        old = self.output_dir / "checkpoints_old"
        shutil.rmtree(old, ignore_errors=True)
        old.mkdir()
        for path in found:
            os.replace(path, old / path.name)
        if (self.output_dir / "run.json").is_file():
            os.replace(self.output_dir / "run.json", old / "run.json")
        logger.info(
            f"--resume False: the previous run's {len(found)} checkpoint(s) were moved to {old}; starting afresh."
        )

    def _load_newest(self) -> None:
        for path in checkpoints(self.checkpoint_dir):
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as err:  # torch raises several types (zip, pickle, EOF) for a truncated or corrupt file
                if is_main():
                    os.replace(path, path.with_name(path.name + ".corrupt"))
                warnings.warn(
                    f"Checkpoint {path} cannot be loaded ({err}); renamed to {path.name}.corrupt, trying the next "
                    "older checkpoint.",
                    stacklevel=2,
                )
                continue
            self._check(path, state)
            trainer = state["trainer"]
            if self.epochs is not None and trainer["iteration"] >= self.epochs * trainer["epoch_length"]:
                self.complete = True
                logger.info(
                    f"Run complete: {path} holds all {trainer['iteration']} iterations (epochs={self.epochs} x "
                    f"epoch_length={trainer['epoch_length']}); nothing to do. A larger --epochs extends it; "
                    "--resume False starts afresh."
                )
                return
            self.resume_path, self.resume_state = path, state
            logger.info(
                f"Resuming from {path} (iteration {trainer['iteration']} of {self.epochs * trainer['epoch_length']})"
                if self.epochs is not None
                else f"Resuming from {path} (iteration {trainer['iteration']})"
            )
            return

    def _check(self, path: Path, state: Mapping[str, Any]) -> None:
        ways_out = (
            "Run this one in its own folder with --output_dir <new folder>, or start afresh here with --resume False "
            f"(the old checkpoints are then moved to {self.output_dir / 'checkpoints_old'})."
        )
        if "run" not in state:
            raise BundleError(
                f"{self.output_dir} holds checkpoints without a run identity ({path.name}, written by an earlier "
                f"version of this bundle), so it cannot tell whether they belong to this run. {ways_out}"
            )
        differences = _differences(state["run"], self.identity)
        if differences:
            raise BundleError(
                f"{self.output_dir} holds checkpoints of another run ({path.name}): {'; '.join(differences)}. "
                + ways_out
            )
        trainer = state["trainer"]
        if self.epochs is not None and trainer["iteration"] > self.epochs * trainer["epoch_length"]:
            done = trainer["iteration"] / trainer["epoch_length"]
            raise BundleError(
                f"epochs={self.epochs} is shorter than the {done:g} epochs {path.name} has already run: give --epochs "
                f"{int(np.ceil(done))} or more to continue it, or --resume False to start afresh."
            )


class CheckpointSaver:
    """
    Writes full-state checkpoints ``checkpoint_iteration=N.pt`` every ``save_interval`` iterations and at completion.

    Each holds ``save_dict``'s state dicts, the global random states (``rng``) and the run identity (``run``). A save
    goes to ``<name>.partial``, is flushed to disk, renamed over ``<name>`` (atomic), and only then are all but the
    newest ``n_saved`` checkpoints deleted: a crash or a full disk at any moment leaves the previous checkpoint whole.
    A full disk ends the run with one line naming the checkpoint and the space it needs. Only rank 0 writes.

    Args:
        run: the run's folder (checkpoint folder and identity).
        save_dict: objects with ``state_dict()``: ``network``, ``optimizer``, ``trainer`` (and e.g. ``lr_scheduler``).
        save_interval: iterations between checkpoints.
        n_saved: checkpoints kept; 2, so that a newest one that fails to load has an older one to fall back on.
    """

    def __init__(self, run: RunFolder, save_dict: Mapping[str, Any], save_interval: int, n_saved: int = 2) -> None:
        self.run = run
        self.save_dict = save_dict
        self.save_interval = save_interval
        self.n_saved = n_saved
        self._saved_iteration: int | None = None

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.ITERATION_COMPLETED(every=self.save_interval), self)
        engine.add_event_handler(Events.COMPLETED, self)

    def __call__(self, engine: Engine) -> None:
        if not is_main() or engine.state.iteration == self._saved_iteration:  # COMPLETED just after an interval save
            return
        folder = self.run.checkpoint_dir
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"checkpoint_iteration={engine.state.iteration}.pt"
        # a DDP network's own module: ignite's loader unwraps DDP, and a 1-process run can resume a torchrun one
        state = {key: unwrap(obj).state_dict() for key, obj in self.save_dict.items()}
        state.update(rng=rng_states(), run=self.run.identity)
        partial = path.with_name(path.name + ".partial")
        remedy = f"the earlier checkpoints in {folder} are intact: free space and rerun the same command to resume."
        try:
            with out_of_space(path, tensor_bytes(state), remedy):
                with open(partial, "wb") as file:
                    torch.save(state, file)
                    file.flush()
                    os.fsync(file.fileno())
                os.replace(partial, path)
        except BaseException as err:
            partial.unlink(missing_ok=True)
            if isinstance(err, OSError) and not isinstance(err, BundleError):
                raise BundleError(f"Cannot write checkpoint {path} ({err}); {remedy}") from err
            raise
        self._saved_iteration = engine.state.iteration
        for old in checkpoints(folder)[self.n_saved :]:
            old.unlink(missing_ok=True)


class CheckpointLoader:
    """
    Applies the checkpoint that :meth:`RunFolder.start` chose (if any) when the trainer starts: the state dicts of
    ``load_dict``, then the global random states. The configured ``epochs`` win over the checkpoint's, so a larger
    ``--epochs`` extends a finished run.

    Args:
        run: the run's folder, started.
        load_dict: objects with ``load_state_dict()``, keyed as in the checkpoint.
    """

    def __init__(self, run: RunFolder, load_dict: Mapping[str, Any]) -> None:
        self.run = run
        self.load_dict = load_dict

    def attach(self, engine: Engine) -> None:
        engine.add_event_handler(Events.STARTED, self)

    def __call__(self, engine: Engine) -> None:
        state, self.run.resume_state = self.run.resume_state, None  # free the memory once applied
        if state is None:
            return
        max_epochs = engine.state.max_epochs
        Checkpoint.load_objects(to_load=dict(self.load_dict), checkpoint=state)
        engine.state.max_epochs = max_epochs
        if "rng" in state:
            set_rng_states(state["rng"])
