"""WideResNet (Zagoruyko & Komodakis 2016) in the form used by TRADES/MART/TE: WRN-34-10 for CIFAR.

``depth = 6 n + 4`` gives ``n`` blocks per stage (WRN-34: n = 5), widths ``16, 16k, 32k, 64k``
for widen factor ``k``; BN-ReLU before each conv, 1x1-conv shortcuts where the shape changes,
global average pooling. Small ``depth``/``widen_factor`` make a test-sized network.

Example::

    >>> import torch
    >>> m = WideResNet(depth=10, widen_factor=1, num_classes=10)
    >>> tuple(m(torch.zeros(2, 3, 32, 32)).shape)
    (2, 10)
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import nn

__all__ = ["WideBasic", "WideResNet", "wide_resnet34_10"]


class WideBasic(nn.Module):
    """The WRN basic block (TRADES's ``BasicBlock``), optional dropout between the convolutions.

    Example::

        >>> import torch
        >>> tuple(WideBasic(4, 8, stride=2)(torch.zeros(1, 4, 8, 8)).shape)
        (1, 8, 4, 4)
    """

    def __init__(self, in_planes: int, out_planes: int, stride: int, drop_rate: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, out_planes, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = nn.Conv2d(out_planes, out_planes, 3, stride=1, padding=1, bias=False)
        self.drop_rate = drop_rate
        self.equal = in_planes == out_planes and stride == 1
        self.shortcut = None if self.equal else nn.Conv2d(in_planes, out_planes, 1, stride=stride, bias=False)

    def forward(self, x):
        o = F.relu(self.bn1(x))
        # As in the reference code: the shortcut of a shape-changing block takes the activated input.
        shortcut = x if self.equal else self.shortcut(o)
        o = F.relu(self.bn2(self.conv1(o)))
        if self.drop_rate > 0:
            o = F.dropout(o, p=self.drop_rate, training=self.training)
        return self.conv2(o) + shortcut


class WideResNet(nn.Module):
    """WRN-``depth``-``widen_factor``; ``depth`` must be ``6 n + 4``.

    Example::

        >>> sum(p.numel() for p in WideResNet(depth=34, widen_factor=10).parameters())
        46160474
    """

    def __init__(self, depth: int = 34, widen_factor: int = 10, num_classes: int = 10, drop_rate: float = 0.0,
                 in_channels: int = 3):
        super().__init__()
        if depth < 10 or (depth - 4) % 6 != 0 or widen_factor < 1:
            raise ValueError(f"WideResNet: depth must be 6n+4 >= 10 and widen_factor >= 1, got depth={depth!r}, "
                             f"widen_factor={widen_factor!r}")
        n = (depth - 4) // 6
        widths = [16, 16 * widen_factor, 32 * widen_factor, 64 * widen_factor]
        self.conv1 = nn.Conv2d(in_channels, widths[0], 3, stride=1, padding=1, bias=False)
        stages, in_planes = [], widths[0]
        for out_planes, stride in zip(widths[1:], (1, 2, 2)):
            blocks = []
            for i in range(n):
                blocks.append(WideBasic(in_planes, out_planes, stride if i == 0 else 1, drop_rate))
                in_planes = out_planes
            stages.append(nn.Sequential(*blocks))
        self.block1, self.block2, self.block3 = stages
        self.bn = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)
        for m in self.modules():  # the reference initialisation
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            elif isinstance(m, nn.Linear):
                nn.init.zeros_(m.bias)

    def forward(self, x):
        o = self.block3(self.block2(self.block1(self.conv1(x))))
        o = F.relu(self.bn(o))
        return self.fc(F.adaptive_avg_pool2d(o, 1).flatten(1))


def wide_resnet34_10(num_classes: int = 10, in_channels: int = 3) -> WideResNet:
    """WRN-34-10 (about 46.2M parameters for 10 classes).

    Example::

        >>> wide_resnet34_10(num_classes=100).fc.out_features
        100
    """
    return WideResNet(depth=34, widen_factor=10, num_classes=num_classes, in_channels=in_channels)
