"""The layer-list ops with the Triton kernels (``torch.ops.engm_fast_triton``): the engine's
per-step finalize in one op call, as ``csrc/composite/layer_lists.cpp`` is for the native
backends; see :func:`engm_fast.reference.per_example_sqnorms` and
:func:`engm_fast.reference.weighted_outer_sums_`.

Each layer is one launch of the per-layer kernels of :mod:`.sqnorm` and :mod:`.weighted_outer`
(a grouped launch of several GEMM shapes in one kernel would save the launches; on the sizes
where launches matter the native CUDA backend is used).
"""
from __future__ import annotations

import torch

from .sqnorm import launch_per_example_sqnorm
from .weighted_outer import launch_weighted_outer_sum

__all__ = ["per_example_sqnorms", "weighted_outer_sums_"]


# The schema is written out: custom_op cannot infer `str[]` from a type annotation.
@torch.library.custom_op("engm_fast_triton::per_example_sqnorms", mutates_args=(),
                         schema="(Tensor[] a, Tensor[] b, str[] modes, ScalarType acc_dtype) -> Tensor")
def per_example_sqnorms(a: list[torch.Tensor], b: list[torch.Tensor], modes: list[str],
                        acc_dtype: torch.dtype) -> torch.Tensor:
    """``sum_j per_example_sqnorm(a[j], b[j], modes[j])`` with the Triton kernels."""
    total = launch_per_example_sqnorm(a[0], b[0], modes[0], acc_dtype)
    for x, y, mode in zip(a[1:], b[1:], modes[1:]):
        total = total + launch_per_example_sqnorm(x, y, mode, acc_dtype)
    return total


@per_example_sqnorms.register_fake
def _(a, b, modes, acc_dtype):
    return a[0].new_empty((a[0].shape[0],), dtype=acc_dtype)


@torch.library.custom_op("engm_fast_triton::weighted_outer_sums_", mutates_args=("out",))
def weighted_outer_sums_(a: list[torch.Tensor], b: list[torch.Tensor], w: torch.Tensor,
                         out: list[torch.Tensor]) -> None:
    """``out[j] += weighted_outer_sum(a[j], b[j], w)`` with the Triton kernel, in place."""
    for x, y, o in zip(a, b, out):
        s = launch_weighted_outer_sum(x, y, w)
        o.view(s.shape).add_(s)


@weighted_outer_sums_.register_fake
def _(a, b, w, out):
    return None
