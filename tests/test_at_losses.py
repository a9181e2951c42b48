"""AT losses: per-example vectors vs float64 hand computations, attacks' budget and effect, ENGM plug-in."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engm_fast
from engm_fast.at import (
    adversarial_losses,
    kl_per_example,
    mart_losses,
    pgd_at_losses,
    trades_attack,
    trades_losses,
)


def _data(n=48, seed=0):
    g = torch.Generator().manual_seed(seed)
    protos = torch.rand(10, 1, 8, 8, generator=g)
    y = torch.arange(n) % 10
    x = (protos[y] + 0.15 * torch.randn(n, 1, 8, 8, generator=g)).clamp(0.0, 1.0)
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN trained to high clean accuracy (so attacks have something to break)."""
    torch.manual_seed(0)
    x, y = _data()
    model = nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(256, 32), nn.ReLU(),
                          nn.Linear(32, 10))
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(120):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    model.zero_grad(set_to_none=True)
    return model, x, y


def _hand_softmax(z):  # one row, float64, from the definition
    m = max(z)
    e = [math.exp(v - m) for v in z]
    s = sum(e)
    return [v / s for v in e]


def _rand_logits(B=7, C=5, seed=1):
    g = torch.Generator().manual_seed(seed)
    return (3 * torch.randn(B, C, generator=g, dtype=torch.float64),
            3 * torch.randn(B, C, generator=g, dtype=torch.float64),
            torch.randint(0, C, (B,), generator=g))


def test_pgd_and_trades_losses_match_hand_computation():
    zc, za, y = _rand_logits()
    beta = 2.5
    got_pgd = pgd_at_losses(za, y)
    got_trades = trades_losses(zc, za, y, beta=beta)
    for i in range(zc.shape[0]):
        p, q = _hand_softmax(zc[i].tolist()), _hand_softmax(za[i].tolist())
        ce_adv = -math.log(q[int(y[i])])
        ce_clean = -math.log(p[int(y[i])])
        kl = sum(pc * (math.log(pc) - math.log(qc)) for pc, qc in zip(p, q))
        assert abs(float(got_pgd[i]) - ce_adv) < 1e-12
        assert abs(float(got_trades[i]) - (ce_clean + beta * kl)) < 1e-12
        assert abs(float(kl_per_example(zc, za)[i]) - kl) < 1e-12


def test_trades_batch_mean_is_the_authors_scalar():
    zc, za, y = _rand_logits(B=9)
    B, beta = zc.shape[0], 6.0
    kl_sum = nn.KLDivLoss(reduction="sum")(F.log_softmax(za, dim=1), F.softmax(zc, dim=1))
    scalar = F.cross_entropy(zc, y) + beta * kl_sum / B
    assert torch.allclose(trades_losses(zc, za, y, beta).mean(), scalar, rtol=0, atol=1e-12)


def test_mart_loss_matches_hand_computation_and_authors_scalar():
    zc, za, y = _rand_logits(B=8, C=6, seed=3)
    beta = 6.0
    got = mart_losses(zc, za, y, beta=beta)
    for i in range(zc.shape[0]):
        p, q = _hand_softmax(zc[i].tolist()), _hand_softmax(za[i].tolist())
        yi = int(y[i])
        wrong = max((q[c], c) for c in range(len(q)) if c != yi)[1]  # most likely wrong class
        bce = -math.log(q[yi]) - math.log(1.0001 - q[wrong] + 1e-12)
        kl = sum(pc * (math.log(pc) - math.log(qc + 1e-12)) for pc, qc in zip(p, q))
        want = bce + beta * kl * (1.0000001 - p[yi])
        assert abs(float(got[i]) - want) < 1e-10, (i, float(got[i]), want)
    # the authors' batch formula (their mart_loss), computed on the batch
    adv_probs = F.softmax(za, dim=1)
    tmp1 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(tmp1[:, -1] == y, tmp1[:, -2], tmp1[:, -1])
    loss_adv = F.cross_entropy(za, y) + F.nll_loss(torch.log(1.0001 - adv_probs + 1e-12), new_y)
    nat_probs = F.softmax(zc, dim=1)
    true_probs = torch.gather(nat_probs, 1, y.unsqueeze(1)).squeeze()
    kl = nn.KLDivLoss(reduction="none")(torch.log(adv_probs + 1e-12), nat_probs).sum(1)
    scalar = loss_adv + beta * (kl * (1.0000001 - true_probs)).sum() / zc.shape[0]
    assert torch.allclose(got.mean(), scalar, rtol=0, atol=1e-12)


@pytest.mark.parametrize("method", ["pgd", "trades", "mart"])
@pytest.mark.parametrize("norm,eps", [("linf", 0.1), ("l2", 0.5)])
def test_attack_within_budget_and_loss_above_clean(trained, method, norm, eps):
    model, x, y = trained
    g = torch.Generator().manual_seed(0)
    out = adversarial_losses(model, x, y, method, eps=eps, alpha=2.5 * eps / 10, steps=10, norm=norm, generator=g)
    d = (out.x_adv - x).flatten(1)
    size = d.abs().max(1).values if norm == "linf" else d.norm(dim=1)
    assert float(size.max()) <= eps + 1e-5
    assert float(out.x_adv.min()) >= 0.0 and float(out.x_adv.max()) <= 1.0
    with torch.no_grad():
        if method == "pgd":
            clean = pgd_at_losses(model(x), y)
        elif method == "trades":
            clean = trades_losses(model(x), model(x), y)
        else:
            clean = mart_losses(model(x), model(x), y)
    adv = out.losses.detach()
    assert adv.shape == (x.shape[0],)
    # per example, and on average by a clear factor (the trained model is very confident)
    assert float((adv > clean).float().mean()) >= 0.9
    assert float(adv.mean()) > 2.0 * float(clean.mean())
    # the returned losses are the method's loss at the returned x_adv (with graph for the step)
    assert out.losses.requires_grad


def test_trades_attack_increases_kl_and_stays_in_budget(trained):
    model, x, _ = trained
    g = torch.Generator().manual_seed(1)
    x_adv, gn = trades_attack(model, x, eps=0.1, alpha=0.025, steps=10, return_input_grad_norms=True, generator=g)
    assert float((x_adv - x).abs().max()) <= 0.1 + 1e-6
    with torch.no_grad():
        kl_adv = kl_per_example(model(x), model(x_adv))
        kl_noise = kl_per_example(model(x), model((x + 0.001 * torch.randn_like(x)).clamp(0, 1)))
    assert float(kl_adv.mean()) > 10 * float(kl_noise.mean()) + 1e-3
    assert gn.shape == (x.shape[0],) and bool((gn > 0).all())
    assert all(p.grad is None for p in model.parameters())


def test_losses_plug_into_engm_backward(trained):
    """With power 0 (no reweighting) ENGM's gradient equals the mean loss's, for a two-call TRADES loss."""
    model, x, y = trained
    import copy

    m1, m2 = copy.deepcopy(model), copy.deepcopy(model)
    opt = engm_fast.ENGM(m1, lr=0.1, weighting="power", power=0.0, eps=1e-6)
    g = torch.Generator().manual_seed(2)
    out = adversarial_losses(m1, x[:16], y[:16], "trades", eps=0.1, alpha=0.025, steps=3, generator=g)
    opt.zero_grad()
    opt.backward(out.losses)
    losses2 = trades_losses(m2(x[:16]), m2(out.x_adv), y[:16])
    losses2.mean().backward()
    for p1, p2 in zip(m1.parameters(), m2.parameters()):
        assert torch.allclose(p1.grad, p2.grad, rtol=1e-4, atol=1e-6)


def test_bad_inputs_name_the_argument(trained):
    model, x, y = trained
    with pytest.raises(ValueError, match="unknown method 'fgsm'"):
        adversarial_losses(model, x, y, "fgsm")
    with pytest.raises(ValueError, match="beta must be"):
        trades_losses(model(x), model(x), y, beta=-1.0)
    with pytest.raises(ValueError, match="steps must be an integer"):
        trades_attack(model, x, eps=0.1, alpha=0.01, steps=0)
    with pytest.raises(ValueError, match="kl_per_example"):
        kl_per_example(torch.zeros(2, 3), torch.zeros(2, 4))


def test_float64_losses_resolve_the_gradient_of_fitted_examples():
    """An example fitted to a loss of ~4e-9: in float32, p_y rounds to 1 and the true-class
    component of softmax - onehot is lost; with loss_dtype=float64 the gradient w.r.t. the
    (float32) logits matches the float64 reference."""
    from engm_fast.at.losses import outer_losses

    class Fixed(nn.Module):  # returns its input as logits, so the logits' gradient is the input's
        def forward(self, x):
            return x

    logits = torch.tensor([[20.0, 0.0, 0.0]], requires_grad=True)
    y = torch.tensor([0])
    ref = torch.softmax(logits.detach().double(), 1) - F.one_hot(y, 3).double()
    grads = {}
    for dtype in (None, torch.float64):
        losses, _ = outer_losses(Fixed(), logits, logits, y, "pgd", loss_dtype=dtype)
        (g,) = torch.autograd.grad(losses.sum(), logits)
        assert g.dtype == torch.float32
        grads[dtype] = g.double()
    rel = {k: float((g - ref).norm() / ref.norm()) for k, g in grads.items()}
    assert rel[torch.float64] < 1e-6 < 0.1 < rel[None]


@pytest.mark.parametrize("method", ["trades", "mart"])
def test_kl_gradient_is_finite_where_the_clean_softmax_underflows(method):
    """A clean logit gap of 200 underflows softmax to exact zeros in float32; the KL's gradient
    with respect to the clean logits must stay finite (it was NaN with a probability target)."""
    from engm_fast.at.losses import mart_losses, trades_losses

    clean = torch.tensor([[100.0, -100.0, 0.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 0.0, 0.5]], requires_grad=True)
    y = torch.tensor([0])
    loss = (trades_losses if method == "trades" else mart_losses)(clean, adv, y, 6.0)
    g_clean, g_adv = torch.autograd.grad(loss.sum(), (clean, adv))
    assert bool(torch.isfinite(loss).all() & torch.isfinite(g_clean).all() & torch.isfinite(g_adv).all())
    # the same value and gradient as float64 with the probability-target formula (no underflow there)
    c64, a64 = clean.detach().double().requires_grad_(), adv.detach().double().requires_grad_()
    ref = (trades_losses if method == "trades" else mart_losses)(c64, a64, y, 6.0)
    r_clean, r_adv = torch.autograd.grad(ref.sum(), (c64, a64))
    torch.testing.assert_close(loss.double(), ref.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g_clean.double(), r_clean, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(g_adv.double(), r_adv, rtol=1e-4, atol=1e-5)
