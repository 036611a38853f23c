"""The label-efficiency study: grid, cell identity, resume, table and plot; one real cell through the bundle."""

import csv
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from bundle import HELP_LIMIT, ROOT, command_env, limit, run_command
from scripts.tools import study
from scripts.utils.errors import BundleError
from test_train_bundle import write_cases

TOOLS = ["tools.study", "tools.compare", "tools.benchmark", "import_weights", "visualize"]


def fake_runner(calls):
    def run(cell, root, tracking=None):
        calls.append(cell)
        summary = {"mean_dice": 0.1 * cell.budget + (0.05 if cell.checkpoint else 0) + 0.01 * cell.fold, "cases": 2}
        out = cell.folder(root) / "evaluation"
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    return run


def fake_demo(monkeypatch, folder: Path) -> list[str]:
    """Stands in for the demo data, whose preparation takes about 10 s, with a few tiny labelled cases in ``folder``;
    returns the folders that the demo data is asked for in."""
    asked = []

    def prepare(root):
        asked.append(root)
        if not folder.exists():
            write_cases(folder, count=3)
        return str(folder)

    monkeypatch.setattr(study, "prepare_demo", prepare)
    return asked


@pytest.fixture
def demo(monkeypatch, tmp_path_factory):
    return fake_demo(monkeypatch, tmp_path_factory.mktemp("demo") / "data")


@pytest.fixture
def fake_runs(monkeypatch, demo):
    """Replaces the bundle runs of each cell by writing a summary (and the demo data by tiny cases); returns the
    (configs, keys, args) of each run."""
    seen = []

    def fake_bundle_run(run_id, configs, keys, extra, log):
        seen.append((configs, keys, list(extra)))
        out = Path(keys["output_dir"]) / "evaluation"
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"mean_dice": 0.5}))

    monkeypatch.setattr(study, "bundle_run", fake_bundle_run)
    return seen


def backbone(path: Path, content: bytes = b"weights") -> str:
    """A stand-in weight file whose bytes depend on ``content`` (readable, as the study reads what it describes)."""
    torch.save({"stand_in": torch.tensor(list(content))}, path)
    return str(path)


def test_grid_always_has_the_from_scratch_reference(tmp_path):
    files = [backbone(tmp_path / "a.pt"), backbone(tmp_path / "b.pt")]
    grid = study.cells(files, ["linear", "finetune"], [1, 2, 4], [0, 1])
    assert len(grid) == 3 * 2 * 3 * 2
    assert {c.init for c in grid} == {"scratch", "a", "b"}
    assert all(c.checkpoint is None for c in grid if c.init == "scratch")


def test_study_writes_the_table_and_resumes_without_rerunning(tmp_path):
    grid = study.cells([backbone(tmp_path / "x.pt")], ["finetune"], [1, 2], [0, 1])
    calls = []
    rows = study.run_study(grid, tmp_path, runner=fake_runner(calls))
    assert len(calls) == len(grid) == len(rows) == 8
    with open(tmp_path / "results.csv") as f:
        table = list(csv.DictReader(f))
    assert [r["init"] for r in table].count("scratch") == 4
    assert {"init", "mode", "budget", "fold", "mean_dice", "cases"} <= table[0].keys()

    again = []
    study.run_study(grid, tmp_path, runner=fake_runner(again))
    assert again == [], "finished cells are not run again"

    more = study.cells([str(tmp_path / "x.pt")], ["finetune"], [1, 2, 4], [0, 1])
    study.run_study(more, tmp_path, runner=fake_runner(again))
    assert {c.budget for c in again} == {4}, "only the new cells run"


def test_a_changed_argument_is_a_new_cell_with_its_arguments_recorded(tmp_path, fake_runs):
    argv = ["--budgets", "1", "--folds", "0", "--modes", "finetune", "--output_dir", str(tmp_path)]
    study.main([*argv, "--", "--epochs", "2"])
    assert len(fake_runs) == 2, "one training and one evaluation run"
    study.main([*argv, "--", "--epochs", "20"])
    assert len(fake_runs) == 4, "--epochs 20 after --epochs 2 is not the finished cell"
    folders = sorted((tmp_path / "scratch/finetune").iterdir())
    assert len(folders) == 2 and all(f.name.startswith("n1_f0_") for f in folders)
    recorded = {tuple(json.loads((f / "args.json").read_text())["args"]) for f in folders}
    assert recorded == {("--epochs", "2"), ("--epochs", "20")}
    study.main([*argv, "--", "--epochs", "20"])
    assert len(fake_runs) == 4, "the same arguments again: finished"


def test_a_cell_another_study_process_finished_meanwhile_is_not_run_again(tmp_path):
    grid = study.cells([], ["linear"], [1, 2], [0])
    calls = []
    first = fake_runner(calls)

    def runner(cell, root, tracking=None):  # while the first cell runs, another process finishes the second
        if not calls:
            fake_runner([])(grid[1], root)
        return first(cell, root, tracking)

    rows = study.run_study(grid, tmp_path, runner=runner)
    assert calls == [grid[0]] and len(rows) == 2


# Another study process running a cell: it holds the cell's lock as RunLock does, has written to the cell's log, and
# ends (with or without the cell's summary) once told to on stdin, a moment later.
HOLDER = """
import fcntl, json, os, sys, time
from pathlib import Path
folder = Path(sys.argv[1])
folder.mkdir(parents=True)
fd = os.open(folder / "cell.lock", os.O_RDWR | os.O_CREAT, 0o644)
fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
os.write(fd, f"{os.getpid()}\\n".encode())
(folder / "log.txt").write_text("the holder's run\\n")
print("locked", flush=True)
sys.stdin.readline()
time.sleep(0.5)
if sys.argv[2] == "with its summary":
    (folder / "evaluation").mkdir()
    (folder / "evaluation" / "summary.json").write_text(json.dumps({"mean_dice": 0.9}))
"""


@pytest.mark.parametrize("holder_ends", ["with its summary", "without it"])
def test_a_cell_another_study_process_runs_is_left_to_it_and_taken_up_after_the_others(
    tmp_path, fake_runs, monkeypatch, caplog, holder_ends
):
    fake_bundle_run = study.bundle_run

    def bundle_run(run_id, configs, keys, extra, log):  # says in the cell's log which process ran it
        log.write(f"{run_id} by {os.getpid()}\n")
        log.flush()
        fake_bundle_run(run_id, configs, keys, extra, log)

    monkeypatch.setattr(study, "bundle_run", bundle_run)
    grid = study.cells([], ["linear"], [1, 2], [0])
    locked = grid[0].folder(tmp_path)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(locked), holder_ends],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    calls = []

    def runner(cell, root, tracking=None):
        assert (cell.folder(root) / "cell.lock").read_text() == f"{os.getpid()}\n", "held over the whole cell"
        calls.append(cell)
        summary = study.run_cell(cell, root, tracking)
        if cell == grid[1]:  # the other cells are done: the holder ends a moment later, while the study waits
            holder.stdin.write("end\n")
            holder.stdin.flush()
        return summary

    caplog.set_level(logging.INFO, logger="scripts")
    try:
        assert holder.stdout.readline() == "locked\n"
        start = time.monotonic()
        rows = study.run_study(grid, tmp_path, runner=runner, poll_s=0.05)
        assert time.monotonic() - start < 5
    finally:
        holder.kill()
        holder.wait()
    finished = holder_ends == "with its summary"
    assert calls == ([grid[1]] if finished else [grid[1], grid[0]])
    assert [row["mean_dice"] for row in rows] == [0.9 if finished else 0.5, 0.5], "in the grid's order"
    ours = "" if finished else f"run by {os.getpid()}\nevaluate by {os.getpid()}\n"
    assert (locked / "log.txt").read_text() == "the holder's run\n" + ours, "nothing while the holder ran it"
    assert not any(tmp_path.rglob("cell.lock")), "released after each cell"
    deferred = f"deferred: {locked}: another process (PID {holder.pid}) runs it; back to it after the other cells"
    assert caplog.messages.count(deferred) == 1
    assert caplog.messages.count(f"waiting for {locked}: another process (PID {holder.pid}) runs it") == 1


@pytest.mark.parametrize("content", ["", '{"mean_dice": 0.', "[]"])
def test_an_unreadable_summary_is_named_and_its_cell_runs_again(tmp_path, fake_runs, capsys, content):
    argv = ["--budgets", "1", "--folds", "0", "--modes", "finetune", "--output_dir", str(tmp_path)]
    study.main(argv)
    (summary,) = tmp_path.glob("scratch/finetune/*/evaluation/summary.json")
    summary.write_text(content)  # a crash or a full disk while it was written
    study.main(argv)
    assert len(fake_runs) == 4, "the cell ran again"
    assert f"unreadable {summary}" in capsys.readouterr().out
    assert json.loads(summary.read_text()) == {"mean_dice": 0.5}


def test_corrected_labels_are_new_cells(tmp_path, fake_runs, capsys):
    write_cases(tmp_path / "data", count=3)
    argv = ["--budgets", "1", "--folds", "0", "--modes", "finetune", "--output_dir", str(tmp_path / "study")]
    argv += ["--", "--dataset_dir", str(tmp_path / "data")]
    study.main(argv)
    label = nib.load(tmp_path / "data/labelsTr/case_0.nii.gz")
    corrected = np.asanyarray(label.dataobj).copy()
    corrected[0, 0, 0] = 1
    nib.save(nib.Nifti1Image(corrected, label.affine), tmp_path / "data/labelsTr/case_0.nii.gz")
    study.main(argv)
    assert len(fake_runs) == 4, "the cell ran again on the corrected labels"
    folders = list((tmp_path / "study/scratch/finetune").iterdir())
    assert len({json.loads((f / "args.json").read_text())["datalist_sha256"] for f in folders}) == 2
    assert "1 cell folder(s) in" in capsys.readouterr().out.replace("\n", " ")
    study.main(argv)
    assert len(fake_runs) == 4, "the same data again: finished"


def test_without_dataset_dir_the_cells_are_on_the_demo_data_where_the_runs_find_it(tmp_path, fake_runs, demo):
    argv = ["--budgets", "1", "--folds", "0", "--modes", "finetune", "--output_dir", str(tmp_path)]
    study.main(argv)
    study.main([*argv, "--", "--demo_dir", str(tmp_path / "demo")])
    assert demo == ["./data/demo", str(tmp_path / "demo")], "configs/train.yaml's demo_dir, or the runs' own"


def test_labelled_data_that_cannot_be_read_stops_the_study_before_any_cell(tmp_path, fake_runs):
    with pytest.raises(BundleError, match="none_here"):
        study.main(["--output_dir", str(tmp_path), "--", "--dataset_dir", str(tmp_path / "none_here")])
    assert fake_runs == []


def test_a_new_backbone_under_the_same_name_is_a_new_cell(tmp_path, fake_runs):
    weights = backbone(tmp_path / "dhr.pt", b"first")
    argv = ["--pretrained", weights, "--budgets", "1", "--folds", "0", "--modes", "linear"]
    study.main([*argv, "--output_dir", str(tmp_path / "study")])
    backbone(tmp_path / "dhr.pt", b"pretrained again")
    fake_runs.clear()
    study.main([*argv, "--output_dir", str(tmp_path / "study")])
    assert [keys.get("pretrained_ckpt") for _, keys, _ in fake_runs] == [weights, weights], "only the backbone's cell"


def test_plot_draws_mean_and_spread_without_offset_notation(tmp_path):
    rows = study.run_study(study.cells([], ["linear", "finetune"], [1, 2], [0, 1]), tmp_path, runner=fake_runner([]))
    study.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000
    close = [{**row, "mean_dice": 0.7131 + 1e-5 * row["budget"] + 1e-6 * row["fold"]} for row in rows]
    figure = study.label_efficiency_figure(close)
    figure.canvas.draw()
    assert figure.axes[0].yaxis.get_offset_text().get_text() == ""
    assert [t.get_text() for t in figure.axes[0].get_xticklabels()] == ["1", "2"]
    colours = {line.get_label(): line.get_color() for line in figure.axes[0].get_lines()}
    assert colours["scratch (mri), linear"] == colours["scratch (mri), finetune"], "one colour per initialisation"


def test_the_table_and_the_legend_say_each_rows_preset(tmp_path, fake_runs):
    from scripts.engine.weights import save_weights

    vox2vec = str(tmp_path / "vox2vec.pt")
    save_weights({}, vox2vec, {"kind": "backbone", "modality": "ct_wide"})
    argv = ["--pretrained", vox2vec, backbone(tmp_path / "plain.pt"), "--budgets", "1", "--folds", "0", "--modes"]
    study.main([*argv, "linear", "--output_dir", str(tmp_path / "study")])
    with open(tmp_path / "study/results.csv") as f:
        table = list(csv.DictReader(f))
    # from scratch takes the first backbone's preset; a file that records none runs train.yaml's default
    assert {row["init"]: row["preset"] for row in table} == {"scratch": "ct_wide", "vox2vec": "ct_wide", "plain": "mri"}
    rows = [row | {"budget": int(row["budget"]), "mean_dice": float(row["mean_dice"])} for row in table]
    labels = {line.get_label() for line in study.label_efficiency_figure(rows).axes[0].get_lines()}
    assert labels == {"scratch (ct_wide), linear", "vox2vec (ct_wide), linear", "plain (mri), linear"}


def test_missing_pretrained_file_stops_the_study(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--pretrained", str(tmp_path / "none.pt"), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 1 and "none.pt" in capsys.readouterr().err


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--budgets", "0"], "--budgets 0"),
        (["--folds", "3"], "0..2"),
        (["--folds", "3", "--", "--num_folds", "5"], None),
        (["--warmup_epochs", "-1"], "--warmup_epochs -1"),
        (["--", "--warmup_epochs", "3"], "the study's own --warmup_epochs"),
        (["--", "--fold", "1"], "--fold: set by the study"),
        (["--", "--dataset_dir", "None"], "--dataset_dir None"),
    ],
)
def test_arguments_are_checked_before_any_cell_runs(tmp_path, fake_runs, capsys, argv, message):
    if message is None:
        study.main(["--output_dir", str(tmp_path), "--budgets", "1", "--modes", "linear", *argv])
        assert fake_runs
        return
    with pytest.raises(SystemExit):
        study.main(["--output_dir", str(tmp_path), *argv])
    assert message in capsys.readouterr().err and fake_runs == []


def test_warm_up_applies_to_fine_tuning_only(tmp_path, fake_runs):
    study.main(["--budgets", "1", "--folds", "0", "--warmup_epochs", "3", "--output_dir", str(tmp_path)])
    warmups = {("configs/linear_eval.yaml" in configs, "--warmup_epochs" in args) for configs, _, args in fake_runs}
    assert warmups == {(False, True), (True, False)}
    assert all(args[args.index("--warmup_epochs") + 1] == "3" for _, _, args in fake_runs if "--warmup_epochs" in args)
    assert all("pretrained_ckpt" not in keys for _, keys, _ in fake_runs), "from scratch: no --pretrained_ckpt None"


def check_help(module: str, text: str) -> None:
    assert "(default: " in text, text
    if module == "tools.compare":
        assert "72 cells" in " ".join(text.split())


@pytest.mark.parametrize("module", TOOLS)
def test_help_shows_the_defaults(module, monkeypatch, capsys):
    monkeypatch.setattr(sys, "argv", [f"python -m scripts.{module}", "--help"])
    monkeypatch.setattr(signal, "signal", lambda *args: None)  # the study's SIGTERM handler: not this process's
    with pytest.raises(SystemExit) as exit_info:
        importlib.import_module(f"scripts.{module}").main()
    assert exit_info.value.code == 0
    check_help(module, capsys.readouterr().out)


@pytest.mark.slow
@pytest.mark.parametrize("module", TOOLS)
def test_help_from_the_command_line(module):
    result = run_command([sys.executable, "-m", f"scripts.{module}", "--help"], timeout=HELP_LIMIT, env=command_env())
    assert result.returncode == 0, result.stderr
    check_help(module, result.stdout)


@pytest.mark.slow
def test_one_real_cell_through_the_bundle_is_one_mlflow_run_of_the_study_experiment(tmp_path, monkeypatch):
    from mlflow import MlflowClient
    from test_train_bundle import TINY, write_cases

    write_cases(tmp_path / "data")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    overrides = {**TINY, "epochs": "1", "dataset_dir": str(tmp_path / "data"), "bundle_root": str(tmp_path)}
    extra = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    argv = ["--budgets", "1", "--folds", "0", "--modes", "finetune", "--warmup_epochs", "0", "--tracking", "mlflow"]
    study.main([*argv, "--output_dir", str(tmp_path / "study"), "--", *extra])

    (folder,) = (tmp_path / "study/scratch/finetune").iterdir()
    assert (folder / "model.pt").is_file() and json.loads((folder / "args.json").read_text())["budget"] == 1
    # A budget of 1 is one labelled scan in all: no extra validation case picks the checkpoint.
    assert "Training on 1 cases; validating on 0" in (folder / "log.txt").read_text()
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'study/mlruns.db'}")
    (experiment,) = [e for e in client.search_experiments() if e.name != "Default"]
    assert experiment.name == "label_efficiency"
    runs = {run.info.run_name: run for run in client.search_runs([experiment.experiment_id])}
    assert runs.keys() == {"scratch/finetune/n1_f0", "label_efficiency"}
    cell = runs["scratch/finetune/n1_f0"]
    assert cell.data.params["num_train_cases"] == "1" and cell.data.params["warmup_epochs"] == "0"
    assert {"train_loss", "test_mean_dice"} <= cell.data.metrics.keys()
    artifacts = {a.path for a in client.list_artifacts(cell.info.run_id)}
    assert "args.json" in artifacts and "evaluation" in artifacts
    assert any(a.startswith("config_") and a.endswith(".json") for a in artifacts), artifacts
    summary = {a.path for a in client.list_artifacts(runs["label_efficiency"].info.run_id)}
    assert summary == {"results.csv", "label_efficiency.png"}
    assert not (ROOT / "mlruns").exists()


def test_from_scratch_is_the_first_backbones_network_untrained(tmp_path):
    from scripts.engine.weights import save_weights
    from scripts.networks.fpn3d import FPN3d

    info = {"kind": "backbone", "in_channels": 1, "base_channels": 4, "num_scales": 3, "modality": "ct"}
    save_weights(FPN3d(1, 4, 3).state_dict(), tmp_path / "dhr.pt", {**info, "patch_size": [16, 16, 8]})
    size = ("--base_channels", "4", "--num_scales", "3")
    patch = ("--patch_size", "[16,16,8]")
    scratch, pretrained = study.cells([str(tmp_path / "dhr.pt")], ["linear"], [1], [0], extra=["--modality", "mri"])
    assert scratch.args == ("--modality", "mri", *size, *patch)  # the run's own --modality wins
    assert pretrained.args == ("--modality", "mri")
    scratch, _ = study.cells([str(tmp_path / "dhr.pt")], ["linear"], [1], [0])
    assert scratch.args == (*size, "--modality", "ct", *patch)


@pytest.mark.slow
def test_a_terminated_study_ends_the_run_it_started(tmp_path):
    from test_train_bundle import TINY, write_cases

    write_cases(tmp_path / "data")
    overrides = {**TINY, "epochs": "1000", "dataset_dir": str(tmp_path / "data")}  # runs until it is ended
    overrides["bundle_root"] = str(tmp_path)
    extra = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    argv = ["--budgets", "1", "--folds", "0", "--modes", "finetune", "--output_dir", str(tmp_path / "study")]
    cmd = [sys.executable, "-m", "scripts.tools.study", *argv, "--", *extra]
    parent = subprocess.Popen(cmd, cwd=ROOT, env=command_env())
    try:
        children = Path(f"/proc/{parent.pid}/task/{parent.pid}/children")
        deadline = time.monotonic() + limit(HELP_LIMIT)  # the study's start: imports, the data's checks
        while not children.read_text().split() and time.monotonic() < deadline:
            time.sleep(0.2)
        started = children.read_text().split()
        assert started, f"timed out: the study started no bundle run in {limit(HELP_LIMIT):.0f} s"
        (child,) = map(int, started)
        parent.send_signal(signal.SIGTERM)
        parent.wait(timeout=limit(60))
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()
    survived = Path(f"/proc/{child}").exists()
    if survived:
        os.kill(child, signal.SIGKILL)
    assert not survived, "the cell's bundle run outlived the study"
    assert parent.returncode == 128 + signal.SIGTERM, "ended as by the signal"
