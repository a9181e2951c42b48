"""A whole adversarial-training iteration: PGD-10 attack (eps 8/255, step 2/255) then the step.

    pytest benchmarks/test_bench_at_iteration.py [--bench-full] [--bench-device cuda]
"""
import pytest

from engm_fast.bench.methods import METHODS

from conftest import bound_iteration


@pytest.mark.parametrize("method", METHODS)
def test_pgd10_iteration(benchmark, method, bench_device, bench_quick):
    fn = bound_iteration("pgd10_cnn", method, bench_device, bench_quick)
    benchmark.group = "pgd10 cnn"
    benchmark.pedantic(fn, rounds=3 if bench_quick else 5, iterations=1, warmup_rounds=1)
