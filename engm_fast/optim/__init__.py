"""Optimizers built on the per-example engine."""
from .engm import ENGM
from .proxy import ProxyCalibration
from .weighting import WEIGHTINGS, example_weights

__all__ = ["ENGM", "ProxyCalibration", "WEIGHTINGS", "example_weights"]
