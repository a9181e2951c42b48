"""A small, self-contained demo: PGD adversarial training with MSGD vs ENGM on 8x8 digits.

Everything runs on a laptop CPU in a few minutes and needs no download: the data set is
scikit-learn's bundled handwritten digits (1797 images of 8x8 pixels). Both optimizers start
from the same initial weights, see the same mini-batches, and are trained with the same
L-infinity PGD attack; only the outer optimizer differs:

* MSGD: ``torch.optim.SGD(momentum=0.9, weight_decay=5e-4)`` on the mean adversarial loss.
* ENGM: ``engm_fast.ENGM`` with the same momentum and weight decay, whose gradient is the
  mean of the normalized per-example gradients ``(1/B) sum_i g_i / (||g_i|| + eps)``.

The training loop is exposed piecewise so that other scripts (the learning-rate sweep in
``benchmarks/sweep_demo_lr.py``) reuse it instead of copying it:

* :func:`load_digits_data` and :func:`make_model` build the data and the CNN,
* :class:`AdvTrainer` trains one optimizer epoch by epoch and evaluates it,
* :func:`train_one` runs one optimizer for all epochs and returns its per-epoch metrics,
* :func:`run_demo` interleaves the two optimizers epoch by epoch, prints a table, and writes
  ``demo_results.json`` and ``robust_accuracy.png``.

Example::

    >>> from engm_fast.demo import run_demo
    >>> results = run_demo(quick=True, out_dir="/tmp/engm_demo", progress=False)  # doctest: +SKIP
    >>> sorted(results["optimizers"])                                            # doctest: +SKIP
    ['engm', 'msgd']
"""
from __future__ import annotations

import copy
import json
import os
import platform
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from engm_fast.at.attacks import pgd_attack

__all__ = [
    "DEFAULT_EPOCHS",
    "DEFAULT_LR_ENGM",
    "DEFAULT_LR_MSGD",
    "OPTIMIZERS",
    "AdvTrainer",
    "DemoConfig",
    "load_digits_data",
    "make_model",
    "make_optimizer",
    "run_demo",
    "train_one",
]

# Chosen by the learning-rate sweep in benchmarks/sweep_demo_lr.py (see docs/demo_lr_sweep.md):
# the learning rate with the best robust test accuracy, mean over seeds, for each optimizer.
DEFAULT_LR_MSGD = 0.07
DEFAULT_LR_ENGM = 0.7
DEFAULT_EPOCHS = 30

OPTIMIZERS = ("msgd", "engm")
_DISPLAY = {"msgd": "MSGD", "engm": "ENGM"}

# The train/test split is fixed whatever the training seed, so that runs with different
# seeds (and the sweep) are evaluated on the same test images.
SPLIT_SEED = 0
# Evaluation attacks draw their random starts from their own generator with this seed, so
# both optimizers (and every epoch) face the same random starts.
_EVAL_ATTACK_SEED = 12345


@dataclass
class DemoConfig:
    """Hyperparameters of the demo's adversarial training, shared by both optimizers.

    The attack budget is for pixels in [0, 1]: ``eps = 0.15`` (about 2.4 of the 16 grey
    levels of the digits) takes a naturally trained copy of the demo CNN from 99% clean to
    about 16% PGD-10 accuracy, while adversarial training reaches well above that without
    saturating (at ``eps = 0.1`` a natural model keeps about 51%, and adversarially trained
    ones end near a common plateau, which makes a poor comparison).
    The step size follows the usual ``alpha = 2.5 * eps / steps`` (Madry et al.).

    Example::

        >>> cfg = DemoConfig(epochs=3)
        >>> round(cfg.alpha, 4), cfg.train_attack_steps
        (0.0536, 7)
    """

    epochs: int = DEFAULT_EPOCHS
    batch_size: int = 64
    eps: float = 0.15
    train_attack_steps: int = 7
    eval_attack_steps: int = 10
    final_attack_steps: int = 20
    momentum: float = 0.9
    weight_decay: float = 5e-4
    # Step decay of the learning rate (x0.1 at these fractions of training), as in standard
    # PGD adversarial training; it makes the final accuracies less noisy than a constant lr.
    lr_milestones: tuple[float, ...] = (0.5, 0.75)
    lr_gamma: float = 0.1
    test_size: float = 0.25
    # quick mode: train/test subset sizes (None = everything).
    train_subset: int | None = None
    test_subset: int | None = None
    eval_batch_size: int = 500

    @property
    def alpha(self) -> float:
        return 2.5 * self.eps / self.train_attack_steps

    def eval_alpha(self, steps: int) -> float:
        return 2.5 * self.eps / steps

    def quick(self) -> DemoConfig:
        """A copy for smoke tests: at most 2 epochs on 256 training and 128 test images.

        Small enough to run in seconds, yet the whole pipeline: attack, both optimizers,
        per-epoch PGD-10, final PGD-20, JSON and plot.
        """
        return replace(self, epochs=min(self.epochs, 2), train_subset=256, test_subset=128)


def load_digits_data(
    device: str = "cpu", test_size: float = 0.25, split_seed: int = SPLIT_SEED
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """scikit-learn's 8x8 digits as ``(x_train, y_train, x_test, y_test)`` tensors.

    Pixels are scaled from 0..16 to [0, 1] and shaped ``[N, 1, 8, 8]``; the split is
    stratified by class and fixed by ``split_seed``. No download: the data ships with
    scikit-learn.

    Example::

        >>> x_tr, y_tr, x_te, y_te = load_digits_data()
        >>> tuple(x_tr.shape), tuple(x_te.shape), float(x_tr.max()) <= 1.0
        ((1347, 1, 8, 8), (450, 1, 8, 8), True)
    """
    try:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the engm_fast demo needs scikit-learn: pip install scikit-learn") from exc

    digits = load_digits()
    x = (digits.images / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    y = digits.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(
        x, y, test_size=test_size, stratify=y, random_state=split_seed
    )
    as_t = lambda a: torch.from_numpy(a).to(device)
    return as_t(x_tr), as_t(y_tr), as_t(x_te), as_t(y_te)


def make_model(seed: int | None = None) -> nn.Module:
    """The demo's small CNN (about 38k parameters) for ``[N, 1, 8, 8]`` inputs, 10 classes.

    Example::

        >>> m = make_model(seed=0)
        >>> tuple(m(torch.zeros(2, 1, 8, 8)).shape)
        (2, 10)
    """
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 4 * 4, 64),
        nn.ReLU(),
        nn.Linear(64, 10),
    )


def make_optimizer(name: str, model: nn.Module, lr: float, momentum: float = 0.9,
                   weight_decay: float = 5e-4) -> torch.optim.Optimizer:
    """``"msgd"`` -> ``torch.optim.SGD``; ``"engm"`` -> ``engm_fast.ENGM`` (same momentum, decay).

    Example::

        >>> opt = make_optimizer("msgd", make_model(seed=0), lr=DEFAULT_LR_MSGD)
        >>> type(opt).__name__
        'SGD'
    """
    if name == "msgd":
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
    if name == "engm":
        # Looked up at call time (not imported at module level) so the demo module imports
        # even where the ENGM engine is unavailable, and MSGD-only runs still work.
        import engm_fast

        return engm_fast.ENGM(model, lr=lr, momentum=momentum, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")


def _sync(device: torch.device) -> None:
    # Step times must include queued GPU work, not only the launch.
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class _EpochStats:
    loss: float
    acc: float
    step_ms: list[float] = field(default_factory=list)
    norm_mean: float | None = None


class AdvTrainer:
    """Trains one model with one optimizer by PGD adversarial training, one epoch at a time.

    Each step: craft ``x_adv`` with L-infinity PGD (model in train mode, random start), then
    one optimizer step on the per-example adversarial losses. The timed part of a step is
    forward on ``x_adv`` + loss + zero_grad + backward + ``opt.step()`` (the attack is not
    timed: it is the same for both optimizers). Mini-batch order and attack random starts use
    generators seeded from ``seed``, so a trainer's results do not depend on what else runs in
    the process (the demo interleaves two trainers; the sweep runs one at a time).

    Example::

        >>> data = load_digits_data()
        >>> init = make_model(seed=0).state_dict()
        >>> t = AdvTrainer("msgd", lr=DEFAULT_LR_MSGD, cfg=DemoConfig(epochs=1), data=data, init_state=init)
        >>> stats = t.train_epoch()                    # doctest: +SKIP
        >>> clean_acc, robust_acc = t.evaluate(steps=10)  # doctest: +SKIP
    """

    def __init__(
        self,
        name: str,
        lr: float,
        cfg: DemoConfig,
        data: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
        init_state: dict[str, torch.Tensor],
        seed: int = 0,
        device: str = "cpu",
    ) -> None:
        if name not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {name!r}; expected one of {OPTIMIZERS}")
        self.name = name
        self.lr = lr
        self.cfg = cfg
        self.device = torch.device(device)
        self.x_train, self.y_train, self.x_test, self.y_test = (t.to(self.device) for t in data)
        self.model = make_model().to(self.device)
        self.model.load_state_dict(copy.deepcopy(init_state))
        self.opt = make_optimizer(name, self.model, lr, cfg.momentum, cfg.weight_decay)
        milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.lr_milestones})
        self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=milestones, gamma=cfg.lr_gamma)
        # CPU generators: the permutation and attack starts are drawn on the CPU and moved.
        self._shuffle_gen = torch.Generator().manual_seed(seed)
        self._attack_gen = torch.Generator(device=self.device).manual_seed(seed + 1)
        self.epoch = 0

    def train_epoch(self, progress: bool = False, desc: str = "") -> _EpochStats:
        """One pass over the training set; returns mean adversarial loss/accuracy and step times."""
        cfg = self.cfg
        n = self.x_train.shape[0]
        perm = torch.randperm(n, generator=self._shuffle_gen).to(self.device)
        batches = [perm[i:i + cfg.batch_size] for i in range(0, n, cfg.batch_size)]
        it = batches
        bar = None
        if progress:
            from tqdm.auto import tqdm

            bar = tqdm(batches, desc=desc or f"{_DISPLAY[self.name]} epoch {self.epoch + 1}", leave=False,
                       unit="batch", dynamic_ncols=True)
            it = bar

        self.model.train()
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        step_ms: list[float] = []
        norm_means: list[float] = []
        for idx in it:
            x, y = self.x_train[idx], self.y_train[idx]
            x_adv = pgd_attack(self.model, x, y, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.train_attack_steps,
                               norm="linf", random_start=True, generator=self._attack_gen)
            _sync(self.device)
            t0 = time.perf_counter()
            logits = self.model(x_adv)
            losses = F.cross_entropy(logits, y, reduction="none")
            self.opt.zero_grad(set_to_none=True)
            if self.name == "engm":
                self.opt.backward(losses)
            else:
                losses.mean().backward()
            self.opt.step()
            _sync(self.device)
            step_ms.append((time.perf_counter() - t0) * 1e3)

            if self.name == "engm":
                norm_means.append(float(self.opt.diagnostics["norm_mean"]))
            b = y.shape[0]
            tot_loss += float(losses.detach().sum())
            tot_correct += int((logits.detach().argmax(1) == y).sum())
            tot_n += b
            if bar is not None:
                bar.set_postfix(loss=f"{tot_loss / tot_n:.3f}", adv_acc=f"{tot_correct / tot_n:.3f}")
        if bar is not None:
            bar.close()
        self.sched.step()
        self.epoch += 1
        return _EpochStats(
            loss=tot_loss / tot_n,
            acc=tot_correct / tot_n,
            step_ms=step_ms,
            norm_mean=(sum(norm_means) / len(norm_means)) if norm_means else None,
        )

    def evaluate(self, steps: int | None) -> tuple[float, float | None]:
        """``(clean test accuracy, PGD-`steps` robust test accuracy)``; ``steps=None`` skips PGD.

        The model is in eval mode during the attack and restored to train mode after.
        """
        cfg = self.cfg
        self.model.eval()
        gen = torch.Generator(device=self.device).manual_seed(_EVAL_ATTACK_SEED)
        clean, robust, n = 0, 0, self.x_test.shape[0]
        for i in range(0, n, cfg.eval_batch_size):
            x, y = self.x_test[i:i + cfg.eval_batch_size], self.y_test[i:i + cfg.eval_batch_size]
            with torch.no_grad():
                clean += int((self.model(x).argmax(1) == y).sum())
            if steps is not None:
                x_adv = pgd_attack(self.model, x, y, eps=cfg.eps, alpha=cfg.eval_alpha(steps), steps=steps,
                                   norm="linf", random_start=True, generator=gen)
                with torch.no_grad():
                    robust += int((self.model(x_adv).argmax(1) == y).sum())
        self.model.train()
        return clean / n, (robust / n if steps is not None else None)


def _prepare_data(cfg: DemoConfig, device: str, seed: int):
    data = load_digits_data(device="cpu", test_size=cfg.test_size)
    x_tr, y_tr, x_te, y_te = data
    # quick mode: a fixed subset (first k of a seeded permutation) keeps tests fast.
    g = torch.Generator().manual_seed(SPLIT_SEED)
    if cfg.train_subset is not None and cfg.train_subset < x_tr.shape[0]:
        keep = torch.randperm(x_tr.shape[0], generator=g)[: cfg.train_subset]
        x_tr, y_tr = x_tr[keep], y_tr[keep]
    if cfg.test_subset is not None and cfg.test_subset < x_te.shape[0]:
        keep = torch.randperm(x_te.shape[0], generator=g)[: cfg.test_subset]
        x_te, y_te = x_te[keep], y_te[keep]
    return x_tr, y_tr, x_te, y_te


def _mean_step_ms(step_ms: Sequence[float], warmup: int = 3) -> float:
    # The first steps pay for one-time allocations and lazy initialization; skip them.
    kept = list(step_ms[warmup:]) or list(step_ms)
    return sum(kept) / len(kept)


def _new_history() -> dict[str, list]:
    return {"epoch": [], "train_loss": [], "train_adv_acc": [], "clean_acc": [], "robust_acc_pgd10": [],
            "step_ms_mean": [], "norm_mean": [], "lr": []}


def _record(hist: dict[str, list], trainer: AdvTrainer, stats: _EpochStats, clean: float,
            robust: float | None, lr: float) -> None:
    hist["epoch"].append(trainer.epoch)
    hist["train_loss"].append(stats.loss)
    hist["train_adv_acc"].append(stats.acc)
    hist["clean_acc"].append(clean)
    hist["robust_acc_pgd10"].append(robust)
    hist["step_ms_mean"].append(_mean_step_ms(stats.step_ms, warmup=0))
    hist["norm_mean"].append(stats.norm_mean)
    hist["lr"].append(lr)


def _finish(trainer: AdvTrainer, hist: dict[str, list], all_step_ms: list[float]) -> dict:
    final_clean, final_robust = trainer.evaluate(steps=trainer.cfg.final_attack_steps)
    robust = [r for r in hist["robust_acc_pgd10"] if r is not None]
    best = max(robust) if robust else None
    return {
        "lr": trainer.lr,
        "history": hist,
        "final_clean_acc": final_clean,
        "final_robust_acc_pgd20": final_robust,
        "best_robust_acc_pgd10": best,
        "best_epoch": hist["epoch"][hist["robust_acc_pgd10"].index(best)] if best is not None else None,
        "mean_step_ms": _mean_step_ms(all_step_ms),
        "n_steps": len(all_step_ms),
    }


def train_one(
    name: str,
    lr: float,
    cfg: DemoConfig | None = None,
    seed: int = 0,
    device: str = "cpu",
    data=None,
    init_state: dict[str, torch.Tensor] | None = None,
    progress: bool = False,
    eval_every_epoch: bool = True,
) -> dict:
    """Adversarially trains the demo CNN with one optimizer and returns its metrics.

    ``init_state`` defaults to ``make_model(seed).state_dict()``, the same initial weights
    :func:`run_demo` gives both optimizers for that seed, so ``train_one("engm", lr, seed=s)``
    reproduces the ENGM half of ``run_demo(seed=s, lr_engm=lr)``.

    Returns a dict with ``history`` (per-epoch ``train_loss``, ``train_adv_acc``,
    ``clean_acc``, ``robust_acc_pgd10``, ``step_ms_mean``, ``norm_mean``, ``lr``),
    ``final_clean_acc``, ``final_robust_acc_pgd20``, ``best_robust_acc_pgd10``,
    ``best_epoch`` and ``mean_step_ms``.

    Example::

        >>> r = train_one("engm", lr=DEFAULT_LR_ENGM, seed=0)           # doctest: +SKIP
        >>> len(r["history"]["robust_acc_pgd10"]) == DEFAULT_EPOCHS       # doctest: +SKIP
        True
    """
    cfg = cfg or DemoConfig()
    if data is None:
        data = _prepare_data(cfg, device, seed)
    if init_state is None:
        init_state = make_model(seed=seed).state_dict()
    trainer = AdvTrainer(name, lr, cfg, data, init_state, seed=seed, device=device)
    hist = _new_history()
    all_ms: list[float] = []
    for _ in range(cfg.epochs):
        cur_lr = trainer.opt.param_groups[0]["lr"]
        stats = trainer.train_epoch(progress=progress)
        all_ms.extend(stats.step_ms)
        clean, robust = trainer.evaluate(cfg.eval_attack_steps if eval_every_epoch else None)
        _record(hist, trainer, stats, clean, robust, cur_lr)
    return _finish(trainer, hist, all_ms)


def _format_table(rows: list[list[str]], header: list[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(header)]
    fmt = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))
    return "\n".join([fmt(header), "-+-".join("-" * w for w in widths)] + [fmt(r) for r in rows])


def _plot(results: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")  # headless: write a file, never open a window
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for name, color in (("msgd", "tab:blue"), ("engm", "tab:red")):
        r = results["optimizers"][name]
        h = r["history"]
        ax.plot(h["epoch"], h["robust_acc_pgd10"], "-o", ms=3, color=color,
                label=f"{_DISPLAY[name]} (lr={r['lr']:g}) PGD-10")
        ax.plot(h["epoch"], h["clean_acc"], ":", color=color, alpha=0.6, label=f"{_DISPLAY[name]} clean")
        ax.plot([h["epoch"][-1]], [r["final_robust_acc_pgd20"]], "*", ms=11, color=color,
                label=f"{_DISPLAY[name]} final PGD-20")
    cfg = results["config"]
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0.0, 1.0)
    ax.set_title(f"PGD adversarial training on 8x8 digits (Linf eps={cfg['eps']:g}, seed {results['seed']})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right", ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def run_demo(
    epochs: int = DEFAULT_EPOCHS,
    batch_size: int = 64,
    out_dir: str = "engm_demo_out",
    seed: int = 0,
    quick: bool = False,
    lr_msgd: float = DEFAULT_LR_MSGD,
    lr_engm: float = DEFAULT_LR_ENGM,
    device: str = "cpu",
    progress: bool = True,
    cfg: DemoConfig | None = None,
) -> dict:
    """Trains MSGD and ENGM side by side with PGD adversarial training and reports both.

    Both start from the same initial weights (``make_model(seed)``) and see the same batches;
    epochs are interleaved (MSGD epoch e, then ENGM epoch e) so that step times of the two
    are measured close together, which matters on machines whose speed drifts. Each epoch
    both are evaluated on the test set (clean and PGD-10); after training, with PGD-20.

    Prints a table (optimizer, lr, clean test acc, PGD-20 robust test acc, mean step time,
    ENGM/MSGD step-time ratio) and writes ``out_dir/demo_results.json`` and
    ``out_dir/robust_accuracy.png``. ``quick=True`` trains 2 epochs on a subset (seconds,
    for tests). Returns the dict written to the JSON file.

    Example (shell: ``python -m engm_fast demo --quick``)::

        >>> from engm_fast.demo import run_demo
        >>> res = run_demo(quick=True, out_dir="/tmp/engm_demo", progress=False)  # doctest: +SKIP
        >>> res["optimizers"]["engm"]["final_robust_acc_pgd20"]                  # doctest: +SKIP
    """
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    t_start = time.perf_counter()
    cfg = cfg or DemoConfig()
    cfg = replace(cfg, epochs=epochs, batch_size=batch_size)
    if quick:
        cfg = cfg.quick()

    # Seed everything, although the training loop itself uses explicit generators.
    torch.manual_seed(seed)
    data = _prepare_data(cfg, device, seed)
    init_state = make_model(seed=seed).state_dict()
    lrs = {"msgd": lr_msgd, "engm": lr_engm}
    trainers = {n: AdvTrainer(n, lrs[n], cfg, data, init_state, seed=seed, device=device) for n in OPTIMIZERS}
    hists = {n: _new_history() for n in OPTIMIZERS}
    step_ms: dict[str, list[float]] = {n: [] for n in OPTIMIZERS}

    say = print
    if progress:
        from tqdm.auto import tqdm

        say = tqdm.write
    say(f"engm_fast demo: PGD adversarial training on 8x8 digits, {cfg.epochs} epochs, "
        f"train {data[0].shape[0]} / test {data[2].shape[0]} images, Linf eps={cfg.eps:g}, "
        f"PGD-{cfg.train_attack_steps} (alpha={cfg.alpha:.4f}), torch threads={torch.get_num_threads()}")
    for epoch in range(1, cfg.epochs + 1):
        line = [f"epoch {epoch:2d}/{cfg.epochs}"]
        for n in OPTIMIZERS:
            t = trainers[n]
            cur_lr = t.opt.param_groups[0]["lr"]
            stats = t.train_epoch(progress=progress, desc=f"epoch {epoch}/{cfg.epochs} {_DISPLAY[n]}")
            step_ms[n].extend(stats.step_ms)
            clean, robust = t.evaluate(cfg.eval_attack_steps)
            _record(hists[n], t, stats, clean, robust, cur_lr)
            line.append(f"{_DISPLAY[n]} loss {stats.loss:.3f} adv-acc {stats.acc:.3f} "
                        f"test clean {clean:.3f} PGD-{cfg.eval_attack_steps} {robust:.3f}")
        say(" | ".join(line))

    results = {
        "description": "PGD adversarial training on scikit-learn 8x8 digits: MSGD vs ENGM",
        "seed": seed,
        "quick": quick,
        "config": {**asdict(cfg), "alpha": cfg.alpha, "split_seed": SPLIT_SEED},
        "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                        "python": platform.python_version(), "machine": platform.machine()},
        "optimizers": {n: _finish(trainers[n], hists[n], step_ms[n]) for n in OPTIMIZERS},
    }
    ratio = results["optimizers"]["engm"]["mean_step_ms"] / results["optimizers"]["msgd"]["mean_step_ms"]
    results["step_time_ratio_engm_over_msgd"] = ratio
    results["wall_time_s"] = time.perf_counter() - t_start

    header = ["optimizer", "lr", "clean test acc", f"PGD-{cfg.final_attack_steps} robust test acc",
              "best PGD-10 (epoch)", "mean step time (ms)", "step-time ratio vs MSGD"]
    rows = []
    for n in OPTIMIZERS:
        r = results["optimizers"][n]
        rows.append([_DISPLAY[n], f"{r['lr']:g}", f"{r['final_clean_acc']:.3f}", f"{r['final_robust_acc_pgd20']:.3f}",
                     f"{r['best_robust_acc_pgd10']:.3f} ({r['best_epoch']})", f"{r['mean_step_ms']:.2f}",
                     "1.00" if n == "msgd" else f"{ratio:.2f}"])
    table = _format_table(rows, header)
    results["table"] = table

    os.makedirs(out_dir, exist_ok=True)
    json_path = os.path.join(out_dir, "demo_results.json")
    png_path = os.path.join(out_dir, "robust_accuracy.png")
    _plot(results, png_path)
    results["wall_time_s"] = time.perf_counter() - t_start
    with open(json_path, "w") as f:
        json.dump(results, f, indent=2)
    print()
    print(table)
    print(f"\nstep time = forward + backward + optimizer step on the adversarial batch (attack excluded), "
          f"mean over {results['optimizers']['msgd']['n_steps']} steps after 3 warm-up steps.")
    print(f"wrote {json_path} and {png_path} ({results['wall_time_s']:.1f} s)")
    return results
