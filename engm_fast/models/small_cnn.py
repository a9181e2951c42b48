"""The small CNN of the demo and the digits experiments (38,282 parameters).

``conv3x3(1 -> 16) - ReLU - conv3x3(16 -> 32) - ReLU - maxpool 2 - Linear(512 -> 64) - ReLU -
Linear(64 -> 10)`` for ``[N, 1, 8, 8]`` inputs (scikit-learn's digits).

Example::

    >>> import torch
    >>> tuple(small_cnn()(torch.zeros(2, 1, 8, 8)).shape)
    (2, 10)
"""
from __future__ import annotations

from torch import nn

__all__ = ["small_cnn"]


def small_cnn() -> nn.Module:
    """The CNN for ``[N, 1, 8, 8]`` inputs and 10 classes; seed torch's RNG first for given weights.

    Example::

        >>> sum(p.numel() for p in small_cnn().parameters())
        38282
    """
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
