"""Per-example gradients of Conv1d/2d/3d weights.

``g_i = b_i^T a_i`` per group, with ``a_i`` the unfolded input (im2col, ``[T, C_in/G * k]``,
T = output positions) and ``b_i`` the output gradient (``[T, C_out/G]``).

* Norms, direct route (many output positions T, the usual case: ``T (d_in + d_out) > d_in d_out``, see ``ConvWeight._route``): the
  per-example weight gradients of a chunk of examples come from ONE native grouped
  ``convolution_backward`` with the examples folded into the groups (input
  ``[1, n*C_in, *S]``, groups ``n*G``), then their squares are summed. On the 2-core CPU this
  was 3-4x faster than im2col + bmm and 1.5-2.3x the plain weight gradient (B=128, 16->32
  channels at 8x8: 2.3 ms vs 9.7 ms vs 1.0 ms). Chunks hold at most ``_DIRECT_CHUNK_ELEMENTS``
  per-example gradient entries.
* Norms, ghost route (few positions, wide layers): im2col by strided views in chunks of at
  most ``_UNFOLD_CHUNK_ELEMENTS`` (never the whole batch: a full unfold of B=128 at 32x32
  with 64 channels would be 300 MB in float32), then :func:`engm_fast.ops.per_example_sqnorm`.
  ``F.unfold`` is avoided: with 2 threads on a busy 2-core machine it took 450 ms for a
  ``[128, 16, 8, 8]`` input where the strided copy took 10-20 ms.
* The weighted sum ``sum_i w_i g_i`` is the ordinary weight gradient of the convolution with
  the output gradient scaled per example, so it runs the native ``convolution_backward``
  (oneDNN / cuDNN) with only the weight output requested: no unfold at all.

Padding modes other than zeros and ``padding="same"`` are turned into an explicit pad of the
input followed by a convolution with integer padding, exactly as ``nn.ConvNd`` computes them.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .contributions import Contribution, Dense, OuterProduct, _zero_rows
from ..reference import accumulation_dtype

__all__ = ["ConvWeight", "conv_geometry", "unfold_input"]

# 2**24 elements = 64 MiB of float32 unfolded input per chunk.
_UNFOLD_CHUNK_ELEMENTS = 1 << 24
# 2**22 per-example gradient entries = 16 MiB in float32 per direct-route chunk.
_DIRECT_CHUNK_ELEMENTS = 1 << 22
# When all of a layer's per-example gradients fit in 2**24 entries (64 MiB in float32; e.g.
# B=128 of a 64->64 3x3 conv is 4.7M), the direct route computes them in one piece and keeps
# them, so the weighted sum is a [1, B] x [B, P] GEMV instead of a second convolution backward.
_KEEP_PER_EXAMPLE_ELEMENTS = 1 << 24
# Inside the backward, a direct-route layer's per-example gradients replace its input and
# output gradient when they take at most half their memory. At parity it does not pay: the
# grouped convolution's own copies of x and b land next to the backward's peak (measured,
# `engm-fast bench` peak memory: a 32x32 CNN went from 1.10x to 1.21x a plain step's with the
# threshold at 1, and stays at 1.10x with 2; ResNet-18 (width 16, B=32) 2.17x -> 1.15x).
_COMPACT_RATIO = 2


def conv_geometry(module: torch.nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input after any explicit padding the module applies, and the remaining int padding.

    Mirrors ``nn.ConvNd._conv_forward``: non-zero padding modes pad with ``F.pad`` first and
    convolve with padding 0; ``padding="same"`` pads ``dilation*(k-1)`` in total per dim,
    ``total // 2`` on the left and the rest on the right.
    """
    n = len(module.kernel_size)
    if module.padding_mode != "zeros":
        return F.pad(x, module._reversed_padding_repeated_twice, mode=module.padding_mode), (0,) * n
    if module.padding == "same":
        left, extra_right = [], []
        for d, k in zip(module.dilation, module.kernel_size):
            total = d * (k - 1)
            left.append(total // 2)
            extra_right.append(total - 2 * (total // 2))
        if any(extra_right):
            pads = []
            for r in reversed(extra_right):  # F.pad lists the last dim first
                pads += [0, r]
            x = F.pad(x, pads)
        return x, tuple(left)
    if module.padding == "valid":
        return x, (0,) * n
    return x, tuple(module.padding)


def unfold_input(x: torch.Tensor, kernel_size, stride, padding, dilation) -> torch.Tensor:
    """im2col of an N-d (N = 1, 2, 3) batched input: ``[B, C, *S] -> [B, T, C * prod(k)]``.

    Column order is channel-major then kernel offsets, matching ``weight.view(C_out, -1)``.
    """
    n = len(kernel_size)
    B, C = x.shape[:2]
    if any(padding):
        pads = []
        for p in reversed(padding):
            pads += [p, p]
        x = F.pad(x, pads)
    for dim, (k, s, d) in enumerate(zip(kernel_size, stride, dilation)):
        x = x.unfold(2 + dim, d * (k - 1) + 1, s)  # window of the dilated kernel, then subsample
    # x: [B, C, L_1..L_n, W_1..W_n] with W_j = d_j*(k_j-1)+1; keep every d_j-th offset.
    index = (slice(None),) * (2 + n) + tuple(slice(None, None, d) for d in dilation)
    x = x[index]
    perm = (0,) + tuple(range(2, 2 + n)) + (1,) + tuple(range(2 + n, 2 + 2 * n))
    x = x.permute(perm)
    T = 1
    for L in x.shape[1 : 1 + n]:
        T *= L
    return x.reshape(B, T, -1)


class ConvWeight(Contribution):
    """Per-example gradients of a ConvNd weight from one call: input ``x`` and output gradient ``b``."""

    def __init__(self, module: torch.nn.modules.conv._ConvNd, x: torch.Tensor, b: torch.Tensor):
        self.x, self.padding = conv_geometry(module, x)
        self.b = b
        self.weight = module.weight
        self.kernel_size = tuple(module.kernel_size)
        self.stride = tuple(module.stride)
        self.dilation = tuple(module.dilation)
        self.groups = module.groups
        self.shape = module.weight.shape
        self.batch_size = x.shape[0]
        self._kept: torch.Tensor | None = None  # [B, P] per-example gradients, when small

    def _rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unfolded ``a`` and ``b`` of examples ``start:stop`` as ``[n, T, G, d]``."""
        a = unfold_input(self.x[start:stop], self.kernel_size, self.stride, self.padding, self.dilation)
        n, T = a.shape[:2]
        b = self.b[start:stop].reshape(n, self.b.shape[1], T).transpose(1, 2)
        G = self.groups
        return a.reshape(n, T, G, a.shape[2] // G), b.reshape(n, T, G, b.shape[2] // G)

    def _route(self) -> str:
        """``"ghost"`` when its FLOPs, ``T^2 (d_in + d_out)`` per example, are at most the
        direct route's ``T d_in d_out``; else ``"direct"``.

        Not the op's ``choose_sqnorm_route`` rule (ghost iff ``2 T^2 <= d_in d_out``): for a
        convolution the ghost route also pays the im2col copy of the input, and the direct
        route is a native grouped convolution. ResNet-18's 128->128 3x3 convs at 16x16
        (T=256, d_in=1152, d_out=128, B=128) are ghost by the op's rule, and took 151 ms for
        their norms that way against 63 ms direct (a plain weight gradient: 36 ms); every other
        ResNet-18 layer gets the same route under both rules (measured on the 2-core CPU).
        """
        T = self.b[0, 0].numel()
        d_in = (self.x.shape[1] // self.groups) * math.prod(self.kernel_size)
        d_out = self.b.shape[1] // self.groups
        return "ghost" if T * (d_in + d_out) <= d_in * d_out else "direct"

    def sqnorms(self) -> torch.Tensor:
        out = torch.empty(self.batch_size, dtype=accumulation_dtype(self.x.dtype), device=self.x.device)
        if self._route() == "direct":
            if self.batch_size * self.shape.numel() <= _KEEP_PER_EXAMPLE_ELEMENTS:
                self._kept = self._grouped_per_example(0, self.batch_size).reshape(self.batch_size, -1)
                return self._kept.to(out.dtype).pow(2).sum(1)
            chunk = max(1, _DIRECT_CHUNK_ELEMENTS // self.shape.numel())
            for start in range(0, self.batch_size, chunk):
                stop = min(self.batch_size, start + chunk)
                g = self._grouped_per_example(start, stop)
                out[start:stop] = g.reshape(stop - start, -1).to(out.dtype).pow(2).sum(1)
            return out
        per_example = self.x[0].numel() * math.prod(self.kernel_size) + self.b[0].numel()
        chunk = max(1, _UNFOLD_CHUNK_ELEMENTS // max(1, per_example))
        for start in range(0, self.batch_size, chunk):
            stop = min(self.batch_size, start + chunk)
            out[start:stop] = OuterProduct(*self._rows(start, stop), self.shape).sqnorms()
        return out

    def compact(self) -> Contribution:
        """Materialized per-example gradients (a :class:`Dense`) when the direct route would be
        taken anyway and they take at most half the memory of the input and output gradient
        they replace (``_COMPACT_RATIO``); otherwise ``self``.

        For a 32x32 CNN's 3->32 and 32->64 3x3 convs at B=64 the per-example gradients are 3%
        and 75% of ``x`` plus ``b`` (the first is compacted); ResNet-18's 64->64 convs at
        B=128, 28% (compacted); its 128->128 convs (18.9M entries against 8.4M) stay factored.
        """
        if self._route() != "direct" or self._kept is not None:
            return self
        if _COMPACT_RATIO * self.batch_size * self.shape.numel() > self.x.numel() + self.b.numel():
            return self
        return Dense(self._grouped_per_example(0, self.batch_size))

    def _grouped_per_example(self, start: int, stop: int) -> torch.Tensor:
        """Per-example weight gradients ``[n, *weight.shape]`` of examples ``start:stop``."""
        n = stop - start
        x = self.x[start:stop]
        b = self.b[start:stop]
        C_in, C_out = x.shape[1], b.shape[1]
        weight_shape = (n * C_out, C_in // self.groups) + self.kernel_size
        _, g, _ = torch.ops.aten.convolution_backward(
            b.reshape((1, n * C_out) + b.shape[2:]), x.reshape((1, n * C_in) + x.shape[2:]),
            x.new_empty(weight_shape),  # only its shape is read when just grad_weight is asked
            None, self.stride, self.padding, self.dilation, False, (0,) * len(self.kernel_size),
            n * self.groups, (False, True, False),
        )
        return g.view((n,) + tuple(self.shape))

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        if self._kept is not None:
            return torch.mm(w.to(self._kept.dtype).unsqueeze(0), self._kept).view(self.shape)
        scaled = self.b * w.to(self.b.dtype).view((-1,) + (1,) * (self.b.dim() - 1))
        n = len(self.kernel_size)
        # Only the weight's shape is read; a tensor in x's dtype keeps the op's dtypes consistent
        # under autocast (x and b in bf16, the parameter in float32).
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            scaled, self.x, self.x.new_empty(self.weight.shape), None, self.stride, self.padding, self.dilation,
            False, (0,) * n, self.groups, (False, True, False),
        )
        return grad_weight

    def as_outer_product(self) -> OuterProduct:
        return OuterProduct(*self._rows(0, self.batch_size), self.shape)

    def per_example(self) -> torch.Tensor:
        return self._grouped_per_example(0, self.batch_size)

    def zero_examples(self, mask: torch.Tensor) -> "ConvWeight":
        clone = object.__new__(ConvWeight)
        clone.__dict__.update(self.__dict__)
        clone.x, clone.b = _zero_rows(self.x, mask), _zero_rows(self.b, mask)
        clone._kept = None if self._kept is None else _zero_rows(self._kept, mask)
        return clone
