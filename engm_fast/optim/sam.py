"""SAM and ASAM: sharpness-aware minimization (Foret et al. 2021; Kwon et al. 2021).

One SAM step at weights ``w`` with gradient ``g = grad L(w)``::

    e  = rho * g / ||g||                          (SAM)
    e  = rho * T^2 g / ||T g||,  T = |w|           (ASAM, ``adaptive=True``; elementwise)
    g' = grad L(w + e)
    w  <- base_optimizer step from w with gradient g'

``||.||`` is the L2 norm over every parameter of the optimizer (all param groups). Each param
group may carry its own ``rho`` and ``adaptive``. ASAM's offset ``T = |w| + eta`` (Kwon et al.)
is taken with ``eta = 0``, as in the widely used reference implementation: a parameter that is
exactly zero is not perturbed.

Two ways to drive it:

* ``opt.step(closure)``: the closure clears gradients, computes the batch loss, calls
  ``backward`` and returns the loss; it is called twice (at ``w`` and at ``w + e``).
* explicit: ``loss(w).backward(); opt.first_step(zero_grad=True); loss(w+e).backward();
  opt.second_step()``.

BatchNorm: the second forward (at ``w + e``) must not update the running statistics again.
Pass ``model=`` to the optimizer and ``step(closure)`` runs the second closure call inside
:func:`frozen_bn_stats`; with the explicit API, wrap the second forward in
``with frozen_bn_stats(model):`` yourself.
"""
from __future__ import annotations

import contextlib
from typing import Callable

import torch
import torch.nn as nn

__all__ = ["SAM", "frozen_bn_stats"]


@contextlib.contextmanager
def frozen_bn_stats(model: nn.Module):
    """Inside the block, BatchNorm layers of ``model`` in train mode normalize with the batch
    statistics (as usual) but do not update ``running_mean``/``running_var``/``num_batches_tracked``.

    Implemented by setting ``track_running_stats = False`` on every ``_BatchNorm`` module for the
    duration of the block (PyTorch then passes no running buffers to the kernel in train mode and
    still uses them in eval mode), and restoring each module's flag afterwards. Unlike setting
    ``momentum = 0`` this also leaves ``num_batches_tracked`` (and hence ``momentum=None``
    cumulative averages) untouched.

    Example:
        >>> import torch
        >>> bn = torch.nn.BatchNorm1d(3)
        >>> with frozen_bn_stats(bn):
        ...     _ = bn(torch.randn(8, 3) + 5.0)
        >>> float(bn.running_mean.abs().max()), int(bn.num_batches_tracked)
        (0.0, 0)
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"frozen_bn_stats needs an nn.Module, got {type(model).__name__}")
    saved = []
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            saved.append((m, m.track_running_stats))
            m.track_running_stats = False
    try:
        yield model
    finally:
        for m, flag in saved:
            m.track_running_stats = flag


def _make_base(base_optimizer, param_groups: list, kwargs: dict) -> torch.optim.Optimizer:
    if isinstance(base_optimizer, torch.optim.Optimizer):
        if kwargs:
            raise TypeError(f"base optimizer keyword arguments {sorted(kwargs)} are only used when base_optimizer "
                            "is a class or factory, not an optimizer instance")
        ours = {p for g in param_groups for p in g["params"]}
        theirs = {p for g in base_optimizer.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError("base_optimizer (an instance) must optimize exactly the parameters given to SAM "
                             f"({len(theirs)} vs {len(ours)} tensors)")
        return base_optimizer
    if not callable(base_optimizer):
        raise TypeError("base_optimizer must be a torch.optim.Optimizer class, a factory params -> Optimizer, or an "
                        f"Optimizer instance; got {type(base_optimizer).__name__}")
    base = base_optimizer(param_groups, **kwargs)
    if not isinstance(base, torch.optim.Optimizer):
        raise TypeError(f"base_optimizer(...) returned {type(base).__name__}, not a torch.optim.Optimizer")
    return base


class SAM(torch.optim.Optimizer):
    """Sharpness-aware minimization around any base optimizer; ASAM with ``adaptive=True``.

    Args:
        params: parameters or param groups (groups may set ``rho`` / ``adaptive``).
        base_optimizer: an optimizer class or factory (``torch.optim.SGD``,
            ``lambda groups, **kw: ...``) called as ``base_optimizer(param_groups, **kwargs)``,
            or an existing optimizer over the same parameters.
        rho: radius of the ascent step (> 0).
        adaptive: ASAM's elementwise scaling ``T = |w|`` (scale-invariant sharpness).
        model: optional; when given, the second closure call of :meth:`step` runs inside
            :func:`frozen_bn_stats` so BatchNorm statistics are updated once per step.
        **kwargs: passed to ``base_optimizer`` when it is a class or factory (``lr``, ...).

    The base optimizer shares this optimizer's ``param_groups`` (an LR scheduler may be attached
    to either). ``state_dict()`` holds the base optimizer's state.

    Example:
        >>> import torch
        >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
        <...>
        >>> model = torch.nn.Linear(3, 1)
        >>> x, y = torch.randn(16, 3), torch.randn(16, 1)
        >>> opt = SAM(model.parameters(), torch.optim.SGD, rho=0.05, lr=0.1, model=model)
        >>> def closure():
        ...     opt.zero_grad()
        ...     loss = torch.nn.functional.mse_loss(model(x), y)
        ...     loss.backward()
        ...     return loss
        >>> first = opt.step(closure)
        >>> bool(torch.nn.functional.mse_loss(model(x), y) < first)
        True
    """

    def __init__(self, params, base_optimizer, rho: float = 0.05, adaptive: bool = False,
                 model: nn.Module | None = None, **kwargs):
        if not (isinstance(rho, (int, float)) and rho > 0):
            raise ValueError(f"rho must be a positive number, got {rho!r}")
        if not isinstance(adaptive, bool):
            raise TypeError(f"adaptive must be a bool, got {adaptive!r}")
        if model is not None and not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module or None, got {type(model).__name__}")
        super().__init__(params, dict(rho=rho, adaptive=adaptive))
        self.base_optimizer = _make_base(base_optimizer, self.param_groups, kwargs)
        # one list of group dicts shared with the base optimizer, so a scheduler or a user
        # editing either sees the same hyperparameters
        for g in self.base_optimizer.param_groups:
            g.setdefault("rho", rho)
            g.setdefault("adaptive", adaptive)
        self.param_groups = self.base_optimizer.param_groups
        for g in self.param_groups:
            if not (isinstance(g["rho"], (int, float)) and g["rho"] > 0):
                raise ValueError(f"param group rho must be a positive number, got {g['rho']!r}")
        self.model = model
        self._transient: dict = {}
        self._ascended = False
        self.defaults.update(self.base_optimizer.defaults)
        self.state = self.base_optimizer.state  # one state dict: the base optimizer's

    # -- the two half steps ---------------------------------------------------------------------
    @torch.no_grad()
    def _grad_norm(self) -> torch.Tensor:
        """``||T g||`` over all parameters with a gradient (T = |w| where adaptive, else 1)."""
        parts = []
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad.abs() * p.abs() if group["adaptive"] else p.grad
                parts.append(g.double().pow(2).sum())
        if not parts:
            raise RuntimeError("SAM.first_step: no parameter has a gradient; run backward on the loss at w first")
        return torch.stack(parts).sum().sqrt()

    def _check_not_ascended(self) -> None:
        if self._ascended:
            raise RuntimeError("SAM.first_step called twice without a second_step in between: the weights are "
                               "still at w + e from the first one")

    @torch.no_grad()
    def first_step(self, zero_grad: bool = False) -> None:
        """Moves every parameter to ``w + e`` using the gradients in ``.grad``.

        Call :meth:`second_step` after the backward at ``w + e``. Parameters without a gradient
        do not move. A zero gradient gives ``e = 0``. Raises if the previous first_step has not
        been undone by a second_step (a second ascent would leave the first in the weights).
        """
        self._check_not_ascended()
        norm = self._grad_norm()
        for group in self.param_groups:
            scale = group["rho"] / (float(norm) + 1e-12)
            for p in group["params"]:
                if p.grad is None:
                    self._aux(p).pop("sam_e", None)
                    continue
                e = p.grad * scale
                if group["adaptive"]:
                    e = e * p.pow(2)
                self._aux(p)["sam_e"] = e
                p.add_(e)
        self._ascended = True
        if zero_grad:
            self.zero_grad()

    @torch.no_grad()
    def second_step(self, zero_grad: bool = False) -> None:
        """Restores ``w`` and takes the base optimizer's step with the gradient at ``w + e``."""
        if not self._ascended:
            raise RuntimeError("SAM.second_step called without a first_step before it")
        for group in self.param_groups:
            for p in group["params"]:
                e = self._aux(p).pop("sam_e", None)
                if e is not None:
                    p.sub_(e)
        self._ascended = False
        self.base_optimizer.step()
        if zero_grad:
            self.zero_grad()

    def _aux(self, p) -> dict:
        # the ascent vectors are transient: kept apart from the base optimizer's state so that
        # state_dict() never contains them
        return self._transient.setdefault(p, {})

    def _second_pass(self, closure: Callable):
        ctx = frozen_bn_stats(self.model) if self.model is not None else contextlib.nullcontext()
        with ctx, torch.enable_grad():
            return closure()

    def step(self, closure: Callable | None = None):
        """One SAM step; ``closure`` (required) zeroes gradients, computes the loss, calls
        ``backward`` and returns the loss. Returns the loss at ``w`` (before the step)."""
        if closure is None:
            raise ValueError("SAM.step needs a closure (it evaluates the loss twice); or call first_step() and "
                             "second_step() around your own backward passes")
        self.zero_grad()
        with torch.enable_grad():
            loss = closure()
        self.first_step(zero_grad=True)
        self._second_pass(closure)
        self.second_step()
        return loss

    # -- state ---------------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return self.base_optimizer.state_dict()

    def load_state_dict(self, state_dict: dict) -> None:
        self.base_optimizer.load_state_dict(state_dict)
        self.param_groups = self.base_optimizer.param_groups
        self.state = self.base_optimizer.state
