"""E3: robust overfitting, best vs last robust test accuracy: MSGD, ENGM, MSGD+TE, ENGM+TE.

Command: python experiments/at/e3_overfitting.py --dataset mnist   (also fashion-mnist, digits)
PGD-AT on a fixed training subset small enough to overfit, long enough for the test robust
accuracy to peak and fall: a step schedule (lr x0.1 at 50% and 75% of the epochs, where robust
overfitting shows in the papers), 2 seeds, evaluated every 2nd epoch (PGD-20 on test and
training images). TE with the paper's a = 0.9, W = 300 and es/ee = 90/150 of 200 epochs,
scaled. At the end the last and the best (by per-epoch PGD-20) models are evaluated by PGD-20
and a foreign attack (28x28 sets: AutoAttack's APGD stages; digits: APGD-CE) on the final subset.
Each optimizer runs at the best rate of E2's sweep on the same set; a set's settings may add
rates (``extra_lrs``: Fashion-MNIST repeats ENGM's rows at lr 1).
"""
from common import cost, PGD_AND_AA_APGD, Runs, e2_best_lrs, figure_path, finish_or_exit, fmt, parse_args, plt, save

_28 = dict(epochs=40, seeds=(0, 1), foreign="aa_apgd",
           run=dict(train_subset=1000, eval_train_subset=200, test_subset=200, final_subset=500, eval_every=2,
                    monitor=False, lr_schedule="multistep", final_attacks=PGD_AND_AA_APGD))
SETTINGS = {
    "digits": dict(epochs=80, seeds=(0, 1), foreign="apgd", lrs={},
                   run=dict(train_subset=300, eval_train_subset=300, monitor=False, eval_every=2,
                            final_attacks=("pgd-20", "apgd-ce"))),
    # the best rates of E2's PGD-AT sweep on each set (read from E2's results)
    "mnist": dict(_28, lrs="e2"),
    # ENGM at E2's best rate (3) collapsed in both seeds under this step schedule (E2's one-cycle
    # schedule ramps the rate up; this one starts at it), so ENGM's rows are repeated at lr 1, the
    # next rate of E2's grid (stable there).
    "fashion-mnist": dict(_28, lrs="e2", extra_lrs={"engm": (1.0,)}),
}
VARIANTS = {"MSGD": dict(optimizer="msgd"), "ENGM": dict(optimizer="engm"),
            "MSGD+TE": dict(optimizer="msgd", te=True), "ENGM+TE": dict(optimizer="engm", te=True)}
args = parse_args(__doc__)
S = SETTINGS[args.dataset]
epochs, seeds = (3, S["seeds"][:1]) if args.quick else (S["epochs"], S["seeds"])
if S["lrs"] == "e2":
    S["lrs"] = {} if args.quick else e2_best_lrs(args.dataset)
# (row label, variant, lr): every variant at E2's best rate of its optimizer, then the extra rates
rows = [(name, name, S["lrs"].get(kw["optimizer"])) for name, kw in VARIANTS.items()]
rows += [(f"{name} (lr {lr:g})", name, lr) for name, kw in VARIANTS.items()
         for lr in ({} if args.quick else S.get("extra_lrs", {})).get(kw["optimizer"], ())]
runs = Runs("e3_overfitting", args)
out = {}
for seed in seeds:
    for label, name, lr in rows:
        out[f"{label}/{seed}"] = runs.get(f"{label}/{seed}", method="pgd", epochs=epochs, seed=seed, lr=lr, **S["run"],
                                          **VARIANTS[name])
finish_or_exit(runs)
save("e3_overfitting.json", out, args.dataset)
key = "test_robust_acc_pgd20"
foreign = "robust_acc_" + S["foreign"]
flabel = {"aa_apgd": "AA-APGD", "apgd": "APGD-CE"}[S["foreign"]]

p = plt()
fig, ax = p.subplots(figsize=(7, 4.2))
colors = {"MSGD": "tab:blue", "ENGM": "tab:red", "MSGD+TE": "tab:cyan", "ENGM+TE": "tab:orange"}
for label, name, _ in rows:
    h = [r for r in out[f"{label}/{seeds[0]}"]["history"] if r.get(key) is not None]
    ep = [r["epoch"] for r in h]
    style = "-" if label == name else "--"
    ax.plot(ep, [r[key] for r in h], style, color=colors[name], label=f"{label} test PGD-20")
    ax.plot(ep, [r["train_robust_acc_pgd20"] for r in h], ":", color=colors[name], alpha=0.7)
ax.set(xlabel="epoch", ylabel="robust accuracy (dotted: train)", ylim=(0, 1),
       title=f"E3: PGD-AT on {S['run']['train_subset']} {args.dataset} images, seed {seeds[0]}, "
             f"lr MSGD {out[f'MSGD/{seeds[0]}']['config']['lr']:g} / ENGM {out[f'ENGM/{seeds[0]}']['config']['lr']:g}")
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(figure_path("e3_overfitting.png", args.dataset), dpi=90)

print(f"| variant | best PGD-20 (epoch) | last PGD-20 | best - last | last {flabel} | best-ckpt {flabel} | "
      "last train PGD-20 | last clean |")
print("|---|---|---|---|---|---|---|---|")
for label, _, _ in rows:
    rs = [out[f"{label}/{s}"] for s in seeds]
    best_epochs = ",".join(str(r["best"]["epoch"]) for r in rs)
    print(f"| {label} | {fmt([r['best']['robust_acc_pgd'] for r in rs])} ({best_epochs}) | "
          f"{fmt([r['final']['robust_acc_pgd'] for r in rs])} | "
          f"{fmt([r['best']['robust_acc_pgd'] - r['final']['robust_acc_pgd'] for r in rs])} | "
          f"{fmt([r['final'].get(foreign) for r in rs])} | {fmt([r['best'].get(foreign) for r in rs])} | "
          f"{fmt([r['history'][-1]['train_robust_acc_pgd20'] for r in rs])} | {fmt([r['final']['clean_acc'] for r in rs])} |")
print()
print(cost(out.values()))
