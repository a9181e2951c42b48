"""Builds the native extension ``engm_fast._C``; package metadata lives in pyproject.toml.

* Always: a C++ extension from ``csrc/ops.cpp`` (operator schemas), ``csrc/composite/*.cpp``
  (device-generic ops composed of the others) and ``csrc/cpu/*.cpp``.
* Where the installed torch has CUDA and a usable CUDA toolkit is found: a CUDA extension that
  adds the bindings ``csrc/cuda/*.cu`` and ``csrc/cuda/kernels/*.cu`` (torch-free translation
  units holding the kernels' explicit instantiations, the same files the CMake target
  cuda_compile_check compiles). The kernels need compute capability 8.0 or newer.

  - The toolkit: ``CUDA_HOME`` (or ``CUDA_PATH``) when set; otherwise the folder that the
    ``nvcc`` on PATH reports as its own (``nvcc -v`` prints it), which also finds a toolkit
    behind a wrapper script, where torch's guess (nvcc's parent folder) would not. nvcc must
    compile an empty file (with its host compiler) and be of torch's CUDA major version.
  - The CUDA library headers that torch's CUDA headers include (cusparse.h, cublas_v2.h, ...)
    and that a toolkit assembled from parts may lack come from the ``nvidia/*/include``
    folders of the installed NVIDIA wheels (CUDA torch depends on them).
  - GPU targets: ``TORCH_CUDA_ARCH_LIST`` when set; else the visible GPUs' (torch's default);
    else, with no GPU visible, ``DEFAULT_CUDA_ARCH_LIST``.

  Without nvcc, or with a toolkit that cannot build against this torch (major version differs
  from torch's CUDA, headers or libcudart missing), the CPU extension is built and the reason
  printed: the install never fails for want of a toolkit. A compile error fails the install.

The Python package itself imports without the extension (pure-PyTorch path), see
``engm_fast.ops``. Build where torch is already installed (it is a build dependency)::

    pip install --no-build-isolation -e .
"""
import glob
import importlib.util
import os
import re
import shutil
import subprocess
import sys

import torch
from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
# With no GPU to ask: real code for sm_80 (A100; it also runs on sm_86/sm_89: A10, L4, RTX
# 30xx/40xx) and sm_90 (H100/H200), and compute_90 PTX that the driver compiles for newer GPUs.
DEFAULT_CUDA_ARCH_LIST = "8.0;9.0+PTX"
# What ATen/cuda/CUDAContextLight.h includes besides the CUDA runtime.
CUDA_LIBRARY_HEADERS = ("cusparse.h", "cublas_v2.h", "cublasLt.h", "cusolverDn.h")


class ToolkitUnusable(Exception):
    """The CUDA toolkit is missing or cannot build against this torch; the message says why."""


def _sources(pattern: str) -> list[str]:
    """Sorted paths relative to the project root (setuptools wants relative paths)."""
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def _openmp_flag() -> list[str]:
    # at::parallel_for is a header template: compiled without OpenMP it silently runs on one
    # thread. Use OpenMP exactly when torch itself was built with it.
    if not torch.backends.openmp.is_available():
        return []
    return ["/openmp"] if sys.platform == "win32" else ["-fopenmp"]


def _run(*cmd: str) -> str:
    """The output of a toolkit command that must succeed (else ToolkitUnusable, saying how)."""
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise ToolkitUnusable(f"`{' '.join(cmd)}` failed: {exc}") from None
    if done.returncode != 0:
        # Without nvcc -v's own "#$ ..." lines: the error is what is left.
        error = "\n".join(line for line in (done.stdout + done.stderr).splitlines()
                          if not line.startswith("#$ "))
        raise ToolkitUnusable(f"`{' '.join(cmd)}` failed (exit {done.returncode}):\n{error[-1500:]}")
    return done.stdout + done.stderr


def _cuda_toolkit() -> str:
    """The CUDA toolkit's root folder, checked to build against this torch."""
    nvcc_name = "nvcc.exe" if sys.platform == "win32" else "nvcc"
    root = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    # As torch: CUDA_HOME's nvcc, else the one on PATH, else the toolkit's default place.
    nvcc = (os.path.join(root, "bin", nvcc_name) if root
            else shutil.which("nvcc") or shutil.which("nvcc", path="/usr/local/cuda/bin"))
    if nvcc is None or not os.path.isfile(nvcc):
        raise ToolkitUnusable(f"CUDA_HOME={root} has no bin/{nvcc_name}" if root else
                              "no nvcc on PATH nor in /usr/local/cuda/bin, and CUDA_HOME is not set")
    # Compiling an empty file checks nvcc and its host compiler; with -v nvcc's driver prints
    # the variables it sets, TOP being its toolkit's folder (also from behind a wrapper script).
    log = _run(nvcc, "-v", "-c", "-x", "cu", os.devnull, "-o", os.devnull)
    if not root:
        top = re.search(r"^#\$ TOP=(.+)$", log, re.M)
        if top is None:
            raise ToolkitUnusable(f"`{nvcc} -v` did not name its toolkit (no '#$ TOP=' line)")
        root = os.path.realpath(top.group(1).strip())
        nvcc = os.path.join(root, "bin", nvcc_name)
    release = re.search(r"release (\d+)\.(\d+)", _run(nvcc, "--version"))
    if release is None or release.group(1) != torch.version.cuda.split(".")[0]:
        found = release.group(0) if release else "of no release"
        raise ToolkitUnusable(f"{nvcc} is {found}, torch {torch.__version__} is built with CUDA "
                              f"{torch.version.cuda}: torch needs the same major version")
    cudart = "cudart.lib" if sys.platform == "win32" else "libcudart.so"
    if not glob.glob(os.path.join(root, "lib*", "**", cudart), recursive=True):
        raise ToolkitUnusable(f"no {cudart} under {root}/lib*")
    return root


def _library_header_dirs(toolkit_include: str) -> list[str]:
    """The installed NVIDIA wheels' include folders holding the library headers that
    ``toolkit_include`` lacks (none for a complete toolkit)."""
    spec = importlib.util.find_spec("nvidia")
    wheel_includes = [d for loc in (spec.submodule_search_locations if spec else [])
                      for d in sorted(glob.glob(os.path.join(loc, "*", "include")))]
    dirs = []
    for header in CUDA_LIBRARY_HEADERS:
        if os.path.isfile(os.path.join(toolkit_include, header)):
            continue
        holder = next((d for d in wheel_includes if os.path.isfile(os.path.join(d, header))), None)
        if holder is None:
            raise ToolkitUnusable(f"{header} is neither in {toolkit_include} nor in an installed "
                                  "NVIDIA wheel's include folder (nvidia/*/include)")
        if holder not in dirs:
            dirs.append(holder)
    return dirs


def _cuda_build() -> list[str] | None:
    """Include folders for the CUDA extension (the toolkit's, then the wheels' for what it
    lacks), having pointed torch's build at the toolkit and the GPU targets; None for the CPU
    extension, the reason printed."""
    if not torch.version.cuda:
        print(f"engm_fast: torch {torch.__version__} has no CUDA: building the CPU extension")
        return None
    try:
        toolkit = _cuda_toolkit()
        toolkit_include = os.path.join(toolkit, "include")
        # The toolkit's include folder first: the wheels' folders also hold cuda_runtime.h and
        # the like, possibly of another CUDA minor version than this nvcc's.
        include_dirs = [toolkit_include] + _library_header_dirs(toolkit_include)
    except ToolkitUnusable as reason:
        print(f"engm_fast: WARNING: building the CPU extension only, without the CUDA kernels, "
              f"because {reason}\nengm_fast: for the CUDA kernels, point CUDA_HOME at a CUDA "
              f"{torch.version.cuda.split('.')[0]}.x toolkit and reinstall.")
        return None
    os.environ["CUDA_HOME"] = toolkit
    if not os.environ.get("TORCH_CUDA_ARCH_LIST") and not torch.cuda.is_available():
        os.environ["TORCH_CUDA_ARCH_LIST"] = DEFAULT_CUDA_ARCH_LIST
    archs = os.environ.get("TORCH_CUDA_ARCH_LIST") or "the visible GPUs'"
    print(f"engm_fast: building the CUDA extension with the toolkit {toolkit} for GPU "
          f"architectures {archs} (TORCH_CUDA_ARCH_LIST overrides)")
    return include_dirs


CUDA_INCLUDE_DIRS = _cuda_build()
# Imported only now: torch.utils.cpp_extension settles CUDA_HOME when it is imported.
from torch.utils.cpp_extension import BuildExtension, CppExtension, CUDAExtension  # noqa: E402


def _extension():
    sources = _sources("csrc/ops.cpp") + _sources("csrc/composite/*.cpp") + _sources("csrc/cpu/*.cpp")
    omp = _openmp_flag()
    # -fno-trapping-math -fno-math-errno, as torch itself is built: without them GCC keeps the
    # branches of a clamp (a compare could raise a floating-point flag) and does not vectorize
    # csrc/cpu/lstm_recurrence.cpp's sigmoid loops (4-8x slower). No result changes.
    cxx_flags = (["/O2"] if sys.platform == "win32" else ["-O3", "-fno-trapping-math", "-fno-math-errno"]) + omp
    link_flags = [] if sys.platform == "win32" else omp
    include_dirs = [os.path.join(ROOT, "csrc")]
    if CUDA_INCLUDE_DIRS is not None:
        return CUDAExtension(
            "engm_fast._C",
            sources + _sources("csrc/cuda/*.cu") + _sources("csrc/cuda/kernels/*.cu"),
            include_dirs=include_dirs + CUDA_INCLUDE_DIRS,
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
