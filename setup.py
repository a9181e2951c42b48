"""Builds the native extension ``engm_fast._C``; package metadata lives in pyproject.toml.

* Always: a C++ extension from ``csrc/ops.cpp`` (operator schemas), ``csrc/composite/*.cpp``
  (device-generic ops composed of the others) and ``csrc/cpu/*.cpp``.
* Where the installed torch has CUDA, nvcc is found (``CUDA_HOME``) and CUDA bindings
  ``csrc/cuda/*.cu`` exist: a CUDA extension that adds them. Set ``TORCH_CUDA_ARCH_LIST``
  (e.g. "8.0;9.0") to choose the GPU targets; otherwise torch picks the visible GPU's. The
  kernels need compute capability 8.0 or newer. The extension also compiles
  ``csrc/cuda/kernels/*.cu``: torch-free translation units holding the kernels' explicit
  instantiations (the same files the CMake target cuda_compile_check compiles); the binding
  ``csrc/cuda/per_example_ops.cu`` calls their launchers.

A failed build fails the install: nothing is skipped silently. The Python package itself
imports without the extension (pure-PyTorch path), see ``engm_fast.ops``.

Build where torch is already installed (it is a build dependency)::

    pip install --no-build-isolation -e .
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CppExtension, CUDAExtension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _sources(pattern: str) -> list[str]:
    """Sorted paths relative to the project root (setuptools wants relative paths)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _openmp_flag() -> list[str]:
    # at::parallel_for is a header template: compiled without OpenMP it silently runs on one
    # thread. Use OpenMP exactly when torch itself was built with it.
    if not torch.backends.openmp.is_available():
        return []
    return ["/openmp"] if sys.platform == "win32" else ["-fopenmp"]


def _extension():
    sources = _sources("csrc/ops.cpp") + _sources("csrc/composite/*.cpp") + _sources("csrc/cpu/*.cpp")
    cuda_sources = _sources("csrc/cuda/*.cu")
    cuda_kernels = _sources("csrc/cuda/kernels/*.cu")
    omp = _openmp_flag()
    cxx_flags = (["/O2"] if sys.platform == "win32" else ["-O3"]) + omp
    link_flags = [] if sys.platform == "win32" else omp
    include_dirs = [os.path.join(ROOT, "csrc")]
    if torch.version.cuda and CUDA_HOME and cuda_sources:
        return CUDAExtension(
            "engm_fast._C",
            sources + cuda_sources + cuda_kernels,
            include_dirs=include_dirs,
            extra_compile_args={"cxx": cxx_flags, "nvcc": ["-O3", "--use_fast_math"]},
            extra_link_args=link_flags,
        )
    return CppExtension(
        "engm_fast._C",
        sources,
        include_dirs=include_dirs,
        extra_compile_args={"cxx": cxx_flags},
        extra_link_args=link_flags,
    )


setup(
    ext_modules=[_extension()],
    cmdclass={"build_ext": BuildExtension},
)
