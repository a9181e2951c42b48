"""Learning-rate sweep for the demo (``engm_fast.demo``): MSGD vs ENGM, several seeds.

Runs the one training loop (:func:`engm_fast.at.train.train`, the loop of the demo and of
experiment E2) on the demo's configuration (:func:`engm_fast.demo.demo_config`) for every
(optimizer, learning rate, seed), prints a
table of the robust test accuracy per learning rate (mean and spread over seeds) and writes
``benchmarks/results/demo_lr_sweep.json``. The learning rates with the best mean robust
accuracy are the demo's defaults (see ``docs/demo_lr_sweep.md``).

Usage::

    python benchmarks/sweep_demo_lr.py                       # full sweep, defaults below
    python benchmarks/sweep_demo_lr.py --seeds 0 1 --jobs 2
    python benchmarks/sweep_demo_lr.py --epochs 5 --lrs-msgd 0.05 --lrs-engm 0.5  # smoke run
    python benchmarks/sweep_demo_lr.py --lrs-msgd 0.03 --lrs-engm 0.3 --append    # refine a grid

``--append`` keeps the runs already in ``--out`` (same configuration required), skips the
(optimizer, lr, seed) triples it already has, and summarizes old and new runs together.

``--jobs N`` runs N trainings in parallel processes with ``N_threads = cores // N`` torch
threads each. Results can differ in the last bits from a single-process run (a different
thread count changes float summation order), which adversarial training amplifies a little;
the default ``--jobs 1`` uses torch's default threads, exactly like ``engm-fast demo``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor

import torch

# Runnable from a checkout without installing the package.
_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if _REPO not in sys.path:
    sys.path.insert(0, _REPO)

from engm_fast._runtime import environment
from engm_fast.at.train import train
from engm_fast import demo

# Log-spaced (1-2-5 series). ENGM's grid sits about 10x higher: its update is a mean of unit
# vectors (norm <= 1), so the same step length needs a larger rate.
DEFAULT_LRS_MSGD = (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5)
DEFAULT_LRS_ENGM = (0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
DEFAULT_SEEDS = (0, 1, 2)
DIGITS_EPOCHS = 30  # the former 8x8 demo's epochs, which docs/demo_lr_sweep.md swept
DEFAULT_OUT = os.path.join(_REPO, "benchmarks", "results", "demo_lr_sweep.json")


def _init_worker(threads: int) -> None:
    torch.set_num_threads(threads)


def _run(job: dict) -> dict:
    """One training run; a top-level function so worker processes can pickle it."""
    t0 = time.perf_counter()
    r = demo.summarize(train(demo.demo_config(job["optimizer"], job["lr"], seed=job["seed"], epochs=job["epochs"],
                                              dataset=job["dataset"])))
    return {
        "optimizer": job["optimizer"],
        "lr": job["lr"],
        "seed": job["seed"],
        "best_robust_acc_pgd10": r["best_robust_acc_pgd10"],
        "best_epoch": r["best_epoch"],
        "final_robust_acc_pgd20": r["final_robust_acc_pgd20"],
        "final_clean_acc": r["final_clean_acc"],
        "robust_acc_pgd10_per_epoch": r["history"]["robust_acc_pgd10"],
        "clean_acc_per_epoch": r["history"]["clean_acc"],
        "train_loss_per_epoch": r["history"]["train_loss"],
        "mean_step_ms": r["mean_step_ms"],
        "wall_s": time.perf_counter() - t0,
    }


def _stats(values: Sequence[float]) -> dict[str, float]:
    vals = list(values)
    return {
        "mean": statistics.fmean(vals),
        "min": min(vals),
        "max": max(vals),
        "std": statistics.stdev(vals) if len(vals) > 1 else 0.0,
    }


def summarize(runs: list[dict]) -> dict[str, list[dict]]:
    """Per optimizer, one row per learning rate with mean/min/max/std over seeds."""
    out: dict[str, list[dict]] = {}
    for opt in sorted({r["optimizer"] for r in runs}, key=lambda o: ("msgd", "engm").index(o)):
        rows = []
        for lr in sorted({r["lr"] for r in runs if r["optimizer"] == opt}):
            sel = [r for r in runs if r["optimizer"] == opt and r["lr"] == lr]
            rows.append({
                "lr": lr,
                "seeds": [r["seed"] for r in sel],
                "best_robust_acc_pgd10": _stats(r["best_robust_acc_pgd10"] for r in sel),
                "final_robust_acc_pgd20": _stats(r["final_robust_acc_pgd20"] for r in sel),
                "final_clean_acc": _stats(r["final_clean_acc"] for r in sel),
            })
        out[opt] = rows
    return out


def choose(summary: dict[str, list[dict]]) -> dict[str, float]:
    """Per optimizer, the lr with the highest mean best-epoch PGD-10 robust accuracy.

    Ties (within 0.5 percentage points) go to the higher mean final PGD-20 accuracy, which is
    what the demo reports at the end.
    """
    chosen = {}
    for opt, rows in summary.items():
        top = max(r["best_robust_acc_pgd10"]["mean"] for r in rows)
        near = [r for r in rows if r["best_robust_acc_pgd10"]["mean"] >= top - 0.005]
        chosen[opt] = max(near, key=lambda r: r["final_robust_acc_pgd20"]["mean"])["lr"]
    return chosen


def format_table(summary: dict[str, list[dict]], chosen: dict[str, float]) -> str:
    """A Markdown table: one row per (optimizer, lr)."""
    lines = [
        ("| optimizer | lr | best PGD-10 robust acc, mean (min-max) | final PGD-20 robust acc, mean (min-max) "
         "| final clean acc, mean |"),
        "|---|---:|---|---|---:|",
    ]
    for opt, rows in summary.items():
        for r in rows:
            b, f, c = r["best_robust_acc_pgd10"], r["final_robust_acc_pgd20"], r["final_clean_acc"]
            mark = " **(chosen)**" if chosen.get(opt) == r["lr"] else ""
            lines.append(
                f"| {opt.upper()} | {r['lr']:g}{mark} | {b['mean']:.3f} ({b['min']:.3f}-{b['max']:.3f}) "
                f"| {f['mean']:.3f} ({f['min']:.3f}-{f['max']:.3f}) | {c['mean']:.3f} |"
            )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the sweep; see the module docstring for usage."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--lrs-msgd", type=float, nargs="*", default=list(DEFAULT_LRS_MSGD))
    p.add_argument("--lrs-engm", type=float, nargs="*", default=list(DEFAULT_LRS_ENGM))
    p.add_argument("--seeds", type=int, nargs="+", default=list(DEFAULT_SEEDS))
    p.add_argument("--dataset", default="digits",
                   help="the demo's data set (default: digits, the former 8x8 demo that docs/demo_lr_sweep.md swept)")
    p.add_argument("--epochs", type=int, default=None,
                   help="training epochs (default: 30 on digits, as in docs/demo_lr_sweep.md; else the demo's)")
    p.add_argument("--jobs", type=int, default=1, help="parallel training processes")
    p.add_argument("--out", default=DEFAULT_OUT, help="JSON output path")
    p.add_argument("--append", action="store_true", help="add to the runs already in --out")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = DIGITS_EPOCHS if args.dataset == "digits" else demo.DEFAULT_EPOCHS

    # The configuration every run shares (the demo's; seed, optimizer and lr vary).
    cfg = demo.demo_config("msgd", epochs=args.epochs, dataset=args.dataset).resolved()
    cfg_dict = {k: v for k, v in json.loads(json.dumps(vars(cfg))).items() if k not in ("optimizer", "lr", "seed")}
    old: dict = {}
    jobs = [
        {"optimizer": opt, "lr": lr, "seed": seed, "epochs": args.epochs, "dataset": args.dataset}
        for opt, lrs in (("msgd", args.lrs_msgd), ("engm", args.lrs_engm))
        for lr in lrs
        for seed in args.seeds
    ]
    previous: list[dict] = []
    commands: list[str] = []
    if args.append and os.path.exists(args.out):
        with open(args.out) as f:
            old = json.load(f)
        if old["config"] != cfg_dict:
            raise SystemExit(f"--append: {args.out} was written with another configuration: {old['config']}")
        previous = old["runs"]
        commands = old.get("commands", [])
        done = {(r["optimizer"], r["lr"], r["seed"]) for r in previous}
        jobs = [j for j in jobs if (j["optimizer"], j["lr"], j["seed"]) not in done]
    commands.append("python benchmarks/sweep_demo_lr.py " + " ".join(argv if argv is not None else sys.argv[1:]))
    print(f"{len(jobs)} runs ({cfg.epochs} epochs each, eps={cfg.eps}, PGD-{cfg.train_steps}), "
          f"{args.jobs} process(es)", flush=True)

    t0 = time.perf_counter()
    runs: list[dict] = list(previous)
    n_total = len(previous) + len(jobs)

    def report(r: dict) -> None:
        runs.append(r)
        print(f"[{len(runs):3d}/{n_total}] {r['optimizer']:4s} lr={r['lr']:<6g} seed={r['seed']} "
              f"best PGD-10 {r['best_robust_acc_pgd10']:.3f} (ep {r['best_epoch']}) "
              f"final PGD-20 {r['final_robust_acc_pgd20']:.3f} clean {r['final_clean_acc']:.3f} "
              f"({r['wall_s']:.1f} s)", flush=True)

    if args.jobs <= 1:
        for job in jobs:
            report(_run(job))
    else:
        threads = max(1, (os.cpu_count() or 1) // args.jobs)
        with ProcessPoolExecutor(args.jobs, initializer=_init_worker, initargs=(threads,)) as ex:
            for r in ex.map(_run, jobs):
                report(r)

    summary = summarize(runs)
    chosen = choose(summary)
    table = format_table(summary, chosen)
    result = {
        "commands": commands,
        "config": cfg_dict,
        "seeds": args.seeds,
        "selection_rule": "highest mean (over seeds) best-epoch PGD-10 robust test accuracy; ties within 0.005 "
                          "broken by mean final PGD-20 robust accuracy",
        "chosen": chosen,
        "summary": summary,
        "runs": runs,
        "table_markdown": table,
        "wall_time_s": time.perf_counter() - t0 + (old.get("wall_time_s", 0.0) if previous else 0.0),
        "environment": {**environment("cpu"), "jobs": args.jobs, "cpu_count": os.cpu_count()},
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print()
    print(table)
    print(f"\nchosen: lr_msgd={chosen.get('msgd')}, lr_engm={chosen.get('engm')}; "
          f"wrote {args.out} ({result['wall_time_s']:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
