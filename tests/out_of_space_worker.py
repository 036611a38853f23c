"""Run by tests/test_out_of_space.py in a subprocess: a checkpoint, a weight export and a cache entry, each written
once and then again under a file-size limit (RLIMIT_FSIZE, set here: it must not touch the test process). Prints
{writer: message} as JSON, and the files left in the folder."""

import json
import resource
import sys
from pathlib import Path

import numpy as np
import torch
from ignite.engine import Engine, Events
from scripts.data.cache import write_entry
from scripts.engine.runs import CheckpointSaver, RunFolder
from scripts.engine.weights import save_weights
from scripts.utils.errors import OutOfSpaceError

LIMIT = 100 * 1024  # bytes: room for the first writes' small files, not for the second ones


def limit_file_size(*args) -> None:
    # Python ignores SIGXFSZ, so a write past the limit fails with EFBIG instead of killing the process.
    resource.setrlimit(resource.RLIMIT_FSIZE, (LIMIT, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def main(folder: Path) -> None:
    messages = {}
    network = torch.nn.Linear(256, 256)  # 257 KiB of weights
    run = RunFolder(folder / "run", {"test": 1})
    run.start()
    save_weights({"w": torch.zeros(8)}, folder / "backbone.pt", {"kind": "backbone"})
    engine = Engine(lambda engine, batch: None)
    CheckpointSaver(run, {"network": network}, save_interval=1).attach(engine)
    engine.add_event_handler(Events.ITERATION_COMPLETED(once=1), limit_file_size)  # after the first checkpoint
    try:
        engine.run(range(2))
    except OutOfSpaceError as e:
        messages["checkpoint"] = str(e)
    try:
        save_weights(network.state_dict(), folder / "backbone.pt", {"kind": "backbone"})
    except OutOfSpaceError as e:
        messages["export"] = str(e)
    (folder / "cache").mkdir()
    try:
        write_entry(folder / "cache", "volume", {"shape": [64, 64, 64]}, np.zeros((64,) * 3), np.ones((64,) * 3))
    except OutOfSpaceError as e:
        messages["cache"] = str(e)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    print(json.dumps({"messages": messages, "files": files}))


if __name__ == "__main__":
    main(Path(sys.argv[1]))
