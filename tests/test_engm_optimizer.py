"""ENGM against a hand-written reference (vmap per-example gradients + the SGD recurrence)."""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast
from conftest import flat_norms, vmap_per_example_grads

TOL = dict(rtol=1e-9, atol=1e-12)


def _ce(run, x, y):
    return F.cross_entropy(run(x), y, reduction="sum")


def make_model():
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).double()


def make_batches(n, B=6):
    g = torch.Generator().manual_seed(5)
    return [(torch.randn(B, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (B,), generator=g))
            for _ in range(n)]


def reference_weights(norms, weighting, eps=1e-6, clip_norm=None, power=None, norm_floor=None):
    if norm_floor is not None:
        norms = torch.maximum(norms, norm_floor * norms.mean())
    if weighting == "normalize":
        return 1.0 / (norms + eps)
    if weighting == "clip":
        return torch.minimum(torch.ones_like(norms), clip_norm / norms)
    return (norms + eps) ** (-power)


def reference_run(model, batches, hp, weighting="normalize", **wkw):
    """ENGM by its definition: vmap grads, ghat, then torch.optim.SGD's recurrence written out."""
    model = copy.deepcopy(model)
    for m in model.modules():
        m._forward_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
    params = dict(model.named_parameters())
    bufs = {}
    for x, y in batches:
        g = vmap_per_example_grads(model, _ce, x, y)
        norms = flat_norms(g)
        w = reference_weights(norms, weighting, **wkw) / x.shape[0]
        with torch.no_grad():
            for name, p in params.items():
                d = torch.einsum("b,b...->...", w, g[name])
                if hp.get("weight_decay", 0):
                    d = d + hp["weight_decay"] * p
                mom = hp.get("momentum", 0)
                if mom:
                    if name not in bufs:
                        bufs[name] = d.clone()
                    else:
                        bufs[name] = mom * bufs[name] + (1 - hp.get("dampening", 0)) * d
                    d = d + mom * bufs[name] if hp.get("nesterov") else bufs[name]
                p -= hp["lr"] * d
    return model


def engm_run(model, batches, hp, **kw):
    model = copy.deepcopy(model)
    opt = engm_fast.ENGM(model, **hp, **kw)
    for x, y in batches:
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(x), y, reduction="none"))
        opt.step()
    return model, opt


HPARAMS = [
    dict(lr=0.3),
    dict(lr=0.2, momentum=0.9),
    dict(lr=0.1, momentum=0.8, nesterov=True, weight_decay=1e-2),
    dict(lr=0.1, momentum=0.5, dampening=0.3, weight_decay=5e-3),
]
WEIGHTINGS = [dict(weighting="normalize"), dict(weighting="clip", clip_norm=0.5),
              dict(weighting="power", power=0.0), dict(weighting="power", power=0.7),
              dict(weighting="normalize", norm_floor=0.8), dict(weighting="power", power=0.7, norm_floor=0.8)]


@pytest.mark.parametrize("hp", HPARAMS)
@pytest.mark.parametrize("wkw", WEIGHTINGS, ids=lambda d: "-".join(str(v) for v in d.values()))
def test_engm_matches_reference_over_steps(hp, wkw):
    torch.manual_seed(0)
    model = make_model()
    batches = make_batches(3)
    got, _ = engm_run(model, batches, hp, **wkw)
    ref_kw = {k: v for k, v in wkw.items() if k != "weighting"}
    want = reference_run(model, batches, hp, wkw["weighting"], **ref_kw)
    for (n, p), q in zip(got.named_parameters(), want.parameters()):
        torch.testing.assert_close(p, q, **TOL, msg=lambda m: f"{n}: {m}")


def test_norm_floor_binds_only_below_the_floor():
    """norm_floor: examples below r x the batch's mean norm get weight 1/(r mean + eps), the others
    exactly the paper's 1/(||g_i|| + eps); a dropped (non-finite) example does not enter the mean."""
    torch.manual_seed(3)
    model = make_model()
    x, y = make_batches(1)[0]
    norms_ref = flat_norms(vmap_per_example_grads(model, _ce, x, y))
    floor = 0.8 * norms_ref.mean()
    assert bool((norms_ref < floor).any()) and bool((norms_ref > floor).any())  # the test binds both ways
    opt = engm_fast.ENGM(model, lr=0.1, norm_floor=0.8)
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    d = opt.diagnostics
    want = torch.where(norms_ref < floor, 1 / (floor + 1e-6), 1 / (norms_ref + 1e-6))
    assert d["weight_mean"] == pytest.approx(float(want.mean()), rel=1e-9)
    # drop: a NaN loss is left out; the floor is taken over the others
    xb = x.clone()
    xb[0] = float("nan")
    opt = engm_fast.ENGM(model, lr=0.1, norm_floor=0.8, nonfinite="drop")
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(xb), y, reduction="none"))
    assert opt.last_dropped == [0]
    assert all(bool(torch.isfinite(p.grad).all()) for p in model.parameters())
    for bad, match in ((dict(norm_floor=0.0), "norm_floor"), (dict(norm_floor=1.5), "norm_floor"),
                       (dict(weighting="clip", clip_norm=1.0, norm_floor=0.1), "clip already bounds")):
        with pytest.raises(ValueError, match=match):
            engm_fast.ENGM(make_model(), lr=0.1, **bad)


def test_power_zero_is_msgd():
    """weighting='power', power=0 gives exactly torch.optim.SGD on the mean loss."""
    torch.manual_seed(1)
    model = make_model()
    batches = make_batches(3)
    got, _ = engm_run(model, batches, dict(lr=0.1, momentum=0.9), weighting="power", power=0.0)
    ref = copy.deepcopy(got)  # shapes only
    ref.load_state_dict(model.state_dict())
    sgd = torch.optim.SGD(ref.parameters(), lr=0.1, momentum=0.9)
    for x, y in batches:
        sgd.zero_grad()
        F.cross_entropy(ref(x), y).backward()
        sgd.step()
    for p, q in zip(got.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-9, atol=1e-12)


def test_backward_leaves_weighted_mean_gradient_and_returns_norms():
    torch.manual_seed(2)
    model = make_model()
    x, y = make_batches(1)[0]
    g = vmap_per_example_grads(model, _ce, x, y)
    norms_ref = flat_norms(g)
    opt = engm_fast.ENGM(model, lr=0.1)
    opt.zero_grad()
    norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    torch.testing.assert_close(norms, norms_ref, **TOL)
    w = 1.0 / (norms_ref + 1e-6) / x.shape[0]
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", w, g[n]), **TOL)
    d = opt.diagnostics
    assert d["norm_mean"] == pytest.approx(float(norms_ref.mean()))
    assert d["norm_max"] == pytest.approx(float(norms_ref.max()))
    assert d["n_dropped"] == 0 and d["grad_variance"] is None


def test_gradient_variance_diagnostic():
    torch.manual_seed(3)
    model = make_model()
    x, y = make_batches(1)[0]
    g = vmap_per_example_grads(model, _ce, x, y)
    flat = torch.cat([v.reshape(x.shape[0], -1) for v in g.values()], 1)
    expect = float(flat.pow(2).sum(1).mean() - flat.mean(0).pow(2).sum())
    opt = engm_fast.ENGM(model, lr=0.1, track_variance=True)
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert opt.diagnostics["grad_variance"] == pytest.approx(expect, rel=1e-9)


def test_param_groups_subset_and_lr_scheduler():
    torch.manual_seed(4)
    model = make_model()
    conv, head = model[0], model[4]
    opt = engm_fast.ENGM(model, lr=0.1, params=[{"params": conv.parameters(), "lr": 0.5},
                                                 {"params": head.parameters()}])
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    x, y = make_batches(1)[0]
    gn_before = [p.clone() for p in model[1].parameters()]
    opt.zero_grad()
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    # Norms are over the optimized parameters only: GroupNorm's are not in any group.
    assert all(p.grad is None for p in model[1].parameters())
    opt.step()
    sched.step()
    assert [g["lr"] for g in opt.param_groups] == [0.25, 0.05]
    assert all(torch.equal(a, b) for a, b in zip(gn_before, model[1].parameters()))


def test_state_dict_round_trip_continues_identically():
    torch.manual_seed(5)
    model = make_model()
    batches = make_batches(4)
    hp = dict(lr=0.1, momentum=0.9, weight_decay=1e-3)
    full, _ = engm_run(model, batches, hp)
    # Two steps, save, rebuild model and optimizer from the state dicts, two more steps.
    half, opt = engm_run(model, batches[:2], hp)
    state = copy.deepcopy(opt.state_dict())
    resumed = make_model()
    resumed.load_state_dict(half.state_dict())
    opt2 = engm_fast.ENGM(resumed, **hp)
    opt2.load_state_dict(state)
    assert opt2.backward_steps == 2
    for x, y in batches[2:]:
        opt2.zero_grad()
        opt2.backward(F.cross_entropy(resumed(x), y, reduction="none"))
        opt2.step()
    for p, q in zip(full.parameters(), resumed.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_input_proxy_calibration_and_proxy_step():
    torch.manual_seed(6)
    model = make_model()
    batches = make_batches(3)
    opt = engm_fast.ENGM(model, lr=0.1, norm_source="input_proxy", calibrate_every=2)
    seen = []
    for step, (x, y) in enumerate(batches):
        x = x.clone().requires_grad_(True)
        losses = F.cross_entropy(model(x), y, reduction="none")
        (gx,) = torch.autograd.grad(losses.sum(), x, retain_graph=True)
        in_norms = gx.flatten(1).norm(dim=1)
        exact = flat_norms(vmap_per_example_grads(model, _ce, x.detach(), y))
        g = vmap_per_example_grads(model, _ce, x.detach(), y)
        opt.zero_grad()
        used = opt.backward(losses, input_grad_norms=in_norms)
        if step in (0, 2):  # calibration steps use and fit the exact norms
            torch.testing.assert_close(used, exact, **TOL)
            seen.append((in_norms, exact))
            xs, ys = torch.cat([s[0] for s in seen]), torch.cat([s[1] for s in seen])
            alpha = float(((xs - xs.mean()) * (ys - ys.mean())).sum() / ((xs - xs.mean()) ** 2).sum())
            beta = float(ys.mean() - alpha * xs.mean())
            r = float(torch.corrcoef(torch.stack([xs, ys]))[0, 1])
            stats = opt.proxy_stats
            assert stats["alpha"] == pytest.approx(alpha, rel=1e-9)
            assert stats["beta"] == pytest.approx(beta, rel=1e-9, abs=1e-12)
            assert stats["pearson_r"] == pytest.approx(r, rel=1e-9)
        else:  # proxy step: weights from alpha * ||grad_x|| + beta, one ordinary backward
            s = opt.proxy_stats
            est = (s["alpha"] * in_norms + s["beta"]).clamp_min(s["floor"])
            torch.testing.assert_close(used, est, **TOL)
            w = 1.0 / (est + 1e-6) / x.shape[0]
            for n, p in model.named_parameters():
                torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", w, g[n]), **TOL)
        opt.step()


def test_proxy_prediction_floor_and_old_state_dicts():
    """A fit with beta < 0 never predicts a norm below the smallest calibrated one (normalize
    would give 1/eps), and states saved before the floor existed get it from their pairs."""
    from engm_fast.optim import ProxyCalibration

    cal = ProxyCalibration()
    x = torch.tensor([2.0, 3.0, 4.0], dtype=torch.float64)
    cal.update(x, 2 * x - 3)  # alpha 2, beta -3; exact norms 1, 3, 5
    assert cal.floor == 1.0
    assert cal.predict(torch.tensor([0.0, 1.0, 4.5], dtype=torch.float64)).tolist() == [1.0, 1.0, 6.0]
    old = cal.state_dict()
    del old["floor"]
    fresh = ProxyCalibration()
    fresh.load_state_dict(old)
    assert fresh.floor == 1.0


def test_input_proxy_computes_input_gradient_when_not_given():
    torch.manual_seed(7)
    model = make_model()
    opt = engm_fast.ENGM(model, lr=0.1, norm_source="input_proxy", calibrate_every=100)
    for x, y in make_batches(2):
        opt.zero_grad()
        norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
        assert norms.shape == (x.shape[0],) and torch.isfinite(norms).all()
        opt.step()
    assert opt.proxy_stats["calibrations"] == 1 and opt.proxy_stats["n_pairs"] == 6


def test_options_after_lr_are_keyword_only():
    model = make_model()
    with pytest.raises(TypeError, match="positional"):
        engm_fast.ENGM(model, 0.1, 0.9)
    assert engm_fast.ENGM(model, 0.1, momentum=0.9).param_groups[0]["momentum"] == 0.9


def test_tensor_lr_as_torch_optim_takes_it():
    """A 1-element tensor lr gives the same steps as the float (and as torch.optim.SGD), also
    when a scheduler changes it; other tensors and values are refused as torch.optim does."""
    base, batches = make_model(), make_batches(4)
    hp = dict(momentum=0.9, weight_decay=1e-3)
    with_float, _ = engm_run(base, batches, dict(lr=0.1, **hp))
    with_tensor, opt = engm_run(base, batches, dict(lr=torch.tensor(0.1, dtype=torch.float64), **hp))
    assert isinstance(opt.param_groups[0]["lr"], torch.Tensor)
    for p, q in zip(with_float.parameters(), with_tensor.parameters()):
        assert torch.equal(p, q)
    runs = []
    for lr in (0.2, torch.tensor(0.2, dtype=torch.float64)):
        model = copy.deepcopy(base)
        opt = engm_fast.ENGM(model, lr=lr, momentum=0.9)
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for x, y in batches:
            opt.zero_grad()
            opt.backward(F.cross_entropy(model(x), y, reduction="none"))
            opt.step()
            sched.step()
        runs.append(model)
        assert float(opt.param_groups[0]["lr"]) == 0.2 * 0.5 ** len(batches)
    for p, q in zip(*(m.parameters() for m in runs)):
        assert torch.equal(p, q)
    for bad, error in ((torch.tensor([0.1, 0.2]), ValueError), (torch.tensor(-0.1), ValueError),
                       (-0.1, ValueError), (float("nan"), ValueError), ("0.1", TypeError), (torch.tensor(1), TypeError)):
        with pytest.raises(error):
            engm_fast.ENGM(make_model(), lr=bad)


def test_input_proxy_hook_is_removed_with_the_engine():
    model = make_model()
    before = len(model._forward_pre_hooks)
    attached = len(engm_fast.attach(model).model._forward_pre_hooks)  # the engine's own hooks
    opt = engm_fast.ENGM(model, lr=0.1, norm_source="input_proxy")
    assert len(model._forward_pre_hooks) == attached + 1
    x, y = make_batches(1)[0]
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    engm_fast.release(model)
    assert len(model._forward_pre_hooks) == before and engm_fast.engine_of(model) is None
    x_seen = []
    model.register_forward_pre_hook(lambda m, args: x_seen.append(args[0]))
    model(x)
    assert x_seen[0] is x  # no longer replaced by a leaf copy that requires grad
