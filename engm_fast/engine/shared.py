"""Tensors shared by every example of the batch, followed until they meet the batch.

Per-example gradients need, for every parameter, the gradient of each example's loss before
autograd sums it over the batch. For a layer applied to the batch (``x [B, ...]``) the tap on
its output sees ``b [B, ...]`` and the rule does the rest. Two cases escape that:

* a **shared call**: a module whose output has no batch dimension, or a batch dimension of 1,
  and is broadcast against the batch later (GPT-2's and BERT's position embeddings, called on
  ``position_ids [1, T]``; T5's relative attention bias, an Embedding on ``[T, T]`` bucket ids);
* a **parameter used directly** by a module without a rule (Llama's RMSNorm computes
  ``self.weight * x``; ViT's embeddings concatenate ``self.cls_token.expand(B, -1, -1)``;
  a channels-first LayerNorm computes ``self.weight[:, None, None] * x``).

In both, the tensor (the call's output, or the parameter) is shared by all examples, and the
gradient that reaches it is already summed over the batch. So the engine hands out a
:class:`SharedTensor` instead: a tensor subclass whose ``__torch_function__`` follows it through
shape and arithmetic operations that do not involve the batch, and acts at the first operation
that combines it with a batched tensor:

* a broadcasting operation (``+``, ``*``, ``matmul``, ``where``, ``cat``, the mask of
  ``scaled_dot_product_attention``, ...; or the user's own ``expand`` to the batch size): the
  shared operand is expanded to the batch explicitly (a view) and tapped. In backward the tap
  sees ``b [B, ...]`` per example; the per-example gradient of every source (the parameter, or
  the shared call's output) is the batched vector-Jacobian product of the operations between
  the source and the broadcast (``torch.autograd.grad(..., is_grads_batched=True)``), and a
  shared call's output gradients go through the module's rule with its inputs expanded;
* a function with a functional rule (``F.linear``, ``F.layer_norm``, ``F.conv2d``,
  ``F.embedding``, ...; :func:`engm_fast.engine.registry.register_functional`) whose parameter
  argument is shared: its output is tapped and the rule gives the per-example gradients;
* anything else: the engine cannot follow it. For a module without a rule the call then falls
  back to the torch.func path (:mod:`engm_fast.engine.fallback`); a shared call's parameters
  raise an error in the engine's backward, naming the module and the operation.

What it assumes (the README says so): the batch is dimension 0; the batch size of a forward is
the first dimension of the first tensor argument of the model (a recurrent rule corrects it
for time-major inputs); and a tensor that is not shared and whose first dimension equals the
batch size is batched. An integer-input call (an Embedding) whose output's first dimension
equals the batch size is taken to be batched at the first operation that is not a pure shape
change (T5's bias of a query length equal to the batch size is first permuted and unsqueezed,
so it is still recognized as shared).
"""
from __future__ import annotations

import torch
from torch.utils._pytree import tree_flatten, tree_unflatten

from .registry import functional_rule_for
from .tap import Record, recording_allowed, tap

__all__ = ["SharedTensor", "ParamSource", "CallSource", "CallState", "plain"]

# Pure shape changes: a shared value stays shared (and an Embedding output stays "maybe batched").
_SHAPE = frozenset({
    "view", "view_as", "reshape", "reshape_as", "permute", "transpose", "t", "unsqueeze", "squeeze", "flatten",
    "unflatten", "__getitem__", "contiguous", "narrow", "select", "movedim", "moveaxis", "swapaxes", "swapdims",
    "split", "chunk", "unbind", "tensor_split", "split_with_sizes", "diagonal", "unfold",
})
# Property getters that are views (Tensor.T, ...); every other getter returns plain metadata.
_SHAPE_PROPERTIES = frozenset({"T", "mT", "H", "mH"})
_EXPAND = frozenset({"expand", "expand_as", "broadcast_to"})
_REPEAT = frozenset({"repeat"})
# Metadata and conversions to Python values: answered by the plain tensor, never followed.
_METADATA = frozenset({
    "dim", "ndimension", "size", "numel", "nelement", "stride", "storage_offset", "is_contiguous",
    "is_floating_point", "is_complex", "is_signed", "element_size", "get_device", "data_ptr", "untyped_storage",
    "item", "tolist", "numpy", "__len__", "__bool__", "__index__", "__int__", "__float__", "__format__",
    "__repr__", "__hash__", "__array__", "__reduce_ex__", "__deepcopy__", "is_set_to", "has_names",
})
# Functions that broadcast their tensor operands: expanding a size-1 (or missing) leading
# dimension of an operand to the batch size leaves the result unchanged.
_BROADCAST = frozenset({
    "add", "add_", "sub", "sub_", "subtract", "mul", "mul_", "multiply", "div", "div_", "divide", "true_divide",
    "pow", "pow_", "maximum", "minimum", "fmax", "fmin", "where", "masked_fill", "masked_fill_", "lerp", "addcmul",
    "addcdiv", "atan2", "hypot", "fmod", "remainder", "copysign", "xlogy", "clamp", "clip", "eq", "ne", "lt", "le",
    "gt", "ge", "logical_and", "logical_or", "logical_xor", "matmul", "cat", "concat", "concatenate",
    "scaled_dot_product_attention", "baddbmm", "addmm", "bmm",
    "__add__", "__radd__", "__iadd__", "__sub__", "__rsub__", "__isub__", "__mul__", "__rmul__", "__imul__",
    "__truediv__", "__rtruediv__", "__itruediv__", "__div__", "__rdiv__", "__idiv__", "__pow__", "__rpow__",
    "__ipow__", "__matmul__", "__rmatmul__", "__and__", "__or__", "__xor__", "__eq__", "__ne__", "__lt__",
    "__le__", "__gt__", "__ge__",
})


def _name(func) -> str:
    return getattr(func, "__name__", "")


def plain(x):
    """``x`` without the :class:`SharedTensor` wrapper (anything else unchanged)."""
    return x._plain if isinstance(x, SharedTensor) else x


class CallState:
    """One call of a module without a rule whose parameters are followed as shared tensors.

    ``untracked`` is set (to the reason) when an operation the engine cannot follow touched one
    of them: the call then takes the torch.func fallback and the per-example gradients the
    followed uses produced are ignored.
    """

    __slots__ = ("name", "module", "untracked", "active")

    def __init__(self, name: str, module: torch.nn.Module):
        self.name, self.module, self.untracked, self.active = name, module, None, True


class ParamSource:
    """A parameter of a module without a rule, followed during that module's call."""

    __slots__ = ("param", "state")

    def __init__(self, param: torch.nn.Parameter, state: CallState):
        self.param, self.state = param, state

    @property
    def tensor(self) -> torch.Tensor:
        return self.param

    def untrack(self, engine, reason: str) -> None:
        if self.state.untracked is None:
            self.state.untracked = reason
        if not self.state.active:  # the module's forward is over: it can no longer fall back
            engine._note_untracked(self.param, f"parameter of module '{self.state.name}' "
                                               f"({type(self.state.module).__name__}) {reason} after the module returned")

    def emit(self, engine, g: torch.Tensor, factored=None) -> None:
        """Adds per-example gradients ``g`` ([B, *param.shape]) or a factored contribution."""
        if self.state.untracked is not None:
            return  # the call's fallback computes this parameter's gradients
        from .contributions import Dense

        engine._session.add(self.param, factored if factored is not None else Dense(g))


class CallSource:
    """The output of a shared call of a module with a rule (see the module docstring)."""

    __slots__ = ("rule", "module", "name", "inputs", "out", "maybe_batched")

    def __init__(self, rule, module, name: str, inputs: tuple, out: torch.Tensor, maybe_batched):
        self.rule, self.module, self.name, self.inputs, self.out = rule, module, name, inputs, out
        self.maybe_batched = maybe_batched

    @property
    def tensor(self) -> torch.Tensor:
        return self.out

    def untrack(self, engine, reason: str) -> None:
        for p in self.module.parameters(recurse=False):
            engine._note_untracked(p, f"output of module '{self.name}' ({type(self.module).__name__}), shared by "
                                      f"the batch (shape {tuple(self.out.shape)}), {reason}")

    def emit(self, engine, g: torch.Tensor) -> None:
        """Per-example output gradients ``g`` ([B, *out.shape]) through the module's rule, with
        the call's inputs expanded to the batch."""
        B = g.shape[0]
        out = self.out
        tensors = [x for x in self.inputs if isinstance(x, torch.Tensor)]
        unit = out.dim() > 0 and out.shape[0] == 1 and all(x.dim() > 0 and x.shape[0] == 1 for x in tensors)
        if unit:  # [1, ...] output of [1, ...] inputs: the size-1 dim is the batch
            b = g.reshape((B,) + tuple(out.shape[1:]))
            inputs = tuple(x.expand((B,) + tuple(x.shape[1:])) if isinstance(x, torch.Tensor) else x
                           for x in self.inputs)
        else:  # no batch dim at all: prepend one
            b = g
            inputs = tuple(x.unsqueeze(0).expand((B,) + tuple(x.shape)) if isinstance(x, torch.Tensor) else x
                           for x in self.inputs)
        engine._add_rule_call(self.rule, self.module, self.name, inputs, b)


class _BroadcastRecord(Record):
    """A shared value expanded (or repeated: ``repeated``) to the batch: per-example gradients
    of its sources."""

    __slots__ = ("value", "aligned", "sources", "repeated")

    def __init__(self, engine, value, aligned, sources, repeated: bool = False):
        super().__init__(engine)
        self.value, self.aligned, self.sources, self.repeated = value, aligned, sources, repeated

    def describe(self) -> str:
        return "shared tensor of " + ", ".join(_describe(s) for s in self.sources)

    def complete(self, grads: tuple, saved: tuple) -> None:
        b = grads[0]
        if b is None:
            return
        engine = self.engine
        B = b.shape[0]
        if self.repeated:  # value.repeat(B, 1, ...): example-major copies along dim 0
            if b.dim() == 0 or b.shape[0] % B:
                engine._check_batch(b, self)
            B = engine._session.batch
            b = b.reshape((B,) + tuple(self.value.shape))
        else:
            engine._check_batch(b, self)
            b = b.sum_to_size((B,) + tuple(self.aligned[1:])).reshape((B,) + tuple(self.value.shape))
        _emit(engine, self.value, self.sources, b)


def _describe(source) -> str:
    if isinstance(source, ParamSource):
        return f"a parameter of '{source.state.name}'"
    return f"module '{source.name}'"


def _emit(engine, value: torch.Tensor, sources: tuple, b: torch.Tensor) -> None:
    """Per-example cotangents ``b`` ([B, *value.shape]) of ``value`` to each source."""
    if len(sources) == 1 and sources[0].tensor is value:
        per = (b,)
    else:
        with engine.nested():
            per = torch.autograd.grad([value], [s.tensor for s in sources], [b], is_grads_batched=True,
                                      retain_graph=True, allow_unused=True)
    with torch.no_grad():
        for s, g in zip(sources, per):
            if g is not None:
                s.emit(engine, g)


class _BatchedRecord(Record):
    """An integer-input call (Embedding) found to be batched after shape changes."""

    __slots__ = ("value", "source")

    def __init__(self, engine, value, source):
        super().__init__(engine)
        self.value, self.source = value, source

    def describe(self) -> str:
        return f"module '{self.source.name}' ({type(self.source.module).__name__})"

    def complete(self, grads: tuple, saved: tuple) -> None:
        b = grads[0]
        if b is None:
            return
        engine, src = self.engine, self.source
        engine._check_batch(b, self)
        if self.value is not src.out:
            with engine.nested():
                (b,) = torch.autograd.grad([self.value], [src.out], [b], retain_graph=True)
        engine._add_rule_call(src.rule, src.module, src.name, src.inputs, b)


class _FunctionalRecord(Record):
    """A functional call (``F.linear``, ``F.layer_norm``, ...) with shared parameter arguments."""

    __slots__ = ("rule", "bound", "shared")

    def __init__(self, engine, rule, bound: dict, shared: dict):
        super().__init__(engine)
        self.rule, self.bound, self.shared = rule, bound, shared

    def describe(self) -> str:
        return f"{self.rule.name} on " + ", ".join(_describe(s) for st in self.shared.values() for s in st._sources)

    def complete(self, grads: tuple, saved: tuple) -> None:
        b = grads[0]
        if b is None:
            return
        engine = self.engine
        engine._check_batch(b, self)
        with torch.no_grad():
            contributions = self.rule.compute(self.bound, b)
        for arg, st in self.shared.items():
            c = contributions.get(arg)
            if c is None:
                continue
            sources = st._sources
            if len(sources) == 1 and isinstance(sources[0], ParamSource) and sources[0].tensor is st._plain:
                sources[0].emit(engine, None, factored=c.compact())  # the parameter itself: keep it factored
            else:
                with torch.no_grad():
                    g = c.per_example()
                _emit(engine, st._plain, sources, g)


class SharedTensor(torch.Tensor):
    """A tensor shared by the batch, followed until it meets the batch (see the module docstring).

    Operations run on the plain tensor (``_plain``); the wrapper only carries where its
    per-example gradients must go (``_sources``).
    """

    _plain: torch.Tensor
    _sources: tuple
    _maybe_batched: bool
    _engine: object
    _cache: dict

    @staticmethod
    def wrap(engine, value: torch.Tensor, sources: tuple, maybe_batched: bool = False) -> "SharedTensor":
        st = value.as_subclass(SharedTensor)
        st._plain, st._sources, st._maybe_batched, st._engine, st._cache = value, tuple(sources), maybe_batched, engine, {}
        return st

    def __repr__(self, **kwargs):
        return f"SharedTensor({self._plain!r})"

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = _name(func)
        if name == "__get__":
            attr = getattr(getattr(func, "__self__", None), "__name__", "")
            owner = args[0]
            if attr in _SHAPE_PROPERTIES and isinstance(owner, SharedTensor) and owner._tracking():
                return owner._derive(getattr(owner._plain, attr), keep_maybe=True)
            return getattr(plain(owner), attr)
        if name in _METADATA:
            return func(*[plain(a) for a in args], **kwargs)
        flat, spec = tree_flatten((args, kwargs))
        shared = [a for a in flat if isinstance(a, SharedTensor)]
        engine = shared[0]._engine
        if not shared[0]._tracking():
            return _call(func, flat, spec)
        return engine._shared_op(func, name, flat, spec, shared)

    def _tracking(self) -> bool:
        engine = self._engine
        return engine._session is None and not engine._suspended and recording_allowed()

    def _derive(self, value, keep_maybe: bool, sources=None):
        """A result computed from this shared value, shared too (floating tensors only)."""
        if isinstance(value, torch.Tensor) and value.is_floating_point() and value.requires_grad:
            return SharedTensor.wrap(self._engine, value, sources or self._sources,
                                     self._maybe_batched if keep_maybe else False)
        return value


def _call(func, flat, spec):
    args, kwargs = tree_unflatten([plain(a) for a in flat], spec)
    return func(*args, **kwargs)


def _wrap_result(engine, out, sources, maybe_batched: bool):
    def one(x):
        if isinstance(x, torch.Tensor) and x.is_floating_point() and x.requires_grad and not isinstance(x, SharedTensor):
            return SharedTensor.wrap(engine, x, sources, maybe_batched)
        return x

    if isinstance(out, (tuple, list)):
        return type(out)(one(x) for x in out)
    return one(out)


def _union(shared) -> tuple:
    seen, out = set(), []
    for st in shared:
        for s in st._sources:
            if id(s) not in seen:
                seen.add(id(s))
                out.append(s)
    return tuple(out)


class SharedOps:
    """The engine's side of :class:`SharedTensor` (mixed into the engine)."""

    def _shared_op(self, func, name: str, flat: list, spec, shared: list):
        B = self._batch
        # 1. The user's own expand to the batch size: the broadcast itself.
        if name in _EXPAND and isinstance(flat[0], SharedTensor):
            st = flat[0]
            out = _call(func, flat, spec)
            if B is not None and out.dim() > 0 and out.shape[0] == B and _aligned_dim0(st._plain, out.dim()) == 1 \
                    and not st._maybe_batched:
                aligned = _aligned_shape(st._plain, out.dim())
                return tap(_BroadcastRecord(self, st._plain, aligned, st._sources), (out,))
            return st._derive(out, keep_maybe=True)
        # The user's own repeat(B, 1, ...): example-major copies, a batch (flattened when the
        # value has a first dimension of its own: DeBERTa's [B * heads, ...]).
        if name in _REPEAT and isinstance(flat[0], SharedTensor) and B is not None and B > 1:
            st = flat[0]
            args, kwargs = tree_unflatten(list(flat), spec)
            sizes = args[1:] if len(args) > 1 else kwargs.get("repeats", ())
            if len(sizes) == 1 and isinstance(sizes[0], (tuple, list, torch.Size)):
                sizes = tuple(sizes[0])
            sizes = tuple(int(v) for v in sizes)
            if sizes and sizes[0] == B and all(v == 1 for v in sizes[1:]) and len(sizes) >= st._plain.dim() \
                    and not st._maybe_batched:
                out = _call(func, flat, spec)
                value = st._plain
                if len(sizes) > value.dim():  # repeat prepends dims: the same as an expand
                    aligned = _aligned_shape(value, len(sizes))
                    return tap(_BroadcastRecord(self, value, aligned, st._sources), (out,))
                return tap(_BroadcastRecord(self, value, tuple(value.shape), st._sources, repeated=True), (out,))
        # 2. Pure shape changes keep the value shared.
        if name in _SHAPE and len(shared) == 1 and isinstance(flat[0], SharedTensor):
            return _wrap_result(self, _call(func, flat, spec), shared[0]._sources, shared[0]._maybe_batched)
        # 3. An Embedding output found batched: tap it as the ordinary call it is.
        for i, a in enumerate(flat):
            if isinstance(a, SharedTensor) and a._maybe_batched:
                resolved = self._maybe_resolved(a)
                if resolved is not None:
                    flat[i] = resolved
        shared = [a for a in flat if isinstance(a, SharedTensor)]
        if not shared:
            return _call(func, flat, spec)
        others = [a for a in flat if isinstance(a, torch.Tensor) and not isinstance(a, SharedTensor)]
        if B is not None and any(a.dim() > 0 and a.shape[0] == B for a in others):
            rule = functional_rule_for(func)
            if rule is not None:
                return self._functional(rule, func, flat, spec, shared)
            R = max(plain(a).dim() for a in flat if isinstance(a, torch.Tensor))
            if name in _BROADCAST and any(a.dim() == R and a.shape[0] == B for a in others):
                for i, a in enumerate(flat):
                    if isinstance(a, SharedTensor):
                        if _aligned_dim0(a._plain, R) != 1:
                            for s in a._sources:
                                s.untrack(self, f"met the batch in {name} with a first dimension of "
                                                f"{a._plain.shape[0]} (not 1: it cannot be told from the batch)")
                            flat[i] = a._plain
                            continue
                        flat[i] = self._broadcast(a, R)
                return _call(func, flat, spec)
            for st in shared:
                for s in st._sources:
                    s.untrack(self, f"met the batch in torch function '{name}', which engm_fast cannot follow")
            return _call(func, flat, spec)
        # 4. No batched operand: the result is shared by the batch too.
        out = _call(func, flat, spec)
        if name.endswith("_") and not name.startswith("__") and isinstance(flat[0], SharedTensor) \
                and out is flat[0]._plain:
            return flat[0]  # in place on a shared tensor
        return _wrap_result(self, out, _union(shared), False)

    def batched(self, x):
        """``x`` as a plain batched tensor, for code that needs one (forward rules): an
        Embedding output is tapped as batched, a shared tensor expanded to the batch."""
        if not isinstance(x, SharedTensor):
            return x
        resolved = self._maybe_resolved(x) if x._maybe_batched else None
        if resolved is not None:
            return resolved
        if self._batch is None or x._plain.dim() == 0 or x._plain.shape[0] != 1:
            for s in x._sources:
                s.untrack(self, f"is the input of a layer that needs a batched input, with shape {tuple(x.shape)}")
            return x._plain
        return self._broadcast(x, x._plain.dim())

    def _broadcast(self, st: SharedTensor, R: int) -> torch.Tensor:
        """``st`` expanded to the batch at rank ``R`` and tapped (cached per rank)."""
        hit = st._cache.get(R)
        if hit is not None:
            return hit
        value = st._plain
        aligned = _aligned_shape(value, R)
        e = value.reshape(aligned).expand((self._batch,) + tuple(aligned[1:]))
        out = tap(_BroadcastRecord(self, value, aligned, st._sources), (e,))
        st._cache[R] = out
        return out

    def _maybe_resolved(self, st: SharedTensor):
        """The tapped tensor of an Embedding output that turns out batched with the batch size
        known now (a recurrent layer corrects the model's for time-major inputs): the batch at
        dim 0 (after shape changes too), or at dim 1 (time-major ids ``[T, B]``, used as they came
        out of the layer); None when neither."""
        B, v = self._batch, st._plain
        if B is None or v.dim() == 0:
            return None
        if v.shape[0] == B:
            return self._resolve_batched(st)
        if v.dim() >= 2 and v.shape[1] == B and v is st._sources[0].out:
            hit = st._cache.get("time-major")
            if hit is None:
                source = st._sources[0]
                hit = self._tap_rule_call(source.rule, source.module, source.name, source.inputs, source.out,
                                          batch_dim=1)
                st._cache["time-major"] = hit
            return hit
        return None

    def _resolve_batched(self, st: SharedTensor) -> torch.Tensor:
        hit = st._cache.get("batched")
        if hit is not None:
            return hit
        (source,) = st._sources
        if st._plain is source.out:
            out = self._tap_rule_call(source.rule, source.module, source.name, source.inputs, source.out)
        else:
            out = tap(_BatchedRecord(self, st._plain, source), (st._plain,))
        st._cache["batched"] = out
        return out

    def _functional(self, rule, func, flat, spec, shared):
        args, kwargs = tree_unflatten(list(flat), spec)
        bound = rule.bind(args, kwargs)
        shared_args = {k: v for k, v in bound.items() if isinstance(v, SharedTensor)}
        for k, v in list(bound.items()):
            if isinstance(v, SharedTensor) and k == "input":
                # A shared input with a batched parameter: not a per-example parameter use.
                for s in v._sources:
                    s.untrack(self, f"is the input of {rule.name} together with batched arguments")
        bound_plain = {k: plain(v) for k, v in bound.items()}
        out = _call(func, flat, spec)
        shared_params = {k: v for k, v in shared_args.items() if k != "input"}
        if not shared_params:
            return out
        return tap(_FunctionalRecord(self, rule, bound_plain, shared_params), (out,))


def _aligned_dim0(value: torch.Tensor, R: int) -> int:
    """The size ``value`` has at dimension 0 of a rank-``R`` broadcast (1 when it lacks it)."""
    return value.shape[0] if value.dim() == R else 1


def _aligned_shape(value: torch.Tensor, R: int) -> tuple:
    return (1,) * (R - value.dim()) + tuple(value.shape)
