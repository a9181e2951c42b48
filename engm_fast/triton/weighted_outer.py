"""Triton ``weighted_outer_sum``: ``sum_i w_i b_i^T a_i`` (kernel, launcher and the registered
op ``engm_fast_triton::weighted_outer_sum``).

Semantics are :func:`engm_fast.reference.weighted_outer_sum`: ``a`` is ``[B, T, d_in]`` or
``[B, d_in]``, ``b`` likewise with ``d_out``, ``w`` is ``[B]`` in the accumulation dtype (float32
or float64: :func:`engm_fast.ops.weighted_outer_sum` converts it); the result is
``[d_out, d_in]`` in the dtype of ``a``.

One tiled GEMM ``(w * b)^T a`` whose reduction runs over the ``B * T`` rows: program
``(o_tile, i_tile, split)`` accumulates a ``BLOCK_O x BLOCK_I`` output tile over its share of
the rows in steps of ``BLOCK_K``. The weight is folded into the ``b`` tile as it is loaded
(row ``r`` belongs to example ``r // T``), so ``w * b`` never reaches memory. When the output
has few tiles (a 10 x 512 classifier head is 8 tiles of 64 x 64) the rows are split among
``SPLIT`` programs per tile so the GPU is filled; their float32 (float64) partial tiles are
added in a fixed order afterwards (deterministic, no atomics).

Precision (the contract of :mod:`engm_fast.reference`): accumulation in ``w``'s dtype,
``tl.dot`` with ``input_precision="ieee"`` (no TF32); ``w_r * b_r`` is computed in that dtype and
rounded once to the input dtype, the operand dtype of the tensor-core dot; the sum is rounded
to the output dtype at the end.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import DualKernel, check_device, dot_upcast, round_bf16_in_kernel, tl_dtype

__all__ = ["weighted_outer_sum", "launch_weighted_outer_sum"]

OP = "weighted_outer_sum"


def _weighted_outer_kernel(a_ptr, b_ptr, w_ptr, out_ptr, R, T, d_in, d_out, rows_per_split,
                           sa_b, sa_t, sa_d, sb_b, sb_t, sb_d, s_w,
                           ACC: tl.constexpr, DOT_UPCAST: tl.constexpr, ROUND_BF16: tl.constexpr,
                           ROUND_OUT_BF16: tl.constexpr,
                           BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr):
    o = tl.program_id(0) * BLOCK_O + tl.arange(0, BLOCK_O)
    c = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    split = tl.program_id(2)
    omask = o < d_out
    cmask = c < d_in
    r_lo = split.to(tl.int64) * rows_per_split
    r_hi = tl.minimum(r_lo + rows_per_split, R)
    acc = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    for k0 in range(r_lo, r_hi, BLOCK_K):
        r = k0 + tl.arange(0, BLOCK_K)
        rmask = r < r_hi
        ex = r // T
        t = r - ex * T
        wv = tl.load(w_ptr + ex * s_w, mask=rmask, other=0.0).to(ACC)
        # (w * b)^T tile [BLOCK_O, BLOCK_K], read transposed from b [B, T, d_out]
        bt = tl.load(b_ptr + ex[None, :] * sb_b + t[None, :] * sb_t + o[:, None] * sb_d,
                     mask=omask[:, None] & rmask[None, :], other=0.0)
        bt = bt.to(ACC) * wv[None, :]
        if ROUND_BF16:  # interpreter only: round to nearest even as compiled kernels do
            bits = (bt.to(tl.uint32, bitcast=True) + 0x7FFF
                    + ((bt.to(tl.uint32, bitcast=True) >> 16) & 1)) & 0xFFFF0000
            bt = bits.to(tl.float32, bitcast=True)
        bt = bt.to(b_ptr.dtype.element_ty)
        at = tl.load(a_ptr + ex[:, None] * sa_b + t[:, None] * sa_t + c[None, :] * sa_d,
                     mask=rmask[:, None] & cmask[None, :], other=0.0)
        if DOT_UPCAST:
            bt = bt.to(tl.float32)
            at = at.to(tl.float32)
        acc = tl.dot(bt, at, acc, input_precision="ieee", out_dtype=ACC)
    if ROUND_OUT_BF16:  # interpreter only, as above
        bits = (acc.to(tl.uint32, bitcast=True) + 0x7FFF + ((acc.to(tl.uint32, bitcast=True) >> 16) & 1)) & 0xFFFF0000
        acc = bits.to(tl.float32, bitcast=True)
    out = out_ptr + split.to(tl.int64) * d_out * d_in + o[:, None] * d_in + c[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=omask[:, None] & cmask[None, :])


_KERNEL = DualKernel(_weighted_outer_kernel)

# GPU defaults: 64 x 64 output tiles (16 KiB of float32 accumulator over 4 warps), 32 rows of
# the reduction per step. Splitting the rows: every split runs at least MIN_STEPS_PER_SPLIT
# steps (8 x 32 = 256 rows) so the partial tiles (one extra d_out x d_in write and read per
# split) stay small next to the work, and the grid aims at PROGRAMS_PER_SM programs per SM.
DEFAULT_BLOCKS = dict(o=64, i=64, k=32)
MIN_STEPS_PER_SPLIT = 8
PROGRAMS_PER_SM = 2

_SM_COUNT: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNT:
        _SM_COUNT[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNT[index]


def _fit(limit: int, n: int) -> int:
    return max(16, min(limit, triton.next_power_of_2(max(1, n))))


def launch_weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor,
                              blocks: dict | None = None, split: int | None = None) -> torch.Tensor:
    """Runs the kernel (no op registration involved). ``blocks`` overrides the largest tile
    sides (``o``, ``i``, ``k``); ``split`` forces the number of row splits (default: 1 on the
    CPU interpreter, enough to fill the GPU otherwise)."""
    a3, b3 = reference.batched_rows(a, b, OP)
    reference.check_weights(w, a3, OP)
    acc = tl_dtype(w.dtype)  # TypeError unless float32 / float64
    device = check_device(OP, a3, b3, w)
    B, T, d_in = a3.shape
    d_out = b3.shape[2]
    R = B * T
    if R == 0 or d_in == 0 or d_out == 0:
        return torch.zeros(d_out, d_in, dtype=a3.dtype, device=device)
    cfg = dict(DEFAULT_BLOCKS, **(blocks or {}))
    bo, bi, bk = _fit(cfg["o"], d_out), _fit(cfg["i"], d_in), _fit(cfg["k"], R)
    n_o, n_i = triton.cdiv(d_out, bo), triton.cdiv(d_in, bi)
    max_split = max(1, R // (bk * MIN_STEPS_PER_SPLIT))
    if split is None:
        split = 1 if device.type == "cpu" else max(1, min(max_split, PROGRAMS_PER_SM * _sm_count(device) // (n_o * n_i)))
    split = max(1, min(int(split), triton.cdiv(R, bk)))
    rows_per_split = triton.cdiv(triton.cdiv(R, split), bk) * bk  # whole steps per split
    split = triton.cdiv(R, rows_per_split)
    if split == 1:
        out = torch.empty(d_out, d_in, dtype=a3.dtype, device=device)
    else:
        out = torch.empty(split, d_out, d_in, dtype=w.dtype, device=device)
    _KERNEL.variant()[(n_o, n_i, split)](
        a3, b3, w, out, R, T, d_in, d_out, rows_per_split,
        a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2), w.stride(0),
        ACC=acc, DOT_UPCAST=dot_upcast(a3.dtype),
        ROUND_BF16=round_bf16_in_kernel(a3.dtype),
        ROUND_OUT_BF16=split == 1 and round_bf16_in_kernel(a3.dtype),
        BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk)
    if split == 1:
        return out
    return out.sum(0).to(a3.dtype)


@torch.library.custom_op("engm_fast_triton::weighted_outer_sum", mutates_args=())
def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i b_i^T a_i`` with the Triton kernel, ``w`` in the accumulation dtype; see
    :func:`engm_fast.reference.weighted_outer_sum`."""
    return launch_weighted_outer_sum(a, b, w)


@weighted_outer_sum.register_fake
def _(a, b, w):
    return a.new_empty((b.shape[-1], a.shape[-1]))
