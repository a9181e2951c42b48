"""The one-backward per-example gradient engine: capture, layer rules, norms, weighted sums."""
from .engine import PerExampleEngine, PerExampleGradients, attach, detach, engine_of
from .rules import RULES

__all__ = ["PerExampleEngine", "PerExampleGradients", "attach", "detach", "engine_of", "RULES"]
