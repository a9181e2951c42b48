"""Optimizer step (forward, backward, update) of every method on every model case.

    pytest benchmarks/test_bench_step.py [--bench-full] [--bench-device cuda]
"""
import pytest

from engm_fast.bench.methods import METHODS

from conftest import bound_iteration

STEP_CASES = ("mlp", "cnn", "resnet18_gn", "resnet18_bn", "transformer")


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", STEP_CASES)
def test_step(benchmark, case, method, bench_device, bench_quick):
    fn = bound_iteration(case, method, bench_device, bench_quick)
    benchmark.group = f"step {case}"
    benchmark.pedantic(fn, rounds=5 if bench_quick else 7, iterations=1, warmup_rounds=1)
