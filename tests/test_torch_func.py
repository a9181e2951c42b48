"""torch.func transforms over a model the engine (ENGM) is attached to: they see the plain
model, record nothing, and the engine's next backward is unaffected."""
from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.func import functional_call, grad, jvp, vmap

import engm_fast
from conftest import flat_norms, plain_copy, vmap_per_example_grads


class Net(nn.Module):
    """A rule layer, a rule-less module (PReLU, parameters followed as shared tensors), a
    replaced forward (MultiheadAttention; torch.func itself cannot vmap nn.LSTM's fused op) and
    a parameter of the root used directly."""

    def __init__(self):
        super().__init__()
        self.inp = nn.Linear(4, 6)
        self.act = nn.PReLU()
        self.attn = nn.MultiheadAttention(6, 2, batch_first=True)
        self.scale = nn.Parameter(torch.rand(6) + 0.5)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        h = self.act(self.inp(x))
        h, _ = self.attn(h, h, h)  # need_weights: the explicit path (SDPA has no forward AD on the CPU)
        return self.head(h.mean(1) * self.scale)


@pytest.mark.parametrize("transform", ["vmap_grad", "jvp"])
def test_transforms_over_an_attached_model(transform):
    torch.manual_seed(0)
    model = Net().double()
    plain = plain_copy(model)
    opt = engm_fast.ENGM(model, lr=0.1)
    x, y = torch.randn(4, 3, 4, dtype=torch.float64), torch.randint(0, 3, (4,))
    params = {n: p.detach() for n, p in model.named_parameters()}

    def loss(m, p, xi, yi):
        return F.cross_entropy(functional_call(m, p, (xi.unsqueeze(0),)), yi.unsqueeze(0))

    if transform == "vmap_grad":
        got = vmap(grad(lambda p, xi, yi: loss(model, p, xi, yi)), in_dims=(None, 0, 0))(params, x, y)
        ref = vmap(grad(lambda p, xi, yi: loss(plain, p, xi, yi)), in_dims=(None, 0, 0))(params, x, y)
        for n in ref:
            torch.testing.assert_close(got[n], ref[n], rtol=1e-12, atol=1e-14)
    else:
        tangent = torch.randn_like(x)
        out, dout = jvp(lambda xx: functional_call(model, params, (xx,)), (x,), (tangent,))
        ref_out, ref_dout = jvp(lambda xx: functional_call(plain, params, (xx,)), (x,), (tangent,))
        torch.testing.assert_close(out, ref_out, rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(dout, ref_dout, rtol=1e-12, atol=1e-14)
    assert opt.engine._tapped_since_backward == set(), "a transform's forward was recorded"
    # The engine still works, and its result did not see the transform.
    opt.zero_grad()
    norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
    ref_norms = flat_norms(vmap_per_example_grads(plain, lambda run, a, b: F.cross_entropy(run(a), b, reduction="sum"),
                                                  x, y))
    torch.testing.assert_close(norms, ref_norms, rtol=1e-9, atol=0.0)
    engm_fast.release(model)


def test_tap_is_a_functorch_compatible_function():
    """The tap defines setup_context, as autograd.Functions used under torch.func must."""
    from engm_fast.engine.tap import _Tap

    assert _Tap.setup_context is not torch.autograd.Function.setup_context
