"""Linear maps: ``nn.Linear``, transformers' ``Conv1D`` and ``F.linear`` on a parameter of a
module without a rule.

``y = x W^T + b`` on ``x`` of shape ``[B, ..., d_in]``: every leading dimension after the batch
is a position (T), and ``g_i = b_i^T a_i`` is an :class:`OuterProduct` (norms by the ghost or
direct route, the weighted sum as one GEMM). transformers' ``Conv1D`` (GPT-2's projections)
computes ``x W + b`` with ``W`` stored ``[d_in, d_out]``: the same outer product with the
operands swapped. It is recognized by its qualified class name, so transformers is never
imported here.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contributions import Contribution, Dense, OuterProduct
from ..registry import register_functional, register_rule

__all__ = ["linear_contributions"]


def _rows(x: torch.Tensor, b: torch.Tensor, d_in: int, d_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    if x.dim() < 2:
        raise ValueError(f"engm_fast needs a batched input [B, ..., {d_in}], got {tuple(x.shape)}")
    B = x.shape[0]
    return x.reshape(B, -1, d_in), b.reshape(B, -1, d_out)  # any leading dims after the batch become T


def _bias(b: torch.Tensor) -> Dense:
    return Dense(b[:, 0] if b.shape[1] == 1 else b.sum(1))  # T = 1: a view, no sum


def linear_contributions(x: torch.Tensor, b: torch.Tensor, weight: torch.Tensor | None,
                         bias: torch.Tensor | None, transposed: bool = False) -> dict[str, Contribution]:
    """``{"weight": OuterProduct, "bias": Dense}`` for ``y = x W^T + bias`` (``transposed``:
    ``y = x W + bias``, W stored ``[d_in, d_out]``); ``None`` leaves a parameter out."""
    a, bb = _rows(x, b, x.shape[-1], b.shape[-1])
    out: dict[str, Contribution] = {}
    if weight is not None:
        # Conv1D's g_i = a_i^T b_i ([d_in, d_out]) is OuterProduct's b^T a with the roles swapped.
        out["weight"] = OuterProduct(bb, a, weight.shape) if transposed else OuterProduct(a, bb, weight.shape)
    if bias is not None:
        out["bias"] = _bias(bb)
    return out


def _trainable(p):
    return p if isinstance(p, nn.Parameter) and p.requires_grad else None


@register_rule(nn.Linear, kind=OuterProduct, positionwise=True)
def _linear(module: nn.Linear, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    return linear_contributions(inputs[0], b, _trainable(module.weight), _trainable(module.bias))


@register_rule("transformers.pytorch_utils.Conv1D", kind=OuterProduct, positionwise=True)
def _conv1d_transformers(module: nn.Module, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    return linear_contributions(inputs[0], b, _trainable(module.weight), _trainable(module.bias), transposed=True)


def _bind_linear(args, kwargs):
    bound = {"bias": None}
    bound.update(zip(("input", "weight", "bias"), args))
    bound.update(kwargs)
    return bound


def _functional_linear(bound: dict, b: torch.Tensor) -> dict[str, Contribution]:
    return linear_contributions(bound["input"], b, bound["weight"], bound["bias"])


register_functional(F.linear, _bind_linear, _functional_linear)
