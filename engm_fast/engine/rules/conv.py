"""Convolutions: ``nn.Conv1d/2d/3d`` and ``nn.ConvTranspose1d/2d/3d`` (and ``F.conv*d`` /
``F.conv_transpose*d`` on a parameter of a module without a rule).

``g_i = b_i^T a_i`` per group, with ``a_i`` the unfolded input (im2col, ``[T, C_in/G * k]``,
T = output positions) and ``b_i`` the output gradient (``[T, C_out/G]``).

* Norms, direct route (many output positions T, the usual case: ``T (d_in + d_out) > d_in d_out``,
  see :meth:`ConvWeight.route`): the per-example weight gradients of a chunk of examples come
  from ONE native grouped ``convolution_backward`` with the examples folded into the groups
  (input ``[1, n*C_in, *S]``, groups ``n*G``), then their squares are summed. Chunks hold at
  most ``_DIRECT_CHUNK_ELEMENTS`` per-example gradient entries. Transposed convolutions always
  take this route (``convolution_backward`` with ``transposed=True``).
* Norms, ghost route (few positions, wide layers): im2col by strided views in chunks of at
  most ``_UNFOLD_CHUNK_ELEMENTS`` (never the whole batch), then
  :func:`engm_fast.ops.per_example_sqnorm`. ``F.unfold`` is avoided (much slower on a loaded
  CPU than the strided copy; measurements in docs/design.md).
* The weighted sum ``sum_i w_i g_i`` is the ordinary weight gradient of the convolution with
  the output gradient scaled per example: the native ``convolution_backward`` (oneDNN / cuDNN)
  with only the weight output requested, no unfold at all.

A layer called several times in one step (TRADES' clean and adversarial passes) keeps every
call's ``(x, b)``: per-example gradients are summed over calls before any norm.

Padding modes other than zeros and ``padding="same"`` are turned into an explicit pad of the
input followed by a convolution with integer padding, exactly as ``nn.ConvNd`` computes them.
"""
from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...reference import accumulation_dtype
from ..contributions import Contribution, Dense, OuterProduct, _zero_rows
from ..registry import register_functional, register_rule

__all__ = ["ConvWeight", "conv_geometry", "unfold_input"]

# 2**24 elements = 64 MiB of float32 unfolded input per chunk.
_UNFOLD_CHUNK_ELEMENTS = 1 << 24
# 2**22 per-example gradient entries = 16 MiB in float32 per direct-route chunk.
_DIRECT_CHUNK_ELEMENTS = 1 << 22
# When all of a layer's per-example gradients fit in 2**24 entries (64 MiB in float32; e.g.
# B=128 of a 64->64 3x3 conv is 4.7M), the direct route computes them in one piece and keeps
# them, so the weighted sum is a [1, B] x [B, P] GEMV instead of a second convolution backward.
_KEEP_PER_EXAMPLE_ELEMENTS = 1 << 24
# Depthwise convolutions (one input channel per group): per-example gradients by correlating
# the input with the output gradient as a forward convolution (examples and channels folded
# into the groups) when the output has few positions, T <= _CORRELATE_POSITIONS * kernel size.
# Measured on the 2-core CPU, one thread, B = 32 (benchmarks/bench_routes.py; results in
# benchmarks/results/routes.txt): 7x7 depthwise at 4x4 output 1.0 ms against 5.7 ms for the
# grouped weight gradient, at 8x8 0.8 against 6.7 ms; 3x3 at 32x32 (T = 114 K) 2.7 against 2.0 ms.
_CORRELATE_POSITIONS = 4
# Inside the backward, a direct-route layer's per-example gradients replace its input and
# output gradient when they take at most half their memory (at parity the grouped convolution's
# own copies of x and b land next to the backward's peak; docs/design.md has the measurements).
_COMPACT_RATIO = 2


def conv_geometry(module: nn.modules.conv._ConvNd, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, ...]]:
    """The input after any explicit padding the module applies, and the remaining int padding.

    Mirrors ``nn.ConvNd._conv_forward``: non-zero padding modes pad with ``F.pad`` first and
    convolve with padding 0; ``padding="same"`` pads ``dilation*(k-1)`` in total per dim,
    ``total // 2`` on the left and the rest on the right.
    """
    return _padded(x, module.padding, module.padding_mode, module.kernel_size, module.dilation,
                   getattr(module, "_reversed_padding_repeated_twice", None))


def _padded(x, padding, padding_mode, kernel_size, dilation, reversed_twice=None):
    n = len(kernel_size)
    if padding_mode != "zeros":
        return F.pad(x, reversed_twice, mode=padding_mode), (0,) * n
    if padding == "same":
        left, extra_right = [], []
        for d, k in zip(dilation, kernel_size):
            total = d * (k - 1)
            left.append(total // 2)
            extra_right.append(total - 2 * (total // 2))
        if any(extra_right):
            pads = []
            for r in reversed(extra_right):  # F.pad lists the last dim first
                pads += [0, r]
            x = F.pad(x, pads)
        return x, tuple(left)
    if padding == "valid":
        return x, (0,) * n
    if isinstance(padding, int):
        return x, (padding,) * n
    return x, tuple(padding)


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


def _tuple(v, n):
    return tuple(v) if isinstance(v, (tuple, list)) else (v,) * n


class ConvWeight(Contribution):
    """Per-example gradients of a (transposed) convolution weight from the calls' inputs and
    output gradients.

    Args:
        weight_shape: the weight's shape (``[C_out, C_in/G, *k]``, transposed
            ``[C_in, C_out/G, *k]``).
        x: the call's input, already padded as the convolution reads it; ``b``: its output gradient.
        stride, padding, dilation, groups: the convolution's (``padding`` as ints).
        transposed, output_padding: for ``conv_transpose``.
    """

    def __init__(self, weight_shape, x: torch.Tensor, b: torch.Tensor, stride, padding, dilation, groups: int,
                 transposed: bool = False, output_padding=None):
        self.shape = torch.Size(weight_shape)
        n = len(self.shape) - 2
        self.kernel_size = tuple(self.shape[2:])
        self.stride, self.padding, self.dilation = _tuple(stride, n), _tuple(padding, n), _tuple(dilation, n)
        self.groups, self.transposed = groups, transposed
        self.output_padding = _tuple(output_padding or 0, n)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = [(x, b)]
        self.batch_size = x.shape[0]
        self._kept: torch.Tensor | None = None  # [B, P] per-example gradients, when small

    @classmethod
    def of_module(cls, module: nn.modules.conv._ConvNd, x: torch.Tensor, b: torch.Tensor) -> "ConvWeight":
        transposed = isinstance(module, nn.modules.conv._ConvTransposeNd)
        if transposed:
            return cls(module.weight.shape, x, b, module.stride, module.padding, module.dilation, module.groups,
                       True, module.output_padding)
        xp, padding = conv_geometry(module, x)
        return cls(module.weight.shape, xp, b, module.stride, padding, module.dilation, module.groups)

    def _geometry(self):
        return (self.shape, self.stride, self.padding, self.dilation, self.groups, self.transposed,
                self.output_padding)

    @property
    def _dtype(self):
        return self.calls[0][0].dtype

    def route(self) -> str:
        """``"ghost"`` when its FLOPs, ``T^2 (d_in + d_out)`` per example, are at most the
        direct route's ``T d_in d_out``; else ``"direct"`` (transposed: always direct).

        Not the op's ``choose_sqnorm_route`` rule (ghost iff ``2 T^2 <= d_in d_out``): for a
        convolution the ghost route also pays the im2col copy of the input, and the direct
        route is a native grouped convolution (docs/design.md has the ResNet-18 measurements).
        """
        if self.transposed:
            return "direct"
        T = sum(b[0, 0].numel() for _, b in self.calls)
        d_in = self.shape[1] * math.prod(self.kernel_size)
        d_out = self.shape[0] // self.groups
        return "ghost" if T * (d_in + d_out) <= d_in * d_out else "direct"

    def _rows(self, start: int, stop: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Unfolded ``a`` and ``b`` of examples ``start:stop`` as ``[n, T, G, d]``, every call's
        rows stacked along T."""
        As, Bs = [], []
        G = self.groups
        for x, b in self.calls:
            a = unfold_input(x[start:stop], self.kernel_size, self.stride, self.padding, self.dilation)
            n, T = a.shape[:2]
            bb = b[start:stop].reshape(n, b.shape[1], T).transpose(1, 2)
            As.append(a.reshape(n, T, G, a.shape[2] // G))
            Bs.append(bb.reshape(n, T, G, bb.shape[2] // G))
        if len(As) == 1:
            return As[0], Bs[0]
        return torch.cat(As, 1), torch.cat(Bs, 1)

    def sqnorms(self) -> torch.Tensor:
        out = torch.empty(self.batch_size, dtype=accumulation_dtype(self._dtype), device=self.calls[0][0].device)
        P = self.shape.numel()
        if self.route() == "direct":
            if self.batch_size * P <= _KEEP_PER_EXAMPLE_ELEMENTS:
                self._kept = self._grouped_per_example(0, self.batch_size).reshape(self.batch_size, -1)
                return self._kept.to(out.dtype).pow(2).sum(1)
            chunk = max(1, _DIRECT_CHUNK_ELEMENTS // P)
            for start in range(0, self.batch_size, chunk):
                stop = min(self.batch_size, start + chunk)
                g = self._grouped_per_example(start, stop)
                out[start:stop] = g.reshape(stop - start, -1).to(out.dtype).pow(2).sum(1)
            return out
        per_example = sum(x[0].numel() * math.prod(self.kernel_size) + b[0].numel() for x, b in self.calls)
        chunk = max(1, _UNFOLD_CHUNK_ELEMENTS // max(1, per_example))
        for start in range(0, self.batch_size, chunk):
            stop = min(self.batch_size, start + chunk)
            out[start:stop] = OuterProduct(*self._rows(start, stop), self.shape).sqnorms()
        return out

    def compact(self) -> Contribution:
        """Materialized per-example gradients (a :class:`Dense`) when the direct route would be
        taken anyway and they take at most half the memory of the inputs and output gradients
        they replace (``_COMPACT_RATIO``); otherwise ``self``."""
        if self.route() != "direct" or self._kept is not None:
            return self
        held = sum(x.numel() + b.numel() for x, b in self.calls)
        if _COMPACT_RATIO * self.batch_size * self.shape.numel() > held:
            return self
        return Dense(self._grouped_per_example(0, self.batch_size))

    def _correlates(self, b: torch.Tensor) -> bool:
        """Depthwise (one input channel per group), not transposed, few output positions."""
        return (not self.transposed and self.shape[1] == 1 and len(self.kernel_size) <= 3
                and b[0, 0].numel() <= _CORRELATE_POSITIONS * math.prod(self.kernel_size))

    def _correlated_per_example(self, x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Depthwise per-example gradients ``g[i, c, k] = sum_t x_pad[i, c, t*s + k*d] b[i, c, t]``:
        a forward convolution of the padded input with the output gradient as kernel (its taps
        ``s`` apart: dilation = stride; outputs ``d`` apart: stride = dilation), one group per
        (example, channel)."""
        n, C_out = b.shape[:2]
        mult = C_out // x.shape[1]  # channel multiplier: output channel c reads input c // mult
        if any(self.padding):
            pads = []
            for p in reversed(self.padding):
                pads += [p, p]
            x = F.pad(x, pads)
        if mult > 1:
            x = x.repeat_interleave(mult, dim=1)
        dims = len(self.kernel_size)
        conv = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
        out = conv(x.reshape((1, n * C_out) + x.shape[2:]), b.reshape((n * C_out, 1) + b.shape[2:]),
                   stride=self.dilation, dilation=self.stride, groups=n * C_out)
        index = (slice(None), slice(None)) + tuple(slice(0, k) for k in self.kernel_size)
        return out[index].reshape((n,) + tuple(self.shape))

    def _grouped_per_example(self, start: int, stop: int) -> torch.Tensor:
        """Per-example weight gradients ``[n, *weight.shape]`` of examples ``start:stop``."""
        n = stop - start
        total = None
        for x, b in self.calls:
            if self._correlates(b):
                g = self._correlated_per_example(x[start:stop], b[start:stop])
                total = g if total is None else total + g
                continue
            x, b = x[start:stop], b[start:stop]
            C_in, C_out = x.shape[1], b.shape[1]
            if self.transposed:  # weight [C_in, C_out/G, *k]; folded: [n*C_in, C_out/G, *k]
                weight_shape = (n * C_in, C_out // self.groups) + self.kernel_size
            else:
                weight_shape = (n * C_out, C_in // self.groups) + self.kernel_size
            _, g, _ = torch.ops.aten.convolution_backward(
                b.reshape((1, n * C_out) + b.shape[2:]), x.reshape((1, n * C_in) + x.shape[2:]),
                x.new_empty(weight_shape),  # only its shape is read when just grad_weight is asked
                None, self.stride, self.padding, self.dilation, self.transposed, self.output_padding,
                n * self.groups, (False, True, False),
            )
            g = g.view((n,) + tuple(self.shape))
            total = g if total is None else total + g
        return total

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        if self._kept is not None:
            return torch.mm(w.to(self._kept.dtype).unsqueeze(0), self._kept).view(self.shape)
        total = None
        for x, b in self.calls:
            scaled = b * w.to(b.dtype).view((-1,) + (1,) * (b.dim() - 1))
            # Only the weight's shape is read; a tensor in x's dtype keeps the op's dtypes
            # consistent under autocast (x and b in bf16, the parameter in float32).
            _, grad_weight, _ = torch.ops.aten.convolution_backward(
                scaled, x, x.new_empty(self.shape), None, self.stride, self.padding, self.dilation,
                self.transposed, self.output_padding, self.groups, (False, True, False),
            )
            total = grad_weight if total is None else total + grad_weight
        return total

    def per_example(self) -> torch.Tensor:
        if self._kept is not None:
            return self._kept.view((self.batch_size,) + tuple(self.shape))
        return self._grouped_per_example(0, self.batch_size)

    def zero_examples(self, mask: torch.Tensor) -> "ConvWeight":
        clone = object.__new__(ConvWeight)
        clone.__dict__.update(self.__dict__)
        clone.calls = [(_zero_rows(x, mask), _zero_rows(b, mask)) for x, b in self.calls]
        clone._kept = None if self._kept is None else _zero_rows(self._kept, mask)
        return clone

    def join(self, other: Contribution) -> Contribution | None:
        if isinstance(other, ConvWeight) and other._geometry() == self._geometry() and self._kept is None \
                and other._kept is None:
            out = object.__new__(ConvWeight)
            out.__dict__.update(self.__dict__)
            out.calls = self.calls + other.calls
            return out
        return None


def _bias(b: torch.Tensor) -> Dense:
    return Dense(b.reshape(b.shape[0], b.shape[1], -1).sum(2))


def _check_batched(x: torch.Tensor, n: int) -> None:
    if x.dim() != n + 2:
        raise ValueError(f"engm_fast needs a batched input [B, C, *spatial] ({n + 2}-D), got {tuple(x.shape)}")


def _conv(module: nn.modules.conv._ConvNd, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    x = inputs[0]
    _check_batched(x, len(module.kernel_size))
    out: dict[str, Contribution] = {}
    if module.weight.requires_grad:
        out["weight"] = ConvWeight.of_module(module, x, b)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = _bias(b)
    return out


def _conv_transpose(module: nn.modules.conv._ConvTransposeNd, inputs: tuple, b: torch.Tensor) -> dict:
    x = inputs[0]
    _check_batched(x, len(module.kernel_size))
    output_size = inputs[1] if len(inputs) > 1 else None
    out: dict[str, Contribution] = {}
    if module.weight.requires_grad:
        output_padding = module._output_padding(x, output_size, module.stride, module.padding, module.kernel_size,
                                                len(module.kernel_size), module.dilation)
        out["weight"] = ConvWeight(module.weight.shape, x, b, module.stride, module.padding, module.dilation,
                                   module.groups, True, output_padding)
    if module.bias is not None and module.bias.requires_grad:
        out["bias"] = _bias(b)
    return out


for _cls in (nn.Conv1d, nn.Conv2d, nn.Conv3d):
    register_rule(_cls, kind=ConvWeight)(_conv)
for _cls in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d):
    register_rule(_cls, kind=ConvWeight)(_conv_transpose)


def _functional_conv(transposed: bool):
    names = ("input", "weight", "bias", "stride", "padding") + (("output_padding", "groups", "dilation")
                                                                 if transposed else ("dilation", "groups"))
    defaults = {"bias": None, "stride": 1, "padding": 0, "dilation": 1, "groups": 1, "output_padding": 0}

    def bind(args, kwargs):
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        return bound

    def compute(bound: dict, b: torch.Tensor) -> dict[str, Contribution]:
        x, weight = bound["input"], bound["weight"]
        n = weight.dim() - 2
        _check_batched(x, n)
        out = {}
        if transposed:
            out["weight"] = ConvWeight(weight.shape, x, b, bound["stride"], bound["padding"], bound["dilation"],
                                       bound["groups"], True, bound["output_padding"])
        else:
            xp, padding = _padded(x, bound["padding"], "zeros", tuple(weight.shape[2:]), _tuple(bound["dilation"], n))
            out["weight"] = ConvWeight(weight.shape, xp, b, bound["stride"], padding, bound["dilation"], bound["groups"])
        if bound["bias"] is not None:
            out["bias"] = _bias(b)
        return out

    return bind, compute


for _f in (F.conv1d, F.conv2d, F.conv3d):
    register_functional(_f, *_functional_conv(False))
for _f in (F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d):
    register_functional(_f, *_functional_conv(True))
