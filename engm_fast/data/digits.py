"""scikit-learn's 8x8 handwritten digits: 1797 images, bundled with scikit-learn (no download).

Pixels are scaled from 0..16 to [0, 1] and shaped ``[N, 1, 8, 8]``; the train/test split is
stratified by class and fixed by ``split_seed`` (whatever the training seed), so that runs with
different seeds are evaluated on the same test images.

Example::

    >>> s = load_digits()
    >>> tuple(s.x_train.shape), tuple(s.x_test.shape), float(s.x_train.max()) <= 1.0
    ((1347, 1, 8, 8), (450, 1, 8, 8), True)
"""
from __future__ import annotations

import torch

from .splits import Splits

__all__ = ["SPLIT_SEED", "TEST_SIZE", "load_digits"]

SPLIT_SEED = 0
TEST_SIZE = 0.25


def load_digits(device: str = "cpu", test_size: float = TEST_SIZE, split_seed: int = SPLIT_SEED) -> Splits:
    """The digits as :class:`~engm_fast.data.Splits` (10 classes), split ``1 - test_size : test_size``.

    Example::

        >>> s = load_digits(test_size=0.5)
        >>> s.x_train.shape[0] + s.x_test.shape[0], s.num_classes
        (1797, 10)
    """
    try:
        from sklearn.datasets import load_digits as sklearn_digits
        from sklearn.model_selection import train_test_split
    except ImportError as exc:  # pragma: no cover - depends on the environment
        raise ImportError("the digits data set ships with scikit-learn: pip install scikit-learn") from exc

    digits = sklearn_digits()
    x = (digits.images / 16.0).astype("float32").reshape(-1, 1, 8, 8)
    y = digits.target.astype("int64")
    x_tr, x_te, y_tr, y_te = train_test_split(x, y, test_size=test_size, stratify=y, random_state=split_seed)
    as_t = lambda a: torch.from_numpy(a).to(device)
    return Splits(as_t(x_tr), as_t(y_tr), as_t(x_te), as_t(y_te), 10)
