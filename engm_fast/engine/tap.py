"""The identity autograd node that records a layer call for the engine's own backward.

The engine puts one tap on the output of every recorded call. In forward it is the identity
(it returns detached aliases of its outputs, see :class:`_Tap`). In backward it receives
``b = dL/d(output)``:

* during the engine's backward (``engine._session`` is set) it hands ``b`` and the call's
  saved tensors to its :class:`Record` (through ``engine._complete``), which turns them into
  per-example contributions, and returns ``b`` unchanged;
* during any other backward (a PGD attack's ``autograd.grad`` w.r.t. the input, a user's
  ``loss.backward()``) it only returns ``b``: nothing is kept.

Every tap also takes the engine's ``anchor``, a 0-dim leaf. The engine's backward asks autograd
for the gradient of the anchor alone, which runs exactly the nodes between the loss and the
taps: layers' input gradients are computed, but the weight gradients (AccumulateGrad of the
parameters are not needed) and the first layer's input gradient are skipped by autograd
itself. The record is referenced only from the graph, so it is freed with the graph.

The tap is written with ``setup_context`` so that torch.func transforms accept it; the engine
does not record inside transforms anyway (:func:`recording_allowed`).
"""
from __future__ import annotations

import torch

__all__ = ["ModuleRecord", "ParamRecord", "Record", "tap", "recording_allowed"]


class Record:
    """One recorded call. Subclasses implement :meth:`complete`.

    Attributes:
        engine: the engine that made it.
        n_out: how many of the tap's tensors are outputs (the rest are saved for backward).
    """

    __slots__ = ("engine", "n_out")

    def __init__(self, engine, n_out: int = 1):
        self.engine, self.n_out = engine, n_out

    def complete(self, grads: tuple, saved: tuple) -> None:
        """Called in the engine's backward with the outputs' gradients and the saved tensors."""
        raise NotImplementedError(f"{type(self).__name__} must implement complete")

    def describe(self) -> str:
        """How messages name the call."""
        return type(self).__name__


class ModuleRecord(Record):
    """A call of a named module whose first tapped output's gradient gives per-example gradients.

    Subclasses set ``kind`` (how messages name the call next to the module's name) and implement
    :meth:`contribute`, which runs without autograd, only when a gradient reached the output and
    :meth:`wanted` says a parameter needs one, after the gradient's batch size is checked.
    """

    __slots__ = ("name",)
    kind = "module"

    def __init__(self, engine, name: str):
        super().__init__(engine)
        self.name = name

    def describe(self) -> str:
        return f"module '{self.name}' ({self.kind})"

    def wanted(self) -> bool:
        """Whether any parameter of the call wants a gradient."""
        return True

    def complete(self, grads: tuple, saved: tuple) -> None:
        g = grads[0]
        if g is None or not self.wanted():
            return
        self.engine._check_batch(g, self)
        with torch.no_grad():
            self.contribute(g, saved)

    def contribute(self, grad: torch.Tensor, saved: tuple) -> None:
        """Adds the per-example gradients from the output gradient ``grad``."""
        raise NotImplementedError(f"{type(self).__name__} must implement contribute")


class ParamRecord(ModuleRecord):
    """A :class:`ModuleRecord` for one parameter, ``param``."""

    __slots__ = ("param",)
    kind = "parameter"

    def __init__(self, engine, name: str, param: torch.Tensor):
        super().__init__(engine, name)
        self.param = param

    def wanted(self) -> bool:
        return self.param.requires_grad


class _Tap(torch.autograd.Function):
    @staticmethod
    def forward(anchor, record, *tensors):
        # Detached aliases, not the inputs themselves or views of them: autograd treats them as
        # fresh outputs, so in-place ops that follow (ReLU(inplace=True)) stay legal, and outputs
        # that are views themselves (Linear on [B, T, d]) are not rebased around the tap. The
        # aliases share the version counter, so in-place misuse is still detected.
        outs = tuple(t.detach() for t in tensors[:record.n_out])
        return outs if record.n_out > 1 else outs[0]

    @staticmethod
    def setup_context(ctx, inputs, output):
        record = inputs[1]
        ctx.record = record
        # save_for_backward (not a ctx attribute) so in-place changes of an input after the
        # forward are caught by autograd's version check instead of silently corrupting g_i.
        ctx.save_for_backward(*inputs[2 + record.n_out:])

    @staticmethod
    def backward(ctx, *grads):
        record = ctx.record
        saved = ctx.saved_tensors
        engine = record.engine
        if engine.in_own_backward():
            engine._complete(record, grads, saved)
        return (None, None) + grads + (None,) * len(saved)


# torch.autograd.Function.apply binds a Function with setup_context to its forward's signature
# (inspect.signature, about 150 us per call: most of a tap's cost). Taps are only made outside
# torch.func transforms (recording_allowed) and take no defaults, so the C++ apply that it then
# calls is called directly.
_apply = super(torch.autograd.Function, _Tap).apply


def tap(record: Record, outputs: tuple, saved: tuple = ()):
    """``outputs`` routed through one tap node (a tensor, or a tuple when several); ``saved``
    are kept for the record's :meth:`~Record.complete`."""
    record.n_out = len(outputs)
    return _apply(record.engine._anchor, record, *outputs, *saved)


def recording_allowed() -> bool:
    """Whether a forward may be recorded now: autograd is on and no torch.func transform
    (vmap, grad, jvp, ...) is running (those trace the model with wrapped tensors; the engine
    leaves them alone and they see the plain model)."""
    return torch.is_grad_enabled() and not torch._C._are_functorch_transforms_active()
