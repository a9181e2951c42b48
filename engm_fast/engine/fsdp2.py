"""FSDP2 (``torch.distributed.fsdp.fully_shard``) as the engine and ENGM see it.

``fully_shard(module)`` makes ``module`` one FSDP *unit*: its parameters (those not in a unit
below it) become DTensors sharded on dim 0 over the mesh, and that is what the modules hold
between calls. The unit's forward pre-hook all-gathers them into full-size *unsharded*
parameters and registers those on the modules; its post-forward hook registers the sharded
ones again (``reshard_after_forward=True``); in backward it all-gathers again, and after the
unit's backward it reduce-scatters what autograd accumulated into the unsharded parameters'
``.grad`` into the sharded parameters' ``.grad``.

The engine keys per-example contributions by the parameter object a module held when it ran:
the unsharded one. :mod:`engm_fast.optim.fsdp` maps those to the sharded parameters the
optimizer holds, and reduces unit by unit. This module is the only one in engm_fast that reads
FSDP2 state that is not public API; what it relies on (torch 2.13,
``torch/distributed/fsdp/_fully_shard``; tests/test_fsdp.py exercises each):

* the class of a sharded module is ``FSDP<Class>``, made by fully_shard, with the MRO
  ``(FSDP<Class>, FSDPModule, <Class>, ...)`` (``FSDPModule`` is public);
* ``FSDPModule._get_fsdp_state()``: ``._fsdp_param_groups`` (the unit's parameter groups) and
  ``._is_root``;
* a parameter group's ``fsdp_params``, ``reduce_grads`` (False after
  ``set_requires_gradient_sync(False)``, whose public setter has no getter),
  ``gradient_divide_factor`` and ``force_sum_reduction_for_comms`` (public setters, no
  getters), ``post_forward_mesh_info`` (``reshard_after_forward`` as an int);
* an ``FSDPParam``'s ``sharded_param`` (the DTensor the model registers and the optimizer
  holds), ``_unsharded_param`` (the full-size parameter: made by the unit's first all-gather
  and reused by every later one, so an object stable from the first forward on),
  ``orig_dtype``, ``param_dtype`` and ``reduce_dtype`` (the ``MixedPrecisionPolicy``, resolved
  at FSDP's lazy init in the first forward), ``is_dtensor``, ``fsdp_placement``,
  ``unsharded_accumulated_grad``, ``_param_fqn`` and ``_module_info.param_name``.
"""
from __future__ import annotations

import contextlib
import sys

import torch
import torch.nn as nn

__all__ = ["ShardedParameter", "Unit", "original_class", "is_unit", "is_sharded", "units", "gradient_sync",
           "reduction_divided_by", "gradients_kept", "reset_iteration", "discard_unreduced"]

_FULLY_SHARD = "torch.distributed.fsdp._fully_shard._fully_shard"


def _fsdp_module_class():
    # Looked up only once FSDP2 was imported: without it no module can be sharded, and importing
    # torch.distributed.fsdp would cost every other user its import time.
    mod = sys.modules.get(_FULLY_SHARD)
    return None if mod is None else mod.FSDPModule


def original_class(cls: type) -> type:
    """The class ``fully_shard`` swapped out of a module (``FSDPLinear`` -> ``Linear``), else ``cls``.

    Example:
        >>> import torch
        >>> original_class(torch.nn.Linear) is torch.nn.Linear
        True
    """
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None or not issubclass(cls, fsdp_module) or cls is fsdp_module:
        return cls
    mro = cls.__mro__
    i = mro.index(fsdp_module)
    return mro[i + 1] if i + 1 < len(mro) else cls


def is_unit(module: nn.Module) -> bool:
    """Whether ``module`` was passed to ``fully_shard`` (an ``FSDPModule``).

    Example:
        >>> import torch
        >>> is_unit(torch.nn.Linear(2, 2))
        False
    """
    fsdp_module = _fsdp_module_class()
    return fsdp_module is not None and isinstance(module, fsdp_module)


def is_sharded(model: nn.Module) -> bool:
    """Whether ``model`` or a submodule was passed to ``fully_shard``.

    Example:
        >>> import torch
        >>> is_sharded(torch.nn.Linear(2, 2))
        False
    """
    return _fsdp_module_class() is not None and any(is_unit(m) for m in model.modules())


class ShardedParameter:
    """One parameter of a unit: the sharded DTensor the optimizer holds and FSDP's record of it."""

    __slots__ = ("name", "_fsdp_param")

    def __init__(self, name: str, fsdp_param):
        self.name, self._fsdp_param = name, fsdp_param

    @property
    def sharded(self) -> nn.Parameter:
        """The DTensor parameter (what ``model.parameters()`` yields between calls)."""
        return self._fsdp_param.sharded_param

    @property
    def unsharded(self) -> nn.Parameter | None:
        """The full-size parameter registered during the unit's forward and backward; None before
        the unit's first all-gather."""
        return getattr(self._fsdp_param, "_unsharded_param", None)

    @property
    def reduce_dtype(self) -> torch.dtype:
        """The dtype FSDP reduces this parameter's gradient in (MixedPrecisionPolicy.reduce_dtype,
        else the compute dtype ``param_dtype``, else the parameter's own)."""
        fp = self._fsdp_param
        return getattr(fp, "reduce_dtype", None) or getattr(fp, "param_dtype", None) or fp.sharded_param.dtype


class Unit:
    """The parameters ``fully_shard`` put in one group (one all-gather, one reduce-scatter).

    Attributes:
        name: the qualified name of the module passed to ``fully_shard`` (``"<root>"`` for the model).
        params: its trainable and frozen :class:`ShardedParameter` s, in FSDP's order.
    """

    __slots__ = ("name", "params")

    def __init__(self, name: str, params: list[ShardedParameter]):
        self.name, self.params = name, params


def _state(module: nn.Module):
    return module._get_fsdp_state()


def units(model: nn.Module) -> list[Unit]:
    """The FSDP units of ``model`` in ``named_modules`` order (the same on every rank).

    Raises ``NotImplementedError`` for layouts ENGM does not reduce: a 2-D mesh (HSDP), a
    parameter sharded on a dimension other than 0 (``shard_placement_fn``), a DTensor parameter
    (tensor parallelism), FSDP all-gather extensions, units on different meshes, and
    ``reshard_after_forward`` given as an int.
    """
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return []
    out: list[Unit] = []
    seen: set[int] = set()
    mesh = None
    names = {p: n for n, p in model.named_parameters()}  # FSDP names its parameters in the first forward
    for name, module in model.named_modules():
        if not isinstance(module, fsdp_module):
            continue
        state = _state(module)
        if id(state) in seen:  # fully_shard([a, b]): one state for several modules
            continue
        seen.add(id(state))
        label = name or "<root>"
        params = []
        for group in state._fsdp_param_groups:
            if group.post_forward_mesh_info is not None and \
                    group.post_forward_mesh_info.shard_mesh_size != group.mesh_info.shard_mesh_size:
                raise NotImplementedError(f"ENGM under FSDP2: unit '{label}' reshards to a smaller mesh after forward "
                                          "(reshard_after_forward given as an int), which engm_fast has not been "
                                          "tested with; use reshard_after_forward=True or False")
            for fp in group.fsdp_params:
                sharded = fp.sharded_param
                pname = fp._param_fqn or names.get(sharded) or f"{label}:{fp._module_info.param_name}"
                why = None
                if sharded.device_mesh.ndim != 1:
                    why = (f"is sharded over a {sharded.device_mesh.ndim}-D mesh (HSDP); ENGM reduces over a 1-D FSDP "
                           "mesh only")
                elif getattr(fp, "is_dtensor", False):
                    why = "was a DTensor before fully_shard (tensor parallelism), which ENGM does not reduce"
                elif fp.fsdp_placement.dim != 0:
                    why = f"is sharded on dim {fp.fsdp_placement.dim} (shard_placement_fn); ENGM needs dim 0"
                elif hasattr(sharded._local_tensor, "fsdp_pre_all_gather"):
                    why = "uses an FSDP all-gather extension (fsdp_pre_all_gather), which ENGM does not support"
                elif mesh is not None and sharded.device_mesh != mesh:
                    why = "is on another device mesh than the other units; ENGM needs one mesh for the model"
                if why is not None:
                    raise NotImplementedError(f"ENGM under FSDP2: parameter '{pname}' of unit '{label}' {why}")
                mesh = sharded.device_mesh
                params.append(ShardedParameter(pname, fp))
        out.append(Unit(label, params))
    return out


def gradient_sync(model: nn.Module) -> bool:
    """False inside ``set_requires_gradient_sync(False)``; raises if the units disagree (the
    setter was called with ``recurse=False`` on some of them: ENGM reduces all units or none)."""
    fsdp_module = _fsdp_module_class()
    flags: dict[bool, str] = {}
    for name, module in model.named_modules():
        if fsdp_module is not None and isinstance(module, fsdp_module):
            for group in _state(module)._fsdp_param_groups:
                flags.setdefault(bool(group.reduce_grads), name or "<root>")
    if len(flags) > 1:
        raise ValueError(f"ENGM under FSDP2: unit '{flags[True]}' synchronizes gradients but unit '{flags[False]}' "
                         "does not (set_requires_gradient_sync(..., recurse=False)?); ENGM reduces every unit "
                         "together: call model.set_requires_gradient_sync(flag) on the root")
    return flags.get(False) is None


@contextlib.contextmanager
def reduction_divided_by(model: nn.Module, factor: float):
    """FSDP's own gradient reduction inside the block sums over the ranks and divides by
    ``factor`` (public ``set_gradient_divide_factor`` and ``set_force_sum_reduction_for_comms``;
    the previous settings are restored after the block). Forcing the sum keeps the division
    out of the collective: ``ReduceOp.PREMUL_SUM`` does not exist on gloo."""
    fsdp_module = _fsdp_module_class()
    saved = []
    for module in model.modules():
        if fsdp_module is not None and isinstance(module, fsdp_module):
            for group in _state(module)._fsdp_param_groups:
                saved.append((group, group.gradient_divide_factor, group.force_sum_reduction_for_comms))
                group.gradient_divide_factor = float(factor)
                group.force_sum_reduction_for_comms = True
    try:
        yield
    finally:
        for group, divide, force in saved:
            group.gradient_divide_factor, group.force_sum_reduction_for_comms = divide, force


@contextlib.contextmanager
def gradients_kept(model: nn.Module):
    """FSDP reduces nothing inside the block (public ``set_requires_gradient_sync(False)``, then
    the previous, uniform setting back): for a backward that computes something else (the input
    gradient) while FSDP holds unreduced gradients of earlier micro-batches."""
    previous = gradient_sync(model)
    fsdp_module = _fsdp_module_class()
    roots = [m for m in model.modules() if isinstance(m, fsdp_module)]
    for m in roots:
        m.set_requires_gradient_sync(False, recurse=False)
    try:
        yield
    finally:
        for m in roots:
            m.set_requires_gradient_sync(previous, recurse=False)


def reset_iteration(model: nn.Module) -> None:
    """FSDP's recovery after a forward or backward that was not completed (public
    ``reset_iter_state`` on each root unit): every unit resharded, its per-iteration state cleared."""
    fsdp_module = _fsdp_module_class()
    if fsdp_module is None:
        return
    for module in model.modules():
        if isinstance(module, fsdp_module) and _state(module)._is_root:
            module.reset_iter_state()


def discard_unreduced(model: nn.Module) -> None:
    """Drops the gradients FSDP accumulated, unreduced, under ``set_requires_gradient_sync(False)``
    (the unsharded parameters' ``.grad`` and FSDP's ``unsharded_accumulated_grad``)."""
    for unit in units(model):
        for sp in unit.params:
            fp = sp._fsdp_param
            if sp.unsharded is not None:
                sp.unsharded.grad = None
            fp.unsharded_accumulated_grad = None
