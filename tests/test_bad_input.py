"""Bad input gives a clear error (naming shapes, modules, indices) and leaves .grad untouched."""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast
from conftest import flat_norms, vmap_per_example_grads


def setup(**kw):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    opt = engm_fast.ENGM(model, lr=0.1, **kw)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    return model, opt, x, y


def grads_of(model):
    return [None if p.grad is None else p.grad.clone() for p in model.parameters()]


def test_losses_not_1d():
    model, opt, x, y = setup()
    with pytest.raises(ValueError, match=r"1-D.*\(5, 3\)"):
        opt.backward(F.cross_entropy(model(x), y, reduction="none").unsqueeze(1).expand(5, 3))
    with pytest.raises(ValueError, match=r"1-D.*\(\)"):
        opt.backward(F.cross_entropy(model(x), y))  # already reduced


def test_losses_length_mismatch_names_both_shapes():
    model, opt, x, y = setup()
    losses = F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(ValueError, match=r"\(3,\).*\(5, 6\)|\(3,\).*\(5, 3\)"):
        opt.backward(losses[:3])
    assert all(p.grad is None for p in model.parameters())


def test_losses_without_graph():
    model, opt, x, y = setup()
    with pytest.raises(ValueError, match="do not require grad"):
        opt.backward(F.cross_entropy(model(x), y, reduction="none").detach())
    with torch.no_grad():
        losses = F.cross_entropy(model(x), y, reduction="none")
    with pytest.raises(ValueError, match="do not require grad"):
        opt.backward(losses)


def test_losses_from_another_model():
    model, opt, x, y = setup()
    other = nn.Linear(4, 3).double()
    with pytest.raises(ValueError, match="no graph"):
        opt.backward(F.cross_entropy(other(x), y, reduction="none"))


def test_empty_batch():
    model, opt, x, y = setup()
    with pytest.raises(ValueError, match="empty"):
        opt.backward(F.cross_entropy(model(x[:0]), y[:0], reduction="none"))


def test_nonfinite_losses_raise_with_indices_and_write_nothing():
    model, opt, x, y = setup()
    x = x.clone()
    x[1, 0] = float("nan")
    x[3, 2] = float("nan")
    with pytest.raises(FloatingPointError, match=r"2 of 5 losses.*\[1, 3\]"):
        opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert all(p.grad is None for p in model.parameters())


def test_nonfinite_losses_dropped_on_request():
    model, opt, x, y = setup(nonfinite="drop")
    bad = x.clone()
    bad[1, 0] = float("nan")
    opt.backward(F.cross_entropy(model(bad), y, reduction="none"))
    assert opt.last_dropped == [1] and opt.diagnostics["n_dropped"] == 1
    keep = torch.tensor([0, 2, 3, 4])
    g = vmap_per_example_grads(model, lambda run, a, b: F.cross_entropy(run(a), b, reduction="sum"), x[keep], y[keep])
    w = 1.0 / (flat_norms(g) + 1e-6) / 4
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all()
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", w, g[n]), rtol=1e-9, atol=1e-12)


def test_all_zero_gradient_gets_finite_weight():
    model, opt, x, y = setup()
    losses = F.cross_entropy(model(x), y, reduction="none")
    losses = torch.cat([losses[:2] * 0.0, losses[2:]])  # examples 0, 1 have zero gradient
    norms = opt.backward(losses)
    assert norms[0] == 0 and norms[1] == 0
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
    clip_model, clip_opt, _, _ = setup(weighting="clip", clip_norm=1.0)
    clip_opt.backward(F.cross_entropy(clip_model(x), y, reduction="none") * 0.0)
    assert all(torch.isfinite(p.grad).all() and (p.grad == 0).all() for p in clip_model.parameters())


@pytest.mark.parametrize("kw,match", [
    (dict(weighting="nope"), "weighting"),
    (dict(weighting="clip"), "clip_norm"),
    (dict(clip_norm=1.0), "only used with weighting='clip'"),
    (dict(weighting="power"), "power"),
    (dict(eps=0.0), "eps"),
    (dict(norm_source="magic"), "norm_source"),
    (dict(calibrate_every=0), "calibrate_every"),
    (dict(nesterov=True), "Nesterov"),
    (dict(nonfinite="ignore"), "nonfinite"),
])
def test_bad_optimizer_config(kw, match):
    with pytest.raises(ValueError, match=match):
        engm_fast.ENGM(nn.Linear(2, 2), lr=0.1, **kw)


def test_model_must_come_first():
    with pytest.raises(TypeError, match="model"):
        engm_fast.ENGM(list(nn.Linear(2, 2).parameters()), lr=0.1)


@pytest.mark.parametrize("kw,match", [(dict(sparse=True), "sparse"), (dict(scale_grad_by_freq=True), "scale_grad_by_freq")])
def test_unsupported_embedding_names_module(kw, match):
    model = nn.Sequential(nn.Embedding(10, 3, **kw), nn.Linear(3, 2))
    with pytest.raises(NotImplementedError, match=rf"'0'.*Embedding.*{match}"):
        engm_fast.ENGM(model, lr=0.1)


def test_parameter_used_outside_its_module_is_not_dropped():
    class Sneaky(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = nn.Linear(3, 3)
            self.head = nn.Linear(3, 2)

        def forward(self, x):  # reads head.weight directly instead of calling head
            return F.linear(torch.tanh(self.inner(x)), self.head.weight, self.head.bias)

    model = Sneaky()
    opt = engm_fast.ENGM(model, lr=0.1)
    with pytest.raises(NotImplementedError, match=r"head\.weight"):
        opt.backward(F.cross_entropy(model(torch.randn(4, 3)), torch.randint(0, 2, (4,)), reduction="none"))
    assert all(p.grad is None for p in model.parameters())


def test_unbatched_conv_input_names_module():
    model = nn.Sequential(nn.Conv2d(1, 2, 3), nn.Flatten(0), nn.Linear(18, 2))
    engm_fast.attach(model)
    out = model(torch.randn(1, 5, 5))  # unbatched [C, H, W]
    with pytest.raises(ValueError, match=r"module '\d' \((Linear|Conv2d)\).*batched input"):
        engm_fast.per_example_grad_norms(model, out)
    engm_fast.release(model)


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with engm_fast.use_backend("tpu"):
            pass


# -- issue 7: every bad input gives the right result or a clear error, never a partial step ------

def ce_sum(run, a, b):
    return F.cross_entropy(run(a), b, reduction="sum")


def expected_grad(model, x, y, names=None):
    """ENGM's .grad by its definition (vmap), norms over the parameters ``names`` only."""
    g = vmap_per_example_grads(model, ce_sum, x, y)
    if names is not None:
        g = {n: v for n, v in g.items() if n in names}
    w = 1.0 / (flat_norms(g) + 1e-6) / x.shape[0]
    return {n: torch.einsum("b,b...->...", w, v) for n, v in g.items()}


def check_grads(model, want, tol=dict(rtol=1e-9, atol=1e-12)):
    for n, p in model.named_parameters():
        if n in want:
            torch.testing.assert_close(p.grad, want[n], **tol, msg=lambda m: f"{n}: {m}")
        else:
            assert p.grad is None, f"{n} got a gradient but is not optimized"


def params_of(model):
    return [p.detach().clone() for p in model.parameters()]


def assert_unchanged(model, before):
    opt_step_grads = [p.grad for p in model.parameters()]
    assert all(g is None for g in opt_step_grads), "a gradient was written before the error"
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))


@pytest.mark.parametrize("make_losses,match", [
    (lambda model, x, y: F.cross_entropy(model(x[:0]), y[:0], reduction="none"), "empty"),
    (lambda model, x, y: F.cross_entropy(model(x), y).reshape(1), r"\(1,\).*\(5, \d\)"),  # .mean() kept as [1]
    (lambda model, x, y: F.cross_entropy(model(x), y), r"1-D.*\(\)"),
    (lambda model, x, y: F.cross_entropy(nn.Linear(4, 3).double()(x), y, reduction="none"), "no graph|another model"),
    (lambda model, x, y: F.cross_entropy(model(x), y, reduction="none") + torch.tensor([0, 0, float("inf"), 0, 0]),
     r"1 of 5 losses.*\[2\]"),
])
@pytest.mark.parametrize("norm_source", ["exact", "input_proxy"])
def test_bad_losses_raise_and_leave_everything_untouched(make_losses, match, norm_source):
    model, opt, x, y = setup(momentum=0.9, norm_source=norm_source)
    before = params_of(model)
    with pytest.raises((ValueError, FloatingPointError), match=match):
        opt.backward(make_losses(model, x, y))
    opt.step()  # nothing to apply: no .grad was written
    assert_unchanged(model, before)
    assert opt.backward_steps == 0 and opt.state_dict()["state"] == {}


def test_bad_losses_on_a_proxy_step_leave_everything_untouched():
    """After calibration (the proxy path, one ordinary backward): the same guarantees."""
    model, opt, x, y = setup(norm_source="input_proxy", calibrate_every=100)
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    opt.zero_grad()
    before = params_of(model)
    with pytest.raises(ValueError, match=r"\(1,\).*batch of 5"):
        opt.backward(F.cross_entropy(model(x), y).reshape(1))
    with pytest.raises(FloatingPointError, match=r"1 of 5 losses"):
        opt.backward(F.cross_entropy(model(x), y, reduction="none") * torch.tensor([1, 1, 1, float("nan"), 1]))
    assert_unchanged(model, before)


@pytest.mark.parametrize("norm_source", ["exact", "input_proxy"])
def test_batch_of_one(norm_source):
    model, opt, x, y = setup(norm_source=norm_source)
    x1, y1 = x[2:3], y[2:3]
    norms = opt.backward(F.cross_entropy(model(x1), y1, reduction="none"))
    g = vmap_per_example_grads(model, ce_sum, x1, y1)
    torch.testing.assert_close(norms, flat_norms(g), rtol=1e-9, atol=1e-12)
    check_grads(model, expected_grad(model, x1, y1))


def test_nonfinite_input_dropped_on_a_proxy_step():
    """A dropped example's NaN activations must not reach other examples' gradient (0 * NaN)."""
    model, opt, x, y = setup(norm_source="input_proxy", calibrate_every=100, nonfinite="drop")
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))  # calibration (exact) step
    opt.zero_grad()
    bad = x.clone()
    bad[4, 1] = float("nan")
    bad_in = bad.clone().requires_grad_(True)
    losses = F.cross_entropy(model(bad_in), y, reduction="none")
    (gx,) = torch.autograd.grad(losses.sum(), bad_in, retain_graph=True)
    in_norms = gx.flatten(1).norm(dim=1)
    used = opt.backward(losses, input_grad_norms=in_norms)
    assert opt.last_dropped == [4]
    keep = torch.arange(4)
    s = opt.proxy_stats
    est = (s["alpha"] * in_norms[keep] + s["beta"]).clamp_min(0)
    torch.testing.assert_close(used[keep], est, rtol=1e-9, atol=1e-12)
    g = vmap_per_example_grads(model, ce_sum, x[keep], y[keep])
    w = 1.0 / (est + 1e-6) / 4
    for n, p in model.named_parameters():
        assert torch.isfinite(p.grad).all(), n
        torch.testing.assert_close(p.grad, torch.einsum("b,b...->...", w, g[n]), rtol=1e-9, atol=1e-12)


def test_frozen_layer_norms_over_trainable_parameters_only():
    model, opt, x, y = setup()
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    model[0].requires_grad_(False)
    opt = engm_fast.ENGM(model, lr=0.1, momentum=0.9)
    frozen = params_of(model)[:2]
    norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    want = expected_grad(model, x, y)  # vmap over trainable parameters only
    assert set(want) == {"2.weight", "2.bias"}
    torch.testing.assert_close(norms, flat_norms(vmap_per_example_grads(model, ce_sum, x, y)), rtol=1e-9, atol=1e-12)
    check_grads(model, want)
    opt.step()
    assert all(torch.equal(a, b) for a, b in zip(frozen, list(model.parameters())[:2]))


def test_requires_grad_toggled_between_steps():
    """Freezing and unfreezing a layer between steps: each step's norms are over the parameters
    that are trainable at that step, and SGD's rule (no .grad, no update) holds for the others."""
    model, opt, x, y = setup(momentum=0.9)
    plan = [set(), {"0.weight", "0.bias"}, set(), {"2.bias"}]
    g = torch.Generator().manual_seed(3)
    bufs = {}
    for frozen in plan:
        xb, yb = torch.randn(5, 4, generator=g, dtype=torch.float64), torch.randint(0, 3, (5,), generator=g)
        for n, p in model.named_parameters():
            p.requires_grad_(n not in frozen)
        want = expected_grad(model, xb, yb)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        opt.zero_grad()
        opt.backward(F.cross_entropy(model(xb), yb, reduction="none"))
        check_grads(model, want)
        opt.step()
        for n, p in model.named_parameters():  # SGD momentum by hand
            if n in frozen:
                assert torch.equal(p, before[n])
                continue
            bufs[n] = want[n].clone() if n not in bufs else 0.9 * bufs[n] + want[n]
            torch.testing.assert_close(p, before[n] - 0.1 * bufs[n], rtol=1e-12, atol=1e-14)


def test_module_added_after_the_optimizer():
    model, opt, x, y = setup()
    model.append(nn.Tanh())
    model.append(nn.Linear(3, 3).double())
    # Not in the optimizer (as with torch.optim): not trained, not part of the norms.
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    check_grads(model, expected_grad(model, x, y, names={"0.weight", "0.bias", "2.weight", "2.bias"}))
    # add_param_group: the engine starts recording the new module; the norms include it.
    opt.zero_grad()
    opt.add_param_group({"params": model[4].parameters()})
    opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    check_grads(model, expected_grad(model, x, y))


def test_param_group_added_after_the_forward_is_named():
    model, opt, x, y = setup()
    model.append(nn.Linear(3, 3).double())
    losses = F.cross_entropy(model(x), y, reduction="none")  # model[3] not recorded in this forward
    opt.add_param_group({"params": model[3].parameters()})
    with pytest.raises(NotImplementedError, match=r"3\.weight.*not recorded"):
        opt.backward(losses)
    assert all(p.grad is None for p in model.parameters())


def test_mixed_dtype_parameters():
    class Cast(nn.Module):
        def forward(self, t):
            return t.float()

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6).double(), nn.Tanh(), Cast(), nn.Linear(6, 3))
    opt = engm_fast.ENGM(model, lr=0.1)
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    assert [p.grad.dtype for p in model.parameters()] == [torch.float64, torch.float64, torch.float32, torch.float32]
    ref = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    ref[0].load_state_dict(model[0].state_dict())
    ref[2].load_state_dict({k: v.double() for k, v in model[3].state_dict().items()})
    g = vmap_per_example_grads(ref, ce_sum, x, y)
    torch.testing.assert_close(norms.double(), flat_norms(g), rtol=1e-5, atol=1e-6)
    want = expected_grad(ref, x, y)
    for (n, p), q in zip(model.named_parameters(), want.values()):
        torch.testing.assert_close(p.grad.double(), q, rtol=1e-5, atol=1e-6)


def test_parameters_on_several_devices_are_refused():
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3, device="meta"))
    with pytest.raises(ValueError, match=r"several devices: cpu .*'0.weight'.*meta .*'2.weight'"):
        engm_fast.ENGM(model, lr=0.1)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
    opt = engm_fast.ENGM(model, lr=0.1)
    with pytest.raises(ValueError, match="several devices"):
        opt.add_param_group({"params": nn.Linear(2, 2, device="meta").parameters()})
    assert len(opt.param_groups) == 1


# -- one exception type per kind of bad input, across ENGM.backward and per_example_grad_norms --

BAD_LOSSES = {  # kind: (make(model, x, y), exception type)
    "not a tensor": (lambda model, x, y: [0.5] * 5, TypeError),
    "integer tensor": (lambda model, x, y: torch.ones(5, dtype=torch.long), TypeError),
    "2-D": (lambda model, x, y: F.cross_entropy(model(x), y, reduction="none").unsqueeze(1), ValueError),
    "0-D (reduced)": (lambda model, x, y: F.cross_entropy(model(x), y), ValueError),
    "empty": (lambda model, x, y: F.cross_entropy(model(x[:0]), y[:0], reduction="none"), ValueError),
    "detached": (lambda model, x, y: F.cross_entropy(model(x), y, reduction="none").detach(), ValueError),
    "another model": (lambda model, x, y: F.cross_entropy(nn.Linear(4, 3).double()(x), y, reduction="none"),
                      ValueError),
    "wrong length": (lambda model, x, y: F.cross_entropy(model(x), y, reduction="none")[:3], ValueError),
}


def _norms_with_engine(model, x, y, make):
    engm_fast.attach(model)
    return engm_fast.per_example_grad_norms(model, make(model, x, y))


def _norms_without_engine(model, x, y, make):
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="per_example_grad_norms: no engine")
        return engm_fast.per_example_grad_norms(model, make(model, x, y))


def _engm(**kw):
    def call(model, x, y, make):
        opt = engm_fast.ENGM(model, lr=0.1, **kw)
        return opt.backward(make(model, x, y))
    return call


def _engm_proxy_step(explicit_norms):
    """ENGM with the input proxy after its calibration step: the proxy path itself."""
    def call(model, x, y, make):
        opt = engm_fast.ENGM(model, lr=0.1, norm_source="input_proxy", calibrate_every=100)
        opt.backward(F.cross_entropy(model(x), y, reduction="none"))
        assert opt.proxy.fitted
        opt.zero_grad()
        norms = torch.ones(5, dtype=torch.float64) if explicit_norms else None
        return opt.backward(make(model, x, y), input_grad_norms=norms)
    return call


CALLERS = {
    "per_example_grad_norms": _norms_with_engine,
    "per_example_grad_norms without engine": _norms_without_engine,
    "ENGM exact": _engm(),
    "ENGM input_proxy (calibration step)": _engm(norm_source="input_proxy"),
    "ENGM input_proxy (proxy step)": _engm_proxy_step(explicit_norms=False),
    "ENGM input_proxy (proxy step, given norms)": _engm_proxy_step(explicit_norms=True),
}


@pytest.mark.parametrize("caller", list(CALLERS))
@pytest.mark.parametrize("kind", list(BAD_LOSSES))
def test_one_exception_type_per_kind_of_bad_losses(kind, caller):
    if kind == "wrong length" and caller == "per_example_grad_norms without engine":
        pytest.skip("without an engine nothing records the batch the model saw")
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
    x, y = torch.randn(5, 4, dtype=torch.float64), torch.randint(0, 3, (5,))
    make, expected = BAD_LOSSES[kind]
    with pytest.raises(Exception) as info:
        CALLERS[caller](model, x, y, make)
    assert type(info.value) is expected, f"{caller} on {kind} losses: {type(info.value).__name__}: {info.value}"
    assert all(p.grad is None for p in model.parameters())
