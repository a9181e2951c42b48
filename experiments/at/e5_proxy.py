"""E5: validity of the input-gradient proxy; ENGM-proxy vs exact ENGM accuracy and step time.

Command: python experiments/at/e5_proxy.py --dataset mnist   (also digits; mnist needs E2's results first)
(a) Correlation: exact ENGM runs (PGD-AT and TRADES, seed 0) log, per epoch, the Pearson r
    between the attack's free last-step input-gradient norm ||grad_x objective_i|| and the
    exact parameter-gradient norm ||g_i|| of the training loss (pooled over the epoch, and the
    mean of per-batch r).
(b) Accuracy and time, PGD-AT, 3 seeds, monitor off: exact ENGM, ENGM-proxy (calibrate_every
    50) and MSGD. mnist: E2's runs at each optimizer's best E2 rate (the same runs, read from
    E2's results); digits: runs of its own at the demo rates. update_ms = backward + optimizer
    step; batch_ms also includes the attack and the forward.
"""
from common import cost, PGD_AND_AA_APGD, PGD_ONLY, Runs, e2_best_lrs, figure_path, finish_or_exit, fmt, mean_std, \
    parse_args, plt, save

SETTINGS = {
    "digits": dict(epochs=15, seeds=(0, 1, 2), from_e2=False, run=dict(eval_train_subset=None, final_attacks=PGD_ONLY)),
    "mnist": dict(epochs=10, seeds=(0, 1, 2), from_e2=True,
                  run=dict(eval_train_subset=None, test_subset=200, final_subset=500, final_attacks=PGD_AND_AA_APGD)),
}
OPTS = ("engm", "engm_proxy", "msgd")
args = parse_args(__doc__, datasets=("mnist", "digits"))
S = SETTINGS[args.dataset]
epochs, seeds = (2, S["seeds"][:1]) if args.quick else (S["epochs"], S["seeds"])
lrs = {opt: None for opt in OPTS}  # None: the data set's default rate
if S["from_e2"] and not args.quick:
    lrs = e2_best_lrs(args.dataset)
runs = Runs("e5_proxy", args)
corr = {method: runs.get(f"corr/{method}", method=method, optimizer="engm", lr=lrs["engm"], epochs=epochs, seed=0,
                         **S["run"]) for method in ("pgd", "trades")}
if S["from_e2"] and not args.quick:
    source = Runs("e2_lr_sweep", args)
    timing = {f"{opt}/{s}": source.get(f"pgd/{opt}/{lrs[opt]}/{s}", method="pgd", optimizer=opt, lr=lrs[opt], seed=s,
                                       epochs=epochs, eval_every=epochs, monitor=False, **dict(S["run"], test_subset=200))
              for s in seeds for opt in OPTS}
    finish_or_exit(source)
else:
    timing = {f"{opt}/{s}": runs.get(f"timing/{opt}/{s}", method="pgd", optimizer=opt, epochs=epochs, seed=s,
                                     monitor=False, **S["run"]) for s in seeds for opt in OPTS}
finish_or_exit(runs)
save("e5_proxy.json", {"lrs": lrs, "correlation": corr, "timing": timing}, args.dataset)

p = plt()
fig, ax = p.subplots(figsize=(6, 3.8))
for method, c in (("pgd", "tab:red"), ("trades", "tab:purple")):
    h = corr[method]["history"]
    ep = [x["epoch"] for x in h]
    ax.plot(ep, [x["proxy_pearson_r"] for x in h], "-o", ms=3, color=c, label=f"{method.upper()} pooled over epoch")
    ax.plot(ep, [x["proxy_batch_r_mean"] for x in h], ":", color=c, label=f"{method.upper()} mean per-batch r")
ax.set(xlabel="epoch", ylabel="Pearson r(||grad_x||, ||g_i||)", ylim=(-1, 1),
       title=f"E5: input-gradient proxy, ENGM runs ({args.dataset})")
ax.axhline(0, color="k", lw=0.5)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(figure_path("e5_proxy_corr.png", args.dataset), dpi=90)

marks = sorted({1, max(1, epochs // 3), max(1, 2 * epochs // 3), epochs})
print(f"Correlation (exact ENGM runs, lr {lrs['engm']}, seed 0):")
print(f"| method | r pooled, epoch {' / '.join(map(str, marks))} | mean per-batch r, epoch {' / '.join(map(str, marks))} |")
print("|---|---|---|")
for method in ("pgd", "trades"):
    h = corr[method]["history"]
    print(f"| {method} | " + " / ".join(format(h[e - 1]["proxy_pearson_r"], ".2f") for e in marks) + " | "
          + " / ".join(format(h[e - 1]["proxy_batch_r_mean"], ".2f") for e in marks) + " |")
print()
foreign = "robust_acc_aa_apgd" in timing[f"msgd/{seeds[0]}"]["final"]
print("| optimizer | lr | final clean | final PGD-20 |" + (" final AA-APGD |" if foreign else "")
      + " update ms (mean of epoch means) | batch ms | update time / MSGD |")
print("|---|---|---|---|" + ("---|" if foreign else "") + "---|---|---|")
msgd_u = {s: mean_std([x["update_ms"] for x in timing[f"msgd/{s}"]["history"]])[0] for s in seeds}
for opt in OPTS:
    rs = [timing[f"{opt}/{s}"] for s in seeds]
    u = [mean_std([x["update_ms"] for x in r["history"]])[0] for r in rs]
    bt = [mean_std([x["batch_ms"] for x in r["history"]])[0] for r in rs]
    ratio = [ui / msgd_u[s] for ui, s in zip(u, seeds)]
    print(f"| {opt} | {rs[0]['config']['lr']:g} | {fmt([r['final']['clean_acc'] for r in rs])} | "
          f"{fmt([r['final']['robust_acc_pgd'] for r in rs])} | "
          + (f"{fmt([r['final']['robust_acc_aa_apgd'] for r in rs])} | " if foreign else "")
          + f"{mean_std(u)[0]:.2f} | {mean_std(bt)[0]:.1f} | {fmt(ratio, 2)} |")
print()
print(cost(corr.values(), "correlation runs") + (" (the accuracy/time runs are E2's)" if S["from_e2"] and not args.quick
                                                   else "; " + cost(timing.values(), "accuracy/time runs")))
