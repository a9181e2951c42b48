"""Bad input gives a clear error (naming shapes, modules, indices) and leaves .grad untouched."""
from __future__ import annotations

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
    engm_fast.detach(model)


def test_use_backend_unknown_name():
    with pytest.raises(ValueError, match="unknown backend"):
        with engm_fast.use_backend("tpu"):
            pass
