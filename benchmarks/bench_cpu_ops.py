"""C++ CPU ops (torch.ops.engm_fast.*) against the pure-PyTorch reference, on layer shapes.

Prints one row per (shape, op, route): median times of the reference and of the C++ op,
timed alternately in the same process (round-robin, so drift hits both alike), and their
ratio C++ / reference (< 1 means the C++ op is faster).

    python benchmarks/bench_cpu_ops.py [--dtype float32] [--rounds 7] [--threads N]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engm_fast import reference

try:
    import engm_fast._C  # noqa: F401  (registers torch.ops.engm_fast.*)
except ModuleNotFoundError as exc:
    raise SystemExit(f"engm_fast._C is not built ({exc}): pip install --no-build-isolation -e .")

# name, B, T, d_in, d_out
SHAPES = [
    ("MLP", 256, 1, 784, 512),
    ("conv 3x3x3->64", 64, 1024, 27, 64),
    ("conv 3x3x64->64", 64, 256, 576, 64),
    ("transformer", 32, 128, 256, 256),
]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _time(fn, min_seconds=0.05):
    """Seconds per call: repeats fn until min_seconds have passed (after one warm-up call)."""
    fn()
    n, start = 0, time.perf_counter()
    while True:
        fn()
        n += 1
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return elapsed / n


def _paired(ref_fn, ours_fn, rounds):
    ref_t, ours_t = [], []
    for _ in range(rounds):
        ref_t.append(_time(ref_fn))
        ours_t.append(_time(ours_fn))
    return statistics.median(ref_t), statistics.median(ours_t)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    parser.add_argument("--rounds", type=int, default=7, help="alternating timing rounds (median)")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    ops = torch.ops.engm_fast
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, dtype {args.dtype}, "
          f"median of {args.rounds} alternating rounds")
    header = f"{'shape':<17} {'B':>4} {'T':>5} {'d_in->d_out':>11}  {'op':<22} {'reference':>11} {'C++':>11} {'C++/ref':>8}"
    print(header)
    print("-" * len(header))
    for name, B, T, d_in, d_out in SHAPES:
        g = torch.Generator().manual_seed(0)
        shape_a, shape_b = ((B, d_in), (B, d_out)) if T == 1 else ((B, T, d_in), (B, T, d_out))
        a = torch.randn(shape_a, generator=g).to(dtype)
        b = torch.randn(shape_b, generator=g).to(dtype)
        w = torch.rand(B, generator=g)
        auto = reference.choose_sqnorm_route(T, d_in, d_out)
        cases = [(f"sqnorm auto ({auto})", auto)]
        if T > 1:
            other = "direct" if auto == "ghost" else "ghost"
            cases.append((f"sqnorm {other}", other))
        # the kernels take the route and the accumulation dtype explicitly (engm_fast.ops decides them)
        acc = reference.accumulation_dtype(dtype)
        w_acc = w.to(acc)
        rows = []
        for label, mode in cases:
            rows.append((label, *_paired(lambda: reference.per_example_sqnorm(a, b, mode),
                                         lambda: ops.per_example_sqnorm(a, b, mode, acc), args.rounds)))
        rows.append(("weighted_outer_sum", *_paired(lambda: reference.weighted_outer_sum(a, b, w),
                                                    lambda: ops.weighted_outer_sum(a, b, w_acc), args.rounds)))
        for label, ref_s, ours_s in rows:
            print(f"{name:<17} {B:>4} {T:>5} {f'{d_in}->{d_out}':>11}  {label:<22} "
                  f"{ref_s * 1e3:>9.3f}ms {ours_s * 1e3:>9.3f}ms {ours_s / ref_s:>8.2f}")


if __name__ == "__main__":
    main()
