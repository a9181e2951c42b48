"""delta-SAM: SAM whose ascent step uses a per-example reweighted gradient.

Zhou et al., "Sharpness-Aware Minimization with Dynamic Reweighting" (Findings of EMNLP 2022,
arXiv 2112.08772) replace SAM's batch ascent gradient by ``g_w = sum_i p_i g_i`` with weights
that favour the examples (instances) whose loss is most sensitive to a weight perturbation, estimated
cheaply with a few forward passes at random Gaussian weight perturbations. The paper's exact
weight formula was not accessible to us: **what follows is our reconstruction**, with every
choice exposed.

Step at weights ``w`` on a batch with per-example losses ``L_i``:

1. scores ``s_i`` (``score_source=``):

   * ``"perturbation"`` (reconstruction of the paper's estimate)::

         s_i = (1/K) sum_k [ L_i(w + delta_k) - L_i(w) ],   delta_k ~ N(0, noise_scale^2 I)

     with ``K = n_perturb`` forward passes without gradient (every parameter of the optimizer
     is perturbed elementwise, independently per pass);
   * ``"grad_norm"`` (exact alternative from our engine): ``s_i = ||g_i||``, the
     per-example gradient norm over the optimizer's parameters, from the same single backward
     that also gives ``g_w`` (:mod:`engm_fast.engine`).

2. weights ``p = softmax(z / temperature)`` (:func:`~engm_fast.optim.softmax_example_weights`)
   with ``z = (s - mean s) / (std s + 1e-12)`` when
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
from .weighting import softmax_example_weights

__all__ = ["DeltaSAM"]

SCORE_SOURCES = ("perturbation", "grad_norm")


class DeltaSAM(SAM):
    """SAM with a per-example reweighted ascent gradient (delta-SAM; our reconstruction).

    Args:
        params, base_optimizer, rho, adaptive, **kwargs: as :class:`SAM`.
        model: the model (required for ``score_source="grad_norm"``, whose engine attaches here,
            before the forward; optional otherwise, used for :func:`frozen_bn_stats`).
        score_source: where the per-example scores come from, ``"perturbation"`` or
            ``"grad_norm"`` (see the module docstring; ENGM's ``norm_source`` is the same idea).
        temperature: softmax temperature of the weights (> 0; large -> SAM).
        noise_scale: standard deviation of the Gaussian weight perturbation (``"perturbation"``).
        n_perturb: number of perturbed forward passes per step (``"perturbation"``).
        standardize: standardize scores before the softmax.
        generator: optional ``torch.Generator`` for the perturbations (reproducible draws). Its
            state is part of :meth:`state_dict`, so a resumed run draws what the uninterrupted
            one would; without one the draws come from torch's global generator (save
            ``torch.get_rng_state()`` yourself then).

    The closure of :meth:`step` returns the **per-example** losses ``[B]`` of the batch (no
    backward, no zero_grad: the optimizer does both). It is called ``n_perturb + 2`` times for
    ``"perturbation"`` (once at ``w``, ``n_perturb`` times without gradient at perturbed
    weights, once at ``w + e``) and twice for ``"grad_norm"``; it must evaluate the same batch
    each time. Stochastic layers (dropout) make the perturbation scores noisier: put such a
    model in a fixed-mask mode if that matters. Diagnostics of the last step:
    ``last_scores`` and ``last_weights``.

    Explicit use, as with :class:`SAM`: ``opt.first_step(losses=losses, closure=closure)``
    (the losses at ``w``; no backward before it), the backward at ``w + e``, then
    ``opt.second_step()``.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Linear(3, 2)
        >>> x, y = torch.randn(8, 3), torch.randint(0, 2, (8,))
        >>> opt = DeltaSAM(model.parameters(), torch.optim.SGD, model=model, lr=0.1, score_source="grad_norm")
        >>> closure = lambda: torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        >>> loss = opt.step(closure)
        >>> opt.last_weights.shape, round(float(opt.last_weights.sum()), 6)
        (torch.Size([8]), 1.0)
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None, score_source: str = "perturbation", temperature: float = 1.0,
                 noise_scale: float = 0.01, n_perturb: int = 1, standardize: bool = True,
                 generator: torch.Generator | None = None, **kwargs):
        if score_source not in SCORE_SOURCES:
            raise ValueError(f"score_source must be one of {SCORE_SOURCES}, got {score_source!r}")
        if not (isinstance(temperature, (int, float)) and temperature > 0):
            raise ValueError(f"temperature must be a positive number, got {temperature!r}")
        if not (isinstance(noise_scale, (int, float)) and noise_scale > 0):
            raise ValueError(f"noise_scale must be a positive number, got {noise_scale!r}")
        if not (isinstance(n_perturb, int) and n_perturb >= 1):
            raise ValueError(f"n_perturb must be an int >= 1, got {n_perturb!r}")
        if generator is not None and not isinstance(generator, torch.Generator):
            raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
        if score_source == "grad_norm" and model is None:
            raise ValueError("score_source='grad_norm' needs model=... (the per-example engine attaches to it)")
        super().__init__(params, base_optimizer, rho=rho, adaptive=adaptive, model=model, **kwargs)
        self.score_source, self.temperature, self.noise_scale = score_source, temperature, noise_scale
        self.n_perturb, self.standardize, self.generator = n_perturb, standardize, generator
        self.engine = attach(model) if score_source == "grad_norm" else None
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
    def first_step(self, zero_grad: bool = False, *, losses: torch.Tensor | None = None,
                   closure: Callable | None = None) -> torch.Tensor:
        """Computes the example weights, writes ``g_w = sum_i p_i g_i`` into ``.grad`` (replacing
        what was there) and moves to ``w + e``. Returns the weights ``[B]``.

        Called as :meth:`SAM.first_step` (``zero_grad`` first), plus what the reweighting needs:

        Args:
            zero_grad: clear ``.grad`` after the ascent (before the backward at ``w + e``).
            losses: ``[B]`` per-example losses at ``w`` with their graph (for ``"grad_norm"``,
                from a forward made after the engine attached, i.e. after building the optimizer).
                Required: ``first_step()`` alone, after ``loss.backward()`` as with SAM, would
                have only the batch gradient, whose ascent is SAM's, not delta-SAM's.
            closure: returns the ``[B]`` losses of the same batch (needed by ``"perturbation"``).
        """
        self._check_not_ascended()  # before anything is written
        if not isinstance(zero_grad, bool):
            raise TypeError(f"zero_grad must be a bool, got {type(zero_grad).__name__} (pass the per-example losses "
                            "as first_step(losses=..., closure=...))")
        if losses is None:
            raise ValueError("DeltaSAM.first_step needs losses=... (the per-example losses [B] at w, with their "
                             "graph; and closure=... for score_source='perturbation'): the example weights come "
                             "from them. For SAM's ascent on the gradient in .grad, use SAM")
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses must be the 1-D per-example losses [B], got {shape}")
        params = self._params()
        if self.score_source == "grad_norm":
            grads = self.engine.backward(losses, params)
            scores = grads.sqnorms().sqrt()
            weights = softmax_example_weights(scores, self.temperature, self.standardize)
            new = grads.weighted_grads(weights.to(scores.dtype))
            for p in params:
                g = new.get(p)
                p.grad = None if g is None else g
        else:
            if closure is None:
                raise ValueError("score_source='perturbation' needs the closure (per-example losses of the batch) "
                                 "to evaluate the losses at perturbed weights")
            scores = self.perturbation_scores(losses, closure)
            weights = softmax_example_weights(scores, self.temperature, self.standardize)
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
        self.first_step(True, losses=losses, closure=closure)
        paused = self.engine.paused() if self.engine is not None else contextlib.nullcontext()
        bn = frozen_bn_stats(self.model) if self.model is not None else contextlib.nullcontext()
        with paused, bn, torch.enable_grad():
            second = closure()
            if not isinstance(second, torch.Tensor) or second.shape != losses.shape:
                raise ValueError("the closure must return the per-example losses [B] of the same batch each call")
            second.mean().backward()
        self.second_step()
        return losses.detach().mean()

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """The base optimizer's state plus ``"delta_sam"``: the perturbation generator's state
        (``None`` without a generator), so that a resumed run draws the same perturbations."""
        state = super().state_dict()
        state["delta_sam"] = {"generator": None if self.generator is None else self.generator.get_state()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict`'s content (a state without ``"delta_sam"``, e.g. a plain
        SAM one, keeps the current generator)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("delta_sam", None)
        saved = None if extra is None else extra["generator"]
        if saved is not None and self.generator is None:
            raise ValueError("DeltaSAM.load_state_dict: the state holds a perturbation generator but this optimizer "
                             "has none; build it with generator=torch.Generator() to resume the same draws")
        super().load_state_dict(state_dict)
        if saved is not None:
            self.generator.set_state(saved)
