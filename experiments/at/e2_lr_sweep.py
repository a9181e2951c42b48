"""E2: ENGM vs MSGD under PGD-AT and TRADES over a learning-rate sweep (4 rates x 3 seeds).

Command: python experiments/at/e2_lr_sweep.py
Small CNN on digits, 15 epochs (lr x0.1 at epochs 8 and 11), momentum 0.9, wd 5e-4, PGD-7
training attack (eps 0.15); metric: final PGD-20 test accuracy (and the best per-epoch PGD-20).
Each optimizer gets a half-decade grid spanning 30x around its demo-sweep optimum (MSGD 0.07,
ENGM 0.7): the sensitivity claim is about the spread across each optimizer's own grid.
"""
import sys

from common import FIGURES, PGD_ONLY, mean_std, plt, run, save

EPOCHS, SEEDS = 15, (0, 1, 2)
GRIDS = {"msgd": (0.01, 0.03, 0.1, 0.3), "engm": (0.1, 0.3, 1.0, 3.0)}
if "--quick" in sys.argv:
    EPOCHS, SEEDS = 2, (0,)
out = {}
for method in ("pgd", "trades"):
    for opt, grid in GRIDS.items():
        for lr in grid:
            for seed in SEEDS:
                r = run(f"E2 {method} {opt} lr {lr} seed {seed}", method=method, optimizer=opt, lr=lr, seed=seed,
                        epochs=EPOCHS, eval_train_subset=None, monitor=False, final_attacks=PGD_ONLY,
                        eval_every=EPOCHS)
                out[f"{method}/{opt}/{lr}/{seed}"] = {"final": r.get("final"), "best": r.get("best"),
                                                      "diverged": r["diverged"],
                                                      "test_pgd20": [h.get("test_robust_acc_pgd20") for h in r["history"]]}
save("e2_lr_sweep.json", {"epochs": EPOCHS, "seeds": SEEDS, "grids": GRIDS, "runs": out})

rows = []
p = plt()
fig, axes = p.subplots(1, 2, figsize=(10, 3.8), sharey=True)
for ax, method in zip(axes, ("pgd", "trades")):
    for opt, color in (("msgd", "tab:blue"), ("engm", "tab:red")):
        grid = GRIDS[opt]
        means, stds, bests = [], [], []
        for lr in grid:
            fin = [out[f"{method}/{opt}/{lr}/{s}"]["final"]["robust_acc_pgd"] if out[f"{method}/{opt}/{lr}/{s}"].get("final") else 0.0
                   for s in SEEDS]
            m, sd = mean_std(fin)
            means.append(m)
            stds.append(sd)
        rel = [lr / grid[1] for lr in grid]  # relative to the grid's second rate
        ax.errorbar(range(len(grid)), means, yerr=stds, marker="o", capsize=3, color=color,
                    label=f"{opt.upper()} lr {'/'.join(str(g) for g in grid)}")
        k = max(range(len(grid)), key=lambda i: means[i])
        rows.append((method, opt, grid, means, stds, k))
    ax.set(title=f"{'PGD-AT' if method == 'pgd' else 'TRADES (beta 6)'}", xlabel="grid position (half-decade steps)",
           ylabel="final PGD-20 test acc (mean ± sd, 3 seeds)")
    ax.set_xticks(range(4))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
fig.suptitle("E2: learning-rate sensitivity, small CNN on digits, 15 epochs", fontsize=9)
fig.tight_layout()
fig.savefig(f"{FIGURES}/e2_lr_sweep.png", dpi=90)

print("| method | optimizer | " + " | ".join(f"rate {i + 1}" for i in range(4)) + " | best (lr) | spread max-min | sd across rates |")
print("|---|---|" + "---|" * 7)
for method, opt, grid, means, stds, k in rows:
    cells = [f"{lr:g}: {m:.3f} ± {s:.3f}" for lr, m, s in zip(grid, means, stds)]
    spread = max(means) - min(means)
    sd_rates = mean_std(means)[1]
    print(f"| {method} | {opt} | " + " | ".join(cells) + f" | {means[k]:.3f} ({grid[k]:g}) | {spread:.3f} | {sd_rates:.3f} |")
