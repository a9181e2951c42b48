"""Adversarial training helpers: attacks used to craft training and evaluation examples.

Example::

    >>> import torch, torch.nn as nn
    >>> from engm_fast.at import pgd_attack
    >>> model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10)).eval()
    >>> x, y = torch.rand(4, 1, 8, 8), torch.randint(0, 10, (4,))
    >>> pgd_attack(model, x, y, eps=0.1, alpha=0.025, steps=10).shape
    torch.Size([4, 1, 8, 8])
"""
from engm_fast.at.attacks import PGD_NORMS, pgd_attack

__all__ = ["PGD_NORMS", "pgd_attack"]
