"""The one-backward per-example gradient engine.

``engine = PerExampleEngine(model)`` puts a forward hook on every module that owns
parameters. Each call of such a module routes its output through a tap (see
:mod:`engm_fast.engine.tap`). ``engine.backward(losses)`` then runs ONE backward of
``sum_i losses_i`` that records ``(input, output gradient)`` of every call, skips the weight
gradients autograd would otherwise compute, and returns a :class:`PerExampleGradients`:
per-example squared norms at once, and any reweighted gradient ``sum_i w_i g_i`` on demand,
from the factored records (no ``B x #params`` tensor except where that is the cheaper route).

Rules in :mod:`~engm_fast.engine.rules` handle Linear, Conv1d/2d/3d, Embedding, LayerNorm,
GroupNorm, RMSNorm and BatchNorm1d/2d/3d; every other module owning trainable parameters goes
through the :mod:`~engm_fast.engine.fallback` (torch.func). A module called several times
and a parameter shared by modules are merged per parameter before any norm is taken.

Passes that are not the engine's own backward (PGD attacks, plain ``loss.backward()``) keep
nothing: the taps are identities whose records live and die with their graph.
"""
from __future__ import annotations

import contextlib
import sys
import weakref
from typing import Iterable

import torch
import torch.nn as nn

from ..reference import accumulation_dtype
from .contributions import Contribution, combine
from .fallback import WHOLE_MODULE_TYPES, fallback_contributions, fallback_parameter_names
from .rules import check_supported, rule_for
from .tap import Record, tap

__all__ = ["PerExampleEngine", "PerExampleGradients", "attach", "engine_of", "release"]

_ENGINES: "weakref.WeakKeyDictionary[nn.Module, PerExampleEngine]" = weakref.WeakKeyDictionary()


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
# and in backward (it appends to the engine's session). Traced by dynamo, the hook would be
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
    """Removes ``model``'s engine and its hooks (no-op when none is attached), with the hooks
    tied to it (:meth:`PerExampleEngine.tie_hook`, e.g. ENGM's input-proxy hook).

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

    @torch.no_grad()
    def param_sqnorms(self) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: [B] squared norms}`` (computed once)."""
        if self._param_sqnorms is None:
            self._param_sqnorms = {p: c.sqnorms() for p, c in self.contributions.items()}
        return self._param_sqnorms

    def sqnorms(self) -> torch.Tensor:
        """``||g_i||^2`` over all parameters, ``[B]`` in the accumulation dtype."""
        total = torch.zeros(self.batch_size, dtype=self._acc_dtype, device=self._device)
        for n2 in self.param_sqnorms().values():
            total = total + n2.to(total.dtype)
        return total

    @torch.no_grad()
    def weighted_grads(self, w: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
        """``{parameter: sum_i w_i g_i}`` in each parameter's shape and dtype."""
        if w.shape != (self.batch_size,):
            raise ValueError(f"weighted_grads: w must be [{self.batch_size}], got {tuple(w.shape)}")
        return {p: c.weighted_sum(w).to(p.dtype) for p, c in self.contributions.items()}

    @torch.no_grad()
    def zero_examples(self, mask: torch.Tensor) -> "PerExampleGradients":
        """A copy with the examples where ``mask`` is True removed (their g_i set to 0)."""
        out = PerExampleGradients({p: c.zero_examples(mask) for p, c in self.contributions.items()},
                                  self.names, self.batch_size, self._acc_dtype, self._device)
        return out


class PerExampleEngine:
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
        self._session: list[Record] | None = None
        self._session_batch: int | None = None  # B of the backward in progress
        self._suspended = False
        self._handles = []
        self._param_names: dict[nn.Parameter, str] = {}
        for n, p in model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(p, n)  # a tied parameter keeps its first name
        self._verified_signature: frozenset | None = None
        self._tapped_since_backward: set[str] = set()
        self._fallback_modules: list[str] = []
        self._hooked: dict[nn.Module, str] = {}
        self._hook_new_modules()
        _ENGINES[model] = self

    def _hook_new_modules(self) -> list[str]:
        """Hooks every parameter-owning module not hooked yet; returns the new modules' names."""
        added = []
        skip_below: list[str] = []
        for name, module in self.model.named_modules():
            if any(name.startswith(prefix + ".") for prefix in skip_below):
                continue
            if isinstance(module, WHOLE_MODULE_TYPES):
                skip_below.append(name)
                owns = any(True for _ in module.parameters())
            else:
                owns = any(True for _ in module.parameters(recurse=False))
            if not owns or module in self._hooked:
                continue
            check_supported(name or type(module).__name__, module)
            rule = rule_for(module) if not isinstance(module, WHOLE_MODULE_TYPES) else None
            if rule is None:
                self._fallback_modules.append(name or "<root>")
            self._handles.append(module.register_forward_hook(self._make_hook(name or "<root>", rule), with_kwargs=True))
            self._hooked[module] = name or "<root>"
            added.append(name or "<root>")
        for n, p in self.model.named_parameters(remove_duplicate=False):
            self._param_names.setdefault(p, n)
        return added

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

    @property
    def fallback_modules(self) -> list[str]:
        """Names of the modules handled by the torch.func fallback."""
        return list(self._fallback_modules)

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
        """Removes the forward hooks and the tied ones (the engine is unusable afterwards)."""
        for h in self._handles:
            h.remove()
        self._handles.clear()

    # -- forward -------------------------------------------------------------------------
    def _make_hook(self, name: str, rule):
        engine = self
        is_fallback = rule is None

        def eager_hook(module, args, kwargs, output):
            # Runs on every call, attack passes included: keep the common path short
            # (one tensor output, own parameters read from the dict, no generators).
            if engine._suspended or not torch.is_grad_enabled():
                return None
            own = module.parameters() if isinstance(module, WHOLE_MODULE_TYPES) else module._parameters.values()
            for p in own:
                if p is not None and p.requires_grad:
                    break
            else:
                return None
            single = isinstance(output, torch.Tensor)
            if single:
                if not output.requires_grad:
                    return None
                positions, outs = [0], (output,)
            else:
                items = output if isinstance(output, tuple) else (output,)
                positions = [i for i, o in enumerate(items) if isinstance(o, torch.Tensor)]
                if not positions or not any(items[i].requires_grad for i in positions):
                    return None
                outs = tuple(items[i] for i in positions)
            if kwargs and not is_fallback:
                raise NotImplementedError(
                    f"module '{name}' ({type(module).__name__}) was called with keyword arguments "
                    f"{sorted(kwargs)}; engm_fast's rule for it expects positional arguments"
                )
            inputs = tuple(a for a in args if isinstance(a, torch.Tensor))
            record = Record(name, module, args, kwargs if is_fallback else {})
            record.out_positions = positions
            engine._tapped_since_backward.add(name)
            tapped = tap(engine._anchor, engine, record, outs, inputs)
            if single:
                return tapped
            tapped = tapped if isinstance(tapped, tuple) else (tapped,)
            new_items = list(items)
            for i, t in zip(positions, tapped):
                new_items[i] = t
            return tuple(new_items)

        def hook(module, args, kwargs, output):
            if torch.compiler.is_compiling():  # traced by dynamo: break the graph here (see _COMPILE_REASON)
                # The comment below is shown in dynamo's error for fullgraph=True: it is the message.
                return _outside_graph(eager_hook)(module, args, kwargs, output)  # engm_fast: torch.compile(fullgraph=True) is not supported (one graph break per recorded layer call); use fullgraph=False
            return eager_hook(module, args, kwargs, output)

        return hook

    # -- backward ------------------------------------------------------------------------
    def backward(self, losses: torch.Tensor, params: Iterable[nn.Parameter] | None = None,
                 retain_graph: bool = False, loss_weights: torch.Tensor | None = None) -> PerExampleGradients:
        """One backward of ``sum_i losses_i``; per-example gradients of ``params``.

        Args:
            losses: ``[B]`` per-example losses from a forward of the model made while the engine
                was attached (not averaged: example ``i``'s gradient is that of ``losses[i]``).
            params: parameters to return (default: every trainable parameter of the model).
            retain_graph: keep the graph for another backward.
            loss_weights: optional ``[B]`` multipliers of the losses in the backward (0 drops an
                example: its gradient is exactly zero).

        Returns:
            :class:`PerExampleGradients`; parameters' ``.grad`` are not touched.
        """
        B = _check_losses(losses)
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
            self._check_coverage(losses, wanted_set)
            self._verified_signature = signature
        self._tapped_since_backward = set()
        total = (losses if loss_weights is None else losses * loss_weights).sum()
        session: list[Record] = []
        self._session, self._session_batch = session, B
        try:
            torch.autograd.grad(total, [self._anchor], allow_unused=True, retain_graph=retain_graph)
        finally:
            self._session = None
        if not session:
            raise ValueError("losses have no graph through the model's managed modules: were they computed "
                             "from a forward of this model, made after engm_fast.attach(model) (or ENGM(model))?")
        parts: dict[nn.Parameter, list[Contribution]] = {}
        self._suspended = True  # the fallback re-runs forwards: they must not be tapped
        try:
            for record in session:
                contributions = record.contributions
                if contributions is None:  # fallback modules: after the backward
                    contributions = self._contributions(record, B)
                record.contributions = None  # the record lives on in a retained graph
                for name, c in contributions.items():
                    p = record.module.get_parameter(name)
                    if p in wanted_set:
                        parts.setdefault(p, []).append(c)
        finally:
            self._suspended = False
        contributions = {p: combine(cs) for p, cs in parts.items()}
        names = {p: self._param_names[p] for p in contributions}
        return PerExampleGradients(contributions, names, B, accumulation_dtype(losses.dtype), losses.device)

    def _on_recorded(self, record: Record) -> None:
        """Called by a tap inside the backward, when its call's output gradient arrives.

        A call handled by a layer rule becomes its contributions at once, each compacted
        (:meth:`Contribution.compact`), and the record drops its input and output gradient. So
        the inputs and output gradients of norm layers and small convolutions are freed while
        the backward runs instead of living until it ends: measured peak step memory of a
        GroupNorm ResNet-18 (width 16, B=32) went from 2.17x to 1.15x a plain SGD step's.
        Fallback modules wait for the end of the backward: their vmap re-runs forwards.
        """
        module = record.module
        if isinstance(module, WHOLE_MODULE_TYPES) or rule_for(module) is None:
            return
        contributions = self._contributions(record, self._session_batch)
        record.contributions = {name: c.compact() for name, c in contributions.items()}
        record.inputs, record.grads = (), ()

    def _contributions(self, record: Record, B: int) -> dict[str, Contribution]:
        module = record.module
        grads = record.grads
        for g in grads:
            if g is not None and (g.dim() == 0 or g.shape[0] != B):
                raise ValueError(
                    f"losses has shape {(B,)} but module '{record.name}' ({type(module).__name__}) produced "
                    f"an output of shape {tuple(g.shape)}; the batch must be dimension 0 of every layer "
                    "and the losses must hold one entry per example"
                )
        rule = rule_for(module) if not isinstance(module, WHOLE_MODULE_TYPES) else None
        if rule is not None:
            args = record.args()
            b = grads[0]
            if b is not None and any(isinstance(a, torch.Tensor) and a.is_floating_point() and a.dtype != b.dtype
                                     for a in args):
                # Under torch.autocast the layer's op ran in the output's dtype (bf16/fp16 for
                # Linear and Conv, fp32 for norms) on an input autocast cast to it: the same cast
                # gives the rule exactly the operands of that op.
                args = tuple(a.to(b.dtype) if isinstance(a, torch.Tensor) and a.is_floating_point() else a
                             for a in args)
            try:
                with torch.no_grad():  # saved inputs are activations that require grad: build no graph
                    return rule(module, args, b)
            except ValueError as exc:
                raise ValueError(f"module '{record.name}' ({type(module).__name__}): {exc}") from exc
        return fallback_contributions(module, record.name, record.args(), record.kwargs, grads,
                                      record.out_positions, B)

    def _check_coverage(self, losses: torch.Tensor, wanted: set) -> None:
        """Raises if a wanted parameter reaches the loss through no module the engine records.

        Walks the autograd graph once per new set of recorded modules (the first step, and
        after the model's structure changes).
        """
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
        if not (reached & wanted) and wanted:
            raise ValueError("losses have no graph to the model's trainable parameters "
                             "(computed from another model, or under torch.no_grad?)")
        covered = set()
        for name in self._tapped_since_backward:
            module = self.model if name == "<root>" else self.model.get_submodule(name)
            if isinstance(module, WHOLE_MODULE_TYPES):
                covered.update(module.parameters())
            elif rule_for(module) is not None:
                covered.update(module.parameters(recurse=False))
            else:
                covered.update(module.get_parameter(n) for n in fallback_parameter_names(module))
        missing = [p for p in reached & wanted if p not in covered]
        if missing:
            names = [self._param_names.get(p, "?") for p in missing]
            raise NotImplementedError(
                f"parameter(s) {names} reach the loss but their module's forward was not recorded by the "
                "engine (the parameter is used outside its module's forward, e.g. read directly by a parent "
                "module, or the engine was attached after the forward); engm_fast cannot attribute their "
                "per-example gradients"
            )


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
