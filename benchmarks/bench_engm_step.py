"""ENGM step time over a plain SGD-momentum step, and the cost of the engine during attacks.

Every ratio is measured in one process, the two sides interleaved round by round
(:func:`engm_fast.bench.measure.round_robin_times`: unpaired timings on the 2-core CI machine
drift by +-30%); the median over rounds is reported.

* step: forward + backward + optimizer step on one batch, the ``sgd`` and ``engm`` methods of
  :mod:`engm_fast.bench.methods`. Plain: ``loss.mean().backward()`` with
  ``torch.optim.SGD(momentum=0.9)``; ENGM: ``opt.backward(losses)`` with ``engm_fast.ENGM``.
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
import statistics
import time

import torch
import torch.nn.functional as F

import engm_fast
from engm_fast.at import pgd_attack
from engm_fast.bench.measure import median_ratio, round_robin_times
from engm_fast.bench.methods import build
from engm_fast.bench.models import PreLNMLPBlock, cnn32, mlp
from engm_fast.bench.suite import machine_info
from engm_fast.models import small_cnn

CASES = {
    "mlp_b256": (mlp, (256, 784)),
    "demo_cnn_b128_8x8": (small_cnn, (128, 1, 8, 8)),
    "cnn_b64_32x32": (cnn32, (64, 3, 32, 32)),
    "ln_block_b32_t64": (PreLNMLPBlock, (32, 64, 32)),
}
LR, MOMENTUM = 1e-3, 0.9


def paired_ratio(fn_base, fn_test, rounds, iters):
    """``(median ratio test / base, median base ms, median test ms)`` over interleaved rounds."""
    times = round_robin_times({"base": fn_base, "test": fn_test}, torch.device("cpu"), rounds, iters)
    return median_ratio(times, "test", "base"), statistics.median(times["base"]), statistics.median(times["test"])


def step_case(name, rounds, iters):
    make, shape = CASES[name]
    torch.manual_seed(0)
    base_model = make()
    plain = build("sgd", copy.deepcopy(base_model), lr=LR, momentum=MOMENTUM)
    engm = build("engm", copy.deepcopy(base_model), lr=LR, momentum=MOMENTUM)
    x, y = torch.randn(*shape), torch.randint(0, 10, (shape[0],))
    ratio, base, test = paired_ratio(lambda: plain.step(x, y), lambda: engm.step(x, y), rounds, iters)
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
    for model_name in ("demo_cnn_b128_8x8", "cnn_b64_32x32"):
        make, shape = CASES[model_name]
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
        meta = {**machine_info(torch.device("cpu")), "date": time.strftime("%Y-%m-%d"), "rounds": args.rounds,
                "iters": args.iters}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "results": rows}, f, indent=2)


if __name__ == "__main__":
    main()
