"""Every engm_fast op on every backend against float64 truth, with the one tolerance table of the
op contract (engm_fast/reference.py: TOLERANCE).

One test per property, parametrized by backend and device (the pattern of pytorch/extension-cpp's
test_extension.py):

    torch   cpu    engm_fast/reference.py (always there)
    cpu     cpu    the C++ extension (csrc/cpu)
    triton  cpu    the Triton kernels under the CPU interpreter (TRITON_INTERPRET=1, set by
                   tests/conftest.py when no GPU is visible); on a GPU: compiled, on cuda
    cuda    cuda   the CUDA extension (csrc/cuda); skipped without a GPU
    torch   cuda   the reference on a GPU; skipped without one

A backend that is not there is skipped, except under CI=true for the ones CI installs (the C++
extension and triton): there a missing one fails. The ops are called as users call them,
``engm_fast.ops.*`` inside ``engm_fast.use_backend(...)`` (the wrapper checks the arguments,
resolves the route and the accumulation dtype, then runs the backend); the registered kernels
(``torch.ops.engm_fast.*``, ``torch.ops.engm_fast_triton.*``) are called directly where their own
interface is tested: explicit routes, their error messages, ``torch.library.opcheck``.

Errors are those reference.py defines, each normalized by the magnitude rounding errors are
proportional to (the same computation on absolute values), so one tolerance per op and dtype
holds for every shape and both routes:

    sqnorm:  |n_i^2 - N_i| / || |b_i|^T |a_i| ||^2             N_i = ||b_i^T a_i||^2 exactly
    outer:   |out - S| / sum_r |w_r b_r| |a_r|                   S = sum_r round_D(w_r b_r) a_r exactly
    update:  |x - X| / M                                         X: the step exactly, M: on |values|

The slow marker (deselected by default, ``python -m pytest -q -m slow tests`` runs them) holds
the cases that take seconds under the Triton interpreter; the same cases run by default on the
other backends.
"""
from __future__ import annotations

import contextlib
import os
import zlib
from dataclasses import dataclass

import pytest
import torch

import engm_fast
from engm_fast import reference
from engm_fast.reference import TOLERANCE

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
ROUTES = reference.SQNORM_ROUTES
# Triton runs compiled on a GPU, unless the interpreter was asked for (tests/conftest.py sets it
# only when no GPU is visible).
TRITON_DEVICE = "cuda" if torch.cuda.is_available() and "TRITON_INTERPRET" not in os.environ else "cpu"


# ----------------------------------------------------------------------------- backends

@dataclass(frozen=True)
class Backend:
    name: str  # engm_fast backend name
    device: str

    @property
    def id(self) -> str:
        return f"{self.name}-{self.device}"

    @property
    def interpreted(self) -> bool:
        """The Triton interpreter: the same kernels, orders of magnitude slower."""
        return self.name == "triton" and self.device == "cpu"

    def kernels(self):
        """The namespace of this backend's registered ops (None for the reference)."""
        if self.name in ("cpu", "cuda"):
            return torch.ops.engm_fast
        if self.name == "triton":
            engm_fast._backend.triton_ops()  # registers them
            return torch.ops.engm_fast_triton
        return None

    def use(self):
        return engm_fast.use_backend(self.name)


BACKENDS = [Backend("torch", "cpu"), Backend("cpu", "cpu"), Backend("triton", TRITON_DEVICE),
            Backend("cuda", "cuda"), Backend("torch", "cuda")]


def _unavailable(backend: Backend) -> str | None:
    """Why ``backend`` cannot run here (None when it can); raises under CI for what CI installs."""
    if backend.device == "cuda" and not torch.cuda.is_available():
        return "no CUDA device visible to torch"
    if backend.name in engm_fast.available_backends():
        return None
    if backend.name == "cpu":
        why = f"the C++ extension is not built ({engm_fast.native_import_error()})"
    elif backend.name == "cuda":
        why = f"the extension has no CUDA kernels ({engm_fast.native_import_error() or 'built without CUDA'})"
    else:
        why = f"triton is not usable here ({engm_fast._backend._triton_unavailable_reason()})"
    if CI and backend.name in ("cpu", "triton"):
        raise RuntimeError(f"CI must run the {backend.id} tests, but {why}")
    return why


def _ready(backend: Backend) -> Backend:
    why = _unavailable(backend)
    if why is not None:
        pytest.skip(f"{backend.id}: {why}")
    return backend


def backends(*names: str, slow_on_interpreter: bool = False):
    """pytest params of the backends named (all when none are), the interpreted Triton one
    marked slow when ``slow_on_interpreter``."""
    return [pytest.param(b, id=b.id, marks=[pytest.mark.slow] if slow_on_interpreter and b.interpreted else [])
            for b in BACKENDS if not names or b.name in names]


def backend_cases(values, on_interpreter, ids=str):
    """pytest params (backend, value) for every backend and value; under the Triton interpreter
    only the values in ``on_interpreter`` run by default, the others are marked slow."""
    return [pytest.param(b, v, id=f"{b.id}-{ids(v)}",
                         marks=[pytest.mark.slow] if b.interpreted and v not in on_interpreter else [])
            for b in BACKENDS for v in values]


@pytest.fixture(params=backends())
def backend(request) -> Backend:
    return _ready(request.param)


@pytest.fixture(params=backends("cpu", "cuda", "triton"))
def kernel_backend(request) -> Backend:
    """Backends with registered ops (not the reference)."""
    return _ready(request.param)


# ----------------------------------------------------------------------------- inputs and truth

def _seed(*parts) -> int:
    """A distinct, reproducible seed per test case (crc32: str hashes vary between runs)."""
    return zlib.crc32(repr(parts).encode())


def _inputs(shape_a, shape_b, dtype, seed, device):
    """a, b (in ``dtype``) and signed float64 weights w, on ``device``."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(shape_a, generator=g, dtype=torch.float64).to(dtype)
    b = torch.randn(shape_b, generator=g, dtype=torch.float64).to(dtype)
    w = torch.rand(shape_a[0], generator=g, dtype=torch.float64) * 2 - 0.5
    return a.to(device), b.to(device), w.to(device)


def _rows3(x: torch.Tensor) -> torch.Tensor:
    x = x.detach().cpu()
    return x.unsqueeze(1) if x.dim() == 2 else x


def _max_error(got: torch.Tensor, exact: torch.Tensor, scale: torch.Tensor) -> float:
    got = got.detach().to("cpu", torch.float64)
    assert not torch.isnan(got).any(), "NaN in the output"
    return ((got - exact).abs() / scale.clamp_min(1e-300)).max().item() if got.numel() else 0.0


def sqnorm_truth(a, b) -> tuple[torch.Tensor, torch.Tensor]:
    """(exact ||b_i^T a_i||^2, || |b_i|^T |a_i| ||^2) by float64 einsum."""
    a3, b3 = _rows3(a).double(), _rows3(b).double()
    exact = torch.einsum("bto,bti->boi", b3, a3).pow(2).sum((1, 2))
    scale = torch.einsum("bto,bti->boi", b3.abs(), a3.abs()).pow(2).sum((1, 2))
    return exact, scale


def sqnorm_error(out, a, b, truth=None) -> float:
    """The contract's sqnorm error (module docstring) against float64 einsum."""
    return _max_error(out, *(truth if truth is not None else sqnorm_truth(a, b)))


def outer_error(out, a, b, w) -> float:
    """The contract's outer error: against sum_r round_D(w_r b_r) a_r in float64, the product
    formed in the accumulation dtype (for float32 / float64 inputs: exactly)."""
    acc = reference.accumulation_dtype(a.dtype)
    a3, b3 = _rows3(a), _rows3(b)
    w_acc = w.detach().cpu().to(acc)[:, None, None]
    if b.dtype == acc:
        operand = b3.double() * w_acc.double()
    else:
        operand = (b3.to(acc) * w_acc).to(b.dtype).double()
    exact = torch.einsum("bto,bti->oi", operand, a3.double())
    scale = torch.einsum("bto,bti->oi", (b3.double() * w_acc.double()).abs(), a3.double().abs())
    return _max_error(out, exact, scale)


def check_sqnorm(backend: Backend, a, b, mode, context="", truth=None):
    with backend.use():
        out = engm_fast.ops.per_example_sqnorm(a, b, mode)
    assert out.dtype == reference.accumulation_dtype(a.dtype), context
    assert out.shape == (a.shape[0],) and out.device == a.device, context
    err = sqnorm_error(out, a, b, truth)
    assert err <= TOLERANCE[a.dtype].sqnorm, f"{context} sqnorm {mode} {a.dtype}: normalized error {err:.3g}"
    return out


def check_outer(backend: Backend, a, b, w, context=""):
    with backend.use():
        out = engm_fast.ops.weighted_outer_sum(a, b, w)
    assert out.dtype == a.dtype and out.device == a.device, context
    assert out.shape == (b.shape[-1], a.shape[-1]), context
    err = outer_error(out, a, b, w)
    assert err <= TOLERANCE[a.dtype].outer, f"{context} outer {a.dtype}: normalized error {err:.3g}"
    return out


# ----------------------------------------------------------------------------- per_example_sqnorm, weighted_outer_sum

# (B, T, d_in, d_out); T = 0 stands for 2-D inputs [B, d] (T = 1). T = 1, d = 1, B = 1; sizes that
# are no multiple of any tile (7, 13, 33, 65, 127, 129); d_out > 64 (the CUDA 128-row tiles);
# several tiles in both dimensions (257 x 129); d multiples of 8 (16-byte CUDA copies: 64, 24)
# and even non-multiples (6, 18: 4-byte copies of 16-bit types); ghost with T <= 32, 33, 40 and
# 300 (multi-tile Gram matrices: off-diagonal tile pairs on every backend); 127 x 129 batches 4
# examples per direct-route GEMM on the CPU, 13 examples end in partial groups; B >= 2 runs the
# CPU's per-example parallel path, B = 1 the serial one.
SHAPES = [
    (1, 1, 1, 1), (7, 1, 13, 33), (3, 1, 5, 17), (13, 7, 1, 5), (5, 4, 1, 9), (5, 33, 13, 7), (5, 33, 17, 3),
    (3, 13, 33, 1), (4, 13, 6, 1), (1, 33, 7, 13), (33, 13, 7, 13), (7, 33, 17, 10), (2, 5, 33, 17), (1, 40, 3, 5),
    (2, 70, 3, 4), (2, 300, 3, 5), (13, 5, 127, 129), (3, 17, 257, 129), (4, 40, 64, 24), (3, 31, 18, 6),
    (2, 65, 65, 65),
    (1, 0, 1, 1), (7, 0, 13, 33), (33, 0, 1, 7), (13, 0, 33, 1), (3, 0, 33, 1), (64, 0, 128, 72),
]


# The Triton interpreter runs each program of a grid in Python (milliseconds each): by default it
# takes these shapes (T = 1 and 2-D row norms, multi-tile ghost and direct routes at 64-wide
# tiles; tests/test_triton_ops.py runs them again with 16-wide tiles), the others are slow.
INTERPRETER_SHAPES = [(1, 1, 1, 1), (3, 1, 5, 17), (5, 33, 17, 3), (2, 5, 33, 17), (1, 40, 3, 5), (3, 0, 33, 1)]
SHAPE_CASES = [(shape, dtype) for shape in SHAPES for dtype in DTYPES]


def _shape_id(case) -> str:
    (B, T, d_in, d_out), dtype = case
    return f"B{B}_T{T}_{d_in}x{d_out}-{str(dtype).replace('torch.', '')}"


def _shape_inputs(shape, dtype, tag, device):
    B, T, d_in, d_out = shape
    sa, sb = ((B, d_in), (B, d_out)) if T == 0 else ((B, T, d_in), (B, T, d_out))
    return _inputs(sa, sb, dtype, _seed(tag, shape, dtype), device)


@pytest.mark.parametrize("backend,case", backend_cases(
    SHAPE_CASES, [c for c in SHAPE_CASES if c[0] in INTERPRETER_SHAPES], _shape_id), indirect=["backend"])
def test_sqnorm_and_weighted_outer_sum(backend, case):
    shape, dtype = case
    a, b, w = _shape_inputs(shape, dtype, "ops", backend.device)
    truth = sqnorm_truth(a, b)
    out = {mode: check_sqnorm(backend, a, b, mode, str(shape), truth) for mode in reference.SQNORM_MODES}
    # "auto" is the route of the one rule, bit for bit
    T = max(1, shape[1])
    assert torch.equal(out["auto"], out[reference.choose_sqnorm_route(T, shape[2], shape[3])])
    check_outer(backend, a, b, w, str(shape))


@pytest.mark.parametrize("backend,dtype", backend_cases(DTYPES, [torch.float32]), indirect=["backend"])
def test_layouts(backend, dtype):
    """Strided views (padded rows: CUDA's 16-byte copies whose last chunk straddles the row end),
    misaligned storage offsets, a non-contiguous last dimension, zero strides (an expanded batch,
    broadcast features), inputs requiring grad, strided weights."""
    B, T, d_in, d_out = 5, 37, 29, 19
    a, b, w = _inputs((B, T, d_in + 11), (B, T, d_out + 13), dtype, _seed("layout", dtype), backend.device)
    a_pad, b_pad = a[..., :d_in], b[..., :d_out]  # row strides 40 and 32 elements
    a_mis = torch.randn(B * T * d_in + 1, dtype=torch.float64).to(backend.device, dtype)[1:].view(B, T, d_in)
    b_mis = torch.randn(B * T * d_out + 1, dtype=torch.float64).to(backend.device, dtype)[1:].view(B, T, d_out)
    a_t = a_pad.transpose(1, 2).contiguous().transpose(1, 2)  # last-dimension stride T
    b_t = b_pad.transpose(0, 1).contiguous().transpose(0, 1)  # batch stride d_out, row stride B d_out
    a_e = a_pad[:1].expand(B, T, d_in)  # batch stride 0
    b_e = b_pad[..., :1].expand(B, T, d_out)  # feature stride 0
    w_strided = torch.rand(2 * B, dtype=torch.float64).to(backend.device)[::2]
    cases = {"padded": (a_pad, b_pad, w), "misaligned": (a_mis, b_mis, w), "transposed": (a_t, b_t, w_strided),
             "expanded": (a_e, b_pad, w), "broadcast features": (a_t, b_e, w),
             "requires_grad": (a_t.detach().requires_grad_(), b_t.detach().requires_grad_(), w)}
    for name, (x, y, ww) in cases.items():
        truth = sqnorm_truth(x, y)
        for mode in reference.SQNORM_MODES:
            check_sqnorm(backend, x, y, mode, name, truth)
        check_outer(backend, x, y, ww, name)


def test_inference_mode(backend):
    a, b, w = _inputs((9, 17, 5), (9, 17, 3), torch.float16, 12, backend.device)
    with torch.inference_mode():
        for mode in reference.SQNORM_MODES:
            check_sqnorm(backend, a, b, mode, "inference_mode")
        check_outer(backend, a, b, w, "inference_mode")


def test_float16_squares_do_not_overflow(backend):
    # 300^2 = 9e4 > 65504 (float16 max): the norms must be accumulated in float32.
    a = torch.full((3, 4, 5), 300.0, dtype=torch.float16, device=backend.device)
    b = torch.full((3, 4, 2), 300.0, dtype=torch.float16, device=backend.device)
    expected = (4 * 300.0 * 300.0) ** 2 * 5 * 2  # every entry of b_i^T a_i is 4 * 300^2
    for mode in reference.SQNORM_MODES:
        with backend.use():
            out = engm_fast.ops.per_example_sqnorm(a, b, mode)
        assert out.dtype == torch.float32
        torch.testing.assert_close(out.cpu(), torch.full((3,), expected, dtype=torch.float32), rtol=1e-6, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_empty_sizes(backend, dtype):
    for shape_a, shape_b in [((0, 3, 4), (0, 3, 2)), ((3, 0, 4), (3, 0, 2)), ((3, 2, 0), (3, 2, 5)), ((0, 4), (0, 2))]:
        a, b, w = _inputs(shape_a, shape_b, dtype, 0, backend.device)
        with backend.use():
            for mode in reference.SQNORM_MODES:
                out = engm_fast.ops.per_example_sqnorm(a, b, mode)
                ref = reference.per_example_sqnorm(a.cpu(), b.cpu(), mode)
                assert out.dtype == ref.dtype and out.shape == ref.shape
                assert torch.equal(out.cpu(), ref), (shape_a, mode)
            out = engm_fast.ops.weighted_outer_sum(a, b, w)
        assert out.shape == (shape_b[-1], shape_a[-1]) and out.dtype == dtype
        assert torch.count_nonzero(out) == 0


@pytest.mark.parametrize("backend,dtype", backend_cases([torch.bfloat16, torch.float32], []), indirect=["backend"])
def test_weighted_split_reduction(backend, dtype):
    # B*T = 6400 rows into a 33 x 65 output (one or two tiles): split over many CUDA CTAs or
    # Triton programs, then the splits are added; weights of both signs and of very different
    # sizes, given in float64 and in float32.
    B, T = 64, 100
    a, b, w = _inputs((B, T, 65), (B, T, 33), dtype, _seed("split", dtype), backend.device)
    w = w * torch.logspace(-3, 3, B, device=backend.device, dtype=torch.float64)
    check_outer(backend, a, b, w, "split")
    check_outer(backend, a, b, w.float(), "split, float32 w")


@pytest.mark.parametrize("backend", backends(slow_on_interpreter=True), indirect=True)
def test_deterministic(backend):
    a, b, w = _inputs((9, 200, 130), (9, 200, 70), torch.bfloat16, 5, backend.device)
    with backend.use():
        for mode in ROUTES:
            first = engm_fast.ops.per_example_sqnorm(a, b, mode)
            assert torch.equal(first, engm_fast.ops.per_example_sqnorm(a, b, mode)), mode
        assert torch.equal(engm_fast.ops.weighted_outer_sum(a, b, w), engm_fast.ops.weighted_outer_sum(a, b, w))


@pytest.mark.parametrize("backend", backends(slow_on_interpreter=True), indirect=True)
def test_direct_route_tiles_large_layers(backend):
    # d_in * d_out = 4099 * 1030 > 2^22: the CPU reduces g_i in two row tiles of d_out, the
    # reference in chunks of examples; 17 x 65 tiles of 64 x 64 on the GPU backends.
    a, b, w = _inputs((2, 3, 4099), (2, 3, 1030), torch.float32, 7, backend.device)
    check_sqnorm(backend, a, b, "direct", "two d_out tiles")
    check_outer(backend, a, b, w, "wide layer")


# ----------------------------------------------------------------------------- the route rule, the reference itself

def test_route_rule():
    assert reference.choose_sqnorm_route(1, 3, 3) == "ghost"
    assert reference.choose_sqnorm_route(1, 1, 1) == "ghost"  # T = 1: row norms, whatever the sizes
    assert reference.choose_sqnorm_route(1024, 576, 64) == "direct"  # CIFAR conv: T^2 >> d_in d_out
    assert reference.choose_sqnorm_route(16, 4608, 512) == "ghost"
    # both sides of 2 T^2 <= d_in d_out: (T=4, 4x8) is ghost, (T=5, 4x8) direct
    assert [reference.resolve_sqnorm_mode("auto", T, 4, 8) for T in (4, 5)] == ["ghost", "direct"]
    assert reference.resolve_sqnorm_mode("direct", 1, 4, 8) == "direct"  # an explicit route is kept
    with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'ghost', 'direct'\), got 'fast'"):
        reference.resolve_sqnorm_mode("fast", 4, 4, 8)


def test_reference_two_dimensional_inputs_are_t_equal_one():
    a, b = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64)
    w = torch.rand(6, dtype=torch.float64)
    torch.testing.assert_close(reference.per_example_sqnorm(a, b), reference.per_example_sqnorm(a[:, None], b[:, None]))
    assert sqnorm_error(reference.per_example_sqnorm(a, b), a, b) <= 1e-15
    assert outer_error(reference.weighted_outer_sum(a, b, w), a, b, w) <= 1e-15


def test_reference_direct_route_is_chunked(monkeypatch):
    """The direct route never materializes more than its chunk of per-example gradients."""
    monkeypatch.setattr(reference, "_DIRECT_CHUNK_ELEMENTS", 60)
    a, b = torch.randn(9, 4, 6, dtype=torch.float64), torch.randn(9, 4, 5, dtype=torch.float64)
    assert sqnorm_error(reference.per_example_sqnorm(a, b, "direct"), a, b) <= TOLERANCE[torch.float64].sqnorm


def test_reference_checks_its_arguments():
    with pytest.raises(ValueError, match="agree in B"):
        reference.per_example_sqnorm(torch.randn(2, 3), torch.randn(3, 3))
    with pytest.raises(ValueError, match="both"):
        reference.per_example_sqnorm(torch.randn(2, 3, 4), torch.randn(2, 4))
    with pytest.raises(TypeError, match="dtype"):
        reference.per_example_sqnorm(torch.randn(2, 3), torch.randn(2, 3, dtype=torch.float64))
    with pytest.raises(ValueError, match="mode"):
        reference.per_example_sqnorm(torch.randn(2, 3), torch.randn(2, 3), "fast")
    with pytest.raises(ValueError, match=r"\[2\]"):
        reference.weighted_outer_sum(torch.randn(2, 3), torch.randn(2, 3), torch.ones(3))
    with pytest.raises(ValueError, match="param 0 has shape"):
        reference.sgd_momentum_update_([torch.ones(2)], [torch.ones(3)], [], 0.1, 0.0, 0.0, 0.0, False, False)


# ----------------------------------------------------------------------------- errors

def test_api_errors(backend):
    """engm_fast.ops checks every argument before any backend runs: the same exception type and
    message on every backend."""
    dev = backend.device
    a, b = torch.randn(4, 3, 5, device=dev), torch.randn(4, 3, 2, device=dev)
    w = torch.ones(4, device=dev)
    ops = engm_fast.ops
    with backend.use():
        for op, args in (("per_example_sqnorm", ()), ("weighted_outer_sum", (w,))):
            fn = getattr(ops, op)
            with pytest.raises(ValueError, match=rf"{op}: .*agree in B \(and T\); got a \(4, 3, 5\) and b \(4, 2, 6\)"):
                fn(a, torch.randn(4, 2, 6, device=dev), *args)
            with pytest.raises(ValueError, match=r"agree in B \(and T\); got a \(4, 5\) and b \(3, 6\)"):
                fn(torch.randn(4, 5, device=dev), torch.randn(3, 6, device=dev), *args)
            with pytest.raises(ValueError, match=r"both be \[B, T, d\] or both \[B, d\]; got a \(4, 3, 5\) and b \(4, 6\)"):
                fn(a, torch.randn(4, 6, device=dev), *args)
            with pytest.raises(ValueError, match=r"both be \[B, T, d\] or both \[B, d\]; got a \(5,\) and b \(5,\)"):
                fn(torch.randn(5, device=dev), torch.randn(5, device=dev), *args)
            with pytest.raises(TypeError, match=r"share one floating dtype; got torch.float32 and torch.float64"):
                fn(a, b.double(), *args)
            with pytest.raises(TypeError, match=r"share one floating dtype; got torch.int64 and torch.int64"):
                fn(a.long(), b.long(), *args)
            with pytest.raises(TypeError, match=r"float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"):
                fn(a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn), *args)
            with pytest.raises(ValueError, match="different devices"):
                fn(a, b.to("meta"), *args)
            with pytest.raises(TypeError, match="must be tensors"):
                fn(a.tolist(), b, *args)
        with pytest.raises(ValueError, match=r"mode must be one of \('auto', 'ghost', 'direct'\), got 'fast'"):
            ops.per_example_sqnorm(a, b, "fast")
        with pytest.raises(ValueError, match=r"w must be \[B\] = \[4\], got \(3,\)"):
            ops.weighted_outer_sum(a, b, torch.ones(3, device=dev))
        with pytest.raises(ValueError, match=r"w must be \[B\] = \[4\], got \(4, 1\)"):
            ops.weighted_outer_sum(a, b, torch.ones(4, 1, device=dev))
        with pytest.raises(TypeError, match=r"w must be floating point, got torch.int64"):
            ops.weighted_outer_sum(a, b, torch.ones(4, dtype=torch.int64, device=dev))
        with pytest.raises(ValueError, match=f"w is on meta, a and b on {dev}"):
            ops.weighted_outer_sum(a, b, torch.ones(4, device="meta"))
        # the update: lists, shapes, dtypes, layouts, devices
        p, g = torch.ones(2, device=dev), torch.ones(2, device=dev)
        cases = [
            (([p], [], []), 0.0, ValueError, r"got 1 params, 0 grads and 0 momentum buffers"),
            (([p], [g], []), 0.9, ValueError, r"got 1 params, 1 grads and 0 momentum buffers"),
            (([], [g], []), 0.0, ValueError, r"0 params, 1 grads"),
            (([p], [torch.ones(3, device=dev)], []), 0.0, ValueError, r"param 0 has shape \(2,\), grad \(3,\)"),
            (([p], [g], [torch.ones(3, device=dev)]), 0.9, ValueError, r"momentum buffer 0 has shape \(3,\), param \(2,\)"),
            (([p], [g.double()], []), 0.0, TypeError, r"param 0 is torch.float32, its grad torch.float64"),
            (([p], [g], [g.half()]), 0.9, TypeError, r"momentum buffer 0 is torch.float16, its param torch.float32"),
            (([p.long()], [g.long()], []), 0.0, TypeError, r"param 0 must be float16, bfloat16, float32 or float64"),
            (([p], [g.to_sparse()], []), 0.0, TypeError, r"layout torch.sparse_coo"),
            (([p], [1.0], []), 0.0, TypeError, r"grads\[0\] is a float"),
            (([p], [g.to("meta")], []), 0.0, ValueError, f"tensors on {p.device} and meta"),
        ]
        for (params, grads, bufs), momentum, error, match in cases:
            before = [x.clone() for x in params]
            with pytest.raises(error, match=match):
                ops.sgd_momentum_update_(params, grads, bufs, 0.1, momentum, 0.0, 0.0, False, False)
            assert all(torch.equal(x, y) for x, y in zip(params, before))  # checked before anything is written


# The registered kernels' own messages: C++ (RuntimeError, sizes as [4, 3, 5]) for the native
# backends, Python (ValueError / TypeError, sizes as (4, 3, 5)) for Triton.
_NATIVE_ERRORS = [
    (lambda a, b, w: ((a, torch.randn(4, 2, 6)),), RuntimeError,
     r"agree in B \(and T\); got a \[4, 3, 5\] and b \[4, 2, 6\]"),
    (lambda a, b, w: ((torch.randn(4, 5), torch.randn(3, 6)),), RuntimeError,
     r"agree in B \(and T\); got a \[4, 5\] and b \[3, 6\]"),
    (lambda a, b, w: ((a, torch.randn(4, 6)),), RuntimeError,
     r"both be \[B, T, d\] or both \[B, d\]; got a \[4, 3, 5\] and b \[4, 6\]"),
    (lambda a, b, w: ((torch.randn(5), torch.randn(5)),), RuntimeError,
     r"both be \[B, T, d\] or both \[B, d\]; got a \[5\] and b \[5\]"),
    (lambda a, b, w: ((a, b.double()),), RuntimeError, "share one dtype.*got Float and Double"),
    (lambda a, b, w: ((a.long(), b.long()),), RuntimeError, "share one dtype.*got Long and Long"),
]
_TRITON_ERRORS = [
    (lambda a, b, w: ((a, torch.randn(4, 2, 2)),), ValueError, r"agree in B \(and T\); got a \(4, 3, 5\) and b \(4, 2, 2\)"),
    (lambda a, b, w: ((a.long(), b.long()),), TypeError, r"share one floating dtype; got torch.int64 and torch.int64"),
    (lambda a, b, w: ((a.to(torch.float8_e4m3fn), b.to(torch.float8_e4m3fn)),), TypeError,
     r"float16, bfloat16, float32 or float64, got torch.float8_e4m3fn"),
]


def test_kernel_errors(kernel_backend):
    """The registered kernels check what their memory accesses depend on, for callers that skip
    engm_fast.ops: shapes, dtypes, devices, the explicit route and accumulation dtype."""
    backend = kernel_backend
    dev = backend.device
    k = backend.kernels()
    native = backend.name != "triton"
    a, b, w = torch.randn(4, 3, 5, device=dev), torch.randn(4, 3, 2, device=dev), torch.ones(4, device=dev)
    for make, error, match in _NATIVE_ERRORS if native else _TRITON_ERRORS:
        ((x, y),) = make(a, b, w)
        x, y = x.to(dev), y.to(dev)
        with pytest.raises(error, match="per_example_sqnorm: .*" + match):
            k.per_example_sqnorm(x, y, "ghost", torch.float32)
        with pytest.raises(error, match="weighted_outer_sum: .*" + match):
            k.weighted_outer_sum(x, y, w)
    route_error = RuntimeError if native else ValueError
    for mode in ("fast", "auto"):  # "auto" is the wrapper's: kernels take the route
        with pytest.raises(route_error, match=rf"mode must be 'ghost' or 'direct' .* got '{mode}'"):
            k.per_example_sqnorm(a, b, mode, torch.float32)
    with pytest.raises(RuntimeError if native else TypeError, match="float32 or float64"):
        k.per_example_sqnorm(a, b, "ghost", torch.float16)
    with pytest.raises(RuntimeError if native else ValueError, match=r"w must be \[B\] = \[4\], got .3"):
        k.weighted_outer_sum(a, b, torch.ones(3, device=dev))
    with pytest.raises(RuntimeError if native else ValueError, match=r"w must be \[B\] = \[4\], got .4, 1"):
        k.weighted_outer_sum(a, b, torch.ones(4, 1, device=dev))
    with pytest.raises(RuntimeError if native else TypeError, match="float32 or float64"):
        k.weighted_outer_sum(a, b, torch.ones(4, dtype=torch.float16, device=dev))
    if dev == "cuda":
        with pytest.raises(RuntimeError, match="different devices"):
            k.per_example_sqnorm(a, b.cpu(), "ghost", torch.float32)
        with pytest.raises(RuntimeError, match="w is on cpu"):
            k.weighted_outer_sum(a, b, torch.ones(4))
    if backend.name == "cuda":  # the kernels are instantiated for one accumulation dtype per input dtype
        with pytest.raises(RuntimeError, match="the kernels accumulate Float inputs in Float; got acc_dtype Double"):
            k.per_example_sqnorm(a, b, "ghost", torch.float64)
    # the update (C++: TORCH_CHECK_VALUE / _TYPE, sizes as [2]; Triton: reference.check_update_args)
    p, g = torch.ones(2, device=dev), torch.ones(2, device=dev)
    one = lambda *shape, dtype=torch.float32: torch.ones(*shape, dtype=dtype, device=dev)  # noqa: E731
    cases = [
        (([p], [], []), ValueError, r"got 1 params, 0 grads and 0 momentum buffers"),
        (([p], [g, g], [g]), ValueError, r"got 1 params, 2 grads and 1 momentum buffers"),
        (([p], [g], []), ValueError, r"1 params, 1 grads and 0 momentum buffers"),
        (([p], [one(3)], [one(2)]), ValueError, r"param 0 has shape \[2\], grad \[3\]" if native
         else r"param 0 has shape \(2,\), grad \(3,\)"),
        (([p], [g], [one(2, dtype=torch.float16)]), TypeError,
         r"momentum buffer 0 is Half, its param Float" if native
         else r"momentum buffer 0 is torch.float16, its param torch.float32"),
    ]
    if native:
        cases += [
            (([p], [g], [one(3)]), ValueError, r"momentum buffer 0 has shape \[3\], param \[2\]"),
            (([p], [one(2, dtype=torch.float64)], [g]), TypeError,
             r"param 0 and its grad must share one dtype .* got Float and Double"),
            (([one(2, dtype=torch.int64)], [one(2, dtype=torch.int64)], [one(2, dtype=torch.int64)]), TypeError,
             r"share one dtype among float16, bfloat16, float32, float64; got Long and Long"),
        ]
    for (params, grads, bufs), error, match in cases:
        before = params[0].clone()
        with pytest.raises(error, match=match):
            k.sgd_momentum_update_(params, grads, bufs, 0.1, 0.9, 0.0, 0.0, False, False)
        assert torch.equal(params[0], before)  # checked before anything is written


@pytest.mark.parametrize("backend", backends("cuda"), indirect=True)
def test_cuda_kernels_registered(backend):
    for op in ("per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"engm_fast::{op}", "CUDA"), (
            f"engm_fast::{op} has no CUDA kernel: the extension was built without csrc/cuda "
            "(torch without CUDA, or nvcc / CUDA_HOME not found at build time)"
        )
    for op in ("per_example_sqnorms", "weighted_outer_sums_"):  # composite: through the kernels above
        assert torch._C._dispatch_has_computed_kernel_for_dispatch_key(f"engm_fast::{op}", "CUDA"), op


# ----------------------------------------------------------------------------- sgd_momentum_update_

# (momentum, dampening, weight_decay, nesterov)
HYPER = [
    (0.0, 0.0, 0.0, False),   # plain SGD, no buffers
    (0.0, 0.0, 0.01, False),  # plain SGD with weight decay
    (0.9, 0.0, 0.0, False),
    (0.5, 0.3, 0.01, False),  # dampening and weight decay
    (0.9, 0.0, 0.02, True),   # nesterov
]
LR = 0.5


def _update_params(dtype, gen, device, large):
    """Odd sizes, a size-0 tensor, a channels_last, a transposed, a misaligned (storage offset of
    one element) and a non-dense (every other column) param, and (``large``) two large ones
    (40000 + 30000 elements > 2 x at::internal::GRAIN_SIZE = 65536, so the C++ kernel's parallel
    chunks start and end inside tensors; > 16384, the CUDA kernel's chunk)."""
    def rnd(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(device, dtype)

    p = [rnd(5, 3), rnd(1), rnd(33), rnd(0, 4), rnd(2, 3, 4, 5).contiguous(memory_format=torch.channels_last),
         rnd(6, 4).t(), rnd(1001)[1:], rnd(40, 66)[:, ::2]]
    return p + [rnd(40000), rnd(30000)] if large else p


def _truth(params, grads, bufs, momentum, dampening, weight_decay, nesterov, first_step):
    """(params, buffers) after one float64 step, and the magnitudes that bound their rounding
    errors: the same step on absolute values with the sign of lr flipped (|p| + lr |s|)."""
    hyper = (momentum, dampening, weight_decay, nesterov, first_step)
    # copies: .double() of a float64 tensor is the tensor itself, which the reference would update
    p64 = [p.to("cpu", torch.float64, copy=True) for p in params]
    b64 = [b.to("cpu", torch.float64, copy=True) for b in bufs]
    reference.sgd_momentum_update_(p64, [g.cpu().double() for g in grads], b64, LR, *hyper)
    p_mag = [p.cpu().double().abs() for p in params]
    b_mag = [b.cpu().double().abs() for b in bufs]
    reference.sgd_momentum_update_(p_mag, [g.cpu().double().abs() for g in grads], b_mag, -LR, *hyper)
    return (p64, p_mag), (b64, b_mag)


def _check_update(got, want, what):
    values, magnitudes = want
    for i, (x, y, mag) in enumerate(zip(got, values, magnitudes)):
        assert x.shape == y.shape
        if x.numel() == 0:
            continue
        err = ((x.detach().cpu().double() - y).abs() / mag.clamp_min(1e-30)).max().item()
        tol = TOLERANCE[x.dtype].update
        assert err <= tol, f"{what} {i} ({x.dtype}): error {err:.3g} x magnitude > {tol:.3g}"


def _outside(view: torch.Tensor) -> torch.Tensor:
    """Mask over ``view._base`` (a contiguous tensor) of the elements ``view`` does not hold."""
    base = view._base
    inside = torch.zeros(base.numel(), dtype=torch.bool, device=base.device)
    index = torch.arange(base.numel(), device=base.device)
    inside[index.as_strided(view.shape, view.stride(), view.storage_offset()).reshape(-1)] = True
    return ~inside.view(base.shape)


def _run_update_steps(backend, params, gen, hyper, steps):
    momentum, dampening, weight_decay, nesterov = hyper
    strides = [p.stride() for p in params]
    outside = [(p._base, _outside(p), p._base.clone()) for p in params if p._base is not None]
    # The first step must overwrite whatever the buffers hold.
    bufs = [torch.full_like(p, 7.0) for p in params] if momentum else []
    for step in range(steps):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(p.device, p.dtype) for p in params]
        want_p, want_b = _truth(params, grads, bufs, momentum, dampening, weight_decay, nesterov, step == 0)
        with backend.use():
            engm_fast.ops.sgd_momentum_update_(params, grads, bufs, LR, momentum, dampening, weight_decay, nesterov,
                                               first_step=step == 0)
        _check_update(params, want_p, f"step {step} param")
        _check_update(bufs, want_b, f"step {step} buffer")
    assert [p.stride() for p in params] == strides  # updated in place, layouts kept
    for base, mask, before in outside:  # views: nothing outside them written
        assert torch.equal(base[mask], before[mask])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("hyper", HYPER, ids=lambda h: "mom{}-damp{}-wd{}-nest{}".format(*h))
def test_update_steps(backend, dtype, hyper):
    """Four steps (the first with first_step=True over buffers holding 7.0), each against the
    float64 truth from the state the backend reached, so errors do not compound. (The large
    tensors test the C++ and CUDA work splitting; Triton's one-launch-per-tensor grids are
    covered by test_update_mixed_dtypes_in_one_call.)"""
    gen = torch.Generator().manual_seed(_seed(backend.name, dtype, hyper))
    params = _update_params(dtype, gen, backend.device, large=not backend.interpreted)
    _run_update_steps(backend, params, gen, hyper, steps=4)


def test_update_mixed_dtypes_in_one_call(backend):
    """One call over tensors of every dtype; sizes across the CUDA kernel's 16384-element chunks
    on a GPU, across the Triton programs' 1024-element blocks elsewhere."""
    gen = torch.Generator().manual_seed(_seed("mixed", backend.name))
    chunk = 16384 if backend.device == "cuda" else 1024
    for hyper in ((0.9, 0.0, 0.0, False), (0.9, 0.0, 5e-4, True), (0.5, 0.3, 1e-2, False), (0.0, 0.0, 1e-3, False)):
        params = [torch.randn(size, generator=gen, dtype=torch.float64).to(backend.device, dtype)
                  for dtype, size in ((torch.float32, chunk * 3 + 5), (torch.float16, 1001), (torch.bfloat16, 1),
                                      (torch.float64, 33 * 65), (torch.float32, chunk))]
        params[1] = params[1][1:]  # misaligned by 2 bytes
        _run_update_steps(backend, params, gen, hyper, steps=3)


def test_update_first_step_sets_buffer_to_first_direction(backend):
    dev = backend.device
    p = [torch.tensor([1.0, -2.0], dtype=torch.float64, device=dev)]
    g = [torch.tensor([0.5, 0.25], dtype=torch.float64, device=dev)]
    buf = [torch.tensor([100.0, 100.0], dtype=torch.float64, device=dev)]
    with backend.use():
        engm_fast.ops.sgd_momentum_update_(p, g, buf, lr=0.1, momentum=0.9, dampening=0.5, weight_decay=0.1,
                                           nesterov=False, first_step=True)
    d = torch.tensor([0.5 + 0.1 * 1.0, 0.25 + 0.1 * -2.0], dtype=torch.float64)  # dampening not applied
    torch.testing.assert_close(buf[0].cpu(), d, rtol=0, atol=1e-15)
    torch.testing.assert_close(p[0].cpu(), torch.tensor([1.0, -2.0], dtype=torch.float64) - 0.1 * d, rtol=0, atol=1e-15)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
def test_update_matches_torch_optim_sgd(backend, dtype):
    """Several steps of torch.optim.SGD (its own implementation) and of the op agree."""
    gen = torch.Generator().manual_seed(3)
    chunk = 16384 if backend.device == "cuda" else 1024  # CUDA's chunks, Triton's blocks
    wide = 4096 if backend.device == "cuda" else 512
    shapes = [(4, 3), (7,)] if dtype == torch.float64 else [(64, 3, 3, 3), (64,), (10, wide), (10,), (chunk + 7,)]
    ref = [torch.randn(s, generator=gen, dtype=torch.float64).to(backend.device, dtype) for s in shapes]
    ours = [p.clone() for p in ref]
    for p in ref:
        p.grad = torch.zeros_like(p)
    lr, momentum, dampening, weight_decay = (0.3, 0.8, 0.1, 0.05) if dtype == torch.float64 else (0.05, 0.9, 0.1, 1e-3)
    opt = torch.optim.SGD(ref, lr=lr, momentum=momentum, dampening=dampening, weight_decay=weight_decay,
                          foreach=False)
    bufs = [torch.zeros_like(p) for p in ours]
    tol = dict(rtol=0, atol=1e-14) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for step in range(5):
        grads = [torch.randn(p.shape, generator=gen, dtype=torch.float64).to(backend.device, dtype) for p in ref]
        for p, g in zip(ref, grads):
            p.grad.copy_(g)
        opt.step()
        with backend.use():
            engm_fast.ops.sgd_momentum_update_(ours, grads, bufs, lr, momentum, dampening, weight_decay, False,
                                               step == 0)
        for p, q in zip(ours, ref):
            torch.testing.assert_close(p, q, **tol)


def test_update_bumps_version_counters(backend):
    p, buf = [torch.randn(3, device=backend.device)], [torch.zeros(3, device=backend.device)]
    versions = (p[0]._version, buf[0]._version)
    with backend.use():
        engm_fast.ops.sgd_momentum_update_(p, [torch.randn(3, device=backend.device)], buf, 0.1, 0.9, 0.0, 0.0, False,
                                           True)
    assert p[0]._version > versions[0] and buf[0]._version > versions[1]


def test_update_empty_lists_do_nothing(backend):
    with backend.use():
        engm_fast.ops.sgd_momentum_update_([], [], [], 0.1, 0.9, 0.0, 0.0, False, False)


@pytest.mark.parametrize("backend", backends("cpu", "triton", "cuda"), indirect=True)
@pytest.mark.parametrize("config", ["relu_nesterov", "tanh_plain"])
def test_engm_matches_torch_backend(backend, config):
    """ENGM end to end (engine norms, weighted gradients, the fused step) in float64: the same
    model and norms as with the reference backend."""
    import torch.nn as nn
    import torch.nn.functional as F

    results = []
    for name in ("torch", backend.name):
        torch.manual_seed(0)
        if config == "relu_nesterov":
            model = nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))
            opt_kw, B, d, steps = dict(lr=0.2, momentum=0.9, nesterov=True, weight_decay=1e-3), 8, 4, 3
        else:
            model = nn.Sequential(nn.Linear(5, 17), nn.Tanh(), nn.Linear(17, 3))
            opt_kw, B, d, steps = dict(lr=0.2, momentum=0.9, weight_decay=1e-3), 6, 5, 2
        model = model.double().to(backend.device)
        opt = engm_fast.ENGM(model, **opt_kw)
        gen = torch.Generator().manual_seed(1)
        with engm_fast.use_backend(name):
            for _ in range(steps):
                x = torch.randn(B, d, generator=gen, dtype=torch.float64).to(backend.device)
                y = torch.randint(0, 3, (B,), generator=gen).to(backend.device)
                opt.zero_grad()
                norms = opt.backward(F.cross_entropy(model(x), y, reduction="none"))
                opt.step()
        results.append((norms, [p.detach().clone() for p in model.parameters()]))
    (norms_ref, params_ref), (norms, params) = results
    torch.testing.assert_close(norms, norms_ref, rtol=1e-12, atol=1e-14)
    for p, q in zip(params, params_ref):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-14)


# ----------------------------------------------------------------------------- opcheck

def _opcheck_samples(device):
    """(a, b) per dtype: 3-D, 2-D, T = 1, T = 300 (multi-tile Gram matrices), T = 0 (empty sums)."""
    shapes = {torch.float32: [(5, 7, 3, 4), (6, 0, 5, 3)], torch.float64: [(3, 1, 6, 2), (3, 5, 17, 3)],
              torch.bfloat16: [(4, 9, 13, 5), (4, 1, 6, 2)], torch.float16: [(2, 300, 3, 2), (2, 0, 5, 3)]}
    for dtype, cases in shapes.items():
        for B, T, d_in, d_out in cases:
            if T == 0 and dtype == torch.float16:  # a T = 0 batch
                sa, sb = (B, 0, d_in), (B, 0, d_out)
            elif T == 0:  # 2-D
                sa, sb = (B, d_in), (B, d_out)
            else:
                sa, sb = (B, T, d_in), (B, T, d_out)
            yield _inputs(sa, sb, dtype, _seed("opcheck", B, T, dtype), device)


def test_opcheck(kernel_backend):
    """torch.library.opcheck (schema, fake tensors, autograd registration, AOT dispatch) of every
    registered op. The Triton ops pass it under the interpreter too: they are custom_ops with
    register_fake, opaque to fake-tensor tracing (engm_fast/triton/__init__.py says why not
    triton_op, whose traced kernels the interpreter cannot run on fake tensors). The reference
    ("torch" backend) registers no op: there is nothing to opcheck."""
    k = kernel_backend.kernels()
    for a, b, w in _opcheck_samples(kernel_backend.device):
        acc = reference.accumulation_dtype(a.dtype)
        for mode in ROUTES:
            torch.library.opcheck(k.per_example_sqnorm.default, (a, b, mode, acc))
        torch.library.opcheck(k.weighted_outer_sum.default, (a, b, w.to(acc)))
    gen = torch.Generator().manual_seed(11)
    op = k.sgd_momentum_update_.default
    for dtypes in ([torch.float32, torch.float32], [torch.float64, torch.float64], [torch.float16, torch.float16],
                   [torch.float32, torch.bfloat16]):
        params = [torch.randn(s, generator=gen).to(kernel_backend.device, dt) for s, dt in zip([(5, 3), (7,)], dtypes)]
        grads = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
        bufs = [torch.randn(p.shape, generator=gen).to(p.device, p.dtype) for p in params]
        torch.library.opcheck(op, (params, grads, bufs, 0.1, 0.9, 0.1, 0.01, False, False))
        torch.library.opcheck(op, (params, grads, bufs, 0.1, 0.9, 0.0, 1e-4, True, True))
        torch.library.opcheck(op, (params, grads, [], 0.1, 0.0, 0.0, 0.01, False, False))


# ----------------------------------------------------------------------------- layer lists

# Layers of one step: T = 1 rows, a ghost and a direct layer, a 2-D layer; B shared.
LAYER_LISTS = [[(5, 1, 13, 7), (5, 33, 17, 3), (5, 3, 40, 50), (5, 0, 9, 1)], [(1, 0, 3, 2)]]


def _layer_inputs(shapes, dtype, device, tag):
    layers = [_shape_inputs(s, dtype, (tag, j), device) for j, s in enumerate(shapes)]
    return [x for x, _, _ in layers], [y for _, y, _ in layers], layers[0][2]


@pytest.mark.parametrize("backend,dtype", backend_cases(DTYPES, [torch.float32]), indirect=["backend"])
@pytest.mark.parametrize("shapes", LAYER_LISTS, ids=lambda s: f"{len(s)}layers")
def test_layer_lists(backend, dtype, shapes):
    """per_example_sqnorms is the sum of the layers' norms (each within the sqnorm tolerance, so
    the sum is within it of the summed scales); weighted_outer_sums_ adds each layer's weighted
    sum into its output (within the outer tolerance plus the rounding of the addition)."""
    a, b, w = _layer_inputs(shapes, dtype, backend.device, "lists")
    truths = [sqnorm_truth(x, y) for x, y in zip(a, b)]
    with backend.use():
        total = engm_fast.ops.per_example_sqnorms(a, b)
    assert total.dtype == reference.accumulation_dtype(dtype) and total.shape == (a[0].shape[0],)
    exact, scale = sum(t[0] for t in truths), sum(t[1] for t in truths)
    err = _max_error(total, exact, scale)
    assert err <= TOLERANCE[dtype].sqnorm, f"per_example_sqnorms {dtype}: normalized error {err:.3g}"
    start = [torch.randn(y.shape[-1] * x.shape[-1], dtype=torch.float64).to(backend.device, dtype)
             for x, y in zip(a, b)]
    out = [s.clone() for s in start]
    with backend.use():
        engm_fast.ops.weighted_outer_sums_(a, b, w, out)
    u = {torch.float64: 2.0**-53, torch.float32: 2.0**-24, torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}[dtype]
    acc = reference.accumulation_dtype(dtype)
    for j, (x, y) in enumerate(zip(a, b)):
        shape = (y.shape[-1], x.shape[-1])
        begin = start[j].double().cpu().view(shape)
        a3, b3 = _rows3(x), _rows3(y)
        w_acc = w.detach().cpu().to(acc)[:, None, None]
        operand = b3.double() * w_acc.double() if dtype == acc else (b3.to(acc) * w_acc).to(dtype).double()
        exact = torch.einsum("bto,bti->oi", operand, a3.double())  # the op's sum, before any rounding
        scale = torch.einsum("bto,bti->oi", (b3.double() * w_acc.double()).abs(), a3.double().abs())
        # the outer deviation of the sum, then the rounding of the sum and of the addition
        allowed = TOLERANCE[dtype].outer * scale + 2 * u * (begin.abs() + exact.abs())
        deviation = (out[j].double().cpu().view(shape) - (begin + exact)).abs()
        assert (deviation <= allowed).all(), f"weighted_outer_sums_ layer {j} {dtype}: {(deviation / allowed).max():.3g}x"


def test_layer_lists_check_their_arguments(backend):
    a, b, w = _layer_inputs(LAYER_LISTS[0], torch.float32, backend.device, "bad")
    with backend.use():
        with pytest.raises(ValueError, match="non-empty lists"):
            engm_fast.ops.per_example_sqnorms([], [])
        with pytest.raises(ValueError, match="layer 1 has a batch of 2"):
            engm_fast.ops.per_example_sqnorms([a[0], a[1][:2]], [b[0], b[1][:2]])
        with pytest.raises(TypeError, match="one call takes one dtype"):
            engm_fast.ops.per_example_sqnorms([a[0], a[1].double()], [b[0], b[1].double()])
        with pytest.raises(ValueError, match=r"out\[1\] has 3 elements"):
            engm_fast.ops.weighted_outer_sums_(a[:2], b[:2], w, [torch.zeros(7 * 13, device=backend.device),
                                                                 torch.zeros(3, device=backend.device)])
        with pytest.raises(ValueError, match="contiguous"):
            engm_fast.ops.weighted_outer_sums_(a[:1], b[:1], w, [torch.zeros(13, 7, device=backend.device).t()])


def test_layer_lists_opcheck(kernel_backend):
    k = kernel_backend.kernels()
    for dtype in (torch.float32, torch.float64, torch.bfloat16):
        a, b, w = _layer_inputs(LAYER_LISTS[0], dtype, kernel_backend.device, "opcheck-lists")
        acc = reference.accumulation_dtype(dtype)
        routes = [reference.resolve_sqnorm_mode("auto", max(1, s[1]), s[2], s[3]) for s in LAYER_LISTS[0]]
        torch.library.opcheck(k.per_example_sqnorms.default, (a, b, routes, acc))
        out = [torch.zeros(y.shape[-1] * x.shape[-1], dtype=dtype, device=kernel_backend.device) for x, y in zip(a, b)]
        torch.library.opcheck(k.weighted_outer_sums_.default, (a, b, w.to(acc), out))
