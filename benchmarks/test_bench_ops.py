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
    if backend not in _backends(device):
        pytest.skip(f"backend {backend} is not available on {device.type}")
    fn = getattr(reference if backend == "reference" else engm_fast.ops, op)

    def timed():
        fn(*args)
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
