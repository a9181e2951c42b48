"""Embeddings: ``nn.Embedding`` and ``F.embedding`` on a parameter of a module without a rule.

``g_i = sum_t e_{id_it} b_it^T``: row ``id_it`` of the table receives ``b_it``
(:class:`IndexedRows`: norms by summing each example's rows per id, the weighted sum by one
scatter-add; never the ``[B, V, d]`` gradients). The padding index's row gets no gradient, as
in the native backward. ``sparse=True`` and ``scale_grad_by_freq=True`` (which scales each row
by its frequency in the whole batch, coupling the examples) are refused when the engine hooks
the module. ``max_norm`` renormalizes rows in place before the lookup, outside autograd: the
gradient is that of a plain lookup, so it is supported.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contributions import Contribution, IndexedRows
from ..registry import register_functional, register_rule

__all__ = ["embedding_contributions"]


def embedding_contributions(ids: torch.Tensor, b: torch.Tensor, num_rows: int, dim: int,
                            padding_idx: int | None) -> IndexedRows:
    if ids.dim() < 1:
        raise ValueError("engm_fast needs batched ids [B, ...], got a scalar")
    B = ids.shape[0]
    ids = ids.reshape(B, -1)
    b = b.reshape(B, ids.shape[1], dim)
    if padding_idx is not None:
        if padding_idx < 0:
            padding_idx += num_rows
        # The padding row receives no gradient (as in the native embedding backward).
        b = b * (ids != padding_idx).unsqueeze(-1).to(b.dtype)
    return IndexedRows(ids, b, num_rows)


def _check(name: str, module: nn.Embedding) -> None:
    for flag, why in (("sparse", "sparse gradients are not supported by engm_fast; use sparse=False"),
                      ("scale_grad_by_freq", "it scales each row by its frequency in the whole batch, which "
                                             "couples examples; engm_fast does not support it")):
        if getattr(module, flag):
            raise NotImplementedError(f"module '{name}' (nn.Embedding): {flag}={getattr(module, flag)!r}: {why}")


@register_rule(nn.Embedding, kind=IndexedRows, check=_check, positionwise=True)
def _embedding(module: nn.Embedding, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    if not module.weight.requires_grad:
        return {}
    return {"weight": embedding_contributions(inputs[0], b, module.num_embeddings, module.embedding_dim,
                                              module.padding_idx)}


def _bind_embedding(args, kwargs):
    bound = {"padding_idx": None, "max_norm": None, "scale_grad_by_freq": False, "sparse": False}
    bound.update(zip(("input", "weight", "padding_idx", "max_norm", "norm_type", "scale_grad_by_freq", "sparse"),
                     args))
    bound.update(kwargs)
    return bound


def _functional_embedding(bound: dict, b: torch.Tensor) -> dict[str, Contribution]:
    for flag in ("scale_grad_by_freq", "sparse"):
        if bound.get(flag):
            raise NotImplementedError(f"F.embedding with {flag}={bound[flag]!r} is not supported by engm_fast")
    weight = bound["weight"]
    return {"weight": embedding_contributions(bound["input"], b, weight.shape[0], weight.shape[1],
                                              bound["padding_idx"])}


register_functional(F.embedding, _bind_embedding, _functional_embedding)
