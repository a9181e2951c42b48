"""Adversarial-training losses returning per-example vectors ``[B]`` (so they plug into ``ENGM.backward``).

Three outer objectives, each as its authors' code computes it, written per example so that the
batch mean is the authors' scalar loss:

* PGD-AT (Madry et al. 2018): ``CE(f(x'), y)`` with ``x'`` from a PGD attack on the CE loss.
* TRADES (Zhang et al. 2019): ``CE(f(x), y) + beta * KL(softmax f(x) || softmax f(x'))`` with
  ``x'`` maximizing the KL term (the attack starts at ``x + 0.001 * N(0, 1)``, as in their code).
* MART (Wang et al. 2020): ``BCE(f(x'), y) + beta * KL(softmax f(x) || softmax f(x')) * (1 - p_y(x))``
  where ``BCE = CE(f(x'), y) - log(1.0001 - p_{y'}(x'))`` and ``y'`` is the most likely wrong
  class; ``x'`` from PGD on CE. The constants 1.0001, 1e-12 and 1.0000001 are theirs.

:func:`adversarial_losses` runs the attack (:func:`adversarial_examples`) and the loss
(:func:`outer_losses`) of one method for one mini-batch,
optionally with the temporal-ensembling term (:mod:`engm_fast.at.temporal_ensembling`) in both
the attack objective and the loss, exactly where the TE paper's code puts it.

Example::

    >>> import torch, torch.nn as nn
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
    >>> x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
    >>> out = adversarial_losses(model, x, y, method="trades", eps=0.1, alpha=0.025, steps=5)
    >>> out.losses.shape, bool((out.x_adv - x).abs().max() <= 0.1 + 1e-6)
    (torch.Size([8]), True)
"""
from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import engine_of
from .attacks import (
    PGD_NORMS,
    _clamp,
    _per_example_l2,
    _project,
    _view_per_example,
    pgd_attack,
)
from .temporal_ensembling import te_penalty

__all__ = [
    "AT_METHODS",
    "ATBatch",
    "adversarial_examples",
    "adversarial_losses",
    "cross_entropy_losses",
    "kl_per_example",
    "mart_losses",
    "outer_losses",
    "pgd_at_losses",
    "trades_attack",
    "trades_losses",
]

AT_METHODS = ("pgd", "trades", "mart")

# MART's numerical constants, from the authors' code.
_MART_EPS_LOG = 1e-12
_MART_ONE = 1.0001
_MART_TRUE = 1.0000001


def cross_entropy_losses(logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``CE(logits, y)`` per example, ``[B]``.

    Example::

        >>> cross_entropy_losses(torch.zeros(2, 4), torch.tensor([0, 3]))
        tensor([1.3863, 1.3863])
    """
    return F.cross_entropy(logits, y, reduction="none")


def kl_per_example(logits_p: torch.Tensor, logits_q: torch.Tensor) -> torch.Tensor:
    """``KL(softmax(logits_p) || softmax(logits_q)) = sum_c p_c (log p_c - log q_c)`` per example, ``[B]``.

    TRADES's ``nn.KLDivLoss(sum)(log_softmax(adv), softmax(clean))`` divided by B is the batch
    mean of ``kl_per_example(clean, adv)``. The target is given as log-probabilities
    (``log_target=True``): with ``softmax(clean)`` as the target, a class whose probability
    underflows to 0 (a logit gap above ~104 in float32) makes the gradient with respect to the
    clean logits NaN (``d/dp [p log p] = log 0 + 1`` times a zero Jacobian entry); ENGM's
    constant-length steps reach such gaps on MNIST (docs/experiments.md, E2). Same value.

    Example::

        >>> float(kl_per_example(torch.tensor([[0.0, 0.0]]), torch.tensor([[0.0, 0.0]])))
        0.0
    """
    if logits_p.shape != logits_q.shape or logits_p.dim() != 2:
        raise ValueError(f"kl_per_example: two [B, C] logits of the same shape expected, got "
                         f"{tuple(logits_p.shape)} and {tuple(logits_q.shape)}")
    return F.kl_div(F.log_softmax(logits_q, dim=1), F.log_softmax(logits_p, dim=1), reduction="none",
                    log_target=True).sum(dim=1)


def pgd_at_losses(logits_adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """PGD-AT's outer loss: ``CE(f(x'), y)`` per example.

    Example::

        >>> pgd_at_losses(torch.tensor([[2.0, 0.0]]), torch.tensor([0]))
        tensor([0.1269])
    """
    return cross_entropy_losses(logits_adv, y)


def trades_losses(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                  beta: float = 6.0) -> torch.Tensor:
    """TRADES's outer loss per example: ``CE(f(x), y) + beta * KL(p(x) || p(x'))``.

    Example::

        >>> trades_losses(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 0.0]]), torch.tensor([0]))
        tensor([0.3133])
    """
    _check_beta(beta)
    return cross_entropy_losses(logits_clean, y) + beta * kl_per_example(logits_clean, logits_adv)


def mart_losses(logits_clean: torch.Tensor, logits_adv: torch.Tensor, y: torch.Tensor,
                beta: float = 6.0) -> torch.Tensor:
    """MART's outer loss per example (Wang et al. 2020, the authors' ``mart_loss``).

    ``CE(f(x'), y) - log(1.0001 - p_{y'}(x') + 1e-12) + beta * KL(p(x) || p(x')) * (1.0000001 - p_y(x))``,
    ``y'`` the most probable class other than ``y`` under ``p(x')``.

    Example::

        >>> z = torch.tensor([[2.0, 0.0, -1.0]])
        >>> mart_losses(z, z, torch.tensor([0])).shape
        torch.Size([1])
    """
    _check_beta(beta)
    adv_probs = F.softmax(logits_adv, dim=1)
    top2 = torch.argsort(adv_probs, dim=1)[:, -2:]
    new_y = torch.where(top2[:, -1] == y, top2[:, -2], top2[:, -1])
    wrong = adv_probs.gather(1, new_y.unsqueeze(1)).squeeze(1)
    bce = cross_entropy_losses(logits_adv, y) - torch.log(_MART_ONE - wrong + _MART_EPS_LOG)
    nat_probs = F.softmax(logits_clean, dim=1)
    true_probs = nat_probs.gather(1, y.unsqueeze(1)).squeeze(1)
    # the target as log-probabilities: finite gradients where nat_probs underflows (see kl_per_example)
    kl = F.kl_div(torch.log(adv_probs + _MART_EPS_LOG), F.log_softmax(logits_clean, dim=1), reduction="none",
                  log_target=True).sum(dim=1)
    return bce + beta * kl * (_MART_TRUE - true_probs)


def _check_beta(beta: float) -> None:
    if not isinstance(beta, (int, float)) or not math.isfinite(beta) or beta < 0:
        raise ValueError(f"beta must be a finite number >= 0, got {beta!r}")


def trades_attack(model: nn.Module, x: torch.Tensor, eps: float, alpha: float, steps: int,
                  norm: str = "linf", clean_logits: torch.Tensor | None = None, beta: float | None = None,
                  extra=None, clamp: tuple[float, float] | None = (0.0, 1.0),
                  return_input_grad_norms: bool = False, generator: torch.Generator | None = None):
    """TRADES's inner maximization: ascend ``KL(p(x) || p(x'))`` from ``x' = x + 0.001 * N(0, 1)``.

    Follows the TRADES code: the clean prediction is fixed (computed once, no gradient); each
    step is ``x' += alpha * sign(grad)`` (``"linf"``) or ``alpha * grad/||grad||`` (``"l2"``),
    then projection onto the eps-ball around ``x`` and clamping. ``extra(logits_adv) -> [B]`` adds
    a term to the objective (the TE term); with it, the KL is scaled by ``beta`` (the TE code's
    TRADES objective ``beta * KL + w * TE``). Like :func:`~engm_fast.at.pgd_attack`, it only takes
    input gradients (no parameter ``.grad`` is touched) and pauses the model's engine.

    Returns ``x_adv`` or ``(x_adv, ||grad_x objective_i|| at the last step)``.

    Example::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(5, 4)
        >>> x_adv = trades_attack(model, x, eps=0.1, alpha=0.05, steps=3)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    if norm not in PGD_NORMS:
        raise ValueError(f"trades_attack: unknown norm {norm!r}; expected one of {PGD_NORMS}")
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"trades_attack: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"trades_attack: alpha must be a finite number >= 0, got {alpha!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"trades_attack: steps must be an integer >= 1, got {steps!r}")
    x = x.detach()
    engine = engine_of(model)
    paused = engine.paused() if engine is not None else contextlib.nullcontext()
    grad_norms = None
    with torch.enable_grad(), paused:
        if clean_logits is None:
            with torch.no_grad():
                clean_logits = model(x)
        clean_logits = clean_logits.detach()
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        # As in the TRADES code: the start is not clamped (every step's result is).
        x_adv = x + _project(0.001 * noise, eps, norm)
        for _ in range(steps):
            x_adv.requires_grad_(True)
            logits_adv = model(x_adv)
            objective = kl_per_example(clean_logits, logits_adv)
            if extra is not None:
                objective = (1.0 if beta is None else beta) * objective + extra(logits_adv)
            (grad,) = torch.autograd.grad(objective.sum(), x_adv)
            x_adv = x_adv.detach()
            gn = _per_example_l2(grad)
            if return_input_grad_norms:
                grad_norms = gn
            if norm == "linf":
                step = grad.sign()
            else:
                step = grad / _view_per_example(gn + 1e-10, grad)
            x_adv = _clamp(x + _project(x_adv + alpha * step - x, eps, norm), clamp)
    x_adv = x_adv.detach()
    return (x_adv, grad_norms) if return_input_grad_norms else x_adv


@dataclass
class ATBatch:
    """What :func:`adversarial_losses` returns for one mini-batch.

    Attributes:
        losses: ``[B]`` per-example training losses (with graph; pass to ``ENGM.backward`` or
            ``losses.mean().backward()``).
        x_adv: the adversarial inputs (detached).
        logits_adv: the training forward's logits on ``x_adv`` (with graph).
        input_grad_norms: ``[B]`` input-gradient norms of the attack objective at its last
            step (free; ENGM-proxy's input), or ``None`` when not asked for.
    """

    losses: torch.Tensor
    x_adv: torch.Tensor
    logits_adv: torch.Tensor
    input_grad_norms: torch.Tensor | None = None


def _te_term(te_target: torch.Tensor | None, te_weight: float):
    if te_target is None:
        return None
    if not math.isfinite(te_weight) or te_weight < 0:
        raise ValueError(f"adversarial_losses: te_weight must be a finite number >= 0, got {te_weight!r}")
    return lambda logits: te_weight * te_penalty(logits, te_target)


def adversarial_examples(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "pgd",
                         eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, norm: str = "linf",
                         beta: float = 6.0, te_target: torch.Tensor | None = None, te_weight: float = 0.0,
                         attack_eval_mode: bool = True, return_input_grad_norms: bool = False,
                         clamp: tuple[float, float] | None = (0.0, 1.0),
                         generator: torch.Generator | None = None):
    """The attack half of :func:`adversarial_losses`: ``x_adv`` (or ``(x_adv, input-gradient norms)``).

    Example::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
        >>> x_adv = adversarial_examples(model, x, y, "pgd", eps=0.1, alpha=0.03, steps=3)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
    """
    if method not in AT_METHODS:
        raise ValueError(f"adversarial_losses: unknown method {method!r}; expected one of {AT_METHODS}")
    _check_beta(beta)
    te_term = _te_term(te_target, te_weight)
    was_training = model.training
    if attack_eval_mode:
        model.eval()
    try:
        if method == "trades":
            with torch.no_grad():
                clean_for_attack = model(x)
            return trades_attack(model, x, eps, alpha, steps, norm, clean_logits=clean_for_attack, beta=beta,
                                 extra=te_term, clamp=clamp, return_input_grad_norms=return_input_grad_norms,
                                 generator=generator)
        loss_fn = None
        if te_term is not None:
            loss_fn = lambda out, target: cross_entropy_losses(out, target) + te_term(out)
        return pgd_attack(model, x, y, eps=eps, alpha=alpha, steps=steps, norm=norm, random_start=True,
                          loss_fn=loss_fn, clamp=clamp, return_input_grad_norms=return_input_grad_norms,
                          generator=generator)
    finally:
        model.train(was_training)


def outer_losses(model: nn.Module, x: torch.Tensor, x_adv: torch.Tensor, y: torch.Tensor, method: str = "pgd",
                 beta: float = 6.0, te_target: torch.Tensor | None = None,
                 te_weight: float = 0.0, loss_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss half of :func:`adversarial_losses`: ``(per-example losses [B], logits on x_adv)``,
    both with their graph (the training forward).

    ``loss_dtype`` (e.g. ``torch.float64``): the logits are cast to it before the losses, so the
    losses and their gradient with respect to the logits are computed in that precision (the
    backward casts the gradient back to the model's dtype). In float32 an example the model
    fits with loss below about 1e-7 has ``softmax - onehot`` dominated by rounding; in float64
    it is exact to the last float32 digit (docs/experiments.md, E6).

    Example::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x = torch.rand(2, 4)
        >>> losses, logits = outer_losses(model, x, x, torch.tensor([0, 2]), "trades")
        >>> losses.shape, logits.shape
        (torch.Size([2]), torch.Size([2, 3]))
    """
    if method not in AT_METHODS:
        raise ValueError(f"adversarial_losses: unknown method {method!r}; expected one of {AT_METHODS}")
    te_term = _te_term(te_target, te_weight)
    if loss_dtype is not None:
        inner = model
        model = lambda inputs: inner(inputs).to(loss_dtype)  # noqa: E731
    if method == "pgd":
        logits_adv = model(x_adv)
        losses = pgd_at_losses(logits_adv, y)
        if te_term is not None:
            losses = losses + te_term(logits_adv)
    elif method == "trades":
        logits_clean = model(x)
        logits_adv = model(x_adv)
        losses = trades_losses(logits_clean, logits_adv, y, beta)
        if te_term is not None:
            losses = losses + te_term(logits_clean)
    else:
        logits_clean = model(x)
        logits_adv = model(x_adv)
        losses = mart_losses(logits_clean, logits_adv, y, beta)
        if te_term is not None:
            losses = losses + te_term(logits_adv)
    return losses, logits_adv


def adversarial_losses(model: nn.Module, x: torch.Tensor, y: torch.Tensor, method: str = "pgd",
                       eps: float = 8 / 255, alpha: float = 2 / 255, steps: int = 10, norm: str = "linf",
                       beta: float = 6.0, te_target: torch.Tensor | None = None, te_weight: float = 0.0,
                       attack_eval_mode: bool = True, return_input_grad_norms: bool = False,
                       clamp: tuple[float, float] | None = (0.0, 1.0),
                       generator: torch.Generator | None = None) -> ATBatch:
    """Attack + per-example outer loss of one AT method (``"pgd"``, ``"trades"`` or ``"mart"``).

    * ``"pgd"``: PGD on CE (uniform random start), loss :func:`pgd_at_losses`.
    * ``"trades"``: :func:`trades_attack` on the KL, loss :func:`trades_losses`.
    * ``"mart"``: PGD on CE, loss :func:`mart_losses` (the MART code attacks CE).

    With ``te_target`` (from :meth:`TemporalEnsembling.update`), as in the TE paper's code:
    PGD-AT adds ``te_weight * te_penalty(f(x'), target)`` to the attack objective and the loss;
    TRADES adds it to the attack objective on ``f(x')`` (with the KL scaled by ``beta``) and to
    the loss on the *clean* output ``f(x)``. MART+TE (not in the paper) follows PGD-AT: the term
    on ``f(x')`` in both places.

    The attack runs in eval mode when ``attack_eval_mode`` (the TRADES/TE/MART code does; it
    matters for BatchNorm models), then the model's mode is restored for the training forward.

    Example::

        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10))
        >>> x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
        >>> out = adversarial_losses(model, x, y, "mart", eps=0.1, alpha=0.03, steps=3,
        ...                          return_input_grad_norms=True)
        >>> out.losses.shape, out.input_grad_norms.shape
        (torch.Size([4]), torch.Size([4]))
    """
    attack = adversarial_examples(model, x, y, method, eps, alpha, steps, norm, beta, te_target, te_weight,
                                  attack_eval_mode, return_input_grad_norms, clamp, generator)
    x_adv, grad_norms = attack if return_input_grad_norms else (attack, None)
    losses, logits_adv = outer_losses(model, x, x_adv, y, method, beta, te_target, te_weight)
    return ATBatch(losses=losses, x_adv=x_adv, logits_adv=logits_adv, input_grad_norms=grad_norms)
