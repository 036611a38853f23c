"""How a run ends (issue 20, items 2, 3, 7): Ctrl-C and SIGTERM end a pretraining with one line naming the newest
checkpoint and the command that resumes it, a fine-tuning with one naming the model it saved, an evaluation with one
saying how far it got; a rerun of a finished run says it is complete and changes nothing; the run's lock file is gone
once it ends."""

import json
import os
import signal
from pathlib import Path

import pytest
from bundle import ROOT, monai_bundle_run, run_workflow
from scripts.engine.runs import RunInterruptedError, RunLock, unlock_output_dir
from scripts.utils import errors
from test_pretrain_bundle import TINY, write_volumes
from test_train_bundle import TRAIN, write_cases

# Sends this process `signum` when iteration 4 completes (after the checkpoint of iteration 2), as Ctrl-C or a
# scheduler's kill would. (`torch.os` is `os`: MONAI parses any expression holding the word "import" as an import.)
SIGNAL = """
stop: "$lambda engine: torch.os.kill(torch.os.getpid(), {signum})"
pretrain:
  - $@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once=4), @stop)
  - '%configs/pretrain.yaml#pretrain'
"""


# The same for a downstream workflow, whose last step is `run_id` of `config`.
DOWNSTREAM_SIGNAL = """
stop: "$lambda engine: torch.os.kill(torch.os.getpid(), {signum})"
{run_id}:
  - $@{engine}.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once={once}), @stop)
  - '%{config}#{run_id}'
"""


def keys(tmp: Path, **more) -> dict:
    return {
        **TINY,
        "dataset_dir": tmp / "data",
        "cache_dir": tmp / "cache",
        "output_dir": tmp / "run",
        "bundle_root": tmp,
        "epochs": 2,
        "epoch_length": 3,
        "checkpoint_interval": 2,
        **more,
    }


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_an_interrupted_run_ends_with_one_line_saying_how_to_resume(tmp_path, signum):
    write_volumes(tmp_path / "data")
    (tmp_path / "signal.yaml").write_text(SIGNAL.format(signum=int(signum)))
    config = f"['configs/pretrain.yaml','{tmp_path / 'signal.yaml'}']"
    result = monai_bundle_run("pretrain", config, keys(tmp_path))
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    name = "Ctrl-C" if signum == signal.SIGINT else "SIGTERM"
    assert lines[-1].startswith(f"interrupted: {name}: run stopped; the newest checkpoint is "), lines[-1]
    assert "checkpoint_iteration=4.pt (iteration 4). Resume with: python -m monai.bundle run pretrain" in lines[-1]
    assert "Traceback" not in result.stderr + result.stdout
    assert not (tmp_path / "run/pretrained_backbone.pt").exists()  # an interrupted run exports no backbone
    assert not (tmp_path / "run/run.lock").exists()

    resumed = monai_bundle_run("pretrain", "configs/pretrain.yaml", keys(tmp_path))  # the command it names
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    output = resumed.stdout + resumed.stderr
    assert "Resuming from" in output and "(iteration 4 of 6)" in output
    assert "Engine run resuming from" not in output  # ignite's, before the checkpoint is applied: untrue
    assert (tmp_path / "run/pretrained_backbone.pt").is_file()


@pytest.mark.slow
def test_a_finished_run_rerun_says_complete_and_changes_nothing(tmp_path):
    write_volumes(tmp_path / "data")
    first = monai_bundle_run("pretrain", "configs/pretrain.yaml", keys(tmp_path))
    assert first.returncode == 0, first.stderr[-3000:]
    run = tmp_path / "run"
    assert not (run / "run.lock").exists()  # removed at the end of the run
    files = sorted(p for p in run.rglob("*") if p.is_file())
    before = {p: p.stat().st_mtime_ns for p in files}
    again = monai_bundle_run("pretrain", "configs/pretrain.yaml", keys(tmp_path))
    assert again.returncode == 0, again.stderr[-3000:]
    output = again.stdout + again.stderr
    assert "Run complete:" in output and "checkpoint_iteration=6.pt holds all 6 iterations" in output
    assert "Resuming from" not in output
    assert sorted(p for p in run.rglob("*") if p.is_file()) == files
    assert {p: p.stat().st_mtime_ns for p in files} == before


def test_the_lock_file_goes_with_its_holder_only(tmp_path):
    lock = RunLock(tmp_path / "run.lock")
    RunLock(tmp_path / "run.lock").release()  # not held: nothing to do
    lock.acquire()
    assert (tmp_path / "run.lock").read_text().strip() == str(os.getpid())
    unlock_output_dir(tmp_path)
    assert not (tmp_path / "run.lock").exists()
    lock.acquire()  # taken again, a new file
    assert (tmp_path / "run.lock").is_file()
    lock.release()
    assert not (tmp_path / "run.lock").exists()


def test_a_bare_ctrl_c_is_one_line(capsys):
    errors.report(KeyboardInterrupt, KeyboardInterrupt(), None)
    assert capsys.readouterr().err.splitlines() == [
        "interrupted: stopped by Ctrl-C; rerun the same command to start again."
    ]
    errors.report(RunInterruptedError, RunInterruptedError("SIGTERM: run stopped; ..."), None)
    assert capsys.readouterr().err.splitlines() == ["interrupted: SIGTERM: run stopped; ..."]


def interrupt(tmp: Path, signum: int, run_id: str, engine: str, once: int, configs: list[str], **keys) -> str:
    """Runs `configs` in this process with `signum` sent when iteration `once` completes; the one line it ends with."""
    overlay = tmp / f"signal_{run_id}.yaml"
    text = DOWNSTREAM_SIGNAL.format(
        signum=int(signum), run_id=run_id, engine=engine, once=once, config=ROOT / configs[-1]
    )
    overlay.write_text(text)
    run = run_workflow(None if run_id == "run" else run_id, [*configs, str(overlay)], fails=True, **keys)
    cause = errors.find_bundle_error(run.error)
    assert isinstance(cause, RunInterruptedError), run.error
    assert "Traceback" not in run.log
    return f"interrupted: {cause}"


def test_an_interrupted_fine_tuning_names_the_model_it_saved_and_an_evaluation_how_far_it_got(tmp_path):
    write_cases(tmp_path / "data")
    out = tmp_path / "out"
    paths = {"dataset_dir": tmp_path / "data", "output_dir": out, "bundle_root": tmp_path}
    # 2 iterations per epoch, validation after each: SIGTERM in epoch 2, after epoch 1's validation saved model.pt
    line = interrupt(tmp_path, signal.SIGTERM, "run", "train#trainer", 3, ["configs/train.yaml"], **TRAIN, **paths)
    assert line.startswith(
        f"interrupted: SIGTERM: training stopped in epoch 2; {out / 'model.pt'} holds the best "
        "validation so far (epoch 1, val_mean_dice "
    ), line
    assert line.endswith("Training does not resume: rerun the same command to train again.")
    assert json.loads((out / "model.json").read_text())["epoch"] == 1  # not overwritten as "final" weights
    assert not (out / "run.lock").exists()

    evaluate = ["configs/train.yaml", "configs/evaluate.yaml"]
    line = interrupt(tmp_path, signal.SIGINT, "evaluate", "evaluator", 1, evaluate, **TRAIN, **paths)
    assert line == "interrupted: Ctrl-C: stopped after 1 of 1 cases. Rerun the same command to do them all."
    assert not (out / "evaluation" / "summary.json").exists() and not (out / "run.lock").exists()

    without_validation = {**TRAIN, **paths, "num_val_cases": 0}
    line = interrupt(tmp_path, signal.SIGINT, "run", "train#trainer", 1, ["configs/train.yaml"], **without_validation)
    assert f"training stopped in epoch 1; no model was saved ({out / 'model.pt'} is written at " in line
    assert not (out / "model.pt").exists()
