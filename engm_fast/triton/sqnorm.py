"""Triton ``per_example_sqnorm``: ``n_i^2 = ||b_i^T a_i||_F^2`` for every example (kernels,
launcher and the registered op ``engm_fast_triton::per_example_sqnorm``).

Semantics are :func:`engm_fast.reference.per_example_sqnorm`: ``a`` is ``[B, T, d_in]`` or
``[B, d_in]``, ``b`` likewise with ``d_out``; the result is ``[B]`` in the accumulation dtype
the caller passes, along the route the caller passes (``"ghost"`` or ``"direct"``):
:func:`engm_fast.ops.per_example_sqnorm` decides both (:mod:`engm_fast.reference`). Three
kernels implement the routes:

* rows (ghost at ``T == 1``): ``||a_i||^2 ||b_i||^2``; one program per block of
  examples sums squares over column blocks.
* direct: program ``(i, tile)`` computes one ``BLOCK_O x BLOCK_I`` tile of ``g_i = b_i^T a_i``
  in registers, accumulated over ``T`` with ``tl.dot``, and writes only the tile's sum of
  squares; the ``[B, n_tiles]`` partials are summed afterwards (deterministic, no atomics).
  ``g_i`` itself never reaches memory.
* ghost: program ``(i, pair)`` computes one tile pair of the Gram matrices ``a_i a_i^T`` and
  ``b_i b_i^T`` (both ``BLOCK_T x BLOCK_T``, accumulated over ``d`` with ``tl.dot``) and writes
  ``sum(Ga * Gb)``. Only tiles of the upper triangle run (the Gram matrices are symmetric);
  off-diagonal tiles count twice.

Accumulation is in the accumulation dtype (float32 for 16- and 32-bit inputs, float64 for
float64 inputs, as the op wrapper passes it): loaded 16-bit values feed ``tl.dot`` as they are
(exact products into a float32 accumulator) and are converted to the accumulation dtype before
any other arithmetic (fp16 squares overflow above 256). float32 dots use
``input_precision="ieee"`` (no TF32): the reference is exact float32 arithmetic. float64 inputs
use ``tl.dot`` on float64 operands with a float64 accumulator (accepted by Triton's ``tl.dot``;
what has run on which hardware is in the README's Limitations).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import DualKernel, check_device, dot_upcast, tl_dtype

__all__ = ["per_example_sqnorm", "launch_per_example_sqnorm"]

OP = "per_example_sqnorm"


def _rows_kernel(a_ptr, b_ptr, out_ptr, B, d_in, d_out, sa_b, sa_d, sb_b, sb_d,
                 ACC: tl.constexpr, BLOCK_B: tl.constexpr, BLOCK_D: tl.constexpr):
    rows = tl.program_id(0) * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)  # rows * stride can pass 2^31 on large batches
    cols = tl.arange(0, BLOCK_D)
    sum_a = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
    for d0 in range(0, d_in, BLOCK_D):
        c = d0 + cols
        x = tl.load(a_ptr + rows64[:, None] * sa_b + c[None, :] * sa_d,
                    mask=rmask[:, None] & (c[None, :] < d_in), other=0.0).to(ACC)
        sum_a += x * x
    sum_b = tl.zeros([BLOCK_B, BLOCK_D], dtype=ACC)
    for d0 in range(0, d_out, BLOCK_D):
        c = d0 + cols
        y = tl.load(b_ptr + rows64[:, None] * sb_b + c[None, :] * sb_d,
                    mask=rmask[:, None] & (c[None, :] < d_out), other=0.0).to(ACC)
        sum_b += y * y
    tl.store(out_ptr + rows, tl.sum(sum_a, axis=1) * tl.sum(sum_b, axis=1), mask=rmask)


def _direct_kernel(a_ptr, b_ptr, part_ptr, T, d_in, d_out, n_tiles_i,
                   sa_b, sa_t, sa_d, sb_b, sb_t, sb_d,
                   ACC: tl.constexpr, DOT_UPCAST: tl.constexpr,
                   BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_T: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    tile = tl.program_id(1)
    n_tiles = tl.num_programs(1)
    o = (tile // n_tiles_i) * BLOCK_O + tl.arange(0, BLOCK_O)
    c = (tile % n_tiles_i) * BLOCK_I + tl.arange(0, BLOCK_I)
    omask = o < d_out
    cmask = c < d_in
    a_base = a_ptr + i * sa_b
    b_base = b_ptr + i * sb_b
    g = tl.zeros([BLOCK_O, BLOCK_I], dtype=ACC)
    for t0 in range(0, T, BLOCK_T):
        t = t0 + tl.arange(0, BLOCK_T)
        tmask = t < T
        # b_i^T tile [BLOCK_O, BLOCK_T] read transposed from b_i [T, d_out]
        bt = tl.load(b_base + t[None, :] * sb_t + o[:, None] * sb_d,
                     mask=omask[:, None] & tmask[None, :], other=0.0)
        at = tl.load(a_base + t[:, None] * sa_t + c[None, :] * sa_d,
                     mask=tmask[:, None] & cmask[None, :], other=0.0)
        if DOT_UPCAST:
            bt = bt.to(tl.float32)
            at = at.to(tl.float32)
        g = tl.dot(bt, at, g, input_precision="ieee", out_dtype=ACC)
    tl.store(part_ptr + i * n_tiles + tile, tl.sum(tl.sum(g * g, axis=1), axis=0))


def _ghost_kernel(a_ptr, b_ptr, pairs_ptr, part_ptr, T, d_in, d_out,
                  sa_b, sa_t, sa_d, sb_b, sb_t, sb_d,
                  ACC: tl.constexpr, DOT_UPCAST: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_DA: tl.constexpr, BLOCK_DB: tl.constexpr):
    i = tl.program_id(0).to(tl.int64)
    pair = tl.program_id(1)
    n_pairs = tl.num_programs(1)
    tt = tl.load(pairs_ptr + pair)  # row tile <= column tile (upper triangle)
    ss = tl.load(pairs_ptr + n_pairs + pair)
    t = tt * BLOCK_T + tl.arange(0, BLOCK_T)
    s = ss * BLOCK_T + tl.arange(0, BLOCK_T)
    tmask = t < T
    smask = s < T
    a_base = a_ptr + i * sa_b
    b_base = b_ptr + i * sb_b
    ga = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC)
    for d0 in range(0, d_in, BLOCK_DA):
        d = d0 + tl.arange(0, BLOCK_DA)
        dmask = d < d_in
        x = tl.load(a_base + t[:, None] * sa_t + d[None, :] * sa_d,
                    mask=tmask[:, None] & dmask[None, :], other=0.0)
        y = tl.load(a_base + s[None, :] * sa_t + d[:, None] * sa_d,  # a_s^T [BLOCK_DA, BLOCK_T]
                    mask=dmask[:, None] & smask[None, :], other=0.0)
        if DOT_UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        ga = tl.dot(x, y, ga, input_precision="ieee", out_dtype=ACC)
    gb = tl.zeros([BLOCK_T, BLOCK_T], dtype=ACC)
    for d0 in range(0, d_out, BLOCK_DB):
        d = d0 + tl.arange(0, BLOCK_DB)
        dmask = d < d_out
        x = tl.load(b_base + t[:, None] * sb_t + d[None, :] * sb_d,
                    mask=tmask[:, None] & dmask[None, :], other=0.0)
        y = tl.load(b_base + s[None, :] * sb_t + d[:, None] * sb_d,
                    mask=dmask[:, None] & smask[None, :], other=0.0)
        if DOT_UPCAST:
            x = x.to(tl.float32)
            y = y.to(tl.float32)
        gb = tl.dot(x, y, gb, input_precision="ieee", out_dtype=ACC)
    total = tl.sum(tl.sum(ga * gb, axis=1), axis=0)
    total = tl.where(ss > tt, total * 2.0, total)
    tl.store(part_ptr + i * n_pairs + pair, total)


_ROWS = DualKernel(_rows_kernel)
_DIRECT = DualKernel(_direct_kernel)
_GHOST = DualKernel(_ghost_kernel)

# Largest tiles (GPU defaults), shrunk to the problem (never below 16, the smallest tl.dot
# operand side): a 64 x 64 float32 tile of g_i is 16 KiB of registers over 4 warps (32 per
# thread); BLOCK_T = 32 steps of T feed the dot with two 64 x 32 operand tiles. Ghost: two
# 64 x 64 Gram tiles in registers, d in steps of 32.
DEFAULT_BLOCKS = dict(rows_b=16, rows_d=128, direct_o=64, direct_i=64, direct_t=32,
                      ghost_t=64, ghost_d=32)


def _fit(limit: int, n: int) -> int:
    """A power-of-two block side for an extent ``n``: at least 16, at most ``limit``."""
    return max(16, min(limit, triton.next_power_of_2(max(1, n))))


def launch_per_example_sqnorm(a: torch.Tensor, b: torch.Tensor, mode: str, acc_dtype: torch.dtype,
                              blocks: dict | None = None) -> torch.Tensor:
    """Runs the kernels (no op registration involved): route ``mode`` (``"ghost"`` or
    ``"direct"``), sums in ``acc_dtype``; ``blocks`` overrides the largest tile sides of
    :data:`DEFAULT_BLOCKS` (tests use small tiles to exercise multi-tile loops)."""
    if mode not in reference.SQNORM_ROUTES:
        raise ValueError(f"{OP}: mode must be 'ghost' or 'direct' (engm_fast.ops.per_example_sqnorm resolves "
                         f"'auto'), got {mode!r}")
    a3, b3 = reference.batched_rows(a, b, OP)
    acc = tl_dtype(acc_dtype)
    device = check_device(OP, a3, b3)
    cfg = dict(DEFAULT_BLOCKS, **(blocks or {}))
    B, T, d_in = a3.shape
    d_out = b3.shape[2]
    if B == 0 or T == 0 or d_in == 0 or d_out == 0:
        return torch.zeros(B, dtype=acc_dtype, device=device)
    upcast = dot_upcast(a3.dtype)
    route = "rows" if T == 1 and mode == "ghost" else mode  # 1 x 1 Gram matrices: ||a_i||^2 ||b_i||^2
    if route == "rows":
        out = torch.empty(B, dtype=acc_dtype, device=device)
        block_b = cfg["rows_b"]
        block_d = _fit(cfg["rows_d"], max(d_in, d_out))
        _ROWS.variant()[(triton.cdiv(B, block_b),)](
            a3, b3, out, B, d_in, d_out, a3.stride(0), a3.stride(2), b3.stride(0), b3.stride(2),
            ACC=acc, BLOCK_B=block_b, BLOCK_D=block_d)
        return out
    if route == "direct":
        bo, bi, bt = _fit(cfg["direct_o"], d_out), _fit(cfg["direct_i"], d_in), _fit(cfg["direct_t"], T)
        n_o, n_i = triton.cdiv(d_out, bo), triton.cdiv(d_in, bi)
        part = torch.empty(B, n_o * n_i, dtype=acc_dtype, device=device)
        _DIRECT.variant()[(B, n_o * n_i)](
            a3, b3, part, T, d_in, d_out, n_i,
            a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2),
            ACC=acc, DOT_UPCAST=upcast, BLOCK_O=bo, BLOCK_I=bi, BLOCK_T=bt)
        return part.sum(1)
    bt = _fit(cfg["ghost_t"], T)
    n_t = triton.cdiv(T, bt)
    pairs = torch.triu_indices(n_t, n_t, device=device).to(torch.int32).contiguous()  # [2, n_pairs]
    n_pairs = pairs.shape[1]
    part = torch.empty(B, n_pairs, dtype=acc_dtype, device=device)
    _GHOST.variant()[(B, n_pairs)](
        a3, b3, pairs, part, T, d_in, d_out,
        a3.stride(0), a3.stride(1), a3.stride(2), b3.stride(0), b3.stride(1), b3.stride(2),
        ACC=acc, DOT_UPCAST=upcast, BLOCK_T=bt,
        BLOCK_DA=_fit(cfg["ghost_d"], d_in), BLOCK_DB=_fit(cfg["ghost_d"], d_out))
    return part.sum(1)


@torch.library.custom_op("engm_fast_triton::per_example_sqnorm", mutates_args=())
def per_example_sqnorm(a: torch.Tensor, b: torch.Tensor, mode: str, acc_dtype: torch.dtype) -> torch.Tensor:
    """``||b_i^T a_i||_F^2`` per example with the Triton kernels, by route ``mode`` (``"ghost"`` or
    ``"direct"``) in ``acc_dtype``; see :func:`engm_fast.reference.per_example_sqnorm`."""
    return launch_per_example_sqnorm(a, b, mode, acc_dtype)


@per_example_sqnorm.register_fake
def _(a, b, mode, acc_dtype):
    return a.new_empty((a.shape[0],), dtype=acc_dtype)
