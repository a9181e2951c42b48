"""E4: adversarial training on fully random labels: memorization and gradient-norm curves.

Command: python experiments/at/e4_random_labels.py
Small CNN, a fixed 500-example digits subset with uniformly random labels (seeded, rate 1.0),
no augmentation, no weight decay (the memorization paper's setting), constant learning rate
(MSGD 0.07, ENGM 0.7), 100 epochs, PGD-AT and TRADES (beta 6). Every 5th epoch: PGD-20 robust
accuracy on the 500 training images (with their random labels); every epoch: the monitor's
gradient statistics (the paper logs the squared global norm of the mini-batch gradient).
"""
import sys

from common import FIGURES, PGD_ONLY, plt, run, save

EPOCHS, SUBSET = 100, 500
if "--quick" in sys.argv:
    EPOCHS = 3
import json

from common import RESULTS

TABLE_ONLY = "--table-only" in sys.argv  # re-print the table and redraw the figure from the saved JSON
out = {}
if TABLE_ONLY:
    with open(f"{RESULTS}/e4_random_labels.json") as f:
        out = json.load(f)
for method in (() if TABLE_ONLY else ("pgd", "trades")):
    for opt in ("msgd", "engm"):
        out[f"{method}/{opt}"] = run(f"E4 {method} {opt}", method=method, optimizer=opt, random_labels=True,
                                     epochs=EPOCHS, train_subset=SUBSET, eval_train_subset=SUBSET,
                                     lr_milestones=(), final_attacks=PGD_ONLY, test_subset=200,
                                     eval_every=5)
# Controls (not in the paper): can this CNN memorize the random labels at all? Natural training
# (eps = 0, evaluated at eps 0.15) and PGD-AT with a 3x smaller budget (eps = 0.05), MSGD.
if not TABLE_ONLY:
    out["natural/msgd"] = run("E4 natural msgd", method="pgd", optimizer="msgd", random_labels=True,
                              epochs=EPOCHS, train_subset=SUBSET, eval_train_subset=SUBSET, lr_milestones=(),
                              final_attacks=PGD_ONLY, test_subset=200, eval_every=5, eps=0.0, alpha=0.0, train_steps=1,
                              eval_eps=0.15)
    out["pgd-eps0.05/msgd"] = run("E4 pgd eps 0.05 msgd", method="pgd", optimizer="msgd", random_labels=True,
                                  epochs=EPOCHS, train_subset=SUBSET, eval_train_subset=SUBSET, lr_milestones=(),
                                  final_attacks=PGD_ONLY, test_subset=200, eval_every=5, eps=0.05, eval_eps=0.05)
    save("e4_random_labels.json", out)

p = plt()
fig, axes = p.subplots(1, 3, figsize=(13, 3.8))
style = {"pgd/msgd": ("tab:blue", "-"), "pgd/engm": ("tab:red", "-"), "trades/msgd": ("tab:blue", "--"),
         "trades/engm": ("tab:red", "--"), "natural/msgd": ("tab:gray", ":"), "pgd-eps0.05/msgd": ("tab:green", "-.")}
for key, r in out.items():
    h = [x for x in r["history"] if not x.get("diverged")]
    ep = [x["epoch"] for x in h]
    c, ls = style[key]
    names = {"pgd": "PGD-AT", "trades": "TRADES", "natural": "natural (eps 0)", "pgd-eps0.05": "PGD-AT eps 0.05"}
    lab = f"{names[key.split('/')[0]]} {key.split('/')[1].upper()}"
    ev = [x for x in h if x["train_robust_acc_pgd20"] is not None]
    axes[0].plot([x["epoch"] for x in ev], [x["train_robust_acc_pgd20"] for x in ev], ls, color=c, label=lab)
    axes[1].plot([x["epoch"] for x in ev], [x["train_clean_acc"] for x in ev], ls, color=c, label=lab)
    axes[2].plot(ep, [x["grad"]["grad_sqnorm"] for x in h], ls, color=c, label=lab)
axes[0].set(title="train robust acc. (PGD-20)", xlabel="epoch", ylim=(0, 1))
axes[1].set(title="train clean acc. (random labels)", xlabel="epoch", ylim=(0, 1))
axes[2].set(title="||mini-batch gradient||^2 (epoch mean)", xlabel="epoch", yscale="log")
for a in axes:
    a.grid(alpha=0.3)
axes[0].legend(fontsize=8)
fig.suptitle(f"E4: {SUBSET} digits with random labels, constant lr, no weight decay", fontsize=9)
fig.tight_layout()
fig.savefig(f"{FIGURES}/e4_random_labels.png", dpi=90)

print("| method | optimizer | train robust acc at epochs 25/50/75/100 | train clean acc (last) | ||gbar||^2 first/last epoch | max/min epoch ||gbar||^2 | sd of step ||gbar|| (last epoch) | diverged |")
print("|---|---|---|---|---|---|---|---|")
for key, r in out.items():
    h = [x for x in r["history"] if not x.get("diverged")]
    ev = [x for x in h if x["train_robust_acc_pgd20"] is not None]
    pick = [[x for x in ev if x["epoch"] <= e][-1]["train_robust_acc_pgd20"] if ev and ev[0]["epoch"] <= e else float("nan")
            for e in (25, 50, 75, 100)]
    sq = [x["grad"]["grad_sqnorm"] for x in h]
    m, o = key.split("/")
    print(f"| {m} | {o} | {' / '.join(f'{v:.3f}' for v in pick)} | {ev[-1]['train_clean_acc']:.3f} | "
          f"{sq[0]:.3f} / {sq[-1]:.3f} | {max(sq):.3f} / {min(sq):.3f} | {h[-1]['grad']['grad_norm_std']:.3f} | {r['diverged']} |")
