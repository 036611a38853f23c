"""Out of space (issue 16): a checkpoint, a weight export or a cache entry that does not fit ends with one line naming
the file and the space it needs, leaves no partial file and keeps what was written before. The limit is a real one, a
file-size limit (RLIMIT_FSIZE) in a subprocess: writes past it fail as on a full disk (EFBIG instead of ENOSPC)."""

import errno
import json
import sys

import pytest
from bundle import HELP_LIMIT, ROOT, command_env, last_error, run_command
from scripts.utils.errors import OutOfSpaceError, out_of_space
from test_data import _phantom, _save


def test_every_writer_names_the_file_and_the_space_it_needs(tmp_path):
    result = run_command(
        [sys.executable, ROOT / "tests/out_of_space_worker.py", tmp_path], timeout=HELP_LIMIT, env=command_env()
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.splitlines()[-1])
    messages = report["messages"]
    assert set(messages) == {"checkpoint", "export", "cache"}, messages
    checkpoint = tmp_path / "run/checkpoints/checkpoint_iteration=2.pt"
    for writer, (path, needed) in {
        "checkpoint": (checkpoint, "0.26 MB"),  # the weights and the random states
        "export": (tmp_path / "backbone.pt", "0.25 MB"),
        "cache": (tmp_path / "cache/volume", "0.75 MB"),
    }.items():
        assert messages[writer].startswith(f"Out of space writing {path}: it needs about {needed} free"), messages
        assert "file-size limit of 0.10 MB (ulimit -f)" in messages[writer] and "\n" not in messages[writer]
    assert f"the earlier checkpoints in {tmp_path}/run/checkpoints are intact" in messages["checkpoint"]
    # the earlier checkpoint and export kept; no partial file, no temporary entry
    assert report["files"] == [
        "backbone.json",
        "backbone.pt",
        "run/checkpoints/checkpoint_iteration=1.pt",
        "run/run.json",
        "run/run.lock",
    ]


def test_a_full_disk_is_told_from_other_write_errors(tmp_path):
    message = rf"Out of space writing {tmp_path}/x: it needs about 0.00 MB free \(.* free on its filesystem\); free"
    with pytest.raises(OutOfSpaceError, match=message), out_of_space(tmp_path / "x", 10, "free space"):
        raise OSError(errno.ENOSPC, "No space left on device")
    with pytest.raises(PermissionError), out_of_space(tmp_path / "x", 10, "free space"):
        raise PermissionError(errno.EACCES, "Permission denied")


@pytest.mark.slow  # two command runs: ~15 s
def test_cache_command_out_of_space_then_resumed(tmp_path):
    """`python -m scripts.data.cache` (README): under a file-size limit it stops with one error line; rerun, it
    prepares the cache that pretraining uses."""
    for i in range(2):
        _save(_phantom()[0], tmp_path / f"data/case{i}.nii.gz")
    args = [tmp_path / "data", "--modality", "ct", "--patch_size", 8, 8, 4, "--cache_dir", tmp_path / "cache"]
    args += ["--num_workers", 1]
    # the command with a 1 KiB file-size limit: Python ignores SIGXFSZ, so a longer write fails with EFBIG
    limited = (
        "import resource, runpy; resource.setrlimit(resource.RLIMIT_FSIZE, (1024, resource.RLIM_INFINITY)); "
        "runpy.run_module('scripts.data.cache', run_name='__main__', alter_sys=True)"
    )
    full = run_command([sys.executable, "-c", limited, *args], timeout=HELP_LIMIT, env=command_env())
    assert full.returncode != 0
    assert last_error(full.stderr).startswith(f"error: Out of space writing {tmp_path}/cache/")
    assert "file-size limit" in last_error(full.stderr) and "\n" not in last_error(full.stderr)
    assert not list(tmp_path.glob("cache/*/.tmp-*")), "no half entry left"
    result = run_command([sys.executable, "-m", "scripts.data.cache", *args], timeout=HELP_LIMIT, env=command_env())
    assert result.returncode == 0, result.stderr[-3000:]
    assert "using 2 of 2 volumes" in result.stdout + result.stderr
    assert len(list(tmp_path.glob("cache/*/case*/image.bin"))) == 2
