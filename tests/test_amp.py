"""ENGM with torch.autocast (bf16, fp16 on the CPU) and torch.amp.GradScaler.

With ``opt.backward(losses, scaler=scaler)`` the weights must come from the UNSCALED norms,
``.grad`` must hold the scaled gradient that ``scaler.step`` unscales, and an overflow of the
scaled backward must make ``scaler.step`` skip the step and ``scaler.update`` lower the scale.
A GradScaler scale is a power of two, so with no overflow the scaled run equals the unscaled
one to rounding.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast


def make_model(dtype=torch.float32):
    torch.manual_seed(3)
    return nn.Sequential(nn.Flatten(), nn.Linear(25, 16), nn.GroupNorm(4, 16), nn.ReLU(), nn.Linear(16, 8),
                         nn.LayerNorm(8), nn.Linear(8, 4)).to(dtype)


def batches(n, B=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(B, 1, 5, 5, generator=g), torch.randint(0, 4, (B,), generator=g)) for _ in range(n)]


def losses_of(model, x, y, autocast_dtype=None):
    with torch.autocast("cpu", dtype=autocast_dtype or torch.bfloat16, enabled=autocast_dtype is not None):
        return F.cross_entropy(model(x), y, reduction="none")


def rel_err(a, b):
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())


@pytest.mark.parametrize("norm_source", ["exact", "input_proxy"])
def test_grad_scaler_equals_unscaled_engm(norm_source):
    model = make_model()
    kw = dict(lr=0.1, momentum=0.9, norm_source=norm_source, calibrate_every=2)
    plain, scaled = copy.deepcopy(model), copy.deepcopy(model)
    opt_plain, opt_scaled = engm_fast.ENGM(plain, **kw), engm_fast.ENGM(scaled, **kw)
    # growth_interval=1: the scale doubles after every step, so each step runs at a new scale.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8, growth_interval=1)
    scales = []
    for x, y in batches(4):
        opt_plain.zero_grad()
        n_plain = opt_plain.backward(losses_of(plain, x, y))
        opt_plain.step()
        opt_scaled.zero_grad()
        n_scaled = opt_scaled.backward(losses_of(scaled, x, y), scaler=scaler)
        scales.append(scaler.get_scale())
        scaler.step(opt_scaled)
        scaler.update()
        torch.testing.assert_close(n_scaled, n_plain, rtol=1e-6, atol=0)  # norms are of unscaled gradients
        assert opt_scaled.diagnostics["overflow"] is False
    assert scales == [2.0 ** 8, 2.0 ** 9, 2.0 ** 10, 2.0 ** 11]
    for p, q in zip(scaled.parameters(), plain.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_grad_holds_scaled_gradient_until_unscale():
    model = make_model()
    ref = copy.deepcopy(model)
    x, y = batches(1)[0]
    opt, ref_opt = engm_fast.ENGM(model, lr=0.1), engm_fast.ENGM(ref, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=1024.0)
    opt.backward(losses_of(model, x, y), scaler=scaler)
    ref_opt.backward(losses_of(ref, x, y))
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, 1024.0 * q.grad, rtol=1e-6, atol=1e-6)
    scaler.unscale_(opt)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-6, atol=1e-9)


def test_overflow_skips_step_and_lowers_scale():
    model = make_model()
    ref = copy.deepcopy(model)
    opt = engm_fast.ENGM(model, lr=0.1, momentum=0.9)
    # 2^100 * ||g_i|| squared overflows float32: the scaled backward "overflows".
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 100, backoff_factor=2.0 ** -90)
    (x, y), (x2, y2) = batches(2)
    before = [p.detach().clone() for p in model.parameters()]
    opt.zero_grad()
    opt.backward(losses_of(model, x, y), scaler=scaler)
    assert opt.diagnostics["overflow"] is True
    assert all(torch.isnan(p.grad).all() for p in model.parameters())
    scaler.step(opt)
    scaler.update()
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters())), "overflowed step was applied"
    assert opt.state == {} or all("momentum_buffer" not in s for s in opt.state.values())
    assert scaler.get_scale() == 2.0 ** 10
    # Next step at the lowered scale: the same as ENGM without a scaler on this batch.
    opt.zero_grad()
    opt.backward(losses_of(model, x2, y2), scaler=scaler)
    scaler.step(opt)
    ref_opt = engm_fast.ENGM(ref, lr=0.1, momentum=0.9)
    ref_opt.backward(losses_of(ref, x2, y2))
    ref_opt.step()
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


def test_nonfinite_loss_with_scaler_still_raises_and_writes_nothing():
    model = make_model()
    opt = engm_fast.ENGM(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    x, y = batches(1)[0]
    x = x.clone()
    x[3] = float("inf")
    with pytest.raises(FloatingPointError, match=r"1 of 8 losses.*\[3\]"):
        opt.backward(losses_of(model, x, y), scaler=scaler)
    assert all(p.grad is None for p in model.parameters())


def test_scaler_argument_type_checked():
    model = make_model()
    opt = engm_fast.ENGM(model, lr=0.1)
    x, y = batches(1)[0]
    with pytest.raises(TypeError, match="GradScaler"):
        opt.backward(losses_of(model, x, y), scaler=2.0)


def _reference_step_grads(model, x, y):
    """ENGM's gradient by its definition, in float64 (no autocast)."""
    ref = copy.deepcopy(model).double()
    engine = engm_fast.attach(ref)
    grads = engine.backward(F.cross_entropy(ref(x.double()), y, reduction="none"))
    norms = grads.sqnorms().sqrt()
    w = 1.0 / (norms + 1e-6) / x.shape[0]
    return norms, [grads.weighted_grads(w)[p] for p in ref.parameters()]


def _autocast_autograd_grads(model, x, y, norms, dtype):
    """The same weighted gradient by plain autograd under the same autocast: sum_i w_i loss_i
    with ENGM's weights, backward. Both sides then round alike, so the check is tight."""
    ref = copy.deepcopy(model)
    engm_fast.release(ref)
    for m in ref.modules():
        m._forward_hooks.clear()
        m._forward_hooks_with_kwargs.clear()
    w = 1.0 / (norms.detach() + 1e-6) / x.shape[0]
    (losses_of(ref, x, y, autocast_dtype=dtype) * w).sum().backward()
    return [p.grad for p in ref.parameters()]


def _check_autocast(model, x, y, dtype, norm_tol, grad_tol):
    norms_ref, grads_ref = _reference_step_grads(model, x, y)
    opt = engm_fast.ENGM(model, lr=0.1)
    norms = opt.backward(losses_of(model, x, y, autocast_dtype=dtype))
    assert norms.dtype == torch.float32  # accumulated in fp32 whatever the autocast dtype
    assert rel_err(norms, norms_ref) < norm_tol
    same_ops = _autocast_autograd_grads(model, x, y, norms, dtype)
    for (name, p), g64, g in zip(model.named_parameters(), grads_ref, same_ops):
        assert p.grad.dtype == torch.float32
        assert rel_err(p.grad, g) < grad_tol, name   # = autograd under autocast, to its rounding
        assert rel_err(p.grad, g64) < 10 * norm_tol, name  # near the float64 gradient


# Tolerances: bf16 keeps 8 significant bits (relative rounding 2^-9 = 2e-3), fp16 11 (2.4e-4);
# errors accumulate over the layers, hence ~10 roundings.
@pytest.mark.parametrize("dtype,norm_tol,grad_tol", [(torch.bfloat16, 3e-2, 2e-2), (torch.float16, 5e-3, 3e-3)])
def test_autocast_matches_references(dtype, norm_tol, grad_tol):
    model = make_model()
    x, y = batches(1, B=12)[0]
    _check_autocast(model, x, y, dtype, norm_tol, grad_tol)


def test_autocast_bf16_small_conv():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Conv2d(1, 3, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4))
    x, y = batches(1)[0]
    _check_autocast(model, x, y, torch.bfloat16, 3e-2, 2e-2)


def test_autocast_bf16_conv_gram_route():
    torch.manual_seed(4)
    # T = 4 output positions, d_in = 144, d_out = 32: the Gram route, whose weighted sum is factored.
    model = nn.Sequential(nn.Conv2d(16, 32, 3), nn.ReLU(), nn.Flatten(), nn.Linear(32 * 4, 4))
    x = torch.randn(8, 16, 4, 4)
    y = torch.randint(0, 4, (8,))
    _check_autocast(model, x, y, torch.bfloat16, 3e-2, 2e-2)


def test_autocast_fp16_with_grad_scaler_recovers_from_overflow():
    """fp16 autocast at GradScaler's default 2^16 overflows this model's fp16 output gradients;
    the scaler lowers the scale until a step is taken, and that step is ENGM's (fp16 accuracy)."""
    model = make_model()
    x, y = batches(1, B=12)[0]
    _, grads_ref = _reference_step_grads(model, x, y)
    opt = engm_fast.ENGM(model, lr=0.1)
    scaler = torch.amp.GradScaler("cpu")
    before = [p.detach().clone() for p in model.parameters()]
    overflows = 0
    for _ in range(20):
        opt.zero_grad()
        opt.backward(losses_of(model, x, y, autocast_dtype=torch.float16), scaler=scaler)
        scale = scaler.get_scale()
        scaler.step(opt)
        scaler.update()
        if not opt.diagnostics["overflow"]:
            break
        overflows += 1
        assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert not opt.diagnostics["overflow"] and scale < 2.0 ** 16
    assert overflows >= 1
    for p, p0, g in zip(model.parameters(), before, grads_ref):
        assert rel_err((p0 - p.detach()) / 0.1, g) < 5e-3
