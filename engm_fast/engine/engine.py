"""The one-backward per-example gradient engine.

``engine = PerExampleEngine(model)`` hooks every module that owns trainable parameters,
according to its rule (:mod:`engm_fast.engine.registry`, resolved once per module here):

* a module with a rule: each call's output goes through a tap (:mod:`~engm_fast.engine.tap`);
  in the engine's backward the tap hands ``(inputs, output gradient)`` to the rule;
* a module whose rule replaces its forward (recurrent layers, ``nn.MultiheadAttention``): that
  forward runs while the engine records and taps the calls inside it;
* a module without a rule: during its call its own parameters are followed as shared tensors
  (:mod:`~engm_fast.engine.shared`) until they meet the batch; what cannot be followed falls back
  to torch.func (:mod:`~engm_fast.engine.fallback`).

``engine.backward(losses)`` then runs ONE backward of ``sum_i losses_i`` that completes every
record, skips the weight gradients autograd would otherwise compute, and returns a
:class:`PerExampleGradients`: per-example squared norms, and any reweighted gradient
``sum_i w_i g_i`` on demand, from the factored records (no ``B x #params`` tensor except where
that is the cheaper route). A module called several times and a parameter shared by modules are
merged per parameter before any norm is taken.

Passes that are not the engine's own backward (PGD attacks, plain ``loss.backward()``) keep
nothing: the taps are identities whose records live and die with their graph. Inside
torch.func transforms (vmap, grad, jvp) nothing is recorded.
"""
from __future__ import annotations

import contextlib
import inspect
import sys
import types
import weakref
from typing import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .. import ops
from ..reference import accumulation_dtype
from . import rules as _builtin_rules  # noqa: F401  (registers the built-in rules)
from .contributions import Contribution, Dense, OuterProduct, combine
from .fallback import fallback_contributions
from .fsdp2 import is_unit
from .registry import Rule, rule_for
from .shared import CallSource, CallState, ParamSource, SharedOps, SharedTensor, plain
from .tap import Record, recording_allowed, tap

__all__ = ["PerExampleEngine", "PerExampleGradients", "attach", "release", "engine_of"]

_ENGINES: "weakref.WeakKeyDictionary[nn.Module, PerExampleEngine]" = weakref.WeakKeyDictionary()
# Modules whose forward a rule replaces: module -> (engine, rule, name). A deep copy of such a
# module is not in here, so its (copied) forward runs the module's own.
_FORWARD_RULES: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def _unwrap(model: nn.Module) -> nn.Module:
    """The model inside DistributedDataParallel / DataParallel (``.module``) and torch.compile
    (``._orig_mod``) wrappers, however nested: hooks go on the real modules, and one model
    gets one engine whichever wrapper it is reached through."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif _is_compiled_wrapper(model):
            model = model._orig_mod
        else:
            return model


def _outside_graph(fn):
    """``fn`` wrapped by torch.compiler.disable; called only while dynamo traces, so dynamo is
    imported by then (importing it up front would cost every eager user about a second)."""
    return torch.compiler.disable(fn, reason=_COMPILE_REASON)


def _check_compile_mode(model: nn.Module) -> None:
    """Raises for a torch.compile wrapper (at any depth) made with fullgraph=True or
    error_on_graph_break=True: the engine needs a graph break at every recorded layer call."""
    while model is not None:
        if _is_compiled_wrapper(model):
            ctx = getattr(model, "dynamo_ctx", None)
            for flag in ("fullgraph", "error_on_graph_break"):
                if getattr(ctx, flag, None):
                    raise ValueError(f"torch.compile(..., {flag}=True): {_COMPILE_REASON}")
            model = model._orig_mod
        elif isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        else:
            return


def _is_compiled_wrapper(model: nn.Module) -> bool:
    # The class torch.compile(module) returns; looked up only if dynamo was imported (importing
    # it costs about a second, and without it no such wrapper can exist).
    eval_frame = sys.modules.get("torch._dynamo.eval_frame")
    return eval_frame is not None and isinstance(model, eval_frame.OptimizedModule)

# Why graph breaks: a tap must run eagerly in forward (it ties a Python Record to the graph)
# and in backward (it hands gradients to the engine). Traced by dynamo, the hook would be
# compiled into an identity and record nothing. Under torch.compile the hook body is called
# through torch.compiler.disable, so each managed layer call is one graph break; the rest of
# the model is compiled. fullgraph=True forbids graph breaks: dynamo then raises with REASON.
_COMPILE_REASON = ("engm_fast records every layer call of a model with an attached engine (ENGM, "
                   "per_example_grad_norms) outside the compiled graph, one graph break per layer call; "
                   "torch.compile(fullgraph=True) is not supported with it: use fullgraph=False")


def attach(model: nn.Module) -> "PerExampleEngine":
    """The engine of ``model``, created (hooks registered) on first use.

    Attach before the forward whose losses you pass to the engine.

    Example:
        >>> import torch, engm_fast
        >>> model = torch.nn.Linear(3, 2)
        >>> engine = engm_fast.attach(model)
        >>> engine is engm_fast.attach(model)
        True
    """
    _check_compile_mode(model)
    model = _unwrap(model)
    engine = _ENGINES.get(model)
    if engine is None:
        engine = PerExampleEngine(model)
    return engine


def engine_of(model: nn.Module) -> "PerExampleEngine | None":
    """The engine attached to ``model``, or ``None``.

    Example:
        >>> import torch, engm_fast
        >>> engm_fast.engine_of(torch.nn.Linear(2, 2)) is None
        True
    """
    return _ENGINES.get(_unwrap(model))


def release(model: nn.Module) -> None:
    """Removes ``model``'s engine: its hooks, replaced forwards and the hooks tied to it
    (:meth:`PerExampleEngine.tie_hook`, e.g. ENGM's input-proxy hook); no-op when none is attached.

    Example:
        >>> import torch, engm_fast
        >>> model = torch.nn.Linear(2, 2)
        >>> _ = engm_fast.attach(model)
        >>> engm_fast.release(model)
        >>> engm_fast.engine_of(model) is None
        True
    """
    engine = _ENGINES.pop(_unwrap(model), None)
    if engine is not None:
        engine.remove()


class PerExampleGradients:
    """Per-example gradients of a set of parameters from one engine backward.

    The per-step finalize runs in as few native calls as the contributions allow: Linear-like
    (:class:`OuterProduct` with one group) and materialized (:class:`Dense`) contributions of
    one dtype and device go to ONE ``engm_fast.ops.per_example_sqnorms`` call for their norms and
    ONE ``engm_fast.ops.weighted_outer_sums_`` call that adds their weighted sums into the
    gradients (a materialized ``[B, P]`` contribution is the outer product of ``g`` with ones);
    the other kinds (convolutions, embeddings, blocks, sums) use their own native ops per layer.

    Attributes:
        batch_size: B.
        contributions: ``{parameter: Contribution}`` (factored per-example gradients).
        names: ``{parameter: qualified name}``.
    """

    def __init__(self, contributions: dict[nn.Parameter, Contribution], names: dict[nn.Parameter, str],
                 batch_size: int, acc_dtype: torch.dtype, device: torch.device):
        self.contributions, self.names, self.batch_size = contributions, names, batch_size
        self._acc_dtype, self._device = acc_dtype, device
        self._param_sqnorms: dict[nn.Parameter, torch.Tensor] | None = None
        self._sqnorms: torch.Tensor | None = None
        self._groups: dict | None = None

    def _layer_groups(self) -> tuple[dict, dict]:
        """``({(dtype, device): [(param, a, b)]}, {param: other contribution})``: what the
        layer-list ops take (``a [B, T, d_in]``, ``b [B, T, d_out]``) and the rest."""
        if self._groups is None:
            lists, others = {}, {}
            for p, c in self.contributions.items():
                if isinstance(c, OuterProduct) and c.groups == 1:
                    a, b = c.a[:, :, 0], c.b[:, :, 0]
                elif isinstance(c, Dense):
                    a = c.g.reshape(self.batch_size, -1)
                    b = a.new_ones(self.batch_size, 1)
                else:
                    others[p] = c
                    continue
                lists.setdefault((a.dtype, a.device), []).append((p, a, b))
            self._groups = (lists, others)
        return self._groups

    @torch.no_grad()
    def param_sqnorms(self) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: [B] squared norms}`` (computed once)."""
        if self._param_sqnorms is None:
            self._param_sqnorms = {p: c.sqnorms() for p, c in self.contributions.items()}
        return self._param_sqnorms

    @torch.no_grad()
    def sqnorms(self) -> torch.Tensor:
        """``||g_i||^2`` over all parameters, ``[B]`` in the accumulation dtype (computed once)."""
        if self._sqnorms is None:
            total = torch.zeros(self.batch_size, dtype=self._acc_dtype, device=self._device)
            lists, others = self._layer_groups()
            for layers in lists.values():
                a_list, b_list = _share_output_gradients([a for _, a, _ in layers], [b for _, _, b in layers])
                total += ops.per_example_sqnorms(a_list, b_list).to(total.dtype)
            for c in others.values():
                total += c.sqnorms().to(total.dtype)
            self._sqnorms = total
        return self._sqnorms

    @torch.no_grad()
    def weighted_grads(self, w: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: sum_i w_i g_i}`` in each parameter's shape and dtype."""
        out = {p: torch.zeros_like(p) for p in self.contributions}
        self.add_weighted_(w, out)
        return out

    @torch.no_grad()
    def add_weighted_(self, w: torch.Tensor, out: dict[nn.Parameter, torch.Tensor]) -> None:
        """Adds ``sum_i w_i g_i`` into ``out[parameter]`` (a contiguous tensor of the parameter's
        shape and dtype, e.g. its ``.grad``) for every parameter: one native call per dtype and
        device for the Linear-like and materialized contributions."""
        if w.shape != (self.batch_size,):
            raise ValueError(f"weighted_grads: w must be [{self.batch_size}], got {tuple(w.shape)}")
        lists, others = self._layer_groups()
        for (dtype, _), layers in lists.items():
            targets = [out[p] for p, _, _ in layers]
            if all(t.dtype == dtype for t in targets):
                ops.weighted_outer_sums_([a for _, a, _ in layers], [b for _, _, b in layers], w, targets)
            else:  # a parameter of another dtype than its records (mixed-precision models)
                for (p, a, b), t in zip(layers, targets):
                    t.add_(ops.weighted_outer_sum(a, b, w).view(t.shape).to(t.dtype))
        for p, c in others.items():
            out[p].add_(c.weighted_sum(w).view(out[p].shape).to(out[p].dtype))

    @torch.no_grad()
    def zero_examples(self, mask: torch.Tensor) -> "PerExampleGradients":
        """A copy with the examples where ``mask`` is True removed (their g_i set to 0)."""
        return PerExampleGradients({p: c.zero_examples(mask) for p, c in self.contributions.items()},
                                   self.names, self.batch_size, self._acc_dtype, self._device)


def _share_output_gradients(a_list: list, b_list: list) -> tuple[list, list]:
    """Layers whose output gradient is the same tensor as one layer: the sum of their squared
    norms is the squared norm of ``b_i^T [a_i1 | a_i2 | ...]``, so their inputs are concatenated
    and ``b``'s part of the work (its Gram matrix on the ghost route) is done once. An LSTM's
    ``W_ih`` and ``W_hh`` share ``dz``: at width 256, T = 32 that Gram matrix is a third of the
    norms' time."""
    groups: dict = {}
    for a, b in zip(a_list, b_list):
        key = (b.data_ptr(), b.shape, b.stride(), b.dtype, b.device)
        groups.setdefault(key, (b, []))[1].append(a)
    if len(groups) == len(b_list):
        return a_list, b_list
    return ([a[0] if len(a) == 1 else torch.cat(a, -1) for _, a in groups.values()],
            [b for b, _ in groups.values()])


class _Session:
    """What one engine backward collects: contributions per wanted parameter, deferred fallbacks."""

    __slots__ = ("batch", "wanted", "parts", "deferred", "records", "error", "aliases")

    def __init__(self, batch: int, wanted: set, aliases: dict):
        self.batch, self.wanted, self.aliases = batch, wanted, aliases
        self.parts: dict[nn.Parameter, list[Contribution]] = {}
        self.deferred: list = []
        self.records = 0
        self.error: Exception | None = None  # the first error of a record, raised after the autograd pass

    def add(self, param: nn.Parameter, contribution: Contribution) -> None:
        self.records += 1
        param = self.aliases.get(param, param)
        if param in self.wanted:
            self.parts.setdefault(param, []).append(contribution.compact())


class _CallRecord(Record):
    """One call of a module with a rule.

    ``batch_dim``: 0 (batch first), 1 (time-major ``[T, B, ...]``), ``"flat"`` (a flattened batch
    ``[B * k, ...]``, example-major as ``x.reshape(-1, d)`` of a batch-first ``x`` gives) or
    ``"flat_t"`` (flattened time-major, ``[k * B, ...]``).
    """

    __slots__ = ("name", "module", "rule", "template", "batch_dim")

    def __init__(self, engine, name: str, module: nn.Module, rule: Rule, args: tuple, batch_dim=0):
        super().__init__(engine)
        self.name, self.module, self.rule, self.batch_dim = name, module, rule, batch_dim
        # Positional arguments with None where a tensor was: tensors travel as saved tensors.
        self.template = tuple(None if isinstance(a, torch.Tensor) else a for a in args)

    def describe(self) -> str:
        return f"module '{self.name}' ({type(self.module).__name__})"

    def complete(self, grads: tuple, saved: tuple) -> None:
        tensors = iter(saved)
        args = tuple(next(tensors) if a is None else a for a in self.template)
        b = grads[0]
        if self.batch_dim != 0 and b is not None:  # the batch first for the rule
            self.engine._check_batch(b, self)
            args = tuple(_batch_first_view(a, self.batch_dim, self.engine._session.batch) for a in args)
            b = _batch_first_view(b, self.batch_dim, self.engine._session.batch)
        self.engine._add_rule_call(self.rule, self.module, self.name, args, b, self)


class _FallbackRecord(Record):
    """One call of a module whose parameters the torch.func fallback handles (after the backward)."""

    __slots__ = ("name", "module", "template", "kwargs", "out_positions")

    def __init__(self, engine, name, module, args, kwargs, out_positions):
        super().__init__(engine)
        self.name, self.module, self.kwargs, self.out_positions = name, module, kwargs, out_positions
        self.template = tuple(None if isinstance(a, torch.Tensor) else a for a in args)

    def describe(self) -> str:
        return f"module '{self.name}' ({type(self.module).__name__})"

    def complete(self, grads: tuple, saved: tuple) -> None:
        session = self.engine._session
        for g in grads:
            if g is not None:
                self.engine._check_batch(g, self)
        tensors = iter(saved)
        args = tuple(next(tensors) if a is None else a for a in self.template)
        session.deferred.append((self, args, grads))
        session.records += 1


class PerExampleEngine(SharedOps):
    """Records layer calls of ``model`` and computes per-example gradients in one backward.

    Use :func:`attach` rather than constructing it twice for one model.

    Args:
        model: the ``nn.Module`` (a DDP wrapper is unwrapped).

    Example:
        >>> import torch, engm_fast
        >>> model = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Tanh(), torch.nn.Linear(8, 3))
        >>> engine = engm_fast.attach(model)
        >>> x, y = torch.randn(5, 4), torch.randint(0, 3, (5,))
        >>> losses = torch.nn.functional.cross_entropy(model(x), y, reduction="none")
        >>> grads = engine.backward(losses)
        >>> grads.sqnorms().shape
        torch.Size([5])
    """

    def __init__(self, model: nn.Module):
        model = _unwrap(model)
        if _ENGINES.get(model) is not None:
            raise RuntimeError("an engine is already attached to this model; use engm_fast.attach(model)")
        self.model = model
        self._anchor = torch.zeros((), requires_grad=True)
        self._session: _Session | None = None
        self._nested = False  # inside a record's own autograd.grad: taps pass gradients through
        self._suspended = False
        self._batch: int | None = None  # the batch size of the forward being recorded
        self._batch_dim = 0  # 1 inside time-major code (batch_dim(1), torch.nn's Transformer layers)
        self._handles: list = []
        self._param_names: dict[nn.Parameter, str] = {}
        self._verified_signature: frozenset | None = None
        self._reached: set = set()
        self._tapped_since_backward: set[str] = set()
        self._untracked: dict[nn.Parameter, str] = {}
        self._aliases: dict[nn.Parameter, nn.Parameter] = {}  # alias_parameters: {stand-in: model's parameter}
        self._hooked: dict[nn.Module, str] = {}
        self._layout_hooked: set = set()
        self._unit_hooked: set = set()  # FSDP2 units (fully_shard): their inputs are made plain
        self._layout_stack: list[int] = []
        self._kinds: dict[str, str] = {}  # module name -> "rule" | "forward" | "generic"
        self._call_states: dict[nn.Module, list[CallState]] = {}
        self._fallback_names: set[str] = set()
        self._signatures: dict[type, inspect.Signature | None] = {}
        self._handles.append(model.register_forward_pre_hook(self._root_pre_hook, with_kwargs=True))
        self._hook_new_modules()
        _ENGINES[model] = self

    # -- hooking ---------------------------------------------------------------------------
    def _hook_new_modules(self) -> list[str]:
        """Hooks every parameter-owning module not hooked yet; returns the new modules' names."""
        added = []
        covered_below: list[str] = []  # forward-rule modules record their children's parameters
        for name, module in self.model.named_modules():
            if any(prefix == "" or name.startswith(prefix + ".") for prefix in covered_below):
                continue
            label = name or "<root>"
            if isinstance(module, _TIME_MAJOR_TYPES) and module not in self._layout_hooked:
                self._layout_hooked.add(module)
                self._handles.append(module.register_forward_pre_hook(self._layout_pre_hook))
                self._handles.append(module.register_forward_hook(self._layout_post_hook, always_call=True))
            rule = rule_for(module)
            if rule is not None and rule.forward is not None:
                covered_below.append(name)
                if module in self._hooked or not any(True for _ in module.parameters()):
                    continue
                if rule.check is not None:
                    rule.check(label, module)
                self._install_forward_rule(label, module, rule)
                kind = "forward"
            else:
                if module in self._hooked or not any(True for _ in module.parameters(recurse=False)):
                    continue
                if rule is not None:
                    if rule.check is not None:
                        rule.check(label, module)
                    self._handles.append(module.register_forward_hook(self._output_hook(label, rule),
                                                                      with_kwargs=True))
                    kind = "rule"
                else:
                    self._handles.append(module.register_forward_pre_hook(self._generic_pre_hook(label),
                                                                          with_kwargs=True))
                    self._handles.append(module.register_forward_hook(self._generic_post_hook(label),
                                                                      with_kwargs=True, always_call=True))
                    kind = "generic"
            self._hooked[module] = label
            self._kinds[label] = kind
            added.append(label)
        for n, p in self.model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(p, n)  # a tied parameter keeps its first name
        for name, module in self.model.named_modules():
            if is_unit(module) and module not in self._unit_hooked:
                self._unit_hooked.add(module)
                # prepend: before FSDP2's own pre-hook, which passes the inputs through an
                # autograd Function (a SharedTensor would come out of it a plain tensor)
                self._handles.append(module.register_forward_pre_hook(self._unit_input_hook(name or "<root>"),
                                                                      prepend=True, with_kwargs=True))
        return added

    def _install_forward_rule(self, name: str, module: nn.Module, rule: Rule) -> None:
        _FORWARD_RULES[module] = (self, rule, name)
        module.forward = types.MethodType(_recording_forward, module)

    def refresh(self) -> list[str]:
        """Starts recording modules added to the model after the engine was attached.

        :class:`~engm_fast.ENGM` calls it from ``add_param_group``. Forwards made before the
        refresh did not record the new modules: refresh, then run the forward.

        Returns:
            the names of the modules newly hooked.

        Example:
            >>> import torch, engm_fast
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4))
            >>> engine = engm_fast.attach(model)
            >>> model.append(torch.nn.Linear(4, 2))
            Sequential(...)
            >>> engine.refresh()
            ['1']
        """
        added = self._hook_new_modules()
        if added:
            self._verified_signature = None
        return added

    def alias_parameters(self, aliases: dict[nn.Parameter, nn.Parameter]) -> None:
        """Declares each key a stand-in for the model's parameter it maps to: a contribution
        recorded for the stand-in (the object a module held when it ran) is the parameter's, and
        the stand-in reaching the losses is the parameter reaching them.

        For wrappers that register other parameter objects on the modules while they run:
        FSDP2's full-size unsharded parameters stand for the sharded ones the model reports
        (:mod:`engm_fast.engine.fsdp2`). The table is kept (stand-ins added later join it).

        Example:
            >>> import torch, engm_fast
            >>> model = torch.nn.Linear(3, 2)
            >>> engine = engm_fast.attach(model)
            >>> full = torch.nn.Parameter(model.weight.detach().clone())
            >>> engine.alias_parameters({full: model.weight})
            >>> engine.parameter_name(full)
            'weight'
        """
        for alias, original in aliases.items():
            # Either may be the one the engine saw registered when it named the parameters.
            name = self._param_names.get(original) or self._param_names.get(alias)
            if name is None:
                raise ValueError(f"alias_parameters: a parameter of shape {tuple(original.shape)} does not belong to "
                                 "the model")
            self._param_names[original] = self._param_names[alias] = name
            if alias is not original:
                self._aliases[alias] = original

    def parameter_name(self, param: nn.Parameter) -> str | None:
        """The qualified name of ``param`` in the model (or of the parameter it stands for), or None.

        Example:
            >>> import torch, engm_fast
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 2))
            >>> engm_fast.attach(model).parameter_name(model[0].bias)
            '0.bias'
        """
        return self._param_names.get(param)

    @property
    def fallback_modules(self) -> list[str]:
        """Names of the modules whose parameters went through the torch.func fallback at least
        once (a module without a rule whose parameters met an operation the engine cannot follow)."""
        return sorted(self._fallback_names)

    @property
    def generic_modules(self) -> list[str]:
        """Names of the modules without a rule (their parameters are followed as shared tensors)."""
        return [n for n, k in self._kinds.items() if k == "generic"]

    def module_kinds(self) -> dict[str, str]:
        """``{module name: "rule" | "forward" | "generic"}`` for every hooked module.

        Example:
            >>> import torch, engm_fast
            >>> model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.PReLU())
            >>> engm_fast.attach(model).module_kinds()
            {'0': 'rule', '1': 'generic'}
        """
        return dict(self._kinds)

    @contextlib.contextmanager
    def paused(self):
        """Forwards inside the block are not recorded (the hooks return at once).

        For passes whose graph the engine will never use, e.g. an attack's input-gradient
        passes: they then cost nothing extra. :func:`engm_fast.at.pgd_attack` does this itself.

        Example:
            >>> import torch, engm_fast
            >>> model = torch.nn.Linear(3, 2)
            >>> engine = engm_fast.attach(model)
            >>> with engine.paused():
            ...     out = model(torch.randn(4, 3, requires_grad=True))
            >>> out.grad_fn.name()
            'AddmmBackward0'
        """
        previous = self._suspended
        self._suspended = True
        try:
            yield self
        finally:
            self._suspended = previous

    def in_own_backward(self) -> bool:
        """Whether the running backward pass is this engine's own: it asks autograd for its
        anchor's gradient alone, so records complete and no parameter gradient is wanted."""
        return self._session is not None and not self._nested

    @contextlib.contextmanager
    def nested(self):
        """A record's own autograd pass inside the engine's backward: taps only pass through."""
        previous = self._nested
        self._nested = True
        try:
            yield
        finally:
            self._nested = previous

    @contextlib.contextmanager
    def batch_dim(self, dim: int):
        """Layers called inside the block have the batch at dimension ``dim`` (0 or 1).

        The engine takes the batch to be dimension 0 of every layer's input and output, and
        recognizes a time-major call (``[T, B, ...]``) by itself when ``T`` differs from the
        batch size. For time-major code where the sequence length can equal the batch size, say
        so: inside ``with engine.batch_dim(1):`` Linear, Embedding, LayerNorm and RMSNorm calls
        are taken as ``[T, B, ...]``. torch.nn's Transformer layers with ``batch_first=False``
        set it themselves.

        Example:
            >>> import torch, engm_fast
            >>> layer = torch.nn.Linear(3, 2)
            >>> engine = engm_fast.attach(layer)
            >>> x = torch.randn(4, 4, 3)                  # [T, B, d], T == B
            >>> with engine.batch_dim(1):
            ...     out = layer(x)
            >>> engine.backward(out.pow(2).sum((0, 2))).sqnorms().shape
            torch.Size([4])
        """
        if dim not in (0, 1):
            raise ValueError(f"batch_dim must be 0 or 1, got {dim!r}")
        previous = self._batch_dim
        self._batch_dim = dim
        try:
            yield self
        finally:
            self._batch_dim = previous

    def _layout_pre_hook(self, module, args):
        self._layout_stack.append(self._batch_dim)
        if not _batch_first(module):
            self._batch_dim = 1
        return None

    def _layout_post_hook(self, module, args, output):
        if self._layout_stack:
            self._batch_dim = self._layout_stack.pop()
        return None

    def tie_hook(self, handle) -> None:
        """Removes the hook ``handle`` (registered on the model by a user of this engine, such as
        ENGM's input-proxy pre-hook) when the engine is removed.

        Example:
            >>> import torch, engm_fast
            >>> model = torch.nn.Linear(3, 2)
            >>> calls = []
            >>> engm_fast.attach(model).tie_hook(model.register_forward_pre_hook(lambda m, a: calls.append(1)))
            >>> engm_fast.release(model)
            >>> _ = model(torch.zeros(1, 3)); calls
            []
        """
        self._handles.append(handle)

    def remove(self) -> None:
        """Removes the hooks (the tied ones too) and restores replaced forwards (the engine is
        unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()
        for module in list(self._hooked):
            if _FORWARD_RULES.get(module, (None,))[0] is self:
                del _FORWARD_RULES[module]
                module.__dict__.pop("forward", None)

    def _recording(self) -> bool:
        return not self._suspended and self._session is None and recording_allowed()

    # -- forward -------------------------------------------------------------------------
    def _root_pre_hook(self, module, args, kwargs):
        if self._recording():
            self._batch = _leading_size(args, kwargs)
        return None

    def _positional(self, module: nn.Module, args: tuple, kwargs: dict) -> tuple:
        """A rule module's call arguments as positional ones (rules take positional inputs)."""
        cls = type(module)
        if cls not in self._signatures:
            try:
                self._signatures[cls] = inspect.signature(cls.forward)
            except (TypeError, ValueError):
                self._signatures[cls] = None
        sig = self._signatures[cls]
        if sig is None:
            raise NotImplementedError(f"module {type(module).__name__} was called with keyword arguments "
                                      f"{sorted(kwargs)}; engm_fast's rule for it expects positional arguments")
        bound = sig.bind(module, *args, **kwargs)
        bound.apply_defaults()
        return tuple(bound.args[1:])

    def _output_hook(self, name: str, rule: Rule):
        engine = self

        def eager_hook(module, args, kwargs, output):
            # Runs on every call, attack passes included: keep the common path short.
            if not engine._recording():
                return None
            for p in module._parameters.values():
                if p is not None and p.requires_grad:
                    break
            else:
                return None
            if not isinstance(output, torch.Tensor) or not output.requires_grad:
                return None
            if kwargs:
                args = engine._positional(module, args, kwargs)
            engine._tapped_since_backward.add(name)
            B = engine._batch
            x = args[0] if args else None
            # The common case first: a float input and an output batched along dim 0.
            if (type(output) is torch.Tensor and type(x) is torch.Tensor and x.is_floating_point()
                    and engine._batch_dim == 0 and (B is None or (output.dim() > 0 and output.shape[0] == B))):
                return engine._tap_rule_call(rule, module, name, args, output)
            args = tuple(plain(a) for a in args)
            if isinstance(output, SharedTensor):  # computed from a shared input without meeting the batch
                source = CallSource(rule, module, name, args, output._plain, False)
                return SharedTensor.wrap(engine, output._plain, output._sources + (source,))
            if B is not None and rule.positionwise:
                layout = _positionwise_layout(output, args, B, engine._batch_dim)
                if layout:
                    inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
                    return tap(_CallRecord(engine, name, module, rule, args, batch_dim=layout), (output,), inputs)
            if B is not None:
                ids = all(not a.is_floating_point() for a in args if isinstance(a, torch.Tensor))
                shared = output.dim() == 0 or output.shape[0] != B
                # An Embedding may be batched (dim 0 = B; T5's [T, T] bucket ids with T = B are not),
                # or take time-major ids [T, B]: decided where its output is first used.
                maybe = ids and B > 1 and (not shared or (output.dim() >= 2 and output.shape[0] != 1
                                                          and output.shape[1] == B))
                if shared or maybe:
                    source = CallSource(rule, module, name, args, output, maybe)
                    return SharedTensor.wrap(engine, output, (source,), maybe)
            return engine._tap_rule_call(rule, module, name, args, output)

        def hook(module, args, kwargs, output):
            if torch.compiler.is_compiling():  # traced by dynamo: break the graph here (see _COMPILE_REASON)
                # The comment below is shown in dynamo's error for fullgraph=True: it is the message.
                return _outside_graph(eager_hook)(module, args, kwargs, output)  # engm_fast: torch.compile(fullgraph=True) is not supported (one graph break per recorded layer call); use fullgraph=False
            return eager_hook(module, args, kwargs, output)

        return hook

    def _tap_rule_call(self, rule: Rule, module: nn.Module, name: str, args: tuple, output: torch.Tensor,
                       batch_dim=0):
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        return tap(_CallRecord(self, name, module, rule, args, batch_dim), (output,), inputs)

    def _generic_pre_hook(self, name: str):
        engine = self

        def pre_hook(module, args, kwargs):
            if not engine._recording() or torch.compiler.is_compiling():
                return None
            params = [(n, p) for n, p in module._parameters.items() if p is not None and p.requires_grad]
            if not params or any(isinstance(p, SharedTensor) for _, p in params):
                return None
            state = CallState(name, module)
            state_params = []
            for n, p in params:
                module._parameters[n] = SharedTensor.wrap(engine, p, (ParamSource(p, state),))
                state_params.append((n, p))
            engine._call_states.setdefault(module, []).append((state, state_params))
            return None

        return pre_hook

    def _generic_post_hook(self, name: str):
        engine = self

        def eager_post(module, args, kwargs, output):
            stack = engine._call_states.get(module)
            if stack:
                state, params = stack.pop()
                for n, p in params:
                    # Only where the wrapper is still in place: FSDP2's post-forward hook may have
                    # registered the sharded parameter meanwhile (reshard_after_forward=True).
                    if isinstance(module._parameters.get(n), SharedTensor):
                        module._parameters[n] = p
                state.active = False
            elif not (torch.compiler.is_compiling() and engine._recording()):
                return None
            else:
                state = None  # compiled: parameters were not followed, the fallback takes the call
            if output is None:  # the forward raised: parameters restored, nothing to record
                return None
            engine._tapped_since_backward.add(name)
            if state is not None and state.untracked is None:
                if not _escaped(state, output, args, kwargs, engine._batch):
                    return None
                # The call took batched inputs but returns its parameters unresolved: its
                # forward combined them with the batch in a layout the engine cannot see (a
                # transpose to time-major, say). torch.func sees through it.
                state.untracked = "was combined with the batch out of sight (the output is still shared)"
            return engine._tap_fallback(name, module, args, kwargs, output)

        def post_hook(module, args, kwargs, output):
            if torch.compiler.is_compiling():
                return _outside_graph(eager_post)(module, args, kwargs, output)  # engm_fast: torch.compile(fullgraph=True) is not supported (one graph break per recorded layer call); use fullgraph=False
            return eager_post(module, args, kwargs, output)

        return post_hook

    def _unit_input_hook(self, name: str):
        """A forward pre-hook of an FSDP2 unit: shared inputs made plain before FSDP's own hook
        (an Embedding output found batched is tapped as the batched call it is; a value shared
        by the batch cannot be followed into the unit, its parameters are marked untracked)."""
        engine = self

        def pre_hook(module, args, kwargs):
            if not engine._recording():
                return None
            flat, spec = tree_flatten((args, kwargs))
            if not any(isinstance(a, SharedTensor) for a in flat):
                return None
            for i, a in enumerate(flat):
                if not isinstance(a, SharedTensor):
                    continue
                v = a._plain
                if a._maybe_batched and engine._batch is not None and v.dim() > 0 and v.shape[0] == engine._batch:
                    flat[i] = engine._resolve_batched(a)
                else:
                    for s in a._sources:
                        s.untrack(engine, f"is an input of the FSDP2 unit '{name}' (fully_shard), whose input hook "
                                          "engm_fast cannot follow a value shared by the batch through")
                    flat[i] = v
            return tree_unflatten(flat, spec)

        return pre_hook

    def _tap_fallback(self, name, module, args, kwargs, output):
        """Routes the call's tensor outputs through one tap for the torch.func fallback."""
        self._fallback_names.add(name)
        single = isinstance(output, torch.Tensor)
        items = (output,) if single else (output if isinstance(output, tuple) else None)
        if items is None:
            self._note_untracked_module(module, name, f"returned a {type(output).__name__}, which the torch.func "
                                                      "fallback cannot take (tensors or tuples of tensors)")
            return None
        positions = [i for i, o in enumerate(items) if isinstance(o, torch.Tensor) and o.requires_grad]
        if not positions:
            return None
        outs = tuple(plain(items[i]) for i in positions)
        args = tuple(plain(a) for a in args)
        kwargs = {k: plain(v) for k, v in kwargs.items()}
        inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
        tapped = tap(_FallbackRecord(self, name, module, args, kwargs, positions), outs, inputs)
        if single:
            return tapped
        tapped = tapped if isinstance(tapped, tuple) else (tapped,)
        new_items = list(items)
        for i, t in zip(positions, tapped):
            new_items[i] = t
        return tuple(new_items)

    def _note_untracked(self, param: nn.Parameter, reason: str) -> None:
        self._untracked.setdefault(param, reason)

    def _note_untracked_module(self, module: nn.Module, name: str, reason: str) -> None:
        for p in module.parameters(recurse=False):
            self._note_untracked(p, f"module '{name}' ({type(module).__name__}) {reason}")

    # -- backward ------------------------------------------------------------------------
    def _complete(self, record: Record, grads: tuple, saved: tuple) -> None:
        """Completes one record inside the engine's backward (called by its tap). An error is
        kept and raised when the autograd pass is over, not inside it: the pass still runs to
        its end, so that under FSDP2 a rank whose record fails takes part in every collective
        of the backward (parameter all-gathers) that the other ranks wait on."""
        session = self._session
        if session.error is not None:
            return
        try:
            record.complete(grads, saved)
        except Exception as exc:  # noqa: BLE001  (re-raised after the pass, in backward)
            session.error = exc

    def _check_batch(self, g: torch.Tensor, record: Record) -> None:
        B = self._session.batch
        layout = getattr(record, "batch_dim", 0)
        if layout in ("flat", "flat_t"):
            if g.dim() == 0 or g.shape[0] % B:
                raise ValueError(f"losses has shape {(B,)} but {record.describe()}, recorded as a flattened batch, "
                                 f"produced an output of shape {tuple(g.shape)}")
            return
        if g.dim() <= layout or g.shape[layout] != B:
            raise ValueError(
                f"losses has shape {(B,)} but {record.describe()} produced an output of shape {tuple(g.shape)}; "
                "the batch must be dimension 0 of every layer and the losses must hold one entry per example"
            )

    def _add_rule_call(self, rule: Rule, module: nn.Module, name: str, args: tuple, b: torch.Tensor | None,
                       record: Record | None = None) -> None:
        """Turns one call's inputs and output gradient into contributions (inside the backward)."""
        if b is None:
            return
        session = self._session
        if record is not None and getattr(record, "batch_dim", 0) == 0:
            self._check_batch(b, record)
        if any(isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != b.dtype for a in args):
            # Under torch.autocast the layer's op ran in the output's dtype (bf16/fp16 for
            # Linear and Conv, fp32 for norms) on an input autocast cast to it: the same cast
            # gives the rule exactly the operands of that op.
            args = tuple(a.to(b.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a for a in args)
        try:
            with torch.no_grad():  # saved inputs are activations that require grad: build no graph
                contributions = rule.contributions(module, args, b, session.batch)
        except ValueError as exc:
            raise ValueError(f"module '{name}' ({type(module).__name__}): {exc}") from exc
        params = module._parameters
        for pname, c in contributions.items():
            session.add(params[pname], c)

    def backward(self, losses: torch.Tensor, params: Iterable[nn.Parameter] | None = None,
                 retain_graph: bool = False, loss_weights: torch.Tensor | None = None,
                 before_pass: Callable[[], None] | None = None) -> PerExampleGradients:
        """One backward of ``sum_i losses_i``; per-example gradients of ``params``.

        Args:
            losses: ``[B]`` per-example losses from a forward of the model made while the engine
                was attached (not averaged: example ``i``'s gradient is that of ``losses[i]``).
            params: parameters to return (default: every trainable parameter of the model).
            retain_graph: keep the graph for another backward.
            loss_weights: optional ``[B]`` multipliers of the losses in the backward (0 drops an
                example: its gradient is exactly zero).
            before_pass: called once every check on the losses has passed, right before the
                autograd pass; an error it raises propagates and no pass runs. Under FSDP2 the
                ranks agree there that all of them run the pass (it runs collectives).

        Returns:
            :class:`PerExampleGradients`; parameters' ``.grad`` are not touched.
        """
        B = _check_losses(losses)
        if isinstance(losses, SharedTensor):
            raise ValueError(_unbatched_message(losses))
        wanted = [p for p in (self.model.parameters() if params is None else params) if p.requires_grad]
        wanted_set = set(wanted)
        unknown = [p for p in wanted if p not in self._param_names]
        if unknown:
            now = {p: n for n, p in self.model.named_parameters(remove_duplicate=False)}
            late = [now[p] for p in unknown if p in now]
            if late:
                raise ValueError(f"parameter(s) {late[:5]} belong to module(s) added to the model after the engine "
                                 "was attached: call engine.refresh() (ENGM.add_param_group does) before the forward")
            raise ValueError(f"{len(unknown)} parameter(s) passed to the engine do not belong to the model "
                             f"(shapes {[tuple(p.shape) for p in unknown[:3]]})")
        signature = frozenset(self._tapped_since_backward)
        if signature != self._verified_signature:
            self._reached = _reached_parameters(losses)
            self._verified_signature = signature
        reached = {self._aliases.get(p, p) for p in self._reached} if self._aliases else self._reached
        if wanted_set and not (reached & wanted_set):
            raise ValueError("losses have no graph to the model's trainable parameters "
                             "(computed from another model, or under torch.no_grad?)")
        self._tapped_since_backward = set()
        total = (losses if loss_weights is None else losses * loss_weights).sum()
        if before_pass is not None:
            before_pass()
        session = _Session(B, wanted_set, self._aliases)
        self._session = session
        try:
            torch.autograd.grad(total, [self._anchor], allow_unused=True, retain_graph=retain_graph)
        finally:
            self._session = None
        if session.error is not None:
            raise session.error
        if not session.records:
            raise ValueError("losses have no graph through the model's managed modules: were they computed "
                             "from a forward of this model, made after engm_fast.attach(model) (or ENGM(model))?")
        if session.deferred:
            self._run_fallbacks(session)
        missing = [p for p in reached & wanted_set if p not in session.parts]
        if missing:
            names = sorted(self._param_names.get(p, "?") for p in missing)
            untracked = {self._aliases.get(p, p): r for p, r in self._untracked.items()}
            reasons = sorted({untracked[p] for p in missing if p in untracked})
            why = ("; ".join(reasons) + ". " if reasons else
                   "the parameter is used outside its module's forward, e.g. read directly by a parent module, or the "
                   "engine was attached after the forward. ")
            raise NotImplementedError(
                f"parameter(s) {names} reach the loss but their use was not recorded by the engine: {why}"
                "engm_fast cannot attribute their per-example gradients; register a rule for the module "
                "(engm_fast.register_rule) or call the module that owns the parameter"
            )
        self._untracked = {}
        contributions = {p: combine(cs) for p, cs in session.parts.items()}
        names = {p: self._param_names[p] for p in contributions}
        return PerExampleGradients(contributions, names, B, accumulation_dtype(losses.dtype), losses.device)

    def backward_unrecorded(self, losses: torch.Tensor, retain_graph: bool = False) -> None:
        """The autograd pass of :meth:`backward` with nothing recorded, for a batch of any size (0
        included). Under FSDP2 a rank with no examples runs it: the pass runs the same parameter
        all-gathers as the other ranks' :meth:`backward`, which wait for it.

        Example:
            >>> import torch, engm_fast
            >>> model = torch.nn.Linear(3, 2)
            >>> engine = engm_fast.attach(model)
            >>> engine.backward_unrecorded(model(torch.zeros(0, 3)).sum(1))   # an empty batch
            >>> model.weight.grad is None
            True
        """
        torch.autograd.grad(losses.sum(), [self._anchor], allow_unused=True, retain_graph=retain_graph)

    def _run_fallbacks(self, session: _Session) -> None:
        self._suspended = True  # the fallback re-runs forwards: they must not be recorded
        try:
            for record, args, grads in session.deferred:
                module = record.module
                for pname, c in fallback_contributions(module, record.name, args, record.kwargs, grads,
                                                       record.out_positions, session.batch).items():
                    session.add(module.get_parameter(pname), c)
        finally:
            self._suspended = False


def _recording_forward(module: nn.Module, *args, **kwargs):
    """The forward of a module whose rule replaces it (installed as an instance attribute)."""
    entry = _FORWARD_RULES.get(module)
    if entry is None:
        return type(module).forward(module, *args, **kwargs)
    engine, rule, name = entry
    if not engine._recording() or not any(p.requires_grad for p in module.parameters()):
        return type(module).forward(module, *args, **kwargs)
    engine._tapped_since_backward.add(name)
    if torch.compiler.is_compiling():
        return _outside_graph(rule.forward)(engine, module, name, *args, **kwargs)  # engm_fast: torch.compile(fullgraph=True) is not supported (one graph break per recorded layer call); use fullgraph=False
    return rule.forward(engine, module, name, *args, **kwargs)


# torch.nn modules that run time-major (the batch second) unless batch_first is set.
_TIME_MAJOR_TYPES = (nn.Transformer, nn.TransformerEncoder, nn.TransformerDecoder, nn.TransformerEncoderLayer,
                     nn.TransformerDecoderLayer)


def _batch_first(module: nn.Module) -> bool:
    if hasattr(module, "batch_first"):
        return bool(module.batch_first)
    for sub in module.modules():  # TransformerEncoder/Decoder: their layers' attention says
        if isinstance(sub, nn.MultiheadAttention):
            return bool(sub.batch_first)
    return True


def _first_tensor(args: tuple):
    return next((a for a in args if isinstance(a, torch.Tensor)), None)


def _positionwise_layout(output: torch.Tensor, args: tuple, B: int, context_dim: int):
    """How a position-wise call (Linear, LayerNorm, ...) holds the batch when not first: 1
    (time-major ``[T, B, ...]``), ``"flat"``/``"flat_t"`` (a flattened ``[B * k, ...]``), or 0."""
    x = _first_tensor(args)
    if x is None or output.dim() == 0 or x.dim() == 0 or not x.is_floating_point():
        # Integer inputs (ids) are left to the shared-tensor logic: T5's [T, T] bucket ids would
        # look like a flattened or time-major batch. Time-major ids: engine.batch_dim(1).
        return 1 if (x is not None and context_dim == 1 and output.dim() >= 2 and output.shape[1] == B) else 0
    if output.dim() >= 2 and output.shape[1] == B and (
            context_dim == 1 or (output.shape[0] not in (1, B) and x.dim() >= 2 and x.shape[1] == B)):
        return 1
    n = output.shape[0]
    if B > 1 and n > B and n % B == 0 and x.shape[0] == n:
        return "flat_t" if context_dim == 1 else "flat"
    return 0


def _batch_first_view(t, layout, B: int):
    """``t`` of a recorded call with the batch moved first (``layout`` as in _CallRecord)."""
    if not isinstance(t, torch.Tensor) or t.dim() == 0:
        return t
    if layout == 1:
        return t.movedim(1, 0) if t.dim() >= 2 else t
    if layout == "flat":
        return t.reshape((B, t.shape[0] // B) + tuple(t.shape[1:]))
    if layout == "flat_t":
        return t.reshape((t.shape[0] // B, B) + tuple(t.shape[1:])).movedim(1, 0)
    return t


def _escaped(state: CallState, output, args: tuple, kwargs: dict, batch: int | None) -> bool:
    """Whether a call with a batched input returns a shared tensor holding its own parameters."""
    if batch is None:
        return False
    items = output if isinstance(output, (tuple, list)) else (output,)
    # A batch-sized shared output: the parameters met the batch where the engine could not see
    # it. A shared output of another size (BART's position embeddings, [1, T, d]) is legitimate.
    mine = [o for o in items if isinstance(o, SharedTensor) and o._plain.dim() > 0 and o._plain.shape[0] == batch > 1
            and any(isinstance(s, ParamSource) and s.state is state for s in o._sources)]
    if not mine:
        return False
    return any(isinstance(a, torch.Tensor) and a.dim() > 0 and a.shape[0] == batch
               for a in list(args) + list(kwargs.values()))


def _leading_size(args: tuple, kwargs: dict) -> int | None:
    """The first dimension of the first tensor among a call's arguments (lists, tuples and
    dicts one level deep): the batch size of the forward."""
    for value in list(args) + list(kwargs.values()):
        items = value.values() if isinstance(value, dict) else value if isinstance(value, (list, tuple)) else (value,)
        for item in items:
            if isinstance(item, torch.Tensor) and item.dim() > 0:
                return int(item.shape[0])
    return None


def _reached_parameters(losses: torch.Tensor) -> set:
    """The parameters the autograd graph of ``losses`` reaches (its AccumulateGrad nodes)."""
    reached = set()
    seen = set()
    stack = [losses.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        var = getattr(node, "variable", None)
        if isinstance(var, nn.Parameter):
            reached.add(var)
        stack.extend(n for n, _ in node.next_functions)
    return reached


def _unbatched_message(losses: SharedTensor) -> str:
    source = losses._sources[0]
    where = (f"module '{source.name}' ({type(source.module).__name__})" if isinstance(source, CallSource)
             else f"a parameter of module '{source.state.name}'")
    return (f"losses of shape {tuple(losses.shape)} never met the batch: {where} got an input whose first dimension "
            "is not the batch size of the model's input; engm_fast needs a batched input [B, ...] with the batch as "
            "dimension 0 of every layer")


def _check_losses(losses, allow_empty: bool = False) -> int:
    """The batch size of valid per-example losses. One exception type per kind of bad input,
    shared by the engine, ``per_example_grad_norms`` and ``ENGM.backward``: ``TypeError`` for
    what is not a floating-point tensor, ``ValueError`` for a wrong shape, an empty batch
    (unless ``allow_empty``: a DDP rank with no examples) or losses without a graph."""
    if not isinstance(losses, torch.Tensor):
        raise TypeError(f"losses must be a tensor of per-example losses [B], got {type(losses).__name__}")
    if losses.dim() != 1:
        raise ValueError(
            f"losses must be 1-D (one loss per example, e.g. reduction='none'), got shape {tuple(losses.shape)}"
        )
    if losses.shape[0] == 0 and not allow_empty:
        raise ValueError("losses is empty (batch of 0 examples): nothing to compute")
    if not losses.is_floating_point():
        raise TypeError(f"losses must be floating point, got {losses.dtype}")
    if not losses.requires_grad or losses.grad_fn is None:
        raise ValueError("losses do not require grad (no graph to the model): compute them from the "
                         "model's output outside torch.no_grad(), and do not detach them")
    return losses.shape[0]
