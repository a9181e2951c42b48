"""Optimizers built on the per-example engine, plus SAM/delta-SAM and normalized/grafted updates."""
from .engm import ENGM
from .proxy import ProxyCalibration
from .weighting import WEIGHTINGS, example_weights, softmax_example_weights
from .sam import SAM, frozen_bn_stats
from .delta_sam import SCORE_SOURCES, DeltaSAM
from .nsgd import NSGD
from .graft import Graft

__all__ = ["ENGM", "ProxyCalibration", "WEIGHTINGS", "example_weights", "softmax_example_weights",
           "SAM", "frozen_bn_stats", "DeltaSAM", "SCORE_SOURCES", "NSGD", "Graft"]
