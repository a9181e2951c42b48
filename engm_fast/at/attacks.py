"""Adversarial attacks used by adversarial training (AT) and robust evaluation.

Only projected gradient descent (PGD, Madry et al. 2018) for now, in the L-infinity and L2
threat models. The attack takes input gradients with ``torch.autograd.grad(loss, x_adv)``
alone, so it never writes or reads any parameter's ``.grad`` and never calls ``.backward()``:
it can run between ``opt.zero_grad()`` and ``opt.backward(...)`` of an optimizer without
disturbing the gradient that optimizer is about to compute.
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import engine_of

__all__ = ["PGD_NORMS", "pgd_attack"]

PGD_NORMS = ("linf", "l2")

# Added to per-example L2 norms before dividing, so an all-zero gradient (a saturated softmax,
# a dead ReLU network) gives a zero step instead of NaN.
_TINY = 1e-12

LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def _per_example_l2(t: torch.Tensor) -> torch.Tensor:
    """L2 norm of every example (dim 0) over all its other dims, computed in float32."""
    return t.detach().flatten(1).float().norm(dim=1)


def _view_per_example(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Reshapes a ``[B]`` vector to ``[B, 1, ..., 1]`` so it broadcasts against ``like``."""
    return v.view(-1, *([1] * (like.dim() - 1))).to(like.dtype)


def _validate(
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
    clamp: tuple[float, float] | None,
) -> None:
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise ValueError(f"pgd_attack: x must be a floating-point tensor, got {getattr(x, 'dtype', type(x))}")
    if x.dim() < 1 or x.shape[0] == 0:
        raise ValueError(f"pgd_attack: x must have a non-empty batch dimension, got shape {tuple(x.shape)}")
    if not isinstance(y, torch.Tensor) or y.shape[0] != x.shape[0]:
        raise ValueError(
            f"pgd_attack: y must be a tensor with the batch size of x ({x.shape[0]}), "
            f"got {tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}"
        )
    if not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"pgd_attack: eps must be a finite number >= 0, got {eps!r}")
    if not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0:
        raise ValueError(f"pgd_attack: alpha (step size) must be a finite number >= 0, got {alpha!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"pgd_attack: steps must be an integer >= 1, got {steps!r}")
    if norm not in PGD_NORMS:
        raise ValueError(f"pgd_attack: unknown norm {norm!r}; expected one of {PGD_NORMS}")
    if clamp is not None and (len(clamp) != 2 or not float(clamp[0]) < float(clamp[1])):
        raise ValueError(f"pgd_attack: clamp must be None or (low, high) with low < high, got {clamp!r}")


def _random_start(
    x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None
) -> torch.Tensor:
    """A random perturbation inside the eps-ball (uniform in the ball for both norms)."""
    if norm == "linf":
        u = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (2.0 * u - 1.0) * eps
    # L2: a uniformly random direction times radius eps * U^(1/d), which is uniform in the ball.
    d = x[0].numel()
    direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
    direction = direction / _view_per_example(_per_example_l2(direction) + _TINY, x)
    u = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=torch.float32)
    radius = eps * u.pow(1.0 / d)
    return direction * _view_per_example(radius, x)


def _project(delta: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projects a perturbation onto the eps-ball of the threat model."""
    if norm == "linf":
        return delta.clamp(-eps, eps)
    n = _per_example_l2(delta)
    # Scale down only the examples outside the ball; examples inside keep their delta.
    factor = torch.clamp(eps / (n + _TINY), max=1.0)
    return delta * _view_per_example(factor, delta)


def _clamp(x: torch.Tensor, clamp: tuple[float, float] | None) -> torch.Tensor:
    return x if clamp is None else x.clamp(float(clamp[0]), float(clamp[1]))


def pgd_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    loss_fn: LossFn | None = None,
    clamp: tuple[float, float] | None = (0.0, 1.0),
    return_input_grad_norms: bool = False,
    generator: torch.Generator | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Projected gradient descent attack (Madry et al., 2018): maximizes the loss in an eps-ball.

    Each step ascends the summed per-example loss ``sum_i loss_fn(model(x_adv), y)[i]``:
    ``x_adv += alpha * sign(grad)`` for ``"linf"``, ``x_adv += alpha * grad / ||grad||_2``
    (per example) for ``"l2"``; then projects ``x_adv - x`` back onto the eps-ball and clamps
    ``x_adv`` into ``clamp``. Summing is what makes the input gradient of example ``i`` the
    gradient of its own loss, for models without cross-example coupling (BatchNorm in train
    mode couples examples; attack such models in eval mode if that matters to you).

    The attack only calls ``torch.autograd.grad(loss, x_adv)``: parameters' ``.grad`` are
    neither read nor written, no ``.backward()`` runs, and the model's train/eval mode is left
    as the caller set it (choose it before calling: train mode while training, eval mode for
    evaluation). It runs under ``torch.enable_grad()``, so it also works inside ``no_grad``.

    Args:
        model: maps ``x`` to logits (or whatever ``loss_fn`` takes).
        x: clean inputs ``[B, ...]``, floating point, expected inside ``clamp``.
        y: targets ``[B, ...]`` passed to ``loss_fn``.
        eps: radius of the threat model's ball (``>= 0``).
        alpha: step size (``>= 0``); a common choice is ``2.5 * eps / steps``.
        steps: number of gradient steps (``>= 1``).
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a uniformly random point of the eps-ball (Madry) instead of x.
        loss_fn: ``loss_fn(output, y) -> [B]`` per-example losses; default
            ``F.cross_entropy(output, y, reduction="none")``.
        clamp: ``(low, high)`` valid input range, or ``None`` for no clamping.
        return_input_grad_norms: also return the per-example L2 norms ``||grad_x loss_i||``
            of the gradient taken at the last step (at the iterate the last update starts
            from), as float32 ``[B]``. It is a free by-product of the attack and the input
            of ENGM's proxy variant (docs/design.md, "The methods").
        generator: optional ``torch.Generator`` for the random start, so a caller can make
            attacks reproducible independently of the global RNG stream.

    Returns:
        ``x_adv`` (detached, same shape and dtype as ``x``), or ``(x_adv, grad_norms)`` when
        ``return_input_grad_norms`` is true.

    Raises:
        ValueError: for ``eps < 0``, ``alpha < 0``, ``steps < 1``, an unknown ``norm``, a bad
            ``clamp``, non-floating ``x``, or ``y`` whose batch size differs from ``x``'s.

    Example::

        >>> import torch, torch.nn as nn
        >>> from engm_fast.at import pgd_attack
        >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
        >>> x, y = torch.rand(8, 1, 8, 8), torch.randint(0, 10, (8,))
        >>> x_adv = pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=10)
        >>> bool((x_adv - x).abs().max() <= 0.1 + 1e-6)
        True
        >>> x_adv, gnorm = pgd_attack(model, x, y, eps=1.0, alpha=0.25, steps=10, norm="l2",
        ...                           return_input_grad_norms=True)
        >>> gnorm.shape, gnorm.dtype
        (torch.Size([8]), torch.float32)
    """
    _validate(x, y, eps, alpha, steps, norm, clamp)
    if loss_fn is None:
        loss_fn = lambda out, target: F.cross_entropy(out, target, reduction="none")

    x = x.detach()
    if random_start and eps > 0:
        x_adv = _clamp(x + _random_start(x, eps, norm, generator), clamp)
    else:
        x_adv = x.clone()

    grad_norms = None
    # The attack's graphs are never the engine's: do not record them (saves the taps' cost).
    engine = engine_of(model)
    paused = engine.paused() if engine is not None else contextlib.nullcontext()
    with torch.enable_grad(), paused:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            losses = loss_fn(model(x_adv), y)
            if losses.dim() != 1 or losses.shape[0] != x.shape[0]:
                raise ValueError(
                    f"pgd_attack: loss_fn must return per-example losses of shape [{x.shape[0]}], "
                    f"got {tuple(losses.shape)}"
                )
            # Only the input gradient: autograd skips the weight-gradient work and leaves .grad alone.
            (grad,) = torch.autograd.grad(losses.sum(), x_adv)
            x_adv = x_adv.detach()
            if norm == "linf":
                step = grad.sign()
                if return_input_grad_norms:
                    grad_norms = _per_example_l2(grad)
            else:
                gn = _per_example_l2(grad)
                step = grad / _view_per_example(gn + _TINY, grad)
                if return_input_grad_norms:
                    grad_norms = gn
            x_adv = x_adv + alpha * step
            x_adv = _clamp(x + _project(x_adv - x, eps, norm), clamp)

    x_adv = x_adv.detach()
    if return_input_grad_norms:
        return x_adv, grad_norms
    return x_adv
