"""Triton kernels of the engm_fast ops, registered as ``torch.ops.engm_fast_triton.*``.

One module per kernel, each holding the kernel, its launcher and its op wrapper
(:mod:`.sqnorm`, :mod:`.weighted_outer`, :mod:`.sgd_momentum`; named apart from the ops
so that importing a module never rebinds an op's name in this package); semantics are
those of :mod:`engm_fast.reference`. They run compiled on CUDA tensors, or under the Triton
interpreter on CPU tensors when ``TRITON_INTERPRET=1`` was set before triton was first
imported (slow, for tests; triton fixes the mode per process, see :mod:`._common`).

Registration: ``torch.library.custom_op`` with ``register_fake``, in a namespace of their own
(``engm_fast_triton``, so they never collide with the native ``engm_fast::`` schemas of
csrc/ops.cpp). Not ``torch.library.triton_op``: a ``triton_op`` is traced into
``torch.compile`` graphs and run by its fake-tensor tests, and under the interpreter those
paths touch the data pointers of fake tensors, so ``torch.library.opcheck`` and
``torch.compile`` fail on the CPU (measured with triton 3.9 / torch 2.13; docs/design.md,
"Ops and backends"). As opaque custom ops they pass ``opcheck`` everywhere, CI included; the cost is that
``torch.compile`` cannot fuse into the kernels (it calls each as one opaque op), which loses
nothing here: each op is already one fused kernel (or a kernel and a small partial sum).

This package's ``__init__`` imports neither triton nor the kernels: the op modules load on
first access to one of the names below (or :func:`load`), which registers the ops. Importing
triton fixes for the whole process whether its kernels are compiled or interpreted, so merely
listing this package (``pkgutil.walk_packages``, doctest collection) must not import it.
"""
import importlib

__all__ = ["per_example_sqnorm", "weighted_outer_sum", "sgd_momentum_update_", "per_example_sqnorms",
           "weighted_outer_sums_", "interpreted", "load"]

_WHERE = {
    "per_example_sqnorm": ".sqnorm",
    "weighted_outer_sum": ".weighted_outer",
    "sgd_momentum_update_": ".sgd_momentum",
    "per_example_sqnorms": ".layer_lists",
    "weighted_outer_sums_": ".layer_lists",
    "interpreted": "._common",
}


def load() -> None:
    """Imports the op modules (and triton), registering ``torch.ops.engm_fast_triton.*``."""
    for name in _WHERE:
        __getattr__(name)


def __getattr__(name: str):
    if name in _WHERE:
        value = globals().get(name) or getattr(importlib.import_module(_WHERE[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
