"""Models of the adversarial-training papers: PreActResNet-18, WideResNet-34-10, and two small CNNs.

:func:`make_model` builds one by name (``"small_cnn"`` for 8x8 digits, ``"mnist_cnn"`` for
28x28 MNIST / Fashion-MNIST, ``"preact_resnet18"``, ``"wide_resnet34_10"``);
``width``/``depth``/``widen_factor``/``blocks`` keyword arguments shrink the CIFAR models for
tests, ``hidden``/``image_size`` change ``mnist_cnn``.

Example::

    >>> import torch
    >>> m = make_model("small_cnn", seed=0)
    >>> tuple(m(torch.zeros(1, 1, 8, 8)).shape)
    (1, 10)
    >>> m = make_model("preact_resnet18", num_classes=10, width=4, blocks=(1, 1, 1, 1))
    >>> tuple(m(torch.zeros(2, 3, 32, 32)).shape)
    (2, 10)
"""
from __future__ import annotations

import torch
from torch import nn

from .preact_resnet import PreActBlock, PreActResNet, preact_resnet18
from .mnist_cnn import mnist_cnn
from .small_cnn import small_cnn
from .wide_resnet import WideBasic, WideResNet, wide_resnet34_10

__all__ = ["MODELS", "PreActBlock", "PreActResNet", "WideBasic", "WideResNet", "make_model", "mnist_cnn",
           "preact_resnet18", "small_cnn", "wide_resnet34_10"]

MODELS = ("small_cnn", "mnist_cnn", "preact_resnet18", "wide_resnet34_10")


def make_model(name: str, num_classes: int = 10, in_channels: int | None = None, seed: int | None = None,
               **kwargs) -> nn.Module:
    """A model by name; ``seed`` seeds the initial weights; ``kwargs`` go to the constructor.

    ``in_channels`` defaults to 1 for the small CNNs and 3 for the CIFAR models.

    ``"small_cnn"`` (:mod:`engm_fast.models.small_cnn`) is for ``[N, 1, 8, 8]`` inputs and 10 classes only.

    Example::

        >>> make_model("vgg16")
        Traceback (most recent call last):
        ...
        ValueError: model must be one of ('small_cnn', 'mnist_cnn', 'preact_resnet18', 'wide_resnet34_10'), got 'vgg16'
    """
    if name not in MODELS:
        raise ValueError(f"model must be one of {MODELS}, got {name!r}")
    if seed is not None:
        torch.manual_seed(seed)
    if name == "small_cnn":
        if num_classes != 10 or in_channels not in (None, 1) or kwargs:
            raise ValueError(f"small_cnn is the demo's CNN for 1x8x8 inputs and 10 classes; got num_classes="
                             f"{num_classes}, in_channels={in_channels}, extra {sorted(kwargs)}")
        return small_cnn()
    if name == "mnist_cnn":
        unknown = sorted(set(kwargs) - {"hidden", "image_size"})
        if unknown:
            raise ValueError(f"mnist_cnn: unknown arguments {unknown} (hidden, image_size allowed)")
        return mnist_cnn(num_classes=num_classes, in_channels=1 if in_channels is None else in_channels, **kwargs)
    in_channels = 3 if in_channels is None else in_channels
    if name == "preact_resnet18":
        width = kwargs.pop("width", 64)
        blocks = tuple(kwargs.pop("blocks", (2, 2, 2, 2)))
        if kwargs:
            raise ValueError(f"preact_resnet18: unknown arguments {sorted(kwargs)} (width, blocks allowed)")
        return PreActResNet(num_classes=num_classes, width=width, blocks=blocks, in_channels=in_channels)
    depth = kwargs.pop("depth", 34)
    widen = kwargs.pop("widen_factor", 10)
    drop = kwargs.pop("drop_rate", 0.0)
    if kwargs:
        raise ValueError(f"wide_resnet34_10: unknown arguments {sorted(kwargs)} (depth, widen_factor, drop_rate allowed)")
    return WideResNet(depth=depth, widen_factor=widen, num_classes=num_classes, drop_rate=drop, in_channels=in_channels)
