"""The one-backward per-example gradient engine: capture, layer rules, norms, weighted sums."""
from .engine import PerExampleEngine, PerExampleGradients, attach, engine_of, release
from .rules import RULES

__all__ = ["PerExampleEngine", "PerExampleGradients", "attach", "engine_of", "release", "RULES"]
