"""GradientMonitor vs direct float64 computation from vmap per-example gradients."""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

import engm_fast
from engm_fast.at import GradientMonitor
from conftest import vmap_per_example_grads


def _setup(seed=0, B=9):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Conv2d(1, 3, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(3 * 16, 5)).double()
    x = torch.randn(B, 1, 4, 4, dtype=torch.float64)
    y = torch.randint(0, 5, (B,))
    return model, x, y


def _direct(model, x, y):
    per = vmap_per_example_grads(model, lambda run, xe, ye: F.cross_entropy(run(xe), ye), x, y)
    flat = torch.cat([g.reshape(g.shape[0], -1) for g in per.values()], dim=1)
    norms = flat.norm(dim=1)
    gbar = flat.mean(0)
    variance = float((flat - gbar).pow(2).sum(1).mean())  # the covariance trace, computed as such
    return norms, gbar, variance


def test_observe_grads_matches_direct():
    model, x, y = _setup()
    norms, gbar, variance = _direct(model, x, y)
    engine = engm_fast.attach(model)
    mon = GradientMonitor()
    mean = mon.observe_grads(engine.backward(F.cross_entropy(model(x), y, reduction="none")))
    s = mon.steps[0]
    assert s["grad_norm"] == pytest.approx(float(gbar.norm()), rel=1e-10)
    assert s["grad_sqnorm"] == pytest.approx(float(gbar.pow(2).sum()), rel=1e-10)
    assert s["norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-10)
    assert s["norm_max"] == pytest.approx(float(norms.max()), rel=1e-10)
    assert s["variance"] == pytest.approx(variance, rel=1e-8)
    # the returned mean gradient is what loss.mean().backward() gives (MSGD's gradient)
    ref = [g.clone() for g in torch.autograd.grad(F.cross_entropy(model(x), y), list(model.parameters()))]
    for p, r in zip(model.parameters(), ref):
        torch.testing.assert_close(mean[p], r, rtol=1e-10, atol=1e-12)


def test_observe_engm_matches_direct():
    model, x, y = _setup(seed=1)
    norms, gbar, variance = _direct(model, x, y)
    opt = engm_fast.ENGM(model, lr=0.1, track_variance=True)
    mon = GradientMonitor()
    got = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert mon.observe_engm(opt)
    s = mon.steps[0]
    assert s["grad_norm"] == pytest.approx(float(gbar.norm()), rel=1e-7)
    assert s["norm_mean"] == pytest.approx(float(norms.mean()), rel=1e-10)
    assert s["variance"] == pytest.approx(variance, rel=1e-8)


def test_observe_engm_requires_track_variance():
    model, x, y = _setup(seed=2)
    opt = engm_fast.ENGM(model, lr=0.1)
    got = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="track_variance=True"):
        GradientMonitor().observe_engm(opt)


def test_epoch_aggregation():
    mon = GradientMonitor()
    mon.observe(torch.tensor([1.0, 3.0]), 1.0)   # grad_norm 1, variance 5 - 1 = 4
    mon.observe(torch.tensor([2.0, 6.0]), 4.0)   # grad_norm 2, variance 20 - 4 = 16
    out = mon.end_epoch()
    assert out["grad_norm"] == 1.5 and out["grad_sqnorm"] == 2.5
    assert out["norm_mean"] == 3.0 and out["norm_max"] == 6.0
    assert out["variance"] == 10.0 and out["grad_norm_std"] == 0.5 and out["n_steps"] == 2
    assert mon.steps == [] and mon.history == [out]
    assert mon.end_epoch()["grad_norm"] is None  # an epoch with no observed step


def test_observe_rejects_bad_input():
    with pytest.raises(ValueError, match="norms"):
        GradientMonitor().observe(torch.zeros(2, 2), 1.0)
    with pytest.raises(ValueError, match="mean_grad_sqnorm"):
        GradientMonitor().observe(torch.ones(2), float("nan"))
