"""Layer rules: how each supported module type turns ``(input, output gradient)`` into
per-example gradient contributions for its own parameters.

A rule receives the module, the tensors its forward was called with (positional arguments)
and ``b``, the gradient of the summed loss with respect to the module's output. It returns
``{parameter name: Contribution}`` for the module's trainable parameters. The batch is
dimension 0 of the input and of the output for every rule.

Norm layers (LayerNorm, GroupNorm, RMSNorm, BatchNorm) recompute the normalized input
``xhat`` from the saved input with the module's own statistics and materialize
``dgamma_i = sum xhat_i * b_i`` and ``dbeta_i = sum b_i`` (``[B, C]``, cheap).

BatchNorm in training mode couples the examples of a batch. The engine's convention
(DESIGN.md section 1) is ``g_i := b_i^T a_i`` with ``b`` the output gradient of the batch loss:
the term of example ``i`` in the sum decomposition of the batch gradient. For models without
cross-example coupling this is the true per-example gradient.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from .contributions import Contribution, Dense, IndexedRows, OuterProduct
from .conv import ConvWeight

__all__ = ["RULES", "rule_for", "check_supported"]

Rule = Callable[[nn.Module, tuple, torch.Tensor], dict[str, Contribution]]


def _wants(module: nn.Module, name: str) -> bool:
    p = getattr(module, name, None)
    return isinstance(p, nn.Parameter) and p.requires_grad


def _linear(module: nn.Linear, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    x = inputs[0]
    if x.dim() < 2:
        raise ValueError(f"engm_fast needs a batched input [B, ..., {module.in_features}], got {tuple(x.shape)}")
    B = x.shape[0]
    a = x.reshape(B, -1, module.in_features)  # any leading dims after the batch become T
    b = b.reshape(B, -1, module.out_features)
    out: dict[str, Contribution] = {}
    if _wants(module, "weight"):
        out["weight"] = OuterProduct(a.unsqueeze(2), b.unsqueeze(2), module.weight.shape)
    if _wants(module, "bias"):
        out["bias"] = Dense(b[:, 0] if b.shape[1] == 1 else b.sum(1))  # T = 1: a view, no sum
    return out


def _conv(module: nn.modules.conv._ConvNd, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    x = inputs[0]
    n = len(module.kernel_size)
    if x.dim() != n + 2:
        raise ValueError(f"engm_fast needs a batched input [B, C, *spatial] ({n + 2}-D), got {tuple(x.shape)}")
    out: dict[str, Contribution] = {}
    if _wants(module, "weight"):
        out["weight"] = ConvWeight(module, x, b)
    if _wants(module, "bias"):
        out["bias"] = Dense(b.reshape(b.shape[0], b.shape[1], -1).sum(2))
    return out


def _embedding(module: nn.Embedding, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    ids = inputs[0]
    if ids.dim() < 1:
        raise ValueError("engm_fast needs batched ids [B, ...], got a scalar")
    B = ids.shape[0]
    ids = ids.reshape(B, -1)
    b = b.reshape(B, ids.shape[1], module.embedding_dim)
    if module.padding_idx is not None:
        # The padding row receives no gradient (as in the native embedding backward).
        b = b * (ids != module.padding_idx).unsqueeze(-1).to(b.dtype)
    if not _wants(module, "weight"):
        return {}
    return {"weight": IndexedRows(ids, b, module.num_embeddings)}


def _affine(module: nn.Module, xhat: torch.Tensor, b: torch.Tensor, channel_dims: int) -> dict[str, Contribution]:
    """dgamma/dbeta from ``xhat`` and ``b`` reshaped to ``[B, R, *param_shape]`` (summing R)."""
    out: dict[str, Contribution] = {}
    B = b.shape[0]
    if _wants(module, "weight"):
        shape = module.weight.shape
        out["weight"] = Dense((xhat * b).reshape((B, -1) + tuple(shape)).sum(1))
    if _wants(module, "bias"):
        shape = module.bias.shape
        out["bias"] = Dense(b.reshape((B, -1) + tuple(shape)).sum(1))
    return out


def _channel_affine(module: nn.Module, xhat: torch.Tensor, b: torch.Tensor) -> dict[str, Contribution]:
    """Per-channel dgamma/dbeta for inputs ``[B, C, *spatial]`` (BatchNorm, GroupNorm)."""
    B, C = b.shape[:2]
    out: dict[str, Contribution] = {}
    if _wants(module, "weight"):
        out["weight"] = Dense((xhat * b).reshape(B, C, -1).sum(2))
    if _wants(module, "bias"):
        out["bias"] = Dense(b.reshape(B, C, -1).sum(2))
    return out


def _layer_norm(module: nn.LayerNorm, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    xhat = F.layer_norm(inputs[0], module.normalized_shape, None, None, module.eps)
    return _affine(module, xhat, b, len(module.normalized_shape))


def _rms_norm(module: nn.RMSNorm, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    xhat = F.rms_norm(inputs[0], module.normalized_shape, None, module.eps)
    return _affine(module, xhat, b, len(module.normalized_shape))


def _group_norm(module: nn.GroupNorm, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    xhat = F.group_norm(inputs[0], module.num_groups, None, None, module.eps)
    return _channel_affine(module, xhat, b)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    x = inputs[0]
    # Same choice of statistics as _BatchNorm.forward: batch statistics in training mode or
    # without running stats, else the running estimates (unchanged since the forward in eval).
    use_batch_stats = module.training or module.running_mean is None
    if use_batch_stats:
        xhat = F.batch_norm(x, None, None, None, None, True, 0.0, module.eps)
    else:
        xhat = F.batch_norm(x, module.running_mean, module.running_var, None, None, False, 0.0, module.eps)
    return _channel_affine(module, xhat, b)


RULES: dict[type, Rule] = {
    nn.Linear: _linear,
    nn.Conv1d: _conv,
    nn.Conv2d: _conv,
    nn.Conv3d: _conv,
    nn.Embedding: _embedding,
    nn.LayerNorm: _layer_norm,
    nn.GroupNorm: _group_norm,
    nn.BatchNorm1d: _batch_norm,
    nn.BatchNorm2d: _batch_norm,
    nn.BatchNorm3d: _batch_norm,
}
if hasattr(nn, "RMSNorm"):
    RULES[nn.RMSNorm] = _rms_norm


def rule_for(module: nn.Module) -> Rule | None:
    """The fast rule for ``module``'s exact type (subclasses may change forward: no rule)."""
    return RULES.get(type(module))


def check_supported(name: str, module: nn.Module) -> None:
    """Raises for configurations whose per-example gradients a rule cannot express."""
    if isinstance(module, nn.Embedding) and type(module) is nn.Embedding:
        if module.sparse:
            raise NotImplementedError(
                f"module '{name}' (nn.Embedding): sparse=True gradients are not supported by engm_fast; "
                "use sparse=False"
            )
        if module.scale_grad_by_freq:
            raise NotImplementedError(
                f"module '{name}' (nn.Embedding): scale_grad_by_freq=True scales each row by its frequency "
                "in the whole batch, which couples examples; engm_fast does not support it"
            )
