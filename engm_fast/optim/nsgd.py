"""NSGD: normalized SGD with momentum, per tensor or global (nSGDA of Jelassi et al., arXiv 2210.04319).

Per step, with ``G`` the gradient and norms taken per tensor (``granularity="layer"``) or over
every tensor of the optimizer, all param groups together (``"global"``)::

    buf <- momentum * buf + G / ||G||          (a zero norm contributes 0, not NaN)
    p   <- p - lr * buf

With ``momentum=0`` each tensor moves by exactly ``lr`` in L2 norm (``"layer"``), or the whole
parameter vector does (``"global"``), whatever the gradient's scale: the two players of a GAN then
move at the same pace, the property nSGDA relies on. Applied to the generator and the
discriminator with two instances this is nSGDA.
"""
from __future__ import annotations

import torch

__all__ = ["NSGD"]

_GRANULARITIES = ("layer", "global")


def _check_granularity(granularity) -> str:
    if granularity not in _GRANULARITIES:
        raise ValueError(f"granularity must be one of {_GRANULARITIES}, got {granularity!r}")
    return granularity


class NSGD(torch.optim.Optimizer):
    """Normalized SGD with heavy-ball momentum on the normalized gradient.

    Args:
        params: parameters or param groups (``lr`` and ``momentum`` may differ per group).
        lr: step length (>= 0).
        momentum: heavy-ball coefficient in [0, 1).
        granularity: ``"layer"`` (each tensor normalized by its own norm) or ``"global"``
            (one norm over all tensors of the optimizer that have a gradient).

    Example:
        >>> import torch
        >>> w = torch.nn.Parameter(torch.tensor([3.0, 4.0]))
        >>> opt = NSGD([w], lr=0.5)
        >>> w.grad = torch.tensor([30.0, 40.0])
        >>> opt.step()
        >>> w.detach().tolist()  # moved by 0.5 along -g/||g|| = -(0.6, 0.8)
        [2.700000047683716, 3.5999999046325684]
    """

    def __init__(self, params, lr: float, momentum: float = 0.0, granularity: str = "layer"):
        if not (isinstance(lr, (int, float)) and lr >= 0):
            raise ValueError(f"Invalid learning rate: {lr!r}")
        if not (isinstance(momentum, (int, float)) and 0 <= momentum < 1):
            raise ValueError(f"momentum must be in [0, 1), got {momentum!r}")
        self.granularity = _check_granularity(granularity)
        super().__init__(params, dict(lr=lr, momentum=momentum))

    @torch.no_grad()
    def step(self, closure=None):
        """One normalized step on the gradients in ``.grad`` (params without one are skipped)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        global_scale = None
        if self.granularity == "global":
            sq = [p.grad.double().pow(2).sum() for g in self.param_groups for p in g["params"] if p.grad is not None]
            total = float(torch.stack(sq).sum().sqrt()) if sq else 0.0
            global_scale = 0.0 if total == 0.0 else 1.0 / total
        for group in self.param_groups:
            lr, mu = group["lr"], group["momentum"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                g = p.grad
                if global_scale is None:
                    n = float(g.double().norm())
                    scale = 0.0 if n == 0.0 else 1.0 / n
                else:
                    scale = global_scale
                d = g * scale
                if mu != 0:
                    state = self.state[p]
                    buf = state.get("momentum_buffer")
                    if buf is None:
                        buf = state["momentum_buffer"] = d.clone()
                    else:
                        buf.mul_(mu).add_(d)
                    d = buf
                p.add_(d, alpha=-lr)
        return loss

    def state_dict(self) -> dict:
        state = super().state_dict()
        state["granularity"] = self.granularity
        return state

    def load_state_dict(self, state_dict: dict) -> None:
        state_dict = dict(state_dict)
        granularity = state_dict.pop("granularity", self.granularity)
        if granularity != self.granularity:
            raise ValueError(f"state_dict was saved with granularity={granularity!r}, this optimizer uses "
                             f"{self.granularity!r}")
        super().load_state_dict(state_dict)
