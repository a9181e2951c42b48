"""Random labels for the memorization study (Zhang et al. 2017; Dong et al. 2022 for AT).

Labels are drawn uniformly from ``num_classes`` classes by a ``torch.Generator`` seeded with
``seed``, so the same ``(n, num_classes, seed, rate)`` always gives the same labels, on any
machine and whatever else uses the global RNG. With ``rate < 1`` only a seeded subset of
``round(rate * n)`` examples gets a random label (the rest keep theirs); the AT paper uses
``rate = 1.0`` (every label random).

Example::

    >>> import torch
    >>> y = torch.arange(10) % 3
    >>> a = random_labels(y, num_classes=3, seed=0)
    >>> torch.equal(a, random_labels(y, num_classes=3, seed=0)), a.shape
    (True, torch.Size([10]))
"""
from __future__ import annotations

import torch
from torch.utils.data import Dataset

__all__ = ["RandomLabelDataset", "random_labels"]


def random_labels(y: torch.Tensor, num_classes: int, seed: int, rate: float = 1.0) -> torch.Tensor:
    """A copy of ``y`` with ``round(rate * len(y))`` seeded examples relabelled uniformly at random.

    A random label may equal the true one (uniform over all classes, as in the papers).

    Example::

        >>> y = torch.zeros(6, dtype=torch.long)
        >>> torch.equal(random_labels(y, 4, seed=1, rate=0.0), y)
        True
    """
    if not isinstance(y, torch.Tensor) or y.dim() != 1 or y.is_floating_point():
        raise ValueError(f"random_labels: y must be a 1-D integer tensor, got "
                         f"{tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__}")
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise ValueError(f"random_labels: num_classes must be an integer >= 1, got {num_classes!r}")
    if not isinstance(rate, (int, float)) or not 0.0 <= rate <= 1.0:
        raise ValueError(f"random_labels: rate must be in [0, 1], got {rate!r}")
    n = y.shape[0]
    g = torch.Generator().manual_seed(int(seed))
    # Draw both vectors in full so the labels of a given example do not depend on rate.
    new = torch.randint(0, num_classes, (n,), generator=g)
    order = torch.randperm(n, generator=g)
    chosen = order[: round(rate * n)]
    out = y.detach().cpu().clone()
    out[chosen] = new[chosen]
    return out.to(y.device)


class RandomLabelDataset(Dataset):
    """Wraps a map-style dataset of ``(x, y)`` items; item ``i`` becomes ``(x, random_label_i)``.

    Args:
        dataset: the wrapped dataset (``len`` and ``dataset[i] -> (x, y, ...)``).
        num_classes: number of classes to draw from.
        seed: seed of the labels (deterministic).
        rate: fraction of examples relabelled (1.0: all).
        return_index: also return ``i`` (``(x, y, i)``), which temporal ensembling needs.

    Attributes:
        targets: the ``[N]`` label tensor used (random where chosen, original elsewhere).

    Example::

        >>> from torch.utils.data import TensorDataset
        >>> base = TensorDataset(torch.randn(5, 2), torch.zeros(5, dtype=torch.long))
        >>> ds = RandomLabelDataset(base, num_classes=10, seed=3, return_index=True)
        >>> x, y, i = ds[4]
        >>> int(y) == int(ds.targets[4]), i
        (True, 4)
    """

    def __init__(self, dataset, num_classes: int, seed: int, rate: float = 1.0, return_index: bool = False):
        n = len(dataset)
        original = torch.tensor([int(dataset[i][1]) for i in range(n)], dtype=torch.long)
        self.dataset = dataset
        self.original_targets = original
        self.targets = random_labels(original, num_classes, seed, rate)
        self.return_index = return_index

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int):
        item = self.dataset[i]
        y = self.targets[i]
        return (item[0], y, i) if self.return_index else (item[0], y)
