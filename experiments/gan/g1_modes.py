"""G1: mode coverage of a small GAN with SGDA, nSGDA, Adam and Ada_nSGDA (Jelassi et al., arXiv 2210.04319).

Data: a ring of 8 Gaussians (radius 2, sd 0.02) and a 5x5 grid of Gaussians (spacing 2, sd 0.05).
Generator: 16-d Gaussian latent -> MLP 128-128 (ReLU) -> 2; discriminator 2 -> 128-128 (ReLU) -> 1;
non-saturating loss, batch 256, one discriminator step then one generator step per iteration,
the same number of iterations for every optimizer. Each player has its own optimizer:

* SGDA: ``torch.optim.SGD(lr)``
* nSGDA: ``engm_fast.optim.NSGD(lr, granularity="layer")``
* Adam: ``torch.optim.Adam(lr, betas=(0.5, 0.999))``
* Ada_nSGDA: ``engm_fast.optim.Graft(magnitude=Adam(...), direction=SGD(lr=1))``

Metrics on 2500 generator samples: a sample is high quality when it is within 3 sd of its nearest
mode; a mode is covered when it holds at least 20% of its uniform share of the samples
(0.2 * 2500 / n_modes) as high-quality samples; a mode is reached when that many samples lie
within 0.25 of it (separates an imprecise generator from a collapsed one).

Command (from the repository root):
    python experiments/gan/g1_modes.py --iters 3000 --seeds 3 --out docs/figures
"""
from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from engm_fast.optim import NSGD, Graft

DATASETS = {
    "ring8": (torch.tensor([[2 * math.cos(2 * math.pi * i / 8), 2 * math.sin(2 * math.pi * i / 8)] for i in range(8)]), 0.02),
    "grid25": (torch.tensor([[float(a), float(b)] for a in range(-4, 5, 2) for b in range(-4, 5, 2)]), 0.05),
}


def make_optimizers(name, lr):
    if name == "SGDA":
        return lambda ps: torch.optim.SGD(ps, lr=lr["SGDA"])
    if name == "nSGDA":
        return lambda ps: NSGD(ps, lr=lr["nSGDA"], granularity="layer")
    if name == "Adam":
        return lambda ps: torch.optim.Adam(ps, lr=lr["Adam"], betas=(0.5, 0.999))
    if name == "Ada_nSGDA":
        return lambda ps: Graft(ps, magnitude=lambda q: torch.optim.Adam(q, lr=lr["Adam"], betas=(0.5, 0.999)),
                                direction=lambda q: torch.optim.SGD(q, lr=1.0))
    raise ValueError(name)


def mlp(i, o):
    return nn.Sequential(nn.Linear(i, 128), nn.ReLU(), nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, o))


def sample_data(modes, sd, n, gen):
    idx = torch.randint(0, modes.shape[0], (n,), generator=gen)
    return modes[idx] + sd * torch.randn(n, 2, generator=gen)


def evaluate(samples, modes, sd):
    """(modes covered, high-quality fraction, modes reached).

    Covered: >= 20% of the uniform share of samples within 3 sd of the mode (the strict,
    usual criterion). Reached: the same share within 0.25 of the mode (a quarter of the ring's
    neighbour spacing, 1.53): tells a generator that found the mode but is imprecise apart
    from one that collapsed.
    """
    dist = torch.cdist(samples, modes)
    d, nearest = dist.min(1)
    share = 0.2 * samples.shape[0] / modes.shape[0]
    hq = d < 3 * sd
    covered = int((torch.bincount(nearest[hq], minlength=modes.shape[0]) >= share).sum())
    near = d < 0.25
    reached = int((torch.bincount(nearest[near], minlength=modes.shape[0]) >= share).sum())
    return covered, float(hq.float().mean()), reached


def train(opt_name, dataset, seed, iters, lr):
    modes, sd = DATASETS[dataset]
    torch.manual_seed(seed)
    G, D = mlp(16, 2), mlp(2, 1)
    factory = make_optimizers(opt_name, lr)
    opt_g, opt_d = factory(list(G.parameters())), factory(list(D.parameters()))
    gen = torch.Generator().manual_seed(100 + seed)
    ones, zeros = torch.ones(256, 1), torch.zeros(256, 1)
    for _ in range(iters):
        real = sample_data(modes, sd, 256, gen)
        fake = G(torch.randn(256, 16, generator=gen))
        d_loss = F.binary_cross_entropy_with_logits(D(real), ones) + F.binary_cross_entropy_with_logits(D(fake.detach()), zeros)
        opt_d.zero_grad()
        d_loss.backward()
        opt_d.step()
        fake = G(torch.randn(256, 16, generator=gen))
        g_loss = F.binary_cross_entropy_with_logits(D(fake), ones)
        opt_g.zero_grad()
        g_loss.backward()
        opt_g.step()
    with torch.no_grad():
        samples = G(torch.randn(2500, 16, generator=torch.Generator().manual_seed(999)))
    return samples, evaluate(samples, modes, sd)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--iters", type=int, default=3000)
    ap.add_argument("--seeds", type=int, default=3)
    ap.add_argument("--lr-sgda", type=float, default=0.05)
    ap.add_argument("--lr-nsgda", type=float, default=0.01)
    ap.add_argument("--lr-adam", type=float, default=1e-3)
    ap.add_argument("--optimizers", default="SGDA,nSGDA,Adam,Ada_nSGDA")
    ap.add_argument("--datasets", default="ring8,grid25")
    ap.add_argument("--out", default="docs/figures")
    args = ap.parse_args()
    torch.set_num_threads(1)
    lr = {"SGDA": args.lr_sgda, "nSGDA": args.lr_nsgda, "Adam": args.lr_adam}
    opts, datasets = args.optimizers.split(","), args.datasets.split(",")
    results, samples0 = {}, {}
    for ds in datasets:
        for name in opts:
            runs = []
            for seed in range(args.seeds):
                t0 = time.perf_counter()
                samples, (covered, hq, reached) = train(name, ds, seed, args.iters, lr)
                runs.append({"covered": covered, "hq": hq, "reached": reached, "sec": time.perf_counter() - t0})
                if seed == 0:
                    samples0[(ds, name)] = samples
                print(f"{ds:7s} {name:10s} seed {seed}: modes {covered}/{DATASETS[ds][0].shape[0]}, "
                      f"high-quality {hq:.3f}, reached {reached} ({runs[-1]['sec']:.1f}s)", flush=True)
            results.setdefault(ds, {})[name] = runs
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "g1_gan.json").write_text(json.dumps({"args": vars(args), "results": results}, indent=1))
    print("\n| data | optimizer | modes covered (per seed) | mean | high-quality fraction mean ± sd | modes reached (per seed) |"
          "\n|---|---|---|---|---|---|")
    for ds in datasets:
        n_modes = DATASETS[ds][0].shape[0]
        for name in opts:
            runs = results[ds][name]
            cov = [r["covered"] for r in runs]
            hq = [r["hq"] for r in runs]
            m = sum(hq) / len(hq)
            sdv = math.sqrt(sum((h - m) ** 2 for h in hq) / (len(hq) - 1)) if len(hq) > 1 else 0.0
            reach = [r["reached"] for r in runs]
            print(f"| {ds} | {name} | {cov} of {n_modes} | {sum(cov) / len(cov):.1f} | {m:.3f} ± {sdv:.3f} | {reach} |")
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(datasets), len(opts), figsize=(3.2 * len(opts), 3.2 * len(datasets)), squeeze=False)
    for i, ds in enumerate(datasets):
        modes, _ = DATASETS[ds]
        lim = 3 if ds == "ring8" else 5.5
        for j, name in enumerate(opts):
            ax = axes[i][j]
            s = samples0[(ds, name)]
            ax.scatter(s[:, 0], s[:, 1], s=2, alpha=0.4)
            ax.scatter(modes[:, 0], modes[:, 1], s=18, c="red", marker="x")
            ax.set_xlim(-lim, lim)
            ax.set_ylim(-lim, lim)
            ax.set_title(f"{name} / {ds} (seed 0)", fontsize=9)
    fig.tight_layout()
    fig.savefig(out / "g1_gan_samples.png", dpi=100)
    print(f"wrote {out / 'g1_gan.json'} and {out / 'g1_gan_samples.png'}")


if __name__ == "__main__":
    main()
