"""torch.func fallback for calls the engine cannot follow otherwise (correct, slower).

A module without a rule normally has its parameters followed as shared tensors
(:mod:`engm_fast.engine.shared`). When one of them meets an operation the engine cannot follow
(an ``einsum`` with a batched tensor, say), that call of the module ``M`` falls back here: the
engine records ``M``'s inputs and the gradient ``b`` of the loss with respect to ``M``'s
output(s). The per-example gradient of ``M``'s own parameters ``p`` is then the
vector-Jacobian product of ``M``'s forward on example ``i`` alone with cotangent ``b_i``::

    g_i = d/dp  < M(p; x_i), b_i >        computed as vmap(grad(...)) over the batch

This is exact when ``M`` treats examples independently (no BatchNorm-like coupling inside
``M``) and its tensor arguments are batched along dimension 0. It re-runs ``M``'s forward
once per step under ``vmap`` and materializes ``[B, *p.shape]`` for ``M``'s parameters, so it
costs roughly one extra forward and backward of ``M``. Only ``M``'s own parameters are
differentiated (those of submodules are handled by their own hooks).
"""
from __future__ import annotations

import torch
import torch.nn as nn
from torch.func import functional_call, grad, vmap

from .contributions import Dense

__all__ = ["fallback_contributions", "fallback_parameter_names"]


def fallback_parameter_names(module: nn.Module) -> list[str]:
    """Names (relative to ``module``) of the parameters the fallback differentiates: its own."""
    return [n for n, p in module.named_parameters(recurse=False) if p.requires_grad]


def fallback_contributions(module: nn.Module, module_name: str, args: tuple, kwargs: dict,
                           grads: tuple, out_positions: list[int], batch_size: int) -> dict[str, Dense]:
    """Per-example gradients of ``module``'s parameters as :class:`Dense` contributions.

    ``grads[j]`` is the output gradient of output item ``out_positions[j]`` (``None`` if unused).
    """
    names = fallback_parameter_names(module)
    if not names:
        return {}
    params = {n: module.get_parameter(n).detach() for n in names}
    arg_dims = tuple(0 if isinstance(x, torch.Tensor) and x.dim() > 0 and x.shape[0] == batch_size else None
                     for x in args)
    kw_names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
    kw_tensors = tuple(kwargs[k] for k in kw_names)
    kw_dims = tuple(0 if v.dim() > 0 and v.shape[0] == batch_size else None for v in kw_tensors)
    static_kwargs = {k: v for k, v in kwargs.items() if k not in kw_names}
    if not any(d == 0 for d in arg_dims + kw_dims):
        raise NotImplementedError(
            f"module '{module_name}' ({type(module).__name__}): the torch.func fallback needs at least one "
            f"tensor argument batched along dim 0 with the batch size {batch_size}"
        )
    used = [(pos, g) for pos, g in zip(out_positions, grads) if g is not None]
    grad_list = [g for _, g in used]
    used_positions = [pos for pos, _ in used]

    def unsqueeze(x, dim):
        return x.unsqueeze(0) if dim == 0 else x

    def inner_product(p, xs, kws, bs):
        call_args = tuple(unsqueeze(x, d) for x, d in zip(xs, arg_dims))
        call_kwargs = dict(static_kwargs)
        call_kwargs.update({k: unsqueeze(v, d) for k, v, d in zip(kw_names, kws, kw_dims)})
        out = functional_call(module, p, call_args, call_kwargs)
        outs = out if isinstance(out, (tuple, list)) else (out,)
        total = 0.0
        for pos, b_i in zip(used_positions, bs):
            total = total + (outs[pos] * b_i.unsqueeze(0)).sum()
        return total

    per_example = vmap(grad(inner_product), in_dims=(None, arg_dims, kw_dims, 0))(
        params, tuple(args), kw_tensors, tuple(grad_list)
    )
    return {n: Dense(g) for n, g in per_example.items()}
