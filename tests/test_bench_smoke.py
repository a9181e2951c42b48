"""The benchmark cannot rot: every method it compares runs, and computes the same update.

Each method of :mod:`engm_fast.bench.methods` takes one step (momentum 0) on a tiny copy of each
benchmark model; its parameter update must equal ``-lr * (1/B) sum_i g_i / (||g_i|| + eps)``
computed in float64 from torch.func per-example gradients. A method that cannot run a model
must say so with :class:`Unsupported` where the table says it cannot, and nowhere else.
The console command and the pytest-benchmark files in ``benchmarks/`` also run once, tiny.

The peers are optional packages; outside CI a missing one skips its tests with the reason. In
CI (``CI`` set) they are installed by ``.ci/run``, and a missing one fails.
"""
from __future__ import annotations

import copy
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from engm_fast.bench.methods import EPS, METHODS, Unsupported, build
from engm_fast.bench.models import TransformerBlock, cnn32, mlp, resnet18

ROOT = Path(__file__).resolve().parents[1]
LR = 0.1
_PACKAGE = {"backpack": "backpack", "opacus": "opacus"}

# (model factory, batch factory, methods expected to refuse it)
MODELS = {
    "mlp": (lambda: mlp(13, 7, 3), lambda g: (torch.randn(5, 13, generator=g), torch.randint(0, 3, (5,), generator=g)),
            set()),
    "cnn": (cnn32, lambda g: (torch.rand(3, 3, 32, 32, generator=g), torch.randint(0, 10, (3,), generator=g)), set()),
    "resnet18_gn": (lambda: resnet18("group", 4), lambda g: (torch.rand(3, 3, 32, 32, generator=g),
                                                               torch.randint(0, 10, (3,), generator=g)), {"backpack"}),
    "resnet18_bn": (lambda: resnet18("batch", 4), lambda g: (torch.rand(3, 3, 32, 32, generator=g),
                                                               torch.randint(0, 10, (3,), generator=g)),
                    {"vmap", "backpack", "opacus"}),
    "transformer": (lambda: TransformerBlock(vocab=17, d=8, heads=2),
                    lambda g: (torch.randint(0, 17, (3, 5), generator=g), torch.randint(0, 10, (3,), generator=g)),
                    {"backpack", "engm_proxy"}),
}


def _require(method: str) -> None:
    pkg = _PACKAGE.get(method)
    if pkg and importlib.util.find_spec(pkg) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{pkg} is not installed, but .ci/run installs it")
        pytest.skip(f"optional peer {pkg} is not installed")


def _reference_update(model, x, y) -> torch.Tensor:
    """-lr * normalized mean gradient, float64, from torch.func per-example gradients."""
    m = copy.deepcopy(model).double()
    params = {n: p.detach() for n, p in m.named_parameters()}
    buffers = {n: b.double() if b.is_floating_point() else b for n, b in m.named_buffers()}
    xd = x.double() if x.is_floating_point() else x

    if any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules()):
        # Train-mode BatchNorm has no per-example gradient that torch.func can give; the engine's
        # convention (g_i = b_i^T a_i, the sum decomposition) is tested against an explicit
        # decomposition in test_engine_per_example.py. Here: the engine in float64.
        from engm_fast.engine import attach, release

        engine = attach(m)
        losses = F.cross_entropy(m(xd), y, reduction="none")
        grads = engine.backward(losses, list(m.parameters()))
        release(m)
        norms = grads.sqnorms().sqrt()
        g = grads.weighted_grads(1.0 / (norms + EPS) / len(y))
        return -LR * torch.cat([g[p].flatten() for p in m.parameters()])
    else:
        def loss_one(p, xi, yi):
            return F.cross_entropy(functional_call(m, (p, buffers), (xi.unsqueeze(0),)), yi.unsqueeze(0))

        grads = vmap(grad(loss_one), in_dims=(None, 0, 0))(params, xd, y)
        G = torch.cat([grads[n].flatten(1) for n in params], dim=1)
    w = 1.0 / (G.norm(dim=1) + EPS) / len(y)
    return -LR * (w @ G)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", [m for m in METHODS if m != "sgd"])
def test_method_update_matches_reference(method, model_name):
    _require(method)
    make_model, make_batch, refuses = MODELS[model_name]
    torch.manual_seed(0)
    model = make_model()
    x, y = make_batch(torch.Generator().manual_seed(1))
    copy_ = copy.deepcopy(model)
    before = [p.detach().clone() for p in copy_.parameters()]
    if method in refuses:
        with pytest.raises(Unsupported):
            build(method, copy_, lr=LR, momentum=0.0).step(x, y)
        return
    runner = build(method, copy_, lr=LR, momentum=0.0)
    runner.step(x, y)
    got = torch.cat([(p.detach() - b).flatten() for p, b in zip(runner.params, before)]).double()
    want = _reference_update(model, x, y)
    # float32 methods against a float64 reference: relative error of the whole update vector.
    assert float((got - want).norm() / want.norm()) < 2e-5, f"{method} on {model_name}"


def test_cli_bench_quick_prints_table(tmp_path):
    out = tmp_path / "bench.json"
    proc = subprocess.run([sys.executable, "-m", "engm_fast", "bench", "--quick", "--cases", "mlp", "--methods",
                           "engm", "--rounds", "1", "--no-progress", "--out", str(out)],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "mlp  | engm" in proc.stdout and "time / SGD" in proc.stdout
    assert out.exists()


def test_pytest_benchmark_suite_runs():
    if importlib.util.find_spec("pytest_benchmark") is None:
        if os.environ.get("CI"):
            pytest.fail("pytest-benchmark is not installed, but .ci/run installs it")
        pytest.skip("pytest-benchmark is not installed")
    # One tiny case of each file, timing disabled (each benchmarked call runs once).
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(ROOT / "benchmarks"),
                           "--benchmark-disable", "-k", "mlp or sqnorm_direct or pgd10"],
                          capture_output=True, text=True, timeout=600, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    assert " passed" in proc.stdout
