"""The C++ CPU ops (csrc/cpu) against the float64 reference (engm_fast/reference.py).

Errors are measured against the float64 reference of the same (already rounded) inputs and
divided by the same quantity computed with absolute values,

    per_example_sqnorm:  bound_i  = || |b_i|^T |a_i| ||_F^2
    weighted_outer_sum:  bound_oi = ( (|w| |b|)^T |a| )_oi

the scale a rounding-error bound of either route is proportional to (both routes cancel
terms: Gram entries, or entries of b_i^T a_i). Tolerances below are per dtype: sums of squares
are computed in float32 for 16- and 32-bit inputs, so all three share float32's; the weighted
sum is returned in the input dtype, so 16-bit outputs carry one rounding to that dtype
(unit roundoff 2^-11 for float16, 2^-8 for bfloat16). Measured worst cases over 20 seeds x 8
shapes: float64 5e-16, float32 4e-7 (both ops), float16 / bfloat16 outer 4.4e-4 / 3.7e-3.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from engm_fast import reference

try:  # importing the extension registers torch.ops.engm_fast.*
    import engm_fast._C  # noqa: F401
except ModuleNotFoundError as exc:  # not built: skip, unless CI (which builds it) runs us
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise
    pytest.skip(
        f"engm_fast._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`",
        allow_module_level=True,
    )
# An ImportError other than "not found" (a broken build, missing symbols) fails collection.

OPS = torch.ops.engm_fast

# Normalized error tolerances (see the module docstring), per input dtype.
TOL = {
    torch.float64: {"sqnorm": 1e-12, "outer": 1e-12},
    torch.float32: {"sqnorm": 4e-6, "outer": 4e-6},
    torch.float16: {"sqnorm": 4e-6, "outer": 6e-4},
    torch.bfloat16: {"sqnorm": 4e-6, "outer": 5e-3},
}
DTYPES = list(TOL)
MODES = ("auto", "ghost", "direct")

# (B, T, d_in, d_out): T = 1, d = 1, B = 1, odd sizes; T = 300 spans two 256-row Gram tiles
# (off-diagonal tile path); 127 x 129 batches 4 examples per direct-route GEMM, so the
# per-thread chunks of 13 examples end in partial groups; B >= 2 runs the per-example parallel
# path on a multi-core machine, B = 1 the serial one.
SHAPES_3D = [
    (1, 1, 1, 1),
    (7, 1, 13, 33),
    (13, 7, 1, 5),
    (5, 33, 13, 7),
    (3, 13, 33, 1),
    (1, 33, 7, 13),
    (33, 13, 7, 13),
    (2, 300, 3, 5),
    (13, 5, 127, 129),
]
# (B, d_in, d_out) for [B, d] inputs (T = 1).
SHAPES_2D = [(1, 1, 1), (7, 13, 33), (33, 1, 7), (13, 33, 1)]


def _seed(*parts) -> int:
    """A distinct, reproducible seed per test case (crc32: str hashes vary between runs)."""
    return zlib.crc32(repr(parts).encode())


def _inputs(shape_a, shape_b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape_a, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape_b, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(shape_a[0], generator=g, dtype=torch.float64) * 2 - 0.5  # signed weights
    return a, b, w


def _rows3(x):
    return x.unsqueeze(1) if x.dim() == 2 else x


def _check_sqnorm(a, b, mode, context):
    out = OPS.per_example_sqnorm(a, b, mode)
    ref = reference.per_example_sqnorm(a.double(), b.double(), mode)
    assert out.dtype == reference.accumulation_dtype(a.dtype), context
    assert out.shape == (a.shape[0],), context
    a3, b3 = _rows3(a.double()), _rows3(b.double())
    bound = torch.einsum("bto,bti->boi", b3.abs(), a3.abs()).pow(2).sum((1, 2))
    err = ((out.double() - ref).abs() / bound.clamp_min(1e-300)).max().item() if out.numel() else 0.0
    assert err <= TOL[a.dtype]["sqnorm"], f"{context}: normalized error {err:.3g}"


def _check_outer(a, b, w, context):
    out = OPS.weighted_outer_sum(a, b, w)
    ref = reference.weighted_outer_sum(a.double(), b.double(), w.double())
    assert out.dtype == a.dtype, context
    assert out.shape == (b.shape[-1], a.shape[-1]), context
    bound = reference.weighted_outer_sum(a.double().abs(), b.double().abs(), w.double().abs())
    err = ((out.double() - ref).abs() / bound.clamp_min(1e-300)).max().item() if out.numel() else 0.0
    assert err <= TOL[a.dtype]["outer"], f"{context}: normalized error {err:.3g}"


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_3D, ids=lambda s: "B{}_T{}_{}x{}".format(*s))
def test_3d_matches_reference(shape, dtype):
    B, T, d_in, d_out = shape
    a, b, w = _inputs((B, T, d_in), (B, T, d_out), dtype, _seed("3d", shape, dtype))
    for mode in MODES:
        _check_sqnorm(a, b, mode, f"sqnorm {mode} {shape} {dtype}")
    _check_outer(a, b, w, f"outer {shape} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES_2D, ids=lambda s: "B{}_{}x{}".format(*s))
def test_2d_matches_reference(shape, dtype):
    B, d_in, d_out = shape
    a, b, w = _inputs((B, d_in), (B, d_out), dtype, _seed("2d", shape, dtype))
    for mode in MODES:
        _check_sqnorm(a, b, mode, f"sqnorm {mode} {shape} {dtype}")
    _check_outer(a, b, w, f"outer {shape} {dtype}")


def test_direct_route_tiles_large_layers():
    # d_in * d_out = 4099 * 1030 > 2^22: g_i is reduced in two row tiles of d_out.
    a, b, w = _inputs((2, 3, 4099), (2, 3, 1030), torch.float32, 7)
    _check_sqnorm(a, b, "direct", "direct, two d_out tiles")
    _check_outer(a, b, w, "outer, wide layer")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_auto_route_matches_rule(dtype):
    # Both sides of the rule 2 T^2 <= d_in d_out: (T=4, 4x8) is ghost, (T=5, 4x8) direct.
    for T in (4, 5):
        a, b, w = _inputs((3, T, 4), (3, T, 8), dtype, _seed("rule", T, dtype))
        route = reference.choose_sqnorm_route(T, 4, 8)
        auto = OPS.per_example_sqnorm(a, b, "auto")
        forced = OPS.per_example_sqnorm(a, b, route)
        assert torch.equal(auto, forced), (T, route)


def test_noncontiguous_and_requires_grad_inputs():
    a, b, w = _inputs((13, 7, 5), (13, 7, 3), torch.float32, 11)
    a_t = a.transpose(1, 2).contiguous().transpose(1, 2).requires_grad_()  # strided view
    b_t = b.transpose(0, 1).contiguous().transpose(0, 1).requires_grad_()
    assert not a_t.is_contiguous() and not b_t.is_contiguous()
    for mode in MODES:
        _check_sqnorm(a_t, b_t, mode, f"non-contiguous {mode}")
    _check_outer(a_t, b_t, w, "non-contiguous outer")


def test_inference_mode():
    a, b, w = _inputs((9, 17, 5), (9, 17, 3), torch.float16, 12)
    with torch.inference_mode():
        for mode in MODES:
            _check_sqnorm(a, b, mode, f"inference_mode {mode}")
        _check_outer(a, b, w, "inference_mode outer")


def test_float16_squares_do_not_overflow():
    # 300^2 = 9e4 > 65504 (float16 max): the norms must be accumulated in float32.
    a = torch.full((3, 4, 5), 300.0, dtype=torch.float16)
    b = torch.full((3, 4, 2), 300.0, dtype=torch.float16)
    expected = (4 * 300.0 * 300.0) ** 2 * 5 * 2  # every entry of b_i^T a_i is 4 * 300^2
    for mode in MODES:
        out = OPS.per_example_sqnorm(a, b, mode)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full((3,), expected, dtype=torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_sizes(dtype):
    for shape_a, shape_b in [((0, 3, 4), (0, 3, 2)), ((3, 0, 4), (3, 0, 2)), ((3, 2, 0), (3, 2, 5)), ((0, 4), (0, 2))]:
        a, b, w = _inputs(shape_a, shape_b, dtype, 0)
        for mode in MODES:
            out = OPS.per_example_sqnorm(a, b, mode)
            ref = reference.per_example_sqnorm(a, b, mode)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert torch.equal(out, ref), (shape_a, mode)
        out = OPS.weighted_outer_sum(a, b, w)
        assert out.shape == (shape_b[-1], shape_a[-1]) and out.dtype == dtype
        assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize(
    "a_shape, b_shape, match",
    [
        ((4, 3, 5), (4, 2, 6), r"agree in B \(and T\); got a \[4, 3, 5\] and b \[4, 2, 6\]"),
        ((4, 5), (3, 6), r"agree in B \(and T\); got a \[4, 5\] and b \[3, 6\]"),
        ((4, 3, 5), (4, 6), r"both be \[B, T, d\] or both \[B, d\]; got a \[4, 3, 5\] and b \[4, 6\]"),
        ((5,), (5,), r"both be \[B, T, d\] or both \[B, d\]; got a \[5\] and b \[5\]"),
    ],
)
def test_shape_errors(a_shape, b_shape, match):
    a, b = torch.randn(a_shape), torch.randn(b_shape)
    w = torch.ones(a_shape[0])
    with pytest.raises(RuntimeError, match="per_example_sqnorm: .*" + match):
        OPS.per_example_sqnorm(a, b, "auto")
    with pytest.raises(RuntimeError, match="weighted_outer_sum: .*" + match):
        OPS.weighted_outer_sum(a, b, w)


def test_dtype_mode_and_weight_errors():
    a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
    with pytest.raises(RuntimeError, match=r"mode must be one of \('auto', 'ghost', 'direct'\), got 'fast'"):
        OPS.per_example_sqnorm(a, b, "fast")
    with pytest.raises(RuntimeError, match="share one dtype.*got Float and Double"):
        OPS.per_example_sqnorm(a, b.double())
    with pytest.raises(RuntimeError, match="share one dtype.*got Long and Long"):
        OPS.per_example_sqnorm(a.long(), b.long())
    with pytest.raises(RuntimeError, match=r"w must be \[B\] = \[4\], got \[3\]"):
        OPS.weighted_outer_sum(a, b, torch.ones(3))
    with pytest.raises(RuntimeError, match=r"w must be \[B\] = \[4\], got \[4, 1\]"):
        OPS.weighted_outer_sum(a, b, torch.ones(4, 1))


def _opcheck_samples():
    samples = []
    for (B, T, d_in, d_out), dtype in [((5, 7, 3, 4), torch.float32), ((3, 1, 6, 2), torch.float64),
                                       ((4, 9, 13, 5), torch.bfloat16), ((2, 300, 3, 2), torch.float16)]:
        a, b, w = _inputs((B, T, d_in), (B, T, d_out), dtype, _seed("opcheck", B, T, dtype))
        samples.append((a, b, w))
    a, b, w = _inputs((6, 5), (6, 3), torch.float32, 3)  # 2-D
    samples.append((a, b, w))
    return samples


def test_opcheck():
    # The fake (meta) implementations are registered by engm_fast.ops (register_fake).
    import engm_fast.ops  # noqa: F401

    for a, b, w in _opcheck_samples():
        for mode in MODES:
            torch.library.opcheck(OPS.per_example_sqnorm.default, (a, b, mode))
        torch.library.opcheck(OPS.per_example_sqnorm.default, (a, b))  # default mode
        torch.library.opcheck(OPS.weighted_outer_sum.default, (a, b, w))
