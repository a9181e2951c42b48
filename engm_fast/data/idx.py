"""The IDX file format of MNIST and Fashion-MNIST (LeCun et al.), plain or gzip-compressed.

An IDX file is a big-endian header -- two zero bytes, a type code (``0x08``: unsigned byte),
the number of dimensions ``d`` -- then ``d`` big-endian uint32 sizes, then the data in C order.
Images are ``[N, 28, 28]`` (``idx3``), labels ``[N]`` (``idx1``).

Example::

    >>> import gzip, os, tempfile
    >>> path = os.path.join(tempfile.mkdtemp(), "labels-idx1-ubyte.gz")
    >>> with gzip.open(path, "wb") as f:
    ...     _ = f.write(bytes([0, 0, 8, 1, 0, 0, 0, 3, 7, 2, 9]))
    >>> read_idx(path).tolist()
    [7, 2, 9]
"""
from __future__ import annotations

import gzip
import os

import numpy as np

__all__ = ["read_idx"]

_UBYTE = 0x08


def read_idx(path: str) -> np.ndarray:
    """The uint8 array stored in the IDX file ``path`` (gzip-compressed when it ends in ``.gz``).

    Raises ``ValueError`` naming the file when the header is not an unsigned-byte IDX header or
    the data is shorter or longer than the header says.

    Example::

        >>> import os, tempfile
        >>> bad = os.path.join(tempfile.mkdtemp(), "x-idx1-ubyte")
        >>> with open(bad, "wb") as f:
        ...     _ = f.write(b"not an idx file")
        >>> read_idx(bad)
        Traceback (most recent call last):
        ...
        ValueError: .../x-idx1-ubyte: not an unsigned-byte IDX file (header bytes 6e 6f 74 20)
    """
    opener = gzip.open if os.fspath(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        raw = f.read()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != _UBYTE or raw[3] < 1:
        raise ValueError(f"{path}: not an unsigned-byte IDX file (header bytes {raw[:4].hex(' ')})")
    ndim = raw[3]
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes, {header} needed for {ndim} dimensions)")
    shape = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    size = int(np.prod(shape))
    if len(raw) - header != size:
        raise ValueError(f"{path}: IDX header says shape {shape} ({size} bytes) but the file holds "
                         f"{len(raw) - header} data bytes")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape).copy()
