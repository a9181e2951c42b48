"""The engm_fast ops, dispatched to the selected backend (see :mod:`engm_fast._backend`).

* :func:`per_example_sqnorm` ``(a, b, mode="auto") -> [B]``: ``||b_i^T a_i||_F^2``.
* :func:`weighted_outer_sum` ``(a, b, w) -> [d_out, d_in]``: ``sum_i w_i b_i^T a_i``.

Semantics, shapes and dtypes are those of :mod:`engm_fast.reference`, the specification every
backend is tested against.
"""
from __future__ import annotations

import torch

from .. import _backend, reference
from ..reference import accumulation_dtype

__all__ = ["per_example_sqnorm", "weighted_outer_sum"]

if _backend._NATIVE:
    # Shape/dtype functions so the native ops work under torch.compile and fake tensors.
    @torch.library.register_fake("engm_fast::per_example_sqnorm")
    def _sqnorm_fake(a, b, mode="auto"):
        return a.new_empty((a.shape[0],), dtype=accumulation_dtype(a.dtype))

    @torch.library.register_fake("engm_fast::weighted_outer_sum")
    def _weighted_fake(a, b, w):
        return a.new_empty((b.shape[-1], a.shape[-1]))


def per_example_sqnorm(a: torch.Tensor, b: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Per-example squared Frobenius norm of ``b_i^T a_i``; see :func:`engm_fast.reference.per_example_sqnorm`.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.ops.per_example_sqnorm(torch.ones(2, 3), torch.ones(2, 4))
        tensor([12., 12.])
    """
    if _backend.resolve(a.device) == "torch":
        return reference.per_example_sqnorm(a, b, mode)
    return torch.ops.engm_fast.per_example_sqnorm(a, b, mode)


def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i b_i^T a_i``; see :func:`engm_fast.reference.weighted_outer_sum`.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.ops.weighted_outer_sum(torch.ones(2, 3), torch.ones(2, 1), torch.tensor([1.0, 2.0]))
        tensor([[3., 3., 3.]])
    """
    if _backend.resolve(a.device) == "torch":
        return reference.weighted_outer_sum(a, b, w)
    return torch.ops.engm_fast.weighted_outer_sum(a, b, w)
