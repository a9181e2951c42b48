"""Shared plumbing of the Triton kernels: compiled or interpreted launch, device, Triton types
of the accumulation dtypes, the interpreter's precision quirks.

Compiled or interpreted is a property of the process, not of a kernel: triton fixes it when
``triton.language`` is first imported (``TRITON_INTERPRET=1`` then makes its library functions,
``tl.zeros``, ``tl.sum``..., interpreted functions; a compiled kernel cannot call those, nor an
interpreted kernel the compiled ones). ``@triton.jit`` on our kernels would instead read the
variable when *this* package is imported, which can be later and different (a test module
that sets the variable, imports, and restores it). :class:`DualKernel` therefore keeps the
kernel source and builds the variant that matches triton's own mode at launch
(:func:`engm_fast._backend._triton_interpreter_active`). In interpreted mode every tensor is
run by the interpreter (CUDA tensors are copied to the host and back, as triton does); in
compiled mode CPU tensors are refused with a clear error.
"""
from __future__ import annotations

import torch
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction

from .._backend import _triton_interpreter_active

__all__ = [
    "DualKernel",
    "interpreted",
    "check_device",
    "tl_dtype",
    "dot_upcast",
    "round_bf16_in_kernel",
]

def interpreted() -> bool:
    """Whether this process runs Triton kernels under the interpreter."""
    return _triton_interpreter_active()


class DualKernel:
    """A Triton kernel source; ``kernel.variant()[grid](*args)`` launches the compiled
    (``JITFunction``) or interpreted (``InterpretedFunction``) variant, whichever matches
    triton's mode in this process (module docstring). Variants are created on first use."""

    def __init__(self, fn):
        self.fn = fn
        self._compiled: JITFunction | None = None
        self._interpreted: InterpretedFunction | None = None

    def variant(self):
        if interpreted():
            if self._interpreted is None:
                self._interpreted = InterpretedFunction(self.fn)
            return self._interpreted
        if self._compiled is None:
            self._compiled = JITFunction(self.fn)
        return self._compiled


def check_device(op: str, *tensors: torch.Tensor) -> torch.device:
    """The one device of ``tensors``: CUDA, or CPU when this process runs the interpreter."""
    device = tensors[0].device
    for t in tensors[1:]:
        if t.device != device:
            raise ValueError(f"{op} (triton): tensors are on different devices ({device}, {t.device})")
    if device.type == "cuda":
        return device
    if device.type == "cpu":
        if interpreted():
            return device
        raise RuntimeError(
            f"{op} (triton): CPU tensors run only under the Triton interpreter, and triton was imported without "
            "it; set TRITON_INTERPRET=1 before triton is first imported (slow, meant for tests) or pass CUDA tensors"
        )
    raise RuntimeError(f"{op} (triton): tensors on {device} are not supported (CUDA, or CPU under TRITON_INTERPRET=1)")


def tl_dtype(dtype: torch.dtype):
    """The Triton type of an accumulation dtype (float32 or float64), which the op wrappers of
    :mod:`engm_fast.ops` choose (:func:`engm_fast.reference.accumulation_dtype`) and pass in."""
    if dtype == torch.float32:
        return tl.float32
    if dtype == torch.float64:
        return tl.float64
    raise TypeError(f"the Triton kernels accumulate in float32 or float64, got {dtype}")


def dot_upcast(dtype: torch.dtype) -> bool:
    """Whether ``tl.dot`` operands must be upcast to float32 first.

    triton 3.9's interpreter stores bfloat16 as raw uint16 and its ``tl.dot`` (numpy
    matmul) multiplies those integers: a 5x7 @ 7x3 product came out wrong by 1e10. Upcasting
    bfloat16 to float32 is exact, so the interpreted kernel computes the same products as the
    compiled one, whose bfloat16 tensor-core dot multiplies exactly into a float32 accumulator.
    (Elementwise bfloat16 arithmetic is equally broken there: every kernel converts loaded
    values to the accumulation dtype before any arithmetic.)
    """
    return dtype == torch.bfloat16 and interpreted()


def round_bf16_in_kernel(dtype: torch.dtype) -> bool:
    """Whether a kernel must round float32 values to bfloat16 itself before storing them.

    Compiled kernels convert float32 to bfloat16 rounding to nearest even; triton 3.9's
    interpreter truncates (its ``_convert_float`` ignores the rounding mode of an fp_trunc),
    which doubles the worst-case error (2^-7 instead of 2^-8) and would make the interpreted
    results differ from the GPU's. Under the interpreter, kernels writing bfloat16 first round
    the float32 bits to nearest even (``(bits + 0x7FFF + lsb) & 0xFFFF0000``), after which the
    truncation is exact.
    """
    return dtype == torch.bfloat16 and interpreted()
