"""Per-example gradients of one parameter, kept in factored form until the weights are known.

A :class:`Contribution` is what one or more layer calls contribute to one parameter's
per-example gradients ``g_i``. It answers three questions without (where avoidable)
materializing ``B x numel`` tensors:

* :meth:`~Contribution.sqnorms`: ``||g_i||^2`` for every example, ``[B]`` in the
  accumulation dtype (float32, float64 for float64 models);
* :meth:`~Contribution.weighted_sum`: ``sum_i w_i g_i`` in the parameter's shape;
* :meth:`~Contribution.per_example`: the materialized ``[B, *shape]`` (used only to add up
  contributions of different kinds to one shared parameter).

Kinds: :class:`OuterProduct` (Linear, unfolded Conv: ``g_i = b_i^T a_i`` per group),
:class:`IndexedRows` (Embedding: rows of ``b`` scattered by token id), :class:`Dense`
(already materialized: biases, norm-layer affine parameters, the torch.func fallback).
Conv layers use :class:`engm_fast.engine.conv.ConvWeight`, which unfolds lazily and in chunks.
"""
from __future__ import annotations

import torch

from .. import ops
from ..reference import accumulation_dtype

__all__ = ["Contribution", "OuterProduct", "IndexedRows", "Dense", "combine"]


class Contribution:
    """Interface; see the module docstring."""

    shape: torch.Size
    batch_size: int

    def sqnorms(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement sqnorms")

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement weighted_sum")

    def per_example(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement per_example")

    def compact(self) -> "Contribution":
        """The same gradients in the form that holds the least memory (default: ``self``).

        The engine calls it as soon as a layer call's output gradient arrives, inside the
        backward, so that what a contribution no longer needs (the layer's input and output
        gradient) is freed while the backward runs instead of living until its end.
        """
        return self

    def zero_examples(self, mask: torch.Tensor) -> "Contribution":
        """The same contribution with examples where ``mask`` is True set to exactly zero.

        Used to drop non-finite examples: a weight of 0 is not enough, since 0 * NaN = NaN.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement zero_examples")


def _zero_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view((-1,) + (1,) * (t.dim() - 1)), torch.zeros((), dtype=t.dtype, device=t.device), t)


class OuterProduct(Contribution):
    """``g_i = stack_j b_ij^T a_ij`` over ``G`` groups, reshaped to the parameter's shape.

    ``a`` is ``[B, T, G, d_in]`` and ``b`` is ``[B, T, G, d_out]``; the parameter is the
    ``[G * d_out, d_in]`` matrix (a Linear weight has G = 1; a grouped Conv weight
    ``[C_out, C_in/G, *k]`` is that matrix with rows ordered group by group).
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, shape: torch.Size):
        if a.dim() != 4 or b.dim() != 4 or a.shape[:3] != b.shape[:3]:
            raise ValueError(f"OuterProduct: expected a [B,T,G,d_in], b [B,T,G,d_out]; got {tuple(a.shape)}, {tuple(b.shape)}")
        self.a, self.b, self.shape = a, b, torch.Size(shape)
        self.batch_size = a.shape[0]
        G, d_in, d_out = a.shape[2], a.shape[3], b.shape[3]
        if G * d_out * d_in != self.shape.numel():
            raise ValueError(f"OuterProduct: G*d_out*d_in = {G}*{d_out}*{d_in} does not match parameter shape {tuple(shape)}")

    @property
    def groups(self) -> int:
        return self.a.shape[2]

    def _grouped_rows(self, t: torch.Tensor) -> torch.Tensor:
        # [B, T, G, d] -> [B*G, T, d]: each (example, group) pair is one "example" of the op.
        B, T, G, d = t.shape
        return t.permute(0, 2, 1, 3).reshape(B * G, T, d)

    def sqnorms(self) -> torch.Tensor:
        if self.groups == 1:
            return ops.per_example_sqnorm(self.a[:, :, 0], self.b[:, :, 0])
        n2 = ops.per_example_sqnorm(self._grouped_rows(self.a), self._grouped_rows(self.b))
        return n2.view(self.batch_size, self.groups).sum(1)

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        if self.groups == 1:
            return ops.weighted_outer_sum(self.a[:, :, 0], self.b[:, :, 0], w).view(self.shape)
        B, T, G, d_in = self.a.shape
        d_out = self.b.shape[3]
        bw = (self.b * w.to(self.b.dtype).view(B, 1, 1, 1)).permute(2, 0, 1, 3).reshape(G, B * T, d_out)
        a = self.a.permute(2, 0, 1, 3).reshape(G, B * T, d_in)
        return torch.bmm(bw.transpose(1, 2), a).reshape(self.shape)

    def per_example(self) -> torch.Tensor:
        g = torch.einsum("btgo,btgi->bgoi", self.b, self.a)
        return g.reshape((self.batch_size,) + tuple(self.shape))

    def zero_examples(self, mask: torch.Tensor) -> "OuterProduct":
        return OuterProduct(_zero_rows(self.a, mask), _zero_rows(self.b, mask), self.shape)

    def concat(self, other: "OuterProduct") -> "OuterProduct":
        """Rows of several calls of one layer, stacked along T: ``g_i`` is the sum over calls."""
        return OuterProduct(torch.cat([self.a, other.a], 1), torch.cat([self.b, other.b], 1), self.shape)

    def compatible(self, other: "OuterProduct") -> bool:
        return (
            self.a.shape[2:] == other.a.shape[2:]
            and self.b.shape[2:] == other.b.shape[2:]
            and self.batch_size == other.batch_size
            and self.a.dtype == other.a.dtype
        )


class IndexedRows(Contribution):
    """Embedding weight ``[V, d]``: ``g_i = sum_t e_{id_it} b_it^T`` (row ``id_it`` gets ``b_it``).

    ``ids`` is ``[B, T]`` (int64), ``b`` is ``[B, T, d]`` with the rows of ignored ids (the
    padding index) already zeroed.
    """

    def __init__(self, ids: torch.Tensor, b: torch.Tensor, num_rows: int):
        self.ids, self.b, self.num_rows = ids, b, num_rows
        self.batch_size = ids.shape[0]
        self.shape = torch.Size((num_rows, b.shape[-1]))

    def sqnorms(self) -> torch.Tensor:
        # Sum the rows of each (example, id) pair, then square: O(B T d), not the O(T^2 d)
        # Gram route, and never the B x V x d gradient.
        B, T = self.ids.shape
        d = self.b.shape[-1]
        acc = accumulation_dtype(self.b.dtype)
        example = torch.arange(B, device=self.ids.device).view(B, 1)
        keys = (example * self.num_rows + self.ids).reshape(-1)
        unique_keys, inverse = torch.unique(keys, return_inverse=True)
        row_sums = torch.zeros(unique_keys.shape[0], d, dtype=acc, device=self.b.device)
        row_sums.index_add_(0, inverse, self.b.reshape(B * T, d).to(acc))
        out = torch.zeros(B, dtype=acc, device=self.b.device)
        return out.index_add_(0, unique_keys // self.num_rows, row_sums.pow(2).sum(1))

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        B, T, d = self.b.shape
        bw = (self.b * w.to(self.b.dtype).view(B, 1, 1)).reshape(B * T, d)
        out = torch.zeros(self.num_rows, d, dtype=self.b.dtype, device=self.b.device)
        return out.index_add_(0, self.ids.reshape(-1), bw)

    def per_example(self) -> torch.Tensor:
        B, T, d = self.b.shape
        flat = (torch.arange(B, device=self.ids.device).view(B, 1) * self.num_rows + self.ids).reshape(-1)
        out = torch.zeros(B * self.num_rows, d, dtype=self.b.dtype, device=self.b.device)
        return out.index_add_(0, flat, self.b.reshape(B * T, d)).view(B, self.num_rows, d)

    def zero_examples(self, mask: torch.Tensor) -> "IndexedRows":
        return IndexedRows(self.ids, _zero_rows(self.b, mask), self.num_rows)

    def concat(self, other: "IndexedRows") -> "IndexedRows":
        return IndexedRows(torch.cat([self.ids, other.ids], 1), torch.cat([self.b, other.b], 1), self.num_rows)

    def as_outer_product(self) -> OuterProduct:
        """The same gradient as ``onehot(ids)^T b``: lets a tied Linear weight ``[V, d]`` join.

        Costs a ``[B, T, V]`` one-hot, the size of the tied Linear's own output gradient.
        """
        onehot = torch.nn.functional.one_hot(self.ids, self.num_rows).to(self.b.dtype)
        return OuterProduct(self.b.unsqueeze(2), onehot.unsqueeze(2), self.shape)


class Dense(Contribution):
    """Materialized per-example gradients ``g`` of shape ``[B, *shape]``."""

    def __init__(self, g: torch.Tensor):
        self.g = g
        self.batch_size = g.shape[0]
        self.shape = g.shape[1:]

    def sqnorms(self) -> torch.Tensor:
        return self.g.reshape(self.batch_size, -1).to(accumulation_dtype(self.g.dtype)).pow(2).sum(1)

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        flat = self.g.reshape(self.batch_size, -1)
        # [1, B] @ [B, D]: a row-major GEMV (mv on flat.t() took 13% of an MLP step).
        return torch.mm(w.to(flat.dtype).unsqueeze(0), flat).view(self.shape)

    def per_example(self) -> torch.Tensor:
        return self.g

    def zero_examples(self, mask: torch.Tensor) -> "Dense":
        return Dense(_zero_rows(self.g, mask))


def combine(parts: list[Contribution]) -> Contribution:
    """One contribution for a parameter from the contributions of all calls that used it.

    The per-example gradient is the sum over calls; norms must be of that sum (the norm of a
    sum is not the sum of norms), so calls are merged before any norm is taken:
    OuterProducts of one shape stack their rows along T, IndexedRows likewise (and join a tied
    Linear as a one-hot OuterProduct), anything else is materialized and added.
    """
    if len(parts) == 1:
        return parts[0]
    from .conv import ConvWeight  # local import: conv builds on this module

    parts = [p.as_outer_product() if isinstance(p, ConvWeight) else p for p in parts]
    if all(isinstance(p, IndexedRows) for p in parts):
        out = parts[0]
        for p in parts[1:]:
            out = out.concat(p)
        return out
    if any(isinstance(p, OuterProduct) for p in parts):
        parts = [p.as_outer_product() if isinstance(p, IndexedRows) else p for p in parts]
    if all(isinstance(p, OuterProduct) for p in parts) and all(parts[0].compatible(p) for p in parts[1:]):
        out = parts[0]
        for p in parts[1:]:
            out = out.concat(p)
        return out
    total = parts[0].per_example()
    for p in parts[1:]:
        total = total + p.per_example()
    return Dense(total)
