"""The identity autograd node that records a layer call for the engine's own backward.

The engine puts one ``_Tap`` on the output of every call of a module it manages. In forward it
is the identity (it returns a detached alias, see ``_Tap.forward``). In backward it receives ``b`` = dL/d(output):

* during the engine's backward (``engine._session`` is a list) it appends the call's record
  (module, saved inputs, ``b``) and returns ``b`` unchanged;
* during any other backward (a PGD attack's ``autograd.grad`` w.r.t. the input, a user's
  ``loss.backward()``) it only returns ``b``: nothing is kept.

Every tap also takes the engine's ``anchor``, a 0-dim leaf. The engine's backward asks autograd
for the gradient of the anchor alone, which runs exactly the nodes between the loss and the
taps: layers' input gradients are computed, but the weight gradients (AccumulateGrad of the
parameters are not needed) and the first layer's input gradient are skipped by autograd
itself. The record is referenced only from the graph (``ctx``), so it is freed with the graph.
"""
from __future__ import annotations

import torch

__all__ = ["Record", "tap"]


class Record:
    """One call of a managed module, completed in backward with the output gradients."""

    __slots__ = ("name", "module", "template", "inputs", "kwargs", "grads", "out_positions", "contributions")

    def __init__(self, name: str, module: torch.nn.Module, args: tuple, kwargs: dict):
        self.name, self.module, self.kwargs = name, module, kwargs
        # Positional arguments with None where a tensor was: tensors travel through the graph.
        self.template = tuple(None if isinstance(a, torch.Tensor) else a for a in args)
        self.inputs: tuple = ()
        self.grads: tuple = ()
        self.out_positions: list[int] = [0]  # which items of a tuple output were tapped
        # Set when the engine turns the call into its contributions inside the backward (it then
        # drops inputs and grads); None until then, and for fallback modules.
        self.contributions: dict | None = None

    def args(self) -> tuple:
        """The positional arguments of the call, tensors restored from the graph."""
        tensors = iter(self.inputs)
        return tuple(next(tensors) if a is None else a for a in self.template)


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(ctx, anchor, engine, record, n_out, *tensors):
        outs, inputs = tensors[:n_out], tensors[n_out:]
        ctx.engine, ctx.record, ctx.n_out = engine, record, n_out
        # save_for_backward (not a ctx attribute) so in-place changes of an input after the
        # forward are caught by autograd's version check instead of silently corrupting g_i.
        ctx.save_for_backward(*inputs)
        # A detached alias, not the input itself or a view of it: autograd treats it as a fresh
        # output, so in-place ops that follow (ReLU(inplace=True)) stay legal, and outputs that
        # are views themselves (Linear on [B, T, d]) are not rebased around the tap. The alias
        # shares the version counter, so in-place misuse is still detected.
        outs = tuple(o.detach() for o in outs)
        return outs if n_out > 1 else outs[0]

    @staticmethod
    def backward(ctx, *grads):
        session = ctx.engine._session
        if session is not None:
            record = ctx.record
            record.inputs = ctx.saved_tensors
            record.grads = grads
            record.contributions = None
            session.append(record)
            ctx.engine._on_recorded(record)
        return (None, None, None, None) + grads + (None,) * (len(ctx.saved_tensors))


def tap(anchor: torch.Tensor, engine, record: Record, outputs: tuple, inputs: tuple):
    """Returns ``outputs`` routed through one tap node (a tensor, or a tuple when several)."""
    return _Tap.apply(anchor, engine, record, len(outputs), *outputs, *inputs)
