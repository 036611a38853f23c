"""DHR on MONAI's U-shaped networks (`backbone: segresnet | dynunet | unet`): decoder levels, alignment, a falling loss,
the export that the Model Zoo's bundles load, the downstream workflows, and the refusals of unfit arguments."""

import json

import numpy as np
import pytest
import torch
from bundle import PRETRAIN_TINY, run_workflow
from monai.networks.nets import SegResNet, UNet
from scripts.networks.backbones import MonaiBackbone, check_backbone, describe
from scripts.networks.fpn3d import dhr_network
from scripts.ssl.batch import SSLBatch
from scripts.ssl.losses import HybridLoss
from scripts.ssl.sampler import VoxelPairSamplerd
from scripts.utils.errors import BundleError
from test_pretrain_bundle import write_volumes
from test_sampler import network_batch
from test_train_bundle import LINEAR, TRAIN, write_cases

# Tiny arguments of each network: three levels, on 16 x 16 x 8 patches.
TINY_ARGS = {
    "segresnet": {"init_filters": 8, "blocks_down": [1, 1, 1], "blocks_up": [1, 1]},
    "dynunet": {"kernel_size": [3, 3, 3], "strides": [1, 2, 2], "upsample_kernel_size": [2, 2], "filters": [4, 8, 16]},
    "unet": {"channels": [4, 8, 16], "strides": [2, 2], "num_res_units": 1},
}
# The networks as the Model Zoo's bundles build them (their configs' network_def): wholeBody_ct_segmentation's SegResNet
# and spleen_ct_segmentation's UNet.
ZOO = {
    "segresnet": (
        SegResNet,
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 105,
            "init_filters": 32,
            "blocks_down": [1, 2, 2, 4],
            "blocks_up": [1, 1, 1],
            "dropout_prob": 0.2,
        },
        [16, 16, 8],  # its coarsest level has stride 8
    ),
    "unet": (
        UNet,
        {
            "spatial_dims": 3,
            "in_channels": 1,
            "out_channels": 2,
            "channels": [16, 32, 64, 128, 256],
            "strides": [2, 2, 2, 2],
            "num_res_units": 2,
            "norm": "batch",
        },
        [16, 16, 16],  # stride 16
    ),
}


@pytest.mark.parametrize("name", TINY_ARGS)
def test_decoder_levels_have_the_strides_the_projection_reads(name):
    backbone = MonaiBackbone(name, TINY_ARGS[name])
    pyramid = backbone(torch.rand(2, 1, 16, 16, 8))
    strides = [2 ** (backbone.first_shift + i) for i in range(len(pyramid))]
    assert [tuple(p.shape) for p in pyramid] == [
        (2, c, 16 // s, 16 // s, 8 // s) for c, s in zip(backbone.out_channels, strides, strict=True)
    ]


@pytest.mark.parametrize("name", TINY_ARGS)
def test_identical_boxes_give_identical_embeddings_at_matched_voxels(name):
    """test_sampler's alignment test, for each network: a volume of the patch's size holds one box only, so both
    views of every pair are that box."""
    torch.manual_seed(0)
    patch = (16, 16, 8)  # the networks need sides divisible by their coarsest stride
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, s) for s in patch], indexing="ij"))
    data = {"image": torch.rand(1, *patch), "body": torch.from_numpy((grid**2).sum(0) < 0.8)[None]}
    sampler = VoxelPairSamplerd(patch, num_pairs=3, voxels_per_pair=64)
    sampler.set_random_state(0)
    out = sampler(data)
    assert torch.equal(out["view1"], out["view2"])
    inputs, valid, kwargs = network_batch(out)
    network = dhr_network(projection_width=4, embedding_dim=8, backbone=name, backbone_args=TINY_ARGS[name]).eval()
    with torch.no_grad():
        embeddings = network(inputs, **kwargs)["embeddings"]
    assert valid.any()
    torch.testing.assert_close(embeddings[:3][valid], embeddings[3:][valid])


@pytest.mark.parametrize("width", [4, "raw"])
@pytest.mark.parametrize("name", TINY_ARGS)
def test_hybrid_loss_falls_on_a_fixed_batch(name, width):
    """DHR (projections to 4 per level) and vox2vec's raw concatenation, a few Adam steps on one batch."""
    torch.manual_seed(0)
    network = dhr_network(projection_width=width, backbone=name, backbone_args=TINY_ARGS[name])
    views = torch.rand(2, 1, 2, 1, 16, 16, 8)
    voxels = torch.stack([torch.randint(0, s, (2, 1, 2, 24)) for s in (16, 16, 8)], dim=-1)
    batch = {"view1": views[0], "view2": views[1], "voxels1": voxels[0], "voxels2": voxels[1]}
    batch["valid"] = torch.ones(1, 2, 24, dtype=torch.bool)
    inputs, targets, _, kwargs = SSLBatch()(batch, torch.device("cpu"))
    loss_fn = HybridLoss()
    optimizer = torch.optim.Adam(network.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = loss_fn(network(inputs, **kwargs), targets)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(map(torch.isfinite, torch.tensor(losses))) and losses[-1] < losses[0], losses
    # DistributedDataParallel (find_unused_parameters off) waits for a gradient of every trainable parameter
    assert all(p.grad is not None for p in network.parameters() if p.requires_grad)


def _pretrain(tmp_path, name, args, patch_size, **keys):
    write_volumes(tmp_path / "data")
    paths = {"dataset_dir": tmp_path / "data", "output_dir": tmp_path / "out", "cache_dir": tmp_path / "cache"}
    settings = {**PRETRAIN_TINY, "patch_size": patch_size, "epochs": 1, "epoch_length": 2, **paths, **keys}
    run_workflow(
        "pretrain", "configs/pretrain.yaml", bundle_root=tmp_path, backbone=name, backbone_args=args, **settings
    )
    return tmp_path / "out/pretrained_backbone.pt"


@pytest.mark.parametrize("name", ZOO)
def test_exported_backbone_loads_strictly_into_the_zoo_bundles_network(tmp_path, name):
    cls, zoo_args, patch_size = ZOO[name]
    args = {k: v for k, v in zoo_args.items() if k not in ("spatial_dims", "in_channels")}
    backbone = _pretrain(tmp_path, name, args, patch_size)
    info = json.loads(backbone.with_suffix(".json").read_text())
    assert info["class"] == f"monai.networks.nets.{cls.__name__}" and info["backbone"] == name
    assert info["backbone_args"] == zoo_args and info["patch_size"] == patch_size
    state = torch.load(backbone, weights_only=True)
    cls(**info["backbone_args"]).load_state_dict(state, strict=True)  # what the sidecar names: class and arguments
    zoo = cls(**zoo_args)  # as the bundle's network_def builds it
    zoo.load_state_dict(state, strict=True)
    assert all(torch.equal(zoo.state_dict()[k], v) for k, v in state.items())


def _downstream(tmp_path, backbone):
    """Linear evaluation, fine-tuning and the fine-tuned model's evaluation from `backbone`, architecture from its
    sidecar; returns the two models' sidecars."""
    write_cases(tmp_path / "cases")
    keys = {k: v for k, v in TRAIN.items() if k not in ("base_channels", "num_scales", "patch_size")}
    keys |= {"dataset_dir": tmp_path / "cases", "pretrained_ckpt": backbone, "bundle_root": tmp_path, "epochs": 1}
    run_workflow("run", LINEAR, output_dir=tmp_path / "linear", **keys)
    run_workflow("run", "configs/train.yaml", output_dir=tmp_path / "finetune", warmup_epochs=0, **keys)
    run_workflow("evaluate", ["configs/train.yaml", "configs/evaluate.yaml"], output_dir=tmp_path / "finetune", **keys)
    summary = json.loads((tmp_path / "finetune/evaluation/summary.json").read_text())
    assert 0.0 <= summary["mean_dice"] <= 1.0
    masks = {"dataset_dir": tmp_path / "cases/imagesTr", "output_dir": tmp_path / "masks", "num_workers": 0}
    model = tmp_path / "finetune/model.pt"
    run_workflow("run", "configs/inference.json", bundle_root=tmp_path, model_file=model, **masks)
    assert len(list((tmp_path / "masks").glob("*_seg.nii.gz"))) == 5
    return [json.loads((tmp_path / f"{m}/model.json").read_text()) for m in ("linear", "finetune")]


@pytest.mark.parametrize("name", TINY_ARGS)
def test_pretrained_network_goes_through_linear_evaluation_fine_tuning_evaluation_and_inference(tmp_path, name):
    """Each run takes the architecture from the backbone's sidecar: no key repeated."""
    backbone = _pretrain(tmp_path, name, TINY_ARGS[name], [16, 16, 8])
    linear, finetune = _downstream(tmp_path, backbone)
    assert (linear["head"], finetune["head"]) == ("linear", "own")
    assert linear["backbone"] == finetune["backbone"] == name
    assert finetune["backbone_args"] == json.loads(backbone.with_suffix(".json").read_text())["backbone_args"]


@pytest.mark.parametrize(
    ("name", "args", "patch", "message"),
    [
        ("vit", {}, [16, 16, 8], "backbone='vit': give one of fpn3d, segresnet, dynunet, unet"),
        ("segresnet", {"blocks_up": [1]}, [16, 16, 8], "give e.g. blocks_up=[1, 1, 1]"),
        ("unet", {"strides": [2, 1, 2, 2]}, [16, 16, 16], "give strides=[2, 2, 2, 2]"),
        ("dynunet", {"strides": [2, 2, 2, 2, 2]}, [16, 16, 16], "give strides=[1, 2, 2, 2, 2]"),
        ("segresnet", {}, [21, 16, 6], "every side must be a multiple of 8; give --patch_size [24,16,8]"),
        ("unet", {"chanels": [4, 8]}, [16, 16, 16], "backbone_args ['chanels']: not arguments of"),
        ("fpn3d", {"init_filters": 8}, [16, 16, 8], "FPN3d takes --base_channels and --num_scales"),
    ],
)
def test_unfit_backbones_are_refused_naming_the_key_and_a_valid_value(name, args, patch, message):
    with pytest.raises(BundleError) as error:
        check_backbone(name, args, patch)
    assert message in str(error.value)


def test_pretraining_refuses_an_unfit_patch_before_any_work(tmp_path):
    run = run_workflow(
        "pretrain",
        "configs/pretrain.yaml",
        fails=True,
        bundle_root=tmp_path,
        backbone="unet",
        output_dir=tmp_path / "out",
        **{**PRETRAIN_TINY, "patch_size": [16, 16, 8]},
    )
    assert "patch_size [16, 16, 8] does not fit unet" in run.message and "--patch_size [16,16,16]" in run.message
    assert not (tmp_path / "out/run.json").exists()
    assert not (tmp_path / "data").exists()  # not even the demo data was prepared


@pytest.mark.parametrize("name", TINY_ARGS)
def test_fine_tuning_warm_up_freezes_all_but_the_networks_own_output_layer(name):
    from scripts.networks.segmentation import segmentation_network

    network = segmentation_network(3, backbone=name, backbone_args=TINY_ARGS[name])
    network.freeze_backbone(True)
    network.train()
    output = {id(p) for layer in network.backbone.output_layers() for p in layer.parameters()}
    assert output and all(p.requires_grad == (id(p) in output) for p in network.parameters())
    inside = {id(m) for layer in network.backbone.output_layers() for m in layer.modules()}
    modes = {id(m): m.training for m in network.backbone.network.modules()}
    assert all(modes[i] for i in inside) and not any(t for i, t in modes.items() if i not in inside)  # normalisation
    assert network(torch.rand(1, 1, 16, 16, 8)).shape == (1, 3, 16, 16, 8)


def test_scratch_reference_of_a_study_is_the_first_backbones_monai_network(tmp_path):
    from scripts.engine.weights import save_weights
    from scripts.tools.study import scratch_args

    backbone = MonaiBackbone("segresnet", TINY_ARGS["segresnet"])
    info = {"kind": "backbone", **describe(backbone)}
    save_weights(backbone.network.state_dict(), tmp_path / "b.pt", info | {"patch_size": [16, 16, 8]})
    args = scratch_args(str(tmp_path / "b.pt"), [])
    assert args[args.index("--backbone") + 1] == "segresnet"
    assert json.loads(args[args.index("--backbone_args") + 1]) == backbone.args
