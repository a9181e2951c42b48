"""The rule registry: how the engine turns a layer call into per-example gradients.

A :class:`Rule` belongs to one module type. It holds:

* ``compute(module, inputs, grad_output) -> {parameter name: per-example gradients}``: from the
  positional tensor arguments of one call and ``grad_output = dL/d(output)`` (``[B, ...]``,
  the batch first), the per-example gradients of the module's own trainable parameters, as
  :class:`~engm_fast.engine.contributions.Contribution` objects or as plain ``[B, *shape]``
  tensors (which become :class:`~engm_fast.engine.contributions.Dense`);
* ``kind``: the contribution class it produces, which also says how two calls of the module in
  one step merge (``kind.merge``: factored kinds stack the calls' rows, dense ones add up);
* ``forward`` (optional): for modules whose forward hides the per-example structure (fused
  recurrent ops, attention reading its projection weights directly), a replacement forward
  that runs while the engine records and records its own calls (``engm_fast.engine.rules``'
  recurrent and attention families); ``compute`` is then unused.

Built-in rules register the same way a user's does, one file per layer family under
:mod:`engm_fast.engine.rules`. A rule is looked up once, when the engine hooks a module: by the
module's exact type (a subclass may change ``forward``, so it gets no rule unless registered
itself), then by its qualified class name for classes of optional packages
(``transformers.pytorch_utils.Conv1D`` is known without importing transformers).

Functional rules (:func:`register_functional`) do the same for a ``torch.nn.functional``
call that uses a parameter of a module without a rule (``F.layer_norm(x, shape, self.weight,
self.bias)`` in a custom norm layer); see :mod:`engm_fast.engine.shared`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn as nn

from .contributions import Contribution, Dense
from .fsdp2 import original_class

__all__ = ["Rule", "FunctionalRule", "register_rule", "unregister_rule", "register_functional", "rule_for",
           "functional_rule_for", "registered_rules", "as_contribution"]

RuleFn = Callable[[nn.Module, tuple, torch.Tensor], dict]


@dataclass(frozen=True)
class Rule:
    """How the engine computes per-example gradients of one module type (see the module docstring).

    Attributes:
        module_type: the type the rule is for (or ``None`` for a rule registered by class name).
        compute: ``(module, inputs, grad_output) -> {name: Contribution or [B, *shape] tensor}``.
        kind: the :class:`Contribution` class ``compute`` returns (documentation, and
            ``merge``).
        forward: a replacement ``forward(engine, module, *args, **kwargs)`` that records its own
            calls, or ``None``.
        name: shown in messages.
        check: ``check(module_name, module)`` raises for configurations the rule cannot handle;
            called when the engine hooks the module.
        positionwise: every dimension between the batch and the features is a position
            (Linear, Embedding, LayerNorm, RMSNorm), so a time-major call (``[T, B, ...]``) or a
            call on a flattened batch (``[B * T, d]`` from ``x.reshape(-1, d)``) is handled by
            moving the batch first.
    """

    module_type: type | None
    compute: RuleFn | None
    kind: type = Dense
    forward: Callable | None = None
    name: str = ""
    check: Callable | None = None
    positionwise: bool = False

    @property
    def merge(self) -> Callable[[Contribution, Contribution], Contribution]:
        """How two calls of the module in one step combine: the contribution kind's ``merge``."""
        return self.kind.merge

    def contributions(self, module: nn.Module, inputs: tuple, grad_output: torch.Tensor, batch_size: int) -> dict:
        """``compute``'s result with plain tensors turned into :class:`Dense`, checked against
        the module's parameters (names and per-example shapes)."""
        raw = self.compute(module, inputs, grad_output)
        if not isinstance(raw, dict):
            raise TypeError(f"rule {self.name} for {type(module).__name__} returned {type(raw).__name__}, "
                            "expected a dict {parameter name: per-example gradients}")
        out = {}
        for name, value in raw.items():
            p = getattr(module, name, None)
            if not isinstance(p, nn.Parameter):
                raise ValueError(f"rule {self.name} for {type(module).__name__} returned {name!r}, which is not a "
                                 f"parameter of the module (parameters: {[n for n, _ in module.named_parameters(recurse=False)]})")
            out[name] = as_contribution(value, p, batch_size, f"rule {self.name}, parameter {name!r}")
        return out


@dataclass(frozen=True)
class FunctionalRule:
    """Per-example gradients of the parameter arguments of one functional call.

    ``bind(args, kwargs) -> {argument name: value}`` names the call's arguments (defaults
    filled in); ``compute(bound, grad_output) -> {argument name: Contribution}`` gives the
    per-example gradients of the parameter arguments (``"weight"`` and ``"bias"`` of
    ``F.linear``) from the bound arguments (tensors plain, the batch first) and the call's
    output gradient.
    """

    func: Callable
    bind: Callable
    compute: Callable
    name: str = ""


_BY_TYPE: dict[type, Rule] = {}
_BY_NAME: dict[str, Rule] = {}
_FUNCTIONAL: dict[Callable, FunctionalRule] = {}


def as_contribution(value, param: torch.Tensor, batch_size: int, what: str) -> Contribution:
    """A rule's value for ``param`` as a :class:`Contribution` (plain tensors become :class:`Dense`)."""
    if isinstance(value, Contribution):
        c = value
    elif isinstance(value, torch.Tensor):
        c = Dense(value)
    else:
        raise TypeError(f"{what}: expected a tensor [B, *shape] or a Contribution, got {type(value).__name__}")
    if c.batch_size != batch_size or tuple(c.shape) != tuple(param.shape):
        raise ValueError(f"{what}: per-example gradients of shape [{c.batch_size}, *{tuple(c.shape)}], expected "
                         f"[{batch_size}, *{tuple(param.shape)}] (batch size, then the parameter's shape)")
    return c


def _qualified(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def register_rule(module_type: type | str, *, kind: type = Dense, forward: Callable | None = None,
                  check: Callable | None = None, positionwise: bool = False, replace: bool = False):
    """Registers how the engine computes per-example gradients of ``module_type``'s parameters.

    Use it as a decorator on ``fn(module, inputs, grad_output) -> {parameter name: grads}``:

    * ``inputs``: the positional tensor arguments of one call of the module (the batch first);
    * ``grad_output``: ``dL/d(output)`` of that call, ``[B, ...]`` (the module must return one
      tensor whose first dimension is the batch);
    * the result maps each trainable parameter of the module (its own, not its children's) to its
      per-example gradients: a ``[B, *param.shape]`` tensor, or a
      :class:`~engm_fast.engine.contributions.Contribution` (e.g.
      :class:`~engm_fast.engine.contributions.OuterProduct` for a weight used as ``x @ W^T``:
      norms and the weighted sum then never materialize ``[B, *shape]``).

    The engine calls it inside its one backward pass, under ``torch.no_grad()``, once per call
    of the module. ``module_type`` is a class, or the qualified name of a class of an optional
    package (``"transformers.pytorch_utils.Conv1D"``) so it is recognized without importing it.
    Register before attaching the engine to a model that uses the type (rules are looked up
    when a module is hooked). Registering a type twice raises unless ``replace=True``.
    ``positionwise=True`` says that every dimension between the batch and the last is a
    position, so calls on time-major inputs ``[T, B, ...]`` or on a flattened batch
    ``[B * T, d]`` can be handled by moving the batch first.

    Example:
        >>> import torch, torch.nn as nn, engm_fast
        >>> class Scale(nn.Module):                       # y = x * weight, weight [d]
        ...     def __init__(self, d):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.ones(d))
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> @engm_fast.register_rule(Scale)
        ... def _scale(module, inputs, grad_output):
        ...     x, = inputs
        ...     return {"weight": (x * grad_output).reshape(x.shape[0], -1, x.shape[-1]).sum(1)}
        >>> model = nn.Sequential(nn.Linear(3, 4), Scale(4))
        >>> engine = engm_fast.attach(model)
        >>> norms = engm_fast.per_example_grad_norms(model, model(torch.randn(5, 3)).pow(2).sum(1))
        >>> norms.shape
        torch.Size([5])
        >>> engm_fast.release(model); engm_fast.unregister_rule(Scale)
    """

    def decorator(fn):
        if isinstance(module_type, str):
            key, table = module_type, _BY_NAME
            rule = Rule(None, fn, kind, forward, module_type.rsplit(".", 1)[-1], check, positionwise)
        elif isinstance(module_type, type) and issubclass(module_type, nn.Module):
            key, table = module_type, _BY_TYPE
            rule = Rule(module_type, fn, kind, forward, module_type.__name__, check, positionwise)
        else:
            raise TypeError(f"register_rule: expected an nn.Module subclass or a qualified class name, got {module_type!r}")
        if fn is None and forward is None:
            raise ValueError("register_rule: a rule needs a compute function or a forward")
        if key in table and not replace:
            raise ValueError(f"register_rule: a rule for {module_type!r} is already registered; pass replace=True "
                             "to override it")
        table[key] = rule
        return fn

    return decorator


def add_rule(rule: Rule, replace: bool = False) -> Rule:
    """Registers a :class:`Rule` object (used by the built-in families for forward rules)."""
    table, key = (_BY_TYPE, rule.module_type) if rule.module_type is not None else (_BY_NAME, rule.name)
    if key in table and not replace:
        raise ValueError(f"a rule for {key!r} is already registered; pass replace=True to override it")
    table[key] = rule
    return rule


def unregister_rule(module_type: type | str) -> None:
    """Removes a rule registered with :func:`register_rule` (no-op when there is none).

    Example:
        >>> import torch.nn as nn, engm_fast
        >>> engm_fast.unregister_rule(nn.PReLU)   # PReLU has no built-in rule: nothing happens
    """
    (_BY_NAME if isinstance(module_type, str) else _BY_TYPE).pop(module_type, None)


def register_functional(func: Callable, bind: Callable, compute: Callable, name: str = "") -> None:
    """Registers a :class:`FunctionalRule` for ``func`` (``F.linear``, ``F.layer_norm``, ...)."""
    _FUNCTIONAL[func] = FunctionalRule(func, bind, compute, name or getattr(func, "__name__", str(func)))


def rule_for(module: nn.Module) -> Rule | None:
    """The rule registered for ``module``'s exact type or qualified class name, or ``None``.

    Example:
        >>> import torch.nn as nn
        >>> rule_for(nn.Linear(2, 3)).name, rule_for(nn.PReLU()) is None
        ('Linear', True)
    """
    cls = original_class(type(module))  # the class fully_shard swapped out (FSDPLinear -> Linear)
    rule = _BY_TYPE.get(cls)
    if rule is None and _BY_NAME:
        rule = _BY_NAME.get(_qualified(cls))
    return rule


def functional_rule_for(func: Callable) -> FunctionalRule | None:
    return _FUNCTIONAL.get(func)


def registered_rules() -> dict[str, Rule]:
    """``{type or class name: rule}`` of every registered rule, built-in ones included.

    Example:
        >>> "Linear" in registered_rules() and "transformers.pytorch_utils.Conv1D" in registered_rules()
        True
    """
    out = {cls.__name__: r for cls, r in _BY_TYPE.items()}
    out.update(_BY_NAME)
    return out
