"""The Triton kernels (engm_fast/triton) against float64 references: compiled on a GPU when one
is visible (and TRITON_INTERPRET is not set), otherwise on the CPU under the Triton interpreter.

triton fixes compiled-or-interpreted once per process, when it is first imported (see
engm_fast/triton/_common.py), and reads TRITON_INTERPRET again in lazy imports at the first
launch, so without a GPU this module sets TRITON_INTERPRET=1 (os.environ.setdefault) before it
imports triton, and leaves it set. That is harmless to the other test modules: they choose
backends explicitly ("auto" never picks the interpreter for CPU tensors), and nothing collected
before this module imports triton (engm_fast only looks the package up, engm_fast.triton's
__init__ imports nothing). If something did, this module says so and is skipped (under CI=true
it fails instead: CI must run these tests).

Errors are measured as in test_native_cpu_ops.py: divided by the same quantity computed with
absolute values (per_example_sqnorm: || |b_i|^T |a_i| ||_F^2; weighted_outer_sum:
(|w| |b|)^T |a|), the scale rounding errors of either route are proportional to. Tolerances
per dtype:
  * squared norms are accumulated in float32 for 16- and 32-bit inputs (16-bit inputs enter
    the dot unrounded: exact products), in float64 for float64: 4e-6 and 1e-12, as for the C++
    kernels (measured on these shapes: <= 1.5e-7 and 2e-16);
  * the weighted sum rounds w_r b_r once to the input dtype (the tensor-core operand) and the
    float32 result once to the output dtype: 2 units of roundoff u plus the float32
    accumulation, float16 2 * 2^-11 + 4e-6 = 9.8e-4, bfloat16 2 * 2^-8 + 4e-6 = 7.8e-3
    (measured: 5.6e-4 and 4.4e-3; float32 1.2e-7, float64 3.3e-16).
Shapes are small and odd (T = 1, d = 1, B = 1, 3, 5, 17, 33, 40: not multiples of any tile
side) and every op also runs with 16-wide tiles, so loops over several tiles (3 tiles of 16 for
33 and 40, off-diagonal Gram tile pairs) and partial tiles are exercised.
"""
from __future__ import annotations

import os
import zlib

import pytest
import torch

USE_CUDA = torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ
DEVICE = torch.device("cuda" if USE_CUDA else "cpu")
if not USE_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported
try:
    import triton  # noqa: F401
except ImportError as exc:
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise  # CI installs triton (.ci/run): a missing install must fail, not skip
    pytest.skip(f"triton is not installed ({exc}); `pip install --no-deps triton==3.9.0` to run these tests",
                allow_module_level=True)
import engm_fast
import engm_fast.triton as et
from engm_fast import reference
from engm_fast.triton.sgd_momentum import launch_sgd_momentum_update_
from engm_fast.triton.sqnorm import launch_per_example_sqnorm
from engm_fast.triton.weighted_outer import launch_weighted_outer_sum

if not USE_CUDA and not et.interpreted():
    _why = ("triton was imported in compiled mode before this module could set TRITON_INTERPRET=1; run "
            "`TRITON_INTERPRET=1 python -m pytest tests/test_triton_ops.py`")
    if os.environ.get("CI", "").lower() in ("1", "true", "yes"):
        raise RuntimeError(_why)
    pytest.skip(_why, allow_module_level=True)

import test_update_op as update_checks  # the float64 truth of one SGD step


OPS = torch.ops.engm_fast_triton
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
MODES = reference.SQNORM_MODES
SQNORM_TOL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 4e-6, torch.bfloat16: 4e-6}
OUTER_TOL = {torch.float64: 1e-12, torch.float32: 4e-6, torch.float16: 2 * 2.0**-11 + 4e-6,
             torch.bfloat16: 2 * 2.0**-8 + 4e-6}
SMALL_SQNORM = dict(rows_b=16, rows_d=16, direct_o=16, direct_i=16, direct_t=16, ghost_t=16, ghost_d=16)
SMALL_OUTER = dict(o=16, i=16, k=16)

# (B, T, d_in, d_out); T = 0 means 2-D inputs [B, d] (T = 1).
SHAPES = [(1, 1, 1, 1), (3, 1, 5, 17), (5, 33, 17, 3), (2, 5, 33, 17), (1, 40, 3, 5), (3, 0, 33, 1)]


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _inputs(shape, dtype, seed):
    B, T, d_in, d_out = shape
    g = torch.Generator().manual_seed(seed)
    sa, sb = ((B, d_in), (B, d_out)) if T == 0 else ((B, T, d_in), (B, T, d_out))
    a = torch.randn(sa, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    b = torch.randn(sb, generator=g, dtype=torch.float64).to(DEVICE, dtype)
    w = (torch.rand(B, generator=g, dtype=torch.float64) * 2 - 0.5).to(DEVICE)  # signed weights
    return a, b, w


def _sqnorm_error(got, a, b):
    """max_i |got_i - n_i^2| / || |b_i|^T |a_i| ||^2 against the float64 reference."""
    want = reference.per_example_sqnorm(a.double(), b.double(), "direct")
    bound = reference.per_example_sqnorm(a.double().abs(), b.double().abs(), "direct")
    return float(((got.double() - want).abs() / bound.clamp_min(1e-300)).max())


def _outer_error(got, a, b, w):
    want = reference.weighted_outer_sum(a.double(), b.double(), w.double())
    bound = reference.weighted_outer_sum(a.double().abs(), b.double().abs(), w.double().abs())
    return float(((got.double() - want).abs() / bound.clamp_min(1e-300)).max())


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_per_example_sqnorm(shape, dtype):
    a, b, _ = _inputs(shape, dtype, _seed("sqnorm", shape, dtype))
    for mode in MODES:
        for blocks in (None, SMALL_SQNORM):
            got = launch_per_example_sqnorm(a, b, mode, blocks=blocks)
            assert got.dtype == reference.accumulation_dtype(dtype) and got.shape == (a.shape[0],)
            err = _sqnorm_error(got, a, b)
            assert err <= SQNORM_TOL[dtype], f"mode {mode}, blocks {blocks}: normalized error {err:.3g}"
        # the registered op (default tiles) is what the backend calls
        assert torch.equal(OPS.per_example_sqnorm(a, b, mode), launch_per_example_sqnorm(a, b, mode))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weighted_outer_sum(shape, dtype):
    a, b, w = _inputs(shape, dtype, _seed("outer", shape, dtype))
    for blocks, split in ((None, None), (SMALL_OUTER, 1), (SMALL_OUTER, 3)):
        got = launch_weighted_outer_sum(a, b, w, blocks=blocks, split=split)
        assert got.dtype == dtype and got.shape == (b.shape[-1], a.shape[-1])
        err = _outer_error(got, a, b, w)
        assert err <= OUTER_TOL[dtype], f"blocks {blocks}, split {split}: normalized error {err:.3g}"
    assert torch.equal(OPS.weighted_outer_sum(a, b, w), launch_weighted_outer_sum(a, b, w))


def test_non_contiguous_inputs():
    g = torch.Generator().manual_seed(5)
    a = torch.randn(17, 3, 5, generator=g, dtype=torch.float64).to(DEVICE).transpose(0, 2)  # [5, 3, 17]
    b = torch.randn(5, 3, 1, generator=g, dtype=torch.float64).to(DEVICE).expand(5, 3, 4)  # stride 0
    w = torch.rand(10, generator=g, dtype=torch.float64).to(DEVICE)[::2]
    assert not a.is_contiguous() and not b.is_contiguous() and not w.is_contiguous()
    for mode in MODES:
        assert _sqnorm_error(OPS.per_example_sqnorm(a, b, mode), a, b) <= 1e-12
    assert _outer_error(OPS.weighted_outer_sum(a, b, w), a, b, w) <= 1e-12


def test_float16_squares_do_not_overflow():
    # 300^2 = 9e4 > 65504 (float16 max): the norms must be accumulated in float32.
    a = torch.full((3, 4, 5), 300.0, dtype=torch.float16, device=DEVICE)
    b = torch.full((3, 4, 2), 300.0, dtype=torch.float16, device=DEVICE)
    expected = (4 * 300.0 * 300.0) ** 2 * 5 * 2  # every entry of b_i^T a_i is 4 * 300^2
    for mode in MODES:
        out = OPS.per_example_sqnorm(a, b, mode)
        torch.testing.assert_close(out, torch.full((3,), expected, dtype=torch.float32, device=DEVICE), rtol=1e-6,
                                   atol=0)


def test_empty_sizes():
    for sa, sb in [((0, 3, 4), (0, 3, 2)), ((3, 0, 4), (3, 0, 2)), ((3, 2, 0), (3, 2, 5)), ((0, 4), (0, 2))]:
        a, b = torch.randn(sa, device=DEVICE), torch.randn(sb, device=DEVICE)
        for mode in MODES:
            out = OPS.per_example_sqnorm(a, b, mode)
            assert torch.equal(out, reference.per_example_sqnorm(a, b, mode))
        out = OPS.weighted_outer_sum(a, b, torch.ones(sa[0], device=DEVICE))
        assert out.shape == (sb[-1], sa[-1]) and torch.count_nonzero(out) == 0


def test_errors():
    a, b = torch.randn(4, 3, 5, device=DEVICE), torch.randn(4, 3, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"agree in B \(and T\); got a \(4, 3, 5\) and b \(4, 2, 2\)"):
        OPS.per_example_sqnorm(a, torch.randn(4, 2, 2, device=DEVICE))
    with pytest.raises(ValueError, match=r"mode must be one of .* got 'fast'"):
        OPS.per_example_sqnorm(a, b, "fast")
    with pytest.raises(TypeError, match=r"share one floating dtype; got torch.int64 and torch.int64"):
        OPS.per_example_sqnorm(a.long(), b.long())
    with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"):
        OPS.weighted_outer_sum(a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn), torch.ones(4, device=DEVICE))
    with pytest.raises(ValueError, match=r"w must be \[B\] = \[4\], got \(3,\)"):
        OPS.weighted_outer_sum(a, b, torch.ones(3, device=DEVICE))
    with pytest.raises(ValueError, match=r"tensors are on different devices"):  # the launcher (no dispatcher)
        launch_weighted_outer_sum(a, b, torch.ones(4, device="meta"))
    p = [torch.ones(2, device=DEVICE)]
    g = [torch.ones(2, device=DEVICE)]
    with pytest.raises(ValueError, match=r"got 1 params, 1 grads and 0 momentum buffers"):
        OPS.sgd_momentum_update_(p, g, [], 0.1, 0.9, 0.0, 0.0, False, False)
    with pytest.raises(TypeError, match=r"momentum buffer 0 is torch.float16, its param torch.float32"):
        OPS.sgd_momentum_update_(p, g, [torch.ones(2, dtype=torch.float16, device=DEVICE)], 0.1, 0.9, 0.0, 0.0,
                                 False, False)
    with pytest.raises(ValueError, match=r"param 0 has shape \(2,\), grad \(3,\)"):
        OPS.sgd_momentum_update_(p, [torch.ones(3, device=DEVICE)], [], 0.1, 0.0, 0.0, 0.0, False, False)


_COMPILED_MODE_SCRIPT = """
import torch, engm_fast
assert "triton" not in engm_fast.available_backends(), engm_fast.available_backends()
try:
    with engm_fast.use_backend("triton"):
        pass
    raise SystemExit("use_backend('triton') did not raise")
except ValueError as exc:
    assert "TRITON_INTERPRET=1 is not set" in str(exc), exc
import engm_fast.triton
engm_fast.triton.load()  # triton imported (compiled mode), ops registered
assert "triton" not in engm_fast.available_backends()
try:
    torch.ops.engm_fast_triton.per_example_sqnorm(torch.randn(2, 3), torch.randn(2, 4))
    raise SystemExit("a CPU tensor was accepted without the interpreter")
except RuntimeError as exc:
    assert "CPU tensors run only under the Triton interpreter" in str(exc), exc
print("ok")
"""


def test_without_interpreter_cpu_tensors_are_refused_clearly():
    """A fresh process without TRITON_INTERPRET and without a GPU: no "triton" backend, and the
    ops refuse CPU tensors with a message that says what to set."""
    import subprocess
    import sys

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["CUDA_VISIBLE_DEVICES"] = ""
    proc = subprocess.run([sys.executable, "-c", _COMPILED_MODE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), proc.stdout + proc.stderr


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hyper", update_checks.HYPER, ids=lambda h: "mom{}-damp{}-wd{}-nest{}".format(*h))
def test_sgd_momentum_update(dtype, hyper):
    """Three steps (the first with first_step=True over buffers holding 7.0), each against the
    float64 truth from the state reached, with test_update_op's tolerances (8 units of roundoff
    of the step's magnitude); blocks of 16 elements so the 33-element param spans 3 programs."""
    momentum, dampening, weight_decay, nesterov = hyper
    gen = torch.Generator().manual_seed(_seed("sgd", dtype, hyper))
    params = [p.to(DEVICE) for p in update_checks._params(dtype, gen, large=False)]
    strides = [p.stride() for p in params]
    bufs = [torch.full_like(p, 7.0) for p in params] if momentum else []
    for step in range(3):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(DEVICE, dtype) for p in params]
        want_p, want_b = update_checks._truth(params, grads, bufs, momentum, dampening, weight_decay, nesterov,
                                              step == 0)
        launch_sgd_momentum_update_(params, grads, bufs, update_checks.LR, momentum, dampening, weight_decay,
                                    nesterov, step == 0, block=16)
        update_checks._check(params, want_p, dtype, f"step {step} param")
        update_checks._check(bufs, want_b, dtype, f"step {step} buffer")
    assert [p.stride() for p in params] == strides


def test_opcheck():
    for dtype in DTYPES:
        for shape in [(3, 5, 17, 3), (4, 1, 6, 2), (2, 0, 5, 3)]:
            a, b, w = _inputs(shape, dtype, _seed("opcheck", shape, dtype))
            for mode in MODES:
                torch.library.opcheck(OPS.per_example_sqnorm.default, (a, b, mode))
            torch.library.opcheck(OPS.weighted_outer_sum.default, (a, b, w))
        params = [torch.randn(5, 3, device=DEVICE).to(dtype), torch.randn(7, device=DEVICE).to(dtype)]
        grads = [torch.randn_like(p) for p in params]
        bufs = [torch.randn_like(p) for p in params]
        op = OPS.sgd_momentum_update_.default
        torch.library.opcheck(op, (params, grads, bufs, 0.1, 0.9, 0.1, 0.01, False, False))
        torch.library.opcheck(op, (params, grads, bufs, 0.1, 0.9, 0.0, 0.0, True, True))
        torch.library.opcheck(op, (params, grads, [], 0.1, 0.0, 0.0, 0.01, False, False))


def test_torch_compile_sees_an_opaque_op():
    """Why custom_op and not triton_op (engm_fast/triton/__init__.py): a compiled graph calling
    the ops traces with fake tensors and runs under the interpreter."""
    a, b, w = _inputs((3, 5, 17, 3), torch.float32, 1)

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(a, b, w):
        return OPS.per_example_sqnorm(a, b, "direct").sum() + OPS.weighted_outer_sum(a, b, w).sum()

    want = OPS.per_example_sqnorm(a, b, "direct").sum() + OPS.weighted_outer_sum(a, b, w).sum()
    torch.testing.assert_close(f(a, b, w), want)


def test_backend_routes_every_op_to_triton(monkeypatch):
    assert "triton" in engm_fast.available_backends()
    calls = []
    for name in ("per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_"):
        original = getattr(et, name)
        monkeypatch.setattr(et, name, lambda *args, _n=name, _f=original: calls.append(_n) or _f(*args))
    a, b, w = _inputs((3, 2, 5, 4), torch.float32, 2)
    with engm_fast.use_backend("triton"):
        engm_fast.ops.per_example_sqnorm(a, b)
        engm_fast.ops.weighted_outer_sum(a, b, w.float())
        one = torch.ones(3, device=DEVICE)
        engm_fast.ops.sgd_momentum_update_([one], [one.clone()], [], 0.1, 0.0, 0.0, 0.0, False, False)
    assert calls == ["per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_"]
    # "auto" never picks the interpreter for CPU tensors
    assert engm_fast._backend.resolve(torch.device("cpu")) in ("cpu", "torch")
    if USE_CUDA and "cuda" not in engm_fast.available_backends():  # no CUDA extension built: Triton
        assert engm_fast._backend.resolve(DEVICE) == "triton"


def test_engm_on_triton_backend_matches_torch_backend():
    """ENGM end to end (engine norms, weighted gradients, the fused step) in float64."""
    import torch.nn as nn
    import torch.nn.functional as F

    results = []
    for backend in ("torch", "triton"):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(5, 17), nn.Tanh(), nn.Linear(17, 3)).double().to(DEVICE)
        opt = engm_fast.ENGM(model, lr=0.2, momentum=0.9, weight_decay=1e-3)
        gen = torch.Generator().manual_seed(1)
        with engm_fast.use_backend(backend):
            for _ in range(2):
                x = torch.randn(6, 5, generator=gen, dtype=torch.float64).to(DEVICE)
                y = torch.randint(0, 3, (6,), generator=gen).to(DEVICE)
                opt.zero_grad()
                norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
                opt.step()
        results.append([norms] + [p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-14)
