"""Grafting: the magnitude of one optimizer's update with the direction of another's.

Agarwal et al.'s grafting, used by Jelassi et al. (arXiv 2210.04319) to dissect Adam in GANs:
Ada_nSGDA is ``Graft(magnitude=Adam, direction=SGD)``. Each step, from the same gradient::

    u_mag = the update the magnitude optimizer would make   (its own state advances)
    u_dir = the update the direction optimizer would make   (its own state advances)
    p    <- p + ||u_mag|| * u_dir / ||u_dir||

with the norms per tensor (``granularity="layer"``) or over all tensors (``"global"``). Where
``||u_dir|| = 0`` the tensor does not move (no direction is defined).

Each inner optimizer is built by its factory on the same parameters; their steps are taken one
after the other from the same starting point and gradient (parameters and gradients are
restored between them), and the grafted update is applied last.
"""
from __future__ import annotations

from typing import Callable

import torch

from .nsgd import _check_granularity

__all__ = ["Graft"]

Factory = Callable[[list], torch.optim.Optimizer]


class Graft(torch.optim.Optimizer):
    """``||u_magnitude|| * u_direction / ||u_direction||`` per tensor or globally.

    Args:
        params: parameters or param groups; the factories receive the same list.
        magnitude: factory ``params -> Optimizer`` whose update norm is used.
        direction: factory ``params -> Optimizer`` whose update direction is used.
        granularity: ``"layer"`` (per tensor) or ``"global"`` (one norm over all tensors).

    The inner optimizers are ``opt.magnitude`` and ``opt.direction``; their learning rates live
    in their own param groups (attach LR schedulers to them). ``state_dict()`` holds both.

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([1.0, 1.0]))
        >>> opt = Graft([w], magnitude=lambda ps: torch.optim.Adam(ps, lr=0.1),
        ...             direction=lambda ps: torch.optim.SGD(ps, lr=1.0))
        >>> w.grad = torch.tensor([3.0, 4.0])
        >>> opt.step()
        >>> [round(v, 4) for v in w.detach().tolist()]  # |Adam step| = 0.1*sqrt(2), along -(0.6, 0.8)
        [0.9151, 0.8869]
    """

    def __init__(self, params, magnitude: Factory, direction: Factory, granularity: str = "layer"):
        self.granularity = _check_granularity(granularity)
        for name, f in (("magnitude", magnitude), ("direction", direction)):
            if not callable(f) or isinstance(f, torch.optim.Optimizer):
                raise TypeError(f"{name} must be a factory params -> torch.optim.Optimizer (e.g. "
                                f"lambda ps: torch.optim.Adam(ps, lr=1e-3)), got {type(f).__name__}")
        params = list(params)
        super().__init__(params, {})
        self.magnitude = self._build(magnitude, params, "magnitude")
        self.direction = self._build(direction, params, "direction")

    def _build(self, factory: Factory, params: list, name: str) -> torch.optim.Optimizer:
        # the factory gets its own copies of any group dicts: the two optimizers must not share
        # (and overwrite) each other's hyperparameters
        arg = [dict(g) if isinstance(g, dict) else g for g in params]
        opt = factory(arg)
        if not isinstance(opt, torch.optim.Optimizer):
            raise TypeError(f"{name}(params) returned {type(opt).__name__}, not a torch.optim.Optimizer")
        ours = {p for g in self.param_groups for p in g["params"]}
        theirs = {p for g in opt.param_groups for p in g["params"]}
        if ours != theirs:
            raise ValueError(f"{name}(params) must optimize exactly the parameters given to Graft")
        return opt

    def _tensors(self) -> list[torch.Tensor]:
        return [p for g in self.param_groups for p in g["params"] if p.grad is not None]

    @torch.no_grad()
    def _proposal(self, opt: torch.optim.Optimizer, params, start, grads) -> list[torch.Tensor]:
        for p, g in zip(params, grads):
            p.grad.copy_(g)  # an inner step that edits .grad in place must not leak into the other
        opt.step()
        out = [p - p0 for p, p0 in zip(params, start)]
        for p, p0 in zip(params, start):
            p.copy_(p0)
        return out

    @torch.no_grad()
    def step(self, closure=None):
        """One grafted step from the gradients in ``.grad`` (params without one are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        params = self._tensors()
        if not params:
            return loss
        start = [p.detach().clone() for p in params]
        grads = [p.grad.detach().clone() for p in params]
        u_mag = self._proposal(self.magnitude, params, start, grads)
        u_dir = self._proposal(self.direction, params, start, grads)
        for p, g in zip(params, grads):
            p.grad.copy_(g)
        if self.granularity == "layer":
            for p, um, ud in zip(params, u_mag, u_dir):
                nd = float(ud.double().norm())
                if nd > 0:
                    p.add_(ud, alpha=float(um.double().norm()) / nd)
        else:
            nm = float(torch.stack([u.double().pow(2).sum() for u in u_mag]).sum().sqrt())
            nd = float(torch.stack([u.double().pow(2).sum() for u in u_dir]).sum().sqrt())
            if nd > 0:
                for p, ud in zip(params, u_dir):
                    p.add_(ud, alpha=nm / nd)
        return loss

    def state_dict(self) -> dict:
        return {"magnitude": self.magnitude.state_dict(), "direction": self.direction.state_dict(),
                "granularity": self.granularity}

    def load_state_dict(self, state_dict: dict) -> None:
        missing = {"magnitude", "direction"} - set(state_dict)
        if missing:
            raise ValueError(f"Graft.load_state_dict: missing {sorted(missing)} (not a Graft state_dict?)")
        if state_dict.get("granularity", self.granularity) != self.granularity:
            raise ValueError(f"state_dict was saved with granularity={state_dict['granularity']!r}, this optimizer "
                             f"uses {self.granularity!r}")
        self.magnitude.load_state_dict(state_dict["magnitude"])
        self.direction.load_state_dict(state_dict["direction"])
