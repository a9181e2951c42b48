"""The small CNN for 28x28 images (MNIST, Fashion-MNIST): two stride-2 convolutions and one hidden layer.

``conv4x4(C -> 16, stride 2) - ReLU - conv4x4(16 -> 32, stride 2) - ReLU - Linear(32*7*7 -> 100) -
ReLU - Linear(100 -> classes)``, the MNIST model of Wong et al. ("Fast is better than free",
2020) and of Wong & Kolter's convex-outer-adversarial-polytope work: 166,406 parameters for
1x28x28 inputs and 10 classes. Each convolution halves the side (padding 1), so other square
sizes divisible by 4 work too (``image_size``).

Example::

    >>> import torch
    >>> tuple(mnist_cnn()(torch.zeros(2, 1, 28, 28)).shape)
    (2, 10)
"""
from __future__ import annotations

from torch import nn

__all__ = ["mnist_cnn"]


def mnist_cnn(num_classes: int = 10, in_channels: int = 1, image_size: int = 28, hidden: int = 100) -> nn.Module:
    """The CNN for ``[N, in_channels, image_size, image_size]`` inputs; seed torch's RNG first for given weights.

    Example::

        >>> sum(p.numel() for p in mnist_cnn().parameters())
        166406
        >>> mnist_cnn(image_size=30)
        Traceback (most recent call last):
        ...
        ValueError: mnist_cnn: image_size must be a positive multiple of 4 (two stride-2 convolutions), got 30
    """
    for name, value in (("num_classes", num_classes), ("in_channels", in_channels), ("hidden", hidden)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"mnist_cnn: {name} must be an integer >= 1, got {value!r}")
    if isinstance(image_size, bool) or not isinstance(image_size, int) or image_size < 4 or image_size % 4:
        raise ValueError(f"mnist_cnn: image_size must be a positive multiple of 4 (two stride-2 convolutions), "
                         f"got {image_size!r}")
    side = image_size // 4
    return nn.Sequential(
        nn.Conv2d(in_channels, 16, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Conv2d(16, 32, 4, stride=2, padding=1),
        nn.ReLU(),
        nn.Flatten(),
        nn.Linear(32 * side * side, hidden),
        nn.ReLU(),
        nn.Linear(hidden, num_classes),
    )
