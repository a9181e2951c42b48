"""The engm_fast ops on layer shapes, each backend that loaded next to the pure-PyTorch reference.

    pytest benchmarks/test_bench_ops.py [--bench-device cuda]

Shapes (B, T, d_in, d_out): an MLP layer, two conv layers as im2col rows, a transformer
projection. Groups are per shape and op, so the table compares the backends of one op.
"""
import pytest
import torch

import engm_fast
from engm_fast import reference

SHAPES = {
    "mlp": (256, 1, 784, 512),
    "conv3x3_3to64": (64, 1024, 27, 64),
    "conv3x3_64to64": (64, 256, 576, 64),
    "transformer": (32, 128, 256, 256),
}


def _backends(device):
    names = [b for b in engm_fast.available_backends() if b != "torch"]
    if device.type == "cpu":
        names = [b for b in names if b == "cpu"]  # Triton on the CPU is the (slow) interpreter
    return ["reference"] + names


def _inputs(shape, device):
    B, T, d_in, d_out = shape
    g = torch.Generator().manual_seed(0)
    a_shape, b_shape = ((B, d_in), (B, d_out)) if T == 1 else ((B, T, d_in), (B, T, d_out))
    return (torch.randn(a_shape, generator=g).to(device), torch.randn(b_shape, generator=g).to(device),
            torch.rand(B, generator=g).to(device))


def _bench_op(benchmark, device, backend, op: str, *args):
    """Times ``reference.<op>(*args)`` or, on another backend, ``engm_fast.ops.<op>(*args)``."""
    fn = getattr(reference if backend == "reference" else engm_fast.ops, op)
    _bench_loop(benchmark, device, backend, lambda: fn(*args))


def _bench_loop(benchmark, device, backend, fn):
    """Times ``fn()`` with ``backend`` selected ("reference": no selection, it calls reference.*)."""
    if backend not in _backends(device):
        pytest.skip(f"backend {backend} is not available on {device.type}")

    def timed():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    if backend == "reference":
        benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)
    else:
        with engm_fast.use_backend(backend):
            benchmark.pedantic(timed, rounds=20, iterations=1, warmup_rounds=2)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("mode", ["direct", "ghost"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_sqnorm(benchmark, shape, mode, backend, bench_device):
    a, b, _ = _inputs(SHAPES[shape], bench_device)
    benchmark.group = f"sqnorm_{mode} {shape}"
    _bench_op(benchmark, bench_device, backend, "per_example_sqnorm", a, b, mode)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("shape", sorted(SHAPES))
def test_weighted_outer_sum(benchmark, shape, backend, bench_device):
    a, b, w = _inputs(SHAPES[shape], bench_device)
    benchmark.group = f"weighted_outer_sum {shape}"
    _bench_op(benchmark, bench_device, backend, "weighted_outer_sum", a, b, w)


# The layer-list ops on one step's layers: the MLP 784-512-512-10 at B = 256 (weights and the
# biases as [B, P] x ones), in one call, next to the per-layer ops called in a Python loop.
MLP_LAYERS = [(784, 512), (512, 512), (512, 10)]


def _mlp_lists(device):
    g = torch.Generator().manual_seed(0)
    B = 256
    a, b = [], []
    for d_in, d_out in MLP_LAYERS:
        x, y = torch.randn(B, d_in, generator=g), torch.randn(B, d_out, generator=g)
        a += [x, y]  # the weight (x, y) and the bias (y, ones)
        b += [y, torch.ones(B, 1)]
    return [t.to(device) for t in a], [t.to(device) for t in b], torch.rand(B, generator=g).to(device)


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("form", ["list", "loop"])
def test_per_example_sqnorms(benchmark, form, backend, bench_device):
    a, b, _ = _mlp_lists(bench_device)
    benchmark.group = f"per_example_sqnorms mlp {form}"
    if form == "list":
        _bench_op(benchmark, bench_device, backend, "per_example_sqnorms", a, b)
    else:
        mod = reference if backend == "reference" else engm_fast.ops
        _bench_loop(benchmark, bench_device, backend, lambda: [mod.per_example_sqnorm(x, y) for x, y in zip(a, b)])


@pytest.mark.parametrize("backend", ["reference", "cpu", "cuda", "triton"])
@pytest.mark.parametrize("form", ["list", "loop"])
def test_weighted_outer_sums(benchmark, form, backend, bench_device):
    a, b, w = _mlp_lists(bench_device)
    out = [torch.zeros(y.shape[1] * x.shape[1], device=bench_device) for x, y in zip(a, b)]
    benchmark.group = f"weighted_outer_sums_ mlp {form}"
    if form == "list":
        _bench_op(benchmark, bench_device, backend, "weighted_outer_sums_", a, b, w, out)
    else:
        mod = reference if backend == "reference" else engm_fast.ops
        _bench_loop(benchmark, bench_device, backend,
                    lambda: [o.view(y.shape[1], x.shape[1]).add_(mod.weighted_outer_sum(x, y, w))
                             for x, y, o in zip(a, b, out)])

