"""Which implementation of the engm_fast ops runs: backend discovery and selection.

Backends:
  * ``"torch"``: the pure-PyTorch definitions in :mod:`engm_fast.reference`; always there.
  * ``"cpu"``: the C++ extension ``engm_fast._C`` (``csrc/cpu``), registered as
    ``torch.ops.engm_fast.*`` for CPU tensors; there when the package was built with it.
  * ``"cuda"``: the same ops' CUDA kernels (``csrc/cuda``), when the extension was built with
    CUDA and a GPU is visible.

``"auto"`` (the default) runs the native op registered for the tensors' device when there is
one, else ``"torch"``.
"""
from __future__ import annotations

import contextlib
import threading

import torch

__all__ = ["available_backends", "use_backend", "current_backend", "native_import_error"]

_VALID = ("auto", "torch", "cpu", "cuda")
_state = threading.local()
_native_error: str | None = None

try:  # The extension registers torch.ops.engm_fast.* on import.
    from . import _C  # noqa: F401

    _NATIVE = True
except ImportError as exc:  # no compiled extension: the pure-PyTorch path still works
    _NATIVE = False
    _native_error = f"{type(exc).__name__}: {exc}"


def native_import_error() -> str | None:
    """Why the C++ extension is not loaded (``None`` when it is)."""
    return _native_error


def _native_has(dispatch_key: str) -> bool:
    if not _NATIVE:
        return False
    return torch._C._dispatch_has_kernel_for_dispatch_key("engm_fast::per_example_sqnorm", dispatch_key)


def available_backends() -> tuple[str, ...]:
    """Names of the backends usable in this process, e.g. ``("torch", "cpu")``.

    Example:
        >>> import engm_fast
        >>> "torch" in engm_fast.available_backends()
        True
    """
    names = ["torch"]
    if _native_has("CPU"):
        names.append("cpu")
    if _native_has("CUDA") and torch.cuda.is_available():
        names.append("cuda")
    return tuple(names)


def current_backend() -> str:
    """The backend selected in this thread (``"auto"`` unless inside :func:`use_backend`)."""
    return getattr(_state, "name", "auto")


@contextlib.contextmanager
def use_backend(name: str):
    """Run the engm_fast ops (and so the engine) on backend ``name`` inside the block.

    Example:
        >>> import torch, engm_fast
        >>> with engm_fast.use_backend("torch"):
        ...     n2 = engm_fast.ops.per_example_sqnorm(torch.randn(2, 3), torch.randn(2, 4))
    """
    if name not in _VALID:
        raise ValueError(f"use_backend: unknown backend {name!r}; known: {_VALID}")
    if name != "auto" and name not in available_backends():
        why = f" (extension not loaded: {_native_error})" if _native_error and name != "torch" else ""
        raise ValueError(
            f"use_backend: backend {name!r} is not available here{why}; available: {available_backends()}"
        )
    previous = current_backend()
    _state.name = name
    try:
        yield name
    finally:
        _state.name = previous


def resolve(device: torch.device) -> str:
    """The backend that runs an op on tensors of ``device`` under the current selection."""
    name = current_backend()
    if name == "auto":
        if device.type == "cpu" and _native_has("CPU"):
            return "cpu"
        if device.type == "cuda" and _native_has("CUDA"):
            return "cuda"
        return "torch"
    if name in ("cpu", "cuda") and device.type != name:
        raise ValueError(f"backend {name!r} was selected but the tensors are on {device}")
    return name
