"""delta-SAM: SAM whose ascent step uses a per-instance reweighted gradient.

Zhou et al., "Sharpness-Aware Minimization with Dynamic Reweighting" (Findings of EMNLP 2022,
arXiv 2112.08772) replace SAM's batch ascent gradient by ``g_w = sum_i p_i g_i`` with weights
that favour the instances whose loss is most sensitive to a weight perturbation, estimated
cheaply with a few forward passes at random Gaussian weight perturbations. The paper's exact
weight formula was not accessible to us: **what follows is our reconstruction**, with every
choice exposed.

Step at weights ``w`` on a batch with per-example losses ``L_i``:

1. scores ``s_i``:

   * ``weighting="perturbation"`` (reconstruction of the paper's estimate)::

         s_i = (1/K) sum_k [ L_i(w + delta_k) - L_i(w) ],   delta_k ~ N(0, noise_scale^2 I)

     with ``K = n_perturb`` forward passes without gradient (every parameter of the optimizer
     is perturbed elementwise, independently per pass);
   * ``weighting="grad_norm"`` (exact alternative from our engine): ``s_i = ||g_i||``, the
     per-example gradient norm over the optimizer's parameters, from the same single backward
     that also gives ``g_w`` (:mod:`engm_fast.engine`).

2. weights ``p = softmax(z / temperature)`` with ``z = (s - mean s) / (std s + 1e-12)`` when
   ``standardize=True`` (default: the temperature is then unit-free; a constant score gives
   uniform weights, i.e. plain SAM), else ``z = s``. ``temperature -> inf`` is SAM.
3. ascent ``e = rho * g_w / ||g_w||`` (ASAM scaling with ``adaptive=True``), descent gradient of
   the batch-mean loss at ``w + e``, base optimizer step from ``w`` (as :class:`SAM`).

Cost over SAM: ``n_perturb`` extra forward passes without gradient for ``"perturbation"``; the
per-example norm work of the engine for ``"grad_norm"``.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

from ..engine import attach
from .sam import SAM, frozen_bn_stats

__all__ = ["DeltaSAM", "instance_weights"]

_WEIGHTINGS = ("perturbation", "grad_norm")


def instance_weights(scores: torch.Tensor, temperature: float = 1.0, standardize: bool = True) -> torch.Tensor:
    """delta-SAM's instance weights ``softmax(z / temperature)`` from sensitivity scores ``[B]``.

    ``z`` is the standardized score ``(s - mean) / (std + 1e-12)`` (population std) when
    ``standardize``, else ``s``. The weights are positive and sum to 1.

    Example:
        >>> import torch
        >>> w = instance_weights(torch.tensor([0.0, 1.0]), temperature=1.0, standardize=False)
        >>> [round(float(v), 4) for v in w]
        [0.2689, 0.7311]
    """
    if not isinstance(scores, torch.Tensor) or scores.dim() != 1 or scores.numel() == 0:
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scores must be a non-empty 1-D tensor [B], got {shape}")
    if not (isinstance(temperature, (int, float)) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    s = scores.detach().double()
    if not bool(torch.isfinite(s).all()):
        raise FloatingPointError(f"{int((~torch.isfinite(s)).sum())} instance score(s) are not finite")
    if standardize:
        s = (s - s.mean()) / (s.std(unbiased=False) + 1e-12)
    return torch.softmax(s / temperature, dim=0).to(scores.dtype if scores.is_floating_point() else torch.float32)


class DeltaSAM(SAM):
    """SAM with a per-instance reweighted ascent gradient (delta-SAM; our reconstruction).

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as :class:`SAM`.
        model: the model (required for ``weighting="grad_norm"``, whose engine attaches here,
            before the forward; optional otherwise, used for :func:`frozen_bn_stats`).
        weighting: ``"perturbation"`` or ``"grad_norm"`` (see the module docstring).
        temperature: softmax temperature of the weights (> 0; large -> SAM).
        noise_scale: standard deviation of the Gaussian weight perturbation (``"perturbation"``).
        n_perturb: number of perturbed forward passes per step (``"perturbation"``).
        standardize: standardize scores before the softmax.
        generator: optional ``torch.Generator`` for the perturbations (reproducible draws).

    The closure of :meth:`step` returns the **per-example** losses ``[B]`` of the batch (no
    backward, no zero_grad: the optimizer does both). It is called ``n_perturb + 2`` times for
    ``"perturbation"`` (once at ``w``, ``n_perturb`` times without gradient at perturbed
    weights, once at ``w + e``) and twice for ``"grad_norm"``; it must evaluate the same batch
    each time. Stochastic layers (dropout) make the perturbation scores noisier: put such a
    model in a fixed-mask mode if that matters. Diagnostics of the last step:
    ``last_scores`` and ``last_weights``.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> opt = DeltaSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, weighting="grad_norm")
        >>> closure = lambda: torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        >>> loss = opt.step(closure)
        >>> opt.last_weights.shape, round(float(opt.last_weights.sum()), 6)
        (torch.Size([8]), 1.0)
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None, weighting: str = "perturbation", temperature: float = 1.0,
                 noise_scale: float = 0.01, n_perturb: int = 1, standardize: bool = True,
                 generator: torch.Generator | None = None, **kwargs):
        if weighting not in _WEIGHTINGS:
            raise ValueError(f"weighting must be one of {_WEIGHTINGS}, got {weighting!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (isinstance(noise_scale, (int, float)) and noise_scale > 0):
            raise ValueError(f"noise_scale must be a positive number, got {noise_scale!r}")
        if not (isinstance(n_perturb, int) and n_perturb >= 1):
            raise ValueError(f"n_perturb must be an int >= 1, got {n_perturb!r}")
        if weighting == "grad_norm" and model is None:
            raise ValueError("weighting='grad_norm' needs model=... (the per-example engine attaches to it)")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, model=model, **kwargs)
        self.weighting, self.temperature, self.noise_scale = weighting, temperature, noise_scale
        self.n_perturb, self.standardize, self.generator = n_perturb, standardize, generator
        self.engine = attach(model) if weighting == "grad_norm" else None
        self.last_scores: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    # -- scores --------------------------------------------------------------------------------
    @torch.no_grad()
    def perturbation_scores(self, losses: torch.Tensor, closure: Callable) -> torch.Tensor:
        """``s_i = mean_k [L_i(w + delta_k) - L_i(w)]`` from ``n_perturb`` perturbed forwards.

        ``closure()`` returns the ``[B]`` losses at the current weights. The original weights are
        copied back afterwards (not the noise subtracted, which could drift by rounding).

        Example:
            >>> import torch
            >>> model = torch.nn.Linear(2, 1, bias=False)
            >>> opt = DeltaSAM(model.parameters(), torch.optim.SGD, lr=0.1, noise_scale=0.1)
            >>> x = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
            >>> closure = lambda: model(x).squeeze(1) ** 2
            >>> s = opt.perturbation_scores(closure(), closure)
            >>> float(s[1])  # the second example sees no weight at all: insensitive
            0.0
        """
        params = self._params()
        saved = [p.detach().clone() for p in params]
        base = losses.detach()
        total = torch.zeros_like(base, dtype=torch.float64)
        bn = frozen_bn_stats(self.model) if self.model is not None else contextlib.nullcontext()
        try:
            with bn:
                for _ in range(self.n_perturb):
                    for p, p0 in zip(params, saved):
                        # drawn on the generator's device (a CPU generator with CUDA parameters works)
                        where = self.generator.device if self.generator is not None else p.device
                        noise = torch.randn(p.shape, generator=self.generator, dtype=p.dtype, device=where).to(p.device)
                        # through .data: the graph of `losses` saved these very tensors, and a
                        # tracked in-place write would invalidate it. Safe because the original
                        # values are copied back bit for bit before any backward runs.
                        p.data.copy_(p0 + self.noise_scale * noise)
                    out = closure()
                    if not isinstance(out, torch.Tensor) or out.shape != base.shape:
                        raise ValueError("the closure must return the per-example losses [B] of the same batch; got "
                                         f"{tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__}"
                                         f" after {tuple(base.shape)}")
                    total += out.detach().double() - base.double()
        finally:
            for p, p0 in zip(params, saved):
                p.data.copy_(p0)
        return (total / self.n_perturb).to(base.dtype)

    # -- the ascent half step ------------------------------------------------------------------
    def first_step(self, losses: torch.Tensor, closure: Callable | None = None, zero_grad: bool = False) -> torch.Tensor:
        """Computes the instance weights, writes ``g_w = sum_i p_i g_i`` into ``.grad`` (replacing
        what was there) and moves to ``w + e``. Returns the weights ``[B]``.

        Args:
            losses: ``[B]`` per-example losses at ``w`` with their graph (for ``"grad_norm"``,
                from a forward made after the engine attached, i.e. after building the optimizer).
            closure: returns the ``[B]`` losses of the same batch (needed by ``"perturbation"``).
            zero_grad: clear ``.grad`` after the ascent (before the backward at ``w + e``).
        """
        self._check_not_ascended()  # before anything is written
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses must be the 1-D per-example losses [B], got {shape}")
        params = self._params()
        if self.weighting == "grad_norm":
            grads = self.engine.backward(losses, params)
            scores = grads.sqnorms().sqrt()
            weights = instance_weights(scores, self.temperature, self.standardize)
            new = grads.weighted_grads(weights.to(scores.dtype))
            for p in params:
                g = new.get(p)
                p.grad = None if g is None else g
        else:
            if closure is None:
                raise ValueError("weighting='perturbation' needs the closure (per-example losses of the batch) "
                                 "to evaluate the losses at perturbed weights")
            scores = self.perturbation_scores(losses, closure)
            weights = instance_weights(scores, self.temperature, self.standardize)
            total = (losses * weights.to(losses.dtype)).sum()
            gs = torch.autograd.grad(total, params, allow_unused=True)
            for p, g in zip(params, gs):
                p.grad = g
        self.last_scores, self.last_weights = scores.detach(), weights.detach()
        super().first_step(zero_grad=zero_grad)
        return weights

    def step(self, closure: Callable | None = None):
        """One delta-SAM step; ``closure()`` returns the per-example losses ``[B]`` of the batch.

        Returns the mean loss at ``w`` (before the step), detached.
        """
        if closure is None:
            raise ValueError("DeltaSAM.step needs a closure returning the per-example losses [B]")
        self.zero_grad()
        with torch.enable_grad():
            losses = closure()
        self.first_step(losses, closure, zero_grad=True)
        paused = self.engine.paused() if self.engine is not None else contextlib.nullcontext()
        bn = frozen_bn_stats(self.model) if self.model is not None else contextlib.nullcontext()
        with paused, bn, torch.enable_grad():
            second = closure()
            if not isinstance(second, torch.Tensor) or second.shape != losses.shape:
                raise ValueError("the closure must return the per-example losses [B] of the same batch each call")
            second.mean().backward()
        self.second_step()
        return losses.detach().mean()
