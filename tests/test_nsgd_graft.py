"""NSGD and Graft against their direct formulas (float64), state_dict round trips, bad input."""
from __future__ import annotations

import copy
import math

import pytest
import torch

from engm_fast.optim import NSGD, Graft

TOL = dict(rtol=1e-10, atol=1e-12)


def _params(shapes=((3, 4), (4,), (2, 2, 3))):
    return [torch.nn.Parameter(torch.randn(s, dtype=torch.float64)) for s in shapes]


def _grads(params, steps):
    return [[torch.randn_like(p) for p in params] for _ in range(steps)]


def _nsgd_reference(start, grads, lr, mu, granularity):
    w = [p.detach().clone() for p in start]
    bufs = [None] * len(w)
    for gs in grads:
        if granularity == "global":
            gn = math.sqrt(sum(float(g.pow(2).sum()) for g in gs))
            ds = [g / gn for g in gs]
        else:
            ds = [g / float(g.norm()) if float(g.norm()) > 0 else torch.zeros_like(g) for g in gs]
        for i, d in enumerate(ds):
            bufs[i] = d.clone() if bufs[i] is None else mu * bufs[i] + d
            w[i] = w[i] - lr * bufs[i]
    return w


@pytest.mark.parametrize("granularity", ["layer", "global"])
@pytest.mark.parametrize("mu", [0.0, 0.8])
def test_nsgd_matches_formula(granularity, mu):
    params = _params()
    start = [p.detach().clone() for p in params]
    grads = _grads(params, 4)
    grads[2][1].zero_()  # a zero gradient in one tensor on one step
    opt = NSGD(params, lr=0.05, momentum=mu, granularity=granularity)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
    for p, r in zip(params, _nsgd_reference(start, grads, 0.05, mu, granularity)):
        torch.testing.assert_close(p.detach(), r, **TOL)


def test_nsgd_step_length_and_zero_gradient():
    params = _params()
    opt = NSGD(params, lr=0.3)
    before = [p.detach().clone() for p in params]
    for p in params:
        p.grad = 1e-8 * torch.randn_like(p)  # scale-free: a tiny gradient still moves lr
    params[0].grad.zero_()
    opt.step()
    assert torch.equal(params[0].detach(), before[0])  # zero gradient: unchanged, no NaN
    for p, b in zip(params[1:], before[1:]):
        assert abs(float((p.detach() - b).norm()) - 0.3) < 1e-12
    g_opt = NSGD(params, lr=0.3, granularity="global")
    for p in params:
        p.grad = torch.zeros_like(p)
    snap = [p.detach().clone() for p in params]
    g_opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, snap))


def test_nsgd_state_dict_round_trip_and_errors():
    params = _params()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    a, b = NSGD(params, lr=0.1, momentum=0.9), NSGD(twin, lr=0.5, momentum=0.5)
    grads = _grads(params, 3)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    a.step()
    for q, p in zip(twin, params):
        q.data.copy_(p.data)
    b.load_state_dict(copy.deepcopy(a.state_dict()))
    for gs in grads[1:]:
        for p, q, g in zip(params, twin, gs):
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        b.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, **TOL)
    with pytest.raises(ValueError, match="granularity"):
        NSGD(params, lr=0.1, granularity="model")
    with pytest.raises(ValueError, match="momentum"):
        NSGD(params, lr=0.1, momentum=1.0)
    with pytest.raises(ValueError, match="granularity"):
        NSGD(twin, lr=0.1, granularity="global").load_state_dict(a.state_dict())


def _adam_sgd_graft_reference(start, grads, granularity, lr_a=0.01, betas=(0.9, 0.999), eps=1e-8,
                              lr_s=0.5, mu=0.9):
    """Adam (magnitude) and SGD momentum (direction) written out, grafted."""
    w = [p.detach().clone() for p in start]
    m = [torch.zeros_like(p) for p in w]
    v = [torch.zeros_like(p) for p in w]
    buf = [None] * len(w)
    for t, gs in enumerate(grads, start=1):
        u_mag, u_dir = [], []
        for i, g in enumerate(gs):
            m[i] = betas[0] * m[i] + (1 - betas[0]) * g
            v[i] = betas[1] * v[i] + (1 - betas[1]) * g * g
            mhat, vhat = m[i] / (1 - betas[0] ** t), v[i] / (1 - betas[1] ** t)
            u_mag.append(-lr_a * mhat / (vhat.sqrt() + eps))
            buf[i] = g.clone() if buf[i] is None else mu * buf[i] + g
            u_dir.append(-lr_s * buf[i])
        if granularity == "layer":
            w = [wi + float(a.norm()) / float(d.norm()) * d for wi, a, d in zip(w, u_mag, u_dir)]
        else:
            na = math.sqrt(sum(float(a.pow(2).sum()) for a in u_mag))
            nd = math.sqrt(sum(float(d.pow(2).sum()) for d in u_dir))
            w = [wi + na / nd * d for wi, d in zip(w, u_dir)]
    return w, m, buf


def _graft(params, granularity="layer"):
    return Graft(params, magnitude=lambda ps: torch.optim.Adam(ps, lr=0.01),
                 direction=lambda ps: torch.optim.SGD(ps, lr=0.5, momentum=0.9), granularity=granularity)


@pytest.mark.parametrize("granularity", ["layer", "global"])
def test_graft_matches_formula(granularity):
    params = _params()
    start = [p.detach().clone() for p in params]
    grads = _grads(params, 4)
    opt = _graft(params, granularity)
    for gs in grads:
        for p, g in zip(params, gs):
            p.grad = g.clone()
        opt.step()
        for p, g in zip(params, gs):
            assert torch.equal(p.grad, g)  # the gradient the user sees is left as it was
    ref, m, buf = _adam_sgd_graft_reference(start, grads, granularity)
    for p, r in zip(params, ref):
        torch.testing.assert_close(p.detach(), r, **TOL)
    # each inner optimizer kept its own state from the same gradients
    for p, mi, bi in zip(params, m, buf):
        torch.testing.assert_close(opt.magnitude.state[p]["exp_avg"], mi, **TOL)
        torch.testing.assert_close(opt.direction.state[p]["momentum_buffer"], bi, **TOL)
    assert float(opt.magnitude.state[params[0]]["step"]) == 4.0


def test_ada_nsgda_step_has_adam_norm():
    w = torch.nn.Parameter(torch.tensor([1.0, -2.0, 0.5], dtype=torch.float64))
    opt = Graft([w], magnitude=lambda ps: torch.optim.Adam(ps, lr=0.1), direction=lambda ps: torch.optim.SGD(ps, lr=1.0))
    g = torch.tensor([1e-3, 4.0, -2.0], dtype=torch.float64)
    w.grad = g.clone()
    start = w.detach().clone()
    opt.step()
    # first Adam step: every coordinate moves lr * sign(g) (eps aside) -> norm lr*sqrt(3)
    adam_norm = 0.1 * math.sqrt(sum((abs(x) / (abs(x) + 1e-8)) ** 2 for x in g.tolist()))
    torch.testing.assert_close(w.detach(), start - adam_norm * g / g.norm(), **TOL)


def test_graft_zero_direction_leaves_tensor_and_state_dict_round_trip():
    params = _params()
    opt = _graft(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    snap = [p.detach().clone() for p in params]
    opt.step()
    assert all(torch.equal(p.detach(), s) for p, s in zip(params, snap))
    grads = _grads(params, 3)
    for p, g in zip(params, grads[0]):
        p.grad = g.clone()
    opt.step()
    twin = [torch.nn.Parameter(p.detach().clone()) for p in params]
    other = Graft(twin, magnitude=lambda ps: torch.optim.Adam(ps, lr=0.3),
                  direction=lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.1))
    other.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert other.magnitude.param_groups[0]["lr"] == 0.01 and other.direction.param_groups[0]["momentum"] == 0.9
    for gs in grads[1:]:
        for p, q, g in zip(params, twin, gs):
            p.grad, q.grad = g.clone(), g.clone()
        opt.step()
        other.step()
    for p, q in zip(params, twin):
        torch.testing.assert_close(p, q, **TOL)


def test_graft_bad_input():
    params = _params()
    with pytest.raises(TypeError, match="magnitude must be a factory"):
        Graft(params, magnitude=torch.optim.Adam(params), direction=lambda ps: torch.optim.SGD(ps, lr=1.0))
    with pytest.raises(TypeError, match="not a torch.optim.Optimizer"):
        Graft(params, magnitude=lambda ps: None, direction=lambda ps: torch.optim.SGD(ps, lr=1.0))
    with pytest.raises(ValueError, match="granularity"):
        Graft(params, torch.optim.Adam, torch.optim.Adam, granularity="tensor")
    with pytest.raises(ValueError, match="missing"):
        _graft(params).load_state_dict({"state": {}, "param_groups": []})
