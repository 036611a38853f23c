"""The label-efficiency study: grid, resume, table and plot; one real cell through the bundle."""

import csv
import json
import os
from pathlib import Path

import pytest

from scripts import study

ROOT = Path(__file__).resolve().parents[1]


def fake_runner(calls):
    def run(cell, root, extra):
        calls.append(cell)
        summary = {"mean_dice": 0.1 * cell.budget + (0.05 if cell.checkpoint else 0) + 0.01 * cell.fold, "cases": 2}
        out = cell.folder(root) / "evaluation"
        out.mkdir(parents=True)
        (out / "summary.json").write_text(json.dumps(summary))
        return summary

    return run


def test_grid_always_has_the_from_scratch_reference():
    grid = study.cells(["models/a.pt", "b.pt"], ["linear", "finetune"], [1, 2, 4], [0, 1])
    assert len(grid) == 3 * 2 * 3 * 2
    assert {c.init for c in grid} == {"scratch", "a", "b"}
    assert all(c.checkpoint is None for c in grid if c.init == "scratch")


def test_study_writes_the_table_and_resumes_without_rerunning(tmp_path):
    grid = study.cells(["x.pt"], ["finetune"], [1, 2], [0, 1])
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

    more = study.cells(["x.pt"], ["finetune"], [1, 2, 4], [0, 1])
    study.run_study(more, tmp_path, runner=fake_runner(again))
    assert {c.budget for c in again} == {4}, "only the new cells run"


def test_plot_draws_mean_and_spread(tmp_path):
    rows = study.run_study(study.cells([], ["linear", "finetune"], [1, 2], [0, 1]), tmp_path, runner=fake_runner([]))
    study.plot(rows, tmp_path / "plot.png")
    assert (tmp_path / "plot.png").stat().st_size > 10_000


def test_missing_pretrained_file_stops_the_study(tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        study.main(["--pretrained", str(tmp_path / "none.pt"), "--output_dir", str(tmp_path)])
    assert exit_info.value.code == 1 and "none.pt" in capsys.readouterr().err


def test_one_real_cell_trains_and_evaluates_through_the_bundle(tmp_path, monkeypatch):
    from test_train_bundle import TINY, write_cases

    write_cases(tmp_path / "data")
    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("PYTHONPATH", str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    overrides = {**TINY, "epochs": "1", "warmup_epochs": "0", "dataset_dir": str(tmp_path / "data")}
    extra = [item for key, value in overrides.items() for item in (f"--{key}", value)]
    summary = study.run_cell(study.Cell("scratch", None, "finetune", 1, 0), tmp_path / "study", extra)
    assert 0.0 <= summary["mean_dice"] <= 1.0
    assert (tmp_path / "study/scratch/finetune/n1_f0/model.pt").is_file()
    # A budget of 1 is one labelled scan in all: no extra validation case picks the checkpoint.
    log = (tmp_path / "study/scratch/finetune/n1_f0/log.txt").read_text()
    assert "Training on 1 cases; validating on 0" in log


def test_warm_up_applies_to_fine_tuning_only(tmp_path, monkeypatch):
    seen = []

    def fake_bundle_run(run_id, configs, keys, extra, log):
        seen.append((configs, keys.get("warmup_epochs")))
        out = Path(keys["output_dir"]) / "evaluation"
        out.mkdir(parents=True, exist_ok=True)
        (out / "summary.json").write_text(json.dumps({"mean_dice": 0.5}))

    monkeypatch.setattr(study, "bundle_run", fake_bundle_run)
    study.main(["--budgets", "1", "--folds", "0", "--warmup_epochs", "3", "--output_dir", str(tmp_path)])
    warmups = {("configs/linear_eval.yaml" in configs, warmup) for configs, warmup in seen}
    assert warmups == {(False, "3"), (True, None)}
    with pytest.raises(SystemExit):
        study.main(["--output_dir", str(tmp_path), "--", "--warmup_epochs", "3"])
