"""Data for the adversarial-training experiments: digits, CIFAR-10/100 (local), random labels.

:func:`load_dataset` returns a :class:`Splits` for ``"digits"`` (scikit-learn's bundled 8x8
digits, no download), ``"cifar10"`` or ``"cifar100"`` (a local python-pickle directory,
:mod:`engm_fast.data.cifar`).

Example::

    >>> s = load_dataset("digits")
    >>> s.num_classes, tuple(s.x_train.shape[1:]), s.x_train.shape[0] + s.x_test.shape[0]
    (10, (1, 8, 8), 1797)
"""
from __future__ import annotations

from typing import NamedTuple

import torch

from .cifar import CIFAR_SPECS, load_cifar
from .random_labels import RandomLabelDataset, random_labels

__all__ = ["DATASETS", "RandomLabelDataset", "Splits", "load_cifar", "load_dataset", "load_digits",
           "random_labels"]

DATASETS = ("digits", "cifar10", "cifar100")


class Splits(NamedTuple):
    """Train/test tensors of a data set (inputs in [0, 1], shape ``[N, C, H, W]``)."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    num_classes: int


def load_digits(device: str = "cpu", test_size: float = 0.25, split_seed: int = 0) -> Splits:
    """scikit-learn's 8x8 digits with the demo's stratified split (:func:`engm_fast.demo.load_digits_data`).

    Example::

        >>> tuple(load_digits().x_test.shape)
        (450, 1, 8, 8)
    """
    from ..demo import load_digits_data

    return Splits(*load_digits_data(device=device, test_size=test_size, split_seed=split_seed), 10)


def load_dataset(name: str, data_dir: str | None = None, device: str = "cpu") -> Splits:
    """``"digits"`` (no directory needed) or ``"cifar10"``/``"cifar100"`` from ``data_dir``.

    Example::

        >>> load_dataset("mnist")
        Traceback (most recent call last):
        ...
        ValueError: dataset must be one of ('digits', 'cifar10', 'cifar100'), got 'mnist'
    """
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    if name == "digits":
        return load_digits(device=device)
    if data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir (a local directory with the python-pickle "
                         f"{CIFAR_SPECS[name]['folder']}/ folder; nothing is downloaded)")
    return Splits(*load_cifar(data_dir, name, device=device), CIFAR_SPECS[name]["num_classes"])
