"""ENGM's per-step sums and their reduction across DistributedDataParallel ranks.

ENGM under ``DistributedDataParallel`` (DDP) must equal single-process ENGM on the
concatenation of all ranks' batches: ``ghat = (1/N) sum_i w_i g_i`` with ``N`` the global
number of kept examples. Each rank therefore keeps UNNORMALIZED sums
(:class:`StepSums`: ``sum_i w_i g_i`` over its examples, the kept count, the statistics behind
the diagnostics and the proxy's calibration pairs); :func:`_reduce_step_sums` adds them up over
the ranks with one ``all_gather`` of a small statistics row and one ``all_reduce`` per
(device, dtype) of the flattened gradients, then divides by ``N``.

Why ENGM reduces and not DDP's reducer: DDP all-reduces the gradients that autograd
accumulates into ``.grad`` (hooks on each parameter's AccumulateGrad node). ENGM's backward
never runs those nodes (the engine asks autograd for the gradient of its anchor, the proxy
step for the parameters' gradients with ``torch.autograd.grad``), so DDP's hooks never fire and
nothing is reduced twice; DDP keeps its other duties (broadcast of buffers and of the
initial parameters).

Errors: the statistics row carries an error flag, so an error on one rank during a reducing
backward is raised on every rank (each names the failing ranks) before any gradient is
written: no rank is left waiting in a collective and no rank applies a partial step.
"""
from __future__ import annotations

import math

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["StepSums", "ddp_of"]


def ddp_of(model: nn.Module) -> "nn.parallel.DistributedDataParallel | None":
    """The ``DistributedDataParallel`` wrapper of ``model`` (looking through torch.compile), or None.

    Example:
        >>> import torch
        >>> ddp_of(torch.nn.Linear(2, 2)) is None
        True
    """
    while True:
        if isinstance(model, nn.parallel.DistributedDataParallel):
            return model
        inner = getattr(model, "_orig_mod", None)  # torch.compile(ddp_model)
        if not isinstance(inner, nn.Module):
            return None
        model = inner


class StepSums:
    """One rank's part of an ENGM gradient, over one or more micro-batches.

    Attributes:
        exact: whether the weights came from exact norms (engine) rather than the input proxy.
        sums: ``{param: sum_i w_i g_i}`` (times the loss scale under a GradScaler, and divided
            by the kept count when ``normalized``).
        plain: ``{param: sum_i g_i}`` over kept examples (for the variance diagnostic) or None.
        n, n_dropped: kept and dropped examples.
        sum_norm, sum_phi, sum_sq, max_norm, min_norm: over kept examples, of the (unscaled)
            norms ``||g_i||``, the weights ``phi(||g_i||)`` and ``||g_i||^2``.
        pairs: ``[(input-gradient norms, exact norms)]`` of kept examples at calibration steps.
        overflow: a GradScaler-scaled backward gave non-finite gradient norms.
        scale: the loss scale the sums carry.

    Example:
        >>> s = StepSums(exact=True)
        >>> s.add_stats(torch.tensor([1.0, 3.0]), torch.tensor([0.5, 0.25]), torch.tensor([True, True]))
        >>> s.n, s.sum_norm, s.max_norm
        (2, 4.0, 3.0)
    """

    def __init__(self, exact: bool, scale: float = 1.0, normalized: bool = False):
        self.exact, self.scale, self.normalized = exact, scale, normalized
        self.sums: dict[nn.Parameter, torch.Tensor] = {}
        self.plain: dict[nn.Parameter, torch.Tensor] | None = None
        self.n = self.n_dropped = 0
        self.sum_norm = self.sum_phi = self.sum_sq = 0.0
        self.max_norm, self.min_norm = -math.inf, math.inf
        self.pairs: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.overflow = False
        self.local_norms: torch.Tensor | None = None  # what ENGM.backward returns on this rank

    def add_stats(self, norms: torch.Tensor, phi: torch.Tensor, keep: torch.Tensor) -> None:
        """Adds one batch's kept norms and weights to the statistics."""
        kept = norms[keep].double()
        self.n += int(kept.numel())
        self.n_dropped += int(keep.numel() - kept.numel())
        if kept.numel():
            self.sum_norm += float(kept.sum())
            self.sum_sq += float(kept.pow(2).sum())
            self.sum_phi += float(phi[keep].double().sum())
            self.max_norm = max(self.max_norm, float(kept.max()))
            self.min_norm = min(self.min_norm, float(kept.min()))

    def merge(self, other: "StepSums") -> "StepSums":
        """A new StepSums holding both (micro-batches accumulated under ``no_sync``)."""
        if other.scale != self.scale:
            raise ValueError(f"micro-batches accumulated with different loss scales ({self.scale} vs {other.scale}): "
                             "call scaler.update() only after the reducing backward and the step")
        out = StepSums(self.exact and other.exact, self.scale, self.normalized)
        out.sums = _add_dicts(self.sums, other.sums)
        out.plain = None if self.plain is None or other.plain is None else _add_dicts(self.plain, other.plain)
        out.n, out.n_dropped = self.n + other.n, self.n_dropped + other.n_dropped
        out.sum_norm, out.sum_phi, out.sum_sq = (self.sum_norm + other.sum_norm, self.sum_phi + other.sum_phi,
                                                 self.sum_sq + other.sum_sq)
        out.max_norm, out.min_norm = max(self.max_norm, other.max_norm), min(self.min_norm, other.min_norm)
        out.pairs = self.pairs + other.pairs
        out.overflow = self.overflow or other.overflow
        return out


def _add_dicts(a: dict, b: dict) -> dict:
    out = dict(a)
    for p, g in b.items():
        out[p] = out[p] + g if p in out else g
    return out


_HEAD = ("error", "overflow", "n", "n_dropped", "sum_norm", "sum_phi", "sum_sq", "max_norm", "min_norm",
         "n_pairs", "has_plain")


def _reduce_step_sums(part: StepSums | None, error: BaseException | None, params: list[nn.Parameter],
                     group, device: torch.device) -> StepSums:
    """Adds the ranks' :class:`StepSums` up; the result's ``sums`` are divided by the global count.

    Every rank of ``group`` must call it (ENGM does, from each backward made outside
    ``no_sync``). ``params`` must be the same list, in the same order, on every rank.

    Args:
        part: this rank's sums (None when ``error`` is set).
        error: the exception this rank's local computation raised, or None.
        params: the optimizer's trainable parameters.
        group: the process group (DDP's ``process_group``).
        device: where the statistics row lives (the losses' device: CUDA for NCCL).

    Raises:
        the local ``error`` on the rank that had it; ``RuntimeError`` naming the failing ranks on
        the others; ``FloatingPointError`` on every rank when no example is left on any rank.
    """
    touched_here = None if part is None else [p in part.sums for p in params]
    out, touched = _exchange_statistics(part, error, touched_here, len(params), group, device)
    if out.overflow:
        return out
    chosen = [p for p, t in zip(params, touched) if t]
    out.sums = _all_reduce_mean(chosen, part.sums, out.n, group)
    if out.plain is not None:
        out.plain = _all_reduce_mean(chosen, part.plain or {}, out.n, group)
    return out


def _exchange_statistics(part: StepSums | None, error: BaseException | None, touched: list[bool] | None,
                         n_params: int, group, device: torch.device) -> tuple[StepSums, list[bool]]:
    """The global statistics of the ranks' :class:`StepSums` (counts, norm statistics, the proxy's
    calibration pairs: everything but the gradients), from one ``all_gather`` of a small row.

    ``touched[k]``: whether this rank has a gradient for the k-th of ``n_params`` parameters
    (the same list on every rank). Returns the statistics (``sums`` empty; ``plain`` is ``{}``
    where some rank tracks the variance, else None) and, per parameter, whether any rank
    touched it.

    Raises as :func:`_reduce_step_sums`.
    """
    row = torch.zeros(len(_HEAD) + n_params, dtype=torch.float64, device=device)
    if error is None and part is not None:
        row[1:len(_HEAD)] = torch.tensor([
            float(part.overflow), part.n, part.n_dropped, part.sum_norm, part.sum_phi, part.sum_sq,
            part.max_norm, part.min_norm, sum(int(x.numel()) for x, _ in part.pairs), float(part.plain is not None),
        ], dtype=torch.float64)
        row[len(_HEAD):] = torch.tensor([float(t) for t in touched], dtype=torch.float64)
    table = _gather_status(row, error, group)
    col = {name: table[:, i] for i, name in enumerate(_HEAD)}
    out = StepSums(part.exact, part.scale, normalized=True)
    out.n, out.n_dropped = int(col["n"].sum()), int(col["n_dropped"].sum())
    out.sum_norm, out.sum_phi, out.sum_sq = float(col["sum_norm"].sum()), float(col["sum_phi"].sum()), float(col["sum_sq"].sum())
    out.max_norm, out.min_norm = float(col["max_norm"].max()), float(col["min_norm"].min())
    touched_any = (table[:, len(_HEAD):].amax(0) > 0).tolist() if n_params else []
    if bool(col["overflow"].any()):
        out.overflow = True  # every rank writes non-finite .grad: every rank's GradScaler skips the step
        return out, touched_any
    if out.n == 0:
        raise FloatingPointError("every example on every rank was dropped as non-finite: no step can be taken")
    out.plain = {} if bool(col["has_plain"].any()) else None
    counts = [int(c) for c in col["n_pairs"].tolist()]
    if max(counts) > 0:
        out.pairs = [_gather_pairs(part.pairs, counts, group, device)]
    return out, touched_any


def _gather_status(row: torch.Tensor, error: BaseException | None, group) -> torch.Tensor:
    """Every rank's ``row`` (float64, ``row[0]`` set here to this rank's error flag) as a
    ``[world, len(row)]`` CPU table, from one ``all_gather``. If any rank failed, raises on
    every rank: the local ``error`` where it happened, a ``RuntimeError`` naming the failing
    ranks and their messages elsewhere."""
    world = dist.get_world_size(group)
    row[0] = 1.0 if error is not None else 0.0
    rows = [torch.empty_like(row) for _ in range(world)]
    dist.all_gather(rows, row, group=group)
    table = torch.stack(rows).cpu()
    failed = table[:, 0].nonzero().flatten().tolist()
    if failed:
        messages: list = [None] * world
        dist.all_gather_object(messages, None if error is None else f"{type(error).__name__}: {error}", group=group)
        if error is not None:
            raise error
        shown = "; ".join(f"rank {r}: {messages[r]}" for r in failed)
        raise RuntimeError(f"ENGM.backward failed on rank(s) {failed} ({shown}); no gradient was written on any rank")
    return table


def _all_reduce_mean(params: list, local: dict, n: int, group) -> dict:
    """``{p: (sum over ranks of local[p]) / n}``: one all_reduce per (device, dtype) bucket."""
    buckets: dict[tuple, list] = {}
    for p in params:
        buckets.setdefault((p.device, p.dtype), []).append(p)
    out = {}
    for ps in buckets.values():
        flat = torch.cat([(local[p] if p in local else torch.zeros_like(p)).reshape(-1) for p in ps])
        dist.all_reduce(flat, group=group)
        flat.div_(n)
        offset = 0
        for p in ps:
            out[p] = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
    return out


def _gather_pairs(pairs: list, counts: list[int], group, device) -> tuple[torch.Tensor, torch.Tensor]:
    """The calibration pairs of all ranks, concatenated in rank order (identical on every rank)."""
    width = max(counts)
    local = torch.zeros(2, width, dtype=torch.float64, device=device)
    if pairs:
        x = torch.cat([a.double().reshape(-1) for a, _ in pairs]).to(device)
        y = torch.cat([b.double().reshape(-1) for _, b in pairs]).to(device)
        local[0, :x.numel()], local[1, :y.numel()] = x, y
    gathered = [torch.empty_like(local) for _ in counts]
    dist.all_gather(gathered, local, group=group)
    x = torch.cat([g[0, :c] for g, c in zip(gathered, counts)]).cpu()
    y = torch.cat([g[1, :c] for g, c in zip(gathered, counts)]).cpu()
    return x, y
