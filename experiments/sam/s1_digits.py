"""S1: SAM vs delta-SAM (both score sources) vs the base optimizer on digits with 20% label noise.

Data: scikit-learn's 8x8 digits (ships with the package), the stratified 75/25 split of
``engm_fast.data.load_digits``; 20% of the training labels are replaced by a different
class drawn uniformly (fixed by the seed); test labels are clean. Model: MLP 64-256-256-10
(ReLU). Base optimizer SGD (lr 0.05, momentum 0.9), batch 64, the same epochs for all:

* ``SGD``: the base optimizer alone
* ``SAM``: ``engm_fast.optim.SAM(rho=0.1)``
* ``dSAM-pert``: ``DeltaSAM(score_source="perturbation", noise_scale=0.01, n_perturb=1, temperature=1)``
* ``dSAM-norm``: ``DeltaSAM(score_source="grad_norm", temperature=1)`` (exact per-example norms)

Cost: seconds per optimizer step (data indexing included), the median over steps of each run,
as a ratio to SAM's in the same process (denormals flushed to zero for every method, see main()).

Command (from the repository root):
    python experiments/sam/s1_digits.py --epochs 40 --seeds 3 --out docs/figures
"""
from __future__ import annotations

import argparse
import json
import math
import statistics
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engm_fast.data import load_digits
from engm_fast.optim import SAM, DeltaSAM

METHODS = ["SGD", "SAM", "dSAM-pert", "dSAM-norm"]


def noisy_labels(y, rate, gen):
    y = y.clone()
    flip = torch.rand(y.shape[0], generator=gen) < rate
    shift = torch.randint(1, 10, (y.shape[0],), generator=gen)  # a different class, uniformly
    y[flip] = (y[flip] + shift[flip]) % 10
    return y, flip


def make_model():
    return nn.Sequential(nn.Flatten(), nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))


def build(method, model, rho):
    kw = dict(lr=0.05, momentum=0.9)
    if method == "SGD":
        return torch.optim.SGD(model.parameters(), **kw)
    if method == "SAM":
        return SAM(model.parameters(), torch.optim.SGD, rho=rho, model=model, **kw)
    if method == "dSAM-pert":
        return DeltaSAM(model.parameters(), torch.optim.SGD, rho=rho, model=model, score_source="perturbation",
                        noise_scale=0.01, n_perturb=1, temperature=1.0, **kw)
    return DeltaSAM(model.parameters(), torch.optim.SGD, rho=rho, model=model, score_source="grad_norm",
                    temperature=1.0, **kw)


def run(method, seed, epochs, rho, data):
    x_tr, y_tr, x_te, y_te = data
    torch.manual_seed(seed)
    model = make_model()
    opt = build(method, model, rho)
    gen = torch.Generator().manual_seed(seed)
    step_times, curve = [], []
    for _ in range(epochs):
        model.train()
        perm = torch.randperm(x_tr.shape[0], generator=gen)
        for i in range(0, x_tr.shape[0], 64):
            t0 = time.perf_counter()
            idx = perm[i:i + 64]
            xb, yb = x_tr[idx], y_tr[idx]
            if method == "SGD":
                opt.zero_grad()
                F.cross_entropy(model(xb), yb).backward()
                opt.step()
            elif method == "SAM":
                def closure():
                    opt.zero_grad()
                    loss = F.cross_entropy(model(xb), yb)
                    loss.backward()
                    return loss
                opt.step(closure)
            else:
                opt.step(lambda: F.cross_entropy(model(xb), yb, reduction="none"))
            step_times.append(time.perf_counter() - t0)
        model.eval()
        with torch.no_grad():
            curve.append(float((model(x_te).argmax(1) == y_te).float().mean()))
    with torch.no_grad():
        train_fit = float((model(x_tr).argmax(1) == y_tr).float().mean())
    return {"test_acc": curve[-1], "best_test_acc": max(curve), "curve": curve,
            "train_acc_noisy_labels": train_fit, "sec_per_step": statistics.median(step_times)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--epochs", type=int, default=40)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--rho", type=float, default=0.1)
    ap.add_argument("--noise", type=float, default=0.2)
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    # Memorized examples drive per-example losses and gradients into the denormal range, where
    # x86 arithmetic is ~100x slower; that would time denormal handling, not the optimizers.
    torch.set_flush_denormal(True)
    x_tr, y_tr, x_te, y_te, _ = load_digits()
    y_noisy, flipped = noisy_labels(y_tr, args.noise, torch.Generator().manual_seed(0))
    print(f"train {x_tr.shape[0]} ({int(flipped.sum())} labels flipped), test {x_te.shape[0]}")
    data = (x_tr, y_noisy, x_te, y_te)
    results = {}
    for seed in range(args.seeds):
        for method in METHODS:  # interleaved so that machine load drifts hit every method alike
            r = run(method, seed, args.epochs, args.rho, data)
            results.setdefault(method, []).append(r)
            print(f"seed {seed} {method:10s} test {r['test_acc']:.4f} (best {r['best_test_acc']:.4f}) "
                  f"train-noisy {r['train_acc_noisy_labels']:.3f} {1e3 * r['sec_per_step']:.2f} ms/step", flush=True)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "s1_sam.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))

    def ms(vals):
        m = sum(vals) / len(vals)
        return m, (math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0)

    sam_step = [r["sec_per_step"] for r in results["SAM"]]
    print("\n| method | final test acc (mean ± sd) | best-epoch test acc | fit of noisy train labels | ms/step | step time / SAM |"
          "\n|---|---|---|---|---|---|")
    for method in METHODS:
        rs = results[method]
        acc, accsd = ms([r["test_acc"] for r in rs])
        best, bestsd = ms([r["best_test_acc"] for r in rs])
        fit, _ = ms([r["train_acc_noisy_labels"] for r in rs])
        ratio, ratiosd = ms([r["sec_per_step"] / s for r, s in zip(rs, sam_step)])
        step, _ = ms([r["sec_per_step"] for r in rs])
        print(f"| {method} | {acc:.4f} ± {accsd:.4f} | {best:.4f} ± {bestsd:.4f} | {fit:.3f} | {1e3 * step:.2f} | "
              f"{ratio:.2f} ± {ratiosd:.2f} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for method in METHODS:
        curves = torch.tensor([r["curve"] for r in results[method]])
        ax.plot(range(1, args.epochs + 1), curves.mean(0), label=method)
    ax.set_xlabel("epoch")
    ax.set_ylabel("clean test accuracy (mean over seeds)")
    ax.set_title(f"S1: digits, {int(100 * args.noise)}% label noise")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "s1_sam_curves.png", dpi=110)
    print(f"wrote {out / 's1_sam.json'} and {out / 's1_sam_curves.png'}")


if __name__ == "__main__":
    main()
