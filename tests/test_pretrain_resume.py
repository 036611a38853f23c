"""Exact resume: a pretraining stopped mid-run and resumed ends bitwise equal to an uninterrupted run (issue 7.3).

In this process, stopped by an exception, against the session's shared run; in the slow tier, killed (``os._exit``, no
handler, no cleanup) through the command line, with and without DataLoader workers."""

from pathlib import Path

import pytest
import torch
from bundle import ROOT, monai_bundle_run, run_workflow
from scripts.engine.runs import checkpoints
from test_pretrain_bundle import TINY, write_volumes

# Raises when iteration 5 completes, after the checkpoint of iteration 4 (checkpoint_interval 2); then pretrain.yaml's
# own `pretrain` steps.
STOP = f"""
stop: "$lambda engine: (_ for _ in ()).throw(RuntimeError('stopped at iteration 5'))"
pretrain:
  - $@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once=5), @stop)
  - '%{ROOT}/configs/pretrain.yaml#pretrain'
"""


def test_stopped_and_resumed_run_equals_the_uninterrupted_run(pretrained, tmp_path):
    (tmp_path / "stop.yaml").write_text(STOP)
    keys = {**pretrained.keys, "output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache", "bundle_root": tmp_path}
    stopped = run_workflow("pretrain", ["configs/pretrain.yaml", str(tmp_path / "stop.yaml")], fails=True, **keys)
    assert "stopped at iteration 5" in repr(stopped.error.__cause__ or stopped.error.__context__)
    assert checkpoints(tmp_path / "out/checkpoints")[0].name.endswith("=4.pt")
    assert "Resuming from" in run_workflow("pretrain", "configs/pretrain.yaml", **keys).log
    expected, state = final_state(pretrained.out), final_state(tmp_path / "out")
    for key, value in expected["network"].items():
        assert torch.equal(state["network"][key], value), f"network entry {key} differs"
    for group, value in expected["optimizer"]["state"].items():
        for name, tensor in value.items():
            assert torch.equal(state["optimizer"]["state"][group][name], tensor), f"optimizer {group}.{name}"


# Kills the process (as a kill -9 would: no handler, no cleanup) when iteration 5 completes, after the checkpoint of
# iteration 4; then runs pretrain.yaml's own `pretrain` steps. (`torch.os` is `os`: MONAI parses any expression holding
# the word "import" as an import statement.)
CRASH = """
crash: "$lambda engine: torch.os._exit(3)"
pretrain:
  - $@train#trainer.add_event_handler(monai.engines.workflow.Events.ITERATION_COMPLETED(once=5), @crash)
  - '%configs/pretrain.yaml#pretrain'
"""


def pretrain(tmp: Path, name: str, num_workers: int, crash: bool = False) -> int:
    keys = {
        **TINY,
        "dataset_dir": tmp / "data",
        "cache_dir": tmp / "cache",
        "bundle_root": tmp / name,
        "output_dir": tmp / name,
        "num_workers": num_workers,
        "epochs": 2,  # 2 x 3 iterations
        "checkpoint_interval": 2,  # the resumed run starts mid-epoch, at iteration 4
    }
    config = f"['configs/pretrain.yaml','{tmp / 'crash.yaml'}']" if crash else "configs/pretrain.yaml"
    result = monai_bundle_run("pretrain", config, keys)
    assert result.returncode == (3 if crash else 0), result.stderr[-4000:]
    return result


def final_state(output_dir: Path) -> dict:
    checkpoint = checkpoints(output_dir / "checkpoints")[0]
    assert checkpoint.name.endswith("=6.pt"), checkpoint
    return torch.load(checkpoint, weights_only=False)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("resume")
    write_volumes(tmp / "data", count=3)
    (tmp / "crash.yaml").write_text(CRASH)
    pretrain(tmp, "uninterrupted", num_workers=0)
    return tmp, final_state(tmp / "uninterrupted")


@pytest.mark.slow
@pytest.mark.parametrize("num_workers", [0, 2])
def test_killed_and_resumed_run_equals_the_uninterrupted_run(uninterrupted, num_workers):
    tmp, expected = uninterrupted
    name = f"resumed_{num_workers}"
    pretrain(tmp, name, num_workers, crash=True)
    assert checkpoints(tmp / name / "checkpoints")[0].name.endswith("=4.pt")
    result = pretrain(tmp, name, num_workers)
    assert "Resuming from" in result.stdout + result.stderr
    state = final_state(tmp / name)
    for key, value in expected["network"].items():
        assert torch.equal(state["network"][key], value), f"network entry {key} differs"
    for group, value in expected["optimizer"]["state"].items():
        for name_, tensor in value.items():
            assert torch.equal(state["optimizer"]["state"][group][name_], tensor), f"optimizer {group}.{name_}"
