"""Pure-PyTorch definitions of every engm_fast op: the specification the kernels and tests use.

Notation (DESIGN.md section 1). For one layer call, example ``i`` has input activations
``a_i`` of shape ``[T, d_in]`` and output gradient ``b_i`` of shape ``[T, d_out]``; its
gradient of the weight is ``g_i = b_i^T a_i`` (``[d_out, d_in]``).

* ``per_example_sqnorm(a, b, mode)`` -> ``||g_i||_F^2`` for every ``i``.
* ``weighted_outer_sum(a, b, w)`` -> ``sum_i w_i g_i``.

``a`` is ``[B, T, d_in]`` or ``[B, d_in]`` (T = 1), ``b`` likewise with ``d_out``.
Squared norms accumulate in float32 for 16- and 32-bit inputs (fp16 squares overflow) and in
float64 for float64 inputs, and are returned in that accumulation dtype.
"""
from __future__ import annotations

import torch

__all__ = [
    "per_example_sqnorm",
    "weighted_outer_sum",
    "sgd_momentum_update_",
    "choose_sqnorm_route",
    "accumulation_dtype",
    "SQNORM_MODES",
]

SQNORM_MODES = ("auto", "ghost", "direct")

# The direct route materializes per-example gradients of a chunk of examples; this bounds a
# chunk to 2**22 elements (16 MiB in float32) whatever B is, so memory never grows with
# B x d_out x d_in.
_DIRECT_CHUNK_ELEMENTS = 1 << 22


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other floating dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _as_batched_rows(a: torch.Tensor, b: torch.Tensor, op: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Checks shapes and returns ``a`` and ``b`` as ``[B, T, d]``."""
    if not isinstance(a, torch.Tensor) or not isinstance(b, torch.Tensor):
        raise TypeError(f"{op}: a and b must be tensors, got {type(a).__name__} and {type(b).__name__}")
    if a.dim() not in (2, 3) or b.dim() != a.dim():
        raise ValueError(
            f"{op}: a and b must both be [B, T, d] or both [B, d]; got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if a.shape[0] != b.shape[0] or (a.dim() == 3 and a.shape[1] != b.shape[1]):
        raise ValueError(
            f"{op}: a and b must agree in B (and T); got a {tuple(a.shape)} and b {tuple(b.shape)}"
        )
    if not a.is_floating_point() or a.dtype != b.dtype:
        raise TypeError(f"{op}: a and b must share one floating dtype; got {a.dtype} and {b.dtype}")
    if a.device != b.device:
        raise ValueError(f"{op}: a and b are on different devices ({a.device}, {b.device})")
    if a.dim() == 2:
        return a.unsqueeze(1), b.unsqueeze(1)
    return a, b


def choose_sqnorm_route(T: int, d_in: int, d_out: int) -> str:
    """The cheaper exact route for ``||b_i^T a_i||^2``.

    ghost costs ``O(T^2 (d_in + d_out))`` per example, direct ``O(T d_in d_out)``; the usual
    book-keeping rule picks ghost when ``2 T^2 <= d_in d_out``. T = 1 is ghost (row norms).
    """
    return "ghost" if 2 * T * T <= d_in * d_out else "direct"


def per_example_sqnorm(a: torch.Tensor, b: torch.Tensor, mode: str = "auto") -> torch.Tensor:
    """Squared Frobenius norm of each example's ``b_i^T a_i``, without materializing all of them.

    Args:
        a: ``[B, T, d_in]`` or ``[B, d_in]`` layer inputs.
        b: ``[B, T, d_out]`` or ``[B, d_out]`` output gradients, same dtype and device.
        mode: ``"ghost"`` (Gram matrices, ``sum_{t,s} (a_t.a_s)(b_t.b_s)``), ``"direct"``
            (per-example product in bounded chunks) or ``"auto"`` (:func:`choose_sqnorm_route`).

    Returns:
        ``[B]`` tensor in :func:`accumulation_dtype` of the inputs.

    Example:
        >>> a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
        >>> n2 = per_example_sqnorm(a, b)
        >>> torch.allclose(n2, torch.einsum("bto,bti->boi", b, a).pow(2).sum((1, 2)))
        True
    """
    if mode not in SQNORM_MODES:
        raise ValueError(f"per_example_sqnorm: mode must be one of {SQNORM_MODES}, got {mode!r}")
    a3, b3 = _as_batched_rows(a, b, "per_example_sqnorm")
    acc = accumulation_dtype(a3.dtype)
    B, T, d_in = a3.shape
    d_out = b3.shape[2]
    if B == 0:
        return torch.zeros(0, dtype=acc, device=a3.device)
    a3, b3 = a3.to(acc), b3.to(acc)
    if T == 1 and mode != "direct":
        # ||b a^T||^2 = ||a||^2 ||b||^2: the Gram matrices are 1 x 1.
        return a3.pow(2).sum((1, 2)) * b3.pow(2).sum((1, 2))
    if mode == "auto":
        mode = choose_sqnorm_route(T, d_in, d_out)
    if mode == "ghost":
        gram_a = torch.bmm(a3, a3.transpose(1, 2))
        gram_b = torch.bmm(b3, b3.transpose(1, 2))
        return (gram_a * gram_b).sum((1, 2))
    out = torch.empty(B, dtype=acc, device=a3.device)
    chunk = max(1, _DIRECT_CHUNK_ELEMENTS // max(1, d_in * d_out))
    for start in range(0, B, chunk):
        stop = min(B, start + chunk)
        g = torch.bmm(b3[start:stop].transpose(1, 2), a3[start:stop])
        out[start:stop] = g.pow(2).sum((1, 2))
    return out


def weighted_outer_sum(a: torch.Tensor, b: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i b_i^T a_i`` as one GEMM with the weight folded into ``b``.

    Args:
        a: ``[B, T, d_in]`` or ``[B, d_in]``.
        b: ``[B, T, d_out]`` or ``[B, d_out]``.
        w: ``[B]`` per-example weights (any floating dtype; applied in ``b``'s dtype).

    Returns:
        ``[d_out, d_in]`` in the dtype of ``a``.

    Example:
        >>> a, b, w = torch.randn(4, 3, 5), torch.randn(4, 3, 2), torch.rand(4)
        >>> g = weighted_outer_sum(a, b, w)
        >>> torch.allclose(g, torch.einsum("b,bto,bti->oi", w, b, a), atol=1e-5)
        True
    """
    a3, b3 = _as_batched_rows(a, b, "weighted_outer_sum")
    if not isinstance(w, torch.Tensor) or w.dim() != 1 or w.shape[0] != a3.shape[0]:
        shape = tuple(w.shape) if isinstance(w, torch.Tensor) else type(w).__name__
        raise ValueError(f"weighted_outer_sum: w must be [B] = [{a3.shape[0]}], got {shape}")
    if w.device != a3.device:
        raise ValueError(f"weighted_outer_sum: w is on {w.device}, a and b on {a3.device}")
    B, T, d_in = a3.shape
    d_out = b3.shape[2]
    bw = (b3 * w.to(b3.dtype).view(B, 1, 1)).reshape(B * T, d_out)
    return torch.mm(bw.t(), a3.reshape(B * T, d_in))


@torch.no_grad()
def sgd_momentum_update_(params: list[torch.Tensor], grads: list[torch.Tensor], momentum_buffers: list[torch.Tensor],
                         lr: float, momentum: float, dampening: float, weight_decay: float, nesterov: bool,
                         first_step: bool) -> None:
    """One ``torch.optim.SGD`` step over lists of tensors, in place (params and buffers).

    ``momentum_buffers`` is empty when ``momentum == 0``, else one tensor per parameter; with
    ``first_step`` the buffers are set to the first gradient (as SGD does when it creates them).

    Example:
        >>> p, g, buf = [torch.ones(2)], [torch.full((2,), 0.5)], [torch.zeros(2)]
        >>> sgd_momentum_update_(p, g, buf, lr=0.1, momentum=0.9, dampening=0.0,
        ...                      weight_decay=0.0, nesterov=False, first_step=True)
        >>> p[0]
        tensor([0.9500, 0.9500])
    """
    if len(params) != len(grads) or (momentum != 0 and len(momentum_buffers) != len(params)):
        raise ValueError(
            f"sgd_momentum_update_: got {len(params)} params, {len(grads)} grads and "
            f"{len(momentum_buffers)} momentum buffers (buffers: one per param when momentum != 0)"
        )
    for i, (p, g) in enumerate(zip(params, grads)):
        if p.shape != g.shape:
            raise ValueError(f"sgd_momentum_update_: param {i} has shape {tuple(p.shape)}, grad {tuple(g.shape)}")
        d = g if weight_decay == 0 else g.add(p, alpha=weight_decay)
        if momentum != 0:
            buf = momentum_buffers[i]
            if first_step:
                buf.copy_(d)
            else:
                buf.mul_(momentum).add_(d, alpha=1 - dampening)
            d = d.add(buf, alpha=momentum) if nesterov else buf
        p.add_(d, alpha=-lr)
