"""Triton ``sgd_momentum_update_``: one fused torch.optim.SGD step over lists of tensors, in
place (kernel, launcher and the registered op ``engm_fast_triton::sgd_momentum_update_``).

Semantics are :func:`engm_fast.reference.sgd_momentum_update_`::

    d = grad + weight_decay * param ;  buf = d (first_step) or momentum * buf + (1 - dampening) * d
    d = d + momentum * buf (nesterov) or buf ;  param -= lr * d

Each element is read once (param, grad, buffer) and written once (param, buffer), with the
arithmetic in the accumulation dtype (:func:`engm_fast.reference.accumulation_dtype`: float32,
float64 for float64 tensors); a 16-bit param and buffer are rounded once when stored, and the
step uses the buffer as stored: the contract of :mod:`engm_fast.reference`.

Launches: one kernel per tensor, looped over in Python (not a single launch). One launch over
all tensors needs pointer tables (int64 addresses cast to typed pointers inside the kernel,
one launch per dtype, a block-to-tensor map); it was not written because it could not be
validated where it matters: this work had no GPU, and the interpreter copies only tensors
passed as kernel arguments to the host, so a table of CUDA addresses is untestable on the CPU.
The price of per-tensor launches is Triton's Python-side launch overhead once per tensor
(typically 10-30 us, not measured here): about 1-3 ms per step for a model with ~100
parameter tensors.

The hyperparameters reach the kernel as a small tensor in the accumulation dtype, not as
scalar arguments: Triton passes a Python float as float32, which would round lr = 0.1 to
0.100000001 for float64 parameters.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .. import reference
from ._common import DualKernel, check_device, round_bf16_in_kernel, tl_dtype

__all__ = ["sgd_momentum_update_", "launch_sgd_momentum_update_"]

OP = "sgd_momentum_update_"


def _sgd_kernel(p_ptr, g_ptr, buf_ptr, coef_ptr, n,
                ACC: tl.constexpr, HAS_MOMENTUM: tl.constexpr, HAS_WD: tl.constexpr,
                NESTEROV: tl.constexpr, FIRST_STEP: tl.constexpr, ROUND_BF16: tl.constexpr,
                BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    lr = tl.load(coef_ptr)
    p = tl.load(p_ptr + offs, mask=mask, other=0.0).to(ACC)
    d = tl.load(g_ptr + offs, mask=mask, other=0.0).to(ACC)
    if HAS_WD:
        d = d + tl.load(coef_ptr + 3) * p
    if HAS_MOMENTUM:
        mu = tl.load(coef_ptr + 1)
        if FIRST_STEP:
            buf = d
        else:
            keep = tl.load(coef_ptr + 2)  # 1 - dampening
            buf = mu * tl.load(buf_ptr + offs, mask=mask, other=0.0).to(ACC) + keep * d
        if ROUND_BF16:  # interpreter only: round to nearest even as compiled kernels do (_common)
            bits = (buf.to(tl.uint32, bitcast=True) + 0x7FFF + ((buf.to(tl.uint32, bitcast=True) >> 16) & 1)) & 0xFFFF0000
            buf = bits.to(tl.float32, bitcast=True)
        stored = buf.to(buf_ptr.dtype.element_ty)
        tl.store(buf_ptr + offs, stored, mask=mask)
        stored = stored.to(ACC)
        if NESTEROV:
            d = d + mu * stored
        else:
            d = stored
    p = p - lr * d
    if ROUND_BF16:
        bits = (p.to(tl.uint32, bitcast=True) + 0x7FFF + ((p.to(tl.uint32, bitcast=True) >> 16) & 1)) & 0xFFFF0000
        p = bits.to(tl.float32, bitcast=True)
    tl.store(p_ptr + offs, p.to(p_ptr.dtype.element_ty), mask=mask)


_KERNEL = DualKernel(_sgd_kernel)

# 1024 elements per program (4 warps x 32 threads x 8 elements): 8 contiguous elements per
# thread, 16-32 byte vector loads; the kernel is bandwidth-bound, larger blocks gain nothing.
BLOCK = 1024


def _dense_alike(p: torch.Tensor, *others: torch.Tensor) -> bool:
    """p's elements fill one block of memory (contiguous or channels_last) and the others lay
    out their elements exactly as p does, so one flat index addresses all of them."""
    dense = p.is_contiguous() or (
        p.dim() == 4 and p.is_contiguous(memory_format=torch.channels_last)) or (
        p.dim() == 5 and p.is_contiguous(memory_format=torch.channels_last_3d))
    return dense and all(t.stride() == p.stride() for t in others)


def launch_sgd_momentum_update_(params: list[torch.Tensor], grads: list[torch.Tensor],
                                momentum_buffers: list[torch.Tensor], lr: float, momentum: float,
                                dampening: float, weight_decay: float, nesterov: bool,
                                first_step: bool, block: int = BLOCK) -> None:
    """Validates the lists (:func:`engm_fast.reference.check_update_args`) and runs one kernel per
    tensor (no op registration involved)."""
    reference.check_update_args(params, grads, momentum_buffers, momentum)
    has_momentum = momentum != 0
    triples = [(p, g, momentum_buffers[i] if has_momentum else None) for i, (p, g) in enumerate(zip(params, grads))]
    if not triples:
        return
    device = check_device(OP, *[t for triple in triples for t in triple if t is not None])
    coefs = {}  # one coefficient tensor per accumulation dtype
    for p, g, buf in triples:
        if p.numel() == 0:
            continue
        acc = reference.accumulation_dtype(p.dtype)
        if acc not in coefs:
            coefs[acc] = torch.tensor([lr, momentum, 1.0 - dampening, weight_decay], dtype=acc, device=device)
        others = (g,) if buf is None else (g, buf)
        if _dense_alike(p, *others):
            p_w, g_w, buf_w = p, g, buf
        else:  # update contiguous copies, written back below
            p_w, g_w = p.contiguous(), g.contiguous()
            buf_w = None if buf is None else buf.contiguous()
        _KERNEL.variant()[(triton.cdiv(p.numel(), block),)](
            p_w, g_w, p_w if buf_w is None else buf_w, coefs[acc], p.numel(),
            ACC=tl_dtype(acc), HAS_MOMENTUM=has_momentum, HAS_WD=weight_decay != 0,
            NESTEROV=bool(nesterov), FIRST_STEP=bool(first_step),
            ROUND_BF16=round_bf16_in_kernel(p.dtype), BLOCK=block)
        if p_w is not p:
            p.copy_(p_w)
        if buf_w is not None and buf_w is not buf:
            buf.copy_(buf_w)


@torch.library.custom_op("engm_fast_triton::sgd_momentum_update_", mutates_args=("params", "momentum_buffers"))
def sgd_momentum_update_(params: list[torch.Tensor], grads: list[torch.Tensor],
                         momentum_buffers: list[torch.Tensor], lr: float, momentum: float,
                         dampening: float, weight_decay: float, nesterov: bool, first_step: bool) -> None:
    """One fused SGD-momentum step with the Triton kernel; see
    :func:`engm_fast.reference.sgd_momentum_update_`."""
    launch_sgd_momentum_update_(params, grads, momentum_buffers, lr, momentum, dampening,
                                weight_decay, nesterov, first_step)


@sgd_momentum_update_.register_fake
def _(params, grads, momentum_buffers, lr, momentum, dampening, weight_decay, nesterov, first_step):
    return None
