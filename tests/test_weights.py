"""Weight files with sidecars, and what a plain state dict tells by its shapes."""

import json

import torch

from scripts.networks import FPN3d
from scripts.weights import read_info, save_weights, sidecar


def test_sidecar_travels_with_the_weights(tmp_path):
    state = FPN3d(1, 4, 3).state_dict()
    info = {"kind": "backbone", "in_channels": 1, "base_channels": 4, "num_scales": 3, "modality": "ct"}
    save_weights(state, tmp_path / "b.pt", info)
    assert json.loads(sidecar(tmp_path / "b.pt").read_text()) == info
    assert read_info(tmp_path / "b.pt") == info
    loaded = torch.load(tmp_path / "b.pt", weights_only=True)  # still a plain state dict
    FPN3d(1, 4, 3).load_state_dict(loaded, strict=True)
    assert not list(tmp_path.glob("*.partial"))


def test_plain_and_wrapped_state_dicts_are_described_by_their_shapes(tmp_path):
    state = FPN3d(1, 8, 4).state_dict()
    for name, content in {
        "plain": state,
        "lightning": {"state_dict": {f"backbone.{k}": v for k, v in state.items()}},
    }.items():
        torch.save(content, tmp_path / f"{name}.pt")
        assert read_info(tmp_path / f"{name}.pt") == {"in_channels": 1, "base_channels": 8, "num_scales": 4}
