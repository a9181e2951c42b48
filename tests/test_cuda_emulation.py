"""The CUDA kernels (csrc/cuda/kernels) run on the CPU under a host emulation.

CI machines have nvcc but no GPU: the CMake target ``cuda_compile_check`` proves the kernels
compile, this test proves their indexing, bounds, zero fill, pipeline ordering and reductions
compute the right numbers. ``tests/cuda_emulation/harness.cpp`` is compiled with the host C++
compiler against the kernel headers (plus ``emu.h``, which supplies threads, barriers, warp
shuffles, cp.async and wmma) and compares every route of per_example_sqnorm, the split-K
weighted_outer_sum and the multi-tensor SGD update with float64 references, for fp16, bf16,
float and double, on odd shapes, padded strides and misaligned pointers, with the tolerances of
engm_fast/reference.py's table (passed on the command line; the SGD update must equal its own
arithmetic exactly). It runs three times:
asynchronous copies landing at their wait, and landing at issue with two thread orders (a
missing wait or barrier changes the result in one of them).

Skipped when no C++20 compiler or no CUDA headers (cuda_fp16.h) are found. The emulation is
no substitute for the device tests (tests/test_ops.py on a GPU): see emu.h for what it cannot see.
"""
from __future__ import annotations

import glob
import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from engm_fast.reference import TOLERANCE

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
KERNELS = ROOT / "csrc" / "cuda" / "kernels"


def _cuda_include_dir() -> str | None:
    """A directory holding cuda_runtime.h and cuda_fp16.h, or None."""
    candidates = []
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var):
            candidates.append(os.path.join(os.environ[var], "include"))
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = os.path.dirname(os.path.realpath(nvcc))
        candidates += [os.path.join(real, "..", "include"),
                       os.path.join(real, "..", "targets", "x86_64-linux", "include")]
    candidates += ["/usr/local/cuda/include", "/usr/local/cuda/targets/x86_64-linux/include"]
    candidates += sorted(glob.glob("/usr/local/cuda-*/targets/x86_64-linux/include"), reverse=True)
    candidates += sorted(glob.glob("/usr/local/cuda-*/include"), reverse=True)
    for c in candidates:
        if os.path.isfile(os.path.join(c, "cuda_fp16.h")) and os.path.isfile(os.path.join(c, "cuda_runtime.h")):
            return os.path.abspath(c)
    return None


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Path:
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++")
    if cxx is None:
        pytest.skip("no host C++ compiler (g++ / clang++) to build the CUDA emulation")
    include = _cuda_include_dir()
    if include is None:
        pytest.skip("no CUDA headers (cuda_runtime.h, cuda_fp16.h) found for the CUDA emulation")
    exe = tmp_path_factory.mktemp("cuda_emulation") / "harness"
    cmd = [cxx, "-std=c++20", "-O2", "-Wall", "-Wextra", "-Wno-unknown-pragmas", "-Werror",
           f"-I{include}", f"-I{KERNELS}", "-x", "c++", str(HERE / "cuda_emulation" / "harness.cpp"), "-o", str(exe)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"building the emulation failed:\n{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    return exe


_TYPE_NAMES = {torch.float64: "fp64", torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _tolerance_args() -> list[str]:
    """reference.TOLERANCE as the harness's OP:TYPE=TOL arguments."""
    return [f"{op}:{_TYPE_NAMES[dtype]}={getattr(tol, op)!r}"
            for dtype, tol in TOLERANCE.items() for op in ("sqnorm", "outer")]


@pytest.mark.parametrize("copies", ["late", "early", "reverse"])
def test_kernels_under_emulation(harness, copies):
    proc = subprocess.run([str(harness), "all", copies, *_tolerance_args()], capture_output=True, text=True,
                          timeout=600)
    tail = (proc.stdout + proc.stderr)[-4000:]
    assert proc.returncode == 0, f"emulated kernels disagree with the references ({copies} copies):\n{tail}"
    assert " 0 failures" in proc.stdout, tail
