"""Where an ENGM step's time goes, segment by segment, next to a plain SGD step.

Segments: forward; backward (plain: autograd incl. weight gradients; ENGM: the engine's one
backward, input gradients only, with the rule-handled layers' contributions built inside it);
ENGM's norms + weighted sums + bookkeeping; optimizer step. With ``--ops``, also the ten
operators with the most self time of each step (torch.profiler), which is what shows an extra
GEMM or convolution per layer.

The cases are those of ``engm-fast bench`` (engm_fast.bench.suite), at full size unless
``--quick``.

Run:  python benchmarks/profile_engm_segments.py [--case mlp] [--steps 20] [--quick] [--ops]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import engm_fast
from engm_fast.bench.suite import cases_for

STEP_CASES = tuple(n for n in cases_for("cpu", True) if n != "pgd10_cnn")  # one optimizer step each


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="mlp", choices=STEP_CASES)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--quick", action="store_true", help="the small sizes of engm-fast bench --quick")
    parser.add_argument("--ops", action="store_true", help="also print the top operators of each step")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    case = cases_for("cpu", args.quick)[args.case]
    torch.manual_seed(0)
    base = case.make_model()
    x, y = case.make_batch(torch.Generator().manual_seed(1))
    plain, eng = copy.deepcopy(base), copy.deepcopy(base)
    sgd = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt = engm_fast.ENGM(eng, lr=1e-3, momentum=0.9)
    params = [p for g in opt.param_groups for p in g["params"]]

    def plain_step(t):
        sgd.zero_grad(set_to_none=True)
        loss = F.cross_entropy(plain(x), y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        sgd.step()
        t.append(time.perf_counter())

    def engm_step(t):
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(eng(x), y, reduction="none")
        t.append(time.perf_counter())
        grads = opt.engine.backward(losses, params)
        t.append(time.perf_counter())
        w = 1.0 / (grads.sqnorms().sqrt() + opt.eps) / x.shape[0]
        for p, g in grads.weighted_grads(w).items():
            p.grad = g
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())

    names = ["plain forward", "plain backward", "plain step",
             "ENGM forward", "ENGM engine backward", "ENGM norms+weighted sums", "ENGM step"]
    total = dict.fromkeys(names, 0.0)
    warmup = 3
    for it in range(args.steps + warmup):
        t = [time.perf_counter()]
        plain_step(t)
        engm_step(t)
        if it >= warmup:
            for n, a, b in zip(names, t[:-1], t[1:]):
                total[n] += b - a
    print(f"{args.case} ({case.note}): mean over {args.steps} interleaved steps, {torch.get_num_threads()} threads")
    for n in names:
        print(f"  {n:<26} {total[n] / args.steps * 1e3:9.3f} ms")
    plain_total = sum(total[n] for n in names[:3])
    engm_total = sum(total[n] for n in names[3:])
    print(f"  {'ENGM / plain':<26} {engm_total / plain_total:9.3f}x")
    if args.ops:
        from torch.profiler import ProfilerActivity, profile

        for label, step in (("plain", plain_step), ("ENGM", engm_step)):
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(5):
                    step([])
            print(f"\n{label}: top operators by self time over 5 steps")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=10))


if __name__ == "__main__":
    main()
