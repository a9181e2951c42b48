"""The one-backward per-example gradient engine: capture, layer rules, norms, weighted sums."""
from .contributions import Contribution, Dense, IndexedRows, OuterProduct
from .engine import PerExampleEngine, PerExampleGradients, attach, engine_of, release
from .registry import Rule, register_rule, registered_rules, rule_for, unregister_rule

__all__ = ["Contribution", "Dense", "IndexedRows", "OuterProduct", "PerExampleEngine", "PerExampleGradients",
           "Rule", "attach", "engine_of", "register_rule", "registered_rules", "release", "rule_for",
           "unregister_rule"]
