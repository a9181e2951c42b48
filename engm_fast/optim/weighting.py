"""Per-example weights: the one vocabulary of the optimizers that reweight examples.

An optimizer of :mod:`engm_fast.optim` that reweights examples computes one statistic per
example and turns it into the example's weight. ``weighting=`` names that map (ENGM's
``"normalize"``, ``"clip"``, ``"power"``); where the statistic comes from is ``*_source=``
(ENGM's ``norm_source``, delta-SAM's ``score_source``).

:func:`example_weights` ``w_i = phi(||g_i||)``, the ENGM family (docs/design.md, "The methods"):

* ``"normalize"`` (default): ``w_i = 1 / (||g_i|| + eps)``: every example contributes a unit
  direction; an all-zero gradient gets the finite weight ``1/eps``.
* ``"clip"``: ``w_i = min(1, c / ||g_i||)`` (per-example clipping at ``clip_norm = c``).
* ``"power"``: ``w_i = (||g_i|| + eps)^(-p)``: ``p = 0`` is plain momentum SGD (MSGD),
  ``p = 1`` is ``"normalize"``.

``norm_floor=r`` (``"normalize"`` and ``"power"``) first raises every norm to at least ``r``
times the batch's mean norm (over its finite norms): ``||g_i|| <- max(||g_i||, r * mean_j ||g_j||)``. An example the
model already fits has a gradient norm many orders below the others, and in float32 that
gradient is mostly rounding noise (the true-class component of ``softmax - onehot`` is
``p_y - 1``, resolved to about 6e-8); without a floor ``"normalize"`` gives that noise a
full unit-norm share of the step. With the floor its share is ``||g_i|| / (r * mean)``;
examples above the floor keep exactly their ``1/(||g_i|| + eps)``.

:func:`softmax_example_weights` ``p = softmax(z / temperature)`` of standardized scores,
delta-SAM's weights (they sum to 1).
"""
from __future__ import annotations

import math

import torch

__all__ = ["WEIGHTINGS", "check_weighting", "example_weights", "softmax_example_weights"]

WEIGHTINGS = ("normalize", "clip", "power")


def check_weighting(weighting: str, eps: float, clip_norm: float | None, power: float | None,
                    norm_floor: float | None = None) -> None:
    """Validates a weighting configuration; raises ``ValueError`` naming the bad value."""
    if weighting not in WEIGHTINGS:
        raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")
    if not (eps > 0 and math.isfinite(eps)):
        raise ValueError(f"eps must be a positive finite number, got {eps!r}")
    if weighting == "clip":
        if clip_norm is None or not (clip_norm > 0 and math.isfinite(clip_norm)):
            raise ValueError(f"weighting='clip' needs clip_norm > 0, got {clip_norm!r}")
    elif clip_norm is not None:
        raise ValueError(f"clip_norm={clip_norm!r} is only used with weighting='clip' (got {weighting!r})")
    if weighting == "power":
        if power is None or not (power >= 0 and math.isfinite(power)):
            raise ValueError(f"weighting='power' needs power >= 0, got {power!r}")
    elif power is not None:
        raise ValueError(f"power={power!r} is only used with weighting='power' (got {weighting!r})")
    if norm_floor is not None:
        if weighting == "clip":
            raise ValueError("norm_floor is for weighting='normalize' or 'power' (clip already bounds every weight by 1)")
        if not (isinstance(norm_floor, (int, float)) and not isinstance(norm_floor, bool)
                and 0 < norm_floor < 1 and math.isfinite(norm_floor)):
            raise ValueError(f"norm_floor must be a number in (0, 1) (a fraction of the batch's mean norm), got "
                             f"{norm_floor!r}")


def example_weights(norms: torch.Tensor, weighting: str, eps: float = 1e-6,
                    clip_norm: float | None = None, power: float | None = None,
                    norm_floor: float | None = None) -> torch.Tensor:
    """``w_i = phi(norms_i)`` for non-negative ``norms`` (``[B]``), in the dtype of ``norms``.

    Example:
        >>> example_weights(torch.tensor([0.0, 2.0]), "clip", clip_norm=1.0)
        tensor([1.0000, 0.5000])
        >>> example_weights(torch.tensor([1e-7, 1.0, 3.0]), "normalize", eps=0.0, norm_floor=0.01)  # floor 0.01 * 4/3
        tensor([75.0000,  1.0000,  0.3333])
    """
    if norm_floor is not None and weighting != "clip":
        # The mean of the finite norms, without a host synchronization (no boolean indexing).
        finite = torch.isfinite(norms)
        mean = torch.where(finite, norms, 0).sum() / finite.sum().clamp_min(1)
        norms = torch.maximum(norms, norm_floor * mean)
    if weighting == "normalize":
        return 1.0 / (norms + eps)
    if weighting == "clip":
        # c / max(n, tiny): a zero norm gives min(1, huge) = 1, never inf * 0.
        return torch.clamp(clip_norm / norms.clamp_min(torch.finfo(norms.dtype).tiny), max=1.0)
    if weighting == "power":
        return (norms + eps).pow(-power)
    raise ValueError(f"weighting must be one of {WEIGHTINGS}, got {weighting!r}")


def softmax_example_weights(scores: torch.Tensor, temperature: float = 1.0, standardize: bool = True) -> torch.Tensor:
    """delta-SAM's example weights ``softmax(z / temperature)`` from per-example scores ``[B]``.

    ``z`` is the standardized score ``(s - mean) / (std + 1e-12)`` (population std) when
    ``standardize``, else ``s``. The weights are positive and sum to 1.

    Example:
        >>> w = softmax_example_weights(torch.tensor([0.0, 1.0]), temperature=1.0, standardize=False)
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
        raise FloatingPointError(f"{int((~torch.isfinite(s)).sum())} example score(s) are not finite")
    if standardize:
        s = (s - s.mean()) / (s.std(unbiased=False) + 1e-12)
    return torch.softmax(s / temperature, dim=0).to(scores.dtype if scores.is_floating_point() else torch.float32)
