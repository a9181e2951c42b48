"""The benchmark models, at the sizes the comparison with the peers uses.

* :func:`mlp`: 784-512-512-10 with ReLU (``[B, 784]`` inputs).
* :func:`cnn32`: two 3x3 conv layers + two linear layers for ``[B, 3, 32, 32]``.
* :func:`resnet18`: ResNet-18 for CIFAR shapes (3x3 stem, no max-pool, He et al. 2016's
  BasicBlocks [2, 2, 2, 2]), with ``norm="batch"`` or ``norm="group"`` (GroupNorm with 32
  groups, the variant that per-example methods which cannot handle BatchNorm can run).
  ``width`` scales the channels (64 at full size) so tests can use a tiny copy.
* :class:`PreLNMLPBlock`: embedding, LayerNorm and a residual MLP on ``[B, T, 32]`` sequences,
  mean-pooled (a LayerNorm model without attention, for the step-overhead benchmark).
* :class:`TransformerBlock`: a pre-LN encoder block on token sequences, attention written with
  ``nn.Linear`` projections and ``F.scaled_dot_product_attention`` (the shape of most modern
  implementations; every peer that supports Linear, LayerNorm and Embedding can run it).

Example::

    >>> import torch
    >>> from engm_fast.bench.models import resnet18, TransformerBlock
    >>> resnet18(norm="group", width=8)(torch.zeros(2, 3, 32, 32)).shape
    torch.Size([2, 10])
    >>> TransformerBlock(vocab=50, d=16, heads=2)(torch.zeros(2, 7, dtype=torch.long)).shape
    torch.Size([2, 10])
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["NORMS", "PreLNMLPBlock", "TransformerBlock", "cnn32", "mlp", "resnet18"]

NORMS = ("batch", "group")


def mlp(d_in: int = 784, hidden: int = 512, classes: int = 10) -> nn.Module:
    """784-512-512-10 MLP with ReLU.

    Example::

        >>> mlp()(torch.zeros(3, 784)).shape
        torch.Size([3, 10])
    """
    return nn.Sequential(nn.Linear(d_in, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(),
                         nn.Linear(hidden, classes))


def cnn32(channels: int = 3, classes: int = 10) -> nn.Module:
    """Small CNN for 32x32 images: conv32-pool-conv64-pool-fc128-fc10.

    Example::

        >>> cnn32()(torch.zeros(2, 3, 32, 32)).shape
        torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(channels, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(64 * 8 * 8, 128), nn.ReLU(), nn.Linear(128, classes),
    )


def _norm_layer(norm: str, channels: int) -> nn.Module:
    if norm == "batch":
        return nn.BatchNorm2d(channels)
    # 32 groups as in Wu & He (2018); fewer when a tiny test model has fewer channels.
    return nn.GroupNorm(min(32, channels), channels)


class _BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
        self.n1 = _norm_layer(norm, c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
        self.n2 = _norm_layer(norm, c_out)
        self.shortcut = nn.Sequential()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False), _norm_layer(norm, c_out))

    def forward(self, x):
        out = F.relu(self.n1(self.conv1(x)))
        out = self.n2(self.conv2(out))
        return F.relu(out + self.shortcut(x))


class _ResNet18(nn.Module):
    def __init__(self, norm: str, width: int, classes: int):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 3, 1, 1, bias=False)
        self.n0 = _norm_layer(norm, width)
        layers, c = [], width
        for i, blocks in enumerate((2, 2, 2, 2)):
            c_out = width * 2 ** i
            for b in range(blocks):
                layers.append(_BasicBlock(c, c_out, 2 if (b == 0 and i > 0) else 1, norm))
                c = c_out
        self.layers = nn.Sequential(*layers)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        out = self.layers(F.relu(self.n0(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def resnet18(norm: str = "group", width: int = 64, classes: int = 10) -> nn.Module:
    """ResNet-18 for 32x32 inputs (11.2M parameters at ``width=64``).

    Args:
        norm: ``"batch"`` (BatchNorm2d) or ``"group"`` (GroupNorm, 32 groups).
        width: channels of the first stage (64 in the paper); later stages double it.
        classes: outputs.

    Example::

        >>> sum(p.numel() for p in resnet18(norm="batch").parameters())
        11173962
    """
    if norm not in NORMS:
        raise ValueError(f"resnet18: norm must be one of {NORMS}, got {norm!r}")
    if not (isinstance(width, int) and width >= 1):
        raise ValueError(f"resnet18: width must be an int >= 1, got {width!r}")
    return _ResNet18(norm, width, classes)


class PreLNMLPBlock(nn.Module):
    """``x -> h = Linear(x) -> h + fc2(gelu(fc1(LN(h)))) -> mean over T -> head``, inputs ``[B, T, d_in]``.

    Example::

        >>> PreLNMLPBlock(d_in=8, d=16)(torch.zeros(2, 5, 8)).shape
        torch.Size([2, 10])
    """

    def __init__(self, d_in: int = 32, d: int = 128, classes: int = 10):
        super().__init__()
        self.embed = nn.Linear(d_in, d)
        self.norm = nn.LayerNorm(d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.head(h.mean(1))


class TransformerBlock(nn.Module):
    """Token embedding, one pre-LN transformer encoder block, mean-pooled linear classifier.

    ``x -> emb -> x + Wo·attn(LN(x)) -> x + W2·gelu(W1·LN(x)) -> mean over T -> head``, with
    ``heads`` attention heads and a 4x MLP. Inputs are ``[B, T]`` token ids.

    Example::

        >>> block = TransformerBlock(vocab=100, d=32, heads=4)
        >>> block(torch.randint(0, 100, (2, 5))).shape
        torch.Size([2, 10])
    """

    def __init__(self, vocab: int = 1000, d: int = 256, heads: int = 4, classes: int = 10):
        super().__init__()
        if d % heads:
            raise ValueError(f"TransformerBlock: d={d} is not divisible by heads={heads}")
        self.heads = heads
        self.emb = nn.Embedding(vocab, d)
        self.ln1, self.ln2 = nn.LayerNorm(d), nn.LayerNorm(d)
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)
        self.fc1, self.fc2 = nn.Linear(d, 4 * d), nn.Linear(4 * d, d)
        self.head = nn.Linear(d, classes)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.emb(tokens)
        B, T, d = x.shape
        q, k, v = self.qkv(self.ln1(x)).view(B, T, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        att = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, T, d)
        x = x + self.out(att)
        x = x + self.fc2(F.gelu(self.fc1(self.ln2(x))))
        return self.head(x.mean(1))
