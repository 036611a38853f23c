"""The README, run top to bottom in a clone: its commands in its order, each with tiny overrides appended.

The commands are read from README.md's ```bash blocks, so what runs here is what the README says (MONAI's command line
and argparse both take the last of a repeated flag, so an appended override replaces the README's value). After each
command the test checks the files it should write, in its own folder, and that it created or changed nothing outside
the places the README says it writes: no command reuses or overwrites another's results. Two commands run at a time
(2 cores), a later one beside an earlier one only where neither reads or writes what the other writes; a changed file
is then the command's whose folder holds it.

Not run here: `pip install` (the environment is the test's), `python -m pytest` (this suite), `mlflow ui` (a web
server; the database it shows is checked after the MLflow command), `torchrun` (several processes:
tests/test_distributed.py) and `scripts.tools.release` (tests/test_release.py).
"""

import contextlib
import json
import os
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import ROOT, TIMEOUT_SCALE, WORKFLOW_LIMIT, limit
from scripts.networks.fpn3d import FPN3d

pytestmark = pytest.mark.slow
SKIPPED = ("pip install", "python -m pytest", "mlflow ui", "torchrun", "python -m scripts.tools.release")
RESUME_HEADING = "## Resuming"  # "running the same command again resumes": the Quick start's command, rerun here

# A 4-channel, 3-level FPN3d on 32 x 32 x 16 patches: seconds per run; the downstream runs inherit it from the backbone.
PRETRAIN = "--patch_size [32,32,16] --base_channels 4 --num_scales 3 --pairs_per_volume 2 --voxels_per_pair 32"
PRETRAIN += " --epochs 1 --epoch_length 2 --num_workers 0 --progress False"
# Downstream on the demo: 6 folds (2 test scans), windows without overlap (a demo scan is ~10^4 tiny windows at 0.5).
DOWNSTREAM = "--epochs 1 --epoch_length 2 --val_interval 1 --volumes_per_batch 2 --num_folds 6 --num_workers 0"
DOWNSTREAM += " --progress False --validate#inferer#overlap 0"
STUDY = "--modes linear --budgets 1 --folds 0"  # one cell per initialisation
SHARED = "data/cache/"  # the preprocessed-volume cache, shared by the runs on the same data by design
PARALLEL = 2  # commands at a time, one thread each: a later command starts early only if no earlier one feeds it
BACKBONE = ("pretrained_backbone.pt", "pretrained_backbone.json", "run.json", "checkpoints/checkpoint_iteration=2.pt")


@dataclass(frozen=True)
class Step:
    """How one README command runs here: `pattern` finds it (exactly one command per step), `extra` is appended,
    `reads` are the paths (prefixes; `/data/...` as in the README) it needs from earlier commands, `writes` the only
    ones it may create or change, `expects` the files it must create or rewrite (globs allowed), and `runs` the
    processes it runs one after the other (the longer a command, the earlier it starts where nothing holds it)."""

    pattern: str
    extra: str
    reads: tuple[str, ...]
    writes: tuple[str, ...]
    expects: tuple[str, ...] = ()
    runs: int = 1


def pretraining(pattern: str, folder: str, reads: tuple[str, ...] = ("data/demo/",), extra: str = "") -> Step:
    expects = tuple(f"{folder}/{f}" for f in BACKBONE)
    return Step(pattern, f"{PRETRAIN} {extra}", reads, (f"{folder}/", SHARED), expects)


STEPS = [
    Step(
        "--config_file configs/pretrain.yaml --patch_size",  # Quick start: also prepares the demo
        PRETRAIN,
        (),
        ("runs/pretrain/", "data/demo/", SHARED),
        (*(f"runs/pretrain/{f}" for f in BACKBONE), "runs/pretrain/tensorboard/events.*", "data/demo/dataset.json"),
    ),
    Step(
        "scripts.visualize",
        "--crop 32 32 16",
        ("runs/pretrain/", "data/demo/"),
        ("runs/demo_backbone.png",),
        ("runs/demo_backbone.png",),
    ),
    Step("verify_metadata", "", (), ()),
    pretraining("--dataset_dir /data/ct --modality ct", "runs/pretrain_ct", ("/data/ct/",)),
    Step("scripts.data.cache", "--patch_size 32 32 16 --num_workers 1", ("/data/ct/",), (SHARED,)),  # its files: shared
    pretraining("--dataset_dir /data/mri", "runs/pretrain_mri", ("/data/mri/",)),
    Step("scripts.tools.benchmark$", "--repeats 1 --volume 48 48 24 --patch 16 16 8 --pairs 2 --voxels 32", (), ()),
    Step("scripts.tools.benchmark --memory", "--patch 16 16 8 --pairs 2 --voxels 32", (), ()),
    Step(
        "scripts.tools.benchmark --step",
        "--repeats 1 --volume 48 48 24 --patch 16 16 8 --pairs 2 --voxels 32 --base_channels 4 --num_scales 3",
        (),
        (),
    ),
    Step(RESUME_HEADING, PRETRAIN, ("runs/pretrain/", "data/demo/"), ("runs/pretrain/",)),
    Step(
        "import_weights runs/pretrain/checkpoints",
        "",
        ("runs/pretrain/",),
        ("backbones/pretrain_latest.",),
        ("backbones/pretrain_latest.pt", "backbones/pretrain_latest.json"),
    ),
    Step(
        "import_weights vox2vec_contrastive.pt",
        "",
        ("vox2vec_contrastive.pt",),
        ("backbones/vox2vec.",),
        ("backbones/vox2vec.pt", "backbones/vox2vec.json"),
    ),
    pretraining("--tracking mlflow", "runs/pretrain_mlflow"),
    pretraining("pretrain_vox2vec.yaml", "runs/pretrain_vox2vec"),
    pretraining("pretrain_pcrl.yaml", "runs/pretrain_pcrl", extra="--volumes_per_batch 2"),
    pretraining("--augmentations vox2vec", "runs/ablation_augmentations"),
    pretraining("--projection_width raw", "runs/ablation_projection_width"),
    pretraining("--restoration_weight 0", "runs/ablation_restoration"),
    pretraining("--freeze_projections True", "runs/ablation_frozen_projections"),
    pretraining("--backbone segresnet", "runs/pretrain_segresnet"),
    Step(
        "scripts.tools.compare",
        STUDY,
        ("/data/unlabelled/", "/data/labelled/"),
        ("runs/compare/", SHARED),
        (
            *(f"runs/compare/pretrain_{m}_*/pretrained_backbone.pt" for m in ("dhr", "vox2vec", "pcrl")),
            "runs/compare/study/results.csv",
            "runs/compare/study/label_efficiency.png",
        ),
        runs=3 + 4 * 2,  # 3 pretrainings, then (scratch + 3 backbones) x a training and an evaluation
    ),
    Step(
        "configs/train.yaml --pretrained_ckpt",
        DOWNSTREAM,
        ("runs/pretrain/", "data/demo/"),
        ("runs/train/",),
        ("runs/train/model.pt", "runs/train/model.json"),
    ),
    Step(
        "linear_eval.yaml']\" --pretrained_ckpt",
        f"{DOWNSTREAM} --num_train_cases 2",
        ("runs/pretrain/", "data/demo/"),
        ("runs/linear_eval/",),
        ("runs/linear_eval/model.pt", "runs/linear_eval/model.json"),
    ),
    Step(
        "run evaluate",
        DOWNSTREAM,
        ("runs/train/model.", "data/demo/"),
        ("runs/train/evaluation/", "runs/train/run.lock"),  # it locks the folder of the model it reads while it runs
        tuple(f"runs/train/evaluation/{f}" for f in ("summary.json", "dice_raw.csv", "overlays/*")),
    ),
    Step(
        "configs/inference.json",
        "--num_workers 0",
        ("runs/train/model.", "/data/new_scans/"),
        ("/data/masks/",),
        ("/data/masks/scan_0_seg.nii.gz", "/data/masks/scan_1_seg.nii.gz"),
    ),
    Step(
        "scripts.tools.study",
        STUDY,
        ("runs/pretrain/", "data/demo/"),
        ("runs/study/",),
        ("runs/study/results.csv", "runs/study/label_efficiency.png"),
        runs=2 * 2,  # (scratch + 1 backbone) x a training and an evaluation
    ),
]


@dataclass
class Run:
    """A README command in progress: its step, process, log file and the files it changed so far."""

    command: str
    step: Step
    process: subprocess.Popen
    log: Path
    start: float
    changed: set[Path] = field(default_factory=set)
    timed_out: float | None = None  # seconds after which it was killed


def readme_commands(readme: Path) -> list[str]:
    """The README's commands in order: each line of a ```bash block (parts of a `&&` chain apart), and the resume
    heading where the README says to rerun; the skipped ones left out."""
    commands, in_block = [], False
    for line in readme.read_text().splitlines():
        if line.startswith("```"):
            in_block = line == "```bash"
        elif in_block and line.strip():
            commands += [part.strip() for part in line.split(" && ")]
        elif line.startswith(RESUME_HEADING):
            commands.append(RESUME_HEADING)
    return [c for c in commands if not c.startswith(SKIPPED)]


def ablation_overrides(readme: Path) -> list[str]:
    """The overrides in the README's ablation table (`| ablation | override |`)."""
    rows = readme.read_text().split("| ablation | override |", 1)[1].split("\n\n", 1)[0].splitlines()[2:]
    return [re.search(r"`([^`]+)`", row.split("|")[2]).group(1) for row in rows]


def snapshot(*folders: Path) -> dict[Path, tuple[int, int]]:
    """(size, mtime) of every file under the folders, bytecode caches left out."""
    return {
        p: (p.stat().st_size, p.stat().st_mtime_ns)
        for folder in folders
        for p in folder.rglob("*")
        if p.is_file() and "__pycache__" not in p.parts
    }


def write_volume(path: Path, spacing: tuple[float, ...], shape: tuple[int, ...], inside: float, outside: float) -> None:
    """An ellipsoid body of intensity `inside` (+ noise) in `outside`."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in shape], indexing="ij"))
    body = (grid**2).sum(0) < 0.8
    noise = np.random.default_rng(len(path.name)).random(shape)
    image = np.where(body, inside + 0.2 * abs(inside) * noise, outside).astype(np.float32)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(image, np.diag([*spacing, 1.0])), path)


def write_labelled(folder: Path, count: int) -> None:
    """MSD-style imagesTr/labelsTr at 1.5 mm: a body holding three labelled blobs brighter than it."""
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in (40, 40, 20)], indexing="ij"))
    label = np.zeros(grid.shape[1:], dtype=np.uint8)
    for k, centre in enumerate(([0.4, 0, 0], [-0.4, 0, 0], [0, 0.4, 0]), start=1):
        label[((grid - np.array(centre)[:, None, None, None]) ** 2).sum(0) < 0.06] = k
    for i in range(count):
        body = (grid**2).sum(0) < 0.8
        noise = np.random.default_rng(i).random(body.shape)
        image = np.where(body, 300 + 100 * label.astype(np.float32) + 50 * noise, 0)
        for name, array in (("imagesTr", image.astype(np.float32)), ("labelsTr", label)):
            (folder / name).mkdir(parents=True, exist_ok=True)
            nib.save(nib.Nifti1Image(array, np.diag([1.5, 1.5, 1.5, 1.0])), folder / name / f"case_{i}.nii.gz")


def write_user_data(data: Path) -> None:
    """The README's /data folders: unlabelled CT (HU, 1 x 1 x 2 mm) and MRI, labelled MRI, new scans."""
    for i in range(2):
        write_volume(data / f"ct/ct_{i}.nii.gz", (1.0, 1.0, 2.0), (48, 48, 20), 40.0, -1000.0)
        write_volume(data / f"mri/mri_{i}.nii.gz", (1.5, 1.5, 1.5), (40, 40, 20), 600.0, 0.0)
        write_volume(data / f"unlabelled/mri_{i}.nii.gz", (1.5, 1.5, 1.5), (40, 40, 20), 600.0, 0.0)
    write_labelled(data / "labelled", 6)
    (data / "new_scans").mkdir()
    for i in range(2):
        shutil.copy(data / f"labelled/imagesTr/case_{i}.nii.gz", data / f"new_scans/scan_{i}.nii.gz")


def clone(destination: Path) -> None:
    """The repository's tracked files, as a fresh clone has them (uncommitted edits included)."""
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True).stdout
    for name in filter(None, files.split("\0")):
        if (ROOT / name).is_file():
            (destination / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, destination / name)


def with_overrides(command: str, extra: str, data: Path) -> list[str]:
    """argv of a README command with `extra` appended: study options before the study's `--`, the compare's run
    arguments inside its quoted `--pretrain_args` / `--study_args`; `/data/...` moved to the test's data folder."""
    argv = [re.sub(r"(^|\s)/data/", rf"\g<1>{data}/", a) for a in shlex.split(command)]
    argv[0] = sys.executable if argv[0] == "python" else argv[0]
    extra_argv = shlex.split(extra)
    if "scripts.tools.study" in command:
        cut = argv.index("--")
        return [*argv[:cut], *extra_argv, *argv[cut:], *shlex.split(DOWNSTREAM)]
    if "scripts.tools.compare" in command:
        argv[argv.index("--pretrain_args") + 1] += f" {PRETRAIN.replace(' --progress False', '')}"  # compare's own
        argv[argv.index("--study_args") + 1] += f" {DOWNSTREAM}"
    return [*argv, *extra_argv]


def in_scope(path: Path, prefixes: tuple[str, ...], repo: Path, data: Path) -> bool:
    name = f"/data/{path.relative_to(data)}" if path.is_relative_to(data) else str(path.relative_to(repo))
    return name.startswith(prefixes)


def expected_files(pattern: str, repo: Path, data: Path) -> list[Path]:
    base = data if pattern.startswith("/data/") else repo
    return sorted(base.glob(pattern.removeprefix("/data/")))


def overlap(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether two sets of path prefixes share a path (the shared cache left out)."""
    return any(x.startswith(y) or y.startswith(x) for x in a for y in b if SHARED not in (x, y))


def may_start(step: Step, others: list[Step]) -> bool:
    """Whether `step` may run now beside `others` (the earlier commands not finished and those running): it reads
    nothing they write and writes nothing they read or write."""
    return not any(
        overlap(step.reads + step.writes, o.writes) or overlap(step.writes, o.reads + o.writes) for o in others
    )


def check(run: Run, returncode: int, repo: Path, data: Path, backbone: bytes | None) -> None:
    """The command succeeded and wrote what it should; the checks particular to some commands."""
    output = run.log.read_text()
    if run.timed_out is not None:
        pytest.fail(
            f"timed out: killed after {run.timed_out:.0f} s (DHR_TEST_TIMEOUT_SCALE={TIMEOUT_SCALE:g} scales the "
            f"limit): {run.command}\n{output[-5000:]}",
            pytrace=False,
        )
    assert returncode == 0, f"{run.command}\n{output[-5000:]}"
    for pattern in run.step.expects:
        files = expected_files(pattern, repo, data)
        assert files, f"{run.command}: no {pattern}"
        assert all(f in run.changed for f in files), f"{run.command}: {pattern} is left from an earlier command"
    if run.step.pattern == RESUME_HEADING:  # the finished Quick start run: complete, its backbone the same
        assert "Run complete: runs/pretrain/checkpoints/checkpoint_iteration=2.pt" in output
        assert (repo / "runs/pretrain/pretrained_backbone.pt").read_bytes() == backbone
    if run.step.pattern == "--tracking mlflow":
        assert (repo / "runs/pretrain_mlflow/mlruns.db").is_file() and not (repo / "mlruns").exists()
    if "import_weights vox2vec" in run.step.pattern:
        info = json.loads((repo / "backbones/vox2vec.json").read_text())
        assert (info["method"], info["modality"], info["base_channels"]) == ("vox2vec", "ct_wide", 4)
    if "--modality ct" in run.step.pattern:
        assert json.loads((repo / "runs/pretrain_ct/pretrained_backbone.json").read_text())["modality"] == "ct"
    if run.step.pattern == "scripts.tools.benchmark --step":  # one row per configuration, no host sync on a CPU
        rows = re.findall(r"^\| (default|[\w. -]+ on) \| [\d.]+ \| [\d.]+ \| not measured \| (\d+) \|$", output, re.M)
        assert [name for name, _ in rows] == [
            "default",
            "activation checkpointing on",
            "channels-last on",
            "torch.compile on",
        ], output[-3000:]
        assert all(syncs == "0" for _, syncs in rows), output[-3000:]


def kill_group(pid: int) -> None:
    """Kills a command started in its own session and every process it started."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGKILL)


def wait_first(running: dict[int, Run], timeout: float | None = None) -> tuple[int, int, resource.struct_rusage]:
    """The first running command to finish: its pid, wait status and resources (CPU time, its subprocesses included).
    A command running longer than `timeout` seconds (a hang; default ``limit(WORKFLOW_LIMIT)``) is killed, and its check
    then fails saying so."""
    timeout = limit(WORKFLOW_LIMIT) if timeout is None else timeout
    while True:
        for pid, run in running.items():
            finished, status, usage = os.wait4(pid, os.WNOHANG)
            if finished:
                return pid, status, usage
            if run.timed_out is None and time.monotonic() - run.start > timeout:
                run.timed_out = time.monotonic() - run.start
                kill_group(pid)  # the command and what it started (a study's runs)
        time.sleep(0.1)


def test_readme_top_to_bottom(tmp_path, request):
    repo, data, logs = tmp_path / "clone", tmp_path / "data", tmp_path / "logs"
    clone(repo)
    write_user_data(data)
    logs.mkdir()
    # the authors' release for the second import example: a plain FPN3d state dict
    torch.save(FPN3d(1, 4, 3).state_dict(), repo / "vox2vec_contrastive.pt")
    env = {**os.environ, "PYTHONPATH": str(repo), "OMP_NUM_THREADS": "1"}
    env.pop("MLFLOW_TRACKING_URI", None)

    commands = readme_commands(repo / "README.md")
    ablation_commands = [c for c in commands if "--output_dir runs/ablation_" in c]
    assert [any(o in c for c in ablation_commands) for o in ablation_overrides(repo / "README.md")] == [True] * 4
    pending = []
    for command in commands:
        steps = [s for s in STEPS if re.search(s.pattern, command) or s.pattern == command]
        assert len(steps) == 1, f"README command without exactly one step here: {command}"
        pending.append((commands[0] if command == RESUME_HEADING else command, steps[0]))
    assert len(pending) == len(STEPS), "a step here whose README command is gone"

    running: dict[int, Run] = {}
    request.addfinalizer(lambda: [kill_group(pid) for pid in running])  # after a failed check
    state, backbone, cpu, began = snapshot(repo, data), None, 0.0, time.monotonic()
    while pending or running:
        # the longest first, else in the README's order; each only once the earlier commands it needs are done
        for command, step in sorted(pending, key=lambda item: -item[1].runs):
            if len(running) == PARALLEL:
                break
            i = pending.index((command, step))
            if not may_start(step, [s for _, s in pending[:i]] + [r.step for r in running.values()]):
                continue
            for prefix in step.writes:  # a run's own folder is new, except where the README says it resumes
                if prefix.startswith("runs/") and step.pattern != RESUME_HEADING:
                    assert not (repo / prefix).exists(), f"{command}: {prefix} already holds another run's results"
            if step.pattern == RESUME_HEADING:
                backbone = (repo / "runs/pretrain/pretrained_backbone.pt").read_bytes()
            log = logs / f"{len(STEPS) - len(pending):02d}.log"
            with open(log, "w") as out:
                argv = with_overrides(command, step.extra, data)
                process = subprocess.Popen(
                    argv, cwd=repo, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
                )
            running[process.pid] = Run(command, step, process, log, time.monotonic())
            pending.remove((command, step))

        pid, status, usage = wait_first(running)
        run = running.pop(pid)
        run.process.returncode = os.waitstatus_to_exitcode(status)
        # Every file changed since the last finish belongs to a command running meanwhile, whose folder holds it.
        now = snapshot(repo, data)
        for path in sorted(p for p in now.keys() | state.keys() if now.get(p) != state.get(p)):
            owners = [r for r in (run, *running.values()) if in_scope(path, r.step.writes, repo, data)]
            assert owners, f"{path} written outside the folders of {[r.command for r in (run, *running.values())]}"
            for owner in owners:
                owner.changed.add(path)
        state = now
        cpu += usage.ru_utime + usage.ru_stime
        print(f"{time.monotonic() - run.start:6.1f} s {usage.ru_utime + usage.ru_stime:6.1f} s CPU  {run.command}")
        check(run, run.process.returncode, repo, data, backbone)
    print(f"{time.monotonic() - began:6.1f} s {cpu:6.1f} s CPU  in all, {PARALLEL} commands at a time")
