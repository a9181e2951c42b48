"""Affine calibration of the input-gradient proxy: ``||g_i|| ~ alpha * ||grad_x loss_i|| + beta``.

ENGM's cheaper variant (docs/design.md, "The methods") weights examples by their input-gradient norm,
which the last PGD step gives for free. :class:`ProxyCalibration` keeps the pairs
``(input-gradient norm, exact parameter-gradient norm)`` of the last few calibration batches
(exact steps taken every ``calibrate_every`` steps), fits ``alpha, beta`` by least squares and
reports the Pearson correlation, so a user sees whether the proxy holds for their model.
"""
from __future__ import annotations

import math

import torch

__all__ = ["ProxyCalibration"]


class ProxyCalibration:
    """Least-squares fit of exact norms on input-gradient norms over recent calibration batches.

    Args:
        window: number of most recent calibration batches kept for the fit.

    Example:
        >>> cal = ProxyCalibration()
        >>> x = torch.tensor([1.0, 2.0, 3.0])
        >>> cal.update(x, 2 * x + 1)
        >>> round(cal.alpha, 6), round(cal.beta, 6), round(cal.pearson_r, 6)
        (2.0, 1.0, 1.0)
    """

    def __init__(self, window: int = 4):
        if window < 1:
            raise ValueError(f"window must be >= 1, got {window}")
        self.window = window
        self.batches: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.alpha = 1.0
        self.beta = 0.0
        self.pearson_r = float("nan")
        self.calibrations = 0
        # Predictions are clamped at the smallest exact norm in the window: an affine fit with
        # beta < 0 (or alpha < 0) can predict 0 or less for an input-gradient norm outside the
        # calibration data, and "normalize" would then give that example the weight 1/eps.
        self.floor = 0.0

    @property
    def fitted(self) -> bool:
        return self.calibrations > 0

    def update(self, input_norms: torch.Tensor, exact_norms: torch.Tensor) -> None:
        """Adds one batch of pairs and refits ``alpha``, ``beta`` and the correlation."""
        self.batches.append((input_norms.detach().double().cpu(), exact_norms.detach().double().cpu()))
        self.batches = self.batches[-self.window:]
        x = torch.cat([b[0] for b in self.batches])
        y = torch.cat([b[1] for b in self.batches])
        xc, yc = x - x.mean(), y - y.mean()
        sxx, syy, sxy = float((xc * xc).sum()), float((yc * yc).sum()), float((xc * yc).sum())
        if sxx > 0:
            self.alpha = sxy / sxx
            self.beta = float(y.mean()) - self.alpha * float(x.mean())
        else:  # all input norms equal: the best affine fit is the mean norm
            self.alpha, self.beta = 0.0, float(y.mean())
        self.pearson_r = sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")
        self.floor = max(0.0, float(y.min())) if y.numel() else 0.0
        self.calibrations += 1

    def predict(self, input_norms: torch.Tensor) -> torch.Tensor:
        """Estimated parameter-gradient norms, clamped below at the smallest exact norm of the
        calibration window (:attr:`floor`).

        Example:
            >>> cal = ProxyCalibration()
            >>> cal.update(torch.tensor([2.0, 3.0, 4.0]), torch.tensor([1.0, 3.0, 5.0]))  # beta = -3
            >>> cal.predict(torch.tensor([0.5, 3.5])).tolist()  # -2 is clamped at the floor 1
            [1.0, 4.0]
        """
        return (self.alpha * input_norms + self.beta).clamp_min(self.floor)

    def stats(self) -> dict:
        return {"alpha": self.alpha, "beta": self.beta, "pearson_r": self.pearson_r,
                "n_pairs": sum(int(b[0].numel()) for b in self.batches), "calibrations": self.calibrations,
                "floor": self.floor}

    def state_dict(self) -> dict:
        return {"window": self.window, "batches": [(a.clone(), b.clone()) for a, b in self.batches],
                "alpha": self.alpha, "beta": self.beta, "pearson_r": self.pearson_r,
                "calibrations": self.calibrations, "floor": self.floor}

    def load_state_dict(self, state: dict) -> None:
        self.window = int(state["window"])
        self.batches = [(a.clone(), b.clone()) for a, b in state["batches"]]
        self.alpha, self.beta = float(state["alpha"]), float(state["beta"])
        self.pearson_r = float(state["pearson_r"])
        self.calibrations = int(state["calibrations"])
        # States saved before the floor existed: recompute it from the kept pairs.
        ys = [b for _, b in self.batches if b.numel()]
        default = max(0.0, float(torch.cat(ys).min())) if ys else 0.0
        self.floor = float(state.get("floor", default))
