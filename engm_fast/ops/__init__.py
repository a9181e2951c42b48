"""The engm_fast ops, dispatched to the selected backend (see :mod:`engm_fast._backend`).

* :func:`per_example_sqnorm` ``(a, b, mode="auto") -> [B]``: ``||b_i^T a_i||_F^2``.
* :func:`weighted_outer_sum` ``(a, b, w) -> [d_out, d_in]``: ``sum_i w_i b_i^T a_i``.
* :func:`sgd_momentum_update_` ``(params, grads, momentum_buffers, lr, momentum, dampening,
  weight_decay, nesterov, first_step)``: one fused torch.optim.SGD step, in place.

Backends: ``"torch"`` runs :mod:`engm_fast.reference`; ``"cpu"`` / ``"cuda"`` the native
``torch.ops.engm_fast.*``; ``"triton"`` ``torch.ops.engm_fast_triton.*`` (:mod:`engm_fast.triton`).

Semantics, shapes and dtypes are those of :mod:`engm_fast.reference`, the specification every
backend is tested against.
"""
from __future__ import annotations

import torch

from .. import _backend, reference
from ..reference import accumulation_dtype

__all__ = ["per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_"]

if _backend._NATIVE:
    # Shape/dtype functions so the native ops work under torch.compile and fake tensors.
    @torch.library.register_fake("engm_fast::per_example_sqnorm")
    def _sqnorm_fake(a, b, mode="auto"):
        return a.new_empty((a.shape[0],), dtype=accumulation_dtype(a.dtype))

    @torch.library.register_fake("engm_fast::weighted_outer_sum")
    def _weighted_fake(a, b, w):
        return a.new_empty((b.shape[-1], a.shape[-1]))

    # In-place op returning nothing: the fake implementation only has to accept the arguments
    # (the schema's Tensor(a!)[] annotations tell functionalization what is mutated).
    @torch.library.register_fake("engm_fast::sgd_momentum_update_")
    def _sgd_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
        return None


def per_example_sqnorm(a: torch.Tensor, b: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Per-example squared Frobenius norm of ``b_i^T a_i``; see :func:`engm_fast.reference.per_example_sqnorm`.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.ops.per_example_sqnorm(torch.ones(2, 3), torch.ones(2, 4))
        tensor([12., 12.])
    """
    backend = _backend.resolve(a.device)
    if backend == "torch":
        return reference.per_example_sqnorm(a, b, mode)
    if backend == "triton":
        return _backend.triton_ops().per_example_sqnorm(a, b, mode)
    return torch.ops.engm_fast.per_example_sqnorm(a, b, mode)


def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i b_i^T a_i``; see :func:`engm_fast.reference.weighted_outer_sum`.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.ops.weighted_outer_sum(torch.ones(2, 3), torch.ones(2, 1), torch.tensor([1.0, 2.0]))
        tensor([[3., 3., 3.]])
    """
    backend = _backend.resolve(a.device)
    if backend == "torch":
        return reference.weighted_outer_sum(a, b, w)
    if backend == "triton":
        return _backend.triton_ops().weighted_outer_sum(a, b, w)
    return torch.ops.engm_fast.weighted_outer_sum(a, b, w)


def sgd_momentum_update_(params: list[torch.Tensor], grads: list[torch.Tensor],
                         momentum_buffers: list[torch.Tensor], lr: float, momentum: float,
                         dampening: float, weight_decay: float, nesterov: bool, first_step: bool) -> None:
    """One torch.optim.SGD step over lists of tensors, in place (params and buffers); see
    :func:`engm_fast.reference.sgd_momentum_update_`.

    ``momentum_buffers`` is empty when ``momentum == 0``, else one tensor per param (same shape,
    dtype and device); with ``first_step`` the buffers are set to the first gradient. All tensors
    are on one device, which picks the backend. Runs under ``torch.no_grad()``.

    Example:
        >>> import torch, engm_fast
        >>> p, g, buf = [torch.ones(2)], [torch.full((2,), 0.5)], [torch.zeros(2)]
        >>> engm_fast.ops.sgd_momentum_update_(p, g, buf, lr=0.1, momentum=0.9, dampening=0.0,
        ...                                    weight_decay=0.0, nesterov=False, first_step=True)
        >>> p[0]
        tensor([0.9500, 0.9500])
    """
    params, grads, momentum_buffers = list(params), list(grads), list(momentum_buffers)
    lr, momentum, dampening, weight_decay = float(lr), float(momentum), float(dampening), float(weight_decay)
    nesterov, first_step = bool(nesterov), bool(first_step)
    if not params:  # the dispatcher cannot pick a kernel without a tensor
        if grads or (momentum != 0 and momentum_buffers):
            raise ValueError(f"sgd_momentum_update_: got 0 params, {len(grads)} grads and "
                             f"{len(momentum_buffers)} momentum buffers")
        return
    for what, tensors in (("params", params), ("grads", grads), ("momentum_buffers", momentum_buffers)):
        for i, t in enumerate(tensors):
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"sgd_momentum_update_: {what}[{i}] is a {type(t).__name__}, not a tensor")
            if t.layout != torch.strided:
                raise TypeError(f"sgd_momentum_update_: {what}[{i}] has layout {t.layout}; only dense (strided) "
                                "tensors are supported")
    device = params[0].device
    used = params + grads + (momentum_buffers if momentum != 0 else [])
    for t in used:
        if t.device != device:
            raise ValueError(f"sgd_momentum_update_: tensors on {device} and {t.device}; all must be on one device")
    args = (params, grads, momentum_buffers if momentum != 0 else [], lr, momentum, dampening, weight_decay,
            nesterov, first_step)
    backend = _backend.resolve(device)
    with torch.no_grad():
        if backend == "torch":
            reference.sgd_momentum_update_(*args)
        elif backend == "triton":
            _backend.triton_ops().sgd_momentum_update_(*args)
        else:
            torch.ops.engm_fast.sgd_momentum_update_(*args)
            # A TORCH_LIBRARY op writing through data pointers does not bump version counters
            # (custom_op and ATen in-place ops do): bump them, so autograd still detects a
            # param modified after being saved for backward.
            torch.autograd.graph.increment_version(params)
            if momentum != 0:
                torch.autograd.graph.increment_version(momentum_buffers)
