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

__all__ = ["Splits", "fixed_subset", "stratified_split"]


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


def stratified_split(y: torch.Tensor, test_size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(train_index, test_index)``: ``test_size`` examples held out, each class in proportion
    (rounded; the last class takes the remainder), drawn with ``seed``; both sorted.

    Example::

        >>> y = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
        >>> train, test = stratified_split(y, 4, seed=0)
        >>> sorted(y[test].tolist()), len(train)
        ([0, 0, 1, 1], 4)
    """
    n = y.shape[0]
    if isinstance(test_size, bool) or not isinstance(test_size, int) or not 0 < test_size < n:
        raise ValueError(f"stratified_split: test_size must be an integer in [1, {n - 1}], got {test_size!r}")
    gen = torch.Generator().manual_seed(seed)
    classes = torch.unique(y)
    test, taken = [], 0
    for k, c in enumerate(classes.tolist()):
        members = (y == c).nonzero().flatten()
        share = test_size - taken if k == len(classes) - 1 else round(test_size * members.numel() / n)
        share = min(share, members.numel())
        test.append(members[torch.randperm(members.numel(), generator=gen)[:share]])
        taken += share
    test_index = torch.cat(test).sort().values
    keep = torch.ones(n, dtype=torch.bool)
    keep[test_index] = False
    return keep.nonzero().flatten(), test_index
