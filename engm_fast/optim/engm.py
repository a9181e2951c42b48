"""ENGM: example-normalized gradient with momentum (Dabouei et al., ECCV 2022, arXiv 2209.01199).

Each example's gradient is reweighted by a function of its own norm before averaging, then an
ordinary SGD-momentum step is taken (DESIGN.md section 2)::

    g_i  = grad_theta loss_i                       (per-example loss, not divided by B)
    w_i  = phi(||g_i||)                            (see engm_fast.optim.weighting)
    ghat = (1/B) sum_i w_i g_i
    then weight decay, momentum, dampening and nesterov exactly as torch.optim.SGD.

The norms and the weighted sum come from one backward through the engine
(:mod:`engm_fast.engine`). With ``norm_source="input_proxy"`` the weights come from the
per-example input-gradient norms through an affine fit to exact norms refreshed every
``calibrate_every`` steps; between calibrations the step is one ordinary backward of
``sum_i (w_i/B) loss_i``, which works for any architecture.
"""
from __future__ import annotations

from typing import Iterable

import torch
import torch.nn as nn

from .. import ops
from ..engine import attach
from ..reference import accumulation_dtype
from .proxy import ProxyCalibration
from .weighting import check_weighting, example_weights

__all__ = ["ENGM"]

_NORM_SOURCES = ("exact", "input_proxy")
_NONFINITE = ("raise", "drop")


class ENGM(torch.optim.Optimizer):
    """Example-normalized SGD with momentum; a drop-in for ``torch.optim.SGD``.

    Replace ``loss.mean().backward()`` by ``opt.backward(losses)`` with the per-example losses.

    Args:
        model: the model whose forward produces the losses (the engine attaches to it here, so
            build the optimizer before the forward).
        lr, momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD``.
        weighting: ``"normalize"`` (``1/(||g_i||+eps)``), ``"clip"`` (``min(1, clip_norm/||g_i||)``)
            or ``"power"`` (``(||g_i||+eps)^-power``; 0 is MSGD, 1 is normalize).
        eps: added to norms by ``"normalize"`` and ``"power"`` (an all-zero gradient gets ``1/eps``).
        clip_norm: the clipping threshold of ``"clip"``.
        power: the exponent of ``"power"``.
        norm_source: ``"exact"`` (engine) or ``"input_proxy"`` (input-gradient norms, calibrated).
        calibrate_every: with ``"input_proxy"``, take an exact step and refit every this many steps.
        params: parameters or param groups to optimize (default: all trainable parameters of
            ``model``); norms are taken over these parameters.
        nonfinite: ``"raise"`` (default) on non-finite losses or norms, naming how many and which;
            ``"drop"`` removes those examples from the step (``last_dropped`` lists them).
        track_variance: also compute the gradient variance diagnostic (one more weighted
            reduction per layer, about one extra weight-gradient GEMM).

    Example:
        >>> import torch, torch.nn.functional as F, engm_fast
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3))
        >>> opt = engm_fast.ENGM(model, lr=0.1, momentum=0.9)
        >>> x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
        >>> losses = F.cross_entropy(model(x), y, reduction="none")
        >>> opt.zero_grad()
        >>> norms = opt.backward(losses)      # instead of losses.mean().backward()
        >>> opt.step()
        >>> sorted(opt.diagnostics)[:2]
        ['grad_variance', 'n_dropped']
    """

    def __init__(self, model: nn.Module, lr: float, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, weighting: str = "normalize",
                 eps: float = 1e-6, clip_norm: float | None = None, power: float | None = None,
                 norm_source: str = "exact", calibrate_every: int = 50,
                 params: Iterable | None = None, nonfinite: str = "raise", track_variance: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ENGM needs the model (an nn.Module) first, got {type(model).__name__}; "
                            "pass parameters with params=...")
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr!r}")
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_weighting(weighting, eps, clip_norm, power)
        if norm_source not in _NORM_SOURCES:
            raise ValueError(f"norm_source must be one of {_NORM_SOURCES}, got {norm_source!r}")
        if not (isinstance(calibrate_every, int) and calibrate_every >= 1):
            raise ValueError(f"calibrate_every must be an int >= 1, got {calibrate_every!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.model = model
        self.engine = attach(model)
        self.weighting, self.eps, self.clip_norm, self.power = weighting, eps, clip_norm, power
        self.norm_source, self.calibrate_every = norm_source, calibrate_every
        self.nonfinite, self.track_variance = nonfinite, track_variance
        self.proxy = ProxyCalibration()
        self.backward_steps = 0
        self.last_dropped: list[int] = []
        self.diagnostics: dict = {}
        self._last_input: torch.Tensor | None = None
        if norm_source == "input_proxy":
            model.register_forward_pre_hook(self._keep_input)

    # -- helpers ---------------------------------------------------------------------------
    def _params(self) -> list[nn.Parameter]:
        return [p for g in self.param_groups for p in g["params"] if p.requires_grad]

    def _keep_input(self, module, args):
        """With the input proxy and no norms passed: make the input a leaf that requires grad."""
        if not args or not isinstance(args[0], torch.Tensor) or not args[0].is_floating_point():
            return None
        if not torch.is_grad_enabled():
            return None
        x = args[0]
        if not x.requires_grad:
            x = x.detach().requires_grad_(True)
        self._last_input = x
        return (x,) + tuple(args[1:])

    def _input_grad_norms(self, losses: torch.Tensor) -> torch.Tensor:
        x = self._last_input
        if x is None:
            raise ValueError("norm_source='input_proxy': pass input_grad_norms (e.g. from the attack), or feed "
                             "the model a floating-point input tensor as its first argument")
        (gx,) = torch.autograd.grad(losses.sum(), x, retain_graph=True, allow_unused=True)
        if gx is None:
            raise ValueError("norm_source='input_proxy': the losses do not depend on the last input the model "
                             "saw; pass input_grad_norms explicitly")
        return gx.reshape(gx.shape[0], -1).float().norm(dim=1)

    def _finite_mask(self, values: torch.Tensor, what: str) -> torch.Tensor:
        finite = torch.isfinite(values)
        if bool(finite.all()):
            return finite
        bad = (~finite).nonzero().flatten().tolist()
        if self.nonfinite == "raise":
            shown = bad[:20]
            raise FloatingPointError(
                f"{len(bad)} of {values.numel()} {what} are not finite (indices {shown}"
                f"{' ...' if len(bad) > 20 else ''}); no gradient was written. Use nonfinite='drop' to "
                "skip such examples"
            )
        return finite

    # -- the ENGM backward -------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, input_grad_norms: torch.Tensor | None = None) -> torch.Tensor:
        """Writes ``(1/B) sum_i w_i g_i`` into each parameter's ``.grad`` (accumulating, as
        ``loss.backward()`` does: call ``zero_grad()`` first) and returns the norms used.

        Args:
            losses: ``[B]`` per-example losses (``reduction="none"``), not averaged.
            input_grad_norms: ``[B]`` norms of ``grad_x loss_i`` for ``norm_source="input_proxy"``
                (e.g. from the last PGD step); computed by one input backward when omitted.

        Returns:
            ``[B]`` per-example gradient norms the weights were computed from (exact, or the
            calibrated proxy estimate), float32 (float64 for a float64 model).
        """
        if not isinstance(losses, torch.Tensor) or losses.dim() != 1:
            shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
            raise ValueError(f"losses must be a 1-D tensor of per-example losses [B], got {shape}")
        keep = self._finite_mask(losses.detach(), "losses")
        if self.norm_source == "input_proxy":
            return self._proxy_backward(losses, keep, input_grad_norms)
        if input_grad_norms is not None:
            raise ValueError("input_grad_norms is only used with norm_source='input_proxy'")
        return self._exact_backward(losses, keep)

    def _exact_backward(self, losses: torch.Tensor, keep: torch.Tensor,
                        input_norms: torch.Tensor | None = None) -> torch.Tensor:
        dropping = not bool(keep.all())
        loss_weights = keep.to(losses.dtype) if dropping else None
        grads = self.engine.backward(losses, self._params(), loss_weights=loss_weights)
        if dropping:
            grads = grads.zero_examples(~keep)
        norms = grads.sqnorms().sqrt()
        keep = keep & self._finite_mask(torch.where(keep, norms, 0.0), "per-example gradient norms")
        if not bool(keep.all()) and not dropping:
            grads = grads.zero_examples(~keep)
        if input_norms is not None:
            self.proxy.update(input_norms[keep], norms[keep])
        self._write(grads, norms, keep)
        return norms

    def _proxy_backward(self, losses, keep, input_grad_norms):
        if input_grad_norms is None:
            input_grad_norms = self._input_grad_norms(losses)
        input_grad_norms = input_grad_norms.detach()
        if input_grad_norms.shape != losses.shape:
            raise ValueError(f"input_grad_norms has shape {tuple(input_grad_norms.shape)}, losses {tuple(losses.shape)}")
        keep = keep & self._finite_mask(input_grad_norms, "input-gradient norms")
        calibrate = not self.proxy.fitted or self.backward_steps % self.calibrate_every == 0
        if calibrate:
            return self._exact_backward(losses, keep, input_norms=input_grad_norms.to(losses.device))
        norms = self.proxy.predict(input_grad_norms.to(losses.device, accumulation_dtype(losses.dtype)))
        n_kept = int(keep.sum())
        w = example_weights(norms, self.weighting, self.eps, self.clip_norm, self.power)
        w = torch.where(keep, w, 0.0) / n_kept
        total = (torch.where(keep, losses, 0.0) * w.to(losses.dtype)).sum()
        total.backward()
        self._record(norms, keep, w, None)
        return norms

    def _write(self, grads, norms: torch.Tensor, keep: torch.Tensor) -> None:
        n_kept = int(keep.sum())
        if n_kept == 0:
            raise FloatingPointError("every example was dropped as non-finite: no step can be taken")
        w = example_weights(norms.clamp_min(0), self.weighting, self.eps, self.clip_norm, self.power)
        w = torch.where(keep, w, torch.zeros((), dtype=w.dtype, device=w.device)) / n_kept
        new = grads.weighted_grads(w)  # everything computed before any .grad is written
        variance = None
        if self.track_variance:
            mean = grads.weighted_grads(keep.to(norms.dtype) / n_kept)
            mean_sq = sum(float(g.double().pow(2).sum()) for g in mean.values())
            variance = float(norms[keep].double().pow(2).mean()) - mean_sq
        for p, g in new.items():
            if p.grad is None:
                p.grad = g.detach()
            else:
                p.grad.add_(g)
        self._record(norms, keep, w, variance)

    def _record(self, norms, keep, w, variance) -> None:
        self.backward_steps += 1
        kept = norms[keep]
        self.last_dropped = (~keep).nonzero().flatten().tolist()
        self.diagnostics = {
            "norm_mean": float(kept.mean()),
            "norm_max": float(kept.max()),
            "norm_min": float(kept.min()),
            "weight_mean": float(w[keep].mean()) * int(keep.sum()),
            "grad_variance": variance,
            "n_dropped": len(self.last_dropped),
        }

    @property
    def proxy_stats(self) -> dict:
        """The proxy fit: ``alpha``, ``beta``, ``pearson_r``, ``n_pairs``, ``calibrations``."""
        return self.proxy.stats()

    # -- the SGD step ------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure=None):
        """SGD with momentum on the gradients in ``.grad`` (the same arithmetic as torch.optim.SGD).

        Per param group (and device): one fused :func:`engm_fast.ops.sgd_momentum_update_` call
        for the params that already have a momentum buffer, and one (``first_step=True``, fresh
        buffers) for those that get theirs now; params without ``.grad`` are skipped.
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            hyper = dict(lr=group["lr"], momentum=group["momentum"], dampening=group["dampening"],
                         weight_decay=group["weight_decay"], nesterov=group["nesterov"])
            by_device: dict[torch.device, list] = {}  # the op takes tensors of one device
            for p in group["params"]:
                if p.grad is not None:
                    by_device.setdefault(p.device, []).append(p)
            for with_grad in by_device.values():
                self._fused_step(with_grad, hyper)
        return loss

    def _fused_step(self, params: list, hyper: dict) -> None:
        if hyper["momentum"] == 0:
            ops.sgd_momentum_update_(params, [p.grad for p in params], [], first_step=False, **hyper)
            return
        have, need = [], []
        for p in params:
            (have if self.state[p].get("momentum_buffer") is not None else need).append(p)
        if have:
            ops.sgd_momentum_update_(have, [p.grad for p in have], [self.state[p]["momentum_buffer"] for p in have],
                                     first_step=False, **hyper)
        if need:
            bufs = []
            for p in need:
                # overwritten with the first d by the op (torch.optim.SGD clones d_p)
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["momentum_buffer"] = buf
                bufs.append(buf)
            ops.sgd_momentum_update_(need, [p.grad for p in need], bufs, first_step=True, **hyper)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        state = super().state_dict()
        state["engm"] = {"backward_steps": self.backward_steps, "proxy": self.proxy.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        extra = state_dict.pop("engm", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.backward_steps = int(extra["backward_steps"])
            self.proxy.load_state_dict(extra["proxy"])
