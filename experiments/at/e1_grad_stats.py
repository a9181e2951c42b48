"""E1: gradient norm and variance, natural training vs PGD-AT (same model, data, optimizer).

Command: python experiments/at/e1_grad_stats.py --dataset mnist   (also digits)
Both runs: MSGD at the data set's default rate, 2 seeds. "Natural" is the same pipeline with a
zero training budget (eps = 0: x_adv = x); both are evaluated at the data set's eps. The monitor
records the raw per-example gradients of the training loss every step.
"""
from common import cost, PGD_AND_AA_APGD, PGD_ONLY, Runs, figure_path, finish_or_exit, mean_std, parse_args, plt, save
from engm_fast.data import dataset_spec

SETTINGS = {
    "digits": dict(epochs=15, seeds=(0, 1), run=dict(eval_train_subset=None, final_attacks=PGD_ONLY)),
    "mnist": dict(epochs=10, seeds=(0, 1), run=dict(eval_train_subset=None, test_subset=200, final_subset=500,
                                                    final_attacks=PGD_AND_AA_APGD)),
}
args = parse_args(__doc__, datasets=("mnist", "digits"))
S = SETTINGS[args.dataset]
epochs, seeds = (2, S["seeds"][:1]) if args.quick else (S["epochs"], S["seeds"])
eps = dataset_spec(args.dataset).eps
runs = Runs("e1_grad_stats", args)
out = {}
for mode in ("natural", "pgd_at"):
    for seed in seeds:
        kw = dict(method="pgd", optimizer="msgd", epochs=epochs, seed=seed, **S["run"])
        if mode == "natural":
            kw.update(eps=0.0, train_steps=1, alpha=0.0, eval_eps=eps)
        out[f"{mode}/seed{seed}"] = runs.get(f"{mode}/seed{seed}", **kw)
finish_or_exit(runs)
save("e1_grad_stats.json", out, args.dataset)

p = plt()
fig, axes = p.subplots(1, 3, figsize=(12, 3.6))
for mode, color in (("natural", "tab:blue"), ("pgd_at", "tab:red")):
    for seed in seeds:
        h = out[f"{mode}/seed{seed}"]["history"]
        ep = [r["epoch"] for r in h]
        lab = ("natural" if mode == "natural" else "PGD-AT") if seed == seeds[0] else None
        for ax, key in zip(axes, ("grad_norm", "norm_mean", "variance")):
            ax.plot(ep, [r["grad"][key] for r in h], color=color, label=lab)
for a, t in zip(axes, ("||mean gradient|| (epoch mean)", "mean per-example norm", "gradient variance")):
    a.set(xlabel="epoch", title=t, yscale="log")
    a.grid(alpha=0.3)
axes[0].legend()
fig.suptitle(f"E1: {args.dataset}, MSGD ({len(seeds)} seeds)", fontsize=9)
fig.tight_layout()
fig.savefig(figure_path("e1_grad_stats.png", args.dataset), dpi=90)

last = min(5, epochs)
foreign = "robust_acc_aa_apgd" in next(iter(out.values()))["final"]
print(f"| training | epoch 1: ||gbar|| / mean ||g_i|| / variance | epochs 1-{epochs} mean: ||gbar|| / mean ||g_i|| / "
      f"variance | last {last} epochs: ||gbar|| / mean ||g_i|| / variance | final clean | final PGD-20 |"
      + (" final AA-APGD |" if foreign else ""))
print("|---|---|---|---|---|---|" + ("---|" if foreign else ""))
for mode in ("natural", "pgd_at"):
    rs = [out[f"{mode}/seed{s}"] for s in seeds]

    def avg(key, lo, hi, rs=rs):
        return mean_std([sum(r["history"][e]["grad"][key] for e in range(lo, hi)) / (hi - lo) for r in rs])[0]
    cells = [" / ".join(f"{avg(k, lo, hi):.3g}" for k in ("grad_norm", "norm_mean", "variance"))
             for lo, hi in ((0, 1), (0, epochs), (epochs - last, epochs))]
    finals = [mean_std([r["final"][k] for r in rs])[0] for k in ("clean_acc", "robust_acc_pgd")
              + (("robust_acc_aa_apgd",) if foreign else ())]
    print(f"| {'natural' if mode == 'natural' else 'PGD-AT'} | " + " | ".join(cells) + " | "
          + " | ".join(f"{v:.3f}" for v in finals) + " |")
print()
marks = sorted({1, max(1, epochs // 3), max(1, 2 * epochs // 3), epochs})
print(f"Input-proxy Pearson r (attack's last-step input-gradient norm vs exact ||g_i||), pooled per epoch, seed {seeds[0]}:")
for mode in ("natural", "pgd_at"):
    h = out[f"{mode}/seed{seeds[0]}"]["history"]
    print(f"- {mode}: epochs {'/'.join(map(str, marks))}: " + " / ".join(f"{h[e - 1]['proxy_pearson_r']:.2f}" for e in marks))
print()
print(cost(out.values()))
