"""Temporal ensembling (TE) against robust overfitting (Dong et al., ICLR 2022, arXiv 2106.01606).

What the official code (``loss.py``/``train_te.py`` of the paper's repository) does, and what
this module reproduces step by step (docs/design.md, "The methods"):

* A table ``Q`` of shape ``[num_samples, num_classes]``, initialised to zeros, holds an
  exponential moving average of each training example's clean prediction, indexed by the
  example's position in the data set.
* At the start of every mini-batch of epoch ``e >= es`` (epochs counted from 1), with the model
  in eval mode: ``Q[idx] = a * Q[idx] + (1 - a) * softmax(f(x))`` and the target is the
  row-normalised ``p = Q[idx] / Q[idx].sum(1)`` (the normalisation undoes the zero start).
  Before ``es`` the table is not touched and the term is off.
* The training loss gets ``w(e) * mean_{B x C}((softmax(logits) - p)^2)`` with
  ``w(e) = W * r(e)``; ``r(e) = 0`` for ``e < es``, ``exp(-5 (1 - (e - es)/(ee - es))^2)`` for
  ``es <= e <= ee`` and ``1`` after ``ee``. The same term is added to the PGD objective.
  For PGD-AT the logits are those of the adversarial input; for TRADES+TE the training term
  is on the *clean* output and the attack term on the adversarial one.
* Defaults: ``a = 0.9``, ``W = 300``, ``es = 90``, ``ee = 150`` of 200 epochs
  (:func:`te_schedule` scales them to another number of epochs).

Per example, ``mean_{B x C}`` becomes ``(1/C) sum_c``: the batch mean of :func:`te_penalty`
is exactly the paper's term, so the per-example losses plug into ``ENGM.backward``.

Example::

    >>> import torch
    >>> te = TemporalEnsembling(num_samples=10, num_classes=3, epochs=20)
    >>> te.es, te.ee, te.weight(1), te.weight(te.ee + 1)
    (9, 15, 0.0, 300.0)
    >>> target = te.update(torch.zeros(2, 3), torch.tensor([0, 5]), epoch=9)
    >>> target
    tensor([[0.3333, 0.3333, 0.3333],
            [0.3333, 0.3333, 0.3333]])
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = ["TE_DEFAULTS", "TemporalEnsembling", "sigmoid_rampup", "te_penalty", "te_schedule"]

# The paper's code: --te-alpha 0.9, --reg-weight 300, --start-es 90, --end-es 150, --epochs 200.
TE_DEFAULTS = {"momentum": 0.9, "reg_weight": 300.0, "es": 90, "ee": 150, "epochs": 200}


def sigmoid_rampup(epoch: float, es: float, ee: float) -> float:
    """The paper's ramp-up ``r(e)``: 0 before ``es``, ``exp(-5 (1 - (e-es)/(ee-es))^2)`` up to ``ee``, then 1.

    Example::

        >>> sigmoid_rampup(89, 90, 150), round(sigmoid_rampup(90, 90, 150), 6), sigmoid_rampup(150, 90, 150)
        (0.0, 0.006738, 1.0)
    """
    if ee <= es:
        raise ValueError(f"sigmoid_rampup: ee must be > es, got es={es!r}, ee={ee!r}")
    if epoch < es:
        return 0.0
    if epoch > ee:
        return 1.0
    phase = 1.0 - (epoch - es) / (ee - es)
    return math.exp(-5.0 * phase * phase)


def te_schedule(epochs: int) -> tuple[int, int]:
    """``(es, ee)`` scaled from the paper's 90 and 150 of 200 epochs to ``epochs`` (rounded, ``es >= 1``, ``ee > es``).

    Example::

        >>> te_schedule(200), te_schedule(40), te_schedule(2)
        ((90, 150), (18, 30), (1, 2))
    """
    if isinstance(epochs, bool) or not isinstance(epochs, int) or epochs < 1:
        raise ValueError(f"te_schedule: epochs must be an integer >= 1, got {epochs!r}")
    es = max(1, round(epochs * TE_DEFAULTS["es"] / TE_DEFAULTS["epochs"]))
    ee = max(es + 1, round(epochs * TE_DEFAULTS["ee"] / TE_DEFAULTS["epochs"]))
    return es, ee


def te_penalty(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-example TE term ``(1/C) sum_c (softmax(logits)_c - target_c)^2``, shape ``[B]``.

    Its batch mean equals the paper's ``((softmax(logits) - target) ** 2).mean()``.

    Example::

        >>> te_penalty(torch.zeros(1, 2), torch.tensor([[1.0, 0.0]]))
        tensor([0.2500])
    """
    if logits.dim() != 2 or target.shape != logits.shape:
        raise ValueError(f"te_penalty: logits [B, C] and target of the same shape expected, got "
                         f"{tuple(logits.shape)} and {tuple(target.shape)}")
    return (F.softmax(logits, dim=1) - target.to(logits.dtype)).pow(2).mean(dim=1)


class TemporalEnsembling:
    """The per-example EMA table and the ramp-up weight of temporal ensembling.

    Args:
        num_samples: size of the training set (rows of the table, indexed by data-set index).
        num_classes: number of classes.
        momentum: the EMA factor ``a`` (paper: 0.9).
        reg_weight: ``W`` (paper: 300).
        es, ee: start and end epoch of the ramp-up (epochs counted from 1). Default: the
            paper's 90/150 of 200 scaled to ``epochs`` by :func:`te_schedule`.
        epochs: total epochs, used only to scale ``es``/``ee`` when they are not given.
        device: where the table lives (that of the logits passed to :meth:`update`).

    Usage per mini-batch (``idx`` = data-set indices of the batch, ``epoch`` from 1)::

        with torch.no_grad():  # eval mode, clean input: the paper's update
            target = te.update(model(x), idx, epoch)      # None before es
        w = te.weight(epoch)
        losses = F.cross_entropy(model(x_adv), y, reduction="none")
        if target is not None:
            losses = losses + w * te_penalty(model(x_adv), target)

    Example::

        >>> te = TemporalEnsembling(num_samples=4, num_classes=2, es=1, ee=3)
        >>> t = te.update(torch.tensor([[0.0, 0.0]]), torch.tensor([2]), epoch=1)
        >>> te.table[2], t
        (tensor([0.0500, 0.0500]), tensor([[0.5000, 0.5000]]))
    """

    def __init__(self, num_samples: int, num_classes: int, momentum: float = TE_DEFAULTS["momentum"],
                 reg_weight: float = TE_DEFAULTS["reg_weight"], es: int | None = None, ee: int | None = None,
                 epochs: int = TE_DEFAULTS["epochs"], device: str | torch.device = "cpu"):
        for name, v in (("num_samples", num_samples), ("num_classes", num_classes)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"TemporalEnsembling: {name} must be an integer >= 1, got {v!r}")
        if not 0.0 <= momentum < 1.0:
            raise ValueError(f"TemporalEnsembling: momentum must be in [0, 1), got {momentum!r}")
        if not (math.isfinite(reg_weight) and reg_weight >= 0):
            raise ValueError(f"TemporalEnsembling: reg_weight must be a finite number >= 0, got {reg_weight!r}")
        d_es, d_ee = te_schedule(epochs)
        es = d_es if es is None else es
        ee = d_ee if ee is None else ee
        if not (es >= 1 and ee > es):
            raise ValueError(f"TemporalEnsembling: need 1 <= es < ee, got es={es!r}, ee={ee!r}")
        self.num_samples, self.num_classes = num_samples, num_classes
        self.momentum, self.reg_weight = float(momentum), float(reg_weight)
        self.es, self.ee = int(es), int(ee)
        # Zeros, as in the official code; the row normalisation of the target makes the first
        # update's (1 - a) factor irrelevant.
        self.table = torch.zeros(num_samples, num_classes, dtype=torch.float32, device=device)

    def active(self, epoch: int) -> bool:
        """Whether the TE term is on at ``epoch`` (``epoch >= es``)."""
        return epoch >= self.es

    def weight(self, epoch: int) -> float:
        """``w(e) = W * r(e)`` (:func:`sigmoid_rampup`)."""
        return self.reg_weight * sigmoid_rampup(epoch, self.es, self.ee)

    @torch.no_grad()
    def update(self, clean_logits: torch.Tensor, index: torch.Tensor, epoch: int) -> torch.Tensor | None:
        """EMA update of the rows ``index`` with ``softmax(clean_logits)``; returns the normalised target.

        Returns ``None`` (and leaves the table alone) before ``es``, as the paper's code does.
        ``clean_logits`` should come from the model in eval mode on the clean batch.
        """
        if clean_logits.dim() != 2 or clean_logits.shape[1] != self.num_classes:
            raise ValueError(f"TemporalEnsembling.update: clean_logits must be [B, {self.num_classes}], "
                             f"got {tuple(clean_logits.shape)}")
        index = torch.as_tensor(index, device=self.table.device).long()
        if index.shape != (clean_logits.shape[0],):
            raise ValueError(f"TemporalEnsembling.update: index must be [{clean_logits.shape[0]}], "
                             f"got {tuple(index.shape)}")
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.num_samples):
            raise ValueError(f"TemporalEnsembling.update: index out of range [0, {self.num_samples}): "
                             f"min {int(index.min())}, max {int(index.max())}")
        if index.numel() != torch.unique(index).numel():
            # table[index] = rows would keep one of the duplicates' rows at random: one EMA step
            # where the caller meant two. A data loader's batch never repeats an example.
            raise ValueError("TemporalEnsembling.update: index has repeated entries; each example may appear "
                             "once per batch")
        if not self.active(epoch):
            return None
        prob = F.softmax(clean_logits.detach().float(), dim=1).to(self.table.device)
        rows = self.momentum * self.table[index] + (1.0 - self.momentum) * prob
        self.table[index] = rows
        return (rows / rows.sum(1, keepdim=True)).to(clean_logits.device)

    def state_dict(self) -> dict:
        """Everything needed to resume (the table and the hyperparameters)."""
        return {"table": self.table.clone(), "momentum": self.momentum, "reg_weight": self.reg_weight,
                "es": self.es, "ee": self.ee}

    def load_state_dict(self, state: dict) -> None:
        """Restores :meth:`state_dict`'s output (the table shape must match)."""
        if tuple(state["table"].shape) != tuple(self.table.shape):
            raise ValueError(f"TemporalEnsembling.load_state_dict: table shape {tuple(state['table'].shape)} "
                             f"!= {tuple(self.table.shape)}")
        self.table.copy_(state["table"])
        self.momentum, self.reg_weight = float(state["momentum"]), float(state["reg_weight"])
        self.es, self.ee = int(state["es"]), int(state["ee"])
