"""ENGM and per-example gradient norms on a model sharded with FSDP2 (``fully_shard``).

The semantics are those of ENGM under DistributedDataParallel (:mod:`.distributed`): each rank
passes its own examples' losses; every rank's ``.grad`` (its shard, a DTensor) gets the global
ENGM gradient ``(1/N) sum_i w_i g_i`` over all ranks' examples, ``N`` the global kept count;
ranks may hold different numbers of examples (none included); an error on one rank raises on
every rank with nothing written; the input proxy's calibration pairs are gathered from all
ranks; backwards made under ``set_requires_gradient_sync(False)`` only accumulate, and the next
backward with synchronization reduces everything once.

**Memory.** Per-example norms come from the records the engine keeps of this rank's layer calls
(``(a, b)``: local to the rank's batch, full-size, no communication). Gradients meet the
sharding unit by unit (:func:`engm_fast.engine.fsdp2.units`): the unit's full-size
``sum_i w_i g_i`` over this rank's examples, one reduce-scatter (a sum over the ranks) into this
rank's shard, a division by ``N``, added to ``.grad``; then the next unit. At most one unit's
full-size gradient exists at a time, as in FSDP's own backward, and nothing is
``B x #params``. Under ``set_requires_gradient_sync(False)`` the full-size local sums are kept
until the reducing backward, as FSDP keeps its unsharded gradients.

**Collectives.** FSDP runs collectives inside every backward (the all-gathers of resharded
parameters), so a rank that stops before its backward leaves the others waiting there. The
ranks therefore agree (one small ``all_gather`` of an error flag) after every local check and
before each backward pass they run, and exchange the step's statistics (with an error flag
again) before any gradient is written. An error inside a record of the engine's pass is kept
until the pass is over (the pass runs to its end, its collectives with it). A failure inside
autograd's own backward, not one of engm_fast's checks, cannot be coordinated: as with plain
FSDP, the other ranks then wait until the process group's timeout.

**The input proxy.** Its weights are known before the backward, so FSDP's own backward does the
reduction: one backward of ``sum_i w_i loss_i`` into the optimizer's parameters, with FSDP's
reduction set to sum over the ranks and divide by ``N``
(:func:`~engm_fast.engine.fsdp2.reduction_divided_by`). When a rank drops examples
(``nonfinite="drop"``), every rank takes the engine's route for that micro-batch (the ranks'
FSDP reductions must match).

**No double reduction.** FSDP reduce-scatters what autograd accumulated into the unsharded
parameters' ``.grad``. The engine's pass asks autograd for the gradient of its anchor alone,
so nothing accumulates there and FSDP's post-backward finds nothing to reduce.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

from .. import ops
from ..engine.engine import PerExampleGradients, _check_losses
from ..engine.fsdp2 import (ShardedParameter, discard_unreduced, gradient_sync, gradients_kept, reduction_divided_by,
                            reset_iteration, units)
from ..reference import accumulation_dtype
from .distributed import StepSums, _exchange_statistics, _gather_status
from .weighting import example_weights

__all__ = ["ShardedENGM", "sharded_per_example_grad_norms", "local_shards"]


class _Layout:
    """The sharded model as one backward sees it: its units, the optimizer's parameters among
    them, and the engine told that each unit's unsharded parameters stand for the sharded ones
    (:meth:`~engm_fast.PerExampleEngine.alias_parameters`: contributions then come keyed by the
    parameters the optimizer holds, whichever object a module held when its record completed).
    Rebuilt at every backward: FSDP creates the unsharded parameters at a unit's first
    all-gather, and ``load_state_dict(assign=True)`` replaces the sharded ones."""

    def __init__(self, model: nn.Module, engine, params: list[nn.Parameter]):
        self.units = units(model)
        by_sharded = {sp.sharded: sp for u in self.units for sp in u.params}
        self.params = params  # the optimizer's trainable parameters: the same list on every rank
        self.sharded = {p: by_sharded[p] for p in params if p in by_sharded}
        self.replicated = [p for p in params if p not in by_sharded]  # ignored_params, outside every unit
        if any(engine.parameter_name(p) is None for p in self.sharded):
            engine.refresh()  # attached before fully_shard: name the sharded parameters
        engine.alias_parameters({sp.unsharded: sp.sharded for u in self.units for sp in u.params
                                 if sp.unsharded is not None})
        mesh = next((sp.sharded.device_mesh for u in self.units for sp in u.params), None)
        self.group = mesh.get_group() if mesh is not None else dist.group.WORLD


def _device(group) -> torch.device:
    """Where the statistics rows live: the CPU for gloo, the current accelerator for NCCL."""
    if dist.get_backend(group) == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _Agreement:
    """The ranks' agreement before a pass that runs collectives: every rank calls
    :meth:`__call__` once, with its local error or None; if any rank failed, every rank raises
    (after FSDP's per-iteration state is reset, so the next forward starts clean)."""

    def __init__(self, model: nn.Module, group):
        self.model, self.group = model, group
        self.done = self.failed = False  # called; raised (some rank had an error)
        # One row size for every agreement (an error flag and two values): a rank that fails
        # early meets the others' next agreement, whichever it is.
        self.row = torch.zeros(3, dtype=torch.float64, device=_device(group))

    def __call__(self, error: BaseException | None = None, flags: tuple = ()) -> torch.Tensor:
        self.done = True
        for i, f in enumerate(flags):
            self.row[1 + i] = float(f)
        try:
            return _gather_status(self.row, error, self.group)
        except BaseException:
            self.failed = True
            reset_iteration(self.model)
            raise


def _engine_pass(engine, layout: _Layout, losses: torch.Tensor, agreement: _Agreement,
                 loss_weights: torch.Tensor | None = None, retain_graph: bool = False) -> tuple:
    """The engine's backward on this rank's examples, after the ranks agreed to run it:
    ``(grads, error)``. ``grads`` is None for an empty batch (it runs the same pass unrecorded)
    and when ``error``, an error raised after the pass, is set: the caller exchanges it. An
    error before the pass is agreed on: raised on every rank."""
    if losses.shape[0] == 0:
        agreement(None)
        engine.backward_unrecorded(losses, retain_graph=retain_graph)
        return None, None
    try:
        grads = engine.backward(losses, layout.params, retain_graph=retain_graph, loss_weights=loss_weights,
                                before_pass=agreement)
        return grads, None
    except Exception as exc:
        if agreement.failed:  # the ranks agreed not to run the pass: raised on every rank
            raise
        if not agreement.done:
            agreement(exc)  # raises on every rank
        return None, exc


def sharded_per_example_grad_norms(model: nn.Module, engine, losses: torch.Tensor,
                                   retain_graph: bool = False) -> torch.Tensor:
    """:func:`engm_fast.per_example_grad_norms` on an FSDP2-sharded model: this rank's examples'
    norms over all trainable parameters (the full-size parameters, whatever their sharding),
    from this rank's records alone. Every rank must call it (its backward runs FSDP's
    collectives); a rank may pass an empty ``[0]`` batch; an error on one rank raises on all.
    """
    group = _Layout(model, engine, []).group
    agreement = _Agreement(model, group)
    try:
        _check_losses(losses, allow_empty=True)
        layout = _Layout(model, engine, _trainable_parameters(model))
    except Exception as exc:
        agreement(exc)
        raise
    grads, error = _engine_pass(engine, layout, losses, agreement, retain_graph=retain_graph)
    norms = None
    if error is None:
        try:
            acc = accumulation_dtype(losses.dtype)
            norms = torch.zeros(0, dtype=acc, device=losses.device) if grads is None else grads.sqnorms().sqrt()
        except Exception as exc:
            error = exc
    _Agreement(model, group)(error)  # an error after the pass is raised on every rank too
    return norms


def _trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The model's trainable parameters as the optimizer would hold them: sharded ones for the
    units (``model.parameters()`` yields a unit's unsharded ones while they are registered, e.g.
    the root's after its forward), the others as they are."""
    sharded = [sp.sharded for u in units(model) for sp in u.params]
    stand_ins = {id(sp.unsharded) for u in units(model) for sp in u.params if sp.unsharded is not None}
    known = {id(p) for p in sharded} | stand_ins
    rest = [p for p in model.parameters() if id(p) not in known]
    return [p for p in sharded + rest if p.requires_grad]


class ShardedENGM:
    """ENGM's backward on an FSDP2-sharded model; :class:`~engm_fast.ENGM` dispatches to it.

    Args:
        opt: the ENGM optimizer (built after ``fully_shard``, with the sharded model).
    """

    def __init__(self, opt):
        self.opt = opt
        opt.engine.refresh()  # an engine attached before fully_shard: hook the units' inputs too
        layout = _Layout(opt.model, opt.engine, opt._params())  # raises for what is not supported
        model_params = {id(p) for p in opt.model.parameters()}
        self._replicated: dict = {}  # gradients of parameters outside every unit from a proxy backward
        stand_ins = {id(sp.unsharded) for u in layout.units for sp in u.params if sp.unsharded is not None}
        held = [tuple(p.shape) for p in layout.replicated if id(p) in stand_ins]
        if held:
            raise ValueError(f"ENGM under FSDP2: {len(held)} parameter(s) (shapes {held[:3]}) are FSDP's unsharded "
                             "parameters, which a unit holds between its forward and its backward: build the "
                             "optimizer after fully_shard and before the forward (or after a backward)")
        stale = [tuple(p.shape) for p in layout.replicated if id(p) not in model_params]
        if stale:
            raise ValueError(f"ENGM under FSDP2: {len(stale)} parameter(s) (shapes {stale[:3]}) are not the model's: "
                             "build the optimizer after fully_shard(...), which replaces the parameters by sharded ones")

    def sharded_update(self, params: list, grads: list, momentum_buffers: list, **hyper) -> None:
        """The fused SGD step on the local shards of the DTensor parameters, gradients and buffers."""
        ops.sgd_momentum_update_(local_shards(params), local_shards(grads), local_shards(momentum_buffers), **hyper)

    def discard_pending(self) -> None:
        """``zero_grad`` during an accumulation: FSDP's unreduced gradients (input proxy) go too."""
        discard_unreduced(self.opt.model)
        self._replicated = {}

    # -- the backward -----------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, input_grad_norms, scaler) -> torch.Tensor:
        """:meth:`ENGM.backward <engm_fast.ENGM.backward>` on the sharded model (see the module docstring)."""
        opt = self.opt
        layout = _Layout(opt.model, opt.engine, opt._params())
        agreement = _Agreement(opt.model, layout.group)
        exact = (opt.norm_source == "exact" or not opt.proxy.fitted
                 or opt.backward_steps % opt.calibrate_every == 0)
        try:
            reducing = gradient_sync(opt.model)
            _check_losses(losses, allow_empty=True)
            opt._check_backward_args(input_grad_norms, scaler)
            if scaler is not None and scaler.is_enabled():
                raise NotImplementedError("ENGM under FSDP2 does not take a GradScaler: use MixedPrecisionPolicy with "
                                          "param_dtype=torch.bfloat16, which needs no loss scaling")
            fallback = opt.engine.fallback_modules
            if fallback and exact:
                raise NotImplementedError(f"ENGM under FSDP2: module(s) {fallback} go through the torch.func fallback, "
                                          "which re-runs a module after the backward, when FSDP has resharded its "
                                          "parameters; register a rule for them (engm_fast.register_rule)")
            keep = opt._finite_mask(losses.detach(), "losses")
        except Exception as exc:
            agreement(exc)
            raise
        if exact:
            return self._exact(losses, keep, input_grad_norms, layout, agreement, reducing)
        return self._proxy(losses, keep, input_grad_norms, layout, agreement, reducing)

    def _input_norms(self, losses, keep, input_grad_norms, agreement: _Agreement) -> tuple:
        """The input-gradient norms and the keep mask with their non-finite entries; the input
        backward (when the norms are not given) runs after the ranks agreed on the checks so far."""
        opt = self.opt
        error = None
        if input_grad_norms is None:
            missing = None if opt._last_input is not None else ValueError(
                "norm_source='input_proxy': the model has not been called on a floating-point input tensor since the "
                "optimizer was built; pass input_grad_norms (e.g. from the attack) or feed the model its input as "
                "first argument")
            agreement(missing)  # the input backward runs collectives: every rank runs it or none
            try:
                with gradients_kept(opt.model):  # FSDP may hold earlier micro-batches' gradients (proxy)
                    in_norms = opt._input_grad_norms(losses)
            except Exception as exc:
                return None, keep, exc
        else:
            in_norms = input_grad_norms.detach()
        try:
            if in_norms.shape != losses.shape:
                raise ValueError(f"input_grad_norms has shape {tuple(in_norms.shape)}, losses {tuple(losses.shape)}")
            in_norms = in_norms.to(losses.device)
            keep = keep & opt._finite_mask(in_norms, "input-gradient norms")
        except Exception as exc:
            error = exc
        return in_norms, keep, error

    def _exact(self, losses, keep, input_grad_norms, layout, agreement, reducing: bool) -> torch.Tensor:
        opt = self.opt
        in_norms, error = None, None
        if opt.norm_source == "input_proxy":  # a calibration step: pairs (input norm, exact norm)
            in_norms, keep, error = self._input_norms(losses, keep, input_grad_norms, agreement)
            if input_grad_norms is None:
                agreement = _Agreement(opt.model, layout.group)  # the next pass needs its own
            if error is not None:
                agreement(error)
        dropping = not bool(keep.all())
        grads, error = _engine_pass(opt.engine, layout, losses, agreement,
                                    loss_weights=keep.to(losses.dtype) if dropping else None)
        part, current = StepSums(exact=True), None
        if error is None:
            try:
                norms = self._local_norms(grads, losses)
                if grads is not None:
                    if dropping:
                        grads = grads.zero_examples(~keep)
                        norms = grads.sqnorms().sqrt()
                    finite = torch.isfinite(torch.where(keep, norms, 0.0))
                    if not bool(finite.all()):
                        keep = keep & opt._finite_mask(torch.where(keep, norms, 0.0), "per-example gradient norms")
                        grads = grads.zero_examples(~keep)
                    phi = self._weights(norms, keep)
                    current = (grads, phi, keep.to(norms.dtype) if opt.track_variance else None)
                    part.add_stats(norms, phi, keep)
                    if in_norms is not None:
                        part.pairs = [(in_norms[keep].detach(), norms[keep].detach())]
                part.plain = {} if opt.track_variance else None
                part.local_norms = norms
                opt.last_dropped = (~keep).nonzero().flatten().tolist()
            except Exception as exc:
                error = exc
        return self._finish(part, error, current, layout, reducing)

    def _proxy(self, losses, keep, input_grad_norms, layout, agreement, reducing: bool) -> torch.Tensor:
        opt = self.opt
        in_norms, keep, error = self._input_norms(losses, keep, input_grad_norms, agreement)
        dropping, n_here = False, 0
        if error is None:
            norms = opt.proxy.predict(in_norms.to(accumulation_dtype(losses.dtype)))
            phi = self._weights(norms, keep)
            dropping = not bool(keep.all())
            n_here = int(keep.sum()) + (opt._pending.n if opt._pending is not None else 0)
        # The weights are known before the backward: so is the global kept count N (FSDP's own
        # reduction divides by it inside the backward), and one route for all ranks (the ranks'
        # FSDP reductions must match): the engine's where any rank drops examples.
        table = _Agreement(opt.model, layout.group)(error, flags=(dropping, n_here))
        engine_route, n_total = bool(table[:, 1].any()), int(table[:, 2].sum())
        if reducing and n_total == 0:
            opt._pending = None
            reset_iteration(opt.model)
            raise FloatingPointError("every example on every rank was dropped as non-finite: no step can be taken")
        part = StepSums(exact=False)
        part.add_stats(norms, phi, keep)
        part.plain = None
        part.local_norms = norms
        opt.last_dropped = (~keep).nonzero().flatten().tolist()
        current, error = None, None
        with reduction_divided_by(opt.model, n_total if reducing else 1):
            if engine_route:
                grads, error = _engine_pass(opt.engine, layout, losses, _Agreement(opt.model, layout.group),
                                            loss_weights=keep.to(losses.dtype))
                current = None if grads is None else (grads.zero_examples(~keep), phi, None)
            else:
                self._autograd_backward(losses, phi, layout)
        return self._finish(part, error, current, layout, reducing)

    def _local_norms(self, grads: PerExampleGradients | None, losses: torch.Tensor) -> torch.Tensor:
        if grads is None:
            return torch.zeros(0, dtype=accumulation_dtype(losses.dtype), device=losses.device)
        return grads.sqnorms().sqrt()

    def _weights(self, norms: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        opt = self.opt
        zero = torch.zeros((), dtype=norms.dtype, device=norms.device)
        return torch.where(keep, example_weights(norms.clamp_min(0), opt.weighting, opt.eps, opt.clip_norm,
                                                 opt.power), zero)

    def _autograd_backward(self, losses: torch.Tensor, phi: torch.Tensor, layout: _Layout) -> None:
        """FSDP's own backward of ``sum_i phi_i loss_i`` into the optimizer's parameters: FSDP
        reduce-scatters each unit (as :func:`reduction_divided_by` set it) into ``.grad``, or keeps
        the unsharded gradients under ``set_requires_gradient_sync(False)``. The gradients of the
        parameters outside every unit are kept aside (``_replicated``) for :meth:`_reduce` or
        :meth:`_accumulate`; their ``.grad`` is left as it was."""
        targets = [sp.unsharded for sp in layout.sharded.values() if sp.unsharded is not None]
        saved = {p: p.grad for p in layout.replicated}
        for p in layout.replicated:
            p.grad = None
        (losses * phi.to(losses.dtype)).sum().backward(inputs=targets + layout.replicated)
        self._replicated = {p: p.grad for p in layout.replicated if p.grad is not None}
        for p in layout.replicated:
            p.grad = saved[p]

    # -- accumulation and reduction -------------------------------------------------------
    def _finish(self, part: StepSums, error, current, layout: _Layout, reducing: bool) -> torch.Tensor:
        opt = self.opt
        if not reducing:
            _Agreement(opt.model, layout.group)(error)  # no_sync: no statistics yet, but raise on every rank
            self._accumulate(part, current, layout)
            return part.local_norms
        total, touched = self._exchange(part, error, layout, current)
        self._reduce(total, touched, current, layout)
        return part.local_norms

    def _exchange(self, part: StepSums | None, error, layout: _Layout, current=None):
        """The global statistics of this micro-batch and the ones accumulated before it, and which
        parameters have a gradient on some rank."""
        opt = self.opt
        merged = part
        if part is not None and error is None and opt._pending is not None:
            merged = opt._pending.merge(part)
        touched_here = None
        if merged is not None and error is None:
            fresh = set() if current is None else set(current[0].contributions)
            touched_here = [p in fresh or p in merged.sums or p in self._replicated for p in layout.params]
        try:
            return _exchange_statistics(merged, error, touched_here, len(layout.params), layout.group,
                                        _device(layout.group))
        except BaseException:
            opt._pending = None
            reset_iteration(opt.model)
            raise

    @torch.no_grad()
    def _accumulate(self, part: StepSums, current, layout: _Layout) -> None:
        """A micro-batch under ``set_requires_gradient_sync(False)``: its full-size local sums
        join the pending ones (nothing is communicated)."""
        opt = self.opt
        if current is not None:
            grads, phi, plain_w = current
            for p, c in grads.contributions.items():
                part.sums[p] = c.weighted_sum(phi).to(_reduce_dtype(layout, p))
                if plain_w is not None:
                    part.plain[p] = c.weighted_sum(plain_w).to(_reduce_dtype(layout, p))
        for p, g in self._replicated.items():
            part.sums[p] = g
        self._replicated = {}
        opt._pending = part if opt._pending is None else opt._pending.merge(part)

    @torch.no_grad()
    def _reduce(self, total: StepSums, touched: list[bool], current, layout: _Layout) -> None:
        """Unit by unit: this rank's full-size sums (pending + current micro-batch), one
        reduce-scatter into the local shards, divided by the global count, added to ``.grad``;
        then the parameters outside every unit (one all-reduce). Then ENGM's bookkeeping."""
        opt = self.opt
        pending = opt._pending
        opt._pending = None
        chosen = {p for p, t in zip(layout.params, touched) if t}
        grads, phi, plain_w = current if current is not None else (None, None, None)
        with_plain = total.plain is not None
        sq = 0.0  # this rank's shards' part of ||mean g||^2

        def full(p, which: str):
            acc = getattr(pending, which, None) if pending is not None else None
            out = acc.get(p) if acc else None
            w = phi if which == "sums" else plain_w
            if grads is not None and w is not None and p in grads.contributions:
                g = grads.contributions[p].weighted_sum(w).to(_reduce_dtype(layout, p))
                out = g if out is None else out + g
            return out if out is not None else torch.zeros(p.shape, dtype=_reduce_dtype(layout, p), device=p.device)

        for unit in layout.units:
            mine = [sp for sp in unit.params if sp.sharded in chosen]
            if not mine:
                continue
            makers = [lambda p=sp.sharded: full(p, "sums") for sp in mine]
            if with_plain:
                makers += [lambda p=sp.sharded: full(p, "plain") for sp in mine]
            shards = _reduce_scatter(makers, mine + (mine if with_plain else []), layout.group)
            for sp, s in zip(mine, shards):
                _add_grad(sp.sharded, s.div_(total.n))
            if with_plain:
                sq += sum(float(s.double().div_(total.n).pow(2).sum()) for s in shards[len(mine):])
        replicated = [p for p in layout.replicated if p in chosen]
        extra = self._replicated
        for p in replicated:
            g = full(p, "sums")
            if p in extra:
                g = g + extra[p]
            dist.all_reduce(g, group=layout.group)
            g.div_(total.n)
            p.grad = g.to(p.dtype) if p.grad is None else p.grad.add_(g.to(p.dtype))
            if with_plain:
                h = full(p, "plain")
                dist.all_reduce(h, group=layout.group)
                sq += float(h.double().div_(total.n).pow(2).sum())
        self._replicated = {}
        opt._apply(_without_plain(total))  # backward_steps, the proxy fit, the diagnostics
        if with_plain:
            parts = torch.tensor([sq], dtype=torch.float64, device=_device(layout.group))
            dist.all_reduce(parts, group=layout.group)  # the shards' parts of ||mean g||^2
            mean_sq = float(parts)
            opt.diagnostics = dict(opt.diagnostics, grad_sqnorm=mean_sq, grad_variance=total.sum_sq / total.n - mean_sq)


def _without_plain(total: StepSums) -> StepSums:
    total.plain = None
    return total


def _reduce_dtype(layout: _Layout, p: nn.Parameter) -> torch.dtype:
    sp = layout.sharded.get(p)
    return sp.reduce_dtype if sp is not None else p.dtype


# torch 2.13 renamed reduce_scatter_tensor (deprecated there, with the same signature).
_REDUCE_SCATTER = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


def _reduce_scatter(makers: list, shards: list[ShardedParameter], group) -> list[torch.Tensor]:
    """For each ``k``: the sum over the ranks of the full-size tensor ``makers[k]()`` (made one at
    a time, copied into the reduce-scatter input and freed before the next is made), restricted
    to this rank's rows of ``shards[k]``, from ONE reduce-scatter over ``group``.

    FSDP shards dim 0 as ``torch.chunk`` does: ``c = ceil(D / world)`` rows per rank, rank ``r``
    holding rows ``[r c, min(D, (r + 1) c))`` (the last ranks fewer or none). The input is laid
    out ``[world, sum_k c_k * rest_k]``, rank-major and zero-padded, as FSDP's own
    reduce-scatter input is. Peak memory: that input, one full-size tensor, and the output
    (``1/world`` of the input).
    """
    world, rank = group.size(), group.rank()
    plan = []
    for sp in shards:
        shape = sp.sharded.shape
        D = shape[0]
        plan.append((D, -(-D // world), math.prod(shape[1:])))
    total = sum(c * rest for _, c, rest in plan)
    buf, offset = None, 0
    for make, (D, c, rest) in zip(makers, plan):
        full = make()
        if buf is None:
            buf = torch.zeros(world, total, dtype=full.dtype, device=full.device)
        flat = full.to(buf.dtype).reshape(D, rest)
        for j in range(world):
            lo, hi = j * c, min(D, (j + 1) * c)
            if hi > lo:
                buf[j, offset:offset + (hi - lo) * rest].copy_(flat[lo:hi].reshape(-1))
        del full, flat
        offset += c * rest
    out = torch.empty(total, dtype=buf.dtype, device=buf.device)
    _REDUCE_SCATTER(out, buf.view(-1), group=group)
    del buf
    result, offset = [], 0
    for sp, (D, c, rest) in zip(shards, plan):
        local_shape = sp.sharded.to_local().shape
        rows = max(0, min(D, (rank + 1) * c) - rank * c)
        if local_shape[0] != rows:
            raise RuntimeError(f"ENGM under FSDP2: parameter '{sp.name}' holds {local_shape[0]} rows on rank {rank}, "
                               f"not the {rows} of torch.chunk's layout that the reduction assumes")
        result.append(out[offset:offset + rows * rest].view(local_shape))
        offset += c * rest
    return result


def _add_grad(param: nn.Parameter, local: torch.Tensor) -> None:
    """Adds this rank's shard ``local`` to the DTensor ``param.grad`` (created when None)."""
    from torch.distributed.tensor import DTensor

    local = local.to(dtype=param.dtype, device=param.device)
    g = DTensor.from_local(local, param.device_mesh, param.placements, run_check=False, shape=param.shape,
                           stride=param.stride())
    if param.grad is None:
        param.grad = g
    else:
        param.grad.add_(g)


def local_shards(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Each DTensor as its local shard (the same storage: in-place updates reach the DTensor);
    other tensors as they are. The fused SGD step runs on the shards.

    Example:
        >>> import torch
        >>> local_shards([torch.ones(2)])[0]
        tensor([1., 1.])
    """
    from torch.distributed.tensor import DTensor

    return [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
