import math

import pytest
import torch
import torch.nn.functional as F
from ignite.engine import Engine
from scripts.ssl.losses import HybridLoss, info_nce, loss_and_terms, loss_term_metrics


def naive_info_nce(z1, z2, temperature):
    """NT-Xent written out anchor by anchor."""
    z = torch.cat([z1, z2]).double()
    m = len(z1)
    losses = []
    for i in range(2 * m):
        partner = (i + m) % (2 * m)
        sims = [float(z[i] @ z[j]) / temperature for j in range(2 * m) if j != i]
        losses.append(-float(z[i] @ z[partner]) / temperature + math.log(sum(math.exp(s) for s in sims)))
    return sum(losses) / len(losses)


@pytest.mark.parametrize("m,d", [(1, 4), (5, 8), (17, 3)])
def test_info_nce_equals_naive_reference(m, d):
    torch.manual_seed(m)
    z1, z2 = F.normalize(torch.randn(m, d), dim=1), F.normalize(torch.randn(m, d), dim=1)
    assert info_nce(z1, z2, 0.1).item() == pytest.approx(naive_info_nce(z1, z2, 0.1), rel=1e-5)


def test_info_nce_prefers_aligned_pairs_and_has_finite_gradients():
    torch.manual_seed(0)
    z1 = F.normalize(torch.randn(64, 16), dim=1).requires_grad_()
    noisy = F.normalize(z1.detach() + 0.05 * torch.randn(64, 16), dim=1)
    random = F.normalize(torch.randn(64, 16), dim=1)
    aligned_loss = info_nce(z1, noisy)
    assert aligned_loss < info_nce(z1.detach(), random)
    aligned_loss.backward()
    assert torch.isfinite(z1.grad).all()


def batch(pairs=3, k=5, d=8, size=(4, 4, 2), seed=0):
    g = torch.Generator().manual_seed(seed)
    pred = {
        "embeddings": F.normalize(torch.randn(2 * pairs, k, d, generator=g), dim=-1),
        "restoration": torch.rand(2 * pairs, 1, *size, generator=g),
    }
    valid = torch.rand(pairs, k, generator=g) > 0.3
    valid[:, 0] = True
    target = {"valid": valid, "clean": torch.rand(2 * pairs, 1, *size, generator=g)}
    return pred, target


def test_hybrid_loss_combines_and_records_terms():
    pred, target = batch()
    loss = HybridLoss(temperature=0.1, restoration_weight=10.0)
    total = loss(pred, target)
    p = target["valid"].shape[0]
    e = pred["embeddings"]
    infonce = info_nce(e[:p][target["valid"]], e[p:][target["valid"]], 0.1)
    mse = F.mse_loss(pred["restoration"], target["clean"])
    torch.testing.assert_close(total, infonce + 10 * mse)
    assert set(loss.terms) == {"infonce", "restoration"}
    torch.testing.assert_close(loss.terms["restoration"], mse)


def test_hybrid_loss_ignores_invalid_slots():
    pred, target = batch()
    loss = HybridLoss()
    reference = loss(pred, target)
    changed = {**pred, "embeddings": pred["embeddings"].clone()}
    invalid = ~target["valid"]
    changed["embeddings"][:3][invalid] = F.normalize(torch.ones(int(invalid.sum()), 8), dim=-1)
    torch.testing.assert_close(loss(changed, target), reference)


def test_restoration_weight_zero_is_contrastive_only():
    pred, target = batch()
    loss = HybridLoss(restoration_weight=0)
    del pred["restoration"]
    loss(pred, target)
    assert loss.term_names == ["infonce"] and set(loss.terms) == {"infonce"}
    with pytest.raises(ValueError, match="restoration head"):
        HybridLoss(restoration_weight=1.0)(pred, target)


def test_term_metrics_average_over_an_epoch_and_logging_transform():
    loss = HybridLoss()
    values = []

    def step(engine, seed):
        pred, target = batch(seed=seed)
        out = {"loss": loss(pred, target)}
        values.append(loss.terms["infonce"].item())
        return out

    engine = Engine(step)
    for name, metric in loss_term_metrics(loss).items():
        metric.attach(engine, name)
    engine.run([1, 2, 3, 4], max_epochs=1)
    assert engine.state.metrics["infonce"] == pytest.approx(sum(values) / 4, rel=1e-6)
    logged = loss_and_terms(loss)(engine.state.output)
    assert set(logged) == {"loss", "infonce", "restoration"} and all(isinstance(v, float) for v in logged.values())


def test_dice_bce_is_per_class_sigmoid_soft_dice_plus_bce_by_hand():
    """Values computed by hand from the definitions (REFERENCE.md: per-class sigmoid, BCE + soft Dice): soft Dice
    1 - 2 sum(p t) / (sum(p) + sum(t)) per class, averaged; BCE averaged over every voxel and class."""
    from scripts.networks.segmentation import DiceBCELoss

    log3 = math.log(3)  # sigmoid(log 3) = 3/4
    # one case, 2 classes, 4 voxels: class 1 predicted 3/4 where labelled, 1/4 elsewhere; class 2 unsure (1/2)
    logits = torch.tensor([[log3, log3, -log3, -log3], [0.0, 0.0, 0.0, 0.0]]).reshape(1, 2, 4, 1, 1)
    target = torch.tensor([[1.0, 1, 0, 0], [1, 0, 0, 0]]).reshape(1, 2, 4, 1, 1)
    dice = (1 - 2 * 1.5 / (2 + 2), 1 - 2 * 0.5 / (2 + 1))  # 1/4 and 2/3
    bce = (-math.log(3 / 4), math.log(2))  # the same for each of the class's voxels
    expected = sum(dice) / 2 + sum(bce) / 2
    assert expected == pytest.approx(11 / 24 + (math.log(4 / 3) + math.log(2)) / 2)
    assert DiceBCELoss()(logits, target).item() == pytest.approx(expected, abs=1e-4)  # MONAI's 1e-5 smoothing
    # nothing known (all logits 0) about half-labelled classes: Dice 1/2, BCE log 2
    half = (torch.arange(8) % 2).float().reshape(1, 1, 8, 1, 1).repeat(2, 3, 1, 1, 1)
    assert DiceBCELoss()(torch.zeros_like(half), half).item() == pytest.approx(0.5 + math.log(2), abs=1e-4)


def test_dice_bce_scores_each_class_on_its_own():
    """Sigmoid per class, not softmax across classes: overlapping classes can both be certain, and a 2-class loss is
    the mean of the two 1-class losses."""
    from scripts.networks.segmentation import DiceBCELoss

    both = torch.ones(1, 2, 4, 2, 2)  # every voxel in both classes
    assert DiceBCELoss()(torch.full_like(both, 20.0), both).item() < 1e-4  # a softmax would give each class 1/2
    torch.manual_seed(0)
    logits, target = torch.randn(2, 2, 4, 4, 2), (torch.rand(2, 2, 4, 4, 2) > 0.5).float()
    per_class = [DiceBCELoss()(logits[:, [c]], target[:, [c]]) for c in range(2)]
    torch.testing.assert_close(DiceBCELoss()(logits, target), sum(per_class) / 2)
    assert DiceBCELoss()(20 * (2 * target - 1), target) < 0.01, "confident and right: near 0"
