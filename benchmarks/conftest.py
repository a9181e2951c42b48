"""pytest-benchmark suite (``pytest benchmarks/``), kept out of the default test run.

Options:
  --bench-full     the issue's sizes (ResNet-18 at B=128 etc.; long) instead of the quick ones
  --bench-device   cpu (default) or cuda

Benchmarks are grouped by case, so pytest-benchmark's table lists every method next to the
plain SGD step of the same case. For the ratio table measured round-robin in one process, use
``engm-fast bench`` instead. ``tests/test_bench_smoke.py`` runs a tiny subset of this suite in
CI with ``--benchmark-disable``.
"""
from __future__ import annotations

import copy
import warnings

import pytest
import torch


def pytest_addoption(parser):
    parser.addoption("--bench-full", action="store_true", help="benchmark at the full sizes (slow)")
    parser.addoption("--bench-device", default="cpu", choices=("cpu", "cuda"), help="device to benchmark on")


@pytest.fixture
def bench_device(request) -> torch.device:
    device = torch.device(request.config.getoption("--bench-device"))
    if device.type == "cuda" and not torch.cuda.is_available():
        pytest.skip("--bench-device cuda, but no CUDA device")
    return device


@pytest.fixture
def bench_quick(request) -> bool:
    return not request.config.getoption("--bench-full")


def bound_iteration(case_name: str, method: str, device: torch.device, quick: bool):
    """The timed callable of ``method`` on ``case_name`` (skips with the reason if unsupported)."""
    from engm_fast.bench import methods as M
    from engm_fast.bench.suite import LR, MOMENTUM, _iteration, cases_for

    case = cases_for(device.type, quick)[case_name]
    torch.manual_seed(0)
    model = case.make_model().to(device)
    x, y = (t.to(device) for t in case.make_batch(torch.Generator().manual_seed(1)))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            runner = M.build(method, copy.deepcopy(model), lr=LR, momentum=MOMENTUM)
            fn = _iteration(case, runner, method, x, y, device)
            fn()
        except M.Unsupported as exc:
            pytest.skip(f"{method} cannot run {case_name}: {exc}")

    def timed():
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
    return timed
