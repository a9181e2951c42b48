"""The demo: PGD adversarial training with MSGD vs ENGM on 8x8 digits, side by side.

Everything runs on a laptop CPU in a few minutes and needs no download (scikit-learn's bundled
digits, :mod:`engm_fast.data.digits`; the small CNN of :mod:`engm_fast.models.small_cnn`). Both
optimizers start from the same initial weights, see the same mini-batches and are trained with
the same L-infinity PGD-7 attack (eps 0.15); only the outer optimizer differs:

* MSGD: ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)`` on the mean adversarial loss.
* ENGM: ``engm_fast.ENGM`` with the same momentum and weight decay, whose gradient is the
  mean of the normalized per-example gradients ``(1/B) sum_i g_i / (||g_i|| + eps)``.

The demo is two runs of the training loop (:func:`engm_fast.at.train.train_together`, so the
two step times are measured epoch by epoch close together) configured by :func:`demo_config`,
plus a table and a plot. The learning-rate sweep (``benchmarks/sweep_demo_lr.py``) trains the
same configurations one at a time with :func:`engm_fast.at.train.train`.

Example::

    >>> from engm_fast.demo import run_demo
    >>> results = run_demo(quick=True, out_dir="/tmp/engm_demo", progress=False)  # doctest: +SKIP
    >>> sorted(results["optimizers"])                                            # doctest: +SKIP
    ['engm', 'msgd']
"""
from __future__ import annotations

import json
import os
import time

import torch

from .at.plots import plot_accuracy
from .at.train import WARMUP_STEPS, TrainConfig, default_lr, describe_epoch, train_together

__all__ = ["DEFAULT_EPOCHS", "DEFAULT_LR_ENGM", "DEFAULT_LR_MSGD", "OPTIMIZERS", "demo_config", "run_demo", "summarize"]

DEFAULT_LR_MSGD = default_lr("digits", "msgd")
DEFAULT_LR_ENGM = default_lr("digits", "engm")
DEFAULT_EPOCHS = TrainConfig.epochs
OPTIMIZERS = ("msgd", "engm")
EVAL_STEPS, FINAL_STEPS = 10, 20  # PGD-10 after every epoch, PGD-20 after the last
_DISPLAY = {"msgd": "MSGD", "engm": "ENGM"}


def demo_config(optimizer: str, lr: float | None = None, seed: int = 0, epochs: int = DEFAULT_EPOCHS,
                batch_size: int = 64, quick: bool = False, device: str = "cpu", progress: bool = False) -> TrainConfig:
    """The demo's training run of one optimizer (``"msgd"`` or ``"engm"``); ``lr=None`` is its default.

    ``quick=True``: at most 2 epochs on fixed subsets of 256 training and 128 test images
    (seconds, yet the whole pipeline). No monitor (a plain MSGD backward, ENGM without the
    variance diagnostic), no files: the demo writes its own.

    Example::

        >>> cfg = demo_config("engm", quick=True).resolved()
        >>> cfg.lr, cfg.epochs, cfg.eps, cfg.train_steps, cfg.final_attacks
        (0.7, 2, 0.15, 7, ('pgd-20',))
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    return TrainConfig(dataset="digits", model="small_cnn", method="pgd", optimizer=optimizer, lr=lr,
                       epochs=min(epochs, 2) if quick else epochs, batch_size=batch_size, eval_steps=EVAL_STEPS,
                       final_attacks=(f"pgd-{FINAL_STEPS}",), eval_train_subset=None, monitor=False,
                       train_subset=256 if quick else None, test_subset=128 if quick else None, seed=seed,
                       device=device, out=None, progress=progress)


def summarize(results: dict) -> dict:
    """One optimizer's entry of ``demo_results.json`` from its :func:`~engm_fast.at.train.train` results.

    Example::

        >>> r = {"config": {"lr": 0.7}, "history": [{"epoch": 1, "train_loss": 2.0, "train_adv_acc": 0.1,
        ...      "test_clean_acc": 0.5, "test_robust_acc_pgd10": 0.2, "step_ms": 3.0, "lr": 0.7}],
        ...      "final": {"clean_acc": 0.5, "robust_acc_pgd": 0.19, "pgd_steps": 20},
        ...      "timing": {"step_ms_mean": 3.0, "n_steps": 21}}
        >>> s = summarize(r)
        >>> s["best_robust_acc_pgd10"], s["best_epoch"], s["final_robust_acc_pgd20"]
        (0.2, 1, 0.19)
    """
    rows = [h for h in results["history"] if not h.get("diverged")]
    column = lambda key: [h.get(key) for h in rows]
    robust = column(f"test_robust_acc_pgd{EVAL_STEPS}")
    best = max((r for r in robust if r is not None), default=None)
    final = results.get("final", {})
    return {
        "lr": results["config"]["lr"],
        "history": {"epoch": column("epoch"), "train_loss": column("train_loss"), "train_adv_acc": column("train_adv_acc"),
                    "clean_acc": column("test_clean_acc"), f"robust_acc_pgd{EVAL_STEPS}": robust,
                    "step_ms_mean": column("step_ms"), "norm_mean": column("engm_norm_mean"), "lr": column("lr")},
        "diverged_at_epoch": results.get("diverged"),
        "final_clean_acc": final.get("clean_acc"),
        f"final_robust_acc_pgd{FINAL_STEPS}": final.get("robust_acc_pgd"),
        f"best_robust_acc_pgd{EVAL_STEPS}": best,
        "best_epoch": rows[robust.index(best)]["epoch"] if best is not None else None,
        "mean_step_ms": results["timing"]["step_ms_mean"],
        "n_steps": results["timing"]["n_steps"],
    }


def _fmt(value, spec: str = ".3f") -> str:
    return "n/a" if value is None else format(value, spec)


def _format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def run_demo(epochs: int = DEFAULT_EPOCHS, batch_size: int = 64, out_dir: str = "engm_demo_out", seed: int = 0,
             quick: bool = False, lr_msgd: float = DEFAULT_LR_MSGD, lr_engm: float = DEFAULT_LR_ENGM,
             device: str = "cpu", progress: bool = True) -> dict:
    """Trains MSGD and ENGM side by side with PGD adversarial training and reports both.

    Each epoch both are evaluated on the test set (clean and PGD-10); after training, with
    PGD-20. Prints a table (optimizer, lr, clean test acc, PGD-20 robust test acc, best PGD-10,
    mean step time, ENGM/MSGD step-time ratio) and writes ``out_dir/demo_results.json`` and
    ``out_dir/robust_accuracy.png``. ``quick=True`` trains 2 epochs on a subset (seconds, for
    tests). Returns the dict written to the JSON file.

    Example (shell: ``python -m engm_fast demo --quick``)::

        >>> res = run_demo(quick=True, out_dir="/tmp/engm_demo", progress=False)  # doctest: +SKIP
        >>> res["optimizers"]["engm"]["final_robust_acc_pgd20"]                  # doctest: +SKIP
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    from .data import load_dataset

    t_start = time.perf_counter()
    lrs = {"msgd": lr_msgd, "engm": lr_engm}
    cfgs = [demo_config(n, lrs[n], seed, epochs, batch_size, quick, device, progress) for n in OPTIMIZERS]
    data = load_dataset("digits")
    say = print
    if progress:
        from tqdm.auto import tqdm

        say = tqdm.write
    c = cfgs[0].resolved()
    n_train, n_test = (min(len(x), k or len(x)) for x, k in ((data.x_train, c.train_subset), (data.x_test, c.test_subset)))
    say(f"engm_fast demo: PGD adversarial training on 8x8 digits, {c.epochs} epochs, train {n_train} / test {n_test} "
        f"images, Linf eps={c.eps:g}, PGD-{c.train_steps} (alpha={c.alpha:.4f}), torch threads={torch.get_num_threads()}")

    def on_epoch(records):
        epoch = next(r["epoch"] for r in records if r is not None)
        say(" | ".join([f"epoch {epoch:2d}/{c.epochs}"] + [f"{_DISPLAY[n]} {describe_epoch(r, f'pgd{EVAL_STEPS}')}"
                                                          for n, r in zip(OPTIMIZERS, records) if r is not None]))

    runs = dict(zip(OPTIMIZERS, train_together(cfgs, data, on_epoch)))
    summary = {n: summarize(r) for n, r in runs.items()}
    ms = {n: s["mean_step_ms"] for n, s in summary.items()}
    ratio = ms["engm"] / ms["msgd"] if ms["engm"] and ms["msgd"] else None  # None: a run stopped in epoch 1
    config = {k: v for k, v in runs["msgd"]["config"].items() if k not in ("optimizer", "lr")}
    results = {"description": "PGD adversarial training on scikit-learn 8x8 digits: MSGD vs ENGM", "seed": seed,
               "quick": quick, "config": config, "environment": runs["msgd"]["environment"], "optimizers": summary,
               "step_time_ratio_engm_over_msgd": ratio}
    header = ["optimizer", "lr", "clean test acc", f"PGD-{FINAL_STEPS} robust test acc",
              f"best PGD-{EVAL_STEPS} (epoch)", "mean step time (ms)", "step-time ratio vs MSGD"]
    rows = [[_DISPLAY[n], f"{s['lr']:g}", _fmt(s["final_clean_acc"]), _fmt(s[f"final_robust_acc_pgd{FINAL_STEPS}"]),
             f"{_fmt(s[f'best_robust_acc_pgd{EVAL_STEPS}'])} ({s['best_epoch']})", _fmt(s["mean_step_ms"], ".2f"),
             "1.00" if n == "msgd" else _fmt(ratio, ".2f")] for n, s in summary.items()]
    results["table"] = _format_table(rows, header)

    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "demo_results.json"), os.path.join(out_dir, "robust_accuracy.png")
    plot_accuracy({f"{_DISPLAY[n]} (lr={lrs[n]:g})": r for n, r in runs.items()}, png_path,
                  f"PGD adversarial training on 8x8 digits (Linf eps={c.eps:g}, seed {seed})")
    results["wall_time_s"] = time.perf_counter() - t_start
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(results["table"])
    for n, s in summary.items():
        if s["diverged_at_epoch"] is not None:
            print(f"{_DISPLAY[n]} stopped at epoch {s['diverged_at_epoch']}: non-finite loss (learning rate too high?)")
    print(f"\nstep time = forward + backward + optimizer step on the adversarial batch (attack excluded), "
          f"mean over the {max(summary['msgd']['n_steps'] - WARMUP_STEPS, 0)} steps after {WARMUP_STEPS} warm-up steps.")
    print(f"wrote {json_path} and {png_path} ({results['wall_time_s']:.1f} s)")
    return results
