"""Per-example gradients of one parameter, kept in factored form until the weights are known.

A :class:`Contribution` is what one or more layer calls contribute to one parameter's
per-example gradients ``g_i``. It answers, without (where avoidable) materializing
``B x numel`` tensors:

* :meth:`~Contribution.sqnorms`: ``||g_i||^2`` for every example, ``[B]`` in the accumulation
  dtype (float32, float64 for float64 models);
* :meth:`~Contribution.weighted_sum`: ``sum_i w_i g_i`` in the parameter's shape;
* :meth:`~Contribution.per_example`: the materialized ``[B, *shape]``;
* :meth:`~Contribution.inner`: ``<g_i, h_i>`` with another contribution to the same parameter
  (the cross term of the norm of a sum, e.g. a tied embedding and output layer);
* :meth:`~Contribution.merge`: the contribution of two calls that use the parameter (the
  example's gradient is the SUM over calls, and the norm must be of that sum).

Kinds: :class:`OuterProduct` (Linear, unfolded Conv: ``g_i = b_i^T a_i`` per group; merged
calls stack their rows), :class:`IndexedRows` (Embedding: rows of ``b`` scattered by token id),
:class:`Dense` (materialized: biases, norm-layer affine parameters, parameters of modules
without a rule), :class:`Sliced` (a contribution to a block of rows, e.g. the query rows of an
attention's packed projection) and :class:`Sum` (calls of different kinds: norms from pairwise
inner products). Convolutions use :class:`engm_fast.engine.rules.conv.ConvWeight`.
"""
from __future__ import annotations

import torch

from .. import ops
from ..reference import accumulation_dtype

__all__ = ["Contribution", "OuterProduct", "IndexedRows", "Dense", "Sliced", "Sum", "combine"]


class Contribution:
    """Interface; see the module docstring. Subclasses set ``shape`` and ``batch_size``."""

    shape: torch.Size
    batch_size: int

    def sqnorms(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement sqnorms")

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement weighted_sum")

    def per_example(self) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} must implement per_example")

    def zero_examples(self, mask: torch.Tensor) -> "Contribution":
        """The same contribution with examples where ``mask`` is True set to exactly zero.

        Used to drop non-finite examples: a weight of 0 is not enough, since 0 * NaN = NaN.
        """
        raise NotImplementedError(f"{type(self).__name__} must implement zero_examples")

    def compact(self) -> "Contribution":
        """The same gradients in the form that holds the least memory (default: ``self``).

        The engine calls it as soon as a layer call's output gradient arrives, inside the
        backward, so that what a contribution no longer needs (the layer's input and output
        gradient) is freed while the backward runs instead of living until its end.
        """
        return self

    def join(self, other: "Contribution") -> "Contribution | None":
        """``self`` and ``other`` as one contribution of the same kind, where that is cheaper
        than keeping them apart (stacking the rows of two calls); ``None`` otherwise."""
        return None

    def merge(self, other: "Contribution") -> "Contribution":
        """Two calls' contributions to one parameter as one: joined where the kind allows
        (:meth:`join`), else a :class:`Sum`."""
        if isinstance(other, Sum):
            return Sum([self]).merge(other)
        joined = self.join(other)
        return joined if joined is not None else Sum([self, other])

    def inner(self, other: "Contribution") -> torch.Tensor:
        """``[B]`` per-example inner products ``<g_i, h_i>`` (default: materialize both)."""
        acc = accumulation_dtype(_dtype_of(self))
        a = self.per_example().reshape(self.batch_size, -1).to(acc)
        b = other.per_example().reshape(other.batch_size, -1).to(acc)
        return (a * b).sum(1)


def _dtype_of(c: Contribution) -> torch.dtype:
    for name in ("b", "g"):
        t = getattr(c, name, None)
        if isinstance(t, torch.Tensor):
            return t.dtype
    if isinstance(c, (Sliced,)):
        return _dtype_of(c.part)
    if isinstance(c, Sum):
        return _dtype_of(c.parts[0])
    return c.per_example().dtype


def _zero_rows(t: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.view((-1,) + (1,) * (t.dim() - 1)), torch.zeros((), dtype=t.dtype, device=t.device), t)


class OuterProduct(Contribution):
    """``g_i = stack_j b_ij^T a_ij`` over ``G`` groups, reshaped to the parameter's shape.

    ``a`` is ``[B, T, G, d_in]`` and ``b`` is ``[B, T, G, d_out]``; the parameter is the
    ``[G * d_out, d_in]`` matrix (a Linear weight has G = 1; a grouped Conv weight
    ``[C_out, C_in/G, *k]`` is that matrix with rows ordered group by group). ``[B, T, d]``
    operands (G = 1) are accepted too.

    Example:
        >>> a, b = torch.randn(4, 3, 5), torch.randn(4, 3, 2)
        >>> c = OuterProduct(a, b, (2, 5))
        >>> torch.allclose(c.per_example(), torch.einsum("bto,bti->boi", b, a))
        True
    """

    def __init__(self, a: torch.Tensor, b: torch.Tensor, shape):
        if a.dim() == 3 and b.dim() == 3:
            a, b = a.unsqueeze(2), b.unsqueeze(2)
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

    def compatible(self, other: "OuterProduct") -> bool:
        return (
            self.a.shape[2:] == other.a.shape[2:]
            and self.b.shape[2:] == other.b.shape[2:]
            and self.batch_size == other.batch_size
            and self.a.dtype == other.a.dtype
        )

    def join(self, other: Contribution) -> Contribution | None:
        """Rows of several calls stacked along T: ``g_i`` is the sum over calls."""
        if isinstance(other, OuterProduct) and self.compatible(other):
            return OuterProduct(torch.cat([self.a, other.a], 1), torch.cat([self.b, other.b], 1), self.shape)
        return None

    def inner(self, other: Contribution) -> torch.Tensor:
        acc = accumulation_dtype(self.b.dtype)
        if isinstance(other, OuterProduct) and self.compatible(other):
            # <b1^T a1, b2^T a2> = sum_{t,s} (a1_t . a2_s)(b1_t . b2_s), per group.
            ga = torch.einsum("btgi,bsgi->bgts", self.a.to(acc), other.a.to(acc))
            gb = torch.einsum("btgo,bsgo->bgts", self.b.to(acc), other.b.to(acc))
            return (ga * gb).sum((1, 2, 3))
        if isinstance(other, IndexedRows) and self.groups == 1:
            return other.inner(self)
        if isinstance(other, Dense):
            # sum_t b_t^T D a_t: [B, T, d_out] @ [B, d_out, d_in], times a.
            D = other.g.reshape(self.batch_size, self.b.shape[3], self.a.shape[3]).to(acc)
            if self.groups != 1:
                return super().inner(other)
            return (torch.bmm(self.b[:, :, 0].to(acc), D) * self.a[:, :, 0].to(acc)).sum((1, 2))
        return super().inner(other)


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

    def join(self, other: Contribution) -> Contribution | None:
        if isinstance(other, IndexedRows) and other.num_rows == self.num_rows and other.b.dtype == self.b.dtype:
            return IndexedRows(torch.cat([self.ids, other.ids], 1), torch.cat([self.b, other.b], 1), self.num_rows)
        return None

    def inner(self, other: Contribution) -> torch.Tensor:
        acc = accumulation_dtype(self.b.dtype)
        if isinstance(other, OuterProduct) and other.groups == 1:
            # A tied output layer: other's g_i = b_o^T a_o with b_o [B, T', V] (V rows) and
            # a_o [B, T', d]. <g_i, E_i> = sum_{t,s} b_o[t, id_s] (a_o_t . b_s): a gather of the
            # output gradient at this example's ids and one [T', d] x [d, S] product, never
            # the [B, V, d] gradients nor a one-hot of the ids.
            bo, ao = other.b[:, :, 0], other.a[:, :, 0]
            S = self.ids.shape[1]
            gathered = bo.gather(2, self.ids.unsqueeze(1).expand(-1, bo.shape[1], S)).to(acc)   # [B, T', S]
            prod = torch.bmm(ao.to(acc), self.b.to(acc).transpose(1, 2))                       # [B, T', S]
            return (gathered * prod).sum((1, 2))
        if isinstance(other, IndexedRows) and other.num_rows == self.num_rows:
            joined = self.join(other)
            return joined.sqnorms().sub(self.sqnorms()).sub(other.sqnorms()).mul(0.5)
        return super().inner(other)


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

    def join(self, other: Contribution) -> Contribution | None:
        if isinstance(other, Dense):
            return Dense(self.g + other.g.to(self.g.dtype))
        return None

    def inner(self, other: Contribution) -> torch.Tensor:
        if not isinstance(other, Dense):
            return other.inner(self)
        return super().inner(other)


class Sliced(Contribution):
    """A contribution ``part`` to the rows ``start:stop`` (dim 0) of a parameter of ``shape``.

    Used where one parameter is split into blocks that see different inputs: the packed
    query/key/value projection of an attention layer applied to different query, key and
    value tensors. Blocks of disjoint rows have orthogonal gradients.
    """

    def __init__(self, part: Contribution, start: int, stop: int, shape):
        self.part, self.start, self.stop, self.shape = part, start, stop, torch.Size(shape)
        self.batch_size = part.batch_size
        if tuple(part.shape) != (stop - start,) + tuple(self.shape[1:]):
            raise ValueError(f"Sliced: a part of shape {tuple(part.shape)} does not fill rows {start}:{stop} of "
                             f"{tuple(self.shape)}")

    def sqnorms(self) -> torch.Tensor:
        return self.part.sqnorms()

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        part = self.part.weighted_sum(w)
        out = part.new_zeros(self.shape)
        out[self.start:self.stop] = part
        return out

    def per_example(self) -> torch.Tensor:
        part = self.part.per_example()
        out = part.new_zeros((self.batch_size,) + tuple(self.shape))
        out[:, self.start:self.stop] = part
        return out

    def zero_examples(self, mask: torch.Tensor) -> "Sliced":
        return Sliced(self.part.zero_examples(mask), self.start, self.stop, self.shape)

    def compact(self) -> "Sliced":
        return Sliced(self.part.compact(), self.start, self.stop, self.shape)

    def join(self, other: Contribution) -> Contribution | None:
        if isinstance(other, Sliced) and (other.start, other.stop) == (self.start, self.stop):
            return Sliced(self.part.merge(other.part), self.start, self.stop, self.shape)
        return None

    def inner(self, other: Contribution) -> torch.Tensor:
        if isinstance(other, Sliced):
            if other.stop <= self.start or self.stop <= other.start:  # disjoint rows
                return torch.zeros(self.batch_size, dtype=accumulation_dtype(_dtype_of(self.part)),
                                   device=_device_of(self.part))
            if (other.start, other.stop) == (self.start, self.stop):
                return self.part.inner(other.part)
        return super().inner(other)


def _device_of(c: Contribution) -> torch.device:
    for name in ("b", "g"):
        t = getattr(c, name, None)
        if isinstance(t, torch.Tensor):
            return t.device
    if isinstance(c, Sliced):
        return _device_of(c.part)
    if isinstance(c, Sum):
        return _device_of(c.parts[0])
    return c.per_example().device


class Sum(Contribution):
    """Calls of different kinds that use one parameter: ``g_i = sum_j g_ij``.

    ``||g_i||^2 = sum_j ||g_ij||^2 + 2 sum_{j<k} <g_ij, g_ik>``, with each kind's own norm and
    the cheapest inner product each pair of kinds has (see :meth:`Contribution.inner`).
    """

    def __init__(self, parts: list[Contribution]):
        self.parts = list(parts)
        self.batch_size = self.parts[0].batch_size
        self.shape = self.parts[0].shape

    def sqnorms(self) -> torch.Tensor:
        total = self.parts[0].sqnorms()
        for j, p in enumerate(self.parts):
            if j:
                total = total + p.sqnorms()
            for q in self.parts[j + 1:]:
                total = total + 2 * p.inner(q).to(total.dtype)
        return total

    def weighted_sum(self, w: torch.Tensor) -> torch.Tensor:
        total = self.parts[0].weighted_sum(w)
        for p in self.parts[1:]:
            total = total + p.weighted_sum(w)
        return total

    def per_example(self) -> torch.Tensor:
        total = self.parts[0].per_example()
        for p in self.parts[1:]:
            total = total + p.per_example()
        return total

    def zero_examples(self, mask: torch.Tensor) -> "Sum":
        return Sum([p.zero_examples(mask) for p in self.parts])

    def compact(self) -> "Sum":
        return Sum([p.compact() for p in self.parts])

    def merge(self, other: Contribution) -> "Sum":
        others = other.parts if isinstance(other, Sum) else [other]
        parts = list(self.parts)
        for o in others:
            for k, p in enumerate(parts):  # join a part where that is cheaper
                joined = p.join(o)
                if joined is not None:
                    parts[k] = joined
                    break
            else:
                parts.append(o)
        return Sum(parts)


def combine(parts: list[Contribution]) -> Contribution:
    """One contribution for a parameter from the contributions of all calls that used it.

    The per-example gradient is the sum over calls; norms must be of that sum (the norm of a
    sum is not the sum of norms), so calls are merged before any norm is taken
    (:meth:`Contribution.merge`).
    """
    out = parts[0]
    for p in parts[1:]:
        out = out.merge(p)
    return out
