"""The engm_fast ops, dispatched to the selected backend (see :mod:`engm_fast._backend`).

* :func:`per_example_sqnorm` ``(a, b, mode="auto") -> [B]``: ``||b_i^T a_i||_F^2``.
* :func:`weighted_outer_sum` ``(a, b, w) -> [d_out, d_in]``: ``sum_i w_i b_i^T a_i``.
* :func:`sgd_momentum_update_` ``(params, grads, momentum_buffers, lr, momentum, dampening,
  weight_decay, nesterov, first_step)``: one fused torch.optim.SGD step, in place.
* :func:`per_example_sqnorms` ``(a_list, b_list, modes=None) -> [B]`` and
  :func:`weighted_outer_sums_` ``(a_list, b_list, w, out_list)``: the first two over a list of
  layers in one call (the engine's per-step finalize).
* :func:`lstm_recurrence` and :func:`lstm_recurrence_backward`: one LSTM layer and direction
  over a sequence, forward and backward through time (:mod:`engm_fast.ops.lstm`, which has its
  own contract, reference and backends: a C++ CPU kernel, the reference elsewhere).

Backends: ``"torch"`` runs :mod:`engm_fast.reference`; ``"cpu"`` / ``"cuda"`` the native
``torch.ops.engm_fast.*``; ``"triton"`` ``torch.ops.engm_fast_triton.*`` (:mod:`engm_fast.triton`).

What every op computes, and the deviation each backend may have from it, is the contract in
:mod:`engm_fast.reference`. These wrappers carry out its decisions once for all backends: they
check the arguments (:func:`~engm_fast.reference.check_rows`,
:func:`~engm_fast.reference.check_weights`, :func:`~engm_fast.reference.check_update_args`:
the same ``TypeError`` / ``ValueError`` on every backend), resolve ``mode="auto"`` to the route
(:func:`~engm_fast.reference.resolve_sqnorm_mode`) and hand the kernels the accumulation dtype
(:func:`~engm_fast.reference.accumulation_dtype`). The registered kernels take these explicitly:

* ``per_example_sqnorm(Tensor a, Tensor b, str mode, ScalarType acc_dtype) -> Tensor`` with
  ``mode`` ``"ghost"`` or ``"direct"``;
* ``weighted_outer_sum(Tensor a, Tensor b, Tensor w) -> Tensor`` with ``w`` in the accumulation
  dtype (the dtype the kernel multiplies and sums in);
* ``sgd_momentum_update_`` as above.
"""
from __future__ import annotations

import torch

from .. import _backend, reference
from ..reference import accumulation_dtype
from .lstm import lstm_recurrence, lstm_recurrence_backward

__all__ = ["per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_", "per_example_sqnorms",
           "weighted_outer_sums_", "lstm_recurrence", "lstm_recurrence_backward"]

if _backend._NATIVE:
    # Shape/dtype functions so the native ops work under torch.compile and fake tensors.
    @torch.library.register_fake("engm_fast::per_example_sqnorm")
    def _sqnorm_fake(a, b, mode, acc_dtype):
        return a.new_empty((a.shape[0],), dtype=acc_dtype)

    @torch.library.register_fake("engm_fast::weighted_outer_sum")
    def _weighted_fake(a, b, w):
        return a.new_empty((b.shape[-1], a.shape[-1]))

    # In-place op returning nothing: the fake implementation only has to accept the arguments
    # (the schema's Tensor(a!)[] annotations tell functionalization what is mutated).
    @torch.library.register_fake("engm_fast::sgd_momentum_update_")
    def _sgd_fake(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
        return None

    @torch.library.register_fake("engm_fast::per_example_sqnorms")
    def _sqnorms_fake(a, b, modes, acc_dtype):
        return a[0].new_empty((a[0].shape[0],), dtype=acc_dtype)

    @torch.library.register_fake("engm_fast::weighted_outer_sums_")
    def _weighted_sums_fake(a, b, w, out):
        return None


def _kernel(backend: str, name: str):
    """The registered op ``name`` of a kernel backend ("cpu", "cuda" or "triton")."""
    if backend == "triton":
        return getattr(_backend.triton_ops(), name)
    return getattr(torch.ops.engm_fast, name)


def per_example_sqnorm(a: torch.Tensor, b: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Per-example squared Frobenius norm of ``b_i^T a_i``; see :func:`engm_fast.reference.per_example_sqnorm`.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.ops.per_example_sqnorm(torch.ones(2, 3), torch.ones(2, 4))
        tensor([12., 12.])
    """
    _, T, d_in, d_out = reference.check_rows(a, b, "per_example_sqnorm")
    route = reference.resolve_sqnorm_mode(mode, T, d_in, d_out)
    backend = _backend.resolve(a.device)
    if backend == "torch":
        return reference.per_example_sqnorm(a, b, route)
    return _kernel(backend, "per_example_sqnorm")(a, b, route, accumulation_dtype(a.dtype))


def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i b_i^T a_i``; see :func:`engm_fast.reference.weighted_outer_sum`.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.ops.weighted_outer_sum(torch.ones(2, 3), torch.ones(2, 1), torch.tensor([1.0, 2.0]))
        tensor([[3., 3., 3.]])
    """
    reference.check_rows(a, b, "weighted_outer_sum")
    reference.check_weights(w, a, "weighted_outer_sum")
    backend = _backend.resolve(a.device)
    if backend == "torch":
        return reference.weighted_outer_sum(a, b, w)
    acc = accumulation_dtype(a.dtype)
    return _kernel(backend, "weighted_outer_sum")(a, b, w if w.dtype == acc else w.to(acc))


def per_example_sqnorms(a: list[torch.Tensor], b: list[torch.Tensor], modes: list[str] | None = None) -> torch.Tensor:
    """``sum_j per_example_sqnorm(a[j], b[j], modes[j])`` in one call; see
    :func:`engm_fast.reference.per_example_sqnorms`.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.ops.per_example_sqnorms([torch.ones(2, 3), torch.ones(2, 1)], [torch.ones(2, 4), torch.ones(2, 5)])
        tensor([17., 17.])
    """
    shapes = reference.check_layer_lists(a, b, "per_example_sqnorms")
    modes = ["auto"] * len(a) if modes is None else list(modes)
    if len(modes) != len(a):
        raise ValueError(f"per_example_sqnorms: {len(modes)} modes for {len(a)} layers")
    routes = [reference.resolve_sqnorm_mode(m, T, d_in, d_out) for m, (_, T, d_in, d_out) in zip(modes, shapes)]
    backend = _backend.resolve(a[0].device)
    if backend == "torch":
        return reference.per_example_sqnorms(a, b, routes)
    return _kernel(backend, "per_example_sqnorms")(list(a), list(b), routes, accumulation_dtype(a[0].dtype))


def weighted_outer_sums_(a: list[torch.Tensor], b: list[torch.Tensor], w: torch.Tensor,
                         out: list[torch.Tensor]) -> None:
    """``out[j] += weighted_outer_sum(a[j], b[j], w)`` for every layer in one call, in place; see
    :func:`engm_fast.reference.weighted_outer_sums_`.

    Example:
        >>> import torch, engm_fast
        >>> out = [torch.zeros(1, 3)]
        >>> engm_fast.ops.weighted_outer_sums_([torch.ones(2, 3)], [torch.ones(2, 1)], torch.tensor([1.0, 2.0]), out)
        >>> out[0]
        tensor([[3., 3., 3.]])
    """
    reference.check_layer_lists(a, b, "weighted_outer_sums_", out)
    reference.check_weights(w, a[0], "weighted_outer_sums_")
    backend = _backend.resolve(a[0].device)
    with torch.no_grad():
        if backend == "torch":
            reference.weighted_outer_sums_(a, b, w, out)
            return
        acc = accumulation_dtype(a[0].dtype)
        _kernel(backend, "weighted_outer_sums_")(list(a), list(b), w if w.dtype == acc else w.to(acc), list(out))


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
    reference.check_update_args(params, grads, momentum_buffers, momentum)
    if not params:  # nothing to do (and the dispatcher could not pick a kernel without a tensor)
        return
    buffers = momentum_buffers if momentum != 0 else []
    args = (params, grads, buffers, lr, momentum, dampening, weight_decay, nesterov, first_step)
    backend = _backend.resolve(params[0].device)
    with torch.no_grad():
        if backend == "torch":
            reference.sgd_momentum_update_(*args)
            return
        _kernel(backend, "sgd_momentum_update_")(*args)
        if backend != "triton":
            # A TORCH_LIBRARY op writing through data pointers does not bump version counters
            # (custom_op and ATen in-place ops do): bump them, so autograd still detects a
            # param modified after being saved for backward.
            torch.autograd.graph.increment_version(params)
            if buffers:
                torch.autograd.graph.increment_version(buffers)
