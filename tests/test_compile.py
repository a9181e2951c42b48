"""ENGM on a torch.compile'd model equals ENGM on the eager model; fullgraph=True is refused
with a message that names it.

The engine breaks the compiled graph at each recorded layer call (its taps must run eagerly),
so every mode but fullgraph works. Most tests use the "aot_eager" backend (dynamo + AOTAutograd,
no code generation: fast); one runs the default inductor backend end to end.
"""
from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast

pytest.importorskip("torch._dynamo")
import torch._dynamo  # noqa: E402  (reset between tests)


def make_model():
    torch.manual_seed(8)
    return nn.Sequential(nn.Conv2d(1, 3, 3), nn.GroupNorm(1, 3), nn.ReLU(), nn.Flatten(), nn.Linear(27, 4)).double()


def batches(n, B=6):
    g = torch.Generator().manual_seed(9)
    return [(torch.randn(B, 1, 5, 5, generator=g, dtype=torch.float64), torch.randint(0, 4, (B,), generator=g))
            for _ in range(n)]


def run(model, opt, data):
    norms = []
    for x, y in data:
        opt.zero_grad()
        norms.append(opt.backward(F.cross_entropy(model(x), y, reduction="none")))
        opt.step()
    return norms


def eager_reference(model, data, **kw):
    ref = copy.deepcopy(model)
    return ref, run(ref, engm_fast.ENGM(ref, **kw), data)


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("how,norm_source", [("wrapper", "exact"), ("in_place", "exact"), ("wrapper", "input_proxy")])
def test_compiled_model_equals_eager(how, norm_source):
    model = make_model()
    data = batches(3)
    kw = dict(lr=0.1, momentum=0.9, norm_source=norm_source, calibrate_every=2)
    ref, ref_norms = eager_reference(model, data, **kw)
    if how == "wrapper":  # compiled before the optimizer is built
        compiled = torch.compile(model, backend="aot_eager")
        opt = engm_fast.ENGM(compiled, **kw)
    else:  # optimizer (and engine) first, then compiled in place
        opt = engm_fast.ENGM(model, **kw)
        model.compile(backend="aot_eager")
        compiled = model
    assert engm_fast.engine_of(model) is opt.engine  # one engine for the model, whichever handle
    norms = run(compiled, opt, data)
    for a, b in zip(norms, ref_norms):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_inductor_backend():
    model = make_model().float()
    data = [(x.float(), y) for x, y in batches(2)]
    ref, ref_norms = eager_reference(model, data, lr=0.1)
    compiled = torch.compile(model)
    norms = run(compiled, engm_fast.ENGM(compiled, lr=0.1), data)
    for a, b in zip(norms, ref_norms):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("flag", ["fullgraph", "error_on_graph_break"])
def test_fullgraph_wrapper_refused_at_construction(flag):
    kwargs = {flag: True}
    if flag == "error_on_graph_break":
        import inspect
        if "error_on_graph_break" not in inspect.signature(torch.compile).parameters:
            pytest.skip("this torch.compile has no error_on_graph_break")
    compiled = torch.compile(make_model(), backend="aot_eager", **kwargs)
    with pytest.raises(ValueError, match=rf"{flag}=True.*not supported"):
        engm_fast.ENGM(compiled, lr=0.1)


def test_fullgraph_after_attach_fails_with_a_message_naming_it():
    """Compiled with fullgraph after the engine was attached: dynamo stops at the engine's hook,
    and its error shows the hook's source line, which says what is unsupported."""
    model = make_model()
    engm_fast.ENGM(model, lr=0.1)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    x, _ = batches(1)[0]
    with pytest.raises(Exception, match=r"(?s)engm_fast.*fullgraph=True\) is not supported"):
        compiled(x)
