"""E1: gradient norm and variance, natural training vs PGD-AT (same model, data, optimizer).

Command: python experiments/at/e1_grad_stats.py
Both runs: small CNN on digits, MSGD lr 0.07, 15 epochs, 2 seeds. "Natural" is the same
pipeline with a zero training budget (eps = 0: x_adv = x); both are evaluated with PGD-20 at
eps = 0.15. The monitor records the raw per-example gradients of the training loss.
"""
from common import FIGURES, PGD_ONLY, mean_std, plt, run, save

EPOCHS, SEEDS = 15, (0, 1)
import json
import sys

from common import RESULTS

out = {}
if "--table-only" in sys.argv:  # re-print from the saved results without training
    with open(f"{RESULTS}/e1_grad_stats.json") as f:
        out = json.load(f)
for mode in (() if out else ("natural", "pgd_at")):
    for seed in SEEDS:
        kw = dict(method="pgd", optimizer="msgd", epochs=EPOCHS, seed=seed, eval_train_subset=None,
                  final_attacks=PGD_ONLY)
        if mode == "natural":
            kw.update(eps=0.0, train_steps=1, alpha=0.0, eval_eps=0.15)
        out[f"{mode}/seed{seed}"] = run(f"E1 {mode} seed {seed}", **kw)
if "--table-only" not in sys.argv:
    save("e1_grad_stats.json", out)

p = plt()
fig, axes = p.subplots(1, 3, figsize=(12, 3.6))
for mode, color in (("natural", "tab:blue"), ("pgd_at", "tab:red")):
    for seed in SEEDS:
        h = out[f"{mode}/seed{seed}"]["history"]
        ep = [r["epoch"] for r in h]
        lab = f"{'natural' if mode == 'natural' else 'PGD-AT'}" if seed == SEEDS[0] else None
        axes[0].plot(ep, [r["grad"]["grad_norm"] for r in h], color=color, label=lab)
        axes[1].plot(ep, [r["grad"]["norm_mean"] for r in h], color=color, label=lab)
        axes[2].plot(ep, [r["grad"]["variance"] for r in h], color=color, label=lab)
for a, t in zip(axes, ("||mean gradient|| (epoch mean)", "mean per-example norm", "gradient variance")):
    a.set(xlabel="epoch", title=t, yscale="log")
    a.grid(alpha=0.3)
axes[0].legend()
fig.suptitle("E1: small CNN on digits, MSGD lr 0.07 (2 seeds)", fontsize=9)
fig.tight_layout()
fig.savefig(f"{FIGURES}/e1_grad_stats.png", dpi=90)

print("| training | epoch 1: ||gbar|| / mean ||g_i|| / variance | epochs 1-15 mean: ||gbar|| / mean ||g_i|| / variance | last 5 epochs: ||gbar|| / mean ||g_i|| / variance | final clean | final PGD-20 |")
print("|---|---|---|---|---|---|")
for mode in ("natural", "pgd_at"):
    rs = [out[f"{mode}/seed{s}"] for s in SEEDS]
    def avg(key, lo, hi, rs=rs):
        return mean_std([sum(r["history"][e]["grad"][key] for e in range(lo, hi)) / (hi - lo) for r in rs])[0]
    cells = []
    for lo, hi in ((0, 1), (0, EPOCHS), (EPOCHS - 5, EPOCHS)):
        cells.append(" / ".join(f"{avg(k, lo, hi):.3g}" for k in ("grad_norm", "norm_mean", "variance")))
    c, rb = mean_std([r["final"]["clean_acc"] for r in rs]), mean_std([r["final"]["robust_acc_pgd"] for r in rs])
    print(f"| {'natural' if mode == 'natural' else 'PGD-AT'} | " + " | ".join(cells) + f" | {c[0]:.3f} | {rb[0]:.3f} |")
print()
print("Input-proxy Pearson r (attack's last-step input-gradient norm vs exact ||g_i||), pooled per epoch, seed 0:")
for mode in ("natural", "pgd_at"):
    h = out[f"{mode}/seed0"]["history"]
    print(f"- {mode}: epochs 1/5/10/15: " + " / ".join(f"{h[e - 1]['proxy_pearson_r']:.2f}" for e in (1, 5, 10, 15)))
