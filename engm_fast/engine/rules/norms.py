"""Normalization layers: LayerNorm, GroupNorm, RMSNorm, BatchNorm1d/2d/3d, and the matching
``F.layer_norm`` / ``F.group_norm`` / ``F.rms_norm`` / ``F.batch_norm`` calls on parameters of
modules without a rule.

Each recomputes the normalized input ``xhat`` from the saved input with the layer's own
statistics and materializes ``dgamma_i = sum xhat_i * b_i`` and ``dbeta_i = sum b_i``
(:class:`Dense`, ``[B, *param_shape]``: cheap).

BatchNorm in training mode couples the examples of a batch. The engine's convention
(docs/design.md, "BatchNorm") is ``g_i := b_i^T a_i`` with ``b`` the output gradient of the
batch loss: the term of example ``i`` in the sum decomposition of the batch gradient. For
models without cross-example coupling this is the true per-example gradient.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..contributions import Contribution, Dense
from ..registry import register_functional, register_rule

__all__ = []


def _trainable(p):
    return p if isinstance(p, torch.Tensor) and p.requires_grad else None


def _trailing_affine(xhat: torch.Tensor, b: torch.Tensor, weight, bias, shape) -> dict[str, Contribution]:
    """dgamma/dbeta of parameters over the trailing dims ``shape`` (LayerNorm, RMSNorm)."""
    out: dict[str, Contribution] = {}
    B = b.shape[0]
    if weight is not None:
        out["weight"] = Dense((xhat * b).reshape((B, -1) + tuple(shape)).sum(1))
    if bias is not None:
        out["bias"] = Dense(b.reshape((B, -1) + tuple(shape)).sum(1))
    return out


def _channel_affine(xhat: torch.Tensor, b: torch.Tensor, weight, bias) -> dict[str, Contribution]:
    """Per-channel dgamma/dbeta for inputs ``[B, C, *spatial]`` (BatchNorm, GroupNorm)."""
    B, C = b.shape[:2]
    out: dict[str, Contribution] = {}
    if weight is not None:
        out["weight"] = Dense((xhat * b).reshape(B, C, -1).sum(2))
    if bias is not None:
        out["bias"] = Dense(b.reshape(B, C, -1).sum(2))
    return out


def _normalized_shape(shape):
    return (shape,) if isinstance(shape, int) else tuple(shape)


def layer_norm_contributions(x, b, normalized_shape, weight, bias, eps) -> dict[str, Contribution]:
    shape = _normalized_shape(normalized_shape)
    xhat = F.layer_norm(x, shape, None, None, eps)
    return _trailing_affine(xhat, b, weight, bias, shape)


def rms_norm_contributions(x, b, normalized_shape, weight, eps) -> dict[str, Contribution]:
    shape = _normalized_shape(normalized_shape)
    xhat = F.rms_norm(x, shape, None, eps)
    return _trailing_affine(xhat, b, weight, None, shape)


def group_norm_contributions(x, b, num_groups, weight, bias, eps) -> dict[str, Contribution]:
    xhat = F.group_norm(x, num_groups, None, None, eps)
    return _channel_affine(xhat, b, weight, bias)


def batch_norm_contributions(x, b, running_mean, running_var, weight, bias, use_batch_stats, eps):
    # Same statistics as the forward: batch statistics in training mode or without running
    # stats, else the running estimates (unchanged since the forward in eval mode).
    if use_batch_stats:
        xhat = F.batch_norm(x, None, None, None, None, True, 0.0, eps)
    else:
        xhat = F.batch_norm(x, running_mean, running_var, None, None, False, 0.0, eps)
    return _channel_affine(xhat, b, weight, bias)


@register_rule(nn.LayerNorm, positionwise=True)
def _layer_norm(module: nn.LayerNorm, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    return layer_norm_contributions(inputs[0], b, module.normalized_shape, _trainable(module.weight),
                                    _trainable(module.bias), module.eps)


@register_rule(nn.GroupNorm)
def _group_norm(module: nn.GroupNorm, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
    return group_norm_contributions(inputs[0], b, module.num_groups, _trainable(module.weight),
                                    _trainable(module.bias), module.eps)


if hasattr(nn, "RMSNorm"):
    @register_rule(nn.RMSNorm, positionwise=True)
    def _rms_norm(module: nn.RMSNorm, inputs: tuple, b: torch.Tensor) -> dict[str, Contribution]:
        return rms_norm_contributions(inputs[0], b, module.normalized_shape, _trainable(module.weight), module.eps)


def _batch_norm(module: nn.modules.batchnorm._BatchNorm, inputs: tuple, b: torch.Tensor) -> dict:
    use_batch_stats = module.training or module.running_mean is None
    return batch_norm_contributions(inputs[0], b, module.running_mean, module.running_var,
                                    _trainable(module.weight), _trainable(module.bias), use_batch_stats, module.eps)


for _cls in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d):
    register_rule(_cls)(_batch_norm)


def _binder(names, defaults):
    def bind(args, kwargs):
        bound = dict(defaults)
        bound.update(zip(names, args))
        bound.update(kwargs)
        return bound

    return bind


register_functional(
    F.layer_norm, _binder(("input", "normalized_shape", "weight", "bias", "eps"), {"weight": None, "bias": None,
                                                                                     "eps": 1e-5}),
    lambda d, b: layer_norm_contributions(d["input"], b, d["normalized_shape"], d["weight"], d["bias"], d["eps"]))
register_functional(
    F.group_norm, _binder(("input", "num_groups", "weight", "bias", "eps"), {"weight": None, "bias": None,
                                                                               "eps": 1e-5}),
    lambda d, b: group_norm_contributions(d["input"], b, d["num_groups"], d["weight"], d["bias"], d["eps"]))
if hasattr(F, "rms_norm"):
    register_functional(
        F.rms_norm, _binder(("input", "normalized_shape", "weight", "eps"), {"weight": None, "eps": None}),
        lambda d, b: rms_norm_contributions(d["input"], b, d["normalized_shape"], d["weight"], d["eps"]))
register_functional(
    F.batch_norm, _binder(("input", "running_mean", "running_var", "weight", "bias", "training", "momentum", "eps"),
                          {"weight": None, "bias": None, "training": False, "momentum": 0.1, "eps": 1e-5}),
    lambda d, b: batch_norm_contributions(d["input"], b, d["running_mean"], d["running_var"], d["weight"], d["bias"],
                                          d["training"] or d["running_mean"] is None, d["eps"]))
