"""PreAct ResNet (He et al. 2016, identity mappings) for CIFAR-shaped inputs, as used in AT papers.

``preact_resnet18()`` is the standard PreActResNet-18 of the robust-overfitting and TE papers
(widths 64/128/256/512, two blocks per stage, 3x3 stem, global average pooling). ``width`` and
``blocks`` shrink it for tests; ``in_channels`` allows grey-scale inputs. Average pooling is
adaptive, so any input size of at least 8x8 works (CIFAR: 32x32).

Example::

    >>> import torch
    >>> m = PreActResNet(width=4, blocks=(1, 1, 1, 1), num_classes=10)
    >>> tuple(m(torch.zeros(2, 3, 32, 32)).shape)
    (2, 10)
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

__all__ = ["PreActBlock", "PreActResNet", "preact_resnet18"]


class PreActBlock(nn.Module):
    """BN-ReLU-conv3x3-BN-ReLU-conv3x3 with an identity (or 1x1-conv) shortcut.

    Example::

        >>> import torch
        >>> tuple(PreActBlock(4, 8, stride=2)(torch.zeros(1, 4, 8, 8)).shape)
        (1, 8, 4, 4)
    """

    expansion = 1

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Conv2d(in_planes, planes, 1, stride=stride, bias=False)

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if self.shortcut is not None else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        return out + shortcut


class PreActResNet(nn.Module):
    """PreAct ResNet with four stages (strides 1, 2, 2, 2) of ``blocks[k]`` blocks, widths ``width * 2^k``.

    Like the PreActResNet-18 of the robust-overfitting code (Rice et al. 2020), a final
    BN-ReLU precedes the pooling (1024 parameters more than a version without it).

    Example::

        >>> import torch
        >>> sum(p.numel() for p in preact_resnet18().parameters())
        11172170
    """

    def __init__(self, num_classes: int = 10, width: int = 64, blocks: tuple[int, ...] = (2, 2, 2, 2),
                 in_channels: int = 3):
        super().__init__()
        if width < 1 or len(blocks) != 4 or min(blocks) < 1:
            raise ValueError(f"PreActResNet: width >= 1 and four block counts >= 1 expected, got width={width!r}, "
                             f"blocks={blocks!r}")
        self.conv1 = nn.Conv2d(in_channels, width, 3, stride=1, padding=1, bias=False)
        layers, in_planes = [], width
        for k, (n, stride) in enumerate(zip(blocks, (1, 2, 2, 2))):
            planes = width * 2 ** k
            stage = []
            for s in [stride] + [1] * (n - 1):
                stage.append(PreActBlock(in_planes, planes, s))
                in_planes = planes
            layers.append(nn.Sequential(*stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = layers
        self.bn = nn.BatchNorm2d(in_planes)
        self.linear = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.relu(self.bn(out))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.linear(out)


def preact_resnet18(num_classes: int = 10, in_channels: int = 3) -> PreActResNet:
    """The standard PreActResNet-18 (about 11.2M parameters for 10 classes).

    Example::

        >>> preact_resnet18(num_classes=100).linear.out_features
        100
    """
    return PreActResNet(num_classes=num_classes, width=64, blocks=(2, 2, 2, 2), in_channels=in_channels)
