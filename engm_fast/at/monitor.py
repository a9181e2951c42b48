"""Gradient statistics of training, per step and per epoch (the ENGM paper's exploratory study).

With ``g_i`` the gradient of example ``i``'s own loss and ``gbar = (1/B) sum_i g_i`` the
mini-batch gradient, each observed step records:

* ``grad_norm`` = ``||gbar||`` (the global norm of the mini-batch gradient; the memorization
  paper logs its square, ``grad_sqnorm``),
* ``norm_mean`` and ``norm_max`` of the per-example norms ``||g_i||``,
* ``variance`` = ``(1/B) sum_i ||g_i||^2 - ||gbar||^2`` (the trace of the per-example
  gradient covariance; docs/design.md, "The methods").

These are statistics of the *raw* per-example gradients whatever the optimizer does with them
(ENGM reweights them afterwards), so MSGD and ENGM runs are comparable. :meth:`end_epoch`
aggregates the steps of an epoch (means over steps, the max of ``norm_max``).

Three ways to feed it: :meth:`observe` (norms and ``||gbar||^2`` you computed),
:meth:`observe_grads` (an engine result; returns ``gbar`` so an MSGD loop can use it as its
gradient, one backward for both), :meth:`observe_engm` (an ``ENGM`` built with
``track_variance=True``, after ``opt.backward``; under DistributedDataParallel its statistics
are over all ranks' examples).

Example::

    >>> import torch
    >>> mon = GradientMonitor()
    >>> mon.observe(torch.tensor([3.0, 4.0]), mean_grad_sqnorm=1.0)
    >>> s = mon.end_epoch()
    >>> s["grad_norm"], s["norm_mean"], s["norm_max"], s["variance"]
    (1.0, 3.5, 4.0, 11.5)
"""
from __future__ import annotations

import math

import torch

__all__ = ["GradientMonitor"]

_KEYS = ("grad_norm", "grad_sqnorm", "norm_mean", "norm_max", "variance")


class GradientMonitor:
    """Collects per-step gradient statistics and aggregates them per epoch.

    Attributes:
        steps: the current epoch's per-step records (dicts with the keys of the module doc).
        history: one aggregated dict per finished epoch.

    Example::

        >>> import torch, torch.nn.functional as F, engm_fast
        >>> model = torch.nn.Linear(3, 2)
        >>> engine = engm_fast.attach(model)
        >>> losses = F.cross_entropy(model(torch.randn(4, 3)), torch.tensor([0, 1, 0, 1]), reduction="none")
        >>> mon = GradientMonitor()
        >>> gbar = mon.observe_grads(engine.backward(losses))
        >>> sorted(mon.steps[0])
        ['grad_norm', 'grad_sqnorm', 'norm_max', 'norm_mean', 'variance']
    """

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.history: list[dict] = []
        self.skipped = 0

    def observe(self, norms: torch.Tensor, mean_grad_sqnorm: float) -> None:
        """Records one step from the per-example norms ``||g_i||`` and ``||gbar||^2``."""
        if not isinstance(norms, torch.Tensor) or norms.dim() != 1 or norms.numel() == 0:
            raise ValueError(f"GradientMonitor.observe: norms must be a non-empty [B] tensor, got "
                             f"{tuple(norms.shape) if isinstance(norms, torch.Tensor) else type(norms).__name__}")
        n = norms.detach().double()
        self._record(mean_grad_sqnorm, float(n.mean()), float(n.max()), float(n.pow(2).mean()))

    def _record(self, mean_grad_sqnorm: float, norm_mean: float, norm_max: float, mean_sqnorm: float) -> None:
        """One step from ``||gbar||^2`` and the mean, max and mean square of the ``||g_i||``."""
        mean_grad_sqnorm = float(mean_grad_sqnorm)
        if not math.isfinite(mean_grad_sqnorm) or mean_grad_sqnorm < -1e-6 * (1.0 + mean_sqnorm):
            raise ValueError(f"GradientMonitor.observe: mean_grad_sqnorm must be finite and >= 0, got {mean_grad_sqnorm!r}")
        mean_grad_sqnorm = max(mean_grad_sqnorm, 0.0)  # rounding of a difference may dip below 0
        self.steps.append({
            "grad_norm": math.sqrt(mean_grad_sqnorm),
            "grad_sqnorm": mean_grad_sqnorm,
            "norm_mean": norm_mean,
            "norm_max": norm_max,
            "variance": mean_sqnorm - mean_grad_sqnorm,
        })

    def observe_grads(self, grads) -> dict:
        """Records a step from an engine result (:class:`~engm_fast.engine.PerExampleGradients`).

        Returns ``{parameter: gbar}``, the plain mean gradient ``(1/B) sum_i g_i`` (what
        ``losses.mean().backward()`` would write into ``.grad``).
        """
        B = grads.batch_size
        norms = grads.sqnorms().clamp_min(0).sqrt()
        w = torch.full((B,), 1.0 / B, dtype=norms.dtype, device=norms.device)
        mean = grads.weighted_grads(w)
        sq = sum(float(g.double().pow(2).sum()) for g in mean.values())
        self.observe(norms, sq)
        return mean

    def observe_engm(self, opt) -> bool:
        """Records the step of an ENGM optimizer (``track_variance=True``) after ``opt.backward``.

        Every statistic comes from the optimizer's diagnostics, over the examples its step used
        (dropped ones excluded): under DistributedDataParallel those are all ranks' examples,
        so every rank records the same, global, statistics (as a single process would on the
        concatenated batch). Returns ``False`` (and counts the step in ``skipped``) when the
        step had no exact statistics: an input-proxy step between calibrations.
        """
        d = opt.diagnostics
        if d.get("grad_variance") is None:
            if not getattr(opt, "track_variance", False):
                raise ValueError("GradientMonitor.observe_engm: build ENGM with track_variance=True")
            self.skipped += 1
            return False
        # ENGM's variance is mean(n^2) - ||gbar||^2 over the kept examples.
        self._record(d["grad_sqnorm"], d["norm_mean"], d["norm_max"], d["grad_variance"] + d["grad_sqnorm"])
        return True

    def end_epoch(self) -> dict:
        """Aggregates and clears the epoch's steps: means over steps, ``norm_max`` as a max, ``grad_norm_std``."""
        if not self.steps:
            out = {k: None for k in _KEYS}
            out.update(grad_norm_std=None, n_steps=0, n_skipped=self.skipped)
        else:
            col = {k: torch.tensor([s[k] for s in self.steps], dtype=torch.float64) for k in _KEYS}
            out = {k: float(v.mean()) for k, v in col.items()}
            out["norm_max"] = float(col["norm_max"].max())
            out["grad_norm_std"] = float(col["grad_norm"].std(unbiased=False))
            out["n_steps"] = len(self.steps)
            out["n_skipped"] = self.skipped
        self.history.append(out)
        self.steps, self.skipped = [], 0
        return out
