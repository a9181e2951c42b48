"""``engm-fast train``: adversarial training with MSGD, ENGM or ENGM-proxy, logged and plotted.

One run = one data set, one model, one AT method (PGD-AT, TRADES, MART; optionally with
temporal ensembling, optionally on random labels) and one outer optimizer:

* ``msgd``: ``torch.optim.SGD`` with momentum on the mean loss. With the monitor on (default),
  the mean gradient comes from the per-example engine's one backward (``(1/B) sum_i g_i``, the
  same gradient ``loss.mean().backward()`` gives), so the gradient statistics are free.
* ``engm``: :class:`engm_fast.ENGM` (normalize weighting, exact per-example norms).
* ``engm-proxy``: ENGM with ``norm_source="input_proxy"``, fed the input-gradient norms of the
  attack's last step (free), calibrated by an exact step every ``calibrate_every`` steps.

Per epoch it writes one JSON line to ``OUT/log.jsonl`` (train loss/accuracy on the adversarial
examples, PGD robust accuracy on a training subset and on the test set, clean test accuracy,
gradient norm/variance statistics from :class:`~engm_fast.at.GradientMonitor`, the input-proxy
correlation, step times), saves ``OUT/checkpoint_last.pt`` and ``OUT/checkpoint_best.pt`` (best
PGD test accuracy), and at the end ``OUT/results.json`` (final and best-checkpoint PGD-20 and,
when ``torchattacks`` is importable, APGD-CE accuracy), ``OUT/robust_accuracy.png`` and
``OUT/gradient_stats.png``.

Example (shell)::

    $ engm-fast train --dataset digits --model small_cnn --method trades --optimizer engm --te \\
          --epochs 20 --out runs/trades_engm_te

Example (Python)::

    >>> cfg = TrainConfig(epochs=1, train_subset=64, test_subset=32, eval_train_subset=32,
    ...                   train_steps=2, eval_steps=2, progress=False, plots=False, apgd=False,
    ...                   checkpoints=False, out=None)
    >>> res = train(cfg)
    >>> len(res["history"]), sorted(res["final"])
    (1, ['clean_acc', 'pgd_steps', 'robust_acc_pgd'])
"""
from __future__ import annotations

import argparse
import copy
import json
import math
import os
import platform
import time
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..engine import attach, engine_of
from .attacks import PGD_NORMS, pgd_attack
from .losses import AT_METHODS, adversarial_losses
from .monitor import GradientMonitor
from .temporal_ensembling import TE_DEFAULTS, TemporalEnsembling

__all__ = ["OPTIMIZERS", "TrainConfig", "add_train_parser", "apgd_available", "default_lr", "evaluate_robust",
           "run_train", "train"]

OPTIMIZERS = ("msgd", "engm", "engm-proxy")

# Learning rates chosen by the demo's sweep on digits (docs/demo_lr_sweep.md): best mean robust
# accuracy, PGD-AT, small CNN. CIFAR values are the usual MSGD 0.1; not tuned for ENGM here.
_DEFAULT_LR = {"digits": {"msgd": 0.07, "engm": 0.7, "engm-proxy": 0.7},
               "cifar10": {"msgd": 0.1, "engm": 0.1, "engm-proxy": 0.1},
               "cifar100": {"msgd": 0.1, "engm": 0.1, "engm-proxy": 0.1}}
# Threat models: digits as in the demo (eps 0.15, PGD-7, alpha 2.5 eps/steps); CIFAR as in the
# papers (eps 8/255, 10 steps of 2/255).
_ATTACK = {"digits": (0.15, 7, 2.5 * 0.15 / 7), "cifar10": (8 / 255, 10, 2 / 255), "cifar100": (8 / 255, 10, 2 / 255)}
_EVAL_SEED = 12345


def default_lr(dataset: str, optimizer: str) -> float:
    """The default learning rate of ``optimizer`` on ``dataset``.

    Example::

        >>> default_lr("digits", "engm")
        0.7
    """
    if dataset not in _DEFAULT_LR or optimizer not in OPTIMIZERS:
        raise ValueError(f"default_lr: unknown dataset {dataset!r} or optimizer {optimizer!r}")
    return _DEFAULT_LR[dataset][optimizer]


@dataclass
class TrainConfig:
    """Every setting of a training run (``None`` = the data set's default, resolved by :meth:`resolved`).

    Example::

        >>> c = TrainConfig(dataset="digits", optimizer="engm").resolved()
        >>> c.lr, c.eps, c.train_steps, c.batch_size
        (0.7, 0.15, 7, 64)
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None  # small_cnn for digits, preact_resnet18 for CIFAR
    model_kwargs: dict = field(default_factory=dict)
    method: str = "pgd"
    optimizer: str = "msgd"
    te: bool = False
    random_labels: bool = False
    label_seed: int = 0
    epochs: int = 30
    lr: float | None = None
    batch_size: int | None = None  # 64 digits, 128 CIFAR
    momentum: float = 0.9
    weight_decay: float | None = None  # 5e-4; 0 with random labels (the memorization paper)
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # x0.1 at these fractions (100/150 of 200)
    lr_gamma: float = 0.1
    augment: bool | None = None  # random crop + flip: CIFAR without random labels
    norm: str = "linf"
    eps: float | None = None
    alpha: float | None = None
    train_steps: int | None = None
    eval_steps: int = 20
    eval_eps: float | None = None  # evaluation budget (default: eps); set it when training with eps=0
    eval_every: int = 1  # per-epoch test/train evaluation every this many epochs (and the last epoch)
    beta: float = 6.0
    te_momentum: float = TE_DEFAULTS["momentum"]
    te_weight: float = TE_DEFAULTS["reg_weight"]
    te_es: int | None = None
    te_ee: int | None = None
    calibrate_every: int = 50
    train_subset: int | None = None
    test_subset: int | None = None
    eval_train_subset: int | None = 512
    monitor: bool = True
    apgd: bool = True
    apgd_steps: int = 50
    seed: int = 0
    device: str = "cpu"
    out: str | None = "engm_train_out"
    checkpoints: bool = True
    plots: bool = True
    progress: bool = True
    resume: str | None = None  # a checkpoint_last.pt of the same run: continue after its epoch

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in and the settings checked."""
        from ..data import DATASETS

        if self.dataset not in DATASETS:
            raise ValueError(f"dataset must be one of {DATASETS}, got {self.dataset!r}")
        if self.method not in AT_METHODS:
            raise ValueError(f"method must be one of {AT_METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.norm not in PGD_NORMS:
            raise ValueError(f"norm must be one of {PGD_NORMS}, got {self.norm!r}")
        for name in ("epochs", "eval_steps", "apgd_steps", "calibrate_every", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        eps, steps, alpha = _ATTACK[self.dataset]
        c = replace(
            self,
            model=self.model or ("small_cnn" if self.dataset == "digits" else "preact_resnet18"),
            lr=self.lr if self.lr is not None else default_lr(self.dataset, self.optimizer),
            batch_size=self.batch_size or (64 if self.dataset == "digits" else 128),
            weight_decay=self.weight_decay if self.weight_decay is not None else (0.0 if self.random_labels else 5e-4),
            augment=self.augment if self.augment is not None else (self.dataset != "digits" and not self.random_labels),
            eps=self.eps if self.eps is not None else eps,
            train_steps=self.train_steps or steps,
        )
        if c.eval_eps is None:
            c.eval_eps = c.eps
        if c.alpha is None:
            c.alpha = alpha if self.eps is None and self.train_steps is None else 2.5 * c.eps / c.train_steps
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {c.lr!r}")
        if c.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {c.batch_size!r}")
        if c.eps < 0 or c.alpha < 0 or c.eval_eps < 0:
            raise ValueError(f"eps and alpha must be >= 0, got eps={c.eps!r}, alpha={c.alpha!r}")
        return c


# --- data ----------------------------------------------------------------------------------------

def _subset(x, y, k, seed):
    if k is None or k >= x.shape[0]:
        return x, y
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
    return x[keep], y[keep]


def _load(cfg: TrainConfig):
    from ..data import load_dataset, random_labels

    s = load_dataset(cfg.dataset, cfg.data_dir)
    # Subsets are fixed (seed 0) whatever the training seed, so seeds are compared on the same data.
    x_tr, y_tr = _subset(s.x_train, s.y_train, cfg.train_subset, 0)
    x_te, y_te = _subset(s.x_test, s.y_test, cfg.test_subset, 1)
    if cfg.random_labels:
        y_tr = random_labels(y_tr, s.num_classes, seed=cfg.label_seed, rate=1.0)
    dev = torch.device(cfg.device)
    return x_tr.to(dev), y_tr.to(dev), x_te.to(dev), y_te.to(dev), s.num_classes


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random crop (zero padding 4) and horizontal flip, per example (the CIFAR AT standard)."""
    B, _, H, W = x.shape
    padded = F.pad(x, (4, 4, 4, 4))
    dx = torch.randint(0, 9, (B,), generator=gen)
    dy = torch.randint(0, 9, (B,), generator=gen)
    flip = torch.rand(B, generator=gen) < 0.5
    out = torch.empty_like(x)
    for i in range(B):
        crop = padded[i, :, dy[i]:dy[i] + H, dx[i]:dx[i] + W]
        out[i] = crop.flip(-1) if flip[i] else crop
    return out


# --- models and optimizers ------------------------------------------------------------------------

def _build_model(cfg: TrainConfig, num_classes: int, in_channels: int) -> nn.Module:
    from ..models import make_model

    return make_model(cfg.model, num_classes=num_classes, in_channels=in_channels, seed=cfg.seed,
                      **cfg.model_kwargs).to(cfg.device)


def _build_optimizer(cfg: TrainConfig, model: nn.Module):
    if cfg.optimizer == "msgd":
        if cfg.monitor:
            attach(model)  # the monitor's one backward
        return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    from ..optim import ENGM

    return ENGM(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay,
                norm_source="input_proxy" if cfg.optimizer == "engm-proxy" else "exact",
                calibrate_every=cfg.calibrate_every, track_variance=cfg.monitor)


# --- evaluation -----------------------------------------------------------------------------------

def apgd_available() -> bool:
    """Whether ``torchattacks`` (for APGD) can be imported.

    Example::

        >>> isinstance(apgd_available(), bool)
        True
    """
    try:
        import torchattacks  # noqa: F401
    except Exception:  # noqa: BLE001  (torchattacks may fail on import for reasons other than absence)
        return False
    return True


def _paused(model):
    import contextlib

    engine = engine_of(model)
    return engine.paused() if engine is not None else contextlib.nullcontext()


def evaluate_robust(model: nn.Module, x: torch.Tensor, y: torch.Tensor, eps: float, steps: int = 20,
                    norm: str = "linf", attack: str = "pgd", batch_size: int = 500,
                    seed: int = _EVAL_SEED) -> tuple[float, float]:
    """``(clean accuracy, robust accuracy)`` under PGD-``steps`` (ours) or APGD-CE (torchattacks).

    Eval mode during the attack; the model's mode is restored after. PGD uses step size
    ``2.5 eps / steps`` and a random start from a generator seeded with ``seed``.

    Example::

        >>> m = nn.Sequential(nn.Flatten(), nn.Linear(4, 3))
        >>> x, y = torch.rand(6, 4), torch.randint(0, 3, (6,))
        >>> clean, robust = evaluate_robust(m, x, y, eps=0.0, steps=3)   # no budget: robust == clean
        >>> robust == clean
        True
    """
    if attack not in ("pgd", "apgd"):
        raise ValueError(f"evaluate_robust: attack must be 'pgd' or 'apgd', got {attack!r}")
    was = model.training
    model.eval()
    gen = torch.Generator(device=x.device).manual_seed(seed)
    atk = None
    if attack == "apgd":
        import torchattacks

        atk = torchattacks.APGD(model, norm="Linf" if norm == "linf" else "L2", eps=eps, steps=steps,
                                n_restarts=1, loss="ce", seed=seed)
    clean = robust = 0
    try:
        for i in range(0, x.shape[0], batch_size):
            xb, yb = x[i:i + batch_size], y[i:i + batch_size]
            with torch.no_grad():
                clean += int((model(xb).argmax(1) == yb).sum())
            with _paused(model):
                if atk is None:
                    xa = pgd_attack(model, xb, yb, eps=eps, alpha=2.5 * eps / steps, steps=steps, norm=norm,
                                    generator=gen)
                else:
                    xa = atk(xb, yb)
            with torch.no_grad():
                robust += int((model(xa).argmax(1) == yb).sum())
    finally:
        model.train(was)
    n = max(1, x.shape[0])
    return clean / n, robust / n


# --- training -------------------------------------------------------------------------------------

def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.numel() < 3:
        return None
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else None


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _jsonable(obj):
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    return obj


# Settings that may differ between a run and its resumption (everything else must match).
# The epochs may not change: the LR milestones and TE's ramp-up are scaled to them.
_RESUME_MAY_DIFFER = ("out", "resume", "progress", "plots", "checkpoints", "apgd", "apgd_steps", "data_dir")


def _check_resumable(ck: dict, config: dict, path: str) -> None:
    """Raises if ``ck`` cannot continue a run with ``config``, naming what differs."""
    missing = [k for k in ("generators", "torch_rng", "history", "best") if k not in ck]
    if missing:
        raise ValueError(f"--resume {path}: the checkpoint lacks {missing} (written by an older engm_fast); "
                         "it can be loaded as a model/optimizer state but not resumed")
    differ = sorted(k for k in config if k not in _RESUME_MAY_DIFFER and ck["config"].get(k) != config[k])
    if differ:
        shown = {k: (ck["config"].get(k), config[k]) for k in differ}
        raise ValueError(f"--resume {path}: the run's settings differ from the checkpoint's "
                         f"(setting: (checkpoint, now)): {shown}")
    if ck["epoch"] >= config["epochs"]:
        raise ValueError(f"--resume {path}: the checkpoint is at epoch {ck['epoch']} of {config['epochs']}: "
                         "the run is complete")


def train(cfg: TrainConfig, data=None) -> dict:
    """Runs one adversarial-training run; returns (and writes, if ``cfg.out``) the results dict.

    ``data`` optionally gives ``(x_train, y_train, x_test, y_test, num_classes)`` already loaded
    (sweeps reuse it); labels are randomized here when ``cfg.random_labels``.

    The results dict: ``config``, ``history`` (one dict per epoch, as in ``log.jsonl``),
    ``final`` (last model: clean, PGD-``eval_steps`` and APGD test accuracy), ``best`` (the
    checkpoint with the best per-epoch PGD test accuracy, re-evaluated the same way),
    ``diverged`` (epoch at which a non-finite loss stopped training, or ``None``), timings.
    """
    cfg = cfg.resolved()
    t_start = time.perf_counter()
    torch.manual_seed(cfg.seed)
    device = torch.device(cfg.device)
    if data is None:
        x_tr, y_tr, x_te, y_te, num_classes = _load(cfg)
    else:
        x_tr, y_tr, x_te, y_te, num_classes = data
        x_tr, y_tr = _subset(x_tr, y_tr, cfg.train_subset, 0)
        x_te, y_te = _subset(x_te, y_te, cfg.test_subset, 1)
        if cfg.random_labels:
            from ..data import random_labels

            y_tr = random_labels(y_tr, num_classes, seed=cfg.label_seed, rate=1.0)
        x_tr, y_tr, x_te, y_te = (t.to(device) for t in (x_tr, y_tr, x_te, y_te))
    n_train = x_tr.shape[0]
    model = _build_model(cfg, num_classes, x_tr.shape[1])
    opt = _build_optimizer(cfg, model)
    milestones = sorted({max(1, round(f * cfg.epochs)) for f in cfg.lr_milestones})
    sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=milestones, gamma=cfg.lr_gamma)
    te = None
    if cfg.te:
        te = TemporalEnsembling(n_train, num_classes, momentum=cfg.te_momentum, reg_weight=cfg.te_weight,
                                es=cfg.te_es, ee=cfg.te_ee, epochs=cfg.epochs, device=device)
    monitor = GradientMonitor() if cfg.monitor else None
    shuffle_gen = torch.Generator().manual_seed(cfg.seed)
    attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
    aug_gen = torch.Generator().manual_seed(cfg.seed + 2)
    eval_tr = _subset(x_tr, y_tr, cfg.eval_train_subset, 2) if cfg.eval_train_subset else None
    is_engm = cfg.optimizer != "msgd"
    is_proxy = cfg.optimizer == "engm-proxy"
    engine = engine_of(model)

    config_dict = {**asdict(cfg), "milestones": milestones, "te_es": te.es if te else None,
                   "te_ee": te.ee if te else None}
    history: list[dict] = []
    best_robust, best_state, best_epoch = -1.0, None, None
    diverged = None
    first_epoch = 1
    if cfg.resume:
        # On the CPU: generator states must stay CPU byte tensors; load_state_dict moves the rest.
        ck = torch.load(cfg.resume, map_location="cpu", weights_only=False)
        _check_resumable(ck, config_dict, cfg.resume)
        model.load_state_dict(ck["model"])
        opt.load_state_dict(ck["optimizer"])
        sched.load_state_dict(ck["scheduler"])
        if te is not None:
            te.load_state_dict(ck["te"])
        for gen, state in zip((shuffle_gen, attack_gen, aug_gen), ck["generators"]):
            gen.set_state(state)
        torch.set_rng_state(ck["torch_rng"])
        history = list(ck["history"])
        best_robust, best_epoch, best_state = ck["best"]["robust"], ck["best"]["epoch"], ck["best"]["state"]
        first_epoch = ck["epoch"] + 1
    if cfg.out:
        os.makedirs(cfg.out, exist_ok=True)
        log_path = os.path.join(cfg.out, "log.jsonl")
        with open(log_path, "w") as f:  # a resumed run rewrites the epochs it continues from
            for rec in history:
                f.write(json.dumps(_jsonable(rec)) + "\n")
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=(cfg.epochs - first_epoch + 1) * math.ceil(n_train / cfg.batch_size), unit="batch",
                   dynamic_ncols=True, desc=f"{cfg.method}{'+te' if cfg.te else ''} {cfg.optimizer}")
    for epoch in range(first_epoch, cfg.epochs + 1):
        model.train()
        lr_now = opt.param_groups[0]["lr"]
        te_w = te.weight(epoch) if te else 0.0
        perm = torch.randperm(n_train, generator=shuffle_gen).to(device)
        tot_loss, tot_correct, tot_n = 0.0, 0, 0
        update_ms, batch_ms = [], []
        proxy_in, proxy_ex, batch_r = [], [], []
        t_epoch = time.perf_counter()
        for start in range(0, n_train, cfg.batch_size):
            idx = perm[start:start + cfg.batch_size]
            x, y = x_tr[idx], y_tr[idx]
            if cfg.augment:
                x = _augment(x, aug_gen)
            _sync(device)
            t0 = time.perf_counter()
            target = None
            if te is not None and te.active(epoch):
                model.eval()  # the paper's EMA uses eval-mode clean predictions
                with torch.no_grad(), _paused(model):
                    target = te.update(model(x), idx, epoch)
                model.train()
            out = adversarial_losses(model, x, y, cfg.method, eps=cfg.eps, alpha=cfg.alpha, steps=cfg.train_steps,
                                     norm=cfg.norm, beta=cfg.beta, te_target=target, te_weight=te_w,
                                     return_input_grad_norms=True, generator=attack_gen)
            losses = out.losses
            if not bool(torch.isfinite(losses.detach()).all()):
                diverged = epoch
                break
            _sync(device)
            t1 = time.perf_counter()
            opt.zero_grad(set_to_none=True)
            exact_norms = None
            try:
                if is_engm:
                    cal_before = opt.proxy.calibrations
                    norms = opt.backward(losses, input_grad_norms=out.input_grad_norms if is_proxy else None)
                    if not is_proxy or opt.proxy.calibrations > cal_before:
                        exact_norms = norms.detach()
                    if monitor is not None:
                        monitor.observe_engm(opt, norms)
                elif monitor is not None:
                    grads = engine.backward(losses)
                    exact_norms = grads.sqnorms().clamp_min(0).sqrt()
                    for p, g in monitor.observe_grads(grads).items():
                        p.grad = g
                else:
                    losses.mean().backward()
            except FloatingPointError:
                diverged = epoch
                break
            opt.step()
            _sync(device)
            t2 = time.perf_counter()
            update_ms.append((t2 - t1) * 1e3)
            batch_ms.append((t2 - t0) * 1e3)
            if exact_norms is not None and out.input_grad_norms is not None:
                proxy_in.append(out.input_grad_norms.detach().cpu())
                proxy_ex.append(exact_norms.cpu())
                r = _pearson(proxy_in[-1], proxy_ex[-1])
                if r is not None:
                    batch_r.append(r)
            tot_loss += float(losses.detach().sum())
            tot_correct += int((out.logits_adv.detach().argmax(1) == y).sum())
            tot_n += y.shape[0]
            if bar is not None:
                bar.update(1)
                bar.set_postfix(epoch=epoch, loss=f"{tot_loss / tot_n:.3f}", adv_acc=f"{tot_correct / tot_n:.3f}")
        if diverged is not None:
            rec = {"epoch": epoch, "diverged": True, "lr": lr_now}
            history.append(rec)
            if cfg.out:
                with open(log_path, "a") as f:
                    f.write(json.dumps(_jsonable(rec)) + "\n")
            break
        train_time = time.perf_counter() - t_epoch
        sched.step()
        evaluate_now = epoch % cfg.eval_every == 0 or epoch == cfg.epochs
        clean_te = rob_te = clean_tr = rob_tr = None
        if evaluate_now:
            clean_te, rob_te = evaluate_robust(model, x_te, y_te, cfg.eval_eps, cfg.eval_steps, cfg.norm)
        if eval_tr is not None and evaluate_now:
            clean_tr, rob_tr = evaluate_robust(model, eval_tr[0], eval_tr[1], cfg.eval_eps, cfg.eval_steps, cfg.norm)
        rec = {"epoch": epoch, "lr": lr_now, "te_weight": te_w, "train_loss": tot_loss / max(tot_n, 1),
               "train_adv_acc": tot_correct / max(tot_n, 1), "train_clean_acc": clean_tr,
               f"train_robust_acc_pgd{cfg.eval_steps}": rob_tr, "test_clean_acc": clean_te,
               f"test_robust_acc_pgd{cfg.eval_steps}": rob_te,
               "update_ms": sum(update_ms) / max(len(update_ms), 1),
               "batch_ms": sum(batch_ms) / max(len(batch_ms), 1), "train_time_s": train_time}
        if monitor is not None:
            rec["grad"] = monitor.end_epoch()
        if proxy_in:
            rec["proxy_pearson_r"] = _pearson(torch.cat(proxy_in), torch.cat(proxy_ex))
            rec["proxy_batch_r_mean"] = sum(batch_r) / len(batch_r) if batch_r else None
        if is_proxy:
            rec["proxy_fit"] = opt.proxy_stats
        history.append(rec)
        if cfg.out:
            with open(log_path, "a") as f:
                f.write(json.dumps(_jsonable(rec)) + "\n")
        if rob_te is not None and rob_te > best_robust:
            best_robust, best_epoch = rob_te, epoch
            best_state = copy.deepcopy(model.state_dict())
        if cfg.out and cfg.checkpoints:
            # Everything a resumed run needs to continue bit for bit (on the CPU): the random
            # generators of shuffling, attacks and augmentation, the history and the best model.
            ck = {"epoch": epoch, "model": model.state_dict(), "optimizer": opt.state_dict(),
                  "scheduler": sched.state_dict(), "te": te.state_dict() if te else None, "config": config_dict,
                  "generators": [g.get_state() for g in (shuffle_gen, attack_gen, aug_gen)],
                  "torch_rng": torch.get_rng_state(), "history": history,
                  "best": {"robust": best_robust, "epoch": best_epoch, "state": best_state}}
            torch.save(ck, os.path.join(cfg.out, "checkpoint_last.pt"))
            if best_epoch == epoch:
                torch.save(ck, os.path.join(cfg.out, "checkpoint_best.pt"))
        if bar is not None:
            msg = f"epoch {epoch}/{cfg.epochs}: loss {rec['train_loss']:.3f} adv-acc {rec['train_adv_acc']:.3f}"
            if evaluate_now:
                msg += f" | test clean {clean_te:.3f} PGD-{cfg.eval_steps} {rob_te:.3f}"
            bar.write(msg)
    if bar is not None:
        bar.close()

    results = {"config": config_dict, "history": history, "diverged": diverged, "best_epoch": best_epoch,
               "environment": {"torch": torch.__version__, "device": str(device), "threads": torch.get_num_threads(),
                               "python": platform.python_version()}}
    use_apgd = cfg.apgd and apgd_available()
    results["apgd"] = "torchattacks APGD-CE" if use_apgd else ("not installed" if cfg.apgd else "off")

    def final_eval() -> dict:
        c, r = evaluate_robust(model, x_te, y_te, cfg.eval_eps, cfg.eval_steps, cfg.norm)
        d = {"clean_acc": c, "robust_acc_pgd": r, "pgd_steps": cfg.eval_steps}
        if use_apgd:
            d["robust_acc_apgd"] = evaluate_robust(model, x_te, y_te, cfg.eval_eps, cfg.apgd_steps, cfg.norm,
                                                      attack="apgd")[1]
        return d

    if diverged is None or history[:-1]:
        results["final"] = final_eval()
        if best_state is not None:
            last_state = copy.deepcopy(model.state_dict())
            model.load_state_dict(best_state)
            results["best"] = {"epoch": best_epoch, **final_eval()}
            model.load_state_dict(last_state)
    results["wall_time_s"] = time.perf_counter() - t_start
    if cfg.out:
        with open(os.path.join(cfg.out, "results.json"), "w") as f:
            json.dump(_jsonable(results), f, indent=1)
        if cfg.plots:
            plot_history(history, cfg.out, f"{cfg.dataset} {cfg.model} {cfg.method}{'+TE' if cfg.te else ''} "
                         f"{cfg.optimizer}{' random labels' if cfg.random_labels else ''}")
    return results


def plot_history(history: list[dict], out_dir: str, title: str = "") -> list[str]:
    """Writes ``robust_accuracy.png`` and ``gradient_stats.png`` from a run's per-epoch history.

    Example::

        >>> plot_history([], "/tmp")
        []
    """
    rows = [h for h in history if not h.get("diverged")]
    if not rows:
        return []
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ep = [h["epoch"] for h in rows]
    nan = float("nan")  # epochs without evaluation (eval_every > 1) are gaps in the curves
    rows = [{k: (nan if v is None else v) for k, v in h.items()} for h in rows]
    key_te = next(k for k in rows[0] if k.startswith("test_robust_acc"))
    key_tr = next(k for k in rows[0] if k.startswith("train_robust_acc"))
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(ep, [h["train_adv_acc"] for h in rows], ":", label="train adv. acc. (training attack)")
    if any(h[key_tr] == h[key_tr] for h in rows):  # not all NaN
        ax.plot(ep, [h[key_tr] for h in rows], "-o", ms=3, label=f"train robust ({key_tr.split('_')[-1].upper()})")
    ax.plot(ep, [h[key_te] for h in rows], "-s", ms=3, label=f"test robust ({key_te.split('_')[-1].upper()})")
    ax.plot(ep, [h["test_clean_acc"] for h in rows], "--", label="test clean")
    ax.set(xlabel="epoch", ylabel="accuracy", ylim=(0, 1), title=title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    paths = [os.path.join(out_dir, "robust_accuracy.png")]
    fig.savefig(paths[0], dpi=100)
    plt.close(fig)
    if rows[0].get("grad") and rows[0]["grad"]["grad_norm"] is not None:
        fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
        g = [h["grad"] for h in rows]
        axes[0].plot(ep, [s["grad_norm"] for s in g], "-o", ms=3, label="||mean gradient||")
        axes[0].plot(ep, [s["norm_mean"] for s in g], "-s", ms=3, label="mean per-example norm")
        axes[0].set(xlabel="epoch", ylabel="norm", yscale="log")
        axes[0].legend(fontsize=8)
        axes[1].plot(ep, [s["variance"] for s in g], "-o", ms=3, color="tab:red")
        axes[1].set(xlabel="epoch", ylabel="gradient variance", yscale="log")
        for a in axes:
            a.grid(alpha=0.3)
        fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        paths.append(os.path.join(out_dir, "gradient_stats.png"))
        fig.savefig(paths[-1], dpi=100)
        plt.close(fig)
    return paths


# --- command line ---------------------------------------------------------------------------------

def add_train_parser(subparsers) -> argparse.ArgumentParser:
    """Declares ``engm-fast train`` on an argparse subparsers object; the handler is :func:`run_train`.

    Example::

        >>> p = argparse.ArgumentParser(); sub = p.add_subparsers(dest="command")
        >>> _ = add_train_parser(sub)
        >>> a = p.parse_args(["train", "--method", "trades", "--optimizer", "engm", "--te"])
        >>> a.method, a.optimizer, a.te, a.func is run_train
        ('trades', 'engm', True, True)
    """
    from ..data import DATASETS
    from ..models import MODELS

    p = subparsers.add_parser(
        "train", help="adversarial training (PGD-AT/TRADES/MART, MSGD/ENGM, TE, random labels)",
        description="Adversarial training with a per-epoch JSON log (OUT/log.jsonl), checkpoints, PNG plots "
        "and a final PGD and (if torchattacks is installed) APGD evaluation. Unset options take the data "
        "set's defaults (digits: eps 0.15, PGD-7, batch 64; CIFAR: eps 8/255, 10 steps of 2/255, batch 128).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default="digits")
    p.add_argument("--data-dir", default=None, help="directory with the CIFAR python-pickle folder (no download)")
    p.add_argument("--model", choices=MODELS, default=None, help="default: small_cnn (digits), preact_resnet18 (CIFAR)")
    p.add_argument("--method", choices=AT_METHODS, default="pgd")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="msgd")
    p.add_argument("--te", action="store_true", help="temporal ensembling (a=0.9, W=300, es/ee = 90/150 of 200 epochs, scaled)")
    p.add_argument("--random-labels", action="store_true", help="train on uniformly random labels (seeded)")
    p.add_argument("--label-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--lr", type=float, default=None, help="default: 0.07 MSGD / 0.7 ENGM on digits, 0.1 on CIFAR")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4; 0 with --random-labels")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES/MART beta")
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--alpha", type=float, default=None, help="attack step size")
    p.add_argument("--train-steps", type=int, default=None, help="attack steps in training")
    p.add_argument("--eval-steps", type=int, default=20, help="PGD steps of the per-epoch and final evaluation")
    p.add_argument("--eval-eps", type=float, default=None, help="evaluation budget (default: --eps)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every this many epochs (and the last)")
    p.add_argument("--norm", choices=PGD_NORMS, default="linf")
    p.add_argument("--train-subset", type=int, default=None, help="use a fixed random subset of the training set")
    p.add_argument("--test-subset", type=int, default=None)
    p.add_argument("--eval-train-subset", type=int, default=512, help="training examples evaluated by PGD each epoch (0: none)")
    p.add_argument("--no-monitor", action="store_true", help="no gradient statistics (plain MSGD backward)")
    p.add_argument("--no-apgd", action="store_true", help="skip the torchattacks APGD evaluation")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: torch's)")
    p.add_argument("--out", default="engm_train_out")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", default=None, metavar="CHECKPOINT",
                   help="continue an interrupted run from its OUT/checkpoint_last.pt (give the same settings)")
    p.set_defaults(func=run_train)
    return p


def run_train(args: argparse.Namespace) -> int:
    """Handler of ``engm-fast train``: builds a :class:`TrainConfig` from ``args`` and runs :func:`train`."""
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model, method=args.method,
                      optimizer=args.optimizer, te=args.te, random_labels=args.random_labels,
                      label_seed=args.label_seed, epochs=args.epochs, lr=args.lr, batch_size=args.batch_size,
                      weight_decay=args.weight_decay, beta=args.beta, eps=args.eps, alpha=args.alpha,
                      train_steps=args.train_steps, eval_steps=args.eval_steps, eval_eps=args.eval_eps,
                      eval_every=args.eval_every, norm=args.norm,
                      train_subset=args.train_subset, test_subset=args.test_subset,
                      eval_train_subset=args.eval_train_subset or None, monitor=not args.no_monitor,
                      apgd=not args.no_apgd, seed=args.seed, device=args.device, out=args.out,
                      progress=not args.no_progress, resume=args.resume)
    res = train(cfg)
    fin = res.get("final", {})
    msg = (f"final: clean {fin.get('clean_acc', float('nan')):.4f}, PGD-{cfg.eval_steps} "
           f"{fin.get('robust_acc_pgd', float('nan')):.4f}")
    if "robust_acc_apgd" in fin:
        msg += f", APGD-CE {fin['robust_acc_apgd']:.4f}"
    if res.get("best"):
        msg += f" | best epoch {res['best']['epoch']}: PGD {res['best']['robust_acc_pgd']:.4f}"
    if res["diverged"]:
        msg += f" | stopped: non-finite loss at epoch {res['diverged']}"
    print(msg)
    print(f"wrote {os.path.join(args.out, 'log.jsonl')}, results.json, checkpoints and plots")
    return 0
