"""E3: robust overfitting, best vs last robust test accuracy: MSGD, ENGM, MSGD+TE, ENGM+TE.

Command: python experiments/at/e3_overfitting.py
Small CNN, PGD-AT, a fixed 300-example training subset of digits (small enough to overfit),
80 epochs (lr x0.1 at 40 and 60), 2 seeds, evaluated every 2nd epoch; TE with the paper's a = 0.9, W = 300 and
es/ee = 90/150 of 200 scaled to 36/60 of 80. Per evaluation: PGD-20 on the full 450-image test
set and on the 300 training images (every 2nd epoch, to fit the CPU budget). At the end, the last and the best (by per-epoch PGD-20)
models are evaluated with PGD-20 and torchattacks' APGD-CE (50 steps) when installed.
"""
import sys

from common import FIGURES, mean_std, plt, run, save

EPOCHS, SEEDS, SUBSET = 80, (0, 1), 300
if "--quick" in sys.argv:
    EPOCHS, SEEDS = 3, (0,)
VARIANTS = {"MSGD": dict(optimizer="msgd"), "ENGM": dict(optimizer="engm"),
            "MSGD+TE": dict(optimizer="msgd", te=True), "ENGM+TE": dict(optimizer="engm", te=True)}
out = {}
for name, kw in VARIANTS.items():
    for seed in SEEDS:
        out[f"{name}/{seed}"] = run(f"E3 {name} seed {seed}", method="pgd", epochs=EPOCHS, seed=seed,
                                    train_subset=SUBSET, eval_train_subset=SUBSET, monitor=False, eval_every=2, **kw)
save("e3_overfitting.json", out)

p = plt()
fig, ax = p.subplots(figsize=(7, 4.2))
colors = {"MSGD": "tab:blue", "ENGM": "tab:red", "MSGD+TE": "tab:cyan", "ENGM+TE": "tab:orange"}
for name in VARIANTS:
    h = [r for r in out[f"{name}/{SEEDS[0]}"]["history"] if r["test_robust_acc_pgd20"] is not None]
    ep = [r["epoch"] for r in h]
    ax.plot(ep, [r["test_robust_acc_pgd20"] for r in h], color=colors[name], label=f"{name} test PGD-20")
    ax.plot(ep, [r["train_robust_acc_pgd20"] for r in h], ":", color=colors[name], alpha=0.7)
ax.set(xlabel="epoch", ylabel="robust accuracy (dotted: train)", ylim=(0, 1),
       title=f"E3: PGD-AT on {SUBSET} digits, seed {SEEDS[0]}")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{FIGURES}/e3_overfitting.png", dpi=90)

print("| variant | best PGD-20 (epoch) | last PGD-20 | best - last | last APGD-CE | best-ckpt APGD-CE | last train PGD-20 | last clean |")
print("|---|---|---|---|---|---|---|---|")
for name in VARIANTS:
    rs = [out[f"{name}/{s}"] for s in SEEDS]
    best = mean_std([r["best"]["robust_acc_pgd"] for r in rs])
    last = mean_std([r["final"]["robust_acc_pgd"] for r in rs])
    gap = mean_std([r["best"]["robust_acc_pgd"] - r["final"]["robust_acc_pgd"] for r in rs])
    la = mean_std([r["final"].get("robust_acc_apgd") for r in rs])
    ba = mean_std([r["best"].get("robust_acc_apgd") for r in rs])
    tr = mean_std([r["history"][-1]["train_robust_acc_pgd20"] for r in rs])  # the last epoch is evaluated
    cl = mean_std([r["final"]["clean_acc"] for r in rs])
    eps_ = ",".join(str(r["best"]["epoch"]) for r in rs)
    print(f"| {name} | {best[0]:.3f} ± {best[1]:.3f} ({eps_}) | {last[0]:.3f} ± {last[1]:.3f} | {gap[0]:.3f} | "
          f"{la[0]:.3f} | {ba[0]:.3f} | {tr[0]:.3f} | {cl[0]:.3f} |")
