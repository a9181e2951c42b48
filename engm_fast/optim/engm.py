"""ENGM: example-normalized gradient with momentum (Dabouei et al., ECCV 2022, arXiv 2209.01199).

Each example's gradient is reweighted by a function of its own norm before averaging, then an
ordinary SGD-momentum step is taken (docs/design.md, "The methods")::

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

import math
import warnings
from typing import Iterable

import torch
import torch.nn as nn

from .. import ops
from ..engine import attach
from ..engine.engine import _check_losses
from ..reference import accumulation_dtype
from ..engine.fsdp2 import is_sharded
from .distributed import StepSums, _reduce_step_sums, ddp_of
from .proxy import ProxyCalibration
from .weighting import check_weighting, example_weights

__all__ = ["ENGM"]

_NORM_SOURCES = ("exact", "input_proxy")
_NONFINITE = ("raise", "drop")


def _check_lr(lr) -> None:
    """A learning rate as torch.optim takes it: a number or a 1-element tensor, >= 0."""
    if isinstance(lr, torch.Tensor):
        if lr.numel() != 1:
            raise ValueError(f"Tensor lr must be 1-element, got shape {tuple(lr.shape)}")
        if not lr.is_floating_point():
            raise TypeError(f"Tensor lr must be floating point, got {lr.dtype}")
        value = float(lr)
    elif isinstance(lr, (int, float)) and not isinstance(lr, bool):
        value = float(lr)
    else:
        raise TypeError(f"lr must be a number or a 1-element tensor, got {type(lr).__name__}")
    if not (value >= 0 and math.isfinite(value)):
        raise ValueError(f"Invalid learning rate: {lr!r}")


class ENGM(torch.optim.Optimizer):
    """Example-normalized SGD with momentum; a drop-in for ``torch.optim.SGD``.

    Replace ``loss.mean().backward()`` by ``opt.backward(losses)`` with the per-example losses.

    How it differs from ``torch.optim.SGD``:

    * it takes the model, not its parameters, first (the per-example engine attaches to the
      model); ``params=`` chooses the parameters (default: every trainable one);
    * the gradient comes from :meth:`backward`: ``.grad`` holds ``(1/B) sum_i w_i g_i``, the
      reweighted mean of the per-example gradients, not ``(1/B) sum_i g_i``;
      ``weighting="power", power=0`` makes it SGD's gradient again (MSGD);
    * every option after ``lr`` is keyword-only (SGD's ``momentum``, ``dampening``,
      ``weight_decay`` and ``nesterov`` are positional there);
    * the step always runs the fused :func:`engm_fast.ops.sgd_momentum_update_` (the same
      arithmetic as SGD's): there are no ``foreach``, ``fused``, ``maximize``, ``differentiable``
      or ``capturable`` options, and a tensor ``lr`` is read as a number at every step (it may
      change between steps, as with SGD, but cannot be captured in a CUDA graph).

    Args:
        model: the model whose forward produces the losses (the engine attaches to it here, so
            build the optimizer before the forward). A ``DistributedDataParallel`` model makes
            every ``backward`` reduce over the ranks (see :meth:`backward`), and so does a model
            sharded with FSDP2's ``fully_shard`` (build the optimizer after ``fully_shard``;
            :mod:`engm_fast.optim.fsdp`); a torch.compile'd model works (not with ``fullgraph=True``).
        lr: learning rate, a number or a 1-element tensor (as ``torch.optim.SGD``).
        momentum, dampening, nesterov, weight_decay: as ``torch.optim.SGD``.
        weighting: the weight ``w_i = phi(||g_i||)`` of example ``i`` (:func:`example_weights`):
            ``"normalize"`` (``1/(||g_i||+eps)``), ``"clip"`` (``min(1, clip_norm/||g_i||)``)
            or ``"power"`` (``(||g_i||+eps)^-power``; 0 is MSGD, 1 is normalize).
        eps: added to norms by ``"normalize"`` and ``"power"`` (an all-zero gradient gets ``1/eps``).
        norm_floor: with ``"normalize"`` or ``"power"``, raise each norm to at least this fraction
            of the batch's mean norm first (this rank's batch under DDP): examples the model
            already fits, whose float32 gradients are mostly rounding noise, then get a share
            ``||g_i|| / (norm_floor * mean)`` of the step instead of a full unit share; the others
            keep exactly their weight (:mod:`engm_fast.optim.weighting`; docs/experiments.md E6
            measures it). Default ``None``: the paper's weights.
        clip_norm: the clipping threshold of ``"clip"``.
        power: the exponent of ``"power"``.
        norm_source: ``"exact"`` (engine) or ``"input_proxy"`` (input-gradient norms, calibrated).
        calibrate_every: with ``"input_proxy"``, take an exact step and refit every this many steps.
        params: parameters or param groups to optimize (default: all trainable parameters of
            ``model``); norms are taken over these parameters.
        nonfinite: ``"raise"`` (default) on non-finite losses or norms, naming how many and which;
            ``"drop"`` removes those examples from the step (``last_dropped`` lists them).
        track_variance: also compute the diagnostics ``grad_variance`` and ``grad_sqnorm``
            (``||(1/B) sum_i g_i||^2``): one more weighted reduction per layer, about one extra
            weight-gradient GEMM.

    With ``norm_source="input_proxy"`` the optimizer registers a forward pre-hook on the model
    (it keeps the input for the proxy); :func:`engm_fast.release` removes it with the engine.

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
        ['grad_sqnorm', 'grad_variance']
    """

    def __init__(self, model: nn.Module, lr: float | torch.Tensor, *, momentum: float = 0.0, dampening: float = 0.0,
                 nesterov: bool = False, weight_decay: float = 0.0, weighting: str = "normalize",
                 eps: float = 1e-6, clip_norm: float | None = None, power: float | None = None,
                 norm_floor: float | None = None, norm_source: str = "exact", calibrate_every: int = 50,
                 params: Iterable | None = None, nonfinite: str = "raise", track_variance: bool = False):
        if not isinstance(model, nn.Module):
            raise TypeError(f"ENGM needs the model (an nn.Module) first, got {type(model).__name__}; "
                            "pass parameters with params=...")
        _check_lr(lr)
        if momentum < 0:
            raise ValueError(f"Invalid momentum value: {momentum}")
        if weight_decay < 0:
            raise ValueError(f"Invalid weight_decay value: {weight_decay}")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        check_weighting(weighting, eps, clip_norm, power, norm_floor)
        if norm_source not in _NORM_SOURCES:
            raise ValueError(f"norm_source must be one of {_NORM_SOURCES}, got {norm_source!r}")
        if not (isinstance(calibrate_every, int) and calibrate_every >= 1):
            raise ValueError(f"calibrate_every must be an int >= 1, got {calibrate_every!r}")
        if nonfinite not in _NONFINITE:
            raise ValueError(f"nonfinite must be one of {_NONFINITE}, got {nonfinite!r}")
        ddp = ddp_of(model)
        if norm_floor is not None and (ddp is not None or is_sharded(model)):
            raise NotImplementedError("ENGM(norm_floor=...) under DistributedDataParallel or FSDP2 is not supported: the "
                                      "floor is a fraction of the batch's mean norm, and each rank sees only its own "
                                      "examples (the global mean would need one more all-reduce a step)")
        if ddp is not None and getattr(ddp, "static_graph", False):
            raise ValueError("ENGM does not support DistributedDataParallel(static_graph=True): DDP's delayed "
                             "all-reduce would run inside ENGM's backward; use static_graph=False (the default)")
        if params is None:
            params = [p for p in model.parameters() if p.requires_grad]
        defaults = dict(lr=lr, momentum=momentum, dampening=dampening, nesterov=nesterov, weight_decay=weight_decay)
        super().__init__(params, defaults)
        self.model = model
        self._check_one_device()
        self.engine = attach(model)
        self.weighting, self.eps, self.clip_norm, self.power = weighting, eps, clip_norm, power
        self.norm_floor = norm_floor
        self.norm_source, self.calibrate_every = norm_source, calibrate_every
        self.nonfinite, self.track_variance = nonfinite, track_variance
        self.proxy = ProxyCalibration()
        self.backward_steps = 0
        self.last_dropped: list[int] = []
        self._diagnostics: dict = {}
        self._lazy_diagnostics: tuple | None = None  # tensors of the last fast step, read on demand
        self._last_input: torch.Tensor | None = None
        self._ddp = ddp
        self._pending: StepSums | None = None  # this rank's sums accumulated under DDP's no_sync()
        # The input proxy's hook lives as long as the engine: release(model) removes both.
        self._input_hook = None
        if norm_source == "input_proxy":
            self._input_hook = model.register_forward_pre_hook(self._keep_input)
            self.engine.tie_hook(self._input_hook)
        self._fsdp = None  # ENGM on an FSDP2-sharded model: optim/fsdp.py
        if is_sharded(model):
            from .fsdp import ShardedENGM

            self._fsdp = ShardedENGM(self)

    # -- helpers ---------------------------------------------------------------------------
    def add_param_group(self, param_group: dict) -> None:
        """As ``torch.optim.Optimizer.add_param_group``; also starts recording modules added to
        the model since the optimizer was built (call it before the forward that uses them)."""
        super().add_param_group(param_group)
        engine = getattr(self, "engine", None)  # None while __init__ adds the first groups
        if engine is not None:
            try:
                self._check_one_device()
            except ValueError:
                self.param_groups.pop()  # leave the optimizer as it was
                raise
            engine.refresh()

    def _check_one_device(self) -> None:
        # Per-example norms add up over all parameters and the weights multiply every layer's
        # records: with layers on several devices (model parallelism) that would need
        # cross-device traffic the engine does not do. One device per process; DDP for more.
        names = {p: n for n, p in self.model.named_parameters()}
        devices: dict[torch.device, str] = {}
        for g in self.param_groups:
            for p in g["params"]:
                devices.setdefault(p.device, names.get(p, tuple(p.shape)))
        if len(devices) > 1:
            shown = ", ".join(f"{d} (e.g. {n!r})" for d, n in devices.items())
            raise ValueError(f"ENGM: parameters on several devices: {shown}; per-example weighting needs the "
                             "whole model on one device per process (use DistributedDataParallel for several GPUs)")

    def zero_grad(self, set_to_none: bool = True) -> None:
        """As ``torch.optim.Optimizer.zero_grad``; also drops sums accumulated under DDP's ``no_sync()``
        (FSDP2's ``set_requires_gradient_sync(False)``)."""
        if self._fsdp is not None and self._pending is not None:
            self._fsdp.discard_pending()
        self._pending = None
        super().zero_grad(set_to_none=set_to_none)

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
            raise ValueError("norm_source='input_proxy': the model has not been called on a floating-point input "
                             "tensor since the optimizer was built (losses from another model?); pass "
                             "input_grad_norms (e.g. from the attack) or feed the model its input as first argument")
        (gx,) = torch.autograd.grad(losses.sum(), x, retain_graph=True, allow_unused=True)
        if gx is None:
            raise ValueError("norm_source='input_proxy': the losses do not depend on the last input the model saw "
                             "(losses from another model, or from an earlier forward?); pass input_grad_norms "
                             "explicitly")
        if gx.shape[0] != losses.shape[0]:
            raise ValueError(f"losses has shape {tuple(losses.shape)} but the model's last input has a batch of "
                             f"{gx.shape[0]} (input shape {tuple(gx.shape)}): losses must hold one entry per example "
                             "(reduction='none', not averaged)")
        return gx.reshape(gx.shape[0], math.prod(gx.shape[1:])).float().norm(dim=1)  # 0 rows too (an FSDP rank)

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
    def backward(self, losses: torch.Tensor, input_grad_norms: torch.Tensor | None = None,
                 scaler: "torch.amp.GradScaler | None" = None) -> torch.Tensor:
        """Writes ``(1/B) sum_i w_i g_i`` into each parameter's ``.grad`` (accumulating, as
        ``loss.backward()`` does: call ``zero_grad()`` first) and returns the norms used.

        Nothing is written when it raises: every check and every gradient is computed first.

        Args:
            losses: ``[B]`` per-example losses (``reduction="none"``), not averaged.
            input_grad_norms: ``[B]`` norms of ``grad_x loss_i`` for ``norm_source="input_proxy"``
                (e.g. from the last PGD step); computed by one input backward when omitted.
            scaler: a ``torch.amp.GradScaler``: pass the UNSCALED losses; ENGM scales them
                (``scaler.scale``), takes the weights from the unscaled norms, and leaves the
                scaled gradient in ``.grad`` for ``scaler.step(opt)`` to unscale. A non-finite
                gradient norm then counts as an overflow of the scaled backward: ``.grad`` is
                set to NaN so that ``scaler.step`` skips the step and ``scaler.update()``
                lowers the scale, as with ``scaler.scale(loss).backward()``.

        Under DistributedDataParallel (the optimizer was built with the DDP model), the result
        is single-process ENGM on the concatenation of all ranks' batches: ``.grad`` gets
        ``(1/N) sum_i w_i g_i`` over the ``N`` examples of all ranks. A backward made inside
        ``model.no_sync()`` only accumulates this rank's sums (no communication, ``.grad``
        untouched); the next backward made outside ``no_sync`` reduces them together with its
        own batch, as ONE batch of all those examples (see the README, "Distributed training").
        On an FSDP2-sharded model the same holds for each rank's shard of ``.grad``, with
        ``model.set_requires_gradient_sync(False)`` in place of ``no_sync()``; every rank must
        call it (README, "Sharded training (FSDP2)").

        Returns:
            ``[B]`` per-example gradient norms the weights were computed from (exact, or the
            calibrated proxy estimate), float32 (float64 for a float64 model); this rank's
            examples under DDP.
        """
        if self._fsdp is not None:  # every check there: an error on one rank raises on all
            return self._fsdp.backward(losses, input_grad_norms, scaler)
        # The same checks and exception types as per_example_grad_norms; an empty batch is
        # allowed under DDP (a rank with no examples still takes part in the reduction).
        _check_losses(losses, allow_empty=self._ddp is not None)
        self._check_backward_args(input_grad_norms, scaler)
        exact = (self.norm_source == "exact" or not self.proxy.fitted
                 or self.backward_steps % self.calibrate_every == 0)
        ddp = self._ddp
        if ddp is None:
            precomputed = None
            if self.norm_source == "exact" and (scaler is None or not scaler.is_enabled()) and losses.shape[0]:
                norms, precomputed = self._fast_exact(losses)
                if norms is not None:
                    return norms
            part = self._local(losses, input_grad_norms, scaler, exact, normalize=True, precomputed=precomputed)
            self._apply(part)
            return part.local_norms
        try:
            part, error = self._local(losses, input_grad_norms, scaler, exact, normalize=False), None
        except Exception as exc:  # raised below on every rank, after the ranks agree there was one
            part, error = None, exc
        if not ddp.require_backward_grad_sync:  # inside model.no_sync(): accumulate locally
            if error is not None:
                raise error
            self._pending = part if self._pending is None else self._pending.merge(part)
            return part.local_norms
        if part is not None and self._pending is not None:
            try:
                part_all = self._pending.merge(part)
            except Exception as exc:
                part_all, error = None, exc
        else:
            part_all = part
        device = losses.device
        total = _reduce_step_sums(part_all, error, self._params(), ddp.process_group, device)
        self._pending = None
        self._apply(total)
        return part.local_norms

    def _check_backward_args(self, input_grad_norms, scaler) -> None:
        """The checks of :meth:`backward`'s optional arguments (every path makes them)."""
        if input_grad_norms is not None and not isinstance(input_grad_norms, torch.Tensor):
            raise TypeError(f"input_grad_norms must be a tensor [B], got {type(input_grad_norms).__name__}")
        if input_grad_norms is not None and self.norm_source != "input_proxy":
            raise ValueError("input_grad_norms is only used with norm_source='input_proxy'")
        if scaler is not None and not isinstance(scaler, torch.amp.GradScaler):
            raise TypeError(f"scaler must be a torch.amp.GradScaler, got {type(scaler).__name__}")

    def _fast_exact(self, losses: torch.Tensor):
        """One process, exact norms, no GradScaler: one engine backward and ONE host
        synchronization (are every loss and norm finite?); diagnostics are left as tensors and
        only read on demand. Returns ``(norms, None)`` after writing ``.grad``, or ``(None,
        (grads, norms))`` when something is not finite: the careful path (:meth:`_local`) then
        raises or drops as ``nonfinite`` says, from the same backward."""
        grads = self.engine.backward(losses, self._params())
        norms = grads.sqnorms().sqrt()
        if not bool(torch.isfinite(norms).all() & torch.isfinite(losses.detach()).all()):
            return None, (grads, norms)
        B = losses.shape[0]
        phi = example_weights(norms, self.weighting, self.eps, self.clip_norm, self.power, self.norm_floor)
        plain = grads.weighted_grads(torch.full_like(norms, 1.0 / B)) if self.track_variance else None
        # Every check is done: the weighted sums go straight into .grad (one native call for
        # the Linear-like and materialized layers, PerExampleGradients.add_weighted_).
        targets = {}
        for p in grads.contributions:
            if p.grad is None:
                p.grad = torch.zeros_like(p, memory_format=torch.contiguous_format)
            elif not p.grad.is_contiguous():
                p.grad = p.grad.contiguous()
            targets[p] = p.grad
        grads.add_weighted_(phi / B, targets)
        self.backward_steps += 1
        self.last_dropped = []
        self._lazy_diagnostics = (norms.detach(), phi.detach(), plain)
        self._diagnostics = {}
        return norms, None

    def _write_grads(self, sums: dict) -> None:
        for p, g in sums.items():
            if p.grad is None:
                p.grad = g.detach()
            else:
                p.grad.add_(g)

    @property
    def diagnostics(self) -> dict:
        """Statistics of the last :meth:`backward` (global under DDP): ``norm_mean``,
        ``norm_max``, ``norm_min`` (per-example gradient norms), ``weight_mean``, ``n_dropped``,
        ``overflow``, and with ``track_variance=True`` ``grad_variance`` and ``grad_sqnorm``
        (``||mean g||^2``). Computed when read: reading it costs a host synchronization, a step
        that does not read it has none beyond its finiteness check."""
        if self._lazy_diagnostics is not None:
            norms, phi, plain = self._lazy_diagnostics
            self._lazy_diagnostics = None
            n = norms.double()
            stats = torch.stack([n.mean(), n.max(), n.min(), phi.double().mean(), n.pow(2).mean()]).tolist()
            variance = mean_sq = None
            if plain is not None:
                mean_sq = sum(float(g.double().pow(2).sum()) for g in plain.values())
                variance = stats[4] - mean_sq
            self._diagnostics = {"norm_mean": stats[0], "norm_max": stats[1], "norm_min": stats[2],
                                 "weight_mean": stats[3], "grad_variance": variance, "grad_sqnorm": mean_sq,
                                 "n_dropped": 0, "overflow": False}
        return self._diagnostics

    @diagnostics.setter
    def diagnostics(self, value: dict) -> None:
        self._lazy_diagnostics = None
        self._diagnostics = value

    def _local(self, losses: torch.Tensor, input_grad_norms, scaler, exact: bool, normalize: bool,
               precomputed: tuple | None = None) -> StepSums:
        """This rank's sums for one batch; ``normalize`` divides them by the kept count (no DDP).
        ``precomputed``: the engine's gradients and norms from :meth:`_fast_exact`'s backward."""
        acc = accumulation_dtype(losses.dtype) if losses.is_floating_point() else torch.float32
        if losses.shape[0] == 0 and not normalize:
            # A DDP rank with no examples this step still takes part in the reduction.
            part = StepSums(exact)
            part.local_norms = torch.zeros(0, dtype=acc, device=losses.device)
            self.last_dropped = []
            return part
        if losses.shape[0] == 0:
            raise ValueError("losses is empty (batch of 0 examples): nothing to compute")
        keep = self._finite_mask(losses.detach(), "losses")
        scaling = scaler is not None and scaler.is_enabled()
        scale = 1.0
        if scaling:
            losses = scaler.scale(losses)
            scale = float(scaler.get_scale())
        part = StepSums(exact, scale, normalized=normalize)
        in_norms = None
        if self.norm_source == "input_proxy":
            computed = input_grad_norms is None
            in_norms = (self._input_grad_norms(losses) / scale) if computed else input_grad_norms.detach()
            if in_norms.shape != losses.shape:
                raise ValueError(f"input_grad_norms has shape {tuple(in_norms.shape)}, losses {tuple(losses.shape)}")
            in_norms = in_norms.to(losses.device)
            if scaling and computed and not bool(torch.isfinite(in_norms[keep]).all()):
                return self._overflow(part, losses, acc)
            keep = keep & self._finite_mask(in_norms, "input-gradient norms")
        params = self._params()
        dropping = not bool(keep.all())
        if exact:
            if precomputed is not None:
                grads, norms = precomputed
                if dropping:  # examples' contributions are separate rows: zeroing drops them exactly
                    grads = grads.zero_examples(~keep)
                    norms = grads.sqnorms().sqrt()
            else:
                grads = self.engine.backward(losses, params,
                                             loss_weights=keep.to(losses.dtype) if dropping else None)
                if dropping:
                    grads = grads.zero_examples(~keep)
                norms = grads.sqnorms().sqrt()
            if scale != 1.0:
                norms = norms / scale
            finite = torch.isfinite(torch.where(keep, norms, 0.0))
            if not bool(finite.all()):
                if scaling:
                    return self._overflow(part, losses, acc, norms)
                keep = keep & self._finite_mask(torch.where(keep, norms, 0.0), "per-example gradient norms")
                grads = grads.zero_examples(~keep)
        else:
            norms = self.proxy.predict(in_norms.to(acc))
        n = int(keep.sum())
        if normalize and n == 0:
            raise FloatingPointError("every example was dropped as non-finite: no step can be taken")
        zero = torch.zeros((), dtype=norms.dtype, device=norms.device)
        phi = torch.where(keep, example_weights(norms.clamp_min(0), self.weighting, self.eps, self.clip_norm,
                                                self.power, self.norm_floor), zero)
        w = phi / n if normalize and n else phi
        if exact:
            part.sums = grads.weighted_grads(w)  # every gradient computed before any .grad is written
            if self.track_variance:
                part.plain = grads.weighted_grads(keep.to(norms.dtype) / (n if normalize and n else 1))
            if in_norms is not None:
                part.pairs = [(in_norms[keep].detach(), norms[keep].detach())]
        elif not dropping:
            # Proxy step: one ordinary backward of sum_i w_i loss_i. autograd.grad, not
            # .backward(): it leaves .grad (and DDP's hooks on it) alone.
            total = (losses * w.to(losses.dtype)).sum()
            grads_list = torch.autograd.grad(total, params, allow_unused=True)
            part.sums = {p: g for p, g in zip(params, grads_list) if g is not None}
            if not part.sums:
                raise ValueError("losses have no graph to the optimizer's parameters (losses from another model?); "
                                 "nothing was written")
        else:
            # Dropped examples may carry NaN activations: 0 * NaN in the batch's weight-gradient
            # GEMM would poison every parameter, so go through the engine and zero them exactly.
            grads = self.engine.backward(losses, params, loss_weights=keep.to(losses.dtype)).zero_examples(~keep)
            part.sums = grads.weighted_grads(w)
        part.add_stats(norms, phi, keep)
        part.local_norms = norms
        self.last_dropped = (~keep).nonzero().flatten().tolist()
        return part

    def _overflow(self, part: StepSums, losses: torch.Tensor, acc, norms=None) -> StepSums:
        part.overflow = True
        part.local_norms = norms if norms is not None else torch.full(losses.shape, float("nan"), dtype=acc,
                                                                      device=losses.device)
        self.last_dropped = []
        return part

    def _apply(self, part: StepSums) -> None:
        """Writes a complete (normalized) StepSums into .grad, the proxy fit and the diagnostics."""
        self.backward_steps += 1
        if part.overflow:
            # GradScaler finds these in unscale_ and skips opt.step(); update() lowers the scale.
            for p in self._params():
                if p.grad is None:
                    p.grad = torch.full_like(p, float("nan"))
                else:
                    p.grad.fill_(float("nan"))
            self.diagnostics = {"norm_mean": float("nan"), "norm_max": float("nan"), "norm_min": float("nan"),
                                "weight_mean": float("nan"), "grad_variance": None, "grad_sqnorm": None,
                                "n_dropped": 0, "overflow": True}
            return
        self._write_grads(part.sums)
        if part.pairs:
            self.proxy.update(torch.cat([x.double().cpu() for x, _ in part.pairs]),
                              torch.cat([y.double().cpu() for _, y in part.pairs]))
        variance = mean_sq = None
        if part.plain is not None:
            mean_sq = sum(float((g.double() / part.scale).pow(2).sum()) for g in part.plain.values())
            variance = part.sum_sq / part.n - mean_sq
        self.diagnostics = {
            "norm_mean": part.sum_norm / part.n,
            "norm_max": part.max_norm,
            "norm_min": part.min_norm,
            "weight_mean": part.sum_phi / part.n,
            "grad_variance": variance,
            "grad_sqnorm": mean_sq,
            "n_dropped": part.n_dropped,
            "overflow": False,
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
        if self._pending is not None:
            raise RuntimeError("ENGM.step(): gradients accumulated under model.no_sync() have not been reduced "
                               "across ranks yet; make the last backward of the accumulation outside no_sync()")
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
        update = ops.sgd_momentum_update_ if self._fsdp is None else self._fsdp.sharded_update
        if hyper["momentum"] == 0:
            update(params, [p.grad for p in params], [], first_step=False, **hyper)
            return
        have, need = [], []
        for p in params:
            (have if self.state[p].get("momentum_buffer") is not None else need).append(p)
        if have:
            update(have, [p.grad for p in have], [self.state[p]["momentum_buffer"] for p in have],
                   first_step=False, **hyper)
        if need:
            bufs = []
            for p in need:
                # overwritten with the first d by the op (torch.optim.SGD clones d_p)
                buf = torch.zeros_like(p, memory_format=torch.preserve_format)
                self.state[p]["momentum_buffer"] = buf
                bufs.append(buf)
            update(need, [p.grad for p in need], bufs, first_step=True, **hyper)

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """``torch.optim.Optimizer.state_dict`` (momentum buffers, param groups) plus ``"engm"``:
        ``backward_steps`` and the input proxy's calibration (its fit and the pairs it is fit on).
        Save it after ``step()``: sums accumulated under DDP's ``no_sync()`` are not saved."""
        if self._pending is not None:
            warnings.warn("ENGM.state_dict(): gradients accumulated under model.no_sync() are not saved; "
                          "save after the reducing backward and step()", stacklevel=2)
        state = super().state_dict()
        state["engm"] = {"backward_steps": self.backward_steps, "proxy": self.proxy.state_dict()}
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        """Restores :meth:`state_dict`'s content (a state without ``"engm"`` keeps the current one)."""
        state_dict = dict(state_dict)
        extra = state_dict.pop("engm", None)
        super().load_state_dict(state_dict)
        if extra is not None:
            self.backward_steps = int(extra["backward_steps"])
            self.proxy.load_state_dict(extra["proxy"])
