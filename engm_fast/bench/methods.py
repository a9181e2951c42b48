"""The methods the benchmark compares, each taking the same per-example-normalized SGD step.

Every method computes ``ghat = (1/B) sum_i g_i / (||g_i|| + eps)`` (``g_i`` the gradient of
example ``i``'s loss, ``eps = 1e-6``; the loss is cross-entropy, or the model's own
``per_example_loss``, see :func:`engm_fast.bench.models.per_example_loss`) and takes an
SGD-momentum step with it, except the baseline, which is the plain ``torch.optim.SGD`` step on
the mean loss:

* ``sgd``: ``loss(model(x), y).mean().backward(); opt.step()``, the denominator of every ratio.
* ``engm``: :class:`engm_fast.ENGM`, exact norms from the one-backward engine.
* ``engm_proxy``: :class:`engm_fast.ENGM` with ``norm_source="input_proxy"``
  (``calibrate_every=50``, so one step in 50 is exact; the others use the proxy's weights, an
  approximation of the same update): in the step benchmark it pays one extra input backward for
  the input-gradient norms; in the adversarial-training iteration it gets them free from the
  attack's last step. A benchmark times far fewer than 50 steps, so the suite reports it
  amortized (:func:`engm_fast.bench.suite.amortize_proxy`).
* ``vmap``: ``torch.func.vmap(grad(...))`` per-example gradients, norms and a weighted sum.
* ``backpack``: BackPACK's ``BatchL2Grad`` per-example squared norms in a first backward, then a
  second backward of the reweighted loss (the graph is kept between the two).
* ``opacus``: Opacus ghost clipping (``GradSampleModuleFastGradientClipping``,
  ``use_ghost_clipping=True``, noise 0). Clipping at a threshold ``C`` far below every norm
  makes the clip factor ``C / (||g_i|| + 1e-6)``, ``C`` times the normalize weight, so the
  step runs with ``lr / C``: the same update.

A method that cannot run a model raises :class:`Unsupported` with the reason (BackPACK has no
LayerNorm, for instance); the benchmark shows the reason in the table rather than leaving the
method out. ``tests/test_bench_smoke.py`` checks that every method's update equals the float64
reference update on a tiny model, so the methods compared really compute the same thing.

Example::

    >>> import torch
    >>> from engm_fast.bench.methods import build
    >>> from engm_fast.bench.models import mlp
    >>> runner = build("engm", mlp(20, 16, 3), lr=0.1, momentum=0.9)
    >>> runner.step(torch.randn(8, 20), torch.randint(0, 3, (8,)))
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

import engm_fast

from .models import per_example_loss

__all__ = ["EPS", "KNOWN_WRONG", "METHODS", "PEERS", "Runner", "Unsupported", "build"]

EPS = 1e-6
METHODS = ("sgd", "engm", "engm_proxy", "vmap", "backpack", "opacus")
PROXY_CALIBRATE_EVERY = 50
PEERS = ("vmap", "backpack", "opacus")
# Opacus clip threshold: far below any per-example norm of a cross-entropy gradient of these
# models (they are >= 1e-2 at initialization), so clipping is normalization times C.
OPACUS_CLIP = 1e-4


# Peers that run a case without an error but compute another update than the reference
# (measured by tests/test_bench_smoke.py on a tiny copy, which fails if this changes):
# {(method, case): what is wrong}. The table and the JSON mark these rows.
KNOWN_WRONG = {
    ("opacus", "convnext"): "its update is about 10% off the float64 reference (Opacus 1.6 ghost clipping)",
}


class Unsupported(Exception):
    """A method cannot run a model; the message is the reason shown in the table."""


@dataclass
class Runner:
    """One method bound to its own copy of a model.

    Attributes:
        model: the module to run forward and to attack (the peer's wrapper, if it wraps).
        step: ``step(x, y, input_grad_norms=None)`` computes the method's gradient and updates
            the parameters; ``input_grad_norms`` is only used by ``engm_proxy``.
        attack_guard: context manager factory to wrap an attack on ``model`` in (peers that hook
            every forward are switched off there, as a user would do).
        params: the trained parameters, in ``model.parameters()`` order of the unwrapped model.
    """

    model: nn.Module
    step: Callable
    params: list
    attack_guard: Callable = field(default=contextlib.nullcontext)


def _has(model: nn.Module, types) -> list[str]:
    return sorted({type(m).__name__ for m in model.modules() if isinstance(m, types)})


def _batchnorm_in(model: nn.Module) -> list[str]:
    return _has(model, nn.modules.batchnorm._BatchNorm)


def _sgd(model, lr, momentum):
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    loss = per_example_loss(model)

    def step(x, y, input_grad_norms=None):
        opt.zero_grad(set_to_none=True)
        loss(model(x), y).mean().backward()
        opt.step()

    return Runner(model, step, list(model.parameters()))


def _engm(model, lr, momentum):
    opt = engm_fast.ENGM(model, lr=lr, momentum=momentum, eps=EPS)
    loss = per_example_loss(model)

    def step(x, y, input_grad_norms=None):
        opt.zero_grad(set_to_none=True)
        opt.backward(loss(model(x), y))
        opt.step()

    return Runner(model, step, list(model.parameters()))


def _engm_proxy(model, lr, momentum):
    opt = engm_fast.ENGM(model, lr=lr, momentum=momentum, eps=EPS, norm_source="input_proxy",
                         calibrate_every=PROXY_CALIBRATE_EVERY)
    loss = per_example_loss(model)

    def step(x, y, input_grad_norms=None):
        if input_grad_norms is None and not x.is_floating_point():
            raise Unsupported("the input proxy needs a floating-point input (these are token ids)")
        opt.zero_grad(set_to_none=True)
        opt.backward(loss(model(x), y), input_grad_norms=input_grad_norms)
        opt.step()

    return Runner(model, step, list(model.parameters()))


def _vmap(model, lr, momentum):
    bn = _batchnorm_in(model)
    if bn and model.training:
        raise Unsupported(f"{', '.join(bn)} in train mode couples the examples of a batch: torch.func per-example "
                          "gradients are undefined for it")
    from torch.func import functional_call, grad, vmap

    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum)
    names = [n for n, _ in model.named_parameters()]
    params = dict(model.named_parameters())
    buffers = dict(model.named_buffers())
    loss = per_example_loss(model)

    def loss_one(p, b, x, y):
        out = functional_call(model, (p, b), (x.unsqueeze(0),))
        return loss(out, y.unsqueeze(0)).sum()

    per_example = vmap(grad(loss_one), in_dims=(None, None, 0, 0))

    def step(x, y, input_grad_norms=None):
        detached = {n: p.detach() for n, p in params.items()}
        grads = per_example(detached, buffers, x, y)
        sq = sum(grads[n].flatten(1).pow(2).sum(1) for n in names)
        w = 1.0 / (sq.sqrt() + EPS) / x.shape[0]
        for n in names:
            params[n].grad = (w @ grads[n].flatten(1)).view_as(params[n])
        opt.step()

    return Runner(model, step, list(model.parameters()))


def _backpack(model, lr, momentum):
    try:
        from backpack import backpack, extend
        from backpack.extensions import BatchL2Grad
    except ImportError as exc:
        raise Unsupported(f"not installed ({exc.name}); pip install --no-deps backpack-for-pytorch einops unfoldNd")
    # BatchL2Grad (backpack-for-pytorch 1.7.1) has rules for Linear and Conv layers only. It
    # raises on BatchNorm in train mode, and skips the parameters of GroupNorm, LayerNorm and
    # Embedding with a warning, so its norms would silently leave them out: refused here.
    bn = _batchnorm_in(model)
    if bn and model.training:
        raise Unsupported(f"BatchL2Grad refuses {', '.join(bn)} in train mode (it mixes the examples)")
    skipped = _has(model, (nn.LayerNorm, nn.GroupNorm, nn.Embedding, nn.MultiheadAttention, nn.RNNBase))
    if skipped:
        raise Unsupported(f"BatchL2Grad has no rule for {', '.join(skipped)} (it would skip their parameters)")
    others = sorted({type(m).__name__ for m in model.modules() if any(True for _ in m.parameters(recurse=False))
                     and not isinstance(m, (nn.Linear, nn.Conv1d, nn.Conv2d, nn.Conv3d))})
    if others:
        raise Unsupported(f"BatchL2Grad has no rule for {', '.join(others)}")
    if getattr(model, "per_example_loss", None) is not None:
        raise Unsupported("BatchL2Grad's losses are torch.nn's; this model's sequence loss is not one")
    params = list(model.parameters())
    sequential = isinstance(model, nn.Sequential)
    ext_model = extend(model, use_converter=not sequential)
    lossfunc = extend(nn.CrossEntropyLoss())
    opt = torch.optim.SGD(ext_model.parameters(), lr=lr, momentum=momentum)
    ext_params = list(ext_model.parameters())

    def step(x, y, input_grad_norms=None):
        opt.zero_grad(set_to_none=True)
        out = ext_model(x)
        B = x.shape[0]
        with backpack(BatchL2Grad()):
            lossfunc(out, y).backward(retain_graph=True)
        # batch_l2 holds ||grad of loss_i / B||^2 per example (the loss is a mean).
        norms = torch.stack([p.batch_l2 for p in ext_params]).sum(0).sqrt() * B
        w = 1.0 / (norms + EPS)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(out, y, reduction="none") * w).mean().backward()  # classification only (checked above)
        opt.step()

    del params
    return Runner(ext_model, step, ext_params)


def _opacus(model, lr, momentum):
    try:
        from opacus.grad_sample import GradSampleModuleFastGradientClipping
        from opacus.optimizers import DPOptimizerFastGradientClipping
        from opacus.utils.fast_gradient_clipping_utils import DPLossFastGradientClipping
    except ImportError as exc:
        raise Unsupported(f"not installed ({exc.name}); pip install opacus")
    bn = _batchnorm_in(model)
    if bn:
        raise Unsupported(f"Opacus rejects {', '.join(bn)} (it mixes information across the batch)")
    gsm = GradSampleModuleFastGradientClipping(model, batch_first=True, loss_reduction="mean",
                                               max_grad_norm=OPACUS_CLIP, use_ghost_clipping=True)
    state = {}
    criterion = _Criterion(per_example_loss(model))

    def step(x, y, input_grad_norms=None):
        B = x.shape[0]
        if state.get("B") != B:  # Opacus divides by an expected batch size fixed at construction
            base = torch.optim.SGD(gsm.parameters(), lr=lr / OPACUS_CLIP, momentum=momentum)
            if "opt" in state:
                base.load_state_dict(state["opt"].original_optimizer.state_dict())
            state["opt"] = DPOptimizerFastGradientClipping(base, noise_multiplier=0.0, max_grad_norm=OPACUS_CLIP,
                                                           expected_batch_size=B, loss_reduction="mean")
            state["crit"] = DPLossFastGradientClipping(gsm, state["opt"], criterion, loss_reduction="mean")
            state["B"] = B
        opt = state["opt"]
        opt.zero_grad(set_to_none=True)
        state["crit"](gsm(x), y).backward()
        opt.step()

    @contextlib.contextmanager
    def hooks_off():
        gsm.disable_hooks()
        try:
            yield
        finally:
            gsm.enable_hooks()

    return Runner(gsm, step, list(model.parameters()), hooks_off)


class _Criterion(nn.Module):
    """A per-example loss as the criterion Opacus wants (it switches ``reduction``)."""

    def __init__(self, loss):
        super().__init__()
        self.loss, self.reduction = loss, "mean"

    def forward(self, out, y):
        per = self.loss(out, y)
        return per if self.reduction == "none" else (per.mean() if self.reduction == "mean" else per.sum())


_BUILDERS = {"sgd": _sgd, "engm": _engm, "engm_proxy": _engm_proxy, "vmap": _vmap, "backpack": _backpack,
             "opacus": _opacus}


def build(method: str, model: nn.Module, lr: float, momentum: float) -> Runner:
    """Binds ``method`` to ``model`` (modified in place by peers that wrap or extend it: pass a copy).

    Raises:
        ValueError: unknown method name.
        Unsupported: the method cannot run this model (the message says why).
    """
    if method not in _BUILDERS:
        raise ValueError(f"unknown method {method!r}; choose from {METHODS}")
    return _BUILDERS[method](model, lr, momentum)
