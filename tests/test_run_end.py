"""How a pretraining run ends (issue 20, items 2, 3, 7): Ctrl-C and SIGTERM end it with one line naming the newest
checkpoint and the command that resumes it; a rerun of a finished run says it is complete and changes nothing; the
run's lock file is gone once it ends."""

import os
import signal
from pathlib import Path

import pytest
from bundle import monai_bundle_run
from scripts.engine.runs import RunInterruptedError, RunLock, unlock_output_dir
from scripts.utils import errors
from test_pretrain_bundle import TINY, write_volumes

# Sends this process `signum` when iteration 4 completes (after the checkpoint of iteration 2), as Ctrl-C or a
# scheduler's kill would. (`torch.os` is `os`: MONAI parses any expression holding the word "import" as an import.)
SIGNAL = """
stop: "$lambda engine: torch.os.kill(torch.os.getpid(), {signum})"
pretrain:
  - $@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once=4), @stop)
  - '%configs/pretrain.yaml#pretrain'
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
