"""scripts.engine.messages: the lines the downstream workflows print (other tests and users grep them)."""

import logging

from scripts.engine import messages


def lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "scripts.engine.messages"]


def test_training_names_the_split_and_a_random_start(caplog):
    caplog.set_level(logging.INFO)
    messages.training_started({"training": [1, 2, 3], "validation": [4]}, "backbone.pt")
    messages.training_started({"training": [1], "validation": []}, None)
    assert lines(caplog) == [
        "Training on 3 cases; validating on 1",
        "Training on 1 cases; validating on 0 (no validation: model_file will hold the final weights)",
        "segmentation network: backbone from scratch (random initialisation)",
    ]


def test_evaluation_and_inference(caplog, tmp_path, monkeypatch):
    caplog.set_level(logging.INFO)
    messages.evaluation_started("runs/train/model.pt", [1, 2])
    messages.inference_started([1, 2, 3], "models/model.pt")
    monkeypatch.chdir(tmp_path)
    messages.inference_finished("masks")
    assert lines(caplog) == [
        "Evaluating the trained model runs/train/model.pt on 2 test cases",
        "Segmenting 3 images with the trained model models/model.pt",
        f"Label maps (0 background, 1..num_classes) written to {tmp_path / 'masks'}",
    ]
