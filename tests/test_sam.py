"""SAM / ASAM against a hand-written float64 reference; delta-SAM weights computed by hand."""
from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from engm_fast.optim import SAM, DeltaSAM, frozen_bn_stats, softmax_example_weights

TOL = dict(rtol=1e-10, atol=1e-12)


def _mlp():
    return nn.Sequential(nn.Linear(3, 5), nn.Tanh(), nn.Linear(5, 2)).double()


def _data(n=7):
    return torch.randn(n, 3, dtype=torch.float64), torch.randint(0, 2, (n,))


def _flat_grad(model, params, x, y):
    params = {n: v.detach().requires_grad_(True) for n, v in params.items()}
    loss = F.cross_entropy(torch.func.functional_call(model, params, (x,)), y)
    return torch.autograd.grad(loss, list(params.values()))


def _reference_sam(model, x, y, steps, rho, lr, mom, adaptive):
    """Plain-tensor SAM with SGD momentum (torch.optim.SGD's first-step buffer = d)."""
    w = {n: p.detach().clone() for n, p in model.named_parameters()}
    bufs = {}
    for _ in range(steps):
        g = dict(zip(w, _flat_grad(model, w, x, y)))
        t = {n: (w[n].abs() if adaptive else torch.ones_like(w[n])) for n in w}
        norm = math.sqrt(sum(float((t[n] * g[n]).pow(2).sum()) for n in w))
        e = {n: rho * t[n] ** 2 * g[n] / norm for n in w}
        g2 = dict(zip(w, _flat_grad(model, {n: w[n] + e[n] for n in w}, x, y)))
        for n in w:
            bufs[n] = g2[n].clone() if n not in bufs else mom * bufs[n] + g2[n]
            w[n] = w[n] - lr * bufs[n]
    return w


@pytest.mark.parametrize("adaptive", [False, True])
def test_sam_matches_reference(adaptive):
    model = _mlp()
    x, y = _data()
    ref = _reference_sam(copy.deepcopy(model), x, y, steps=3, rho=0.1, lr=0.2, mom=0.9, adaptive=adaptive)
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.1, adaptive=adaptive, lr=0.2, momentum=0.9)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    for _ in range(3):
        opt.step(closure)
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), ref[n], **TOL)


def test_explicit_api_equals_closure_and_group_rho():
    model = _mlp()
    x, y = _data()
    twin = copy.deepcopy(model)
    groups = lambda m: [{"params": m[0].parameters(), "rho": 0.3}, {"params": m[2].parameters()}]
    a = SAM(groups(model), torch.optim.SGD, rho=0.05, lr=0.1)
    b = SAM(groups(twin), torch.optim.SGD, rho=0.05, lr=0.1)
    assert [g["rho"] for g in a.param_groups] == [0.3, 0.05]
    # explicit
    F.cross_entropy(model(x), y).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    g0 = [p.grad.clone() for p in model.parameters()]
    a.first_step(zero_grad=True)
    norm = math.sqrt(sum(float(g.pow(2).sum()) for g in g0))
    rhos = [0.3, 0.3, 0.05, 0.05]  # one rho per tensor from its group; the norm is global
    for p, p0, g, r in zip(model.parameters(), w0, g0, rhos):
        torch.testing.assert_close(p.detach(), p0 + r * g / norm, **TOL)
        assert p.grad is None
    F.cross_entropy(model(x), y).backward()
    a.second_step()

    def closure():
        b.zero_grad()
        loss = F.cross_entropy(twin(x), y)
        loss.backward()
        return loss

    b.step(closure)
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOL)


def test_base_optimizer_instance_and_state_dict_round_trip():
    model = _mlp()
    x, y = _data()
    opt = SAM(model.parameters(), torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9), rho=0.05)

    def closure_for(m, o):
        def closure():
            o.zero_grad()
            loss = F.cross_entropy(m(x), y)
            loss.backward()
            return loss
        return closure

    for _ in range(2):
        opt.step(closure_for(model, opt))
    twin = copy.deepcopy(model)
    fresh = SAM(twin.parameters(), torch.optim.SGD, rho=0.7, lr=0.5, momentum=0.0)
    fresh.load_state_dict(copy.deepcopy(opt.state_dict()))
    assert fresh.param_groups[0]["rho"] == 0.05 and fresh.param_groups[0]["lr"] == 0.1
    assert fresh.base_optimizer.param_groups is fresh.param_groups
    opt.step(closure_for(model, opt))
    fresh.step(closure_for(twin, fresh))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, **TOL)
    assert all("sam_e" not in s for s in opt.state_dict()["state"].values())


def _bn_model():
    return nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.ReLU(), nn.Linear(4, 2)).double()


def test_bn_running_stats_updated_once_per_step():
    model = _bn_model()
    x, y = _data(16)
    expected = copy.deepcopy(model)
    expected(x)  # one train-mode forward at w: what the running stats should become
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model)

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        return loss

    opt.step(closure)
    bn, bn_ref = model[1], expected[1]
    assert int(bn.num_batches_tracked) == 1
    torch.testing.assert_close(bn.running_mean, bn_ref.running_mean, **TOL)
    torch.testing.assert_close(bn.running_var, bn_ref.running_var, **TOL)
    assert bn.track_running_stats is True  # restored
    # without model= the closure runs twice unprotected: the stats move twice (why the helper exists)
    model2 = _bn_model()
    opt2 = SAM(model2.parameters(), torch.optim.SGD, lr=0.1)

    def closure2():
        opt2.zero_grad()
        loss = F.cross_entropy(model2(x), y)
        loss.backward()
        return loss

    opt2.step(closure2)
    assert int(model2[1].num_batches_tracked) == 2


def test_frozen_bn_stats_uses_batch_stats_and_keeps_eval():
    bn = nn.BatchNorm1d(3).double()
    x = torch.randn(10, 3, dtype=torch.float64) * 2 + 1
    with frozen_bn_stats(bn):
        out = bn(x)
    torch.testing.assert_close(out, F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps), **TOL)
    assert float(bn.running_mean.abs().max()) == 0.0 and int(bn.num_batches_tracked) == 0
    bn(x)  # normal update
    bn.eval()
    with frozen_bn_stats(bn):
        out = bn(x)
    torch.testing.assert_close(out, F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False,
                                                 0.0, bn.eps), **TOL)
    with pytest.raises(TypeError, match="nn.Module"):
        with frozen_bn_stats("model"):
            pass


def test_sam_bad_input():
    model = _mlp()
    with pytest.raises(ValueError, match="rho"):
        SAM(model.parameters(), torch.optim.SGD, rho=0.0, lr=0.1)
    with pytest.raises(TypeError, match="base_optimizer"):
        SAM(model.parameters(), 3, lr=0.1)
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()
    with pytest.raises(RuntimeError, match="first_step"):
        opt.second_step()
    with pytest.raises(RuntimeError, match="no parameter has a gradient"):
        opt.first_step()
    other = _mlp()
    with pytest.raises(ValueError, match="exactly the parameters"):
        SAM(model.parameters(), torch.optim.SGD(other.parameters(), lr=0.1))


def test_first_step_twice_raises_and_leaves_weights_at_the_first_ascent():
    model = _mlp()
    opt = SAM(model.parameters(), torch.optim.SGD, lr=0.0)
    x, y = _data(6)
    w0 = [p.detach().clone() for p in model.parameters()]
    F.cross_entropy(model(x), y).backward()
    opt.first_step()
    ascended = [p.detach().clone() for p in model.parameters()]
    with pytest.raises(RuntimeError, match="called twice"):
        opt.first_step()
    assert all(torch.equal(p, a) for p, a in zip(model.parameters(), ascended))
    F.cross_entropy(model(x), y).backward()
    opt.second_step()  # lr = 0: back at w, up to the rounding of (w + e) - e
    assert all(torch.allclose(p, w, rtol=0, atol=1e-15) for p, w in zip(model.parameters(), w0))


# -- delta-SAM -------------------------------------------------------------------------------------

def _hand_case():
    """One linear unit without bias, squared error: g_i = 2 r_i x_i, r_i = w.x_i - y_i."""
    w = [0.5, -1.0]
    xs = [[1.0, 2.0], [0.5, -1.0], [-2.0, 0.3], [0.0, 1.0]]
    ys = [0.3, 1.0, -0.5, 2.0]
    return w, xs, ys


def _softmax_standardized(s, temperature):
    m = sum(s) / len(s)
    sd = math.sqrt(sum((v - m) ** 2 for v in s) / len(s))
    z = [(v - m) / (sd + 1e-12) / temperature for v in s]
    e = [math.exp(v) for v in z]
    return [v / sum(e) for v in e]


def _linear_model(w):
    m = nn.Linear(2, 1, bias=False).double()
    with torch.no_grad():
        m.weight.copy_(torch.tensor([w], dtype=torch.float64))
    return m


def _ascent_by_hand(w, xs, ys, p, rho):
    r = [w[0] * x[0] + w[1] * x[1] - y for x, y in zip(xs, ys)]
    gw = [sum(pi * 2 * ri * x[j] for pi, ri, x in zip(p, r, xs)) for j in range(2)]
    n = math.hypot(*gw)
    return [w[j] + rho * gw[j] / n for j in range(2)]


@pytest.mark.parametrize("score_source", ["grad_norm", "perturbation"])
def test_delta_sam_weights_by_hand(score_source):
    w, xs, ys = _hand_case()
    model = _linear_model(w)
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    closure = lambda: (model(x).squeeze(1) - y) ** 2
    T, rho, sigma = 0.7, 0.2, 0.3
    gen = torch.Generator().manual_seed(11)
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=rho, lr=0.1, model=model, score_source=score_source,
                   temperature=T, noise_scale=sigma, n_perturb=2, generator=gen)
    r = [w[0] * a[0] + w[1] * a[1] - b for a, b in zip(xs, ys)]
    if score_source == "grad_norm":
        scores = [abs(2 * ri) * math.hypot(*a) for ri, a in zip(r, xs)]
    else:
        draws = torch.Generator().manual_seed(11)
        deltas = [torch.randn((1, 2), generator=draws, dtype=torch.float64)[0].tolist() for _ in range(2)]
        scores = []
        for a, b in zip(xs, ys):
            base = (w[0] * a[0] + w[1] * a[1] - b) ** 2
            pert = [((w[0] + sigma * d[0]) * a[0] + (w[1] + sigma * d[1]) * a[1] - b) ** 2 for d in deltas]
            scores.append(sum(v - base for v in pert) / 2)
    p = _softmax_standardized(scores, T)
    weights = opt.first_step(losses=closure(), closure=closure)
    torch.testing.assert_close(opt.last_scores, torch.tensor(scores, dtype=torch.float64), **TOL)
    torch.testing.assert_close(weights, torch.tensor(p, dtype=torch.float64), **TOL)
    torch.testing.assert_close(model.weight.detach()[0], torch.tensor(_ascent_by_hand(w, xs, ys, p, rho),
                                                                        dtype=torch.float64), **TOL)


def test_delta_sam_full_step_matches_reference():
    w, xs, ys = _hand_case()
    model = _linear_model(w)
    x, y = torch.tensor(xs, dtype=torch.float64), torch.tensor(ys, dtype=torch.float64)
    closure = lambda: (model(x).squeeze(1) - y) ** 2
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, model=model, score_source="grad_norm")
    r = [w[0] * a[0] + w[1] * a[1] - b for a, b in zip(xs, ys)]
    p = _softmax_standardized([abs(2 * ri) * math.hypot(*a) for ri, a in zip(r, xs)], 1.0)
    we = _ascent_by_hand(w, xs, ys, p, 0.2)
    re = [we[0] * a[0] + we[1] * a[1] - b for a, b in zip(xs, ys)]
    g2 = [sum(2 * ri * a[j] for ri, a in zip(re, xs)) / len(xs) for j in range(2)]
    loss = opt.step(closure)
    assert abs(float(loss) - sum(v * v for v in r) / len(r)) < 1e-12
    torch.testing.assert_close(model.weight.detach()[0], torch.tensor([w[j] - 0.1 * g2[j] for j in range(2)],
                                                                        dtype=torch.float64), **TOL)


def test_softmax_example_weights_limits():
    s = torch.tensor([1.0, 3.0, 2.0], dtype=torch.float64)
    torch.testing.assert_close(softmax_example_weights(torch.full((4,), 2.5)), torch.full((4,), 0.25))
    hot = softmax_example_weights(s, temperature=1e-3)
    assert int(hot.argmax()) == 1 and float(hot.max()) > 1 - 1e-9
    torch.testing.assert_close(softmax_example_weights(s, temperature=1e9), torch.full((3,), 1 / 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="temperature"):
        softmax_example_weights(s, temperature=0.0)
    with pytest.raises(ValueError, match="1-D"):
        softmax_example_weights(s.reshape(3, 1))


def test_delta_sam_bn_stats_once_and_errors():
    model = _bn_model()
    x, y = _data(12)
    expected = copy.deepcopy(model)
    expected(x)
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, lr=0.1, model=model, n_perturb=3)
    opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))
    assert int(model[1].num_batches_tracked) == 1
    torch.testing.assert_close(model[1].running_mean, expected[1].running_mean, **TOL)
    with pytest.raises(ValueError, match="needs model"):
        DeltaSAM(model.parameters(), torch.optim.SGD, lr=0.1, score_source="grad_norm")
    with pytest.raises(ValueError, match="score_source"):
        DeltaSAM(model.parameters(), torch.optim.SGD, lr=0.1, score_source="loss")
    with pytest.raises(ValueError, match="noise_scale"):
        DeltaSAM(model.parameters(), torch.optim.SGD, lr=0.1, noise_scale=-1.0)
    with pytest.raises(ValueError, match="needs the closure"):
        opt.first_step(losses=F.cross_entropy(model(x), y, reduction="none"))
    with pytest.raises(ValueError, match="per-example"):
        opt.first_step(losses=F.cross_entropy(model(x), y))


def test_delta_sam_first_step_takes_sams_call():
    """first_step(zero_grad) as SAM declares it: the same parameter first; the per-example losses
    are keyword arguments, and without them the error says what delta-SAM needs."""
    import inspect

    sam, dsam = inspect.signature(SAM.first_step), inspect.signature(DeltaSAM.first_step)
    assert list(dsam.parameters)[:2] == list(sam.parameters) == ["self", "zero_grad"]
    assert all(p.kind is inspect.Parameter.KEYWORD_ONLY for n, p in dsam.parameters.items() if n not in sam.parameters)
    model = _mlp()
    x, y = _data()
    opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, model=model, score_source="grad_norm")
    F.cross_entropy(model(x), y).backward()
    w0 = [p.detach().clone() for p in model.parameters()]
    for call in (lambda: opt.first_step(), lambda: opt.first_step(zero_grad=True), lambda: opt.first_step(True)):
        with pytest.raises(ValueError, match="needs losses="):
            call()
    with pytest.raises(TypeError, match="losses="):
        opt.first_step(F.cross_entropy(model(x), y, reduction="none"))  # the old positional losses
    assert all(torch.equal(a, p) for a, p in zip(w0, model.parameters()))
    losses = F.cross_entropy(model(x), y, reduction="none")
    weights = opt.first_step(True, losses=losses)  # SAM's explicit protocol with delta-SAM's ascent
    assert all(p.grad is None for p in model.parameters())
    F.cross_entropy(model(x), y).backward()
    opt.second_step()
    assert weights.shape == (7,) and not all(torch.equal(a, p) for a, p in zip(w0, model.parameters()))


@pytest.mark.parametrize("k", [1, 2])
def test_delta_sam_resume_equals_the_straight_run(tmp_path, k):
    """The perturbation generator is in state_dict: k steps, save, fresh objects, load, N - k
    steps equals N steps in one go, bit for bit."""
    n_steps = 4
    x, y = _data(9)

    def build():
        torch.manual_seed(3)
        model = _mlp()
        opt = DeltaSAM(model.parameters(), torch.optim.SGD, rho=0.1, lr=0.1, momentum=0.9, model=model,
                       score_source="perturbation", n_perturb=2, generator=torch.Generator().manual_seed(5))
        return model, opt

    def steps(model, opt, n):
        for _ in range(n):
            opt.step(lambda: F.cross_entropy(model(x), y, reduction="none"))

    straight, s_opt = build()
    steps(straight, s_opt, n_steps)
    first, f_opt = build()
    steps(first, f_opt, k)
    torch.save({"model": first.state_dict(), "opt": f_opt.state_dict()}, tmp_path / "ck.pt")
    resumed, r_opt = build()  # its generator starts from seed 5 again: only the saved state makes it right
    ck = torch.load(tmp_path / "ck.pt")
    resumed.load_state_dict(ck["model"])
    r_opt.load_state_dict(ck["opt"])
    steps(resumed, r_opt, n_steps - k)
    for a, b in zip(resumed.parameters(), straight.parameters()):
        assert torch.equal(a, b)
    assert torch.equal(r_opt.last_scores, s_opt.last_scores)
    # A state with a generator does not load into a DeltaSAM without one (the draws could not resume).
    model = _mlp()
    plain = DeltaSAM(model.parameters(), torch.optim.SGD, lr=0.1, momentum=0.9, model=model)
    with pytest.raises(ValueError, match="generator"):
        plain.load_state_dict(ck["opt"])
