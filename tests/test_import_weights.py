import json
import re
import sys

import pytest
import torch
from authors_layout import authors_state as authors_layout_state
from bundle import HELP_LIMIT, command_env, run_command
from scripts.engine.weights import read_info, save_weights, sidecar
from scripts.import_weights import import_backbone, main
from scripts.networks.fpn3d import FPN3d, dhr_network
from scripts.networks.pretrained import extract_backbone_state, load_backbone
from scripts.utils.errors import BundleError


@pytest.fixture(scope="module")
def authors_state():
    """A state dict in the authors' layout (names and shapes written out in tests/authors_layout.py, not taken from
    FPN3d), of random values."""
    return authors_layout_state(1, 8, 3)


def _prefixed(prefix, state):
    return {prefix + k: v for k, v in state.items()}


def _bundle_checkpoint(state):
    network = dhr_network(8, 3)
    network.backbone.load_state_dict(state)
    return {"network": network.state_dict(), "optimizer": {"state": {}, "param_groups": []}, "trainer": {"epoch": 3}}


HEADS = {"proj_head.layers.0.weight": torch.zeros(2, 2), "rest_head.weight": torch.zeros(1, 8, 1, 1, 1)}
FORMS = {
    "plain": lambda s: s,
    "lightning": lambda s: {"state_dict": s, "epoch": 7},
    "backbone_prefix": lambda s: {**_prefixed("backbone.", s), **HEADS},
    "lightning_backbone_prefix": lambda s: {"state_dict": {**_prefixed("backbone.", s), **HEADS}},
    "data_parallel": lambda s: _prefixed("module.", s),
    "bundle_checkpoint": _bundle_checkpoint,
}


@pytest.mark.parametrize("form", FORMS)
def test_all_forms_load_strictly(form, authors_state, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(FORMS[form](authors_state), path)
    loaded = load_backbone(str(path), FPN3d(1, 8, 3)).state_dict()
    assert loaded.keys() == authors_state.keys()
    assert all(torch.equal(loaded[k], v) for k, v in authors_state.items())


def test_no_backbone_keys():
    with pytest.raises(ValueError, match="no FPN3d weights"):
        extract_backbone_state({"state_dict": HEADS})


@pytest.mark.parametrize(
    "base_channels, num_scales, problems",
    [(16, 4, "62 missing .* 134 shape-mismatched"), (8, 2, "62 unexpected .* 52 shape-mismatched")],
)
def test_wrong_architecture_names_the_file(base_channels, num_scales, problems, authors_state, tmp_path):
    path = tmp_path / "vox2vec.pt"
    torch.save(authors_state, path)
    with pytest.raises(ValueError, match=f"vox2vec.pt: weights do not fit .*{problems}.*--base_channels"):
        load_backbone(str(path), FPN3d(1, base_channels, num_scales))


def test_missing_file_names_the_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere.pt"):
        load_backbone(str(tmp_path / "nowhere.pt"), FPN3d(1, 8, 3))


def test_cli_infers_the_architecture_without_size_keys(authors_state, tmp_path, capsys):
    src, dst = tmp_path / "dhr.ckpt", tmp_path / "models" / "nested" / "backbone.pt"
    torch.save({"state_dict": {**_prefixed("backbone.", authors_state), **HEADS}}, src)
    main([str(src), str(dst), "--modality", "ct", "--patch_size", "16", "16", "8"])
    assert "saved 154 tensors (182,592 parameters) of FPN3d(1, 8, 3)" in capsys.readouterr().out
    saved = torch.load(dst, weights_only=True)
    assert saved.keys() == authors_state.keys()
    assert all(torch.equal(saved[k], v) for k, v in authors_state.items())
    assert read_info(dst) == {
        "kind": "backbone",
        "in_channels": 1,
        "base_channels": 8,
        "num_scales": 3,
        "modality": "ct",
        "patch_size": [16, 16, 8],
        "method": None,
    }
    assert json.loads(sidecar(dst).read_text()) == read_info(dst), "written as a sidecar, not inferred"


@pytest.mark.slow
def test_command_line_imports_and_refuses_with_one_line(authors_state, tmp_path):
    """The command line's smoke test: `python -m scripts.import_weights` imports, and a refusal is its last line."""
    src = tmp_path / "dhr.ckpt"
    torch.save({"state_dict": _prefixed("backbone.", authors_state)}, src)
    cli = [sys.executable, "-m", "scripts.import_weights", src]
    result = run_command([*cli, tmp_path / "backbone.pt"], timeout=HELP_LIMIT, env=command_env())
    assert result.returncode == 0, result.stderr
    assert "saved 154 tensors (182,592 parameters) of FPN3d(1, 8, 3)" in result.stdout
    result = run_command([*cli, tmp_path / "other.pt", "--num_scales", "5"], timeout=HELP_LIMIT, env=command_env())
    assert result.returncode == 1 and result.stderr.startswith("error: --num_scales 5 contradicts "), result.stderr


def test_given_size_that_contradicts_the_file_names_both_values(authors_state, tmp_path, capsys):
    src = tmp_path / "dhr.ckpt"
    torch.save(authors_state, src)
    with pytest.raises(SystemExit) as exit_info:
        main([str(src), str(tmp_path / "out.pt"), "--base_channels", "32"])
    assert exit_info.value.code == 1
    stderr = capsys.readouterr().err
    assert stderr.startswith("error: --base_channels 32 contradicts ") and "dhr.ckpt" in stderr
    assert "base_channels 8" in stderr
    assert not (tmp_path / "out.pt").exists()


def test_checkpoint_folder_gives_its_newest_checkpoint_and_run_identity(authors_state, tmp_path):
    folder = tmp_path / "run" / "checkpoints"
    folder.mkdir(parents=True)
    identity = {"modality": "ct_wide", "patch_size": [16, 16, 8], "method": "vox2vec", "seed": 0}
    for iteration in (2, 10):
        checkpoint = _bundle_checkpoint(
            {k: v + iteration if v.is_floating_point() else v for k, v in authors_state.items()}
        )
        torch.save({**checkpoint, "identity": identity}, folder / f"checkpoint_iteration={iteration}.pt")
    dst = tmp_path / "backbone.pt"
    info = import_backbone(tmp_path / "run", dst)  # the run folder: its checkpoints/ subfolder is searched
    assert info == {"kind": "backbone", "in_channels": 1, "base_channels": 8, "num_scales": 3} | {
        k: identity[k] for k in ("modality", "patch_size", "method")
    }
    saved = torch.load(dst, weights_only=True)
    assert torch.equal(saved["first_conv.weight"], authors_state["first_conv.weight"] + 10), "the newest checkpoint"
    with pytest.raises(BundleError, match="--modality 'ct' contradicts .*modality 'ct_wide'"):
        import_backbone(folder, tmp_path / "other.pt", modality="ct")


def test_empty_folder_is_named(tmp_path):
    with pytest.raises(BundleError, match=f"{tmp_path} holds no checkpoint_iteration=N.pt"):
        import_backbone(tmp_path, tmp_path / "out.pt")


BUNDLE_INFO = {"kind": "backbone", "in_channels": 1, "base_channels": 8, "num_scales": 3}
BUNDLE_INFO |= {"modality": "ct", "patch_size": [16, 16, 8], "method": "dhr"}


def test_a_bundle_backbone_keeps_its_sidecar_through_an_import(authors_state, tmp_path):
    src, dst = tmp_path / "pretrained_backbone.pt", tmp_path / "copy" / "backbone.pt"
    save_weights(authors_state, src, BUNDLE_INFO)
    assert import_backbone(src, dst, modality="ct") == BUNDLE_INFO  # a given value that agrees is accepted
    assert read_info(dst) == BUNDLE_INFO
    saved = torch.load(dst, weights_only=True)
    assert saved.keys() == authors_state.keys()
    assert all(torch.equal(saved[k], v) for k, v in authors_state.items())
    contradiction = f"--method 'vox2vec' contradicts {src} (method 'dhr' according to its sidecar {sidecar(src)})"
    with pytest.raises(BundleError, match=re.escape(contradiction)):
        import_backbone(src, tmp_path / "other.pt", method="vox2vec")


def test_the_source_and_its_sidecar_are_never_written_over(authors_state, tmp_path):
    src = tmp_path / "backbone.pt"
    save_weights(authors_state, src, BUNDLE_INFO)
    before = src.read_bytes(), sidecar(src).read_text()
    (tmp_path / "link.pt").symlink_to(src)
    for dst in (src, tmp_path / "link.pt", tmp_path / "backbone.pth"):  # itself, through a link, sharing its sidecar
        refusal = f"{dst} would overwrite the source {src} or its sidecar {sidecar(src)}"
        with pytest.raises(BundleError, match=re.escape(refusal)):
            import_backbone(src, dst)
    assert (src.read_bytes(), sidecar(src).read_text()) == before
    assert not (tmp_path / "backbone.pth").exists()
