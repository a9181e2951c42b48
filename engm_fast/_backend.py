"""Which implementation of the engm_fast ops runs: backend discovery and selection.

Backends:
  * ``"torch"``: the pure-PyTorch definitions in :mod:`engm_fast.reference`; always there.
  * ``"cpu"``: the C++ extension ``engm_fast._C`` (``csrc/cpu``), registered as
    ``torch.ops.engm_fast.*`` for CPU tensors; there when the package was built with it.
  * ``"cuda"``: the same ops' CUDA kernels (``csrc/cuda``), when the extension was built with
    CUDA and a GPU is visible.
  * ``"triton"``: the Triton kernels of :mod:`engm_fast.triton` (``torch.ops.engm_fast_triton.*``),
    when ``triton`` is installed and either a GPU is visible or the Triton interpreter is on
    (``TRITON_INTERPRET=1`` when triton is first imported; it then runs the kernels on CPU
    tensors: slow, meant for tests). Imported on first use.

``"auto"`` (the default) runs the native op registered for the tensors' device when there is
one (on CUDA tensors: the CUDA extension when built, else Triton when available), else
``"torch"``. On CPU tensors ``"auto"`` never picks the Triton interpreter.
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import importlib.util
import os
import sys
import threading

import torch

__all__ = ["available_backends", "use_backend", "current_backend", "native_import_error", "triton_import_error"]

_VALID = ("auto", "torch", "cpu", "cuda", "triton")
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


def triton_import_error() -> str | None:
    """Why the ``"triton"`` backend cannot load triton (``None`` when it can). Looks the package
    up without importing it: importing triton fixes, for the whole process, whether its kernels
    are compiled or interpreted (see :func:`_triton_interpreter_active`)."""
    if "triton" in sys.modules:
        return None
    try:
        found = importlib.util.find_spec("triton") is not None
    except (ImportError, ValueError) as exc:
        return f"{type(exc).__name__}: {exc}"
    return None if found else "ModuleNotFoundError: No module named 'triton'"


def _env_true(name: str) -> bool:
    """triton's own reading of a boolean variable: "1", "true" or "on", any case."""
    return os.environ.get(name, "0").lower() in ("1", "true", "on")


def _triton_interpreter_active() -> bool:
    """Whether Triton kernels run under the interpreter (on CPU tensors) in this process.

    triton decides it once, when ``triton.language`` is first imported: its library functions
    (``tl.zeros``, ``tl.sum``, ...) become interpreted functions if ``TRITON_INTERPRET=1`` is set
    then, jit-compiled ones otherwise, and a kernel of the other kind cannot call them. So once
    triton is imported the answer comes from triton itself, before that from the variable.
    """
    tl = sys.modules.get("triton.language")
    if tl is None:
        return _env_true("TRITON_INTERPRET")
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(getattr(tl, "zeros", None), InterpretedFunction)


def _triton_usable() -> bool:
    if triton_import_error() is not None:
        return False
    return torch.cuda.is_available() or _triton_interpreter_active()


def _triton_unavailable_reason() -> str:
    if triton_import_error() is not None:
        return f"triton is not installed ({triton_import_error()})"
    if "triton" in sys.modules:
        return ("no CUDA device is visible and triton was imported without TRITON_INTERPRET=1 (the interpreter, "
                "which runs Triton on the CPU, must be requested before triton is first imported)")
    return "no CUDA device is visible and TRITON_INTERPRET=1 is not set (the interpreter runs Triton on the CPU)"


def triton_ops():
    """The :mod:`engm_fast.triton` package with its ops loaded (and registered) on first use."""
    module = importlib.import_module("engm_fast.triton")
    module.load()
    return module


@functools.lru_cache(maxsize=None)
def _native_has(dispatch_key: str, op: str = "per_example_sqnorm") -> bool:
    """Whether the extension registered a kernel of ``engm_fast::op`` for ``dispatch_key`` ("CPU",
    "CUDA"); False also when the loaded extension does not define the op at all (a build older
    than the package's Python code). Cached: it registers them once, when imported above, and
    the dispatcher query costs ~8 us, paid on every op call otherwise."""
    if not _NATIVE:
        return False
    try:
        return torch._C._dispatch_has_kernel_for_dispatch_key(f"engm_fast::{op}", dispatch_key)
    except RuntimeError:  # "operator ... does not exist"
        return False


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
    if _triton_usable():
        names.append("triton")
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
        if name == "triton":
            why = f" ({_triton_unavailable_reason()})"
        else:
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
        if device.type == "cuda" and _triton_usable():
            return "triton"
        return "torch"
    if name in ("cpu", "cuda") and device.type != name:
        raise ValueError(f"backend {name!r} was selected but the tensors are on {device}")
    if name == "triton" and not (device.type == "cuda" or (device.type == "cpu" and _triton_interpreter_active())):
        raise ValueError(
            f"backend 'triton' was selected but the tensors are on {device}; it runs CUDA tensors, and CPU "
            "tensors only under the Triton interpreter (TRITON_INTERPRET=1 set before triton is imported)"
        )
    return name
