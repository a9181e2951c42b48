"""The per-layer route choices of the engine, timed: what ``engm_fast/engine/rules/conv.py``'s
``_CORRELATE_POSITIONS`` rests on, and why Linear layers over positions take the ghost route
rather than keeping their per-example gradients (a batched GEMM, then norms and the weighted sum
read them): measured, keeping was never cheaper on these shapes.

For each shape: the cost of every route that gives a layer's per-example squared norms and its
weighted sum ``sum_i w_i g_i``, and the route the engine picks. Thread CPU time (median of
``--repeats``), so a loaded machine disturbs it less than wall time::

    python benchmarks/bench_routes.py --threads 2 --out benchmarks/results/routes.txt
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from engm_fast.engine.contributions import OuterProduct
from engm_fast.engine.rules import conv as conv_rules
from engm_fast.engine.rules.conv import ConvWeight

LINEAR = [  # (B, T, d_in, d_out)
    (32, 64, 64, 256), (32, 64, 256, 64), (32, 16, 128, 512), (32, 16, 512, 128), (32, 65, 256, 768),
    (32, 128, 256, 768), (32, 32, 256, 1024),
]
DEPTHWISE = [  # (B, C, kernel, output side)
    (32, 64, 7, 8), (32, 128, 7, 4), (32, 32, 3, 32), (32, 96, 3, 28), (32, 64, 3, 8),
]


def _time(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t = time.thread_time()
        fn()
        out.append(time.thread_time() - t)
    return statistics.median(out) * 1e3


def linear_rows(repeats: int) -> list[str]:
    rows = ["Linear over T positions: ms for norms + weighted sum (ghost: Gram matrices + weighted GEMM; "
            "keep: batched GEMM of the per-example gradients, kept)"]
    for B, T, d_in, d_out in LINEAR:
        a, b, w = torch.randn(B, T, d_in), torch.randn(B, T, d_out), torch.rand(B)

        def ghost():
            c = OuterProduct(a, b, (d_out, d_in))
            c.sqnorms()
            c.weighted_sum(w)

        def keep():
            g = torch.bmm(b.transpose(1, 2), a).reshape(B, -1)
            g.pow(2).sum(1)
            torch.mm(w.unsqueeze(0), g)

        rows.append(f"  B={B} T={T:4d} {d_in:4d}->{d_out:4d}: ghost {_time(ghost, repeats):7.2f}  "
                    f"keep {_time(keep, repeats):7.2f}")
    return rows


def depthwise_rows(repeats: int) -> list[str]:
    rows = ["Depthwise conv per-example gradients: ms (grouped convolution_backward vs forward correlation)"]
    for B, C, k, side in DEPTHWISE:
        conv = nn.Conv2d(C, C, k, padding=k // 2, groups=C)
        x = torch.randn(B, C, side, side)
        with torch.no_grad():
            g = torch.randn_like(conv(x))
        cw = ConvWeight.of_module(conv, x, g)
        saved = conv_rules._CORRELATE_POSITIONS
        try:
            conv_rules._CORRELATE_POSITIONS = 0
            grouped = _time(lambda: cw._grouped_per_example(0, B), repeats)
            conv_rules._CORRELATE_POSITIONS = 1 << 30
            correlated = _time(lambda: cw._grouped_per_example(0, B), repeats)
        finally:
            conv_rules._CORRELATE_POSITIONS = saved
        picked = "correlate" if cw._correlates(g) else "grouped"
        rows.append(f"  B={B} C={C:3d} {k}x{k} at {side}x{side}: grouped {grouped:7.2f}  correlate {correlated:7.2f}"
                    f"  engine picks {picked}")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    lines = [f"torch {torch.__version__}, {args.threads} threads, median of {args.repeats} (thread CPU time)"]
    lines += linear_rows(args.repeats) + depthwise_rows(args.repeats)
    text = "\n".join(lines)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text + "\n")


if __name__ == "__main__":
    main()
