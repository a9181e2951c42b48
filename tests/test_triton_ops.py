"""The Triton kernels' own machinery (engm_fast/triton): tiles, row splits, compiled or
interpreted mode, torch.compile, backend routing. Their results on every op, against float64
truth with the contract's tolerances, are tested with the other backends in tests/test_ops.py.

Compiled on a GPU when one is visible (and TRITON_INTERPRET is not set), otherwise on the CPU
under the Triton interpreter. triton fixes compiled-or-interpreted once per process, when it is
first imported (see engm_fast/triton/_common.py), and reads TRITON_INTERPRET again in lazy
imports at the first launch, so without a GPU this module sets TRITON_INTERPRET=1
(os.environ.setdefault) before it imports triton, and leaves it set (tests/conftest.py already
did, for the whole session). That is harmless to the other test modules: they choose backends
explicitly ("auto" never picks the interpreter for CPU tensors), and nothing collected before
this module imports triton (engm_fast only looks the package up, engm_fast.triton's __init__
imports nothing). If something did, this module says so and is skipped (under CI=true it fails
instead: CI must run these tests).

Here every launcher also runs with 16-wide tiles (and the weighted sum with 3 row splits), so
loops over several tiles (3 tiles of 16 for 33 and 40, off-diagonal Gram tile pairs), partial
tiles and the split reduction are exercised on the small shapes the interpreter can afford;
errors are those of tests/test_ops.py with the tolerances of engm_fast.reference.TOLERANCE.
"""
from __future__ import annotations

import os

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

from engm_fast.reference import TOLERANCE
from test_ops import _shape_inputs, outer_error, sqnorm_error, sqnorm_truth

OPS = torch.ops.engm_fast_triton
DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)
ROUTES = reference.SQNORM_ROUTES
SMALL_SQNORM = dict(rows_b=16, rows_d=16, direct_o=16, direct_i=16, direct_t=16, ghost_t=16, ghost_d=16)
SMALL_OUTER = dict(o=16, i=16, k=16)

# (B, T, d_in, d_out); T = 0 means 2-D inputs [B, d] (T = 1).
SHAPES = [(1, 1, 1, 1), (3, 1, 5, 17), (5, 33, 17, 3), (2, 5, 33, 17), (1, 40, 3, 5), (3, 0, 33, 1)]


def _inputs(shape, dtype, tag):
    return _shape_inputs(shape, dtype, tag, DEVICE)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_per_example_sqnorm_tiles(shape, dtype):
    a, b, _ = _inputs(shape, dtype, "sqnorm")
    acc = reference.accumulation_dtype(dtype)
    truth = sqnorm_truth(a, b)
    for mode in ROUTES:
        # default tiles: tests/test_ops.py (through the registered op)
        got = launch_per_example_sqnorm(a, b, mode, acc, blocks=SMALL_SQNORM)
        assert got.dtype == acc and got.shape == (a.shape[0],)
        err = sqnorm_error(got, a, b, truth)
        assert err <= TOLERANCE[dtype].sqnorm, f"mode {mode}, 16-wide tiles: normalized error {err:.3g}"
        # the registered op (default tiles) is what the backend calls
        assert torch.equal(OPS.per_example_sqnorm(a, b, mode, acc), launch_per_example_sqnorm(a, b, mode, acc))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_weighted_outer_sum_tiles_and_splits(shape, dtype):
    a, b, w = _inputs(shape, dtype, "outer")
    w = w.to(reference.accumulation_dtype(dtype))  # what engm_fast.ops passes
    for blocks, split in ((SMALL_OUTER, 1), (SMALL_OUTER, 3)):  # default tiles: tests/test_ops.py
        got = launch_weighted_outer_sum(a, b, w, blocks=blocks, split=split)
        assert got.dtype == dtype and got.shape == (b.shape[-1], a.shape[-1])
        err = outer_error(got, a, b, w)
        assert err <= TOLERANCE[dtype].outer, f"blocks {blocks}, split {split}: normalized error {err:.3g}"
    assert torch.equal(OPS.weighted_outer_sum(a, b, w), launch_weighted_outer_sum(a, b, w))


def test_launcher_errors():
    a, b = torch.randn(4, 3, 5, device=DEVICE), torch.randn(4, 3, 2, device=DEVICE)
    with pytest.raises(ValueError, match=r"w is on meta, a and b on"):  # the launcher (no dispatcher)
        launch_weighted_outer_sum(a, b, torch.ones(4, device="meta"))
    with pytest.raises(ValueError, match=r"tensors on .* and meta"):
        launch_sgd_momentum_update_([torch.ones(2, device=DEVICE)], [torch.ones(2, device="meta")], [], 0.1, 0.0,
                                    0.0, 0.0, False, False)


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
    torch.ops.engm_fast_triton.per_example_sqnorm(torch.randn(2, 3), torch.randn(2, 4), "ghost", torch.float32)
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


def test_torch_compile_sees_an_opaque_op():
    """Why custom_op and not triton_op (engm_fast/triton/__init__.py): a compiled graph calling
    the ops traces with fake tensors and runs under the interpreter."""
    a, b, w = _inputs((3, 5, 17, 3), torch.float32, "compile")
    w = w.float()

    @torch.compile(backend="aot_eager", fullgraph=True)
    def f(a, b, w):
        return OPS.per_example_sqnorm(a, b, "direct", torch.float32).sum() + OPS.weighted_outer_sum(a, b, w).sum()

    want = OPS.per_example_sqnorm(a, b, "direct", torch.float32).sum() + OPS.weighted_outer_sum(a, b, w).sum()
    torch.testing.assert_close(f(a, b, w), want)


def test_backend_routes_every_op_to_triton(monkeypatch):
    assert "triton" in engm_fast.available_backends()
    calls = []
    for name in ("per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_"):
        original = getattr(et, name)
        monkeypatch.setattr(et, name, lambda *args, _n=name, _f=original: calls.append(_n) or _f(*args))
    a, b, w = _inputs((3, 2, 5, 4), torch.float32, "routes")
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
