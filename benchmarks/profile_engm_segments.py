"""Where an ENGM step's time goes, segment by segment, next to a plain SGD step.

Segments: forward; backward (plain: autograd incl. weight gradients; ENGM: the engine's one
backward, input gradients only); ENGM's norms + weighted sums + diagnostics; optimizer step.

Run:  python benchmarks/profile_engm_segments.py [--case mlp_b256] [--steps 30]
"""
from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

import engm_fast
from bench_engm_step import CASES


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--case", default="mlp_b256", choices=sorted(CASES))
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args(argv)
    make, shape = CASES[args.case]
    torch.manual_seed(0)
    base = make()
    plain, eng = copy.deepcopy(base), copy.deepcopy(base)
    sgd = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    opt = engm_fast.ENGM(eng, lr=1e-3, momentum=0.9)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    names = ["plain forward", "plain backward", "plain step",
             "ENGM forward", "ENGM engine backward", "ENGM norms+weighted sums", "ENGM step"]
    total = dict.fromkeys(names, 0.0)
    for it in range(args.steps + 5):
        t = [time.perf_counter()]
        sgd.zero_grad(set_to_none=True)
        loss = F.cross_entropy(plain(x), y)
        t.append(time.perf_counter())
        loss.backward()
        t.append(time.perf_counter())
        sgd.step()
        t.append(time.perf_counter())
        opt.zero_grad(set_to_none=True)
        losses = F.cross_entropy(eng(x), y, reduction="none")
        t.append(time.perf_counter())
        grads = opt.engine.backward(losses, opt._params())
        t.append(time.perf_counter())
        norms = grads.sqnorms().sqrt()
        opt._write(grads, norms, torch.ones_like(norms, dtype=torch.bool))
        t.append(time.perf_counter())
        opt.step()
        t.append(time.perf_counter())
        if it >= 5:  # warm-up steps are not counted
            # t[3] -> t[4] is ENGM's zero_grad + forward: "ENGM forward"
            spans = [t[i + 1] - t[i] for i in range(7)]
            for n, s in zip(names, spans):
                total[n] += s
    print(f"{args.case}: mean over {args.steps} steps ({torch.get_num_threads()} threads)")
    for n in names:
        print(f"  {n:<26} {total[n] / args.steps * 1e3:7.3f} ms")


if __name__ == "__main__":
    main()
