"""One rank of tests/test_distributed.py's validation test, in a module light enough for spawned processes."""

import os
from pathlib import Path

import torch
from ignite.engine import Engine
from monai.bundle import ConfigParser
from scripts.utils.distributed import destroy_process_group, init_process_group

ROOT = Path(__file__).resolve().parents[1]


def gathered_mean_dice(rank: int, port: int, datasets: list[list[dict]], folder: str) -> None:
    """Rank `rank` of 2 validates each of `datasets` (cases holding their ``pred`` and ``label``) through the validation
    loader and key metric of ``configs/multi_gpu_train.yaml``; writes the gathered means to ``folder/rank<r>.pt``."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2")
    init_process_group()
    means = []
    for cases in datasets:
        parser = ConfigParser()
        parser.read_config([str(ROOT / "configs/train.yaml"), str(ROOT / "configs/multi_gpu_train.yaml")])
        parser.update({"validate#volumes": cases, "validate#preprocessing": "$lambda case: case", "num_workers": 0})
        metric = parser.get_parsed_content("validate#key_metric#val_mean_dice")
        engine = Engine(lambda _, batch: batch)  # the predictions come with the cases
        metric.attach(engine, "val_mean_dice")
        engine.run(parser.get_parsed_content("validate#dataloader"))
        means.append(engine.state.metrics["val_mean_dice"])
    torch.save(means, f"{folder}/rank{rank}.pt")
    destroy_process_group()
