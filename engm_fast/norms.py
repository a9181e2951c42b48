"""``per_example_grad_norms``: each example's gradient norm over a model's parameters."""
from __future__ import annotations

import warnings

import torch
import torch.nn as nn

from .engine import engine_of
from .engine.engine import _check_losses
from .engine.fsdp2 import is_sharded
from .reference import accumulation_dtype

__all__ = ["per_example_grad_norms"]


def per_example_grad_norms(model: nn.Module, losses: torch.Tensor, retain_graph: bool = False) -> torch.Tensor:
    """L2 norm of each example's gradient over all trainable parameters of ``model``.

    With an engine attached (``engm_fast.attach(model)`` or an ``ENGM(model, ...)`` built before
    the forward) this is one backward pass. Without one, it falls back to one backward per
    example (exact, slow; a warning says so). Leaves every ``.grad`` as it was.

    On a model sharded with FSDP2 (``fully_shard``), the norms are this rank's examples', over
    the full-size parameters, from this rank's records (no communication for the norms); the
    backward runs FSDP's collectives, so every rank calls it (an empty ``[0]`` batch is
    allowed there) and an error on one rank raises on all.

    Args:
        model: the model whose forward produced ``losses``.
        losses: ``[B]`` per-example losses (not averaged).
        retain_graph: keep the graph for a later backward.

    Returns:
        ``[B]`` float32 norms (float64 for a float64 model).

    Raises:
        TypeError: ``losses`` is not a floating-point tensor.
        ValueError: ``losses`` is not 1-D, is empty, has no graph to the model, or (with an
            engine) its length is not the batch the model saw. ``ENGM.backward`` raises the same
            types for the same inputs.

    Example:
        >>> import torch, engm_fast
        >>> model = torch.nn.Linear(3, 1)
        >>> engm_fast.attach(model)  # doctest: +ELLIPSIS
        <...PerExampleEngine object at ...>
        >>> losses = model(torch.randn(4, 3)).squeeze(1) ** 2
        >>> engm_fast.per_example_grad_norms(model, losses).shape
        torch.Size([4])
    """
    engine = engine_of(model)
    if is_sharded(model):  # FSDP2: every rank calls it, an empty batch allowed
        if engine is None:
            raise ValueError("per_example_grad_norms on a model sharded with FSDP2 needs the engine: call "
                             "engm_fast.attach(model) after fully_shard and before the forward (the slow "
                             "one-backward-per-example route does not run on sharded parameters)")
        from .optim.fsdp import sharded_per_example_grad_norms

        return sharded_per_example_grad_norms(model, engine, losses, retain_graph)
    _check_losses(losses)
    if engine is not None:
        return engine.backward(losses, retain_graph=retain_graph).sqnorms().sqrt()
    warnings.warn(
        "per_example_grad_norms: no engine is attached to this model, so each example takes its own "
        "backward pass (slow). Call engm_fast.attach(model) before the forward for the one-backward engine.",
        stacklevel=2,
    )
    params = [p for p in model.parameters() if p.requires_grad]
    acc = accumulation_dtype(losses.dtype)
    out = torch.zeros(losses.shape[0], dtype=acc, device=losses.device)
    reached = False
    for i in range(losses.shape[0]):
        keep = retain_graph or i + 1 < losses.shape[0]
        grads = torch.autograd.grad(losses[i], params, retain_graph=keep, allow_unused=True)
        reached = reached or any(g is not None for g in grads)
        out[i] = sum(g.to(acc).pow(2).sum() for g in grads if g is not None) if any(g is not None for g in grads) else 0.0
    if not reached:  # as the engine: a ValueError, not norms of 0
        raise ValueError("losses have no graph to the model's trainable parameters (losses from another model?)")
    return out.sqrt()
