"""Per-example gradients of Conv1d/2d/3d weights.

``g_i = b_i^T a_i`` per group, with ``a_i`` the unfolded input (im2col, ``[T, C_in/G * k]``,
T = output positions) and ``b_i`` the output gradient (``[T, C_out/G]``).

* Norms unfold the input in chunks of examples (at most ``_UNFOLD_CHUNK_ELEMENTS`` per chunk)
  and hand each chunk to :func:`engm_fast.ops.per_example_sqnorm`, so memory stays bounded
  whatever the batch size (a full unfold of a CIFAR-sized batch, B=128 at 32x32 with 64
  channels, would be 300 MB in float32).
* The weighted sum ``sum_i w_i g_i`` is the ordinary weight gradient of the convolution with
  the output gradient scaled per example, so it runs the native ``convolution_backward``
  (oneDNN / cuDNN) with only the weight output requested: no unfold at all.

Padding modes other than zeros and ``padding="same"`` are turned into an explicit pad of the
input followed by a convolution with integer padding, exactly as ``nn.ConvNd`` computes them.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .contributions import Contribution, OuterProduct, _zero_rows
from ..reference import accumulation_dtype

__all__ = ["ConvWeight", "conv_geometry", "unfold_input"]

# 2**24 elements = 64 MiB of float32 unfolded input per chunk.
_UNFOLD_CHUNK_ELEMENTS = 1 << 24


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
    if n == 2:
        cols = F.unfold(x, kernel_size, dilation=dilation, padding=padding, stride=stride)
        return cols.transpose(1, 2)
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

    def _rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unfolded ``a`` and ``b`` of examples ``start:stop`` as ``[n, T, G, d]``."""
        a = unfold_input(self.x[start:stop], self.kernel_size, self.stride, self.padding, self.dilation)
        n, T = a.shape[:2]
        b = self.b[start:stop].reshape(n, self.b.shape[1], T).transpose(1, 2)
        G = self.groups
        return a.reshape(n, T, G, a.shape[2] // G), b.reshape(n, T, G, b.shape[2] // G)

    def _chunk(self) -> int:
        per_example = self.x[0].numel() * max(1, int(torch.tensor(self.kernel_size).prod()))
        per_example = max(per_example, self.b[0].numel() * max(1, self.x.shape[1]))
        return max(1, _UNFOLD_CHUNK_ELEMENTS // max(1, per_example))

    def sqnorms(self) -> torch.Tensor:
        out = torch.empty(self.batch_size, dtype=accumulation_dtype(self.x.dtype), device=self.x.device)
        chunk = self._chunk()
        for start in range(0, self.batch_size, chunk):
            stop = min(self.batch_size, start + chunk)
            out[start:stop] = OuterProduct(*self._rows(start, stop), self.shape).sqnorms()
        return out

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        scaled = self.b * w.to(self.b.dtype).view((-1,) + (1,) * (self.b.dim() - 1))
        n = len(self.kernel_size)
        _, grad_weight, _ = torch.ops.aten.convolution_backward(
            scaled, self.x, self.weight, None, self.stride, self.padding, self.dilation,
            False, (0,) * n, self.groups, (False, True, False),
        )
        return grad_weight

    def as_outer_product(self) -> OuterProduct:
        return OuterProduct(*self._rows(0, self.batch_size), self.shape)

    def per_example(self) -> torch.Tensor:
        return self.as_outer_product().per_example()

    def zero_examples(self, mask: torch.Tensor) -> "ConvWeight":
        clone = object.__new__(ConvWeight)
        clone.__dict__.update(self.__dict__)
        clone.x, clone.b = _zero_rows(self.x, mask), _zero_rows(self.b, mask)
        return clone
