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


def test_dice_bce_is_per_class_sigmoid_dice_plus_bce():
    from monai.losses import DiceLoss
    from scripts.networks.segmentation import DiceBCELoss

    torch.manual_seed(0)
    logits = torch.randn(2, 3, 4, 4, 2)
    target = (torch.rand(2, 3, 4, 4, 2) > 0.5).float()
    expected = DiceLoss(sigmoid=True)(logits, target) + F.binary_cross_entropy_with_logits(logits, target)
    torch.testing.assert_close(DiceBCELoss()(logits, target), expected)
    confident = DiceBCELoss()(20 * (2 * target - 1), target)
    assert confident < 0.01
