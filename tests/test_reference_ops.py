"""reference.py (and engm_fast.ops on every available backend) against brute-force float64 einsum."""
from __future__ import annotations

import pytest
import torch

import engm_fast
from engm_fast import reference

SHAPES = [(1, 1, 1, 1), (3, 1, 7, 5), (5, 4, 1, 9), (4, 13, 6, 1), (7, 33, 17, 10), (2, 70, 3, 4)]
# Relative tolerances per input dtype for squared norms and weighted sums (vs float64 truth).
TOL = {
    torch.float64: dict(rtol=1e-10, atol=1e-12),
    torch.float32: dict(rtol=2e-5, atol=1e-5),
    torch.bfloat16: dict(rtol=2e-2, atol=2e-2),
    torch.float16: dict(rtol=2e-3, atol=2e-3),
}


def brute(a, b, w=None):
    a3 = a.double() if a.dim() == 3 else a.double().unsqueeze(1)
    b3 = b.double() if b.dim() == 3 else b.double().unsqueeze(1)
    g = torch.einsum("bto,bti->boi", b3, a3)
    if w is None:
        return g.pow(2).sum((1, 2))
    return torch.einsum("b,boi->oi", w.double(), g)


@pytest.mark.parametrize("backend", engm_fast.available_backends())
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", reference.SQNORM_MODES)
def test_sqnorm_routes(shape, dtype, mode, backend):
    B, T, din, dout = shape
    a, b = torch.randn(B, T, din).to(dtype), torch.randn(B, T, dout).to(dtype)
    with engm_fast.use_backend(backend):
        got = engm_fast.ops.per_example_sqnorm(a, b, mode)
    assert got.dtype == reference.accumulation_dtype(dtype) and got.shape == (B,)
    torch.testing.assert_close(got.double(), brute(a, b), **TOL[dtype])


@pytest.mark.parametrize("backend", engm_fast.available_backends())
@pytest.mark.parametrize("dtype", list(TOL))
@pytest.mark.parametrize("shape", SHAPES)
def test_weighted_outer_sum(shape, dtype, backend):
    B, T, din, dout = shape
    a, b = torch.randn(B, T, din).to(dtype), torch.randn(B, T, dout).to(dtype)
    w = torch.rand(B)
    with engm_fast.use_backend(backend):
        got = engm_fast.ops.weighted_outer_sum(a, b, w)
    assert got.dtype == dtype and got.shape == (dout, din)
    expect = brute(a, b, w.to(dtype))
    tol = dict(TOL[dtype])
    tol["atol"] = tol["atol"] * max(1.0, float(expect.abs().max()))
    torch.testing.assert_close(got.double(), expect, **tol)


def test_two_dimensional_inputs_are_t_equal_one():
    a, b, w = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64), torch.rand(6, dtype=torch.float64)
    torch.testing.assert_close(reference.per_example_sqnorm(a, b), brute(a, b))
    torch.testing.assert_close(reference.weighted_outer_sum(a, b, w), brute(a, b, w))


def test_route_rule():
    assert reference.choose_sqnorm_route(1, 3, 3) == "ghost"
    assert reference.choose_sqnorm_route(1024, 576, 64) == "direct"  # CIFAR conv: T^2 >> d_in d_out
    assert reference.choose_sqnorm_route(16, 4608, 512) == "ghost"


def test_direct_route_is_chunked(monkeypatch):
    """The direct route never materializes more than its chunk of per-example gradients."""
    monkeypatch.setattr(reference, "_DIRECT_CHUNK_ELEMENTS", 60)
    a, b = torch.randn(9, 4, 6, dtype=torch.float64), torch.randn(9, 4, 5, dtype=torch.float64)
    torch.testing.assert_close(reference.per_example_sqnorm(a, b, "direct"), brute(a, b))


@pytest.mark.parametrize("args,match", [
    ((torch.randn(2, 3), torch.randn(3, 3)), "agree in B"),
    ((torch.randn(2, 3, 4), torch.randn(2, 4)), "both"),
    ((torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64)), "dtype"),
])
def test_bad_shapes(args, match):
    with pytest.raises((ValueError, TypeError), match=match):
        reference.per_example_sqnorm(*args)


def test_bad_mode_and_weights():
    with pytest.raises(ValueError, match="mode"):
        reference.per_example_sqnorm(torch.randn(2, 3), torch.randn(2, 3), "fast")
    with pytest.raises(ValueError, match=r"\[2\]"):
        reference.weighted_outer_sum(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3))
