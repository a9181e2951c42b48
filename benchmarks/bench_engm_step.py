"""ENGM step time over a plain SGD-momentum step, and the cost of the engine during attacks.

Every ratio is measured in one process, the two sides interleaved round by round (unpaired
timings on the 2-core CI machine drift by +-30%, DESIGN.md section 5); the median over rounds
is reported.

* step: forward + backward + optimizer step on one batch. Plain: ``loss.mean().backward()``
  with ``torch.optim.SGD(momentum=0.9)``; ENGM: ``opt.backward(losses)`` with ``engm_fast.ENGM``.
* attack: a PGD-10 attack (10 forward + input-gradient passes) on a model with the engine
  attached vs an identical copy without it, twice: ``engm_fast.at.pgd_attack`` (which pauses
  the engine's recording) and a plain PGD loop as third-party attack code writes it (the
  engine's taps stay in its graphs).

Run:  python benchmarks/bench_engm_step.py [--rounds 7] [--out benchmarks/results/cpu_step_overhead.json]
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import sys
import time

import torch
import torch.nn as nn
import torch.nn.functional as F

import engm_fast
from engm_fast.at import pgd_attack


def mlp():
    return nn.Sequential(nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10))


def cnn32():
    return nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, 10),
    )


class LNBlock(nn.Module):
    """Pre-LN MLP block on sequences, mean-pooled classifier."""

    def __init__(self, d=128):
        super().__init__()
        self.embed = nn.Linear(32, d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, 10)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(1))


def demo_cnn():
    from engm_fast.demo import make_model
    return make_model(seed=0)


CASES = {
    "mlp_b256": (mlp, (256, 784)),
    "demo_cnn_b128_8x8": (demo_cnn, (128, 1, 8, 8)),
    "cnn_b64_32x32": (cnn32, (64, 3, 32, 32)),
    "ln_block_b32_t64": (LNBlock, (32, 64, 32)),
}


def paired_ratio(fn_base, fn_test, rounds, iters):
    """Median over rounds of time(fn_test) / time(fn_base), alternating which runs first."""
    for _ in range(2):
        fn_base(), fn_test()
    ratios, base_ms, test_ms = [], [], []
    for r in range(rounds):
        order = [(fn_base, base_ms), (fn_test, test_ms)]
        if r % 2:
            order.reverse()
        for fn, sink in order:
            t0 = time.perf_counter()
            for _ in range(iters):
                fn()
            sink.append((time.perf_counter() - t0) / iters * 1e3)
        ratios.append(test_ms[-1] / base_ms[-1])
    return statistics.median(ratios), statistics.median(base_ms), statistics.median(test_ms)


def step_case(name, rounds, iters):
    make, shape = CASES[name]
    torch.manual_seed(0)
    base_model = make()
    plain, eng = copy.deepcopy(base_model), copy.deepcopy(base_model)
    sgd = torch.optim.SGD(plain.parameters(), lr=1e-3, momentum=0.9)
    engm = engm_fast.ENGM(eng, lr=1e-3, momentum=0.9)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))

    def plain_step():
        sgd.zero_grad(set_to_none=True)
        F.cross_entropy(plain(x), y).backward()
        sgd.step()

    def engm_step():
        engm.zero_grad(set_to_none=True)
        engm.backward(F.cross_entropy(eng(x), y, reduction="none"))
        engm.step()

    ratio, base, test = paired_ratio(plain_step, engm_step, rounds, iters)
    return {"case": name, "what": "ENGM step / SGD step", "ratio": ratio, "base_ms": base, "engm_ms": test}


def third_party_pgd(model, x, y, eps=0.2, alpha=0.05, steps=10):
    """PGD as attack libraries write it: nothing engm_fast-specific."""
    x_adv = (x + torch.empty_like(x).uniform_(-eps, eps)).clamp(0, 1)
    for _ in range(steps):
        x_adv.requires_grad_(True)
        loss = F.cross_entropy(model(x_adv), y)
        (grad,) = torch.autograd.grad(loss, x_adv)
        x_adv = (x + (x_adv.detach() + alpha * grad.sign() - x).clamp(-eps, eps)).clamp(0, 1)
    return x_adv


def attack_cases(rounds, iters):
    rows = []
    for model_name, make, shape in (("demo_cnn_b128_8x8", demo_cnn, (128, 1, 8, 8)),
                                    ("cnn_b64_32x32", cnn32, (64, 3, 32, 32))):
        torch.manual_seed(0)
        base_model = make()
        plain, eng = copy.deepcopy(base_model), copy.deepcopy(base_model)
        engm_fast.attach(eng)
        x, y = torch.rand(*shape), torch.randint(0, 10, (shape[0],))
        for label, attack in (("pgd10_engm_fast_at", lambda m: pgd_attack(m, x, y, eps=0.2, alpha=0.05, steps=10)),
                              ("pgd10_third_party_loop", lambda m: third_party_pgd(m, x, y))):
            ratio, base, test = paired_ratio(lambda: attack(plain), lambda: attack(eng), rounds, iters)
            rows.append({"case": f"{label}_{model_name}", "what": "PGD-10 with engine / without",
                         "ratio": ratio, "base_ms": base, "engm_ms": test})
    return rows


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--iters", type=int, default=5, help="steps timed per round")
    parser.add_argument("--cases", nargs="*", default=list(CASES) + ["attack"])
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    rows = []
    for name in args.cases:
        new_rows = attack_cases(args.rounds, args.iters) if name == "attack" else [step_case(name, args.rounds, args.iters)]
        for row in new_rows:
            rows.append(row)
            print(f"{row['case']:<40} {row['what']:<30} {row['ratio']:6.3f}x   "
                  f"({row['base_ms']:.2f} ms -> {row['engm_ms']:.2f} ms)", flush=True)
    if args.out:
        meta = {"machine": platform.machine(), "processor": platform.processor(), "cpus": os.cpu_count(),
                "threads": torch.get_num_threads(), "torch": torch.__version__, "python": sys.version.split()[0],
                "backends": engm_fast.available_backends(), "date": time.strftime("%Y-%m-%d"),
                "rounds": args.rounds, "iters": args.iters}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
