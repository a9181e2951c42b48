"""The CUDA ops (csrc/cuda) against the float64 reference (engm_fast/reference.py), on a GPU.

Skipped where torch sees no CUDA device, or where the extension is not built (except under
CI=true, as the CPU tests). Where the extension is built, its CUDA kernels must be in it
(setup.py adds them when torch has CUDA and nvcc is found): a missing CUDA kernel fails
test_cuda_kernels_registered instead of skipping anything. benchmarks/gpu_validate.sh builds the wheel,
installs it and runs this file on the lent GPU machine.

Errors are normalized as in tests/test_native_cpu_ops.py: |out - ref| divided by the same
quantity computed with absolute values (|| |b_i|^T |a_i| ||^2 for the norms,
(|w| |b|)^T |a| for the weighted sum), the scale rounding errors are proportional to.
Per-dtype tolerances, and why:
  * sqnorm, fp16 / bf16 / float: fp32 accumulation. 16-bit products are exact in fp32 and the
    tensor cores accumulate them in fp32; a length-T sum has a worst-case relative error of
    about T * 2^-24 (T = 300: 1.8e-5), squares double it, random signs make it far smaller.
    3e-5 bounds the worst case of the shapes below; a wrong index gives O(1).
  * sqnorm, double: 1e-12.
  * weighted_outer_sum: compared with the reference on the weights rounded to the input dtype
    (the op's `w.to(b.dtype)`); w * b is rounded to the input dtype (the tensor cores take
    16-bit operands) and the fp32 sum is rounded once to the output dtype: two unit roundoffs,
    2 * 2^-11 ~ 9.8e-4 (fp16) and 2 * 2^-8 ~ 7.8e-3 (bf16), bounded by 1.2e-3 and 9e-3; fp32
    1e-5 (sums of up to ~6400 products); double 1e-12.
The update op is compared one step at a time, from its own previous state (so errors cannot
accumulate), with the reference's arithmetic done in float64 at the op's documented rounding
points (the stored buffer, rounded to the parameter dtype, is the one the step uses): a
result may differ by one rounding of the stored value plus fp32 arithmetic, so the bound is
u times the sum of the magnitudes of the terms (|p| + lr (|g| + wd |p| + momentum |buf| ...)),
with u = 2^-10 (fp16), 2^-7 (bf16): one rounding of the stored value, plus fp32 arithmetic;
2^-21 (float: about four fp32 roundings) and 1e-12 (double). float64 parameters are also
compared with reference.sgd_momentum_update_ itself, and float32 runs of several steps with
torch.optim.SGD.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

from engm_fast import reference

pytestmark = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no CUDA device visible to torch (torch.cuda.is_available() is False)"
)

if torch.cuda.is_available():
    try:  # importing the extension registers torch.ops.engm_fast.*
        import engm_fast._C  # noqa: F401
    except ModuleNotFoundError as exc:  # not built: skip, unless CI (gpu_validate.sh) runs us
        if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
            raise
        pytest.skip(f"engm_fast._C is not built ({exc}); build it with `pip install --no-build-isolation -e .`",
                    allow_module_level=True)
    import engm_fast.ops  # noqa: F401  (fake implementations for opcheck)

OPS = torch.ops.engm_fast
DEV = "cuda"

TOL = {
    torch.float64: {"sqnorm": 1e-12, "outer": 1e-12},
    torch.float32: {"sqnorm": 3e-5, "outer": 1e-5},
    torch.float16: {"sqnorm": 3e-5, "outer": 1.2e-3},
    torch.bfloat16: {"sqnorm": 3e-5, "outer": 9e-3},
}
DTYPES = list(TOL)
MODES = ("auto", "ghost", "direct")

# (B, T, d_in, d_out). T = 1, d = 1, B = 1; sizes that are not multiples of any tile (7, 13, 33,
# 65, 129); d_out > 64 (the 128-row tile configuration); several tiles in both dimensions
# (257 x 129); d multiples of 8 (16-byte vector copies: 64, 24) and even non-multiples (6,
# 18: 4-byte copies for 16-bit types); ghost with T <= 32 (32-row blocks), 33 (one 64-row
# block) and 300 (5 blocks, off-diagonal pairs).
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
    (3, 17, 257, 129),
    (4, 40, 64, 24),
    (3, 31, 18, 6),
    (2, 65, 65, 65),
]
SHAPES_2D = [(1, 1, 1), (7, 13, 33), (33, 1, 7), (13, 33, 1), (64, 128, 72)]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _inputs(shape_a, shape_b, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape_a, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape_b, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(shape_a[0], generator=g, dtype=torch.float64) * 2 - 0.5  # signed weights
    return a.to(DEV), b.to(DEV), w.to(DEV)


def _rows3(x):
    return x.unsqueeze(1) if x.dim() == 2 else x


def _check_sqnorm(a, b, mode, context):
    out = OPS.per_example_sqnorm(a, b, mode)
    torch.cuda.synchronize()
    assert out.device == a.device, context
    assert out.dtype == reference.accumulation_dtype(a.dtype), context
    assert out.shape == (a.shape[0],), context
    a64, b64 = a.double().cpu(), b.double().cpu()
    ref = reference.per_example_sqnorm(a64, b64, mode)
    a3, b3 = _rows3(a64), _rows3(b64)
    bound = torch.einsum("bto,bti->boi", b3.abs(), a3.abs()).pow(2).sum((1, 2))
    o = out.double().cpu()
    assert not torch.isnan(o).any(), f"{context}: NaN in output"
    err = ((o - ref).abs() / bound.clamp_min(1e-300)).max().item() if o.numel() else 0.0
    assert err <= TOL[a.dtype]["sqnorm"], f"{context}: normalized error {err:.3g}"


def _check_outer(a, b, w, context):
    out = OPS.weighted_outer_sum(a, b, w)
    torch.cuda.synchronize()
    assert out.device == a.device and out.dtype == a.dtype, context
    assert out.shape == (b.shape[-1], a.shape[-1]), context
    # The op rounds w to the inputs' dtype, as the reference's `w.to(b.dtype)`: the float64
    # reference gets the same rounded weights (part of the op's definition).
    a64, b64, w64 = a.double().cpu(), b.double().cpu(), w.to(a.dtype).double().cpu()
    ref = reference.weighted_outer_sum(a64, b64, w64)
    bound = reference.weighted_outer_sum(a64.abs(), b64.abs(), w64.abs())
    o = out.double().cpu()
    assert not torch.isnan(o).any(), f"{context}: NaN in output"
    err = ((o - ref).abs() / bound.clamp_min(1e-300)).max().item() if o.numel() else 0.0
    assert err <= TOL[a.dtype]["outer"], f"{context}: normalized error {err:.3g}"


def test_cuda_kernels_registered():
    for op in ("per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"engm_fast::{op}", "CUDA"), (
            f"engm_fast::{op} has no CUDA kernel: the extension was built without csrc/cuda "
            "(torch without CUDA, or nvcc / CUDA_HOME not found at build time)"
        )


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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_layouts(dtype):
    """Strided views (padded rows: 16-byte copies whose last chunk straddles the row end),
    misaligned storage offsets (narrower copies), non-contiguous last dimension (copied)."""
    B, T, d_in, d_out = 5, 37, 29, 19
    a, b, w = _inputs((B, T, d_in + 11), (B, T, d_out + 13), dtype, _seed("layout", dtype))
    a_pad, b_pad = a[..., :d_in], b[..., :d_out]  # row strides 40 and 32 elements
    a_flat = torch.randn(B * T * d_in + 1, dtype=torch.float64).to(dtype).to(DEV)
    b_flat = torch.randn(B * T * d_out + 1, dtype=torch.float64).to(dtype).to(DEV)
    a_mis = a_flat[1:].view(B, T, d_in)  # storage offset of one element
    b_mis = b_flat[1:].view(B, T, d_out)
    a_t = a_pad.transpose(1, 2).contiguous().transpose(1, 2)  # last-dimension stride T
    for name, (x, y) in {"padded": (a_pad, b_pad), "misaligned": (a_mis, b_mis), "transposed": (a_t, b_pad)}.items():
        for mode in MODES:
            _check_sqnorm(x, y, mode, f"{name} sqnorm {mode} {dtype}")
        _check_outer(x, y, w, f"{name} outer {dtype}")
    # expanded (zero-stride) batch
    a_e = a_pad[:1].expand(B, T, d_in)
    _check_sqnorm(a_e, b_pad, "direct", f"expanded sqnorm {dtype}")
    _check_outer(a_e, b_pad, w, f"expanded outer {dtype}")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_weighted_split_reduction(dtype):
    # B*T = 6400 rows into a 33 x 65 output (one or two tiles): split over many CTAs, then the
    # splits are added; weights of both signs and of very different sizes.
    B, T = 64, 100
    a, b, w = _inputs((B, T, 65), (B, T, 33), dtype, _seed("split", dtype))
    w = w * torch.logspace(-3, 3, B, device=DEV, dtype=torch.float64)
    _check_outer(a, b, w, f"split outer {dtype}")
    _check_outer(a, b, w.float(), f"split outer float32 w {dtype}")


def test_auto_route_matches_rule():
    for dtype in DTYPES:
        for T in (4, 5):
            a, b, _ = _inputs((3, T, 4), (3, T, 8), dtype, _seed("rule", T, dtype))
            route = reference.choose_sqnorm_route(T, 4, 8)
            assert torch.equal(OPS.per_example_sqnorm(a, b, "auto"), OPS.per_example_sqnorm(a, b, route)), (T, dtype)


def test_deterministic():
    a, b, w = _inputs((9, 200, 130), (9, 200, 70), torch.bfloat16, 5)
    for mode in ("ghost", "direct"):
        assert torch.equal(OPS.per_example_sqnorm(a, b, mode), OPS.per_example_sqnorm(a, b, mode)), mode
    assert torch.equal(OPS.weighted_outer_sum(a, b, w), OPS.weighted_outer_sum(a, b, w))


def test_float16_squares_do_not_overflow():
    a = torch.full((3, 4, 5), 300.0, dtype=torch.float16, device=DEV)
    b = torch.full((3, 4, 2), 300.0, dtype=torch.float16, device=DEV)
    expected = (4 * 300.0 * 300.0) ** 2 * 5 * 2
    for mode in MODES:
        out = OPS.per_example_sqnorm(a, b, mode)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), torch.full((3,), expected, dtype=torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_sizes(dtype):
    for shape_a, shape_b in [((0, 3, 4), (0, 3, 2)), ((3, 0, 4), (3, 0, 2)), ((3, 2, 0), (3, 2, 5)), ((0, 4), (0, 2))]:
        a, b, w = _inputs(shape_a, shape_b, dtype, 0)
        for mode in MODES:
            out = OPS.per_example_sqnorm(a, b, mode)
            ref = reference.per_example_sqnorm(a.cpu(), b.cpu(), mode)
            assert out.dtype == ref.dtype and out.shape == ref.shape
            assert torch.equal(out.cpu(), ref), (shape_a, mode)
        out = OPS.weighted_outer_sum(a, b, w)
        assert out.shape == (shape_b[-1], shape_a[-1]) and out.dtype == dtype
        assert torch.count_nonzero(out) == 0


def test_errors():
    a, b = torch.randn(4, 3, 5, device=DEV), torch.randn(4, 3, 2, device=DEV)
    with pytest.raises(RuntimeError, match=r"mode must be one of \('auto', 'ghost', 'direct'\), got 'fast'"):
        OPS.per_example_sqnorm(a, b, "fast")
    with pytest.raises(RuntimeError, match=r"agree in B \(and T\); got a \[4, 3, 5\] and b \[4, 2, 6\]"):
        OPS.per_example_sqnorm(a, torch.randn(4, 2, 6, device=DEV))
    with pytest.raises(RuntimeError, match="share one dtype.*got Float and Double"):
        OPS.per_example_sqnorm(a, b.double())
    with pytest.raises(RuntimeError, match="different devices"):
        OPS.per_example_sqnorm(a, b.cpu())
    with pytest.raises(RuntimeError, match=r"w must be \[B\] = \[4\], got \[3\]"):
        OPS.weighted_outer_sum(a, b, torch.ones(3, device=DEV))
    with pytest.raises(RuntimeError, match="w is on cpu"):
        OPS.weighted_outer_sum(a, b, torch.ones(4))


# ----------------------------------------------------------------------------- update op

UPDATE_U = {torch.float64: 1e-12, torch.float32: 2.0**-21, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# (lr, momentum, dampening, weight_decay, nesterov)
UPDATE_CASES = [
    (0.1, 0.9, 0.0, 0.0, False),
    (0.05, 0.9, 0.0, 5e-4, True),
    (0.2, 0.5, 0.3, 1e-2, False),
    (0.1, 0.0, 0.0, 1e-3, False),  # no momentum: empty buffer list
]


def _update_tensors(seed):
    """Mixed dtypes in one call, sizes across chunk boundaries (16384 elements), misaligned,
    strided and channels-last views."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype).to(DEV)

    flat = rnd(1001, dtype=torch.float16)
    strided_base = rnd(40, 66)
    params = [
        rnd(16384 * 3 + 5),                       # 4 chunks, 16-byte vectors and a tail
        rnd(7, 13),
        flat[1:],                                 # misaligned by 2 bytes: element-wise path
        rnd(1, dtype=torch.bfloat16),
        rnd(33, 65, dtype=torch.float64),
        strided_base[:, ::2],                     # not dense: updated through a copy
        rnd(8, 3, 5, 5).to(memory_format=torch.channels_last),  # dense, not contiguous
        rnd(0),                                   # empty
    ]
    grads = [rnd(*p.shape, dtype=p.dtype) for p in params]
    bufs = [rnd(*p.shape, dtype=p.dtype) for p in params]
    return params, grads, bufs


def _expected_step(p, g, buf, case, first_step):
    """reference.sgd_momentum_update_'s arithmetic in float64, the buffer rounded to p's dtype
    where the op stores it. Returns (param, buffer, param scale, buffer scale): the scales sum
    the magnitudes of the terms each result is computed from, which rounding errors are
    proportional to (cancellation between terms does not shrink them)."""
    lr, momentum, dampening, wd, nesterov = case
    p64, g64 = p.double().cpu(), g.double().cpu()
    d = g64 + wd * p64 if wd != 0 else g64
    d_scale = g64.abs() + abs(wd) * p64.abs()
    step_scale = d_scale
    b_new, b_scale = None, None
    if momentum != 0:
        b64 = buf.double().cpu()
        if first_step:
            bv, b_scale = d, d_scale
        else:
            bv = momentum * b64 + (1 - dampening) * d
            b_scale = abs(momentum) * b64.abs() + abs(1 - dampening) * d_scale
        b_new = bv.to(p.dtype).double()
        d = d + momentum * b_new if nesterov else b_new
        step_scale = d_scale + abs(momentum) * b_scale if nesterov else b_scale
    p_new = p64 - lr * d
    return p_new, b_new, p64.abs() + abs(lr) * step_scale, b_scale


@pytest.mark.parametrize("case", UPDATE_CASES, ids=lambda c: "lr{}_m{}_d{}_wd{}_n{}".format(*c))
def test_update_matches_reference_step_by_step(case):
    lr, momentum, dampening, wd, nesterov = case
    params, grads, bufs = _update_tensors(_seed("update", case))
    strided_base = params[5]._base
    strided_other = strided_base[:, 1::2].clone()  # the columns the update must not touch
    for step in range(4):
        first = step == 0
        expected = [_expected_step(p, g, b, case, first) for p, g, b in zip(params, grads, bufs)]
        # float64 param 4 through the reference itself (copies, never views of the op's tensors)
        p64 = [params[4].to("cpu", torch.float64, copy=True)]
        b64 = [bufs[4].to("cpu", torch.float64, copy=True)] if momentum != 0 else []
        g64 = [grads[4].to("cpu", torch.float64, copy=True)]
        reference.sgd_momentum_update_(p64, g64, b64, lr, momentum, dampening, wd, nesterov, first)
        OPS.sgd_momentum_update_(params, grads, bufs if momentum != 0 else [], lr, momentum, dampening, wd, nesterov,
                                 first)
        torch.cuda.synchronize()
        for i, (p, (p_exp, b_exp, p_bound, b_bound)) in enumerate(zip(params, expected)):
            u = UPDATE_U[p.dtype]
            err = (p.double().cpu() - p_exp).abs() - u * p_bound
            assert err.numel() == 0 or err.max().item() <= 0, f"step {step} param {i} ({p.dtype}): {err.max():.3g}"
            if momentum != 0:
                err = (bufs[i].double().cpu() - b_exp).abs() - u * b_bound
                assert err.numel() == 0 or err.max().item() <= 0, f"step {step} buffer {i} ({p.dtype}): {err.max():.3g}"
        torch.testing.assert_close(params[4].cpu(), p64[0], rtol=1e-12, atol=1e-12)  # float64: the reference itself
        grads = [torch.randn_like(x) for x in grads]
    assert params[5]._base is strided_base
    torch.testing.assert_close(strided_base[:, 1::2], strided_other, rtol=0, atol=0)


def test_update_matches_torch_sgd_over_steps():
    torch.manual_seed(3)
    shapes = [(64, 3, 3, 3), (64,), (10, 4096), (10,), (16384 + 7,)]
    params = [torch.randn(s, device=DEV) for s in shapes]
    ours = [p.clone() for p in params]
    theirs = [torch.nn.Parameter(p.clone()) for p in params]
    opt = torch.optim.SGD(theirs, lr=0.05, momentum=0.9, dampening=0.1, weight_decay=1e-3, nesterov=False,
                          foreach=False)
    bufs = [torch.empty_like(p) for p in params]
    for step in range(5):
        grads = [torch.randn_like(p) for p in params]
        for t, g in zip(theirs, grads):
            t.grad = g.clone()
        opt.step()
        OPS.sgd_momentum_update_(ours, grads, bufs, 0.05, 0.9, 0.1, 1e-3, False, step == 0)
    for o, t in zip(ours, theirs):
        torch.testing.assert_close(o, t.detach(), rtol=1e-5, atol=1e-6)


def test_update_errors():
    p, g, b = torch.randn(3, device=DEV), torch.randn(3, device=DEV), torch.randn(3, device=DEV)
    with pytest.raises(RuntimeError, match="got 1 params, 2 grads and 1 momentum buffers"):
        OPS.sgd_momentum_update_([p], [g, g], [b], 0.1, 0.9, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match="got 1 params, 1 grads and 0 momentum buffers"):
        OPS.sgd_momentum_update_([p], [g], [], 0.1, 0.9, 0.0, 0.0, False, False)
    with pytest.raises(RuntimeError, match=r"param 0 has shape \[3\], grad \[4\]"):
        OPS.sgd_momentum_update_([p], [torch.randn(4, device=DEV)], [b], 0.1, 0.9, 0.0, 0.0, False, False)


# ----------------------------------------------------------------------------- opcheck

def test_opcheck():
    samples = []
    for (B, T, d_in, d_out), dtype in [((5, 7, 3, 4), torch.float32), ((3, 1, 6, 2), torch.float64),
                                       ((4, 9, 13, 5), torch.bfloat16), ((2, 300, 3, 2), torch.float16)]:
        samples.append(_inputs((B, T, d_in), (B, T, d_out), dtype, _seed("opcheck", B, T, dtype)))
    samples.append(_inputs((6, 5), (6, 3), torch.float32, 3))
    for a, b, w in samples:
        for mode in MODES:
            torch.library.opcheck(OPS.per_example_sqnorm.default, (a, b, mode))
        torch.library.opcheck(OPS.weighted_outer_sum.default, (a, b, w))


def test_opcheck_update():
    params = [torch.randn(5, 3, device=DEV), torch.randn(7, device=DEV, dtype=torch.bfloat16)]
    grads = [torch.randn_like(p) for p in params]
    bufs = [torch.randn_like(p) for p in params]
    torch.library.opcheck(OPS.sgd_momentum_update_.default, (params, grads, bufs, 0.1, 0.9, 0.0, 1e-4, True, False))
    torch.library.opcheck(OPS.sgd_momentum_update_.default, (params, grads, [], 0.1, 0.0, 0.0, 0.0, False, True))
