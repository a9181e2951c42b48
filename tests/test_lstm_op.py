"""The LSTM recurrence op (engm_fast.ops.lstm: the C++ CPU kernel and its pure-PyTorch reference)
against float64 truth: an autograd-differentiated LSTM written gate by gate, and torch's own
``torch.lstm``.

Parametrized by backend and device, as tests/test_ops.py: ``torch`` runs the reference, ``cpu``
the C++ kernel (float32 and float64; other dtypes run the reference there too), ``torch`` on
``cuda`` the reference on a GPU (skipped without one). Under CI=true a missing C++ extension
fails instead of skipping.

Deviation: per returned tensor, ``max |x - X| / max(1, max |X|)`` with ``X`` the float64 truth
from the same (rounded) inputs, at most ``engm_fast.ops.lstm.TOLERANCE[dtype]``.
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch

import engm_fast
from engm_fast.ops import lstm as lstm_op

CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def _backend(name: str, device: str):
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device visible to torch")
    if name not in engm_fast.available_backends():
        why = f"the C++ extension is not built ({engm_fast.native_import_error()})"
        if CI:
            raise RuntimeError(f"CI must run the {name}-{device} tests, but {why}")
        pytest.skip(why)
    return name, device


BACKENDS = [("torch", "cpu"), ("cpu", "cpu"), ("torch", "cuda")]


@pytest.fixture(params=BACKENDS, ids=lambda b: f"{b[0]}-{b[1]}")
def backend(request):
    return _backend(*request.param)


# B, T, H, H_out (H_out != H: a projection), odd sizes; B = 0 and T = 0 are the empty cases. At
# H = 64 the kernel's fused passes take 8 batch rows per thread chunk, so B = 9 splits in two.
SHAPES = [(5, 7, 6, 6), (3, 11, 9, 4), (1, 1, 3, 3), (4, 6, 17, 17), (0, 5, 4, 4), (3, 0, 4, 4), (2, 0, 5, 3),
          (9, 3, 64, 64), (9, 2, 64, 40)]


def _inputs(B, T, H, H_out, bias, dtype, device, seed):
    """The op's arguments in ``dtype``, the gradients of its outputs, all on ``device``. Weights of
    O(1 / sqrt(H)) as nn.LSTM initializes them, inputs and states of O(1)."""
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, scale=1.0):
        return (torch.randn(shape, generator=g, dtype=torch.float64) * scale).to(device, dtype)

    k = H ** -0.5
    args = dict(gx=rnd(B, T, 4 * H), h0=rnd(B, H_out), c0=rnd(B, H), w_hh=rnd(4 * H, H_out, scale=k),
                b_hh=rnd(4 * H, scale=k) if bias else None,
                w_hr=rnd(H_out, H, scale=k) if H_out != H else None, ph=rnd(B, T, H_out) if H_out != H else None)
    grads = dict(grad_states=rnd(B, T, H_out), grad_h=rnd(B, H_out), grad_c=rnd(B, H))
    return args, grads


def _truth(args, grads, reverse):
    """The forward outputs and the gradients of gx, h0, c0, ph in float64, by autograd through
    an LSTM written gate by gate (torch.nn.LSTM's equations)."""
    a = {k: None if v is None else v.detach().cpu().double().requires_grad_() for k, v in args.items()}
    gx, w_hh, b_hh, w_hr, ph = a["gx"], a["w_hh"], a["b_hh"], a["w_hr"], a["ph"]
    B, T, G = gx.shape
    h, c = a["h0"], a["c0"]
    per_step = {}
    for t in (range(T - 1, -1, -1) if reverse else range(T)):
        z = gx[:, t] + h @ w_hh.t() + (0 if b_hh is None else b_hh)
        zi, zf, zg, zo = z.chunk(4, 1)
        i, f, g, o = zi.sigmoid(), zf.sigmoid(), zg.tanh(), zo.sigmoid()
        c = f * c + i * g
        m = o * c.tanh()
        h = m if w_hr is None else m @ w_hr.t() + ph[:, t]
        per_step[t] = (h, torch.cat([i, f, g, o], 1), c, c.tanh(), m)

    def stack(k, like):
        return torch.stack([per_step[t][k] for t in range(T)], 1) if T else like.new_empty(B, 0, like.shape[-1])
    states = stack(0, a["h0"])
    outs = [states, stack(1, gx), stack(2, a["c0"]), stack(3, a["c0"]), stack(4, a["c0"])]
    g = {k: v.detach().cpu().double() for k, v in grads.items()}
    loss = (states * g["grad_states"]).sum() + (h * g["grad_h"]).sum() + (c * g["grad_c"]).sum()
    wrt = [gx, a["h0"], a["c0"]] + ([ph] if ph is not None else [])
    d = torch.autograd.grad(loss, wrt, allow_unused=True)
    d = [torch.zeros_like(x) if dx is None else dx for x, dx in zip(wrt, d)]
    return [o.detach() for o in outs], d


def _deviation(got, exact) -> float:
    got = got.detach().to("cpu", torch.float64)
    assert got.shape == exact.shape, f"shape {tuple(got.shape)}, expected {tuple(exact.shape)}"
    if exact.numel() == 0:
        return 0.0
    return ((got - exact).abs().max() / exact.abs().max().clamp_min(1)).item()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reverse", [False, True], ids=["forward", "reverse"])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}T{}H{}o{}".format(*s))
def test_lstm_recurrence_matches_float64_autograd(backend, dtype, reverse, bias, shape):
    name, device = backend
    args, grads = _inputs(*shape, bias, dtype, device, zlib.crc32(repr((shape, bias, reverse, dtype)).encode()))
    outs_true, grads_true = _truth(args, grads, reverse)
    tol = lstm_op.TOLERANCE[dtype]
    with engm_fast.use_backend(name):
        outs = engm_fast.ops.lstm_recurrence(**args, reverse=reverse)
        states, acts, cells, tanh_cells, m = outs
        back = engm_fast.ops.lstm_recurrence_backward(
            *grads.values(), args["w_hh"], args["w_hr"], acts, cells, tanh_cells, args["c0"], reverse=reverse,
            need_h0=True)
    projected = args["w_hr"] is not None
    for what, got, exact in zip(("states", "acts", "cells", "tanh_cells", "m"), outs, outs_true):
        if what == "m" and not projected:
            assert got.numel() == 0   # the states are m
            continue
        assert got.dtype == dtype and got.device.type == device
        err = _deviation(got, exact)
        assert err <= tol, f"{what}: deviation {err:.3g} > {tol:g}"
    names = ("dz", "dh0", "dc0") + (("d_ph",) if projected else ())
    for what, got, exact in zip(names, back, grads_true):
        err = _deviation(got, exact)
        assert err <= tol, f"{what}: deviation {err:.3g} > {tol:g}"
    if not projected:
        assert back[3].numel() == 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("proj_size", [0, 4])
def test_lstm_recurrence_equals_torch_lstm(backend, dtype, proj_size):
    """The states and final cells of both directions equal torch's fused bidirectional LSTM
    (oneDNN / ATen on CPU, cuDNN on CUDA), with and without a projection."""
    name, device = backend
    torch.manual_seed(3)
    lstm = torch.nn.LSTM(7, 10, batch_first=True, bidirectional=True, proj_size=proj_size).to(device, dtype)
    H_out = proj_size or 10
    x, h0, c0 = (torch.randn(s, device=device, dtype=dtype) for s in ((4, 9, 7), (2, 4, H_out), (2, 4, 10)))
    tol = dict(rtol=1e-12, atol=1e-12) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-5)
    # cuDNN's float32 RNNs use TF32 by default (10-bit mantissas): not the float32 this compares
    with torch.no_grad(), torch.backends.cudnn.flags(enabled=True, allow_tf32=False):
        expected, (h_n, c_n) = lstm(x, (h0, c0))
        for d, sfx in enumerate(("", "_reverse")):
            w = {k: getattr(lstm, f"{k}_l0{sfx}") for k in ("weight_ih", "bias_ih", "weight_hh", "bias_hh")}
            gx = torch.nn.functional.linear(x, w["weight_ih"], w["bias_ih"])
            w_hr = getattr(lstm, f"weight_hr_l0{sfx}") if proj_size else None
            ph = x.new_zeros(4, 9, H_out) if proj_size else None
            with engm_fast.use_backend(name):
                states, _, cells, _, _ = engm_fast.ops.lstm_recurrence(gx, h0[d], c0[d], w["weight_hh"], w["bias_hh"],
                                                                       w_hr, ph, reverse=d == 1)
            torch.testing.assert_close(states, expected[..., d * H_out:(d + 1) * H_out], **tol)
            torch.testing.assert_close(cells[:, 0 if d else -1], c_n[d], **tol)


@pytest.mark.parametrize("H_out", [4, 3], ids=["plain", "projection"])
def test_lstm_recurrence_backward_without_h0_and_gradients(backend, H_out):
    """need_h0=False returns a 0-element h0 gradient (its GEMM is skipped) and the other results
    unchanged; absent output gradients count as zero."""
    name, device = backend
    args, grads = _inputs(3, 5, 4, H_out, True, torch.float64, device, 7)
    with engm_fast.use_backend(name):
        _, acts, cells, tanh_cells, _ = engm_fast.ops.lstm_recurrence(**args)
        common = (args["w_hh"], args["w_hr"], acts, cells, tanh_cells, args["c0"])
        full = engm_fast.ops.lstm_recurrence_backward(None, grads["grad_h"], None, *common, need_h0=True)
        part = engm_fast.ops.lstm_recurrence_backward(None, grads["grad_h"], None, *common, need_h0=False)
        zero = engm_fast.ops.lstm_recurrence_backward(torch.zeros_like(grads["grad_states"]), grads["grad_h"],
                                                      torch.zeros_like(grads["grad_c"]), *common, need_h0=True)
    assert part[1].numel() == 0
    for k in (0, 2, 3):
        torch.testing.assert_close(full[k], part[k], rtol=1e-14, atol=1e-15)
    for k in range(4):
        torch.testing.assert_close(full[k], zero[k], rtol=1e-14, atol=1e-15)


def test_lstm_recurrence_strided_and_expanded_inputs(backend):
    """Non-contiguous arguments (transposed weights, slices of larger states, the expanded
    zero-stride gradients that ``out.sum().backward()`` hands over) give the contiguous results
    (to float32 rounding: BLAS may sum in another order for another layout)."""
    name, device = backend
    args, grads = _inputs(3, 5, 6, 4, True, torch.float32, device, 12)

    def strided(v):  # the same values, not contiguous
        if v.dim() == 1:
            return torch.stack([v, v], 1)[:, 0]
        if v.dim() == 2:
            return v.t().contiguous().t()
        return v.transpose(0, 1).contiguous().transpose(0, 1)
    strided = {k: None if v is None else strided(v) for k, v in args.items()}
    strided["h0"] = torch.cat([args["h0"], args["h0"]], 1)[:, :4]
    assert not strided["w_hh"].is_contiguous() and not strided["gx"].is_contiguous()
    expanded = dict(grad_states=torch.ones(1, 1, 1, device=device).expand(3, 5, 4),
                    grad_h=torch.ones(1, 1, device=device).expand(3, 4), grad_c=torch.ones(1, device=device).expand(3, 6))
    with engm_fast.use_backend(name):
        want = engm_fast.ops.lstm_recurrence(**args, reverse=True)
        got = engm_fast.ops.lstm_recurrence(**strided, reverse=True)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
        back = [engm_fast.ops.lstm_recurrence_backward(*g, args["w_hh"], args["w_hr"], *want[1:4], args["c0"],
                                                       reverse=True)
                for g in (expanded.values(), [t.contiguous() for t in expanded.values()])]
    for a, b in zip(*back):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_lstm_kernel_baseline_instruction_set():
    """On an AVX2 machine the kernel runs its AVX2 + FMA passes; ENGM_FAST_CPU_ISA=baseline makes
    it run the baseline ones (what CPUs without AVX2 run), checked here against the reference in
    a fresh process (the choice is read once per process)."""
    _kernel()
    script = textwrap.dedent("""
        import sys, torch, zlib
        sys.path.insert(0, {tests!r})
        import test_lstm_op as t
        for shape in ((9, 7, 64, 64), (4, 5, 12, 5)):
            args, grads = t._inputs(*shape, True, torch.float32, "cpu", zlib.crc32(repr(shape).encode()))
            outs_true, grads_true = t._truth(args, grads, False)
            outs = torch.ops.engm_fast.lstm_recurrence(*args.values(), False)
            back = torch.ops.engm_fast.lstm_recurrence_backward(*grads.values(), args["w_hh"], args["w_hr"],
                                                                *outs[1:4], args["c0"], False, True)
            errs = [t._deviation(a, b) for a, b in zip(outs[:4], outs_true)]
            errs += [t._deviation(a, b) for a, b in zip(back, grads_true)]
            assert max(errs) <= t.lstm_op.TOLERANCE[torch.float32], errs
        print("ok")
    """).format(tests=os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "ENGM_FAST_CPU_ISA": "baseline"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stdout + done.stderr


def test_lstm_recurrence_checks_its_arguments(backend):
    name, device = backend
    args, _ = _inputs(3, 5, 4, 4, True, torch.float32, device, 8)
    with engm_fast.use_backend(name):
        with pytest.raises(ValueError, match=r"gx must be \[B, T, 4H\]"):
            engm_fast.ops.lstm_recurrence(**{**args, "gx": args["gx"][..., :-1]})
        with pytest.raises(ValueError, match=r"c0 must be \[3, 4\]"):
            engm_fast.ops.lstm_recurrence(**{**args, "c0": args["c0"][:2]})
        with pytest.raises(ValueError, match="w_hr and ph come together"):
            engm_fast.ops.lstm_recurrence(**{**args, "w_hr": torch.zeros(4, 4, device=device)})
        with pytest.raises(TypeError, match="h0 is torch.float64 .* gx's torch.float32"):
            engm_fast.ops.lstm_recurrence(**{**args, "h0": args["h0"].double()})
        _, acts, cells, tanh_cells, _ = engm_fast.ops.lstm_recurrence(**args)
        with pytest.raises(ValueError, match=r"lstm_recurrence_backward: grad_h must be \[3, 4\]"):
            engm_fast.ops.lstm_recurrence_backward(None, torch.zeros(3, 5, device=device), None, args["w_hh"], None,
                                                   acts, cells, tanh_cells, args["c0"])
        with pytest.raises(ValueError, match=r"lstm_recurrence_backward: acts must be \[B, T, 4H\]"):
            engm_fast.ops.lstm_recurrence_backward(None, None, None, args["w_hh"], None, acts[0], cells, tanh_cells,
                                                   args["c0"])
        with pytest.raises(TypeError, match="cells must be a tensor"):
            engm_fast.ops.lstm_recurrence_backward(None, None, None, args["w_hh"], None, acts, None, tanh_cells,
                                                   args["c0"])
        with pytest.raises(TypeError, match="grad_c is torch.float64 .* acts's torch.float32"):
            engm_fast.ops.lstm_recurrence_backward(None, None, torch.zeros(3, 4, dtype=torch.float64, device=device),
                                                   args["w_hh"], None, acts, cells, tanh_cells, args["c0"])


def _kernel():
    _backend("cpu", "cpu")
    return torch.ops.engm_fast


def test_lstm_kernel_checks_what_it_indexes():
    """Callers of torch.ops.engm_fast.* bypass the wrapper: the kernel checks what its memory
    accesses depend on, and the dtypes it is compiled for."""
    k = _kernel()
    args, _ = _inputs(3, 5, 4, 2, True, torch.float32, "cpu", 9)
    a = list(args.values())
    with pytest.raises(RuntimeError, match=r"ph must be \[B, T, H_out\]"):
        k.lstm_recurrence(*a[:6], a[6][:, :4], False)
    with pytest.raises(RuntimeError, match="runs float32 and float64"):
        k.lstm_recurrence(*[None if t is None else t.half() for t in a], False)
    with pytest.raises(RuntimeError, match="gx's dtype"):
        k.lstm_recurrence(a[0], a[1].double(), *a[2:], False)
    _, acts, cells, tanh_cells, _ = k.lstm_recurrence(*a, False)
    with pytest.raises(RuntimeError, match="grad_c must be"):
        k.lstm_recurrence_backward(None, None, torch.zeros(3, 3), args["w_hh"], args["w_hr"], acts, cells,
                                   tanh_cells, args["c0"], False, True)


def test_lstm_ops_are_registered_for_cuda():
    """Without a CUDA kernel the ops are registered for CUDA with the reference, so that
    torch.ops.engm_fast.* is complete on every device (CI checks every op of the wheel)."""
    _kernel()
    for op in ("lstm_recurrence", "lstm_recurrence_backward"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"engm_fast::{op}", "CUDA"), op


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_lstm_opcheck(dtype):
    """torch.library.opcheck (schema, fake tensors, AOT dispatch) of both ops: with and without a
    bias and a projection, and empty batches and sequences."""
    k = _kernel()
    for shape, bias in ((((4, 6, 5, 5)), True), ((3, 4, 6, 2), False), ((0, 3, 4, 4), True), ((2, 0, 3, 3), False)):
        args, grads = _inputs(*shape, bias, dtype, "cpu", 10)
        for reverse in (False, True):
            torch.library.opcheck(k.lstm_recurrence.default, (*args.values(), reverse))
            _, acts, cells, tanh_cells, _ = k.lstm_recurrence(*args.values(), reverse)
            for need_h0 in (False, True):
                torch.library.opcheck(k.lstm_recurrence_backward.default,
                                      (*grads.values(), args["w_hh"], args["w_hr"], acts, cells, tanh_cells,
                                       args["c0"], reverse, need_h0))
            torch.library.opcheck(k.lstm_recurrence_backward.default,
                                  (None, None, None, args["w_hh"], args["w_hr"], acts, cells, tanh_cells, args["c0"],
                                   reverse, True))
