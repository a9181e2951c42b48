"""The train/test tensors of a data set, and fixed subsets of them.

Example::

    >>> import torch
    >>> x, y = torch.arange(10.0).reshape(10, 1), torch.arange(10)
    >>> xs, ys = fixed_subset(x, y, 3, seed=0)
    >>> xs.shape, bool(torch.equal(xs[:, 0].long(), ys))
    (torch.Size([3, 1]), True)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

__all__ = ["Splits", "fixed_subset"]


class Splits(NamedTuple):
    """Train/test tensors of a data set (inputs in [0, 1], shape ``[N, C, H, W]``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def fixed_subset(x: torch.Tensor, y: torch.Tensor, k: int | None,
                 seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``k`` examples of a permutation drawn with ``seed`` (all of them when ``k`` is
    ``None`` or not smaller than the set): the same subset whatever else uses the random state.

    Example::

        >>> import torch
        >>> x, y = torch.zeros(5, 2), torch.arange(5)
        >>> fixed_subset(x, y, None, seed=0)[1].tolist()
        [0, 1, 2, 3, 4]
    """
    if k is None or k >= x.shape[0]:
        return x, y
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"subset size must be an integer >= 1 or None, got {k!r}")
    keep = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(seed))[:k]
    return x[keep], y[keep]
