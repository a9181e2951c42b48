"""E5: validity of the input-gradient proxy; ENGM-proxy vs exact ENGM accuracy and step time.

Command: python experiments/at/e5_proxy.py
(a) Correlation: exact ENGM runs (PGD-AT and TRADES, small CNN on digits, 15 epochs, seed 0)
    log, per epoch, the Pearson r between the attack's free last-step input-gradient norm
    ||grad_x objective_i|| and the exact parameter-gradient norm ||g_i|| of the training loss
    (pooled over the epoch, and the mean of per-batch r).
(b) Accuracy and time: PGD-AT, lr 0.7, 15 epochs, 3 seeds, monitor off; ENGM exact,
    ENGM-proxy (calibrate_every 50) and plain MSGD (lr 0.07) for reference, run back to back
    per seed. update_ms = backward + optimizer step; batch_ms also includes the attack and forward.
"""
import sys

from common import FIGURES, PGD_ONLY, mean_std, plt, run, save

EPOCHS, SEEDS = 15, (0, 1, 2)
if "--quick" in sys.argv:
    EPOCHS, SEEDS = 2, (0,)
corr = {}
for method in ("pgd", "trades"):
    corr[method] = run(f"E5a {method}", method=method, optimizer="engm", epochs=EPOCHS, seed=0,
                       eval_train_subset=None, final_attacks=PGD_ONLY)
timing = {}
for seed in SEEDS:
    for opt in ("engm", "engm_proxy", "msgd"):
        timing[f"{opt}/{seed}"] = run(f"E5b {opt} seed {seed}", method="pgd", optimizer=opt, epochs=EPOCHS, seed=seed,
                                      eval_train_subset=None, monitor=False, final_attacks=PGD_ONLY)
save("e5_proxy.json", {"correlation": corr, "timing": timing})

p = plt()
fig, ax = p.subplots(figsize=(6, 3.8))
for method, c in (("pgd", "tab:red"), ("trades", "tab:purple")):
    h = corr[method]["history"]
    ep = [x["epoch"] for x in h]
    ax.plot(ep, [x["proxy_pearson_r"] for x in h], "-o", ms=3, color=c, label=f"{method.upper()} pooled over epoch")
    ax.plot(ep, [x["proxy_batch_r_mean"] for x in h], ":", color=c, label=f"{method.upper()} mean per-batch r")
ax.set(xlabel="epoch", ylabel="Pearson r(||grad_x||, ||g_i||)", ylim=(-1, 1), title="E5: input-gradient proxy, ENGM runs")
ax.axhline(0, color="k", lw=0.5)
ax.grid(alpha=0.3)
ax.legend(fontsize=8)
fig.tight_layout()
fig.savefig(f"{FIGURES}/e5_proxy_corr.png", dpi=90)

print("Correlation (exact ENGM runs, seed 0):")
print("| method | r pooled, epoch 1 / 5 / 10 / 15 | mean per-batch r, epoch 1 / 5 / 10 / 15 |")
print("|---|---|---|")
for method in ("pgd", "trades"):
    h = corr[method]["history"]
    idx = [min(e, len(h)) - 1 for e in (1, 5, 10, 15)]
    pooled = " / ".join(format(h[i]["proxy_pearson_r"], ".2f") for i in idx)
    per_batch = " / ".join(format(h[i]["proxy_batch_r_mean"], ".2f") for i in idx)
    print(f"| {method} | {pooled} | {per_batch} |")
print()
print("| optimizer | final clean | final PGD-20 | best PGD-20 | update ms (mean of epoch means) | batch ms | update time / MSGD |")
print("|---|---|---|---|---|---|---|")
msgd_u = {s: mean_std([x["update_ms"] for x in timing[f"msgd/{s}"]["history"]])[0] for s in SEEDS}
for opt in ("engm", "engm_proxy", "msgd"):
    rs = [timing[f"{opt}/{s}"] for s in SEEDS]
    c = mean_std([r["final"]["clean_acc"] for r in rs])
    f = mean_std([r["final"]["robust_acc_pgd"] for r in rs])
    b = mean_std([r["best"]["robust_acc_pgd"] for r in rs])
    u = [mean_std([x["update_ms"] for x in r["history"]])[0] for r in rs]
    bt = [mean_std([x["batch_ms"] for x in r["history"]])[0] for r in rs]
    ratio = mean_std([ui / msgd_u[s] for ui, s in zip(u, SEEDS)])
    print(f"| {opt} | {c[0]:.3f} ± {c[1]:.3f} | {f[0]:.3f} ± {f[1]:.3f} | {b[0]:.3f} ± {b[1]:.3f} | "
          f"{mean_std(u)[0]:.2f} | {mean_std(bt)[0]:.1f} | {ratio[0]:.2f} ± {ratio[1]:.2f} |")
