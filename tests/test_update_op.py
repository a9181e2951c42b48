"""The fused SGD-momentum update, engm_fast.ops.sgd_momentum_update_, on the "cpu" (C++,
csrc/cpu/sgd_momentum.cpp) and "torch" (reference) backends against float64 truth.

Every step is checked from the state the backend itself reached: the truth is
reference.sgd_momentum_update_ applied in float64 to upcast copies of the backend's params and
buffers before the step, so rounding errors do not compound across steps and the tolerance is
that of one step. Errors are divided by the same step computed on absolute values (|p| +
lr |d| for params, mu |buf| + |d| for buffers: the magnitude every intermediate result is
bounded by). One step rounds at most ~6 intermediate values (the reference rounds after each
elementwise op in the tensors' dtype, the C++ kernel only when storing), each by at most the
unit roundoff u of the dtype times that magnitude, so the tolerance is 8u: float64 8.9e-16,
float32 4.8e-7, float16 3.9e-3, bfloat16 3.1e-2 (measured worst cases over these tests: 3.2u
for float32, 2.7u for 16-bit, 0 for float64). A wrong formula moves far more: a dropped
dampening (0.3) changes the buffer by 0.3 |d|, ~15% of its magnitude.
"""
from __future__ import annotations

import zlib

import pytest
import torch

import engm_fast
from engm_fast import reference

BACKENDS = [b for b in ("torch", "cpu") if b in engm_fast.available_backends()]
NATIVE = "cpu" in engm_fast.available_backends()

# 8 x unit roundoff per dtype (module docstring), relative to the magnitude of the step.
TOL = {
    torch.float64: 8 * 2.0**-53,
    torch.float32: 8 * 2.0**-24,
    torch.float16: 8 * 2.0**-11,
    torch.bfloat16: 8 * 2.0**-8,
}
DTYPES = list(TOL)

# (momentum, dampening, weight_decay, nesterov)
HYPER = [
    (0.0, 0.0, 0.0, False),   # plain SGD, no buffers
    (0.0, 0.0, 0.01, False),  # plain SGD with weight decay
    (0.9, 0.0, 0.0, False),
    (0.5, 0.3, 0.01, False),  # dampening and weight decay
    (0.9, 0.0, 0.02, True),   # nesterov
]
LR = 0.5


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _params(dtype, gen, large=True):
    """Odd sizes, a size-0 tensor, a channels_last and a transposed (non-contiguous) param, and
    (``large``) two large ones (40000 + 30000 elements > 2 x at::internal::GRAIN_SIZE = 65536) so
    the C++ kernel's parallel chunks start and end inside tensors."""
    p = [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) for s in [(5, 3), (1,), (33,), (0, 4)]]
    p.append(torch.randn(2, 3, 4, 5, generator=gen, dtype=torch.float64).to(dtype)
             .contiguous(memory_format=torch.channels_last))
    p.append(torch.randn(6, 4, generator=gen, dtype=torch.float64).to(dtype).t())
    if large:
        p += [torch.randn(40000, generator=gen, dtype=torch.float64).to(dtype),
              torch.randn(30000, generator=gen, dtype=torch.float64).to(dtype)]
    return p


def _truth(params, grads, bufs, momentum, dampening, weight_decay, nesterov, first_step):
    """(params, buffers) after one float64 step, and the magnitudes that bound their rounding
    errors: the same step on absolute values with the sign of lr flipped (|p| + lr |d|)."""
    hyper = (momentum, dampening, weight_decay, nesterov, first_step)
    # copies: .double() of a float64 tensor is the tensor itself, which the reference would update
    p64 = [p.to(torch.float64, copy=True) for p in params]
    b64 = [b.to(torch.float64, copy=True) for b in bufs]
    reference.sgd_momentum_update_(p64, [g.double() for g in grads], b64, LR, *hyper)
    p_mag, b_mag = [p.double().abs() for p in params], [b.double().abs() for b in bufs]
    reference.sgd_momentum_update_(p_mag, [g.double().abs() for g in grads], b_mag, -LR, *hyper)
    return (p64, p_mag), (b64, b_mag)


def _check(got, want, dtype, what):
    values, magnitudes = want
    for i, (x, y, mag) in enumerate(zip(got, values, magnitudes)):
        assert x.dtype == dtype and x.shape == y.shape
        if x.numel() == 0:
            continue
        err = ((x.double() - y).abs() / mag.clamp_min(1e-30)).max().item()
        assert err <= TOL[dtype], f"{what} {i}: error {err:.3g} x magnitude > {TOL[dtype]:.3g}"


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "mom{}-damp{}-wd{}-nest{}".format(*h))
def test_steps_match_float64_truth(backend, dtype, hyper):
    momentum, dampening, weight_decay, nesterov = hyper
    gen = torch.Generator().manual_seed(_seed(backend, dtype, hyper))
    params = _params(dtype, gen)
    strides = [p.stride() for p in params]
    # The first step must overwrite whatever the buffers hold.
    bufs = [torch.full_like(p, 7.0) for p in params] if momentum else []
    for step in range(4):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(dtype) for p in params]
        want_p, want_b = _truth(params, grads, bufs, momentum, dampening, weight_decay, nesterov, step == 0)
        with engm_fast.use_backend(backend):
            engm_fast.ops.sgd_momentum_update_(params, grads, bufs, LR, momentum, dampening, weight_decay,
                                               nesterov, first_step=step == 0)
        _check(params, want_p, dtype, f"step {step} param")
        _check(bufs, want_b, dtype, f"step {step} buffer")
    assert [p.stride() for p in params] == strides  # updated in place, layouts kept


@pytest.mark.parametrize("backend", BACKENDS)
def test_first_step_sets_buffer_to_first_direction(backend):
    p = [torch.tensor([1.0, -2.0], dtype=torch.float64)]
    g = [torch.tensor([0.5, 0.25], dtype=torch.float64)]
    buf = [torch.tensor([100.0, 100.0], dtype=torch.float64)]
    with engm_fast.use_backend(backend):
        engm_fast.ops.sgd_momentum_update_(p, g, buf, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1,
                                           nesterov=False, first_step=True)
    d = torch.tensor([0.5 + 0.1 * 1.0, 0.25 + 0.1 * -2.0], dtype=torch.float64)  # dampening not applied
    torch.testing.assert_close(buf[0], d, rtol=0, atol=1e-15)
    torch.testing.assert_close(p[0], torch.tensor([1.0, -2.0], dtype=torch.float64) - 0.1 * d, rtol=0, atol=1e-15)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_torch_optim_sgd(backend):
    """Several steps of torch.optim.SGD (its own implementation) and of the op agree in float64."""
    gen = torch.Generator().manual_seed(3)
    ref = [torch.randn(s, generator=gen, dtype=torch.float64) for s in [(4, 3), (7,)]]
    ours = [p.clone() for p in ref]
    for p in ref:
        p.grad = torch.zeros_like(p)
    opt = torch.optim.SGD(ref, lr=0.3, momentum=0.8, dampening=0.1, weight_decay=0.05, foreach=False)
    bufs = [torch.zeros_like(p) for p in ours]
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64) for p in ref]
        for p, g in zip(ref, grads):
            p.grad.copy_(g)
        opt.step()
        with engm_fast.use_backend(backend):
            engm_fast.ops.sgd_momentum_update_(ours, grads, bufs, 0.3, 0.8, 0.1, 0.05, False, step == 0)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bumps_version_counters(backend):
    p, buf = [torch.randn(3)], [torch.zeros(3)]
    versions = (p[0]._version, buf[0]._version)
    with engm_fast.use_backend(backend):
        engm_fast.ops.sgd_momentum_update_(p, [torch.randn(3)], buf, 0.1, 0.9, 0.0, 0.0, False, True)
    assert p[0]._version > versions[0] and buf[0]._version > versions[1]


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_lists_do_nothing(backend):
    with engm_fast.use_backend(backend):
        engm_fast.ops.sgd_momentum_update_([], [], [], 0.1, 0.9, 0.0, 0.0, False, False)
    with pytest.raises(ValueError, match="0 params, 1 grads"):
        engm_fast.ops.sgd_momentum_update_([], [torch.ones(1)], [], 0.1, 0.0, 0.0, 0.0, False, False)


@pytest.mark.skipif(not NATIVE, reason="engm_fast._C not built")
@pytest.mark.parametrize(
    "args, error, match",
    [
        (([torch.ones(2)], [], []), ValueError, r"got 1 params, 0 grads and 0 momentum buffers"),
        (([torch.ones(2)], [torch.ones(2)], []), ValueError, r"1 params, 1 grads and 0 momentum buffers"),
        (([torch.ones(2)], [torch.ones(3)], [torch.ones(2)]), ValueError, r"param 0 has shape \[2\], grad \[3\]"),
        (([torch.ones(2)], [torch.ones(2)], [torch.ones(3)]), ValueError,
         r"momentum buffer 0 has shape \[3\], param \[2\]"),
        (([torch.ones(2)], [torch.ones(2, dtype=torch.float64)], [torch.ones(2)]), TypeError,
         r"param 0 and its grad must share one dtype .* got Float and Double"),
        (([torch.ones(2)], [torch.ones(2)], [torch.ones(2, dtype=torch.float16)]), TypeError,
         r"momentum buffer 0 is Half, its param Float"),
        (([torch.ones(2, dtype=torch.int64)], [torch.ones(2, dtype=torch.int64)], [torch.ones(2, dtype=torch.int64)]),
         TypeError, r"share one dtype among float16, bfloat16, float32, float64; got Long and Long"),
    ],
)
def test_native_errors(args, error, match):
    params, grads, bufs = args
    before = params[0].clone()
    with pytest.raises(error, match=match):
        torch.ops.engm_fast.sgd_momentum_update_(params, grads, bufs, 0.1, 0.9, 0.0, 0.0, False, False)
    assert torch.equal(params[0], before)  # checked before anything is written


def test_wrapper_errors():
    with pytest.raises(TypeError, match=r"layout torch.sparse_coo"):
        engm_fast.ops.sgd_momentum_update_([torch.ones(2)], [torch.ones(2).to_sparse()], [], 0.1, 0.0, 0.0, 0.0,
                                           False, False)
    with pytest.raises(TypeError, match=r"grads\[0\] is a float"):
        engm_fast.ops.sgd_momentum_update_([torch.ones(2)], [1.0], [], 0.1, 0.0, 0.0, 0.0, False, False)
    meta = torch.ones(2, device="meta")
    with pytest.raises(ValueError, match="tensors on cpu and meta"):
        engm_fast.ops.sgd_momentum_update_([torch.ones(2)], [meta], [], 0.1, 0.0, 0.0, 0.0, False, False)


@pytest.mark.skipif(not NATIVE, reason="engm_fast._C not built")
def test_opcheck():
    import engm_fast.ops  # noqa: F401  (registers the fake implementation)

    gen = torch.Generator().manual_seed(11)
    for dtype in DTYPES:
        params = [torch.randn(s, generator=gen).to(dtype) for s in [(5, 3), (7,)]]
        grads = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        bufs = [torch.randn(p.shape, generator=gen).to(dtype) for p in params]
        op = torch.ops.engm_fast.sgd_momentum_update_.default
        torch.library.opcheck(op, (params, grads, bufs, 0.1, 0.9, 0.1, 0.01, False, False))
        torch.library.opcheck(op, (params, grads, bufs, 0.1, 0.9, 0.0, 0.0, True, True))
        torch.library.opcheck(op, (params, grads, [], 0.1, 0.0, 0.0, 0.01, False, False))


@pytest.mark.skipif(not NATIVE, reason="engm_fast._C not built")
def test_engm_step_same_on_both_backends():
    """ENGM.step() through the C++ op and through the reference give the same float64 model."""
    import torch.nn as nn
    import torch.nn.functional as F

    results = []
    for backend in ("torch", "cpu"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3)).double()
        opt = engm_fast.ENGM(model, lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3)
        gen = torch.Generator().manual_seed(1)
        with engm_fast.use_backend(backend):
            for _ in range(3):
                x = torch.randn(8, 4, generator=gen, dtype=torch.float64)
                y = torch.randint(0, 3, (8,), generator=gen)
                opt.zero_grad()
                opt.backward(F.cross_entropy(model(x), y, reduction="none"))
                opt.step()
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)
