"""E6: ENGM's collapses at high learning rates: the float32-noise mechanism, and remedies.

Command: python experiments/at/e6_stability.py --dataset mnist
(a) Mechanism. The runs of (b) (except the 3 seeds taken from E2) record every step: the
    fraction of the batch whose loss (float64 from the float32 logits) is below 1e-6 -- where
    float32 resolves ``p_y - 1``, the true-class component of ``softmax - onehot``, to a few
    ulps of 6e-8 -- and the share of ENGM's update those examples carry,
    ``sum_fitted ||g_i||/(||g_i|| + eps) / sum_all ...`` (each example's contribution has norm
    ``||g_i||/(||g_i|| + eps)``). Once per epoch, the batch's per-example gradients are
    recomputed in float64 (torch.func, a float64 copy of the model): the relative error of the
    float32 norms (the engine's) for fitted and ordinary examples, and the cosine between
    ENGM's float32 update and the float64 one.
(b) Remedies, each over learning rates from plain ENGM's best to past its collapse, 6 seeds
    (plain ENGM's seeds 0-2 are E2's runs): ``norm_floor=0.01`` (``engm_fast.ENGM``: norms
    raised to 1% of the batch mean; examples above the floor keep their weight) and float64
    losses (``loss_precision="float64"``: exact ``softmax - onehot``, the paper's weights
    unchanged). Metric: E2's (AA-APGD and PGD-20 on 500 test images); collapsed = final clean
    accuracy below 0.2.
"""
import copy
import math

import torch
import torch.nn.functional as F

import engm_fast.at.train as train_module
from common import (cost, PGD_AND_AA_APGD, Runs, _say, data, figure_path, finish_or_exit, fmt, mean_std, parse_args, plt,
                    save)
from engm_fast.at.train import TrainConfig, TrainingRun

_28 = dict(eval_train_subset=None, monitor=False, test_subset=200, final_subset=500, final_attacks=PGD_AND_AA_APGD)
SETTINGS = {
    # 6 seeds at E2's best rate of plain ENGM (0.3), where it degrades (1), where PGD-20 and
    # AutoAttack disagree (3) and where it collapses (10); plain ENGM's seeds 0-2 are E2's runs.
    "mnist": dict(epochs=10, seeds=(0, 1, 2, 3, 4, 5), e2_seeds=(0, 1, 2), lrs=(0.3, 1.0, 3.0, 10.0), run=_28),
}
VARIANTS = {"ENGM": {}, "ENGM floor 0.01": dict(engm_norm_floor=0.01), "ENGM float64 loss": dict(loss_precision="float64")}
FITTED = 1e-6  # loss below this: float32's p_y - 1 is a few ulps (6e-8) of 1
COLLAPSED = 0.2

args = parse_args(__doc__, datasets=tuple(SETTINGS))
S = SETTINGS[args.dataset]
epochs = 2 if args.quick else S["epochs"]
seeds = S["seeds"][:1] if args.quick else S["seeds"]


def float64_check(model, cfg, x, y, engm_grad, eps):
    """Per-example gradients of the batch in float64 and float32 (torch.func) against the engine's;
    the float64 update uses the run's own weighting (with its norm floor, if any)."""
    from engm_fast.optim.weighting import example_weights
    from torch.func import functional_call, grad, vmap

    from engm_fast.models import make_model

    out = {}
    for dtype in (torch.float64, torch.float32):
        m = make_model(cfg.model, num_classes=10, in_channels=1, **cfg.model_kwargs).to(dtype)
        m.load_state_dict(model.state_dict())
        params = {k: v.detach().to(dtype) for k, v in m.named_parameters()}

        def loss(p, xi, yi):
            return F.cross_entropy(functional_call(m, p, (xi[None],)), yi[None])

        g = vmap(grad(loss), in_dims=(None, 0, 0))(params, x.to(dtype), y)
        flat = torch.cat([g[k].reshape(x.shape[0], -1) for k in params], 1).double()
        norms = flat.norm(dim=1)
        w = example_weights(norms, "normalize", eps, norm_floor=cfg.engm_norm_floor)
        out[dtype] = (norms, (flat * w[:, None]).mean(0))
    n64, u64 = out[torch.float64]
    n32 = out[torch.float32][0]
    cos = float(engm_grad @ u64 / (engm_grad.norm() * u64.norm() + 1e-300))
    return n64, n32, cos


def instrumented(seed: int, lr: float, variant: dict) -> dict:
    """One exact-ENGM PGD-AT run (E2's setting) with per-step statistics (see (a))."""
    cfg = TrainConfig(dataset=args.dataset, method="pgd", optimizer="engm", lr=lr, seed=seed, epochs=epochs,
                      eval_every=epochs, out=None, progress=False, plots=False, **dict(S["run"], **variant))
    if args.quick:
        cfg.train_subset, cfg.test_subset, cfg.final_subset = 256, 64, 64
    run = TrainingRun(cfg, data(args.dataset))
    batch: dict = {}
    steps: list = []
    checks: list = []
    spy_outer = train_module.outer_losses

    def outer_losses(model, x, x_adv, y, *a, **k):
        batch.update(x_adv=x_adv.detach(), y=y)
        return spy_outer(model, x, x_adv, y, *a, **k)

    backward = run.opt.backward

    def recorded_backward(losses, **k):
        norms = backward(losses, **k)
        with torch.no_grad():
            logits = run.model(batch["x_adv"]).double()
            loss64 = F.cross_entropy(logits, batch["y"], reduction="none")
            n = norms.detach().double()
            share = n / (n + run.opt.eps)
            fitted = loss64 < FITTED
            steps.append({"fitted": float(fitted.double().mean()), "share": float(share[fitted].sum() / share.sum()),
                          "norm_min": float(n.min()), "norm_median": float(n.median())})
        if len(steps) % (3 if args.quick else run.steps_per_epoch) == 0:
            grad = torch.cat([p.grad.reshape(-1) for p in run.model.parameters()]).double()
            n64, n32, cos = float64_check(run.model, run.cfg, batch["x_adv"], batch["y"], grad, run.opt.eps)
            rel_engine = ((n - n64).abs() / n64.clamp_min(1e-300))
            rel_vmap = ((n32 - n64).abs() / n64.clamp_min(1e-300))
            checks.append({"step": len(steps), "fitted": int(fitted.sum()),
                           "rel_err_engine_fitted": float(rel_engine[fitted].median()) if fitted.any() else None,
                           "rel_err_engine_other": float(rel_engine[~fitted].median()) if (~fitted).any() else None,
                           "rel_err_vmap_fitted": float(rel_vmap[fitted].median()) if fitted.any() else None,
                           "update_cosine_vs_float64": cos})
        return norms

    train_module.outer_losses = outer_losses
    run.opt.backward = recorded_backward
    try:
        while not run.done:
            rec = run.run_epoch()
            _say(f"[E6a seed {seed} lr {lr} {variant}] epoch {rec['epoch']}: fitted {steps[-1]['fitted'] if steps else None}"
                 f" test clean {rec.get('test_clean_acc')} PGD {rec.get('test_robust_acc_pgd20')}")
        res = run.finish()
    finally:
        train_module.outer_losses = spy_outer
    res.pop("environment", None)
    return {"config": res["config"], "history": res["history"], "final": res.get("final"), "diverged": res["diverged"],
            "wall_time_s": res["wall_time_s"], "steps": steps, "checks": checks, "steps_per_epoch": run.steps_per_epoch}


# Plain ENGM's seeds 0-2 are E2's runs (not instrumented); every other run is instrumented.
e2 = Runs("e2_lr_sweep", args)
runs = Runs("e6_stability", args)
curve = {}
for seed in seeds:
    for lr in S["lrs"]:
        for name, variant in VARIANTS.items():
            if not variant and seed in S["e2_seeds"] and not args.quick:
                curve[f"{name}/{lr}/{seed}"] = e2.get(f"pgd/engm/{lr}/{seed}", method="pgd", optimizer="engm", lr=lr,
                                                      seed=seed, epochs=epochs, eval_every=epochs, **S["run"])
            else:
                curve[f"{name}/{lr}/{seed}"] = runs._cached(f"{name}/{lr}/{seed}",
                                                            lambda: instrumented(seed, lr, variant))
finish_or_exit(e2)
finish_or_exit(runs)


def compact(r):
    """A run for the committed JSON: its per-step statistics as per-epoch means (the cache keeps every step)."""
    if "steps" not in r:
        return r
    spe = r["steps_per_epoch"]
    epochs_ = [r["steps"][e:e + spe] for e in range(0, len(r["steps"]), spe)]
    return {**{k: v for k, v in r.items() if k != "steps"},
            "epoch_means": [{k: mean_std([s[k] for s in ep])[0] for k in ep[0]} for ep in epochs_]}


save("e6_stability.json", {"dataset": args.dataset, "epochs": epochs, "seeds": seeds, "lrs": S["lrs"],
                           "variants": VARIANTS, "runs": {k: compact(r) for k, r in curve.items()}}, args.dataset)


def final(r, name):
    return (r.get("final") or {}).get(name, 0.0)


def is_collapsed(r):
    return bool(r["diverged"]) or final(r, "clean_acc") < COLLAPSED


print(f"(b) Final test accuracy over {len(seeds)} seeds (mean ± sd), PGD-AT, {epochs} epochs:")
print("| variant | lr | clean | PGD-20 | AA-APGD | AA-APGD per seed | collapsed | AA-APGD of the runs that did not collapse |")
print("|---|---|---|---|---|---|---|---|")
for name in VARIANTS:
    for lr in S["lrs"]:
        rs = [curve[f"{name}/{lr}/{s}"] for s in seeds]
        ok = [final(r, "robust_acc_aa_apgd") for r in rs if not is_collapsed(r)]
        print(f"| {name} | {lr:g} | {fmt([final(r, 'clean_acc') for r in rs])} | "
              f"{fmt([final(r, 'robust_acc_pgd') for r in rs])} | {fmt([final(r, 'robust_acc_aa_apgd') for r in rs])} | "
              f"{' / '.join(format(final(r, 'robust_acc_aa_apgd'), '.3f') for r in rs)} | "
              f"{sum(map(is_collapsed, rs))}/{len(rs)} | {fmt(ok)} |")
print()
print("(a) Instrumented runs (all but plain ENGM's seeds 0-2): the fraction of the batch with loss < 1e-6 and its "
      "share of ENGM's update (mean over the steps of epochs 1, 4, 7, 10 and over the seeds); per-epoch float64 checks "
      "pooled over the runs:")
print("| variant | lr | seeds | fitted fraction, epochs 1/4/7/10 | fitted share of the update, epochs 1/4/7/10 | "
      "median rel. error of float32 norms: fitted / other examples | update cosine float32 vs float64: min / median | "
      "collapsed |")
print("|---|---|---|---|---|---|---|---|")
for name in VARIANTS:
    for lr in S["lrs"]:
        rs = [r for k, r in curve.items() if k.startswith(f"{name}/{lr}/") and "steps" in r]
        if not rs:
            continue
        spe = rs[0]["steps_per_epoch"]

        def per_epoch(k, e):
            return mean_std([mean_std([s[k] for s in r["steps"][e * spe:(e + 1) * spe]])[0] for r in rs
                             if len(r["steps"]) > e * spe])[0]
        pick = lambda k: " / ".join("n/a" if v != v else f"{v:.3f}" for v in (per_epoch(k, e) for e in (0, 3, 6, 9)))
        c = [x for r in rs for x in r["checks"]]
        fit_err = sorted(x["rel_err_engine_fitted"] for x in c if x["rel_err_engine_fitted"] is not None)
        oth_err = sorted(x["rel_err_engine_other"] for x in c if x["rel_err_engine_other"] is not None)
        cos = sorted(x["update_cosine_vs_float64"] for x in c)
        med = lambda xs, f: "n/a" if not xs else format(xs[len(xs) // 2], f)
        print(f"| {name} | {lr:g} | {len(rs)} | {pick('fitted')} | {pick('share')} | {med(fit_err, '.2g')} / "
              f"{med(oth_err, '.2g')} | {'n/a' if not cos else format(cos[0], '.3f')} / {med(cos, '.3f')} | "
              f"{sum(map(is_collapsed, rs))}/{len(rs)} |")
print()
print(cost([r for r in curve.values() if "steps" in r], "new runs") + " (plain ENGM's seeds 0-2 are E2's)")

p = plt()
fig, axes = p.subplots(1, 2, figsize=(11, 3.8))
colors = dict(zip(VARIANTS, ("tab:red", "tab:green", "tab:purple")))
for name in VARIANTS:
    m = [mean_std([final(curve[f"{name}/{lr}/{s}"], "robust_acc_aa_apgd") for s in seeds]) for lr in S["lrs"]]
    axes[0].errorbar(S["lrs"], [a for a, _ in m], yerr=[b for _, b in m], marker="o", capsize=3, color=colors[name],
                     label=name)
axes[0].set(xscale="log", xlabel="learning rate", ylabel=f"final AA-APGD accuracy (mean ± sd, {len(seeds)} seeds)",
            title="(b) lr sensitivity of ENGM variants, PGD-AT")
axes[0].grid(alpha=0.3)
axes[0].legend(fontsize=8)
# panel (a) at the highest rate where some run did not collapse (past it every step is the same)
top = max([lr for lr in S["lrs"] if not all(is_collapsed(curve[f"{n}/{lr}/{s}"]) for n in VARIANTS for s in seeds)]
          or S["lrs"])
for name in VARIANTS:
    for r in [r for k, r in curve.items() if k.startswith(f"{name}/{top}/") and "steps" in r][:2]:
        k = max(1, r["steps_per_epoch"] // 4)
        smooth = [mean_std([s["share"] for s in r["steps"][i:i + k]])[0] for i in range(0, len(r["steps"]), k)]
        axes[1].plot([i / r["steps_per_epoch"] for i in range(0, len(r["steps"]), k)], smooth, color=colors[name],
                     label=f"{name}, lr {top:g}, seed {r['config']['seed']}")
axes[1].set(xlabel="epoch", ylabel="share of the update from fitted examples", ylim=(0, 1),
            title=f"(a) update share of examples with loss < 1e-6, lr {top:g}")
axes[1].grid(alpha=0.3)
axes[1].legend(fontsize=6)
fig.tight_layout()
fig.savefig(figure_path("e6_stability.png", args.dataset), dpi=90)
