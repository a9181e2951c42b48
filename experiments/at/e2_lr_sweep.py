"""E2: MSGD vs ENGM (vs ENGM-proxy) under PGD-AT and TRADES over a learning-rate sweep, several seeds.

Command: python experiments/at/e2_lr_sweep.py --dataset mnist   (also fashion-mnist, digits)
Each optimizer gets its own grid, wide enough to reach the rates where it diverges or
collapses; every cell is trained with each seed. Metric: the last model's accuracy under
AutoAttack's APGD stages (APGD-CE then APGD-T, torchattacks) and our PGD-20 on a fixed test
subset; at each optimizer's best PGD-AT rate, the full AutoAttack (+ FAB-T, Square) on the same
images (PGD-AT only: Square's 5,000 queries cost minutes per model here). digits (the small-scale contrast): PGD-20 only, the settings of the first E2 table.
"""
from common import (cost, FULL_AA, PGD_AND_AA_APGD, PGD_ONLY, Runs, figure_path, finish_or_exit, fmt, mean_std,
                    parse_args, plt, save)

_28 = dict(eval_train_subset=None, monitor=False, test_subset=200, final_subset=500, final_attacks=PGD_AND_AA_APGD)
SETTINGS = {
    "digits": dict(epochs=15, seeds=(0, 1, 2), metric="pgd", full_aa=None,
                   grids={"msgd": (0.01, 0.03, 0.1, 0.3), "engm": (0.1, 0.3, 1.0, 3.0)},
                   run=dict(eval_train_subset=None, monitor=False, final_attacks=PGD_ONLY)),
    "mnist": dict(epochs=10, seeds=(0, 1, 2), metric="aa_apgd", full_aa=500,
                  grids={"msgd": (0.01, 0.03, 0.1, 0.3, 1.0), "engm": (0.1, 0.3, 1.0, 3.0, 10.0),
                         "engm_proxy": (0.1, 0.3, 1.0, 3.0, 10.0)}, run=_28),
    # Fashion-MNIST: a fixed 4,000-image training subset (MNIST-5k's size), MNIST's grids and seeds
    "fashion-mnist": dict(epochs=10, seeds=(0, 1, 2), metric="aa_apgd", full_aa=500,
                          grids={"msgd": (0.01, 0.03, 0.1, 0.3, 1.0), "engm": (0.1, 0.3, 1.0, 3.0, 10.0),
                                 "engm_proxy": (0.1, 0.3, 1.0, 3.0, 10.0)},
                          run=dict(_28, train_subset=4000)),
}
METHODS = ("pgd", "trades")
COLLAPSED = 0.2  # a final clean accuracy below this (10 classes): the run collapsed to a constant prediction

args = parse_args(__doc__)
S = SETTINGS[args.dataset]
epochs, seeds = (2, S["seeds"][:1]) if args.quick else (S["epochs"], S["seeds"])
G = S["grids"] if "pgd" in S["grids"] else {m: S["grids"] for m in METHODS}  # per method: {optimizer: rates}
if args.quick:
    G = {m: {opt: grid[:2] for opt, grid in g.items()} for m, g in G.items()}
runs = Runs("e2_lr_sweep", args)
out = {}
for seed in seeds:
    for method in METHODS:
        for opt, grid in G[method].items():
            for lr in grid:
                out[f"{method}/{opt}/{lr}/{seed}"] = runs.get(f"{method}/{opt}/{lr}/{seed}", method=method, optimizer=opt,
                                                              lr=lr, seed=seed, epochs=epochs, eval_every=epochs,
                                                              **S["run"])
finish_or_exit(runs)
metric = "robust_acc_" + S["metric"]


def final(key, name):
    r = out[key]
    return (r.get("final") or {}).get(name, 0.0) if r else None


def cell(method, opt, lr, name):
    return [final(f"{method}/{opt}/{lr}/{s}", name) for s in seeds]


def collapsed(method, opt, lr):
    return sum(1 for s in seeds if out[f"{method}/{opt}/{lr}/{s}"]["diverged"]
               or final(f"{method}/{opt}/{lr}/{s}", "clean_acc") < COLLAPSED)


best = {}
for method in METHODS:
    for opt, grid in G[method].items():
        best[(method, opt)] = max(grid, key=lambda lr: mean_std(cell(method, opt, lr, metric))[0])
full = {}
if S["full_aa"] and not args.quick:
    for (method, opt), lr in best.items():
        for s in seeds if method == "pgd" else ():
            key = f"{method}/{opt}/{lr}/{s}"
            full[key] = runs.evaluate(f"full_aa/{key}", key, ("autoattack",), S["full_aa"])
    finish_or_exit(runs)

save("e2_lr_sweep.json", {"dataset": args.dataset, "epochs": epochs, "seeds": seeds, "grids": G,
                          "settings": S["run"], "runs": out, "full_autoattack": full}, args.dataset)

label = {"aa_apgd": "AA-APGD", "pgd": "PGD-20"}[S["metric"]]
print(f"Per cell, {len(seeds)} seeds (mean ± sd); collapsed = diverged or final clean accuracy < {COLLAPSED}:")
print(f"| method | optimizer | lr | clean | PGD-20 | {label if label != 'PGD-20' else 'PGD-20 per seed'} | "
      f"{label} per seed | collapsed |")
print("|---|---|---|---|---|---|---|---|")
for method in METHODS:
    for opt, grid in G[method].items():
        for lr in grid:
            per_seed = " / ".join(f"{v:.3f}" for v in cell(method, opt, lr, metric))
            mark = " **best**" if best[(method, opt)] == lr else ""
            print(f"| {method} | {opt} | {lr:g}{mark} | {fmt(cell(method, opt, lr, 'clean_acc'))} | "
                  f"{fmt(cell(method, opt, lr, 'robust_acc_pgd'))} | {fmt(cell(method, opt, lr, metric))} | {per_seed} | "
                  f"{collapsed(method, opt, lr)}/{len(seeds)} |")
print()
print(f"Best rate per optimizer (by mean final {label}); spread = max - min of the cell means over the grid:")
head = "| method | optimizer | best lr | clean | PGD-20 | " + (f"{label} | full AutoAttack | full AA per seed | "
                                                          if full else f"{label} | ") + "spread | stable rates |"
print(head)
print("|" + "---|" * (head.count("|") - 1))
for (method, opt), lr in best.items():
    means = [mean_std(cell(method, opt, g, metric))[0] for g in G[method][opt]]
    stable = ", ".join(f"{g:g}" for g in G[method][opt] if collapsed(method, opt, g) == 0) or "none"
    row = (f"| {method} | {opt} | {lr:g} | {fmt(cell(method, opt, lr, 'clean_acc'))} | "
           f"{fmt(cell(method, opt, lr, 'robust_acc_pgd'))} | {fmt(cell(method, opt, lr, metric))} | ")
    if full and method == "pgd":
        aa = [full[f"{method}/{opt}/{lr}/{s}"]["robust_acc_aa"] for s in seeds]
        row += f"{fmt(aa)} | {' / '.join(f'{v:.3f}' for v in aa)} | "
    elif full:
        row += "not run | | "
    print(row + f"{max(means) - min(means):.3f} | {stable} |")

print()
print(cost(out.values()) + (f"; full AutoAttack: {cost(full.values(), 'evaluations')[6:]}" if full else ""))

p = plt()
fig, axes = p.subplots(1, len(METHODS), figsize=(5 * len(METHODS), 3.8), sharey=True)
colors = {"msgd": "tab:blue", "engm": "tab:red", "engm_proxy": "tab:orange"}
for ax, method in zip(axes, METHODS):
    for opt, grid in G[method].items():
        m = [mean_std(cell(method, opt, lr, metric)) for lr in grid]
        ax.errorbar(grid, [a for a, _ in m], yerr=[b for _, b in m], marker="o", capsize=3, color=colors[opt],
                    label=f"{opt.upper()} {label}")
        if metric != "robust_acc_pgd":
            ax.plot(grid, [mean_std(cell(method, opt, lr, "robust_acc_pgd"))[0] for lr in grid], ":", marker=".",
                    color=colors[opt], alpha=0.6, label=f"{opt.upper()} PGD-20")
    ax.set(xscale="log", xlabel="learning rate", title="PGD-AT" if method == "pgd" else "TRADES (beta 6)",
           ylabel=f"final test accuracy (mean ± sd, {len(seeds)} seeds)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
fig.suptitle(f"E2 on {args.dataset}: learning-rate sensitivity, {epochs} epochs", fontsize=9)
fig.tight_layout()
fig.savefig(figure_path("e2_lr_sweep.png", args.dataset), dpi=90)
