"""Adversarial training (AT) toolkit: attacks, per-example AT losses, temporal ensembling, monitor.

* :func:`pgd_attack`, :func:`trades_attack`: the inner maximizations.
* :func:`pgd_at_losses`, :func:`trades_losses`, :func:`mart_losses`: outer losses as ``[B]``
  vectors (plug into ``ENGM.backward``); :func:`adversarial_losses` does attack + loss of a method.
* :class:`TemporalEnsembling`, :func:`te_penalty`, :func:`sigmoid_rampup`: Dong et al.'s TE.
* :class:`GradientMonitor`: gradient norm / variance statistics per step and epoch.
* ``engm_fast.at.train``: the training loop and the ``engm-fast train`` command, with
  ``engm_fast.at.evaluation`` (robust accuracy, the final attacks) and ``engm_fast.at.plots``
  (imported on demand).

Example::

    >>> import torch, torch.nn as nn
    >>> from engm_fast.at import pgd_attack
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    >>> pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=10).shape
    torch.Size([4, 1, 8, 8])
"""
from engm_fast.at.attacks import PGD_NORMS, pgd_attack
from engm_fast.at.losses import (
    AT_METHODS,
    ATBatch,
    adversarial_examples,
    adversarial_losses,
    cross_entropy_losses,
    kl_per_example,
    mart_losses,
    outer_losses,
    pgd_at_losses,
    trades_attack,
    trades_losses,
)
from engm_fast.at.monitor import GradientMonitor
from engm_fast.at.temporal_ensembling import (
    TE_DEFAULTS,
    TemporalEnsembling,
    sigmoid_rampup,
    te_penalty,
    te_schedule,
)

__all__ = [
    "AT_METHODS",
    "PGD_NORMS",
    "TE_DEFAULTS",
    "ATBatch",
    "GradientMonitor",
    "TemporalEnsembling",
    "adversarial_examples",
    "adversarial_losses",
    "cross_entropy_losses",
    "kl_per_example",
    "mart_losses",
    "outer_losses",
    "pgd_at_losses",
    "pgd_attack",
    "sigmoid_rampup",
    "te_penalty",
    "te_schedule",
    "trades_attack",
    "trades_losses",
]
