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

from engm_fast.bench.methods import EPS, KNOWN_WRONG, METHODS, Unsupported, build
from engm_fast.bench import models as bm
from engm_fast.bench.models import TransformerBlock, cnn32, mlp, per_example_loss, resnet18

ROOT = Path(__file__).resolve().parents[1]
LR = 0.1
_PACKAGE = {"backpack": "backpack", "opacus": "opacus"}

def _tokens(B, T, V, classes=None):
    return lambda g: (lambda t: (t, t if classes is None else torch.randint(0, classes, (B,), generator=g)))(
        torch.randint(0, V, (B, T), generator=g))


def _pixels(B, H, classes=10):
    return lambda g: (torch.rand(B, 3, H, H, generator=g), torch.randint(0, classes, (B,), generator=g))


# (model factory, batch factory, methods expected to refuse it (Unsupported), peers known to fail on it
# (an exception), peers known to compute a wrong update (WRONG below))
MODELS = {
    "mlp": (lambda: mlp(13, 7, 3), lambda g: (torch.randn(5, 13, generator=g), torch.randint(0, 3, (5,), generator=g)),
            set(), set()),
    "cnn": (cnn32, lambda g: (torch.rand(3, 3, 32, 32, generator=g), torch.randint(0, 10, (3,), generator=g)), set(),
            set()),
    "resnet18_gn": (lambda: resnet18("group", 4), lambda g: (torch.rand(3, 3, 32, 32, generator=g),
                                                               torch.randint(0, 10, (3,), generator=g)), {"backpack"},
                    set()),
    "resnet18_bn": (lambda: resnet18("batch", 4), lambda g: (torch.rand(3, 3, 32, 32, generator=g),
                                                               torch.randint(0, 10, (3,), generator=g)),
                    {"vmap", "backpack", "opacus"}, set()),
    "transformer": (lambda: TransformerBlock(vocab=17, d=8, heads=2),
                    lambda g: (torch.randint(0, 17, (3, 5), generator=g), torch.randint(0, 10, (3,), generator=g)),
                    {"backpack", "engm_proxy"}, set()),
    # Real-model cases, tiny. Opacus 1.6's ghost clipping fails on tied weights (GPT-2), on BERT's
    # attention reshape, on nn.LSTM / GRU / RNN and on nn.TransformerEncoderLayer's call of its attention.
    "gpt2": (lambda: bm.gpt2_lm(8, 1, 2, 13, 16), _tokens(3, 5, 13), {"backpack", "engm_proxy"}, {"opacus"}),
    "bert": (lambda: bm.bert_classifier(8, 1, 2, 13), _tokens(3, 5, 13, 10), {"backpack", "engm_proxy"}, {"opacus"}),
    "llama": (lambda: bm.llama_lm(8, 1, 2, 13, 16), _tokens(3, 5, 13), {"backpack", "engm_proxy"}, set()),
    "vit": (lambda: bm.vit_classifier(8, 1, 2, image=8, patch=4), _pixels(3, 8), {"backpack"}, set()),
    "lstm": (lambda: bm.lstm_classifier(13, 8), _tokens(3, 5, 13, 10), {"backpack", "engm_proxy"}, {"opacus"}),
    # torch.func.vmap fails inside nn.GRU's and nn.RNN's forward ("output with shape [1, 8] doesn't
    # match the broadcast shape [3, 1, 8]"); inside nn.LSTM's it runs.
    "gru": (lambda: bm.recurrent_classifier("GRU", 13, 8), _tokens(3, 5, 13, 10), {"backpack", "engm_proxy"},
            {"opacus", "vmap"}),
    "rnn": (lambda: bm.recurrent_classifier("RNN", 13, 8), _tokens(3, 5, 13, 10), {"backpack", "engm_proxy"},
            {"opacus", "vmap"}),
    "encoder_layer": (lambda: bm.encoder_layer_classifier(13, 8, 2, batch_first=False), _tokens(3, 5, 13, 10),
                      {"backpack", "engm_proxy"}, {"opacus"}),
    "convnext": (lambda: bm.convnext_classifier((4, 8), (1, 1), 16), _pixels(3, 16), {"backpack"}, set()),
}
# Peers that compute a wrong update without an error (the bench marks them): this test fails if
# that changes, so the mark cannot go stale.
WRONG = set(KNOWN_WRONG)


def _require(method: str) -> None:
    pkg = _PACKAGE.get(method)
    if pkg and importlib.util.find_spec(pkg) is None:
        if os.environ.get("CI"):
            pytest.fail(f"{pkg} is not installed, but .ci/run installs it")
        pytest.skip(f"optional peer {pkg} is not installed")


def _reference_update(model, x, y) -> torch.Tensor:
    """-lr * normalized mean gradient, float64, from per-example gradients (one backward per
    example: torch.func cannot run every model here, e.g. nn.LSTM)."""
    m = copy.deepcopy(model).double()
    xd = x.double() if x.is_floating_point() else x
    loss = per_example_loss(m)

    if any(isinstance(mod, torch.nn.modules.batchnorm._BatchNorm) for mod in m.modules()):
        # Train-mode BatchNorm has no per-example gradient that torch.func can give; the engine's
        # convention (g_i = b_i^T a_i, the sum decomposition) is tested against an explicit
        # decomposition in test_engine_per_example.py. Here: the engine in float64.
        from engm_fast.engine import attach, release

        engine = attach(m)
        losses = loss(m(xd), y)
        grads = engine.backward(losses, list(m.parameters()))
        release(m)
        norms = grads.sqnorms().sqrt()
        g = grads.weighted_grads(1.0 / (norms + EPS) / len(y))
        return -LR * torch.cat([g[p].flatten() for p in m.parameters()])
    params = list(m.parameters())
    G = torch.stack([torch.cat([g.flatten() for g in torch.autograd.grad(loss(m(xd[i:i + 1]), y[i:i + 1]).sum(),
                                                                         params)])
                     for i in range(len(y))])
    w = 1.0 / (G.norm(dim=1) + EPS) / len(y)
    return -LR * (w @ G)


@pytest.mark.parametrize("model_name", sorted(MODELS))
@pytest.mark.parametrize("method", [m for m in METHODS if m != "sgd"])
def test_method_update_matches_reference(method, model_name):
    _require(method)
    make_model, make_batch, refuses, fails = MODELS[model_name]
    torch.manual_seed(0)
    model = make_model()
    x, y = make_batch(torch.Generator().manual_seed(1))
    copy_ = copy.deepcopy(model)
    before = [p.detach().clone() for p in copy_.parameters()]
    if method in refuses:
        with pytest.raises(Unsupported):
            build(method, copy_, lr=LR, momentum=0.0).step(x, y)
        return
    if method in fails:  # a peer's own limitation: the table shows its error
        with pytest.raises(Exception):
            build(method, copy_, lr=LR, momentum=0.0).step(x, y)
        return
    runner = build(method, copy_, lr=LR, momentum=0.0)
    runner.step(x, y)
    got = torch.cat([(p.detach() - b).flatten() for p, b in zip(runner.params, before)]).double()
    want = _reference_update(model, x, y)
    # float32 methods against a float64 reference: relative error of the whole update vector.
    error = float((got - want).norm() / want.norm())
    if (method, model_name) in WRONG:
        assert error > 1e-2, f"{method} on {model_name} is now right ({error:.1e}): update WRONG and the README"
    else:
        assert error < 2e-5, f"{method} on {model_name}: relative error {error:.1e}"


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
